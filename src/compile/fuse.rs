//! Fusion: proving that a layer's probability rewrites fold into the fused attention kernel
//! (a non-renormalised Reweight scales V's rows; a renormalised one is a log-w bias folded into
//! Q and K), and the patch that does it — or why it cannot.
//!
//! Try it: `rewire explain rewrites/reweight_renorm.ron --model models/tiny-sd`.

use super::*;
use serde::{Deserialize, Serialize};

/// What the fusion pass did on a layer, or why it could not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fusion {
    /// No rewrite touches the probabilities: the fused kernel is kept as it is.
    NotNeeded,
    /// Fusion is off (`--no-fuse`).
    Off,
    /// Before the fusion pass.
    Pending,
    /// The probability rewrites folded into the fused kernel.
    Fused {
        folds: Vec<Fold>,
        /// Word weights bind to a prompt at run time.
        words_unbound: bool,
    },
    /// The probabilities stay materialised.
    Blocked(WhyNot),
}

/// One algebraic fold the fusion pass applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fold {
    /// A non-renormalised reweight: `P·diag(w)·V = P·(w⊙V)`.
    ScaleV,
    /// A renormalised reweight: a `log w` score bias folded into Q and K.
    BiasQk,
    /// The weights are all 1.
    Cancelled,
}

/// Why a layer's probabilities cannot fold into the fused kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WhyNot {
    NoMaterialised,
    /// A Store records them.
    Stored {
        items: Vec<usize>,
    },
    /// ReplaceMaps needs them.
    Replaced {
        items: Vec<usize>,
    },
    /// An op the pass does not fold.
    Unexpected {
        op: String,
    },
}

impl Fusion {
    /// Whether the layer has probability rewrites for the fusion pass to consider.
    pub fn pending(&self) -> bool {
        matches!(self, Fusion::Pending)
    }
}

impl std::fmt::Display for Fusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fusion::NotNeeded => write!(
                f,
                "none needed: no rewrite touches the probabilities; fused attention kernel kept"
            ),
            Fusion::Off => write!(f, "none: fusion is off (--no-fuse)"),
            Fusion::Pending => write!(f, "not fused yet"),
            Fusion::Fused {
                folds,
                words_unbound,
            } => {
                let what: Vec<&str> = folds
                    .iter()
                    .map(|x| match x {
                        Fold::ScaleV => {
                            "non-renormalised reweight → V rows scaled (P·diag(w)·V = P·(w⊙V))"
                        }
                        Fold::BiasQk => "renormalised reweight → log w score bias folded into Q/K",
                        Fold::Cancelled => "reweights cancel out (all weights 1)",
                    })
                    .collect();
                write!(f, "fused: {}; fused attention kernel kept", what.join("; "))?;
                if *words_unbound {
                    write!(f, " (word weights bind to a prompt at run time)")?;
                }
                Ok(())
            }
            Fusion::Blocked(w) => match w {
                WhyNot::NoMaterialised => {
                    write!(f, "none: no materialised attention on this layer")
                }
                WhyNot::Stored { items } => write!(
                    f,
                    "none: probabilities are materialised for items {items:?} because a Store records them"
                ),
                WhyNot::Replaced { items } => write!(
                    f,
                    "none: ReplaceMaps needs the probabilities of items {items:?}"
                ),
                WhyNot::Unexpected { op } => write!(f, "none: unexpected {op} in the chain"),
            },
        }
    }
}

/// The fuse pass for one layer: a chain of reweights alone becomes a V row scale and/or a
/// score bias folded into Q/K around the fused attention. Returns what fired or why not.
pub(super) fn fuse_layer(
    g: &Graph,
    path: &str,
    base: &Graph,
    unbound_words: bool,
) -> (Fusion, Option<Patch>) {
    let mix = g.find(path, |op| matches!(op, Op::AttnMix { .. }));
    let Some(mix) = mix else {
        return (Fusion::Blocked(WhyNot::NoMaterialised), None);
    };
    let Op::AttnMix { items, .. } = &g.node(mix).op else {
        unreachable!()
    };
    let items = items.clone();
    let ins = g.inputs_of(mix);
    // Walk the probability chain back to AttnProbs.
    let mut chain = Vec::new();
    let mut cur = ins[3];
    loop {
        let n = g.node(cur);
        let consumers = g.consumers(cur).count();
        if consumers > 1 {
            return (Fusion::Blocked(WhyNot::Stored { items }), None);
        }
        match &n.op {
            Op::AttnProbs { .. } => {
                chain.push(cur);
                break;
            }
            Op::ProbsReplace { .. } | Op::ProbsSet { .. } => {
                return (Fusion::Blocked(WhyNot::Replaced { items }), None);
            }
            Op::ProbsReweight { .. } => {
                chain.push(cur);
                cur = g.inputs_of(cur)[0];
            }
            other => {
                return (
                    Fusion::Blocked(WhyNot::Unexpected {
                        op: other.name().into(),
                    }),
                    None,
                );
            }
        }
    }
    chain.reverse(); // AttnProbs first
    let b = g.spec.batch;
    let info = base
        .attention(path)
        .map(|(_, a)| a.clone())
        .expect("layer exists in the base graph");
    let keys = info.keys;
    let mut scale = vec![1.0f32; b * keys];
    let mut bias = vec![0.0f32; b * keys];
    for &n in &chain[1..] {
        let Op::ProbsReweight {
            weights,
            renormalize,
            ..
        } = &g.node(n).op
        else {
            unreachable!()
        };
        for (r, &item) in items.iter().enumerate() {
            for j in 0..keys {
                let w = weights[r * keys + j];
                let s = &mut scale[item * keys + j];
                if renormalize[r] {
                    // renorm(renorm(P·e^β)·s·w) = softmax(scores + β + log(s·w))
                    bias[item * keys + j] += (*s * w).max(1e-30).ln();
                    *s = 1.0;
                } else {
                    *s *= w;
                }
            }
        }
    }
    let ins = g.inputs_of(mix);
    let (q, k, v) = (Src::Old(ins[0]), Src::Old(ins[1]), Src::Old(ins[2]));
    // Unbound word weights are 1 until a prompt binds them: keep the node they will fill.
    let has_scale =
        scale.iter().any(|&s| s != 1.0) || (unbound_words && !bias.iter().any(|&x| x != 0.0));
    let has_bias = bias.iter().any(|&x| x != 0.0);
    let mut what = Vec::new();
    let mut patch = Patch::new(format!("fuse reweights on {path}"));
    let v = if has_scale {
        what.push(Fold::ScaleV);
        patch.add(
            path,
            Op::ScaleKeys {
                keys,
                weights: scale,
            },
            &[v],
        )
    } else {
        v
    };
    let (q, k) = if has_bias {
        what.push(Fold::BiasQk);
        (
            patch.add(path, Op::AugmentQ { heads: info.heads }, &[q]),
            patch.add(
                path,
                Op::AugmentK {
                    heads: info.heads,
                    keys,
                    bias,
                },
                &[k],
            ),
        )
    } else {
        (q, k)
    };
    let att = patch.add(path, Op::Attention(info), &[q, k, v]);
    patch.reroute.push((mix, att));
    patch.remove.push(mix);
    patch.remove.extend(chain);
    if what.is_empty() {
        what.push(Fold::Cancelled);
    }
    (
        Fusion::Fused {
            folds: what,
            words_unbound: unbound_words,
        },
        Some(patch),
    )
}

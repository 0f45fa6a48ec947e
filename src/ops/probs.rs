//! Ops on materialised attention probabilities `[rows, heads, Nq, Nk]`: computing them for some
//! batch items, reweighting, replacing, setting and storing rows (Prompt-to-Prompt's edits),
//! and the attention output mixing the given probabilities with the fused kernel.
//!
//! Try it: `cargo test --release --test recipes` runs the recipes that lower to these ops.

use super::attention::{
    AttentionImpl, attend_nan_safe, attn_qkv, finite_weights, pick, split_heads,
};
use super::{Args, Family, Weights, count, want};
use crate::exec::{Kernel, LowerOptions, Value, upload};
use crate::graph::{Op, Shape};
use crate::limits::MAX_HEADS;
use burn::tensor::{Device, Tensor};

/// The probabilities family.
pub struct Probs;

/// A lowered probabilities op.
// Kernels are built once per plan and never moved in a hot loop: size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ProbsKernel {
    AttnProbs {
        heads: usize,
        items: Vec<usize>,
    },
    ProbsReweight {
        /// `[rows, 1, 1, Nk]`.
        weights: Tensor<4>,
        /// `[rows, 1, 1, 1]`: 1 where the row is renormalised.
        renorm: Option<Tensor<4>>,
    },
    ProbsReplace {
        from: usize,
        to: usize,
    },
    ProbsStore {
        rows: Vec<usize>,
        head_mean: bool,
    },
    ProbsSet {
        rows: Vec<usize>,
    },
    AttnMix {
        heads: usize,
        items: Vec<usize>,
    },
}

impl Family for Probs {
    fn name(&self, op: &Op) -> &'static str {
        match op {
            Op::AttnProbs { .. } => "attn_probs",
            Op::ProbsReweight { .. } => "probs_reweight",
            Op::ProbsReplace { .. } => "probs_replace",
            Op::ProbsStore { .. } => "probs_store",
            Op::ProbsSet { .. } => "probs_set",
            Op::AttnMix { .. } => "attn_mix",
            op => unreachable!("{op:?} is not a probabilities op"),
        }
    }

    fn arity(&self, op: &Op) -> usize {
        match op {
            Op::ProbsReweight { .. } | Op::ProbsReplace { .. } | Op::ProbsStore { .. } => 1,
            Op::AttnProbs { .. } | Op::ProbsSet { .. } => 2,
            Op::AttnMix { .. } => 4,
            op => unreachable!("{} is not a probabilities op", op.name()),
        }
    }

    fn check_params(&self, op: &Op) -> Result<(), String> {
        match op {
            Op::AttnProbs { heads, .. } | Op::AttnMix { heads, .. } => {
                count("heads", *heads, MAX_HEADS, "MAX_HEADS")
            }
            Op::ProbsReweight { weights, .. } => finite_weights(weights),
            _ => Ok(()),
        }
    }

    fn infer(&self, op: &Op, inputs: &[&[usize]]) -> Result<Shape, String> {
        match op {
            Op::AttnProbs { heads, items } => {
                let (q, k) = (inputs[0], inputs[1]);
                attn_qkv(*heads, q, k, k)?;
                want(
                    !items.is_empty() && items.iter().all(|&i| i < q[0]),
                    format!("items {items:?} outside the batch of {}", q[0]),
                )?;
                Ok(vec![items.len(), *heads, q[1], k[1]])
            }
            Op::ProbsReweight {
                keys,
                weights,
                renormalize,
            } => {
                let p = inputs[0];
                want(
                    p.len() == 4
                        && p[3] == *keys
                        && weights.len() == p[0] * keys
                        && renormalize.len() == p[0],
                    format!(
                        "probabilities {p:?} do not fit {} weights over {keys} keys",
                        weights.len()
                    ),
                )?;
                Ok(p.to_vec())
            }
            Op::ProbsReplace { from, to } => {
                let p = inputs[0];
                want(
                    p.len() == 4 && *from < p[0] && *to < p[0],
                    format!("rows {from} → {to} outside probabilities {p:?}"),
                )?;
                Ok(p.to_vec())
            }
            Op::ProbsSet { rows } => {
                let (p, s) = (inputs[0], inputs[1]);
                want(
                    p.len() == 4
                        && s.len() == 4
                        && s[0] == rows.len()
                        && s[1..] == p[1..]
                        && rows.iter().all(|&r| r < p[0]),
                    format!(
                        "maps {s:?} do not fit rows {rows:?} of probabilities {p:?} (need [{}, heads, queries, keys] alike)",
                        rows.len()
                    ),
                )?;
                Ok(p.to_vec())
            }
            Op::ProbsStore { rows, head_mean } => {
                let p = inputs[0];
                want(
                    p.len() == 4 && !rows.is_empty() && rows.iter().all(|&r| r < p[0]),
                    format!("rows {rows:?} outside probabilities {p:?}"),
                )?;
                let mut s = vec![rows.len()];
                if !head_mean {
                    s.push(p[1]);
                }
                s.extend([p[2], p[3]]);
                if rows.len() == 1 {
                    s.remove(0);
                }
                Ok(s)
            }
            Op::AttnMix { heads, items } => {
                let (q, k, v, p) = (inputs[0], inputs[1], inputs[2], inputs[3]);
                attn_qkv(*heads, q, k, v)?;
                want(
                    p == [items.len(), *heads, q[1], k[1]],
                    format!(
                        "probabilities {p:?} are not [{}, {heads}, {}, {}]",
                        items.len(),
                        q[1],
                        k[1]
                    ),
                )?;
                want(
                    items.iter().all(|&i| i < q[0]),
                    format!("items {items:?} outside the batch of {}", q[0]),
                )?;
                Ok(vec![q[0], q[1], v[2]])
            }
            op => unreachable!("{} is not a probabilities op", op.name()),
        }
    }

    fn flops(&self, op: &Op, inputs: &[&[usize]], out: &[usize]) -> u64 {
        match op {
            Op::AttnProbs { heads, .. } => 2 * super::elements(out) * (inputs[0][2] / heads) as u64,
            Op::AttnMix { heads, .. } => {
                2 * super::elements(inputs[3]) * (inputs[2][2] / heads) as u64 + {
                    let b = inputs[0][0] as u64;
                    let rest = b.saturating_sub(inputs[3][0] as u64);
                    4 * rest * (inputs[0][1] * inputs[1][1] * inputs[0][2]) as u64
                }
            }
            _ => super::elements(out),
        }
    }

    fn lower(&self, op: &Op, _w: &mut Weights, dev: &Device, _opts: LowerOptions) -> Kernel {
        Kernel::Probs(match op {
            Op::AttnProbs { heads, items } => ProbsKernel::AttnProbs {
                heads: *heads,
                items: items.clone(),
            },
            Op::ProbsReweight {
                keys,
                weights,
                renormalize,
            } => {
                let rows = renormalize.len();
                let any = renormalize.iter().any(|&r| r);
                ProbsKernel::ProbsReweight {
                    weights: upload(&[rows, 1, 1, *keys], weights.clone(), dev),
                    renorm: any.then(|| {
                        upload(
                            &[rows, 1, 1, 1],
                            renormalize.iter().map(|&r| r as u8 as f32).collect(),
                            dev,
                        )
                    }),
                }
            }
            Op::ProbsReplace { from, to } => ProbsKernel::ProbsReplace {
                from: *from,
                to: *to,
            },
            Op::ProbsSet { rows } => ProbsKernel::ProbsSet { rows: rows.clone() },
            Op::ProbsStore { rows, head_mean } => ProbsKernel::ProbsStore {
                rows: rows.clone(),
                head_mean: *head_mean,
            },
            Op::AttnMix { heads, items } => ProbsKernel::AttnMix {
                heads: *heads,
                items: items.clone(),
            },
            op => unreachable!("{} is not a probabilities op", op.name()),
        })
    }
}

impl ProbsKernel {
    pub fn run(&self, mut args: Args) -> Value {
        match self {
            ProbsKernel::AttnProbs { heads, items } => {
                let (q, k) = (args.take().r3(), args.take().r3());
                let dev = q.device();
                let (q, k) = (pick(q, items, &dev), pick(k, items, &dev));
                let d = q.dims()[2] / heads;
                let (q, k) = (split_heads(q, *heads), split_heads(k, *heads));
                let s = q.matmul(k.swap_dims(2, 3)) * (1.0 / (d as f64).sqrt());
                Value::R4(burn::tensor::activation::softmax(s, 3))
            }
            ProbsKernel::ProbsReweight { weights, renorm } => {
                let p = args.take().r4() * weights.clone();
                Value::R4(match renorm {
                    None => p,
                    Some(m) => {
                        let sum = p.clone().sum_dim(3);
                        let div = sum * m.clone() - m.clone() + 1.0;
                        p / div
                    }
                })
            }
            ProbsKernel::ProbsReplace { from, to } => {
                let p = args.take().r4();
                let n = p.dims()[0];
                let idx: Vec<usize> = (0..n).map(|r| if r == *to { *from } else { r }).collect();
                let dev = p.device();
                Value::R4(pick(p, &idx, &dev))
            }
            ProbsKernel::ProbsSet { rows } => {
                // Rows of [p; stored] picked: row r is stored row k where rows[k] = r.
                let p = args.take().r4();
                let s = args.take().r4();
                let n = p.dims()[0];
                let idx: Vec<usize> = (0..n)
                    .map(|r| rows.iter().position(|&x| x == r).map_or(r, |k| n + k))
                    .collect();
                let dev = p.device();
                Value::R4(pick(Tensor::cat(vec![p, s], 0), &idx, &dev))
            }
            ProbsKernel::ProbsStore { rows, head_mean } => {
                let p = args.take().r4();
                let dev = p.device();
                let p = pick(p, rows, &dev);
                let [r, h, nq, nk] = p.dims();
                match (head_mean, r) {
                    (false, 1) => Value::R3(p.reshape([h, nq, nk])),
                    (false, _) => Value::R4(p),
                    (true, 1) => Value::R2(p.mean_dim(1).reshape([nq, nk])),
                    (true, _) => Value::R3(p.mean_dim(1).reshape([r, nq, nk])),
                }
            }
            ProbsKernel::AttnMix { heads, items } => {
                let (q, k, v, p) = (
                    args.take().r3(),
                    args.take().r3(),
                    args.take().r3(),
                    args.take().r4(),
                );
                let dev = q.device();
                let [b, nq, _] = q.dims();
                let cv = v.dims()[2];
                let vi = split_heads(pick(v.clone(), items, &dev), *heads);
                let mixed = p.matmul(vi).swap_dims(1, 2).reshape([items.len(), nq, cv]);
                let rest: Vec<usize> = (0..b).filter(|i| !items.contains(i)).collect();
                if rest.is_empty() {
                    Value::R3(pick(mixed, &inverse(items), &dev))
                } else {
                    let o = attend_nan_safe(
                        pick(q, &rest, &dev),
                        pick(k, &rest, &dev),
                        pick(v, &rest, &dev),
                        *heads,
                        AttentionImpl::Fused,
                    );
                    let order: Vec<usize> = items.iter().chain(&rest).copied().collect();
                    Value::R3(pick(Tensor::cat(vec![mixed, o], 0), &inverse(&order), &dev))
                }
            }
        }
    }
}

/// For a permutation `order` (position → item), the positions of items 0..n in it.
fn inverse(order: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; order.len()];
    for (pos, &item) in order.iter().enumerate() {
        inv[item] = pos;
    }
    inv
}

//! Probability rewrites on one attention layer (Reweight, Store, ReplaceMaps): the patch that
//! materialises the probabilities of the batch items they touch and rewrites them in order
//! (`AttnProbs`, `ProbsReweight`, `ProbsReplace`, `ProbsStore`, `AttnMix`).
//!
//! Try it: `rewire explain rewrites/replace_maps.ron --model models/tiny-sd --no-fuse`.

use super::*;
use crate::recipe::MapSource;

/// The apply pass for one layer: the attention node becomes probabilities for the items the
/// rewrites touch, the rewrites' nodes in order, and a mixed attention output.
pub(super) fn apply_layer(
    g: &Graph,
    node: NodeIndex,
    path: &str,
    info: &AttnInfo,
    active: &[&Landing],
    src: &Source,
    weights: &[Option<Vec<f32>>],
) -> Patch {
    let ins = g.inputs_of(node);
    let (q, k, v) = (Src::Old(ins[0]), Src::Old(ins[1]), Src::Old(ins[2]));
    let mut items: BTreeSet<usize> = BTreeSet::new();
    for l in active {
        items.extend(&l.items);
    }
    let items: Vec<usize> = items.into_iter().collect();
    let row = |item: usize| {
        items
            .iter()
            .position(|&i| i == item)
            .expect("item in union")
    };
    let names: Vec<String> = active
        .iter()
        .map(|l| {
            format!(
                "{} (rewrite {})",
                src.recipe.rewrites[l.rewrite].op.name(),
                l.rewrite
            )
        })
        .collect();
    let mut patch = Patch::new(format!("apply {} on {path}", names.join(", ")));
    let heads = info.heads;
    let mut p = patch.add(
        path,
        Op::AttnProbs {
            heads,
            items: items.clone(),
        },
        &[q, k],
    );
    let keys = info.keys;
    for l in active {
        match &src.recipe.rewrites[l.rewrite].op {
            RewriteOp::Reweight { renormalize, .. } => {
                let w = weights[l.rewrite].as_ref().expect("weights resolved");
                let mut all = vec![1.0f32; items.len() * keys];
                let mut renorm = vec![false; items.len()];
                for &it in &l.items {
                    let r = row(it);
                    all[r * keys..(r + 1) * keys].copy_from_slice(&w[..keys]);
                    renorm[r] = *renormalize;
                }
                // A reweight after one that renormalises nothing multiplies into it
                // (P·w₁·w₂ = P·(w₁w₂)): thousands of reweights stay one node per layer, which
                // keeps `check` linear in the number of rewrites.
                if let Src::New(last) = p
                    && let Some((
                        _,
                        Op::ProbsReweight {
                            weights: pw,
                            renormalize: pr,
                            ..
                        },
                        _,
                    )) = patch.nodes.get_mut(last)
                    && pr.iter().all(|r| !r)
                {
                    pw.iter_mut().zip(&all).for_each(|(a, b)| *a *= b);
                    *pr = renorm;
                } else {
                    p = patch.add(
                        path,
                        Op::ProbsReweight {
                            keys,
                            weights: all,
                            renormalize: renorm,
                        },
                        &[p],
                    );
                }
            }
            RewriteOp::ReplaceMaps {
                from: MapSource::BatchItem(from),
                to,
                ..
            } => {
                let to = to.expect("validated: BatchItem sources name `to`");
                p = patch.add(
                    path,
                    Op::ProbsReplace {
                        from: row(*from),
                        to: row(to.0),
                    },
                    &[p],
                );
            }
            RewriteOp::ReplaceMaps {
                from: MapSource::Stored(name),
                ..
            } => {
                // The stored maps of this layer arrive as an input, one row per item replaced.
                let rows: Vec<usize> = l.items.iter().map(|&i| row(i)).collect();
                let stored = patch.add(
                    "",
                    Op::Input {
                        name: Key::Stored { name, layer: path }.to_string(),
                        shape: vec![rows.len(), heads, info.queries, keys],
                    },
                    &[],
                );
                p = patch.add(path, Op::ProbsSet { rows }, &[p, stored]);
            }
            RewriteOp::Store { what, name, .. } => {
                let rows: Vec<usize> = l.items.iter().map(|&i| row(i)).collect();
                let s = patch.add(
                    path,
                    Op::ProbsStore {
                        rows,
                        head_mean: *what == crate::recipe::StoreWhat::HeadMean,
                    },
                    &[p],
                );
                patch.add(
                    "",
                    Op::Output {
                        name: Key::store(name, path).to_string(),
                    },
                    &[s],
                );
            }
            _ => unreachable!("K/V rewrites are applied before the probability chain"),
        }
    }
    let mix = patch.add(path, Op::AttnMix { heads, items }, &[q, k, v, p]);
    patch.reroute.push((node, mix));
    patch.remove.push(node);
    patch
}

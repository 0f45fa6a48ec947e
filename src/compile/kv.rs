//! K/V rewrites on one attention layer: ReplaceKv (other frames, a reference pass), MergeKv
//! (ToMe on K/V) and MergeTokens (tomesd around a transformer block), each a patch with a note
//! for `explain`.
//!
//! Try it: `rewire diff rewrites/merge_kv_r05.ron --model models/tiny-sd`.

use super::*;

/// A K/V rewrite on one layer: frames gathered after the projections (each item's own K/V are
/// projected once), a reference's K/V input before them, merged tokens before them (merging
/// first saves projection work: a mean merge commutes with a linear map).
pub(super) fn apply_kv(
    g: &Graph,
    node: NodeIndex,
    path: &str,
    op: &RewriteOp,
    items: &[usize],
    frames: usize,
    rewrite: usize,
) -> (Patch, String, Option<Record>) {
    let ins = g.inputs_of(node);
    let (to_q, to_k, to_v) = (ins[0], ins[1], ins[2]);
    let b = g.spec.batch;
    let mut patch = Patch::new(format!("apply {} (rewrite {rewrite}) on {path}", op.name()));
    match op {
        RewriteOp::ReplaceKv {
            source: crate::recipe::KvSource::Frames(list),
            mode,
            ..
        } => {
            let mut index: Vec<Vec<usize>> = list
                .iter()
                .map(|s| {
                    (0..b)
                        .map(|item| {
                            if items.contains(&item) {
                                let (grp, i) = (item / frames, item % frames);
                                grp * frames + s.frame(i, frames)
                            } else {
                                item // an item outside the branch attends to copies of itself: unchanged
                            }
                        })
                        .collect()
                })
                .collect();
            if *mode == crate::recipe::KvMode::ConcatWithSelf {
                index.push((0..b).collect());
            }
            let n = index.len();
            let gk = patch.add(
                path,
                Op::KvGather {
                    index: index.clone(),
                },
                &[Src::Old(to_k)],
            );
            let gv = patch.add(path, Op::KvGather { index }, &[Src::Old(to_v)]);
            patch.rewire.push((node, 1, gk));
            patch.rewire.push((node, 2, gv));
            (
                patch,
                format!(
                    "ReplaceKv (rewrite {rewrite}): K and V gathered from {n} frame source{} after to_k/to_v ({frames} frames per group)",
                    if n == 1 { "" } else { "s" }
                ),
                None,
            )
        }
        RewriteOp::ReplaceKv {
            source: crate::recipe::KvSource::Stored(name),
            mode,
            ..
        } => {
            let kv = g.inputs_of(to_k)[0];
            let input = Key::Reference {
                pass: name,
                layer: path,
            }
            .to_string();
            let r = patch.add(
                "",
                Op::Input {
                    name: input.clone(),
                    shape: g.node(kv).shape.clone(),
                },
                &[],
            );
            let (src, how) = match mode {
                crate::recipe::KvMode::Replace => (r, "replaced by"),
                crate::recipe::KvMode::ConcatWithSelf => (
                    patch.add(path, Op::Concat { axis: 1 }, &[r, Src::Old(kv)]),
                    "concatenated after",
                ),
            };
            patch.rewire.push((to_k, 0, src));
            patch.rewire.push((to_v, 0, src));
            let note = format!(
                "ReplaceKv (rewrite {rewrite}): K/V input {how} reference \"{name}\"'s, before to_k/to_v"
            );
            (
                patch,
                note,
                Some(Record {
                    name: name.clone(),
                    layer: path.to_string(),
                    input,
                }),
            )
        }
        RewriteOp::MergeKv {
            ratio,
            sx,
            sy,
            random,
        } => {
            let x = g.inputs_of(to_q)[0];
            let kv = g.inputs_of(to_k)[0];
            let Op::Attention(info) = &g.node(node).op else {
                unreachable!("attention node")
            };
            let n = info.queries;
            let r = (n as f64 * ratio) as usize;
            let plan = patch.add(
                path,
                Op::TomeMatch {
                    grid: info.grid,
                    sx: *sx,
                    sy: *sy,
                    r,
                    seed: *random,
                },
                &[Src::Old(x)],
            );
            let m = patch.add(path, Op::TomeMerge, &[Src::Old(kv), plan]);
            patch.rewire.push((to_k, 0, m));
            patch.rewire.push((to_v, 0, m));
            (
                patch,
                format!(
                    "MergeKv (rewrite {rewrite}): {r} of {n} K/V tokens merged before to_k/to_v; Q keeps all {n}"
                ),
                None,
            )
        }
        _ => unreachable!("not a layer K/V op"),
    }
}

pub(super) fn find(g: &Graph, path: &str, pred: impl Fn(&Op) -> bool) -> Option<NodeIndex> {
    g.find(path, pred)
}

/// tomesd on one transformer block: one merge plan from the block input, merge/unmerge around
/// attn1, attn2 and the feed-forward as asked.
pub(super) fn merge_tokens(
    g: &Graph,
    block: &str,
    op: &RewriteOp,
    rewrite: usize,
) -> (Patch, String) {
    let RewriteOp::MergeTokens {
        ratio,
        sx,
        sy,
        attn,
        cross,
        mlp,
        ..
    } = op
    else {
        unreachable!("MergeTokens")
    };
    let ln = |name: &str| {
        find(g, &format!("{block}.{name}"), |o| {
            matches!(o, Op::LayerNorm { .. })
        })
        .expect("block norm")
    };
    let norm1 = ln("norm1");
    let t_in = g.inputs_of(norm1)[0];
    let att1 = find(g, &format!("{block}.attn1"), |o| {
        matches!(o, Op::Attention(_))
    })
    .expect("attn1");
    let Op::Attention(info) = &g.node(att1).op else {
        unreachable!()
    };
    let n = info.queries;
    let r = (n as f64 * ratio) as usize;
    let mut patch = Patch::new(format!("apply MergeTokens (rewrite {rewrite}) on {block}"));
    let plan = patch.add(
        block,
        Op::TomeMatch {
            grid: info.grid,
            sx: *sx,
            sy: *sy,
            r,
            seed: None,
        },
        &[Src::Old(t_in)],
    );
    let mut wrapped = Vec::new();
    let lin = |name: &str| {
        find(g, &format!("{block}.{name}"), |o| {
            matches!(o, Op::Linear { .. })
        })
        .expect("projection")
    };
    for (on, norm, out, layer) in [
        (*attn, "norm1", "attn1.to_out.0", "attn1"),
        (*cross, "norm2", "attn2.to_out.0", "attn2"),
    ] {
        if !on {
            continue;
        }
        let nn = ln(norm);
        let lp = format!("{block}.{layer}");
        let m = patch.add(&lp, Op::TomeMerge, &[Src::Old(nn), plan]);
        patch.reroute.push((nn, m));
        let o = lin(out);
        let u = patch.add(&lp, Op::TomeUnmerge, &[Src::Old(o), plan]);
        patch.reroute.push((o, u));
        wrapped.push(layer);
    }
    if *mlp {
        let n3 = ln("norm3");
        let ff = find(g, &format!("{block}.ff"), |o| {
            matches!(o, Op::FeedForward { .. })
        })
        .expect("ff");
        let fp = format!("{block}.ff");
        let m = patch.add(&fp, Op::TomeMerge, &[Src::Old(n3), plan]);
        patch.reroute.push((n3, m));
        let u = patch.add(&fp, Op::TomeUnmerge, &[Src::Old(ff), plan]);
        patch.reroute.push((ff, u));
        wrapped.push("ff");
    }
    (
        patch,
        format!(
            "MergeTokens (rewrite {rewrite}): {r} of {n} tokens merged around {} of {block}",
            wrapped.join(", ")
        ),
    )
}

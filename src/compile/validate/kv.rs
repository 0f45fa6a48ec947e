//! Validating the K/V rewrites (ReplaceKv, MergeKv, MergeTokens) and the Cache: each field
//! that cannot work on the selected layers or this UNet is a located error.
//!
//! Try it: `cargo test --release --test kv`.

use super::Check;
use crate::compile::{CompileError, cache};
use crate::graph::{AttnKind, Graph};
use crate::recipe::spans::Seg;
use crate::recipe::{RewriteOp, Source, at};

/// ReplaceKv: self-attention only; frame sources against the frame count, stored ones against the passes.
pub(super) fn replace_kv(c: &Check, op: &RewriteOp, chosen: &[usize]) -> Result<(), CompileError> {
    let Check {
        src,
        layers,
        opts,
        i,
        spec,
        text_len,
        branch,
        ref kind_path,
        ..
    } = *c;
    let RewriteOp::ReplaceKv { source, frames, .. } = op else {
        unreachable!("dispatched on the op")
    };
    if let Some(&j) = chosen
        .iter()
        .find(|&&j| layers[j].2.kind == AttnKind::Cross)
    {
        return Err(src
                    .error(kind_path, "cross-attention", format!("ReplaceKv replaces self-attention K/V, but the selection includes cross-attention layer {} (its K/V are the prompt's {} tokens)", layers[j].1, text_len), "add kind: Some(Self) to the select")
                    .into());
    }
    let sp = at(i, &[Seg::Field("op"), Seg::Field("source")]);
    match source {
        crate::recipe::KvSource::Frames(list) => {
            if list.is_empty() {
                return Err(src
                    .error(
                        &sp,
                        "frames",
                        "Frames([]) names no frame",
                        "e.g. Frames([First]) or Frames([First, Prev])",
                    )
                    .into());
            }
            let n = match (frames, opts.frames) {
                (Some(a), Some(b)) if *a != b => {
                    return Err(src
                        .error(
                            &at(i, &[Seg::Field("op"), Seg::Field("frames")]),
                            "frames",
                            format!("the recipe says {a} frames, the run {b}"),
                            "drop one of them",
                        )
                        .into());
                }
                (Some(a), _) => *a,
                (None, Some(b)) => b,
                (None, None) => {
                    return Err(src
                        .error(
                            &sp,
                            "frames",
                            "Frames sources need the number of frames per group",
                            "run with --frames N (the batch is [uncond f0..fN-1, cond f0..fN-1])",
                        )
                        .into());
                }
            };
            if n == 0 || !spec.batch.is_multiple_of(n) {
                return Err(src
                            .error(&sp, "frames", format!("a batch of {} does not divide into groups of {n} frames", spec.batch), "the batch must be [uncond f0..fN-1, cond f0..fN-1]: a multiple of the frame count")
                            .into());
            }
        }
        crate::recipe::KvSource::Stored(name) => {
            if let Some(refs) = &opts.references
                && !refs.contains(name)
            {
                let hint = if refs.is_empty() {
                    "give the reference inputs (--reference FILE, or `reference_sample` in the inputs file): that pass is named \"reference\"".to_string()
                } else {
                    format!("the passes of this run are: {}", refs.join(", "))
                };
                return Err(src
                    .error(
                        &sp,
                        "reference",
                        format!("no pass records reference \"{name}\""),
                        hint,
                    )
                    .into());
            }
            if branch != crate::recipe::Branch::Both {
                return Err(src
                    .error(
                        &at(i, &[Seg::Field("branch")]),
                        "branch",
                        "K/V stored by another pass apply to the whole batch",
                        "set branch: Both",
                    )
                    .into());
            }
        }
    }
    Ok(())
}

/// MergeKv and MergeTokens: self-attention K/V (MergeKv), layers within `max_downsample`, cells, ratio, grid, the whole batch.
pub(super) fn merge(
    c: &Check,
    op: &RewriteOp,
    chosen: &mut Vec<usize>,
) -> Result<(), CompileError> {
    let Check {
        src,
        layers,
        i,
        rw,
        text_len,
        branch,
        ref op_path,
        ref kind_path,
        ..
    } = *c;
    let (RewriteOp::MergeKv { ratio, sx, sy, .. } | RewriteOp::MergeTokens { ratio, sx, sy, .. }) =
        op
    else {
        unreachable!("dispatched on the op")
    };
    let is_kv = matches!(rw.op, RewriteOp::MergeKv { .. });
    if is_kv
        && let Some(&j) = chosen
            .iter()
            .find(|&&j| layers[j].2.kind == AttnKind::Cross)
    {
        return Err(src
                    .error(kind_path, "cross-attention", format!("MergeKv merges self-attention K/V tokens, but the selection includes cross-attention layer {}: its keys are the prompt's {} tokens, not image tokens", layers[j].1, text_len), "add kind: Some(Self) to the select")
                    .into());
    }
    if let RewriteOp::MergeTokens {
        attn,
        cross,
        mlp,
        max_downsample,
        ..
    } = &rw.op
    {
        if !attn && !cross && !mlp {
            return Err(src
                .error(
                    op_path,
                    "merge",
                    "MergeTokens merges nothing (attn, cross and mlp are all false)",
                    "set attn: true (tomesd's default)",
                )
                .into());
        }
        chosen.retain(|&j| layers[j].2.downsample <= *max_downsample);
        if chosen.is_empty() {
            return Err(src
                .error(
                    &at(i, &[Seg::Field("op"), Seg::Field("max_downsample")]),
                    "no-match",
                    format!("no selected layer is downsampled at most {max_downsample} times"),
                    "raise max_downsample",
                )
                .into());
        }
    }
    if *sx == 0 || *sy == 0 {
        return Err(src
            .error(
                op_path,
                "merge",
                "sx and sy must be at least 1",
                "tomesd uses sx: 2, sy: 2",
            )
            .into());
    }
    let cells = *sx as f64 * *sy as f64;
    let rp = at(i, &[Seg::Field("op"), Seg::Field("ratio")]);
    if !(0.0..=1.0 - 1.0 / cells).contains(ratio) {
        return Err(src
                    .error(&rp, "ratio", format!("ratio {ratio} is outside [0, {}] for {sx}×{sy} cells", 1.0 - 1.0 / cells), format!("each {sx}×{sy} cell keeps its destination token, so at most 1 − 1/{cells} of the tokens can merge"))
                    .into());
    }
    if let Some(&j) = chosen
        .iter()
        .find(|&&j| layers[j].2.grid.0 < *sy || layers[j].2.grid.1 < *sx)
    {
        let g = layers[j].2.grid;
        return Err(src
            .error(
                op_path,
                "merge",
                format!(
                    "{sx}×{sy} cells do not fit the {}×{} token grid of {}",
                    g.1, g.0, layers[j].1
                ),
                "use smaller sx/sy, or select layers with larger grids (max_downsample)",
            )
            .into());
    }
    if branch != crate::recipe::Branch::Both {
        return Err(src
            .error(
                &at(i, &[Seg::Field("branch")]),
                "branch",
                format!(
                    "{} changes the token count, so it applies to the whole batch",
                    rw.op.name()
                ),
                "set branch: Both",
            )
            .into());
    }
    Ok(())
}

/// Validates a recipe's `Cache` (rewrite `i`) and resolves it on the base graph.
pub(super) fn check_cache(
    src: &Source,
    base: &Graph,
    i: usize,
    earlier: &Option<cache::CacheSpec>,
    interval: usize,
    branch_id: usize,
    branch: crate::recipe::Branch,
) -> Result<cache::CacheSpec, CompileError> {
    let err = |path: &[Seg], message: String, hint: &str| -> CompileError {
        src.error(path, "cache", message, hint).into()
    };
    if let Some(e) = earlier {
        return Err(err(
            &at(i, &[]),
            format!(
                "rewrite {} already caches the UNet: one Cache per recipe",
                e.rewrite
            ),
            "keep one Cache",
        ));
    }
    if src.written(&at(i, &[Seg::Field("select")])) {
        return Err(err(
            &at(i, &[Seg::Field("select")]),
            "Cache acts on the whole UNet, not on selected attention layers".into(),
            "remove select: the branch decides what cached steps run",
        ));
    }
    if src.written(&at(i, &[Seg::Field("steps")])) {
        return Err(err(
            &at(i, &[Seg::Field("steps")]),
            "Cache runs through the whole run: a full step every `interval` steps".into(),
            "remove steps",
        ));
    }
    if branch != crate::recipe::Branch::Both {
        return Err(err(
            &at(i, &[Seg::Field("branch")]),
            format!(
                "Cache reuses the features of the whole batch (both CFG halves, as DeepCache does), not the {branch:?} half"
            ),
            "remove branch (Cache defaults to Both)",
        ));
    }
    if interval < 2 {
        return Err(err(
            &at(i, &[Seg::Field("op"), Seg::Field("interval")]),
            format!("interval {interval} caches nothing: every step would run in full"),
            "DeepCache uses intervals of 2 to 5 (3 is its default)",
        ));
    }
    cache::resolve(base, i, interval, branch_id).map_err(|e| match e {
        cache::CacheError::NoBranch {
            up_blocks, layers, ..
        } => err(
            &at(i, &[Seg::Field("op"), Seg::Field("branch")]),
            format!(
                "branch {branch_id} (block {}, layer {}) is not a shallow branch of this UNet: it has {up_blocks} up blocks with {layers:?} layers",
                branch_id / 3,
                branch_id % 3
            ),
            "branch = 3·block + layer, block counted from the outside, layer from the up block's last layer; branch 0 reuses the most",
        ),
        other => err(&at(i, &[]), other.to_string(), "report this as a bug"),
    })
}

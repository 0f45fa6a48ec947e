//! Validating one rewrite of a recipe against the model's layers: its selection, steps,
//! branch and op, each problem a located error (`recipe.ron:LINE:COL`, a code, a hint); the
//! result is where the rewrite lands (layers and batch items).
//!
//! Try it: `rewire check rewrites/p2p_word_swap.ron --model models/shapes-sd` (a located error).

use super::{CompileError, CompileOptions, cache, reweight_product};
use crate::graph::{AttnInfo, AttnKind, Graph};
use crate::recipe::spans::Seg;
use crate::recipe::{Rewrite, RewriteOp, Source, Steps, at, select};
use petgraph::stable_graph::NodeIndex;

/// Validates rewrite `i` on its own and finds where it lands: the indices (into `layers`) of
/// the layers it selects and the batch items it touches. Resolves word weights into `weights`,
/// notes unbound words and a Cache.
#[allow(clippy::too_many_arguments)]
pub(super) fn rewrite(
    src: &Source,
    base: &Graph,
    layers: &[(NodeIndex, String, AttnInfo)],
    opts: &CompileOptions,
    i: usize,
    rw: &Rewrite,
    weights: &mut [Option<Vec<f32>>],
    unbound_words: &mut Vec<usize>,
    cache: &mut Option<cache::CacheSpec>,
) -> Result<(Vec<usize>, Vec<usize>), CompileError> {
    let spec = base.spec;
    let text_len = spec.text_len;
    let sel = &rw.select;
    for (field, globs) in [("paths", &sel.paths), ("exclude", &sel.exclude)] {
        for (j, g) in globs.iter().enumerate() {
            let path = at(i, &[Seg::Field("select"), Seg::Field(field), Seg::Index(j)]);
            let glob = select::Glob::new(g).map_err(|e| {
                src.error(
                    &path,
                    "bad-glob",
                    format!("invalid glob \"{g}\": {e}"),
                    "globs use * and ? (e.g. \"up_blocks.*\", \"*.attn2\")",
                )
            })?;
            if !select::plausible(&glob) {
                return Err(src
                    .error(
                        &path,
                        "bad-glob",
                        format!("glob \"{g}\" cannot match any diffusers attention path"),
                        "attention paths look like down_blocks.0.attentions.1.transformer_blocks.0.attn2 \
                         (down_blocks / mid_block / up_blocks, attn1 = self, attn2 = cross); \
                         a glob must match the whole path, e.g. \"up_blocks.*\" or \"*.attn2\"",
                    )
                    .into());
            }
        }
    }
    let view: Vec<select::Layer> = layers
        .iter()
        .map(|(_, p, a)| select::Layer { path: p, info: a })
        .collect();
    let chosen = select::select(sel, &view).map_err(|empty| {
        let all: Vec<&str> = layers.iter().map(|(_, p, _)| p.as_str()).collect();
        let near = match sel.paths.first() {
            Some(g) => select::nearest(g, &all, 3),
            None => all.iter().take(3).copied().collect(),
        };
        src.error(
            &at(i, &[Seg::Field("select")]),
            "no-match",
            format!(
                "selector matches no attention layer of this model (`{}` removed the last {} candidate{})",
                empty.criterion,
                empty.removed,
                if empty.removed == 1 { "" } else { "s" }
            ),
            format!(
                "nearest real paths: {}; `rewire inspect MODEL` lists all {} layers",
                near.join(", "),
                layers.len()
            ),
        )
    })?;

    // steps
    if let Some(steps) = rw.steps {
        let p = at(i, &[Seg::Field("steps")]);
        match steps {
            Steps::Fraction(a, b)
                if !(0.0..=1.0).contains(&a) || !(0.0..=1.0).contains(&b) || a >= b =>
            {
                return Err(src
                    .error(
                        &p,
                        "steps",
                        format!("step fractions ({a}, {b}) are not a range inside [0, 1]"),
                        "write Fraction(start, end) with 0 ≤ start < end ≤ 1",
                    )
                    .into());
            }
            Steps::Indices(a, b) if a >= b => {
                return Err(src
                    .error(
                        &p,
                        "steps",
                        format!("step range Indices({a}, {b}) is empty"),
                        "Indices(start, end) is half-open: Indices(0, 2) is steps 0 and 1",
                    )
                    .into());
            }
            _ => {}
        }
        match opts.steps {
            None => {}
            Some(n) => {
                let (a, b) = steps.range(n);
                if b > n || a >= b {
                    return Err(src
                        .error(
                            &p,
                            "steps",
                            format!("steps {a}..{b} are outside the run of {n} steps"),
                            format!("a {n}-step run has steps 0..{n}; use Indices(start, end) with end ≤ {n}, or Fraction(...)"),
                        )
                        .into());
                }
            }
        }
    }

    // branch
    let branch = rw.branch();
    let branch_items = branch.items(spec.batch);
    if branch_items.is_empty() {
        return Err(src
            .error(
                &at(i, &[Seg::Field("branch")]),
                "branch",
                format!("branch {:?} is empty in a batch of {}", branch, spec.batch),
                "a batch of 1 has no unconditional half; use Cond or Both",
            )
            .into());
    }

    let op_path = at(i, &[Seg::Field("op")]);
    let kind_path = if src.written(&at(i, &[Seg::Field("select"), Seg::Field("kind")])) {
        at(i, &[Seg::Field("select"), Seg::Field("kind")])
    } else {
        op_path.clone()
    };
    let mut items = branch_items.clone();
    let mut chosen = chosen;
    match &rw.op {
        RewriteOp::Reweight { tokens, words, .. } => {
            if let Some(&j) = chosen
                .iter()
                .find(|&&j| layers[j].2.kind == AttnKind::SelfAttn)
            {
                let n = chosen
                    .iter()
                    .filter(|&&j| layers[j].2.kind == AttnKind::SelfAttn)
                    .count();
                return Err(src
                    .error(
                        &kind_path,
                        "self-attention",
                        format!(
                            "Reweight acts on cross-attention (one weight per prompt token) but the selection includes {n} self-attention layer{} (e.g. {})",
                            if n == 1 { "" } else { "s" },
                            layers[j].1
                        ),
                        "add kind: Some(Cross) to the select",
                    )
                    .into());
            }
            if tokens.is_empty() && words.is_empty() {
                return Err(src
                    .error(
                        &op_path,
                        "empty",
                        "Reweight names no token and no word",
                        "write Reweight(tokens: {2: 2.5}) or Reweight(words: {\"cat\": 2.0})",
                    )
                    .into());
            }
            let mut w = vec![1.0f32; text_len];
            for (&t, &x) in tokens {
                let p = at(
                    i,
                    &[
                        Seg::Field("op"),
                        Seg::Field("tokens"),
                        Seg::Key(t.to_string()),
                    ],
                );
                if t >= text_len {
                    return Err(src
                        .error(&p, "token-range", format!("token index {t} is outside the text of {text_len} tokens"), format!("token positions run 0..{text_len}; position 0 is the start token, the prompt's words start at 1"))
                        .into());
                }
                if !(x.is_finite() && (0.0..=crate::limits::MAX_REWEIGHT).contains(&x)) {
                    return Err(src
                        .error(
                            &p,
                            "weight",
                            format!(
                                "weight {x} for token {t} is not a number in [0, {}] (src/limits.rs: MAX_REWEIGHT)",
                                crate::limits::MAX_REWEIGHT
                            ),
                            "attention weights scale probabilities: prompt-to-prompt uses 0 to about 10",
                        )
                        .into());
                }
                w[t] *= x;
                reweight_product(src, &p, w[t])?;
            }
            for (word, &x) in words {
                let p = at(
                    i,
                    &[
                        Seg::Field("op"),
                        Seg::Field("words"),
                        Seg::Key(word.clone()),
                    ],
                );
                if word.trim().is_empty() {
                    return Err(src
                        .error(
                            &p,
                            "word",
                            format!("word {word:?} is empty"),
                            "name a word of the prompt, e.g. Reweight(words: {\"cat\": 2.0})",
                        )
                        .into());
                }
                if !(x.is_finite() && (0.0..=crate::limits::MAX_REWEIGHT).contains(&x)) {
                    return Err(src
                        .error(
                            &p,
                            "weight",
                            format!(
                                "weight {x} for \"{word}\" is not a number in [0, {}] (src/limits.rs: MAX_REWEIGHT)",
                                crate::limits::MAX_REWEIGHT
                            ),
                            "attention weights scale probabilities: prompt-to-prompt uses 0 to about 10",
                        )
                        .into());
                }
                match &opts.words {
                    Some(map) => match map.get(word) {
                        Some(pos) if !pos.is_empty() => {
                            for &t in pos {
                                if t < text_len {
                                    w[t] *= x;
                                    reweight_product(src, &p, w[t])?;
                                }
                            }
                        }
                        _ => {
                            return Err(src
                                .error(
                                    &p,
                                    "word",
                                    format!("word \"{word}\" is not in the prompt"),
                                    format!("the prompt's words are: {}", {
                                        let mut k: Vec<&String> = map.keys().collect();
                                        k.sort();
                                        k.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                                    }),
                                )
                                .into());
                        }
                    },
                    None if opts.require_bound_words => {
                        return Err(src
                            .error(&p, "unbound-words", format!("Reweight by word (\"{word}\") needs a prompt to find the word's tokens"), "give a prompt (rewire run --prompt ..., or rewire compile --prompt ...) or use tokens: {POSITION: WEIGHT}")
                            .into());
                    }
                    None => {
                        // Rewrites are visited in order: checking the last suffices.
                        if unbound_words.last() != Some(&i) {
                            unbound_words.push(i);
                        }
                    }
                }
            }
            weights[i] = Some(w);
        }
        RewriteOp::Store {
            max_queries,
            on,
            reduce,
            name,
            ..
        } => {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                return Err(src
                    .error(
                        &at(i, &[Seg::Field("op"), Seg::Field("name")]),
                        "store",
                        format!("store name \"{name}\" is not a plain name"),
                        "name a store with letters, digits, _ and - (at most 64), e.g. \"inv\"",
                    )
                    .into());
            }
            if *on == crate::recipe::StoreOn::Disk && *reduce != crate::recipe::Reduce::Each {
                return Err(src
                    .error(
                        &at(i, &[Seg::Field("op"), Seg::Field("on")]),
                        "store",
                        format!("on: Disk spills every step's maps of a `reduce: Each` store; this store reduces the steps to one tensor ({reduce:?})"),
                        "write reduce: Each with on: Disk, or drop on: Disk",
                    )
                    .into());
            }
            if let Some(m) = max_queries {
                chosen.retain(|&j| layers[j].2.queries <= *m);
                if chosen.is_empty() {
                    return Err(src
                        .error(
                            &at(i, &[Seg::Field("op"), Seg::Field("max_queries")]),
                            "no-match",
                            format!("Store's max_queries: {m} leaves none of the selected layers"),
                            "raise max_queries or select layers with fewer queries",
                        )
                        .into());
                }
            }
        }
        RewriteOp::ReplaceMaps {
            from,
            to,
            self_max_queries,
        } => {
            let pair = match (from, to) {
                (crate::recipe::MapSource::BatchItem(f), Some(t)) => Some((*f, t.0)),
                (crate::recipe::MapSource::BatchItem(_), None) => {
                    return Err(src
                        .error(
                            &op_path,
                            "batch-item",
                            "ReplaceMaps from a batch item needs `to`, the item that takes its maps",
                            "e.g. ReplaceMaps(from: BatchItem(2), to: BatchItem(3))",
                        )
                        .into());
                }
                (crate::recipe::MapSource::Stored(_), Some(_)) => {
                    return Err(src
                        .error(
                            &at(i, &[Seg::Field("op"), Seg::Field("to")]),
                            "batch-item",
                            "ReplaceMaps from Stored(...) replaces the maps of the rewrite's branch: `to` does not apply",
                            "drop `to`; set branch: (Cond, Uncond or Both) to choose the items (item k of the branch takes stored row k)",
                        )
                        .into());
                }
                (crate::recipe::MapSource::Stored(_), None) => None,
            };
            for (name, item) in pair.iter().flat_map(|&(f, t)| [("from", f), ("to", t)]) {
                if item >= spec.batch {
                    return Err(src
                        .error(
                            &at(i, &[Seg::Field("op"), Seg::Field(name)]),
                            "batch-item",
                            format!(
                                "BatchItem({}) is outside the batch of {}",
                                item, spec.batch
                            ),
                            {
                                // With guidance the batch is [uncond × P, cond × P].
                                let need = (item + 1).next_multiple_of(2);
                                format!(
                                    "batch items run 0..{} in diffusers order [uncond..., cond...]; BatchItem({}) needs a batch of at least {need}: give {} prompts (--prompt, repeated) or --batch {need}",
                                    spec.batch,
                                    item,
                                    need / 2
                                )
                            },
                        )
                        .into());
                }
                if !branch_items.contains(&item) {
                    return Err(src
                        .error(
                            &at(i, &[Seg::Field("op"), Seg::Field(name)]),
                            "batch-item",
                            format!(
                                "BatchItem({}) is not in the {:?} branch (items {:?})",
                                item, branch, branch_items
                            ),
                            "set branch: Both to reach any item, or pick an item of the branch",
                        )
                        .into());
                }
            }
            if pair.is_some_and(|(f, t)| f == t) {
                return Err(src
                    .error(
                        &op_path,
                        "batch-item",
                        "ReplaceMaps from and to are the same item",
                        "replace one prompt's maps with another's",
                    )
                    .into());
            }
            let selfs: Vec<usize> = chosen
                .iter()
                .copied()
                .filter(|&j| layers[j].2.kind == AttnKind::SelfAttn)
                .collect();
            match self_max_queries {
                None if !selfs.is_empty() => {
                    return Err(src
                        .error(
                            &kind_path,
                            "self-attention",
                            format!("ReplaceMaps would replace self-attention maps on {} layer{} (e.g. {}) but self_max_queries is not set", selfs.len(), if selfs.len() == 1 { "" } else { "s" }, layers[selfs[0]].1),
                            "add kind: Some(Cross), or set self_max_queries: Some(N) to replace self-attention maps on layers with at most N queries (prompt-to-prompt: 16×16 = 256 on SD's 64×64 latents)",
                        )
                        .into());
                }
                Some(m) => chosen
                    .retain(|&j| layers[j].2.kind == AttnKind::Cross || layers[j].2.queries <= *m),
                None => {}
            }
            if chosen.is_empty() {
                return Err(src
                    .error(
                        &op_path,
                        "no-match",
                        "ReplaceMaps' self_max_queries leaves none of the selected layers",
                        "raise self_max_queries",
                    )
                    .into());
            }
            items = match pair {
                Some((f, t)) => vec![f, t],
                None => branch_items.clone(),
            };
        }
        RewriteOp::ReplaceKv { source, frames, .. } => {
            if let Some(&j) = chosen
                .iter()
                .find(|&&j| layers[j].2.kind == AttnKind::Cross)
            {
                return Err(src
                    .error(&kind_path, "cross-attention", format!("ReplaceKv replaces self-attention K/V, but the selection includes cross-attention layer {} (its K/V are the prompt's {} tokens)", layers[j].1, text_len), "add kind: Some(Self) to the select")
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
                            return Err(src.error(&sp, "frames", "Frames sources need the number of frames per group", "run with --frames N (the batch is [uncond f0..fN-1, cond f0..fN-1])").into());
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
        }
        RewriteOp::Cache {
            interval,
            branch: cb,
        } => {
            *cache = Some(check_cache(src, base, i, cache, *interval, *cb, branch)?);
            chosen.clear();
        }
        RewriteOp::MergeKv { ratio, sx, sy, .. } | RewriteOp::MergeTokens { ratio, sx, sy, .. } => {
            let is_kv = matches!(rw.op, RewriteOp::MergeKv { .. });
            if is_kv
                && let Some(&j) = chosen
                    .iter()
                    .find(|&&j| layers[j].2.kind == AttnKind::Cross)
            {
                return Err(src
                    .error(&kind_path, "cross-attention", format!("MergeKv merges self-attention K/V tokens, but the selection includes cross-attention layer {}: its keys are the prompt's {} tokens, not image tokens", layers[j].1, text_len), "add kind: Some(Self) to the select")
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
                            &op_path,
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
                            format!(
                                "no selected layer is downsampled at most {max_downsample} times"
                            ),
                            "raise max_downsample",
                        )
                        .into());
                }
            }
            if *sx == 0 || *sy == 0 {
                return Err(src
                    .error(
                        &op_path,
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
                        &op_path,
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
        }
    }
    Ok((chosen, items))
}

/// Validates a recipe's `Cache` (rewrite `i`) and resolves it on the base graph.
fn check_cache(
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

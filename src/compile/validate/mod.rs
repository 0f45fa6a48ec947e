//! Validating one rewrite of a recipe against the model's layers: its selection, steps,
//! branch and op, each problem a located error (`recipe.ron:LINE:COL`, a code, a hint); the
//! result is where the rewrite lands (layers and batch items).
//!
//! Try it: `rewire check rewrites/p2p_word_swap.ron --model models/shapes-sd` (a located error).

use super::{CompileError, CompileOptions, cache};
use crate::graph::{AttnInfo, Graph, InputSpec};
use crate::recipe::spans::Seg;
use crate::recipe::{Branch, Rewrite, RewriteOp, Source, Steps, at, select};
use petgraph::stable_graph::NodeIndex;

mod kv;
mod probs;

/// What every op family's check reads: the rewrite, where it sits in the recipe, the model's
/// layers and the spec, the branch's items, and the recipe paths errors point at.
pub(super) struct Check<'a> {
    src: &'a Source,
    layers: &'a [(NodeIndex, String, AttnInfo)],
    opts: &'a CompileOptions,
    i: usize,
    rw: &'a Rewrite,
    spec: InputSpec,
    text_len: usize,
    branch: Branch,
    branch_items: Vec<usize>,
    /// `rewrites[i].op`.
    op_path: Vec<Seg>,
    /// `rewrites[i].select.kind` when written, else the op.
    kind_path: Vec<Seg>,
}

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
    let c = Check {
        src,
        layers,
        opts,
        i,
        rw,
        spec,
        text_len,
        branch,
        branch_items,
        op_path,
        kind_path,
    };
    match &rw.op {
        RewriteOp::Reweight { .. } => probs::reweight(&c, &rw.op, &chosen, weights, unbound_words)?,
        RewriteOp::Store { .. } => probs::store(&c, &rw.op, &mut chosen)?,
        RewriteOp::ReplaceMaps { .. } => probs::replace_maps(&c, &rw.op, &mut chosen, &mut items)?,
        RewriteOp::ReplaceKv { .. } => kv::replace_kv(&c, &rw.op, &chosen)?,
        RewriteOp::Cache {
            interval,
            branch: cb,
        } => {
            *cache = Some(kv::check_cache(
                src, base, i, cache, *interval, *cb, branch,
            )?);
            chosen.clear();
        }
        RewriteOp::MergeKv { .. } | RewriteOp::MergeTokens { .. } => {
            kv::merge(&c, &rw.op, &mut chosen)?
        }
    }
    Ok((chosen, items))
}

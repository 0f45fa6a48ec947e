//! The compiler's passes and their driver, tract-style: each rewrite family is a pass
//! `fn(&Graph, &Ctx) -> Result<Option<Patch>, CompileError>` that reads the graph and returns
//! the patch it wants; the driver lists them ([`PASSES`]), runs them in order, applies each
//! patch and checks the whole graph after it (an error names the patch), and can stop after a
//! named pass ([`CompileOptions::stop_after`](super::CompileOptions)).
//!
//! Passes act on a *site*: the K/V pass once per K/V rewrite on a layer, the probability pass
//! once per layer, fusion once per layer left pending, Cache once per segment. Layer passes run
//! layer by layer (a layer's K/V rewrites, then its probabilities), then the graph passes; what
//! a pass reports besides its patch (a K/V note, a reference record, a fusion, a cached graph)
//! goes to the context's [`Out`].
//!
//! Try it: `rewire explain rewrites/reweight_renorm.ron --model models/tiny-sd`.

use super::{
    CompileError, CompileOptions, Landing, LayerReport, Record, Segment, cache, fuse, kv,
    layer_facts, probs,
};
use crate::graph::keys::Key;
use crate::graph::patch::Patch;
use crate::graph::{AttnInfo, Graph, Op};
use crate::recipe::{RewriteOp, Source, at};
use petgraph::stable_graph::NodeIndex;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

/// The passes, in the order the driver runs them (and `stop_after` compares them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PassName {
    /// ReplaceKv, MergeKv, MergeTokens: one patch per K/V rewrite on a layer.
    Kv,
    /// Reweight, Store, ReplaceMaps on materialised probabilities: one patch per layer.
    Probs,
    /// Folding a layer's reweight chain back into the fused kernel.
    Fusion,
    /// DeepCache: an output on the shallow branch's input (and the cached graph).
    Cache,
}

impl PassName {
    pub fn name(self) -> &'static str {
        match self {
            PassName::Kv => "kv",
            PassName::Probs => "probs",
            PassName::Fusion => "fusion",
            PassName::Cache => "cache",
        }
    }
}

/// Where a pass acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Once per rewrite of its family landed on a layer (layer by layer).
    EachRewrite,
    /// Once per layer with rewrites of its family.
    Layer,
    /// Once per layer whose fusion is pending, after every layer pass.
    Pending,
    /// Once per segment, last.
    Segment,
}

/// What a pass reads: the recipe, options, base graph, landings, segment, and its site.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub(super) src: &'a Source,
    pub(super) opts: &'a CompileOptions,
    pub(super) base: &'a Graph,
    pub(super) landings: &'a BTreeMap<String, Vec<Landing>>,
    pub(super) weights: &'a [Option<Vec<f32>>],
    pub(super) unbound_words: &'a [usize],
    pub(super) cache: Option<&'a cache::CacheSpec>,
    /// The segment's step range (`None`: all steps).
    pub(super) segment: Option<(usize, usize)>,
    /// The layer: its attention node, path and facts on the base graph.
    pub(super) layer: Option<(NodeIndex, &'a str, &'a AttnInfo)>,
    /// The rewrites of the pass's family active at the site, in the order they apply.
    pub(super) rewrites: &'a [&'a Landing],
    /// What passes report besides their patches.
    pub(super) out: &'a RefCell<Out>,
}

/// What passes report besides their patches, collected by the driver.
#[derive(Default)]
pub struct Out {
    /// Notes on the current layer (K/V rewrites).
    pub(super) notes: Vec<String>,
    /// K/V inputs reference passes must record.
    pub(super) records: Vec<Record>,
    /// Blocks whose tokens are merged already (one MergeTokens per block).
    pub(super) merged_blocks: BTreeSet<String>,
    /// The fusion decided for the current layer.
    pub(super) fusion: Option<fuse::Fusion>,
    /// The cached graph of a Cache.
    pub(super) cached: Option<Graph>,
}

/// A pass: its name, where it acts, which rewrites it takes, and its function.
pub struct Pass {
    pub name: PassName,
    pub scope: Scope,
    /// The rewrites of its family (layer scopes).
    pub family: fn(&RewriteOp) -> bool,
    pub run: PassFn,
}

/// A pass's function: reads the graph, returns the patch to apply (or none).
pub type PassFn = for<'a> fn(&Graph, &Ctx<'a>) -> Result<Option<Patch>, CompileError>;

/// The passes, in order.
pub const PASSES: [Pass; 4] = [
    Pass {
        name: PassName::Kv,
        scope: Scope::EachRewrite,
        family: RewriteOp::is_kv,
        run: kv_pass,
    },
    Pass {
        name: PassName::Probs,
        scope: Scope::Layer,
        family: |op| !op.is_kv(),
        run: probs_pass,
    },
    Pass {
        name: PassName::Fusion,
        scope: Scope::Pending,
        family: |_| false,
        run: fusion_pass,
    },
    Pass {
        name: PassName::Cache,
        scope: Scope::Segment,
        family: |_| false,
        run: cache_pass,
    },
];

/// The K/V pass: one K/V rewrite (`ctx.rewrites[0]`) on `ctx.layer`.
fn kv_pass(graph: &Graph, ctx: &Ctx) -> Result<Option<Patch>, CompileError> {
    let (node, path, _) = ctx.layer.expect("a layer pass");
    let l = ctx.rewrites[0];
    let rw = &ctx.src.recipe.rewrites[l.rewrite];
    let mut out = ctx.out.borrow_mut();
    let (patch, note) = match &rw.op {
        RewriteOp::MergeTokens { .. } => {
            let block = path
                .rsplit_once('.')
                .map(|(b, _)| b.to_string())
                .unwrap_or_default();
            if !out.merged_blocks.insert(block.clone()) {
                out.notes.push(format!(
                    "MergeTokens (rewrite {}): merged with its block {block}",
                    l.rewrite
                ));
                return Ok(None);
            }
            kv::merge_tokens(graph, &block, &rw.op, l.rewrite)
        }
        _ => {
            let frames = match &rw.op {
                RewriteOp::ReplaceKv { frames, .. } => frames.or(ctx.opts.frames).unwrap_or(1),
                _ => 1,
            };
            let (patch, note, rec) =
                kv::apply_kv(graph, node, path, &rw.op, &l.items, frames, l.rewrite);
            if let Some(r) = rec
                && !out.records.contains(&r)
            {
                out.records.push(r);
            }
            (patch, note)
        }
    };
    out.notes.push(note);
    Ok(Some(patch))
}

/// The probability pass: every probability rewrite on `ctx.layer`, in order, in one patch.
fn probs_pass(graph: &Graph, ctx: &Ctx) -> Result<Option<Patch>, CompileError> {
    let (node, path, info) = ctx.layer.expect("a layer pass");
    let info = match &graph.node(node).op {
        Op::Attention(a) => a.clone(),
        _ => info.clone(),
    };
    Ok(Some(probs::apply_layer(
        graph,
        node,
        path,
        &info,
        ctx.rewrites,
        ctx.src,
        ctx.weights,
    )))
}

/// The fusion pass on one pending layer: the typed [`fuse::Fusion`] goes to `ctx.out`.
fn fusion_pass(graph: &Graph, ctx: &Ctx) -> Result<Option<Patch>, CompileError> {
    let (_, path, _) = ctx.layer.expect("a layer pass");
    let unbound = ctx
        .rewrites
        .iter()
        .any(|l| ctx.unbound_words.contains(&l.rewrite));
    let (fusion, patch) = fuse::fuse_layer(graph, path, ctx.base, unbound);
    ctx.out.borrow_mut().fusion = Some(fusion);
    Ok(patch)
}

/// The Cache pass: the full graph's output on the features; the cached graph goes to `ctx.out`.
fn cache_pass(graph: &Graph, ctx: &Ctx) -> Result<Option<Patch>, CompileError> {
    let Some(spec) = ctx.cache else {
        return Ok(None);
    };
    let (record, cached) =
        cache::split(graph, spec).map_err(|e| cache_error(ctx, spec.rewrite, e))?;
    ctx.out.borrow_mut().cached = Some(cached);
    Ok(Some(record))
}

/// Whether the driver runs this pass under `opts.stop_after`.
fn runs(opts: &CompileOptions, name: PassName) -> bool {
    opts.stop_after.is_none_or(|s| name <= s)
}

/// Runs one pass at one site: applies its patch, if any, and checks the graph.
fn step(
    pass: &Pass,
    graph: &mut Graph,
    ctx: &Ctx,
    patches: &mut Vec<String>,
) -> Result<bool, CompileError> {
    match (pass.run)(graph, ctx)? {
        Some(patch) => {
            apply_pass(graph, &patch)?;
            patches.push(patch.label.clone());
            Ok(true)
        }
        None => Ok(false),
    }
}

/// The driver for one segment: every pass of [`PASSES`] in order (up to `opts.stop_after`);
/// reference records are added to `records`.
pub(super) fn run_segment(
    base_ctx: &Ctx,
    records: &mut Vec<Record>,
) -> Result<Segment, CompileError> {
    let (src, opts, base) = (base_ctx.src, base_ctx.opts, base_ctx.base);
    let recipe = &src.recipe;
    let mut graph = base.clone();
    let mut reports: Vec<LayerReport> = Vec::new();
    let mut patches = Vec::new();
    let out = RefCell::new(Out {
        records: std::mem::take(records),
        ..Out::default()
    });
    let ctx = Ctx {
        out: &out,
        ..*base_ctx
    };
    let facts = layer_facts(base);
    for (node, path, info) in &facts {
        let Some(ls) = ctx.landings.get(path) else {
            continue;
        };
        let mut active: Vec<&Landing> = ls
            .iter()
            .filter(
                |l| match (ctx.segment, recipe.rewrites[l.rewrite].steps, opts.steps) {
                    (Some((a, b)), Some(s), Some(n)) => {
                        let (x, y) = s.range(n);
                        x <= a && b <= y
                    }
                    _ => true,
                },
            )
            .collect();
        if active.is_empty() {
            continue;
        }
        active.sort_by_key(|l| (recipe.rewrites[l.rewrite].order.unwrap_or(0), l.rewrite));
        let layer = Some((*node, path.as_str(), info));
        let mut items: BTreeSet<usize> = BTreeSet::new();
        for pass in PASSES.iter().filter(|p| runs(opts, p.name)) {
            let family: Vec<&Landing> = active
                .iter()
                .copied()
                .filter(|l| (pass.family)(&recipe.rewrites[l.rewrite].op))
                .collect();
            match pass.scope {
                Scope::EachRewrite => {
                    for l in &family {
                        let one = [*l];
                        let c = Ctx {
                            layer,
                            rewrites: &one,
                            ..ctx
                        };
                        step(pass, &mut graph, &c, &mut patches)?;
                    }
                }
                Scope::Layer if !family.is_empty() => {
                    let c = Ctx {
                        layer,
                        rewrites: &family,
                        ..ctx
                    };
                    if step(pass, &mut graph, &c, &mut patches)? {
                        for l in &family {
                            items.extend(&l.items);
                        }
                    }
                }
                _ => {}
            }
        }
        let has_probs = active
            .iter()
            .any(|l| !recipe.rewrites[l.rewrite].op.is_kv());
        reports.push(LayerReport {
            path: path.clone(),
            rewrites: active.iter().map(|l| l.rewrite).collect(),
            ops: active
                .iter()
                .map(|l| recipe.rewrites[l.rewrite].op.name().to_string())
                .collect(),
            fusion: if !has_probs {
                fuse::Fusion::NotNeeded
            } else if opts.fuse {
                fuse::Fusion::Pending
            } else {
                fuse::Fusion::Off
            },
            materialised: items.into_iter().collect(),
            notes: std::mem::take(&mut out.borrow_mut().notes),
        });
    }
    for pass in PASSES.iter().filter(|p| runs(opts, p.name)) {
        match pass.scope {
            Scope::Pending => {
                for r in reports.iter_mut().filter(|r| r.fusion.pending()) {
                    let (node, info) = base.attention(&r.path).expect("a reported layer");
                    let rewrites: Vec<&Landing> = ctx.landings[&r.path]
                        .iter()
                        .filter(|l| r.rewrites.contains(&l.rewrite))
                        .collect();
                    let c = Ctx {
                        layer: Some((node, r.path.as_str(), info)),
                        rewrites: &rewrites,
                        ..ctx
                    };
                    let applied = step(pass, &mut graph, &c, &mut patches)?;
                    if let Some(f) = out.borrow_mut().fusion.take() {
                        r.fusion = f;
                    }
                    if applied {
                        r.materialised.clear();
                    }
                }
            }
            Scope::Segment => {
                step(pass, &mut graph, &ctx, &mut patches)?;
            }
            _ => {}
        }
    }
    let steps = ctx.segment;
    let out = out.into_inner();
    *records = out.records;
    Ok(Segment {
        steps,
        graph,
        layers: reports,
        patches,
        cached: out.cached,
    })
}

/// Applies one pass's patch and runs the consistency check; errors name the patch.
pub(super) fn apply_pass(graph: &mut Graph, patch: &Patch) -> Result<(), CompileError> {
    let err = |e| CompileError::Pass {
        pass: patch.label.clone(),
        source: Box::new(e),
    };
    graph.apply(patch).map_err(err)?;
    graph.check(None).map_err(err)
}

/// A Cache's split failing on a segment, as a located error.
fn cache_error(ctx: &Ctx, rewrite: usize, e: cache::CacheError) -> CompileError {
    let (src, recipe) = (ctx.src, &ctx.src.recipe);
    match e {
        cache::CacheError::SkippedOutput { output } => {
            let layer = match Key::parse(&output).store_parts() {
                Some((_, layer)) => layer,
                None => output.as_str(),
            };
            let store = ctx.landings.get(layer).and_then(|ls| {
                ls.iter()
                    .find(|l| matches!(recipe.rewrites[l.rewrite].op, RewriteOp::Store { .. }))
            });
            let at_ = at(store.map_or(rewrite, |l| l.rewrite), &[]);
            src.error(
                &at_,
                "cache",
                format!(
                    "{output} needs layers that the Cache (rewrite {rewrite}) skips at cached steps"
                ),
                "store layers of the shallow branch only (those that run at every step: `rewire explain` lists them), or a larger Cache branch (it runs more layers at every step)",
            )
            .into()
        }
        cache::CacheError::Graph(g) => CompileError::Pass {
            pass: "cache".into(),
            source: Box::new(g),
        },
        other => src
            .error(
                &at(rewrite, &[]),
                "cache",
                other.to_string(),
                "report this as a bug",
            )
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::InputSpec;
    use crate::unet::UNet;

    const RECIPE: &str = r#"Recipe(
    name: "kv_and_probs",
    rewrites: [
        Rewrite(
            select: Select(kind: Some(Self), max_downsample: Some(1)),
            branch: Both,
            op: MergeKv(ratio: 0.5, sx: 2, sy: 2),
        ),
        Rewrite(
            select: Select(kind: Some(Cross)),
            op: Reweight(tokens: {2: 2.5, 3: 0.5}, renormalize: true),
        ),
    ],
)"#;

    /// How many nodes of each op name the graph has.
    fn count(g: &Graph, op: &str) -> usize {
        g.nodes().filter(|&n| g.node(n).op.name() == op).count()
    }

    #[test]
    fn stopping_after_a_pass_leaves_later_rewrites_unapplied() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-sd");
        let unet = UNet::open(&dir).unwrap();
        let base = unet.graph(InputSpec::new(2, 16, 16)).unwrap();
        let src = Source::parse(RECIPE, std::path::Path::new("recipe.ron")).unwrap();
        let compile = |stop_after| {
            let opts = CompileOptions {
                fuse: true,
                stop_after,
                ..Default::default()
            };
            super::super::compile_graph(&src, &base, &opts).unwrap()
        };
        let full = compile(None);
        let g = &full.segments[0].graph;
        assert!(count(g, "tome_merge") > 0 && count(g, "augment_q") > 0);
        assert_eq!(count(g, "attn_probs"), 0, "fused away");

        let kv = compile(Some(PassName::Kv));
        let g = &kv.segments[0].graph;
        assert_eq!(
            count(g, "tome_merge"),
            count(&full.segments[0].graph, "tome_merge")
        );
        assert_eq!(count(g, "attn_probs") + count(g, "augment_q"), 0);
        assert!(
            kv.segments[0]
                .layers
                .iter()
                .all(|l| l.materialised.is_empty())
        );

        let probs = compile(Some(PassName::Probs));
        let g = &probs.segments[0].graph;
        assert!(count(g, "attn_probs") > 0);
        assert_eq!(count(g, "augment_q"), 0);
        assert!(probs.segments[0].layers.iter().any(|l| l.fusion.pending()));

        let fused = compile(Some(PassName::Fusion));
        assert_eq!(fused.segments[0].patches, full.segments[0].patches);
        assert!(full.segments[0].layers.iter().all(|l| !l.fusion.pending()));
    }
}

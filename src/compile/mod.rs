//! The recipe compiler, tract-style: validate the recipe against the model's graph for an input
//! spec (every error located in the recipe), apply each rewrite as a patch inserting typed nodes,
//! fuse where the algebra allows, and check the graph after every pass. A recipe with step
//! ranges compiles to one graph per step segment.
//!
//! Fusions:
//! - a non-renormalised Reweight scales V's rows: `P·diag(w)·V = P·(w⊙V)` — the fused kernel stays;
//! - a renormalised Reweight is an additive `log w` bias on the scores, folded into Q and K (one
//!   extra dimension per head) — the fused kernel stays, with no bias or scale argument;
//! - probabilities are materialised only on layers with a Store or ReplaceMaps, and only for the
//!   batch items those need.
//!
//! Try it: `rewire explain rewrites/reweight_renorm.ron --model models/tiny-sd`.

pub mod cache;
pub mod diff;
pub mod fuse;
pub mod hoist;
mod kv;
pub mod plan_file;
mod probs;
pub mod state;
pub mod store;
mod stored;
mod validate;

use crate::graph::keys::Key;
use crate::graph::patch::{Patch, Src};
use crate::graph::{AttnInfo, Graph, GraphError, InputSpec, Op};
use crate::recipe::spans::Seg;
use crate::recipe::{RecipeError, RewriteOp, Source, Steps, at};
use crate::unet::{ModelError, UNet};
use petgraph::stable_graph::NodeIndex;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Errors raised while compiling a recipe.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("after pass `{pass}`: {source}")]
    Pass {
        pass: String,
        #[source]
        source: Box<GraphError>,
    },
}

/// What the compiler needs besides the recipe and the model.
#[derive(Debug, Clone, Default)]
pub struct CompileOptions {
    /// Apply the fusion pass (off = every rewrite runs on materialised probabilities).
    pub fuse: bool,
    /// The number of denoising steps, needed when a rewrite has a step range.
    pub steps: Option<usize>,
    /// Token positions of the words a `Reweight(words: ...)` names, from a bound prompt. `None`:
    /// words are accepted unbound (`rewire check`); `Some`: each word must be found.
    pub words: Option<HashMap<String, Vec<usize>>>,
    /// Reject word reweights when no prompt is bound (a forward that must run them).
    pub require_bound_words: bool,
    /// Frames per group for `ReplaceKv(source: Frames(...))` (`--frames N`).
    pub frames: Option<usize>,
    /// Names of the reference passes a run provides; `None`: not checked (`rewire check`).
    pub references: Option<Vec<String>>,
    /// The pass of a multi-pass job this compile is for (rewrites of other passes are not
    /// applied; they are validated only to find their layers, for the state check); `None`:
    /// the recipe's last pass, or the only one.
    pub pass: Option<String>,
    /// The job's passes in order (`["invert", "edit"]` for `rewire video edit`); empty: the
    /// passes the recipe names, in the order they first appear.
    pub passes: Vec<String>,
}

impl CompileOptions {
    pub fn fused() -> Self {
        CompileOptions {
            fuse: true,
            ..Default::default()
        }
    }
}

/// One rewrite landed on one layer.
#[derive(Debug, Clone)]
struct Landing {
    rewrite: usize,
    items: Vec<usize>,
}

/// What happened on one layer in one segment.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LayerReport {
    pub path: String,
    /// Indices of the rewrites that landed, in the order they apply.
    pub rewrites: Vec<usize>,
    /// The ops, in order (`Reweight`, `Store`, ...).
    pub ops: Vec<String>,
    /// The fusion that fired, or why none could.
    pub fusion: fuse::Fusion,
    /// Batch items whose probabilities are materialised (empty when fused).
    pub materialised: Vec<usize>,
    /// What the K/V rewrites did (where the nodes went, token counts).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// A layer's K/V input that a reference pass must record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// The reference pass's name.
    pub name: String,
    /// The attention layer.
    pub layer: String,
    /// The graph input of the rewritten graph that receives it (`ref.<name>.<layer>`).
    pub input: String,
}

/// The graph of one step segment.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Half-open step range, `None` for a recipe without step ranges (all steps).
    pub steps: Option<(usize, usize)>,
    pub graph: Graph,
    pub layers: Vec<LayerReport>,
    /// The passes' patch labels, in order.
    pub patches: Vec<String>,
    /// With a recipe's `Cache`: the graph of the cached steps (the shallow branch, reading
    /// [`cache::FEATURES`]); `graph` is then the full steps' graph, which also outputs them.
    pub cached: Option<Graph>,
}

/// A compiled recipe: the untouched graph and one rewritten graph per step segment.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub recipe: String,
    pub spec: InputSpec,
    pub steps: Option<usize>,
    pub base: Graph,
    pub segments: Vec<Segment>,
    /// Rewrites that name words still to be bound to a prompt.
    pub unbound_words: Vec<usize>,
    /// K/V inputs the reference passes must record (only the layers a rewrite reads).
    pub records: Vec<Record>,
    /// Store outputs (`probs.<layer>`) and how each combines the steps of a run.
    pub stores: BTreeMap<String, crate::recipe::Reduce>,
    /// The store outputs kept on disk between passes (`Store(on: Disk)`).
    pub spill: BTreeSet<String>,
    /// A recipe's `Cache` (DeepCache), resolved on the graph.
    pub cache: Option<cache::CacheSpec>,
}

impl Compiled {
    /// The graph a reference pass runs: the untouched UNet with an output on the K/V input of
    /// every layer a `Reference` rewrite reads (named like the rewritten graph's inputs).
    pub fn recorder(&self, name: &str) -> Result<Graph, GraphError> {
        let mut g = self.base.clone();
        let mut patch = Patch::new(format!("record reference \"{name}\""));
        for r in self.records.iter().filter(|r| r.name == name) {
            let node = g
                .attention_layers()
                .into_iter()
                .find(|(_, p, _)| *p == r.layer)
                .map(|(n, _, _)| n)
                .ok_or_else(|| GraphError::Shape {
                    path: r.layer.clone(),
                    op: "record".into(),
                    message: "the plan records a layer this model does not have".into(),
                })?;
            let to_k = g.inputs_of(node)[1];
            let kv = g.inputs_of(to_k)[0];
            patch.add(
                "",
                Op::Output {
                    name: r.input.clone(),
                },
                &[Src::Old(kv)],
            );
        }
        // The reference pass needs only the recorded inputs: drop the UNet's own output, and
        // the executor computes nothing past the last recorded layer.
        for (_, out) in g.outputs() {
            patch.remove.push(out);
        }
        g.apply(&patch)?;
        g.check(None)?;
        Ok(g)
    }

    /// The segment for step `i` of the run.
    pub fn segment_for(&self, i: usize) -> Option<&Segment> {
        self.segments.iter().find(|s| match s.steps {
            None => true,
            Some((a, b)) => a <= i && i < b,
        })
    }
}

fn layer_facts(g: &Graph) -> Vec<(NodeIndex, String, AttnInfo)> {
    g.attention_layers()
        .into_iter()
        .map(|(n, p, a)| (n, p.to_string(), a.clone()))
        .collect()
}

/// Validates a recipe against a model for an input spec and compiles it.
pub fn compile(
    src: &Source,
    unet: &UNet,
    spec: InputSpec,
    opts: &CompileOptions,
) -> Result<Compiled, CompileError> {
    let base = unet.graph(spec)?;
    compile_graph(src, &base, opts)
}

/// A token's combined weight (the product of every weight naming it in one rewrite) must stay
/// within [`crate::limits::MAX_REWEIGHT`].
fn reweight_product(src: &Source, path: &[Seg], w: f32) -> Result<(), CompileError> {
    if w <= crate::limits::MAX_REWEIGHT {
        return Ok(());
    }
    Err(src
        .error(
            path,
            "weight",
            format!(
                "the weights naming this token multiply to {w}, above {} (src/limits.rs: MAX_REWEIGHT)",
                crate::limits::MAX_REWEIGHT
            ),
            "a token named by both tokens: and words: gets the product of its weights",
        )
        .into())
}

/// As [`compile`], on an already built and checked graph.
pub fn compile_graph(
    src: &Source,
    base: &Graph,
    opts: &CompileOptions,
) -> Result<Compiled, CompileError> {
    let spec = base.spec;
    let layers = layer_facts(base);
    let recipe = &src.recipe;
    let mut unbound_words = Vec::new();
    let mut cache: Option<cache::CacheSpec> = None;

    // ---- validate each rewrite on its own, and find where it lands ----
    let mut landings: BTreeMap<String, Vec<Landing>> = BTreeMap::new();
    let mut weights: Vec<Option<Vec<f32>>> = vec![None; recipe.rewrites.len()];
    let (passes, pass) = stored::passes(src, opts)?;
    let here = |i: usize| recipe.rewrites[i].in_pass(pass.as_deref());
    // Where each rewrite lands (layer indices), for the state check; rewrites of other passes
    // are validated on this pass's shapes only to find their layers.
    let mut lands: Vec<Option<Vec<usize>>> = vec![None; recipe.rewrites.len()];
    for (i, rw) in recipe.rewrites.iter().enumerate() {
        if !here(i) {
            let (mut w, mut u, mut c) = (vec![None; recipe.rewrites.len()], Vec::new(), None);
            lands[i] = validate::rewrite(src, base, &layers, opts, i, rw, &mut w, &mut u, &mut c)
                .ok()
                .map(|(chosen, _)| chosen);
            continue;
        }
        let (chosen, items) = validate::rewrite(
            src,
            base,
            &layers,
            opts,
            i,
            rw,
            &mut weights,
            &mut unbound_words,
            &mut cache,
        )?;
        lands[i] = Some(chosen.clone());
        for j in chosen {
            landings
                .entry(layers[j].1.clone())
                .or_default()
                .push(Landing {
                    rewrite: i,
                    items: items.clone(),
                });
        }
    }

    stored::check_reads(src, &layers, opts, &passes, pass.as_deref(), &lands)?;

    // ---- step segments ----
    let ranged: Vec<usize> = (0..recipe.rewrites.len())
        .filter(|&i| here(i) && recipe.rewrites[i].steps.is_some())
        .collect();
    let segments: Vec<Option<(usize, usize)>> = if ranged.is_empty() {
        vec![None]
    } else {
        let Some(n) = opts.steps else {
            return Err(src
                .error(
                    &at(ranged[0], &[Seg::Field("steps")]),
                    "steps",
                    "this recipe has step ranges, so it needs the length of the run",
                    "give the number of denoising steps (--steps N, and --step I for one forward)",
                )
                .into());
        };
        let mut cuts: BTreeSet<usize> = [0, n].into();
        for &i in &ranged {
            let (a, b) = recipe.rewrites[i].steps.expect("ranged").range(n);
            cuts.insert(a.min(n));
            cuts.insert(b.min(n));
        }
        let cuts: Vec<usize> = cuts.into_iter().collect();
        if let Err(e) =
            crate::limits::at_most(cuts.len() - 1, crate::limits::MAX_SEGMENTS, "MAX_SEGMENTS")
        {
            return Err(src
                .error(
                    &at(ranged[0], &[Seg::Field("steps")]),
                    "steps",
                    format!("the recipe's step ranges cut the run into too many segments: {e}"),
                    "use fewer distinct step ranges (each segment is a graph of its own)",
                )
                .into());
        }
        let mut segs: Vec<(usize, usize, Vec<bool>)> = Vec::new();
        for w in cuts.windows(2) {
            let active: Vec<bool> = recipe
                .rewrites
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    !here(i)
                        || r.steps.is_none_or(|s| {
                            let (a, b) = s.range(n);
                            a <= w[0] && w[1] <= b
                        })
                })
                .collect();
            match segs.last_mut() {
                Some(last) if last.2 == active => last.1 = w[1],
                _ => segs.push((w[0], w[1], active)),
            }
        }
        segs.into_iter().map(|(a, b, _)| Some((a, b))).collect()
    };

    // ---- one MergeTokens per transformer block ----
    let mut blocks: BTreeMap<String, usize> = BTreeMap::new();
    for (path, ls) in &landings {
        let block = path.rsplit_once('.').map(|(b, _)| b).unwrap_or(path);
        for l in ls
            .iter()
            .filter(|l| matches!(recipe.rewrites[l.rewrite].op, RewriteOp::MergeTokens { .. }))
        {
            match blocks.get(block) {
                Some(&other)
                    if other != l.rewrite
                        && overlap_in_time(
                            recipe.rewrites[other].steps,
                            recipe.rewrites[l.rewrite].steps,
                            opts.steps,
                        ) =>
                {
                    return Err(src
                        .error(
                            &at(l.rewrite.max(other), &[]),
                            "conflict",
                            format!("rewrites {} and {} both merge the tokens of block {block}", other.min(l.rewrite), other.max(l.rewrite)),
                            "one MergeTokens per transformer block: keep one, or give them disjoint steps",
                        )
                        .into());
                }
                _ => {
                    blocks.insert(block.to_string(), l.rewrite);
                }
            }
        }
    }

    // ---- order: two rewrites on one layer whose order matters must state it ----
    // Only pairs with at least one rewrite other than a plain (not renormalised) Reweight can
    // clash or depend on order, so the pairs checked are (others × all): linear in the number of
    // rewrites for the common recipe of many reweights.
    let check_pair = |path: &str, a: &Landing, b: &Landing| -> Result<(), CompileError> {
        let (ra, rb) = (&recipe.rewrites[a.rewrite], &recipe.rewrites[b.rewrite]);
        if overlap_in_time(ra.steps, rb.steps, opts.steps) {
            let clash = match (&ra.op, &rb.op) {
                (RewriteOp::Store { .. }, RewriteOp::Store { .. }) => Some(format!(
                    "rewrites {} and {} both Store {path}: one Store per layer (both would write probs.{path})",
                    a.rewrite, b.rewrite
                )),
                (
                    RewriteOp::ReplaceKv {
                        source: crate::recipe::KvSource::Stored(x),
                        ..
                    },
                    RewriteOp::ReplaceKv {
                        source: crate::recipe::KvSource::Stored(y),
                        ..
                    },
                ) if x == y => Some(format!(
                    "rewrites {} and {} both read reference \"{x}\" on {path}",
                    a.rewrite, b.rewrite
                )),
                (RewriteOp::MergeTokens { .. }, RewriteOp::MergeTokens { .. }) => Some(format!(
                    "rewrites {} and {} both merge the tokens of {path}'s block",
                    a.rewrite, b.rewrite
                )),
                _ => None,
            };
            if let Some(message) = clash {
                return Err(src
                    .error(
                        &at(b.rewrite, &[]),
                        "conflict",
                        message,
                        "keep one of them, or give them disjoint steps",
                    )
                    .into());
            }
            let merge_then_ref = |m: &crate::recipe::Rewrite, r: &crate::recipe::Rewrite| {
                m.op.is_kv()
                    && !matches!(m.op, RewriteOp::ReplaceKv { .. })
                    && matches!(
                        r.op,
                        RewriteOp::ReplaceKv {
                            source: crate::recipe::KvSource::Stored(_),
                            ..
                        }
                    )
            };
            if merge_then_ref(ra, rb) || merge_then_ref(rb, ra) {
                return Err(src
                    .error(
                        &at(b.rewrite, &[]),
                        "conflict",
                        format!("rewrites {} and {} merge tokens and read a reference on {path}: the reference pass records the unmerged K/V input", a.rewrite, b.rewrite),
                        "use the reference on other layers than the merge",
                    )
                    .into());
            }
        }
        if !order_matters(&ra.op, &rb.op) || a.items.iter().all(|i| !b.items.contains(i)) {
            return Ok(());
        }
        if !overlap_in_time(ra.steps, rb.steps, opts.steps) {
            return Ok(());
        }
        let (first, second) = if ra.order <= rb.order {
            (ra, rb)
        } else {
            (rb, ra)
        };
        if matches!(first.op, RewriteOp::ReplaceKv { .. })
            && matches!(
                second.op,
                RewriteOp::MergeKv { .. } | RewriteOp::MergeTokens { .. }
            )
            && ra.order.is_some()
            && rb.order.is_some()
        {
            return Err(src
                .error(&at(b.rewrite, &[]), "order", format!("{} must come before ReplaceKv on {path}: merging needs the layer's own token grid", second.op.name()), "give the merge the lower order")
                .into());
        }
        match (ra.order, rb.order) {
            (Some(p), Some(q)) if p != q => {}
            _ => {
                return Err(src
                    .error(
                        &at(b.rewrite, &[]),
                        "order",
                        format!(
                            "rewrites {} ({}) and {} ({}) both act on {path} and their order matters",
                            a.rewrite, ra.op.name(), b.rewrite, rb.op.name()
                        ),
                        "state it: add order: Some(0) to the one that applies first and order: Some(1) to the other",
                    )
                    .into());
            }
        }
        Ok(())
    };
    let plain = |l: &Landing| {
        matches!(
            recipe.rewrites[l.rewrite].op,
            RewriteOp::Reweight {
                renormalize: false,
                ..
            }
        )
    };
    for (path, ls) in &landings {
        let others: Vec<usize> = (0..ls.len()).filter(|&x| !plain(&ls[x])).collect();
        // Pairs (x, y), x < y, in order, skipping those of two plain reweights.
        for x in 0..ls.len() {
            if plain(&ls[x]) {
                let from = others.partition_point(|&o| o <= x);
                for &y in &others[from..] {
                    check_pair(path, &ls[x], &ls[y])?;
                }
            } else {
                for y in x + 1..ls.len() {
                    check_pair(path, &ls[x], &ls[y])?;
                }
            }
        }
    }

    // ---- apply and fuse, per segment ----
    let mut out = Vec::new();
    let mut records: Vec<Record> = Vec::new();
    let mut stores: BTreeMap<String, crate::recipe::Reduce> = BTreeMap::new();
    let mut spill: BTreeSet<String> = BTreeSet::new();
    for (path, ls) in &landings {
        for l in ls {
            if let RewriteOp::Store {
                reduce, name, on, ..
            } = &recipe.rewrites[l.rewrite].op
            {
                stores.insert(Key::store(name, path).to_string(), *reduce);
                if *on == crate::recipe::StoreOn::Disk {
                    spill.insert(Key::store(name, path).to_string());
                }
            }
        }
    }
    for seg in segments {
        let mut graph = base.clone();
        let mut reports = Vec::new();
        let mut patches = Vec::new();
        let mut merged_blocks: BTreeSet<String> = BTreeSet::new();
        for (node, path, info) in layer_facts(base) {
            let Some(ls) = landings.get(&path) else {
                continue;
            };
            let mut active: Vec<&Landing> = ls
                .iter()
                .filter(
                    |l| match (seg, recipe.rewrites[l.rewrite].steps, opts.steps) {
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
            let mut notes = Vec::new();
            for l in active
                .iter()
                .filter(|l| recipe.rewrites[l.rewrite].op.is_kv())
            {
                let rw = &recipe.rewrites[l.rewrite];
                let (patch, note) = match &rw.op {
                    RewriteOp::MergeTokens { .. } => {
                        let block = path
                            .rsplit_once('.')
                            .map(|(b, _)| b.to_string())
                            .unwrap_or_default();
                        if !merged_blocks.insert(block.clone()) {
                            notes.push(format!(
                                "MergeTokens (rewrite {}): merged with its block {block}",
                                l.rewrite
                            ));
                            continue;
                        }
                        kv::merge_tokens(&graph, &block, &rw.op, l.rewrite)
                    }
                    _ => {
                        let frames = match &rw.op {
                            RewriteOp::ReplaceKv { frames, .. } => {
                                frames.or(opts.frames).unwrap_or(1)
                            }
                            _ => 1,
                        };
                        let (patch, note, rec) =
                            kv::apply_kv(&graph, node, &path, &rw.op, &l.items, frames, l.rewrite);
                        if let Some(r) = rec
                            && !records.contains(&r)
                        {
                            records.push(r);
                        }
                        (patch, note)
                    }
                };
                apply_pass(&mut graph, &patch)?;
                patches.push(patch.label.clone());
                notes.push(note);
            }
            let probs: Vec<&Landing> = active
                .iter()
                .copied()
                .filter(|l| !recipe.rewrites[l.rewrite].op.is_kv())
                .collect();
            let mut items: BTreeSet<usize> = BTreeSet::new();
            if !probs.is_empty() {
                let info = match &graph.node(node).op {
                    Op::Attention(a) => a.clone(),
                    _ => info.clone(),
                };
                let patch = probs::apply_layer(&graph, node, &path, &info, &probs, src, &weights);
                apply_pass(&mut graph, &patch)?;
                patches.push(patch.label.clone());
                for l in &probs {
                    items.extend(&l.items);
                }
            }
            reports.push(LayerReport {
                path: path.clone(),
                rewrites: active.iter().map(|l| l.rewrite).collect(),
                ops: active
                    .iter()
                    .map(|l| recipe.rewrites[l.rewrite].op.name().to_string())
                    .collect(),
                fusion: if probs.is_empty() {
                    fuse::Fusion::NotNeeded
                } else if opts.fuse {
                    fuse::Fusion::Pending
                } else {
                    fuse::Fusion::Off
                },
                materialised: items.into_iter().collect(),
                notes,
            });
        }
        if opts.fuse {
            for r in reports.iter_mut().filter(|r| r.fusion.pending()) {
                let unbound = r.rewrites.iter().any(|i| unbound_words.contains(i));
                let (fusion, patch) = fuse::fuse_layer(&graph, &r.path, base, unbound);
                r.fusion = fusion;
                if let Some(patch) = patch {
                    apply_pass(&mut graph, &patch)?;
                    patches.push(patch.label.clone());
                    r.materialised.clear();
                }
            }
        }
        let cached = match &cache {
            None => None,
            Some(spec) => {
                let (record, cached) = cache::split(&graph, spec)
                    .map_err(|e| cache_error(src, &landings, recipe, spec.rewrite, e))?;
                apply_pass(&mut graph, &record)?;
                patches.push(record.label.clone());
                Some(cached)
            }
        };
        out.push(Segment {
            steps: seg,
            graph,
            layers: reports,
            patches,
            cached,
        });
    }
    Ok(Compiled {
        recipe: recipe.name.clone(),
        spec,
        steps: opts.steps,
        base: base.clone(),
        segments: out,
        unbound_words,
        records,
        stores,
        spill,
        cache,
    })
}

/// A Cache's split failing on a segment, as a located error.
fn cache_error(
    src: &Source,
    landings: &BTreeMap<String, Vec<Landing>>,
    recipe: &crate::recipe::Recipe,
    rewrite: usize,
    e: cache::CacheError,
) -> CompileError {
    match e {
        cache::CacheError::SkippedOutput { output } => {
            let layer = match Key::parse(&output).store_parts() {
                Some((_, layer)) => layer,
                None => output.as_str(),
            };
            let store = landings.get(layer).and_then(|ls| {
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

/// Applies one pass's patch and runs the consistency check; errors name the pass.
fn apply_pass(graph: &mut Graph, patch: &Patch) -> Result<(), CompileError> {
    let err = |e| CompileError::Pass {
        pass: patch.label.clone(),
        source: Box::new(e),
    };
    graph.apply(patch).map_err(err)?;
    graph.check(None).map_err(err)
}

fn order_matters(a: &RewriteOp, b: &RewriteOp) -> bool {
    use RewriteOp::*;
    if a.is_kv() != b.is_kv() {
        return false;
    }
    !matches!(
        (a, b),
        (
            Reweight {
                renormalize: false,
                ..
            },
            Reweight {
                renormalize: false,
                ..
            }
        ) | (Store { .. }, Store { .. })
    )
}

fn overlap_in_time(a: Option<Steps>, b: Option<Steps>, n: Option<usize>) -> bool {
    match (a, b, n) {
        (Some(a), Some(b), Some(n)) => {
            let ((a0, a1), (b0, b1)) = (a.range(n), b.range(n));
            a0 < b1 && b0 < a1
        }
        _ => true,
    }
}

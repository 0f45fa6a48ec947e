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
pub mod hoist;
pub mod plan_file;
pub mod state;
pub mod store;

use crate::graph::patch::{Patch, Src};
use crate::graph::{AttnInfo, AttnKind, Graph, GraphError, InputSpec, Op};
use crate::recipe::spans::Seg;
use crate::recipe::{RecipeError, RewriteOp, Source, Steps, at, select};
use crate::unet::{ModelError, UNet};
use petgraph::Direction;
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
    pub fusion: String,
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
    let text_len = spec.text_len;
    let mut unbound_words = Vec::new();
    let mut cache: Option<cache::CacheSpec> = None;

    // ---- validate each rewrite on its own, and find where it lands ----
    let mut landings: BTreeMap<String, Vec<Landing>> = BTreeMap::new();
    let mut weights: Vec<Option<Vec<f32>>> = vec![None; recipe.rewrites.len()];
    for (i, rw) in recipe.rewrites.iter().enumerate() {
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
                                            k.iter()
                                                .map(|s| s.as_str())
                                                .collect::<Vec<_>>()
                                                .join(", ")
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
            RewriteOp::Store { max_queries, .. } => {
                if let Some(m) = max_queries {
                    chosen.retain(|&j| layers[j].2.queries <= *m);
                    if chosen.is_empty() {
                        return Err(src
                            .error(
                                &at(i, &[Seg::Field("op"), Seg::Field("max_queries")]),
                                "no-match",
                                format!(
                                    "Store's max_queries: {m} leaves none of the selected layers"
                                ),
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
                for (name, item) in [("from", from), ("to", to)] {
                    if item.0 >= spec.batch {
                        return Err(src
                            .error(
                                &at(i, &[Seg::Field("op"), Seg::Field(name)]),
                                "batch-item",
                                format!(
                                    "BatchItem({}) is outside the batch of {}",
                                    item.0, spec.batch
                                ),
                                {
                                    // With guidance the batch is [uncond × P, cond × P].
                                    let need = (item.0 + 1).next_multiple_of(2);
                                    format!(
                                        "batch items run 0..{} in diffusers order [uncond..., cond...]; BatchItem({}) needs a batch of at least {need}: give {} prompts (--prompt, repeated) or --batch {need}",
                                        spec.batch,
                                        item.0,
                                        need / 2
                                    )
                                },
                            )
                            .into());
                    }
                    if !branch_items.contains(&item.0) {
                        return Err(src
                            .error(
                                &at(i, &[Seg::Field("op"), Seg::Field(name)]),
                                "batch-item",
                                format!(
                                    "BatchItem({}) is not in the {:?} branch (items {:?})",
                                    item.0, branch, branch_items
                                ),
                                "set branch: Both to reach any item, or pick an item of the branch",
                            )
                            .into());
                    }
                }
                if from == to {
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
                    Some(m) => chosen.retain(|&j| {
                        layers[j].2.kind == AttnKind::Cross || layers[j].2.queries <= *m
                    }),
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
                items = vec![from.0, to.0];
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
                    crate::recipe::KvSource::Reference(name) => {
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
                                    "Reference K/V apply to the whole batch",
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
                cache = Some(check_cache(src, base, i, &cache, *interval, *cb, branch)?);
                chosen.clear();
            }
            RewriteOp::MergeKv { ratio, sx, sy, .. }
            | RewriteOp::MergeTokens { ratio, sx, sy, .. } => {
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
                        return Err(src.error(&at(i, &[Seg::Field("op"), Seg::Field("max_downsample")]), "no-match", format!("no selected layer is downsampled at most {max_downsample} times"), "raise max_downsample").into());
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
                        .error(&op_path, "merge", format!("{sx}×{sy} cells do not fit the {}×{} token grid of {}", g.1, g.0, layers[j].1), "use smaller sx/sy, or select layers with larger grids (max_downsample)")
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

    // ---- step segments ----
    let ranged: Vec<usize> = (0..recipe.rewrites.len())
        .filter(|&i| recipe.rewrites[i].steps.is_some())
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
                .map(|r| {
                    r.steps.is_none_or(|s| {
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
                        source: crate::recipe::KvSource::Reference(x),
                        ..
                    },
                    RewriteOp::ReplaceKv {
                        source: crate::recipe::KvSource::Reference(y),
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
                            source: crate::recipe::KvSource::Reference(_),
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
    for (path, ls) in &landings {
        for l in ls {
            if let RewriteOp::Store { reduce, .. } = &recipe.rewrites[l.rewrite].op {
                stores.insert(format!("probs.{path}"), *reduce);
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
                        merge_tokens(&graph, &block, &rw.op, l.rewrite)
                    }
                    _ => {
                        let frames = match &rw.op {
                            RewriteOp::ReplaceKv { frames, .. } => {
                                frames.or(opts.frames).unwrap_or(1)
                            }
                            _ => 1,
                        };
                        let (patch, note, rec) =
                            apply_kv(&graph, node, &path, &rw.op, &l.items, frames, l.rewrite);
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
                let info = match &graph.g[node].op {
                    Op::Attention(a) => a.clone(),
                    _ => info.clone(),
                };
                let patch = apply_layer(&graph, node, &path, &info, &probs, src, &weights);
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
                    "none needed: no rewrite touches the probabilities; fused attention kernel kept"
                        .into()
                } else if opts.fuse {
                    String::new()
                } else {
                    "none: fusion is off (--no-fuse)".into()
                },
                materialised: items.into_iter().collect(),
                notes,
            });
        }
        if opts.fuse {
            for r in reports
                .iter_mut()
                .filter(|r| !r.fusion.starts_with("none needed"))
            {
                let unbound = r.rewrites.iter().any(|i| unbound_words.contains(i));
                let (fusion, patch) = fuse_layer(&graph, &r.path, base, unbound);
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
        cache,
    })
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
            let layer = output.strip_prefix("probs.").unwrap_or(&output);
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

/// The apply pass for one layer: the attention node becomes probabilities for the items the
/// rewrites touch, the rewrites' nodes in order, and a mixed attention output.
fn apply_layer(
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
            RewriteOp::ReplaceMaps { from, to, .. } => {
                p = patch.add(
                    path,
                    Op::ProbsReplace {
                        from: row(from.0),
                        to: row(to.0),
                    },
                    &[p],
                );
            }
            RewriteOp::Store { what, .. } => {
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
                        name: format!("probs.{path}"),
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

/// A K/V rewrite on one layer: frames gathered after the projections (each item's own K/V are
/// projected once), a reference's K/V input before them, merged tokens before them (merging
/// first saves projection work: a mean merge commutes with a linear map).
fn apply_kv(
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
            source: crate::recipe::KvSource::Reference(name),
            mode,
            ..
        } => {
            let kv = g.inputs_of(to_k)[0];
            let input = format!("ref.{name}.{path}");
            let r = patch.add(
                "",
                Op::Input {
                    name: input.clone(),
                    shape: g.g[kv].shape.clone(),
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
            let Op::Attention(info) = &g.g[node].op else {
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

fn find(g: &Graph, path: &str, pred: impl Fn(&Op) -> bool) -> Option<NodeIndex> {
    g.g.node_indices()
        .find(|&n| g.g[n].path == path && pred(&g.g[n].op))
}

/// tomesd on one transformer block: one merge plan from the block input, merge/unmerge around
/// attn1, attn2 and the feed-forward as asked.
fn merge_tokens(g: &Graph, block: &str, op: &RewriteOp, rewrite: usize) -> (Patch, String) {
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
    let Op::Attention(info) = &g.g[att1].op else {
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

/// The fuse pass for one layer: a chain of reweights alone becomes a V row scale and/or a
/// score bias folded into Q/K around the fused attention. Returns what fired or why not.
fn fuse_layer(g: &Graph, path: &str, base: &Graph, unbound_words: bool) -> (String, Option<Patch>) {
    let mix =
        g.g.node_indices()
            .find(|&n| g.g[n].path == path && matches!(g.g[n].op, Op::AttnMix { .. }));
    let Some(mix) = mix else {
        return ("none: no materialised attention on this layer".into(), None);
    };
    let Op::AttnMix { items, .. } = &g.g[mix].op else {
        unreachable!()
    };
    let items = items.clone();
    let ins = g.inputs_of(mix);
    // Walk the probability chain back to AttnProbs.
    let mut chain = Vec::new();
    let mut cur = ins[3];
    loop {
        let n = &g.g[cur];
        let consumers = g.g.neighbors_directed(cur, Direction::Outgoing).count();
        if consumers > 1 {
            return (
                format!(
                    "none: probabilities are materialised for items {items:?} because a Store records them"
                ),
                None,
            );
        }
        match &n.op {
            Op::AttnProbs { .. } => {
                chain.push(cur);
                break;
            }
            Op::ProbsReplace { .. } => {
                return (
                    format!("none: ReplaceMaps needs the probabilities of items {items:?}"),
                    None,
                );
            }
            Op::ProbsReweight { .. } => {
                chain.push(cur);
                cur = g.inputs_of(cur)[0];
            }
            other => {
                return (
                    format!("none: unexpected {} in the chain", other.name()),
                    None,
                );
            }
        }
    }
    chain.reverse(); // AttnProbs first
    let b = g.spec.batch;
    let info = base
        .attention_layers()
        .into_iter()
        .find(|(_, p, _)| *p == path)
        .map(|(_, _, a)| a.clone())
        .expect("layer exists in the base graph");
    let keys = info.keys;
    let mut scale = vec![1.0f32; b * keys];
    let mut bias = vec![0.0f32; b * keys];
    for &n in &chain[1..] {
        let Op::ProbsReweight {
            weights,
            renormalize,
            ..
        } = &g.g[n].op
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
        what.push("non-renormalised reweight → V rows scaled (P·diag(w)·V = P·(w⊙V))");
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
        what.push("renormalised reweight → log w score bias folded into Q/K");
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
        what.push("reweights cancel out (all weights 1)");
    }
    let note = if unbound_words {
        " (word weights bind to a prompt at run time)"
    } else {
        ""
    };
    (
        format!(
            "fused: {}; fused attention kernel kept{note}",
            what.join("; ")
        ),
        Some(patch),
    )
}

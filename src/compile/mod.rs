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
mod landing;
pub mod passes;
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
use crate::recipe::{RecipeError, RewriteOp, Source};
use crate::unet::{ModelError, UNet};
use petgraph::stable_graph::NodeIndex;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};

pub use passes::PassName;

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
    /// Stop after this pass (later passes are not run): see [`passes::PASSES`].
    pub stop_after: Option<PassName>,
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
                .attention(&r.layer)
                .map(|(n, _)| n)
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

/// As [`compile`], on an already built and checked graph: the driver. Validation finds where
/// each rewrite lands ([`landing`]), the state check and conflicts follow, then each step
/// segment runs the passes ([`passes::PASSES`]) on its own copy of the graph.
pub fn compile_graph(
    src: &Source,
    base: &Graph,
    opts: &CompileOptions,
) -> Result<Compiled, CompileError> {
    let layers = layer_facts(base);
    let (passes, pass) = stored::passes(src, opts)?;
    let landed = landing::land(src, base, &layers, opts, pass.as_deref())?;
    stored::check_reads(src, &layers, opts, &passes, pass.as_deref(), &landed.lands)?;
    let segments = landing::segments(src, opts, pass.as_deref())?;
    landing::conflicts(src, opts, &landed.landings)?;
    let (stores, spill) = landing::stores(&src.recipe, &landed.landings);
    let out = RefCell::new(passes::Out::default());
    let ctx = passes::Ctx {
        src,
        opts,
        base,
        landings: &landed.landings,
        weights: &landed.weights,
        unbound_words: &landed.unbound_words,
        cache: landed.cache.as_ref(),
        segment: None,
        layer: None,
        rewrites: &[],
        out: &out,
    };
    let mut records = Vec::new();
    let segments = segments
        .into_iter()
        .map(|segment| passes::run_segment(&passes::Ctx { segment, ..ctx }, &mut records))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Compiled {
        recipe: src.recipe.name.clone(),
        spec: base.spec,
        steps: opts.steps,
        base: base.clone(),
        segments,
        unbound_words: landed.unbound_words,
        records,
        stores,
        spill,
        cache: landed.cache,
    })
}

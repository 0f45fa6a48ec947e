//! DeepCache as a compiler pass: a recipe's `Cache(interval, branch)` splits each step
//! segment's graph in two. The *full* graph is the UNet plus one output, the features entering
//! the selected shallow up layer; the *cached* graph reads those features as an input instead,
//! so that (after dead-node pruning) it runs only the shallow branch: the time embedding,
//! conv_in, the down layers whose skips the shallow up layers read, those up layers and
//! conv_out. The run executes the full graph at steps `0, interval, 2·interval, …` and keeps
//! the features on the device for the steps between (DeepCache's uniform mode).
//!
//! Branch numbering follows DeepCache's `cache_branch_id`: block `branch / 3` counted from the
//! outside (up blocks from the output side), layer `branch % 3` counted from that up block's
//! last layer. Branch 0 reuses everything but the last up layer.
//!
//! Try it: `rewire explain rewrites/deepcache.ron --model models/shapes-sd`.

use crate::graph::patch::{Patch, Src};
use crate::graph::{Graph, GraphError, Op};
use petgraph::stable_graph::NodeIndex;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// The input/output name of the cached features in the compiled graphs
/// ([`crate::graph::keys::Key::CacheFeatures`]).
pub const FEATURES: &str = "cache.features";

/// A recipe's `Cache`, resolved on a graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSpec {
    /// The recipe's rewrite index.
    pub rewrite: usize,
    /// A full step every `interval` steps.
    pub interval: usize,
    /// DeepCache's cache_branch_id.
    pub branch: usize,
    /// The node whose output is reused (`up_blocks.2.attentions.0.proj_out`, …).
    pub feature: String,
    /// The up layer the cached steps resume at (`up_blocks.2.resnets.1`).
    pub resume: String,
    /// The features' shape.
    pub shape: Vec<usize>,
}

impl CacheSpec {
    /// Whether step `i` of the run runs the whole UNet.
    pub fn full(&self, i: usize) -> bool {
        i.is_multiple_of(self.interval)
    }

    /// Bytes the cached features take (f32).
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

/// Why a branch cannot be cached on a graph.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The branch names an up block or layer this UNet does not have.
    #[error(
        "branch {branch} is not a shallow branch of a UNet with {up_blocks} up blocks of {layers:?} layers"
    )]
    NoBranch {
        branch: usize,
        up_blocks: usize,
        layers: Vec<usize>,
    },
    /// An output other than the UNet's needs nodes a cached step skips.
    #[error("output `{output}` needs nodes that cached steps skip")]
    SkippedOutput { output: String },
    #[error(transparent)]
    Graph(#[from] GraphError),
}

/// The up layers (`up_blocks.U.resnets.R` concatenations) by up block.
fn up_layers(g: &Graph) -> Vec<Vec<(usize, NodeIndex)>> {
    let mut blocks: Vec<Vec<(usize, NodeIndex)>> = Vec::new();
    for n in g.nodes() {
        let node = g.node(n);
        if !matches!(node.op, Op::Concat { .. }) {
            continue;
        }
        let Some(rest) = node.path.strip_prefix("up_blocks.") else {
            continue;
        };
        let mut parts = rest.split('.');
        let (Some(u), Some("resnets"), Some(r), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(u), Ok(r)) = (u.parse::<usize>(), r.parse::<usize>()) else {
            continue;
        };
        if blocks.len() <= u {
            blocks.resize_with(u + 1, Vec::new);
        }
        blocks[u].push((r, n));
    }
    for b in &mut blocks {
        b.sort();
    }
    blocks
}

/// Finds branch `branch`'s resume point: (the concatenation that starts the shallow up layer,
/// the node whose output enters it).
pub fn locate(g: &Graph, branch: usize) -> Result<(NodeIndex, NodeIndex), CacheError> {
    let blocks = up_layers(g);
    let no = || CacheError::NoBranch {
        branch,
        up_blocks: blocks.len(),
        layers: blocks.iter().map(|b| b.len()).collect(),
    };
    let (block, layer) = (branch / 3, branch % 3);
    let u = blocks.len().checked_sub(1 + block).ok_or_else(no)?;
    let layers = &blocks[u];
    let r = layers.len().checked_sub(1 + layer).ok_or_else(no)?;
    let (_, cat) = layers[r];
    let feature = *g.inputs_of(cat).first().ok_or_else(no)?;
    Ok((cat, feature))
}

/// Resolves a recipe's Cache on the UNet's graph.
pub fn resolve(
    g: &Graph,
    rewrite: usize,
    interval: usize,
    branch: usize,
) -> Result<CacheSpec, CacheError> {
    let (cat, feature) = locate(g, branch)?;
    Ok(CacheSpec {
        rewrite,
        interval,
        branch,
        feature: g.node(feature).path.clone(),
        resume: g.node(cat).path.clone(),
        shape: g.node(feature).shape.clone(),
    })
}

/// Nodes some output in `roots` needs.
fn needed(g: &Graph, roots: impl IntoIterator<Item = NodeIndex>) -> HashSet<NodeIndex> {
    let mut live = HashSet::new();
    let mut stack: Vec<_> = roots.into_iter().collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(g.inputs_of(n));
        }
    }
    live
}

/// Splits one segment's graph: the patch that makes it the full-step graph (an output on the
/// features), and the cached-step graph (the features as an input, everything the UNet's output
/// no longer needs removed). An output other than `out` that would need a skipped node is an
/// error: its layer does not run at cached steps.
pub fn split(g: &Graph, spec: &CacheSpec) -> Result<(Patch, Graph), CacheError> {
    let (cat, feature) = locate(g, spec.branch)?;
    let mut record = Patch::new(format!(
        "cache: record the features entering {} ({})",
        spec.resume, spec.feature
    ));
    record.add(
        "",
        Op::Output {
            name: FEATURES.into(),
        },
        &[Src::Old(feature)],
    );

    let mut cached = g.clone();
    let mut read = Patch::new(format!(
        "cache: cached steps resume at {} from the recorded features",
        spec.resume
    ));
    let input = read.add(
        "",
        Op::Input {
            name: FEATURES.into(),
            shape: g.node(feature).shape.clone(),
        },
        &[],
    );
    read.rewire.push((cat, 0, input));
    cached.apply(&read)?;

    let outputs = cached.outputs();
    let unet_out = outputs.iter().find(|(n, _)| n == "out").map(|&(_, n)| n);
    let full_out = g.outputs().into_iter().find(|(n, _)| n == "out");
    if let (Some(o), Some((_, fo))) = (unet_out, full_out) {
        // The cached graph is a clone with nodes added: old nodes keep their indices.
        let kept = needed(&cached, [o]);
        let skipped: HashSet<NodeIndex> = needed(g, [fo])
            .into_iter()
            .filter(|n| !kept.contains(n))
            .collect();
        for (name, n) in &outputs {
            if name != "out" && needed(&cached, [*n]).iter().any(|m| skipped.contains(m)) {
                return Err(CacheError::SkippedOutput {
                    output: name.clone(),
                });
            }
        }
    }
    let live = needed(&cached, outputs.iter().map(|&(_, n)| n));
    let mut prune = Patch::new("cache: drop what cached steps skip");
    prune.remove = cached.nodes().filter(|n| !live.contains(n)).collect();
    cached.apply(&prune)?;
    cached.check(None)?;
    Ok((record, cached))
}

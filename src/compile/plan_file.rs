//! Plan files: a compiled recipe saved ahead of time (`rewire compile ... -o X.plan`). A plan
//! records the model's and the recipe's fingerprints and a checksum of its own content; loading
//! refuses another model or a modified file, saying which.
//!
//! The checksum is a plain SHA-256 of the plan's own JSON: it detects accidental edits and
//! corruption, not forgery (anyone can recompute it; it is not a signature). A plan is therefore
//! untrusted input: loading reads at most [`crate::limits::MAX_PLAN_BYTES`], refuses another
//! `format`, and [`PlanFile::compiled`] re-validates every node as a freshly compiled graph is
//! (op fields, shapes, limits), and checks every op that reads weights or splits heads against
//! the model's own graph at the same path.
//!
//! Try it: `rewire compile rewrites/reweight.ron --model models/tiny-sd -o /tmp/r.plan`.

use super::{Compiled, LayerReport, Segment};
use crate::graph::{Graph, GraphError, InputSpec, Op};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::path::{Path, PathBuf};

/// Errors raised while saving or loading a plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a rewire plan: {reason}\n  hint: make one with `rewire compile RECIPE --model MODEL -o FILE`"
    )]
    Format { path: PathBuf, reason: String },
    #[error(
        "{path} was modified after it was compiled (checksum mismatch)\n  hint: compile it again with `rewire compile`"
    )]
    Tampered { path: PathBuf },
    #[error(
        "{path} was compiled for another model (fingerprint {expected:.12}…, this model is {found:.12}…)\n  hint: compile the recipe again for this model"
    )]
    OtherModel {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: {mismatch}\n  hint: {hint}")]
    Mismatch {
        path: PathBuf,
        mismatch: Box<Mismatch>,
        hint: String,
    },
    #[error("{path}: segment {segment}: {source}")]
    Graph {
        path: PathBuf,
        segment: usize,
        #[source]
        source: Box<GraphError>,
    },
}

/// How a plan does not fit a run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Mismatch {
    #[error(
        "the plan's words were bound to the prompt {bound:?}, this run's last prompt is {last:?}"
    )]
    Prompt { bound: String, last: String },
    #[error("the plan was compiled for UNet inputs {plan:?}, this run needs {run:?}")]
    Spec { plan: InputSpec, run: InputSpec },
    #[error("the plan was compiled for {plan} steps (UNet calls), this run makes {run}")]
    Steps { plan: usize, run: usize },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeFile {
    path: String,
    op: Op,
    inputs: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SegmentFile {
    steps: Option<(usize, usize)>,
    nodes: Vec<NodeFile>,
    layers: Vec<LayerReport>,
    /// With a Cache: the cached steps' graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cached: Option<Vec<NodeFile>>,
}

/// The plan format this build writes and reads.
pub const PLAN_FORMAT: u32 = 2;

/// The saved form of a compiled recipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanFile {
    pub format: u32,
    pub rewire_version: String,
    pub recipe: String,
    pub model_fingerprint: String,
    pub recipe_fingerprint: String,
    pub spec: InputSpec,
    pub steps: Option<usize>,
    /// The prompt the recipe's words were bound to (`rewire compile --prompt`); a run with the
    /// plan must end with this prompt.
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    records: Vec<super::Record>,
    #[serde(default)]
    stores: std::collections::BTreeMap<String, crate::recipe::Reduce>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    spill: std::collections::BTreeSet<String>,
    segments: Vec<SegmentFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache: Option<super::cache::CacheSpec>,
    checksum: String,
}

fn graph_nodes(g: &Graph) -> Vec<NodeFile> {
    let order = g.topo().unwrap_or_default();
    let pos: std::collections::HashMap<_, _> =
        order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    order
        .iter()
        .map(|&n| NodeFile {
            path: g.node(n).path.clone(),
            op: g.node(n).op.clone(),
            inputs: g.inputs_of(n).iter().map(|i| pos[i]).collect(),
        })
        .collect()
}

impl PlanFile {
    fn digest(&self) -> String {
        let mut copy = self.clone();
        copy.checksum = String::new();
        let bytes = serde_json::to_vec(&copy).unwrap_or_default();
        format!("{:x}", sha2::Sha256::digest(&bytes))
    }

    /// Packs a compiled recipe.
    pub fn new(c: &Compiled, model_fingerprint: String, recipe_fingerprint: String) -> PlanFile {
        let mut p = PlanFile {
            format: PLAN_FORMAT,
            rewire_version: env!("CARGO_PKG_VERSION").into(),
            recipe: c.recipe.clone(),
            model_fingerprint,
            recipe_fingerprint,
            spec: c.spec,
            steps: c.steps,
            prompt: None,
            records: c.records.clone(),
            stores: c.stores.clone(),
            spill: c.spill.clone(),
            segments: c
                .segments
                .iter()
                .map(|s| SegmentFile {
                    steps: s.steps,
                    nodes: graph_nodes(&s.graph),
                    layers: s.layers.clone(),
                    cached: s.cached.as_ref().map(graph_nodes),
                })
                .collect(),
            cache: c.cache.clone(),
            checksum: String::new(),
        };
        p.checksum = p.digest();
        p
    }

    /// Records the prompt the words were bound to (and re-seals the checksum).
    pub fn with_prompt(mut self, prompt: Option<String>) -> PlanFile {
        self.prompt = prompt;
        self.checksum = self.digest();
        self
    }

    pub fn save(&self, path: &Path) -> Result<(), PlanError> {
        let text = serde_json::to_vec_pretty(self).expect("plans serialise");
        crate::weights::write_atomic(path, &text).map_err(|source| PlanError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Loads a plan, checks its checksum and that it was made for `model_fingerprint`.
    pub fn load(path: &Path, model_fingerprint: &str) -> Result<PlanFile, PlanError> {
        use crate::limits::{MAX_PLAN_BYTES, ReadError, read_capped};
        let bytes = read_capped(path, MAX_PLAN_BYTES, "MAX_PLAN_BYTES").map_err(|e| match e {
            ReadError::Io(source) => PlanError::Read {
                path: path.to_path_buf(),
                source,
            },
            other => PlanError::Format {
                path: path.to_path_buf(),
                reason: other.to_string(),
            },
        })?;
        let p: PlanFile = serde_json::from_slice(&bytes).map_err(|e| PlanError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if p.format != PLAN_FORMAT {
            return Err(PlanError::Format {
                path: path.to_path_buf(),
                reason: format!(
                    "`format` is {}, this rewire reads format {PLAN_FORMAT} (compile the plan again with this rewire)",
                    p.format
                ),
            });
        }
        if p.digest() != p.checksum {
            return Err(PlanError::Tampered {
                path: path.to_path_buf(),
            });
        }
        if p.model_fingerprint != model_fingerprint {
            return Err(PlanError::OtherModel {
                path: path.to_path_buf(),
                expected: p.model_fingerprint.clone(),
                found: model_fingerprint.to_string(),
            });
        }
        Ok(p)
    }

    /// Checks that the plan fits a run: its UNet inputs, its number of UNet calls (when the
    /// run knows it) and the prompt the plan's words were bound to (the run's last prompt).
    pub fn check_run(
        &self,
        path: &Path,
        spec: InputSpec,
        calls: Option<usize>,
        last_prompt: Option<&str>,
    ) -> Result<(), PlanError> {
        let mismatch = if let (Some(bound), Some(last)) = (&self.prompt, last_prompt)
            && bound != last
        {
            Some(Mismatch::Prompt {
                bound: bound.clone(),
                last: last.to_string(),
            })
        } else if self.spec != spec {
            Some(Mismatch::Spec {
                plan: self.spec,
                run: spec,
            })
        } else if let (Some(plan), Some(run)) = (self.steps, calls)
            && plan != run
        {
            Some(Mismatch::Steps { plan, run })
        } else {
            None
        };
        let Some(mismatch) = mismatch else {
            return Ok(());
        };
        let prompt = match (&self.prompt, last_prompt) {
            (Some(_), Some(last)) => format!(" --prompt {last:?}"),
            _ => String::new(),
        };
        let steps = calls
            .or(self.steps)
            .map(|n| format!(" --steps {n}"))
            .unwrap_or_default();
        Err(PlanError::Mismatch {
            path: path.to_path_buf(),
            mismatch: Box::new(mismatch),
            hint: format!(
                "compile it again for this run: rewire compile RECIPE --model MODEL --batch {} --size {}x{}{steps}{prompt}",
                spec.batch, spec.height, spec.width
            ),
        })
    }

    /// Rebuilds the graphs (re-inferring every shape) as a compiled recipe.
    pub fn compiled(&self, path: &Path, base: &Graph) -> Result<Compiled, PlanError> {
        let format = |reason: String| PlanError::Format {
            path: path.to_path_buf(),
            reason,
        };
        self.spec
            .check()
            .map_err(|e| format(format!("`spec`: {e}")))?;
        if self.spec != base.spec {
            return Err(format(format!(
                "`spec` is {:?}, the model's graph was built for {:?}",
                self.spec, base.spec
            )));
        }
        if self.segments.is_empty() {
            return Err(format("`segments` is empty".into()));
        }
        // The model's own ops by path: a plan's op that reads weights or splits heads must be one
        // of them (a forged head count or eps would otherwise run).
        let mut own: std::collections::HashMap<&str, Vec<&Op>> = std::collections::HashMap::new();
        for n in base.nodes().map(|i| base.node(i)) {
            own.entry(n.path.as_str()).or_default().push(&n.op);
        }
        let mut segments = Vec::new();
        for (si, s) in self.segments.iter().enumerate() {
            if let Some((a, b)) = s.steps
                && (a >= b || self.steps.is_some_and(|n| b > n))
            {
                return Err(format(format!(
                    "segment {si}: steps {a}..{b} are not a range inside the run of {:?} steps",
                    self.steps
                )));
            }
            let g = self.rebuild(path, si, &s.nodes, &own)?;
            let cached = match (&self.cache, &s.cached) {
                (None, None) => None,
                (Some(_), Some(nodes)) => Some(self.rebuild(path, si, nodes, &own)?),
                _ => {
                    return Err(format(format!(
                        "segment {si}: `cache` and the segment's `cached` graph come together"
                    )));
                }
            };
            segments.push(Segment {
                steps: s.steps,
                graph: g,
                layers: s.layers.clone(),
                patches: vec![],
                cached,
            });
        }
        if let Some(c) = &self.cache {
            let again = (c.interval >= 2)
                .then(|| super::cache::resolve(base, c.rewrite, c.interval, c.branch).ok())
                .flatten();
            if again.as_ref() != Some(c) {
                return Err(format(format!(
                    "`cache` (interval {}, branch {}) does not resolve to the same features on this model",
                    c.interval, c.branch
                )));
            }
            let feature = super::cache::FEATURES;
            for (si, s) in segments.iter().enumerate() {
                let records = s.graph.outputs().iter().any(|(n, _)| n == feature);
                let reads = s.cached.as_ref().is_some_and(|g| {
                    g.inputs()
                        .iter()
                        .any(|(n, i)| n == feature && g.node(*i).shape == c.shape)
                });
                if !records || !reads {
                    return Err(format(format!(
                        "segment {si}: the full graph must output `{feature}` and the cached graph read it as {:?}",
                        c.shape
                    )));
                }
            }
        }
        Ok(Compiled {
            recipe: self.recipe.clone(),
            spec: self.spec,
            steps: self.steps,
            base: base.clone(),
            segments,
            unbound_words: vec![],
            records: self.records.clone(),
            stores: self.stores.clone(),
            spill: self.spill.clone(),
            cache: self.cache.clone(),
        })
    }

    /// One graph of a segment, checked node by node against the model's own ops.
    fn rebuild(
        &self,
        path: &Path,
        si: usize,
        nodes: &[NodeFile],
        own: &std::collections::HashMap<&str, Vec<&Op>>,
    ) -> Result<Graph, PlanError> {
        let format = |reason: String| PlanError::Format {
            path: path.to_path_buf(),
            reason,
        };
        if let Err(e) =
            crate::limits::at_most(nodes.len(), crate::limits::MAX_PLAN_NODES, "MAX_PLAN_NODES")
        {
            return Err(format(format!("segment {si}: too many nodes: {e}")));
        }
        let cached = self.cache.is_some();
        let mut g = Graph::new(self.spec);
        let mut ids = Vec::with_capacity(nodes.len());
        for (ni, n) in nodes.iter().enumerate() {
            if let Some(reason) =
                n.op.check_params()
                    .err()
                    .or_else(|| foreign_op(own, &n.path, &n.op, cached))
            {
                return Err(format(format!(
                    "segment {si}, node {ni} ({} [{}]): {reason}",
                    n.path,
                    n.op.name()
                )));
            }
            let ins: Option<Vec<_>> = n.inputs.iter().map(|&i| ids.get(i).copied()).collect();
            let ins = ins.ok_or_else(|| PlanError::Format {
                path: path.to_path_buf(),
                reason: format!("segment {si}, node {ni}: a node reads a later node"),
            })?;
            let id = g
                .add(n.path.clone(), n.op.clone(), &ins)
                .map_err(|source| PlanError::Graph {
                    path: path.to_path_buf(),
                    segment: si,
                    source: Box::new(source),
                })?;
            ids.push(id);
        }
        g.check(None).map_err(|source| PlanError::Graph {
            path: path.to_path_buf(),
            segment: si,
            source: Box::new(source),
        })?;
        Ok(g)
    }
}

/// Why a plan's op is not one the model has at `path`, for ops that read weights or split heads;
/// `None` when it is (or when the op is one a rewrite adds).
fn foreign_op(
    own: &std::collections::HashMap<&str, Vec<&Op>>,
    path: &str,
    op: &Op,
    cached: bool,
) -> Option<String> {
    let theirs = own.get(path).map(Vec::as_slice).unwrap_or(&[]);
    match op {
        Op::Attention(a) => {
            let same = theirs.iter().any(|o| {
                matches!(o, Op::Attention(b) if b.heads == a.heads && b.head_dim == a.head_dim && b.kind == a.kind)
            });
            (!same).then(|| {
                format!(
                    "{} heads × {} is not the model's attention at this path",
                    a.heads, a.head_dim
                )
            })
        }
        Op::Input { name, shape } => {
            let same = theirs.iter().any(|o| matches!(o, Op::Input { name: n, shape: s } if n == name && s == shape))
                // A reference pass's recorded K/V input has no counterpart in the model.
                || matches!(crate::graph::keys::Key::parse(name), crate::graph::keys::Key::Reference { .. })
                // Nor do maps read from named state.
                || matches!(crate::graph::keys::Key::parse(name), crate::graph::keys::Key::Stored { .. })
                // Nor do a Cache's features.
                || (cached && name == super::cache::FEATURES);
            (!same).then(|| format!("input `{name}` {shape:?} is not one of the model's inputs"))
        }
        _ if !op.weights().is_empty() || matches!(op, Op::TimestepProj { .. }) => (!theirs
            .contains(&op))
        .then(|| "the op's fields differ from the model's op at this path".to_string()),
        _ => None,
    }
}

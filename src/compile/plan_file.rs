//! Plan files: a compiled recipe saved ahead of time (`rewire compile ... -o X.plan`). A plan
//! records the model's and the recipe's fingerprints and a checksum of its own content; loading
//! refuses another model or a modified file, saying which.
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
    #[error("{path}: segment {segment}: {source}")]
    Graph {
        path: PathBuf,
        segment: usize,
        #[source]
        source: Box<GraphError>,
    },
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
}

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
    segments: Vec<SegmentFile>,
    checksum: String,
}

fn graph_nodes(g: &Graph) -> Vec<NodeFile> {
    let order = g.topo().unwrap_or_default();
    let pos: std::collections::HashMap<_, _> =
        order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    order
        .iter()
        .map(|&n| NodeFile {
            path: g.g[n].path.clone(),
            op: g.g[n].op.clone(),
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
            format: 1,
            rewire_version: env!("CARGO_PKG_VERSION").into(),
            recipe: c.recipe.clone(),
            model_fingerprint,
            recipe_fingerprint,
            spec: c.spec,
            steps: c.steps,
            prompt: None,
            records: c.records.clone(),
            stores: c.stores.clone(),
            segments: c
                .segments
                .iter()
                .map(|s| SegmentFile {
                    steps: s.steps,
                    nodes: graph_nodes(&s.graph),
                    layers: s.layers.clone(),
                })
                .collect(),
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
        let bytes = std::fs::read(path).map_err(|source| PlanError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let p: PlanFile = serde_json::from_slice(&bytes).map_err(|e| PlanError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
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

    /// Rebuilds the graphs (re-inferring every shape) as a compiled recipe.
    pub fn compiled(&self, path: &Path, base: &Graph) -> Result<Compiled, PlanError> {
        let mut segments = Vec::new();
        for (si, s) in self.segments.iter().enumerate() {
            let mut g = Graph::new(self.spec);
            let mut ids = Vec::with_capacity(s.nodes.len());
            for n in &s.nodes {
                let ins: Option<Vec<_>> = n.inputs.iter().map(|&i| ids.get(i).copied()).collect();
                let ins = ins.ok_or_else(|| PlanError::Format {
                    path: path.to_path_buf(),
                    reason: format!("segment {si}: a node reads a later node"),
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
            segments.push(Segment {
                steps: s.steps,
                graph: g,
                layers: s.layers.clone(),
                patches: vec![],
            });
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
        })
    }
}

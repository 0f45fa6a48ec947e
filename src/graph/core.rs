//! The graph itself: [`Node`], [`Wire`] and [`Graph`], which owns its petgraph privately and
//! keeps a path index (diffusers path → node ids), so finding a layer's nodes by path is a
//! lookup, not a scan. Nodes change only through [`Graph::add`] and patches
//! ([`Graph::apply`](super::patch)), both of which keep the index up to date.
//!
//! Try it: `cargo test --release --lib graph::core`.

use super::{AttnInfo, GraphError, InputSpec, Op, Place, Shape};
use crate::weights::WeightSource;
use petgraph::Direction;
use petgraph::stable_graph::{EdgeIndex, NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A node: an op, the diffusers path of the module it belongs to, and its output shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    pub path: String,
    pub op: Op,
    pub shape: Shape,
}

impl Node {
    /// `path` plus the op name, unique enough to read in a listing.
    pub fn label(&self) -> String {
        if self.path.is_empty() {
            self.op.name().to_string()
        } else {
            format!("{} [{}]", self.path, self.op.name())
        }
    }
}

/// A wire: which input slot of the consumer it feeds, and the shape it carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Wire {
    pub port: usize,
    pub shape: Shape,
}

/// The typed op graph of one UNet for one input spec.
#[derive(Debug, Clone)]
pub struct Graph {
    g: StableDiGraph<Node, Wire>,
    /// Path → the ids of the nodes with that path, in id order (the order a scan would find).
    paths: HashMap<String, Vec<NodeIndex>>,
    /// Input name → the ids of the `Input` nodes with that name, in id order.
    names: HashMap<String, Vec<NodeIndex>>,
    pub spec: InputSpec,
}

impl Graph {
    pub fn new(spec: InputSpec) -> Self {
        Graph {
            g: StableDiGraph::new(),
            paths: HashMap::new(),
            names: HashMap::new(),
            spec,
        }
    }

    /// A node by id (panics on an id not in the graph, like petgraph's indexing).
    pub fn node(&self, n: NodeIndex) -> &Node {
        &self.g[n]
    }

    /// A node by id, if it is in the graph.
    pub fn get(&self, n: NodeIndex) -> Option<&Node> {
        self.g.node_weight(n)
    }

    /// Every node id, in id order.
    pub fn nodes(&self) -> impl Iterator<Item = NodeIndex> + '_ {
        self.g.node_indices()
    }

    /// How many nodes the graph has.
    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    /// Every wire: producer, consumer and the wire, in edge id order.
    pub fn edges(&self) -> impl Iterator<Item = (NodeIndex, NodeIndex, &Wire)> + '_ {
        self.g.edge_indices().map(|e| {
            let (a, b) = self.g.edge_endpoints(e).expect("edge");
            (a, b, &self.g[e])
        })
    }

    /// The consumers of a node, one per wire (a node read twice appears twice).
    pub fn consumers(&self, n: NodeIndex) -> impl Iterator<Item = NodeIndex> + '_ {
        self.g.neighbors_directed(n, Direction::Outgoing)
    }

    /// The producer of a wire and the wire itself.
    pub fn wire(&self, e: EdgeIndex) -> (NodeIndex, &Wire) {
        let (src, _) = self.g.edge_endpoints(e).expect("edge exists");
        (src, &self.g[e])
    }

    /// The nodes with this path, in id order (an index lookup).
    pub fn by_path(&self, path: &str) -> &[NodeIndex] {
        self.paths.get(path).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The first node (in id order) with this path whose op satisfies `pred`.
    pub fn find(&self, path: &str, pred: impl Fn(&Op) -> bool) -> Option<NodeIndex> {
        self.by_path(path)
            .iter()
            .copied()
            .find(|&n| pred(&self.g[n].op))
    }

    /// Adds a node with no wires and an empty shape (a patch's new node), indexing its path.
    pub(super) fn add_unshaped(&mut self, path: String, op: Op) -> NodeIndex {
        let id = self.g.add_node(Node {
            path,
            op,
            shape: vec![],
        });
        self.index(id);
        id
    }

    /// Wires `src` into input `port` of `dst` (shape filled in by [`Graph::reinfer`]).
    pub(super) fn connect(&mut self, src: NodeIndex, dst: NodeIndex, port: usize) {
        self.g.add_edge(
            src,
            dst,
            Wire {
                port,
                shape: vec![],
            },
        );
    }

    /// The wires a node feeds: id, consumer, port.
    pub(super) fn out_wires(&self, n: NodeIndex) -> Vec<(EdgeIndex, NodeIndex, usize)> {
        self.g
            .edges_directed(n, Direction::Outgoing)
            .map(|e| (e.id(), e.target(), e.weight().port))
            .collect()
    }

    /// The wires into input `port` of a node.
    pub(super) fn in_wires(&self, n: NodeIndex, port: usize) -> Vec<EdgeIndex> {
        self.g
            .edges_directed(n, Direction::Incoming)
            .filter(|e| e.weight().port == port)
            .map(|e| e.id())
            .collect()
    }

    pub(super) fn remove_wire(&mut self, e: EdgeIndex) {
        self.g.remove_edge(e);
    }

    /// Removes a node (and its wires), dropping it from the indices.
    pub(super) fn remove(&mut self, n: NodeIndex) {
        if let Some(node) = self.g.remove_node(n) {
            unindex(&mut self.paths, &node.path, n);
            if let Op::Input { name, .. } = &node.op {
                unindex(&mut self.names, name, n);
            }
        }
    }

    fn index(&mut self, id: NodeIndex) {
        let node = &self.g[id];
        reindex(&mut self.paths, &node.path, id);
        if let Op::Input { name, .. } = &node.op {
            reindex(&mut self.names, name, id);
        }
    }

    /// Adds a node fed by `inputs` (in port order), inferring its output shape.
    pub fn add(
        &mut self,
        path: impl Into<String>,
        op: Op,
        inputs: &[NodeIndex],
    ) -> Result<NodeIndex, GraphError> {
        let path = path.into();
        if inputs.len() != op.arity() {
            return Err(GraphError::Arity {
                path,
                op: op.name().into(),
                expected: op.arity(),
                found: inputs.len(),
            });
        }
        let shapes: Vec<&[usize]> = inputs.iter().map(|&i| self.g[i].shape.as_slice()).collect();
        let shape = op.infer(&shapes).map_err(|message| GraphError::Shape {
            path: path.clone(),
            op: op.name().into(),
            message,
        })?;
        let wires: Vec<Shape> = shapes.iter().map(|s| s.to_vec()).collect();
        let id = self.g.add_node(Node { path, op, shape });
        self.index(id);
        for (port, (&src, shape)) in inputs.iter().zip(wires).enumerate() {
            self.g.add_edge(src, id, Wire { port, shape });
        }
        Ok(id)
    }

    /// The inputs of a node, in port order.
    pub fn inputs_of(&self, n: NodeIndex) -> Vec<NodeIndex> {
        self.incoming(n).into_iter().map(|(_, s)| s).collect()
    }

    /// The incoming edges of a node, in port order.
    pub fn input_edges(&self, n: NodeIndex) -> Vec<EdgeIndex> {
        self.incoming(n).into_iter().map(|(e, _)| e).collect()
    }

    /// The incoming edges of a node and their sources, in port order.
    fn incoming(&self, n: NodeIndex) -> Vec<(EdgeIndex, NodeIndex)> {
        let mut e: Vec<(usize, EdgeIndex, NodeIndex)> = self
            .g
            .edges_directed(n, Direction::Incoming)
            .map(|e| (e.weight().port, e.id(), e.source()))
            .collect();
        e.sort();
        e.into_iter().map(|(_, id, s)| (id, s)).collect()
    }

    /// Nodes in a deterministic topological order (ties broken by insertion order).
    pub fn topo(&self) -> Result<Vec<NodeIndex>, GraphError> {
        petgraph::algo::toposort(&self.g, None).map_err(|c| GraphError::Cycle {
            path: self.g[c.node_id()].path.clone(),
        })
    }

    /// Finds an input node by name (an index lookup).
    pub fn input(&self, name: &str) -> Option<NodeIndex> {
        self.names.get(name).and_then(|ids| ids.first().copied())
    }

    /// The attention node at `path` and its facts (a path lookup).
    pub fn attention(&self, path: &str) -> Option<(NodeIndex, &AttnInfo)> {
        self.by_path(path)
            .iter()
            .find_map(|&n| match &self.g[n].op {
                Op::Attention(a) => Some((n, a)),
                _ => None,
            })
    }

    /// The graph's input nodes.
    pub fn inputs(&self) -> Vec<(String, NodeIndex)> {
        self.g
            .node_indices()
            .filter_map(|i| match &self.g[i].op {
                Op::Input { name, .. } => Some((name.clone(), i)),
                _ => None,
            })
            .collect()
    }

    /// The graph's output nodes.
    pub fn outputs(&self) -> Vec<(String, NodeIndex)> {
        self.g
            .node_indices()
            .filter_map(|i| match &self.g[i].op {
                Op::Output { name } => Some((name.clone(), i)),
                _ => None,
            })
            .collect()
    }

    /// Attention nodes in the order of diffusers' `unet.attn_processors` (down blocks, up
    /// blocks, then the mid block, each in execution order), with their paths and facts.
    pub fn attention_layers(&self) -> Vec<(NodeIndex, &str, &AttnInfo)> {
        let order = self.topo().unwrap_or_default();
        let mut layers: Vec<_> = order
            .into_iter()
            .filter_map(|i| match &self.g[i].op {
                Op::Attention(a) => Some((i, self.g[i].path.as_str(), a)),
                _ => None,
            })
            .collect();
        layers.sort_by_key(|(_, _, a)| match a.place {
            Place::Down => 0,
            Place::Up => 1,
            Place::Mid => 2,
        });
        layers
    }

    /// The consistency check: arity, every wire's shape against its producer, every node's
    /// shape against inference from its inputs, and (when given) every weight against `weights`.
    pub fn check(&self, weights: Option<&dyn WeightSource>) -> Result<(), GraphError> {
        self.topo()?;
        for n in self.g.node_indices() {
            let node = &self.g[n];
            let edges = self.input_edges(n);
            if edges.len() != node.op.arity() {
                return Err(GraphError::Arity {
                    path: node.path.clone(),
                    op: node.op.name().into(),
                    expected: node.op.arity(),
                    found: edges.len(),
                });
            }
            let mut shapes = Vec::with_capacity(edges.len());
            for (port, e) in edges.iter().enumerate() {
                let (src, _) = self.g.edge_endpoints(*e).expect("edge exists");
                let wire = &self.g[*e];
                if wire.port != port {
                    return Err(GraphError::Arity {
                        path: node.path.clone(),
                        op: node.op.name().into(),
                        expected: node.op.arity(),
                        found: wire.port,
                    });
                }
                if wire.shape != self.g[src].shape {
                    return Err(GraphError::Wire {
                        path: node.path.clone(),
                        op: node.op.name().into(),
                        from: self.g[src].label(),
                        wire: wire.shape.clone(),
                        produced: self.g[src].shape.clone(),
                    });
                }
                shapes.push(wire.shape.as_slice());
            }
            let inferred = node
                .op
                .infer(&shapes)
                .map_err(|message| GraphError::Shape {
                    path: node.path.clone(),
                    op: node.op.name().into(),
                    message,
                })?;
            if let Op::Attention(a) = &node.op
                && (shapes[0][1] != a.queries || shapes[1][1] != a.keys)
            {
                return Err(GraphError::Shape {
                    path: node.path.clone(),
                    op: node.op.name().into(),
                    message: format!(
                        "queries × keys are {} × {}, the layer is typed {} × {}",
                        shapes[0][1], shapes[1][1], a.queries, a.keys
                    ),
                });
            }
            if inferred != node.shape {
                return Err(GraphError::Shape {
                    path: node.path.clone(),
                    op: node.op.name().into(),
                    message: format!(
                        "records output {:?} but its inputs give {inferred:?}",
                        node.shape
                    ),
                });
            }
            if let Some(w) = weights {
                for (name, shape) in node.op.weights() {
                    w.check(&format!("{}.{name}", node.path), &shape)?;
                }
            }
        }
        Ok(())
    }

    /// Every weight the graph reads (full name, expected shape), in topological order.
    pub fn weight_list(&self) -> Vec<(String, Shape)> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for n in self.topo().unwrap_or_default() {
            let node = &self.g[n];
            for (name, shape) in node.op.weights() {
                let full = format!("{}.{name}", node.path);
                if seen.insert(full.clone()) {
                    out.push((full, shape));
                }
            }
        }
        out
    }

    /// Re-infers every node's shape (and attention layers' query and key counts) from the
    /// inputs, in topological order, and rewrites every wire's shape: what a patch that changed
    /// token counts upstream runs before the consistency check.
    pub fn reinfer(&mut self) -> Result<(), GraphError> {
        for n in self.topo()? {
            let edges = self.input_edges(n);
            let srcs: Vec<NodeIndex> = edges
                .iter()
                .map(|&e| self.g.edge_endpoints(e).expect("edge").0)
                .collect();
            let shapes: Vec<Shape> = srcs.iter().map(|&s| self.g[s].shape.clone()).collect();
            for (e, s) in edges.iter().zip(&shapes) {
                self.g[*e].shape = s.clone();
            }
            let node = &self.g[n];
            if edges.len() != node.op.arity() {
                return Err(GraphError::Arity {
                    path: node.path.clone(),
                    op: node.op.name().into(),
                    expected: node.op.arity(),
                    found: edges.len(),
                });
            }
            let refs: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
            let shape = node.op.infer(&refs).map_err(|message| GraphError::Shape {
                path: node.path.clone(),
                op: node.op.name().into(),
                message,
            })?;
            let node = &mut self.g[n];
            if let Op::Attention(a) = &mut node.op {
                a.queries = shapes[0][1];
                a.keys = shapes[1][1];
            }
            node.shape = shape;
        }
        Ok(())
    }

    /// Totals for listings: op count, parameter count, estimated FLOPs.
    pub fn totals(&self) -> (usize, usize, u64) {
        let mut params = 0;
        let mut flops = 0;
        for n in self.g.node_indices() {
            let node = &self.g[n];
            params += node.op.parameters();
            let ins: Vec<&[usize]> = self
                .inputs_of(n)
                .iter()
                .map(|&i| self.g[i].shape.as_slice())
                .collect();
            flops += node.op.flops(&ins, &node.shape);
        }
        (self.g.node_count(), params, flops)
    }
}

/// Adds `id` under `key`, keeping the ids in id order.
fn reindex(map: &mut HashMap<String, Vec<NodeIndex>>, key: &str, id: NodeIndex) {
    let ids = map.entry(key.to_string()).or_default();
    let at = ids.partition_point(|&i| i < id);
    ids.insert(at, id);
}

/// Drops `id` from under `key`.
fn unindex(map: &mut HashMap<String, Vec<NodeIndex>>, key: &str, id: NodeIndex) {
    if let Some(ids) = map.get_mut(key) {
        ids.retain(|&i| i != id);
        if ids.is_empty() {
            map.remove(key);
        }
    }
}

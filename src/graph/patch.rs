//! Patches: what a pass returns instead of mutating the graph itself. A patch adds nodes (fed by
//! existing or new nodes), reroutes the consumers of old nodes to new ones, and removes nodes
//! left without consumers. [`Graph::apply`] applies one; the pass runner checks the graph after
//! each.

use super::{Graph, GraphError, Op, Shape};
use petgraph::stable_graph::NodeIndex;
use std::collections::HashSet;

/// A node a patch reads: one already in the graph, or one the patch adds (by its position).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    Old(NodeIndex),
    New(usize),
}

/// A set of graph edits, applied together.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    /// What the patch does, for listings (`apply Reweight (rewrite 0)`, `fuse: ...`).
    pub label: String,
    /// New nodes in order: path, op, inputs in port order.
    pub nodes: Vec<(String, Op, Vec<Src>)>,
    /// Every consumer of the first node (outside this patch) reads the second instead.
    pub reroute: Vec<(NodeIndex, Src)>,
    /// Input `port` of an existing consumer reads another node.
    pub rewire: Vec<(NodeIndex, usize, Src)>,
    /// Nodes to remove; they must have no consumers left once rerouted.
    pub remove: Vec<NodeIndex>,
}

impl Patch {
    pub fn new(label: impl Into<String>) -> Self {
        Patch {
            label: label.into(),
            ..Default::default()
        }
    }

    /// Adds a node and returns how to refer to it.
    pub fn add(&mut self, path: impl Into<String>, op: Op, inputs: &[Src]) -> Src {
        self.nodes.push((path.into(), op, inputs.to_vec()));
        Src::New(self.nodes.len() - 1)
    }
}

impl Patch {
    /// Checks what the patch wires before anything changes: every new node's arity, and its
    /// shape inferred from its inputs' (an existing node's shape, or a new node's inferred one).
    /// Inputs downstream of a reroute or rewire of this very patch may change shape when it
    /// applies: nodes reading them are left to [`Graph::apply`]'s re-inference. An error names
    /// the node's path and op.
    pub fn check(&self, g: &Graph) -> Result<(), GraphError> {
        // Existing nodes whose shape this patch may change.
        let mut moved: HashSet<NodeIndex> = HashSet::new();
        let mut todo: Vec<NodeIndex> = self.rewire.iter().map(|&(c, _, _)| c).collect();
        for &(old, _) in &self.reroute {
            todo.extend(g.consumers(old));
        }
        while let Some(n) = todo.pop() {
            if g.get(n).is_some() && moved.insert(n) {
                todo.extend(g.consumers(n));
            }
        }
        let mut shapes: Vec<Option<Shape>> = Vec::with_capacity(self.nodes.len());
        for (path, op, inputs) in &self.nodes {
            if inputs.len() != op.arity() {
                return Err(GraphError::Arity {
                    path: path.clone(),
                    op: op.name().into(),
                    expected: op.arity(),
                    found: inputs.len(),
                });
            }
            let known: Option<Vec<&[usize]>> = inputs
                .iter()
                .map(|&s| match s {
                    Src::Old(n) if !moved.contains(&n) => {
                        g.get(n).map(|node| node.shape.as_slice())
                    }
                    Src::Old(_) => None,
                    Src::New(i) => shapes.get(i).and_then(|s| s.as_deref()),
                })
                .collect();
            let shape = match known {
                Some(ins) => Some(op.infer(&ins).map_err(|message| GraphError::Shape {
                    path: path.clone(),
                    op: op.name().into(),
                    message,
                })?),
                None => None,
            };
            shapes.push(shape);
        }
        Ok(())
    }
}

impl Graph {
    /// Checks a patch ([`Patch::check`]), applies it, then re-infers every shape; returns the
    /// indices of the nodes it added.
    pub fn apply(&mut self, patch: &Patch) -> Result<Vec<NodeIndex>, GraphError> {
        patch.check(self)?;
        let mut added: Vec<NodeIndex> = Vec::with_capacity(patch.nodes.len());
        let resolve = |s: Src, added: &[NodeIndex]| match s {
            Src::Old(n) => n,
            Src::New(i) => added[i],
        };
        // Nodes go in unshaped: upstream shapes may change with this very patch.
        for (path, op, inputs) in &patch.nodes {
            let id = self.add_unshaped(path.clone(), op.clone());
            for (port, &s) in inputs.iter().enumerate() {
                self.connect(resolve(s, &added), id, port);
            }
            added.push(id);
        }
        for &(old, new) in &patch.reroute {
            let new = resolve(new, &added);
            for (e, target, port) in self.out_wires(old) {
                if added.contains(&target) {
                    continue;
                }
                self.remove_wire(e);
                self.connect(new, target, port);
            }
        }
        for &(consumer, port, new) in &patch.rewire {
            let new = resolve(new, &added);
            for e in self.in_wires(consumer, port) {
                self.remove_wire(e);
            }
            self.connect(new, consumer, port);
        }
        for &n in &patch.remove {
            self.remove(n);
        }
        self.reinfer()?;
        Ok(added)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::InputSpec;

    fn spec() -> InputSpec {
        InputSpec {
            batch: 1,
            height: 4,
            width: 4,
            text_len: 2,
            timesteps: 1,
            time_ids: 0,
        }
    }

    #[test]
    fn the_path_index_follows_add_apply_and_remove() {
        let mut g = Graph::new(spec());
        let x = g
            .add(
                "x",
                Op::Input {
                    name: "x".into(),
                    shape: vec![1, 4],
                },
                &[],
            )
            .unwrap();
        let a = g.add("blk", Op::Silu, &[x]).unwrap();
        let b = g.add("blk", Op::Silu, &[a]).unwrap();
        assert_eq!(g.by_path("blk"), &[a, b]);
        assert_eq!(g.input("x"), Some(x));
        let mut p = Patch::new("test");
        let c = p.add("other", Op::Silu, &[Src::Old(a)]);
        p.reroute.push((b, c));
        p.remove.push(b);
        let added = g.apply(&p).unwrap();
        assert_eq!(g.by_path("blk"), &[a]);
        assert_eq!(g.by_path("other"), added.as_slice());
        assert_eq!(g.find("other", |o| matches!(o, Op::Silu)), Some(added[0]));
        assert!(g.by_path("missing").is_empty());
        g.check(None).unwrap();
    }

    #[test]
    fn a_patch_checks_what_it_wires_before_the_graph_changes() {
        let mut g = Graph::new(spec());
        let input = |name: &str, shape: Vec<usize>| Op::Input {
            name: name.into(),
            shape,
        };
        let x = g.add("", input("x", vec![1, 4]), &[]).unwrap();
        let y = g.add("", input("y", vec![1, 5]), &[]).unwrap();
        let mut p = Patch::new("bad add");
        let s = p.add("blk.sum", Op::Silu, &[Src::Old(x)]);
        p.add("blk.bad", Op::Add { scale: 1.0 }, &[s, Src::Old(y)]);
        let e = g.apply(&p).unwrap_err().to_string();
        assert!(
            e.starts_with("blk.bad (add): operands [1, 4] and [1, 5] differ"),
            "{e}"
        );
        assert_eq!(g.node_count(), 2, "nothing applied");
        assert!(g.by_path("blk.sum").is_empty());
    }
}

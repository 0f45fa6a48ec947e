//! Hoisting, lossless: the values of a step graph that depend only on the run's constants (the
//! text states `encoder_hidden_states`, SDXL's `text_embeds`/`time_ids`, a reference pass's
//! recorded K/V) are computed once per job by a *prologue* graph instead of at every step. The
//! step graph reads them as inputs (named `hoist.<n>`); every cross-attention `to_k`/`to_v` is
//! among them. Same kernels on the same inputs: the outputs are the unhoisted ones.
//!
//! Try it: `rewire explain rewrites/p2p_store.ron --model models/shapes-sd` ("hoisted").

use crate::graph::keys::Key;
use crate::graph::patch::{Patch, Src};
use crate::graph::{Graph, GraphError, Op};
use petgraph::stable_graph::NodeIndex;
use std::collections::HashSet;

/// Whether a graph input is constant over a run's steps.
pub fn constant_input(name: &str) -> bool {
    matches!(name, "encoder_hidden_states" | "text_embeds" | "time_ids")
        || matches!(Key::parse(name), Key::Reference { .. })
}

/// One value the prologue computes for the step graph.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Hoisted {
    /// The prologue's output and the step graph's input (`hoist.0`, …).
    pub name: String,
    /// The node that makes it (`…attn2.to_k`).
    pub path: String,
    pub op: &'static str,
    pub shape: Vec<usize>,
}

/// A step graph split into the prologue (run once per job) and what remains per step.
#[derive(Debug, Clone)]
pub struct Split {
    pub prologue: Graph,
    pub step: Graph,
    pub values: Vec<Hoisted>,
    /// Nodes moved out of the step graph, and their FLOPs per step.
    pub nodes: usize,
    pub flops: u64,
}

impl Split {
    /// Bytes the hoisted values hold (f32).
    pub fn bytes(&self) -> usize {
        self.values
            .iter()
            .map(|v| v.shape.iter().product::<usize>() * 4)
            .sum()
    }
}

/// Splits `g`; `None` when nothing in it depends only on constants (beyond the inputs).
pub fn split(g: &Graph) -> Result<Option<Split>, GraphError> {
    let order = g.topo()?;
    // Constant nodes: constant inputs, and ops (with inputs) whose inputs are all constant.
    let mut constant: HashSet<NodeIndex> = HashSet::new();
    for &n in &order {
        let node = g.node(n);
        let is = match &node.op {
            Op::Input { name, .. } => constant_input(name),
            Op::Output { .. } => false,
            _ => {
                let ins = g.inputs_of(n);
                !ins.is_empty() && ins.iter().all(|i| constant.contains(i))
            }
        };
        if is {
            constant.insert(n);
        }
    }
    let computed: Vec<NodeIndex> = order
        .iter()
        .copied()
        .filter(|n| constant.contains(n) && !matches!(g.node(*n).op, Op::Input { .. }))
        .collect();
    if computed.is_empty() {
        return Ok(None);
    }
    // The boundary: computed constants read by a per-step node or an output.
    let consumers = |n: NodeIndex| g.consumers(n).collect::<Vec<_>>();
    let boundary: Vec<NodeIndex> = computed
        .iter()
        .copied()
        .filter(|&n| consumers(n).iter().any(|c| !constant.contains(c)))
        .collect();

    let flops = computed
        .iter()
        .map(|&n| {
            let ins: Vec<&[usize]> = g
                .inputs_of(n)
                .iter()
                .map(|&i| g.node(i).shape.as_slice())
                .collect();
            g.node(n).op.flops(&ins, &g.node(n).shape)
        })
        .sum();
    let values: Vec<Hoisted> = boundary
        .iter()
        .enumerate()
        .map(|(k, &n)| Hoisted {
            name: Key::Hoisted(k).to_string(),
            path: g.node(n).path.clone(),
            op: g.node(n).op.name(),
            shape: g.node(n).shape.clone(),
        })
        .collect();

    // The prologue: the graph with its outputs replaced by one per boundary value.
    let mut prologue = g.clone();
    let mut p = Patch::new("hoist: the prologue computes the run constants once");
    for (v, &n) in values.iter().zip(&boundary) {
        p.add(
            "",
            Op::Output {
                name: v.name.clone(),
            },
            &[Src::Old(n)],
        );
    }
    p.remove = prologue.outputs().into_iter().map(|(_, n)| n).collect();
    prologue.apply(&p)?;
    prune(&mut prologue)?;

    // The step graph: each boundary value read from an input.
    let mut step = g.clone();
    let mut p = Patch::new("hoist: steps read the run constants");
    for (v, &n) in values.iter().zip(&boundary) {
        let input = p.add(
            "",
            Op::Input {
                name: v.name.clone(),
                shape: v.shape.clone(),
            },
            &[],
        );
        p.reroute.push((n, input));
    }
    step.apply(&p)?;
    prune(&mut step)?;
    Ok(Some(Split {
        prologue,
        step,
        values,
        nodes: computed.len(),
        flops,
    }))
}

/// Removes every node no output needs.
fn prune(g: &mut Graph) -> Result<(), GraphError> {
    let mut live = HashSet::new();
    let mut stack: Vec<NodeIndex> = g.outputs().into_iter().map(|(_, n)| n).collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(g.inputs_of(n));
        }
    }
    let mut p = Patch::new("prune");
    p.remove = g.nodes().filter(|n| !live.contains(n)).collect();
    if !p.remove.is_empty() {
        g.apply(&p)?;
    }
    g.check(None)
}

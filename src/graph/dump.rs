//! Readable dumps of a graph: text for a terminal, DOT to render, JSON for programs.
//!
//! Try it: `rewire graph models/tiny-sd --format dot | dot -Tsvg > unet.svg`.

use super::{Graph, Op};
use serde_json::json;
use std::fmt::Write;

fn op_detail(op: &Op) -> String {
    match op {
        Op::Input { name, .. } => name.clone(),
        Op::Output { name } => name.clone(),
        Op::Linear {
            in_features,
            out_features,
            ..
        } => format!("{in_features}→{out_features}"),
        Op::Conv2d {
            in_channels,
            out_channels,
            kernel,
            stride,
            ..
        } => format!("{in_channels}→{out_channels} k{kernel} s{stride}"),
        Op::GroupNorm { groups, .. } => format!("groups {groups}"),
        Op::Resnet {
            in_channels,
            out_channels,
            ..
        } => format!("{in_channels}→{out_channels}"),
        Op::Attention(a) => format!(
            "{} {} heads {}×{} q {} k {}",
            a.kind, a.place, a.heads, a.head_dim, a.queries, a.keys
        ),
        Op::Add { scale } if *scale != 1.0 => format!("×{scale}"),
        Op::Concat { axis } => format!("axis {axis}"),
        _ => String::new(),
    }
}

/// One line per node in topological order: index, op, path, detail, inputs, output shape.
pub fn text(graph: &Graph) -> String {
    let order = graph.topo().unwrap_or_default();
    let pos: std::collections::HashMap<_, _> =
        order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut s = String::new();
    for (i, &n) in order.iter().enumerate() {
        let node = graph.node(n);
        let ins: Vec<String> = graph
            .inputs_of(n)
            .iter()
            .map(|j| format!("%{}", pos[j]))
            .collect();
        let _ = writeln!(
            s,
            "%{i:<4} {:<13} {:<55} {:<28} ({}) -> {:?}",
            node.op.name(),
            if node.path.is_empty() {
                "-"
            } else {
                &node.path
            },
            op_detail(&node.op),
            ins.join(", "),
            node.shape
        );
    }
    let (ops, params, flops) = graph.totals();
    let _ = writeln!(
        s,
        "{ops} ops, {params} parameters, {:.3} GFLOP",
        flops as f64 / 1e9
    );
    s
}

/// Graphviz DOT, attention nodes highlighted.
pub fn dot(graph: &Graph) -> String {
    let mut s = String::from("digraph unet {\n  rankdir=TB;\n  node [shape=box, fontsize=10];\n");
    for n in graph.nodes() {
        let node = graph.node(n);
        let style = match node.op {
            Op::Attention(_) => ", style=filled, fillcolor=\"#ffd27f\"",
            Op::Input { .. } | Op::Output { .. } => ", shape=ellipse",
            _ => "",
        };
        let _ = writeln!(
            s,
            "  n{} [label=\"{}\\n{}\\n{:?}\"{style}];",
            n.index(),
            node.op.name(),
            node.path,
            node.shape
        );
    }
    for (a, b, wire) in graph.edges() {
        let _ = writeln!(
            s,
            "  n{} -> n{} [label=\"{:?}\", fontsize=8];",
            a.index(),
            b.index(),
            wire.shape
        );
    }
    s.push_str("}\n");
    s
}

/// JSON: `{"spec", "nodes": [{id, op, path, shape, inputs, detail}], "totals"}`.
pub fn json(graph: &Graph) -> serde_json::Value {
    let order = graph.topo().unwrap_or_default();
    let pos: std::collections::HashMap<_, _> =
        order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let nodes: Vec<_> = order
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let node = graph.node(n);
            json!({
                "id": i,
                "op": node.op.name(),
                "path": node.path,
                "shape": node.shape,
                "inputs": graph.inputs_of(n).iter().map(|j| pos[j]).collect::<Vec<_>>(),
                "attrs": node.op,
            })
        })
        .collect();
    let (ops, params, flops) = graph.totals();
    json!({
        "spec": graph.spec,
        "nodes": nodes,
        "totals": {"ops": ops, "parameters": params, "flops": flops},
    })
}

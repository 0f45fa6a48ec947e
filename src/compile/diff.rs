//! The graph before and after a recipe, per layer: nodes added, removed, and the fusion that
//! fired — as text for a terminal, DOT to render, JSON for programs.
//!
//! Try it: `rewire diff rewrites/p2p_reweight.ron --model models/tiny-sd`.

use super::{Compiled, Segment};
use crate::graph::Graph;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// What changed on one layer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerDiff {
    pub path: String,
    pub rewrites: Vec<usize>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub fusion: super::fuse::Fusion,
    /// Where each added node feeds (`tome_merge → to_k, to_v`).
    pub placed: Vec<String>,
    /// What the K/V rewrites did.
    pub notes: Vec<String>,
}

/// What changed in one segment.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SegmentDiff {
    pub steps: Option<(usize, usize)>,
    pub layers: Vec<LayerDiff>,
    pub outputs_added: Vec<String>,
    pub nodes_before: usize,
    pub nodes_after: usize,
}

fn ops_at(g: &Graph, path: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in g.nodes() {
        let node = g.node(n);
        if node.path == path {
            *m.entry(node.op.name().to_string()).or_insert(0) += 1;
        }
    }
    m
}

fn expand(m: &BTreeMap<String, usize>, other: &BTreeMap<String, usize>) -> Vec<String> {
    let mut v = Vec::new();
    for (op, &n) in m {
        let o = other.get(op).copied().unwrap_or(0);
        for _ in o..n {
            v.push(op.clone());
        }
    }
    v
}

/// Diffs one segment against the untouched graph.
pub fn segment(base: &Graph, seg: &Segment) -> SegmentDiff {
    let layers = seg
        .layers
        .iter()
        .map(|r| {
            let (before, after) = (ops_at(base, &r.path), ops_at(&seg.graph, &r.path));
            let added = expand(&after, &before);
            let g = &seg.graph;
            let mut placed = Vec::new();
            for n in g.nodes() {
                let node = g.node(n);
                let name = node.op.name();
                if node.path != r.path
                    || before.contains_key(name)
                    || !added.iter().any(|a| a == name)
                {
                    continue;
                }
                let mut to: Vec<String> = g
                    .consumers(n)
                    .map(|c| {
                        let cn = g.node(c);
                        let short = cn
                            .path
                            .strip_prefix(&format!("{}.", r.path))
                            .unwrap_or(&cn.path);
                        if short == r.path || short.is_empty() {
                            cn.op.name().to_string()
                        } else {
                            short.to_string()
                        }
                    })
                    .collect();
                to.sort();
                to.dedup();
                placed.push(format!("{name} → {}", to.join(", ")));
            }
            placed.sort();
            LayerDiff {
                path: r.path.clone(),
                rewrites: r.rewrites.clone(),
                added,
                removed: expand(&before, &after),
                fusion: r.fusion.clone(),
                placed,
                notes: r.notes.clone(),
            }
        })
        .collect();
    let base_out: Vec<String> = base.outputs().into_iter().map(|(n, _)| n).collect();
    let mut outputs_added: Vec<String> = seg
        .graph
        .outputs()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !base_out.contains(n))
        .collect();
    outputs_added.sort();
    SegmentDiff {
        steps: seg.steps,
        layers,
        outputs_added,
        nodes_before: base.node_count(),
        nodes_after: seg.graph.node_count(),
    }
}

/// Diffs every segment.
pub fn diff(c: &Compiled) -> Vec<SegmentDiff> {
    c.segments.iter().map(|s| segment(&c.base, s)).collect()
}

fn steps_label(s: Option<(usize, usize)>) -> String {
    match s {
        None => "all steps".into(),
        Some((a, b)) => format!("steps {a}..{b}"),
    }
}

/// A terminal-readable diff.
pub fn text(c: &Compiled) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "recipe \"{}\" — batch {}, latent {}×{}, text {}",
        c.recipe, c.spec.batch, c.spec.height, c.spec.width, c.spec.text_len
    );
    for d in diff(c) {
        let _ = writeln!(
            s,
            "\n== {} — {} layers rewritten, nodes {} → {}",
            steps_label(d.steps),
            d.layers.len(),
            d.nodes_before,
            d.nodes_after
        );
        for l in &d.layers {
            let _ = writeln!(s, "{}  (rewrites {:?})", l.path, l.rewrites);
            if !l.added.is_empty() {
                let _ = writeln!(s, "  + {}", l.added.join(", "));
            }
            if !l.removed.is_empty() {
                let _ = writeln!(s, "  - {}", l.removed.join(", "));
            }
            for p in &l.placed {
                let _ = writeln!(s, "    {p}");
            }
            for n in &l.notes {
                let _ = writeln!(s, "  * {n}");
            }
            let _ = writeln!(s, "  ~ {}", l.fusion);
        }
        if !d.outputs_added.is_empty() {
            let _ = writeln!(s, "outputs added: {}", d.outputs_added.join(", "));
        }
    }
    s
}

/// JSON for programs.
pub fn json(c: &Compiled) -> serde_json::Value {
    serde_json::json!({
        "recipe": c.recipe,
        "spec": c.spec,
        "segments": diff(c),
    })
}

/// DOT: each rewritten layer as a cluster of its nodes after the rewrite, new nodes green,
/// removed nodes listed red.
pub fn dot(c: &Compiled) -> String {
    let mut s =
        String::from("digraph rewire_diff {\n  rankdir=LR;\n  node [shape=box, fontsize=10];\n");
    for (si, (seg, d)) in c.segments.iter().zip(diff(c)).enumerate() {
        for (li, l) in d.layers.iter().enumerate() {
            let _ = writeln!(
                s,
                "  subgraph cluster_{si}_{li} {{\n    label=\"{} — {}\";",
                l.path,
                steps_label(seg.steps)
            );
            let g = &seg.graph;
            let mut added = l.added.clone();
            for &n in g.by_path(&l.path) {
                let name = g.node(n).op.name();
                let fresh = if let Some(p) = added.iter().position(|a| a == name) {
                    added.remove(p);
                    true
                } else {
                    false
                };
                let color = if fresh {
                    ", style=filled, fillcolor=\"#b6f2b6\""
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    "    s{si}n{} [label=\"{name}\\n{:?}\"{color}];",
                    n.index(),
                    g.node(n).shape
                );
                for src in g.inputs_of(n) {
                    if g.node(src).path == l.path {
                        let _ = writeln!(s, "    s{si}n{} -> s{si}n{};", src.index(), n.index());
                    }
                }
            }
            for (ri, r) in l.removed.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "    s{si}r{li}_{ri} [label=\"removed: {r}\", style=\"filled,dashed\", fillcolor=\"#f6b6b6\"];"
                );
            }
            let _ = writeln!(
                s,
                "    s{si}f{li} [shape=note, label=\"{}\"];",
                l.fusion.to_string().replace('"', "'")
            );
            s.push_str("  }\n");
        }
    }
    s.push_str("}\n");
    s
}

//! The text and JSON the inspecting commands print, as values: `inspect`'s attention table,
//! `check`'s summary, `explain`'s per-layer account (rewrites, fusion, cache, hoisting, state
//! kept across steps). The command line prints them.
//!
//! Try it: `cargo run --release -- explain rewrites/p2p_store.ron --model models/tiny-sd`.

use crate::compile::{self, Compiled};
use crate::graph::Graph;
use crate::recipe::Source;
use crate::unet::UNet;
use serde_json::json;
use std::fmt::Write;
use std::path::Path;

/// One line into a String (writing to a String cannot fail).
macro_rules! out {
    ($o:expr, $($t:tt)*) => {{
        let _ = writeln!($o, $($t)*);
    }};
}

/// `inspect` as JSON: the attention layers and the graph's totals.
pub fn inspect_json(unet: &UNet, graph: &Graph) -> serde_json::Value {
    let layers = graph.attention_layers();
    let (ops, params, flops) = graph.totals();
    let attention: Vec<_> = layers
        .iter()
        .map(|(_, path, a)| {
            json!({
                "path": path, "kind": a.kind, "place": a.place, "heads": a.heads,
                "head_dim": a.head_dim, "queries": a.queries, "keys": a.keys,
                "grid": [a.grid.0, a.grid.1], "downsample": a.downsample,
            })
        })
        .collect();
    json!({
        "model": unet.dir, "spec": graph.spec, "attention": attention,
        "totals": {"ops": ops, "parameters": params, "flops": flops, "attention_layers": layers.len()},
    })
}

/// `inspect` as a table: one row per attention layer, then the totals.
pub fn inspect_text(unet: &UNet, graph: &Graph) -> String {
    let mut o = String::new();
    let layers = graph.attention_layers();
    let (ops, params, flops) = graph.totals();
    let s = graph.spec;
    out!(
        o,
        "{} — batch {}, latent {}×{}, text {}",
        unet.dir.display(),
        s.batch,
        s.height,
        s.width,
        s.text_len
    );
    out!(
        o,
        "{:<58} {:<5} {:<4} {:>5} {:>14}",
        "attention layer",
        "kind",
        "place",
        "heads",
        "queries×keys"
    );
    for (_, path, a) in &layers {
        out!(
            o,
            "{:<58} {:<5} {:<4} {:>5} {:>14}",
            path,
            a.kind.to_string(),
            a.place.to_string(),
            a.heads,
            format!("{}×{}", a.queries, a.keys)
        );
    }
    out!(
        o,
        "{} attention layers, {ops} ops, {params} parameters ({:.1} M), {:.3} GFLOP per forward",
        layers.len(),
        params as f64 / 1e6,
        flops as f64 / 1e9
    );
    o
}

/// `check`'s line: the rewrites, the layers they land on and the step segments.
pub fn check_line(recipe: &Path, src: &Source, c: &Compiled) -> String {
    let layers: std::collections::BTreeSet<&str> = c
        .segments
        .iter()
        .flat_map(|s| s.layers.iter().map(|l| l.path.as_str()))
        .collect();
    format!(
        "{}: ok — {} rewrites on {} attention layers, {} step segment{}",
        recipe.display(),
        src.recipe.rewrites.len(),
        layers.len(),
        c.segments.len(),
        if c.segments.len() == 1 { "" } else { "s" }
    )
}

/// For a recipe with passes: which one `explain` shows (`pass`, else the last), e.g.
/// `pass "edit" of invert → edit (--pass NAME for another)`.
pub fn pass_line(src: &Source, pass: Option<&str>) -> Option<String> {
    let mut passes: Vec<&str> = Vec::new();
    for p in src.recipe.rewrites.iter().filter_map(|r| r.pass.as_deref()) {
        if !passes.contains(&p) {
            passes.push(p);
        }
    }
    let last = passes.last()?;
    Some(format!(
        "pass \"{}\" of {} (--pass NAME for another)",
        pass.unwrap_or(last),
        passes.join(" → ")
    ))
}

/// `explain` as text: per step segment and layer, the rewrites that landed and the fusion;
/// the cache, the hoisted values and the state kept across steps.
pub fn explain(c: &Compiled) -> String {
    let mut o = String::new();
    let total = c.base.attention_layers().len();
    out!(o, "recipe \"{}\"", c.recipe);
    for seg in &c.segments {
        let steps = match seg.steps {
            None => "all steps".to_string(),
            Some((a, b)) => format!("steps {a}..{b}"),
        };
        out!(
            o,
            "\n== {steps}: {} of {total} attention layers rewritten",
            seg.layers.len()
        );
        for l in &seg.layers {
            let landed: Vec<String> = l
                .rewrites
                .iter()
                .zip(&l.ops)
                .map(|(i, op)| format!("{op} (rewrite {i})"))
                .collect();
            out!(o, "{}\n  landed: {}", l.path, landed.join(" → "));
            for n in &l.notes {
                out!(o, "  {n}");
            }
            out!(o, "  {}", l.fusion);
            if !l.materialised.is_empty() {
                out!(
                    o,
                    "  probabilities materialised for batch items {:?}",
                    l.materialised
                );
            }
        }
    }
    if !c.unbound_words.is_empty() {
        out!(
            o,
            "\nrewrites {:?} reweight words: they bind to token positions when a prompt is given",
            c.unbound_words
        );
    }
    if let Some(d) = &c.cache {
        let full: Vec<String> = match c.steps {
            Some(n) => (0..n)
                .filter(|&i| d.full(i))
                .map(|i| i.to_string())
                .collect(),
            None => vec![format!("0, {}, {}, …", d.interval, 2 * d.interval)],
        };
        out!(
            o,
            "\ncache (rewrite {}): DeepCache, branch {}, a full step every {} steps (steps {})",
            d.rewrite,
            d.branch,
            d.interval,
            full.join(", ")
        );
        out!(
            o,
            "  full steps record the features entering {} (the output of {}, {:?})",
            d.resume,
            d.feature,
            d.shape
        );
        for seg in &c.segments {
            if let Some(g) = &seg.cached {
                let (fnodes, _, fflops) = seg.graph.totals();
                let (cnodes, _, cflops) = g.totals();
                out!(
                    o,
                    "  cached steps{} run {cnodes} of {fnodes} nodes, {:.2} of {:.2} GFLOP ({:.0}%)",
                    match seg.steps {
                        None => String::new(),
                        Some((a, b)) => format!(" in {a}..{b}"),
                    },
                    cflops as f64 / 1e9,
                    fflops as f64 / 1e9,
                    100.0 * cflops as f64 / fflops.max(1) as f64
                );
            }
        }
    }
    // Hoisting: what each graph of the run computes once per job instead of at every step.
    let graphs = run_graphs(c);
    for (when, g) in graphs {
        match compile::hoist::split(g) {
            Ok(Some(h)) => {
                out!(
                    o,
                    "\nhoisted ({when}): {} nodes computed once per job instead of at every step ({:.1} MFLOP per step), {} values held ({}):",
                    h.nodes,
                    h.flops as f64 / 1e6,
                    h.values.len(),
                    bytes(h.bytes())
                );
                for v in &h.values {
                    out!(o, "  {} [{}] {:?}", v.path, v.op, v.shape);
                }
            }
            Ok(None) => out!(
                o,
                "\nhoisted ({when}): nothing (no value depends only on the run's constants)"
            ),
            Err(e) => out!(o, "\nhoisted ({when}): not computed ({e})"),
        }
    }
    let slots = compile::state::slots(c);
    if !slots.is_empty() {
        out!(o, "\nstate kept across steps and passes:");
        let mut total = 0;
        for s in &slots {
            total += s.bytes;
            if let compile::state::SlotKind::Read { store, steps } = &s.kind {
                let at: Vec<String> = steps
                    .iter()
                    .map(|r| match r {
                        Some((a, b)) => format!("{a}..{b}"),
                        None => "every step".into(),
                    })
                    .collect();
                out!(
                    o,
                    "  {} {:?}: reads store \"{store}\" at steps {} ({} per step); {}",
                    s.name,
                    s.shape,
                    at.join(", "),
                    bytes(s.bytes_per_step),
                    s.freed()
                );
                continue;
            }
            let writes = match s.writes {
                Some(0) => "recorded once, before the first step".to_string(),
                Some(w) => format!(
                    "written at {w} steps ({} per step)",
                    bytes(s.bytes_per_step)
                ),
                None => "written at each step it is active in".to_string(),
            };
            out!(
                o,
                "  {} {:?}: {}; {writes}; {}",
                s.name,
                s.shape,
                bytes(s.bytes),
                s.freed()
            );
        }
        // Per store: what a step and a frame (batch item) cost, and the whole.
        let mut per: std::collections::BTreeMap<String, (usize, usize, usize)> = Default::default();
        for s in &slots {
            if let Some((name, rows)) = s.store() {
                let e = per.entry(name).or_default();
                e.0 += s.bytes_per_step;
                e.1 += s.bytes_per_step / rows.max(1);
                e.2 += s.bytes;
            }
        }
        for (name, (step, frame, all)) in per {
            out!(
                o,
                "  store \"{name}\": {} per step ({} per frame and step), {} in all",
                bytes(step),
                bytes(frame),
                bytes(all)
            );
        }
        out!(o, "  total held: {}", bytes(total));
    }
    o
}

/// The graphs a run of `c` lowers, each with when it runs.
pub fn run_graphs(c: &Compiled) -> Vec<(String, &Graph)> {
    let mut graphs: Vec<(String, &Graph)> = Vec::new();
    for seg in &c.segments {
        let when = match seg.steps {
            None => "all steps".to_string(),
            Some((a, b)) => format!("steps {a}..{b}"),
        };
        match &seg.cached {
            None => graphs.push((when, &seg.graph)),
            Some(g) => {
                graphs.push((format!("{when}, full steps"), &seg.graph));
                graphs.push((format!("{when}, cached steps"), g));
            }
        }
    }
    graphs
}

/// `explain` for programs: the same facts as the text, typed.
pub fn explain_json(c: &Compiled) -> serde_json::Value {
    let segments: Vec<serde_json::Value> = c
        .segments
        .iter()
        .map(|s| {
            let cached = s.cached.as_ref().map(|g| {
                let (fnodes, _, fflops) = s.graph.totals();
                let (cnodes, _, cflops) = g.totals();
                json!({"nodes": cnodes, "flops": cflops, "full_nodes": fnodes, "full_flops": fflops})
            });
            let layers: Vec<serde_json::Value> = s
                .layers
                .iter()
                .map(|l| {
                    let mut v = serde_json::to_value(l).unwrap_or_default();
                    v["fusion_text"] = l.fusion.to_string().into();
                    v
                })
                .collect();
            json!({"steps": s.steps, "layers": layers, "cached_steps": cached})
        })
        .collect();
    let hoisted: Vec<serde_json::Value> = run_graphs(c)
        .into_iter()
        .map(|(when, g)| match compile::hoist::split(g) {
            Ok(Some(h)) => json!({
                "graph": when,
                "nodes": h.nodes,
                "flops_per_step": h.flops,
                "bytes": h.bytes(),
                "values": h.values,
            }),
            Ok(None) => json!({"graph": when, "nodes": 0, "values": []}),
            Err(e) => json!({"graph": when, "error": e.to_string()}),
        })
        .collect();
    let full_steps: Option<Vec<usize>> = match (&c.cache, c.steps) {
        (Some(d), Some(n)) => Some((0..n).filter(|&i| d.full(i)).collect()),
        _ => None,
    };
    json!({
        "recipe": c.recipe,
        "spec": c.spec,
        "steps": c.steps,
        "segments": segments,
        "unbound_words": c.unbound_words,
        "cache": c.cache,
        "cache_full_steps": full_steps,
        "hoisted": hoisted,
        "state": compile::state::slots(c),
    })
}

/// A byte count in B, KiB or MiB.
pub fn bytes(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

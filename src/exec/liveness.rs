//! Which values are alive when, as a plan runs a graph: the run order (`schedule`: only the
//! nodes an output needs, each node's slot, the last step reading each slot), and from it the
//! activation memory, the most bytes of values alive at once. [`activation_bytes`] estimates it
//! from the graph alone, without lowering (`video edit` checks a job's memory with it before it
//! allocates); [`Plan::peak_bytes`] reads it from a lowered plan. Both count f32 values, not
//! weights or a kernel's own scratch, and agree on the same graph.
//!
//! Try it: `cargo test --release --lib exec::liveness`.

use super::{ExecError, Plan};
use crate::graph::{Graph, Op};
use std::collections::HashMap;

/// The order a plan runs a graph's nodes in (only what an output needs: a reference pass stops
/// at its last record), each node's slot, and the last step reading each slot.
#[allow(clippy::type_complexity)]
pub(super) fn schedule(
    graph: &Graph,
) -> Result<
    (
        Vec<petgraph::stable_graph::NodeIndex>,
        HashMap<petgraph::stable_graph::NodeIndex, usize>,
        Vec<usize>,
    ),
    ExecError,
> {
    let mut live = std::collections::HashSet::new();
    let mut stack: Vec<_> = graph.outputs().into_iter().map(|(_, n)| n).collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(graph.inputs_of(n));
        }
    }
    let order: Vec<_> = graph
        .topo()?
        .into_iter()
        .filter(|n| live.contains(n))
        .collect();
    let slot: HashMap<_, _> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut last_reader = vec![usize::MAX; order.len()];
    for (i, &n) in order.iter().enumerate() {
        for src in graph.inputs_of(n) {
            last_reader[slot[&src]] = i;
        }
    }
    Ok((order, slot, last_reader))
}

/// The most bytes of values alive at once while a plan of `graph` runs ([`Plan::peak_bytes`]),
/// without lowering it.
pub fn activation_bytes(graph: &Graph) -> Result<usize, ExecError> {
    let (order, slot, last_reader) = schedule(graph)?;
    let bytes: Vec<usize> = order
        .iter()
        .map(|&n| match graph.node(n).op {
            Op::Output { .. } => 0,
            _ => graph.node(n).shape.iter().product::<usize>() * 4,
        })
        .collect();
    let (mut live, mut peak) = (0usize, 0usize);
    for (i, &n) in order.iter().enumerate() {
        live += bytes[i];
        peak = peak.max(live);
        let mut seen = Vec::new();
        for src in graph.inputs_of(n) {
            let s = slot[&src];
            if last_reader[s] == i && !seen.contains(&s) {
                seen.push(s);
                live = live.saturating_sub(bytes[s]);
            }
        }
    }
    Ok(peak)
}

impl Plan {
    /// The most bytes of values alive at once while the plan runs (f32; weights and a kernel's
    /// own scratch not counted): the activation memory a run needs, known before it allocates.
    pub fn peak_bytes(&self) -> usize {
        let (mut live, mut peak) = (0usize, 0usize);
        for st in &self.steps {
            live += st.bytes;
            peak = peak.max(live);
            for (&slot, &last) in st.inputs.iter().zip(&st.last_use) {
                if last {
                    live = live.saturating_sub(self.steps[slot].bytes);
                }
            }
        }
        peak
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::LowerOptions;
    use crate::graph::InputSpec;
    use crate::weights::RandomWeights;

    /// `x → a = x + x → b = a + x → out`: `x`, `a` and `b` are alive at once at `b`.
    #[test]
    fn the_estimate_is_the_lowered_plans_peak() {
        let mut g = Graph::new(InputSpec {
            batch: 1,
            height: 4,
            width: 4,
            text_len: 2,
            timesteps: 1,
            time_ids: 0,
        });
        let input = Op::Input {
            name: "x".into(),
            shape: vec![1, 4, 8, 8],
        };
        let x = g.add("x", input, &[]).unwrap();
        let a = g.add("a", Op::Add { scale: 1.0 }, &[x, x]).unwrap();
        let b = g.add("b", Op::Add { scale: 1.0 }, &[a, x]).unwrap();
        g.add("out", Op::Output { name: "out".into() }, &[b])
            .unwrap();
        let estimate = activation_bytes(&g).unwrap();
        assert_eq!(estimate, 3 * 256 * 4);
        let device = crate::backend::default_device().expect("a compiled backend");
        let plan = Plan::lower(&g, &RandomWeights::new(0), &device, LowerOptions::default());
        assert_eq!(plan.unwrap().peak_bytes(), estimate);
    }
}

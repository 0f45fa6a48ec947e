//! The state a compiled recipe keeps across the steps and passes of a run: a Cache's features
//! (on the device, from one full step to the next), each Store's maps (accumulated over the
//! steps) and each reference pass's recorded K/V inputs (recorded once, read at every step).
//! `rewire explain` prints these slots with their sizes and lifetimes.
//!
//! Try it: `rewire explain rewrites/deepcache.ron --model models/shapes-sd`.

use super::Compiled;
use serde::Serialize;

/// What a state slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum SlotKind {
    /// A Cache's features: written at full steps, read at the cached steps between.
    CacheFeatures { interval: usize },
    /// A Store's maps, combined over the steps it is active in.
    Store { reduce: crate::recipe::Reduce },
    /// A reference pass's K/V input of one layer: recorded before the first step.
    Reference { pass: String },
    /// Maps of a named store read at each step of the segments listed (held by the pass or
    /// the steps that stored them, not by this one).
    Read {
        store: String,
        steps: Vec<Option<(usize, usize)>>,
    },
}

impl Slot {
    /// The store a Store slot belongs to, and its rows (batch items; the frames of a clip).
    pub fn store(&self) -> Option<(String, usize)> {
        if !matches!(self.kind, SlotKind::Store { .. }) {
            return None;
        }
        let key = crate::graph::keys::Key::parse(&self.name);
        let (name, _) = key.store_parts()?;
        let rows = if self.shape.len() == 4 {
            self.shape[0]
        } else {
            1
        };
        Some((name.to_string(), rows))
    }
}

/// One slot of run state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Slot {
    /// The graph output or input that carries it (`cache.features`, `probs.<layer>`,
    /// `ref.<pass>.<layer>`).
    pub name: String,
    pub kind: SlotKind,
    pub shape: Vec<usize>,
    /// Bytes held (f32).
    pub bytes: usize,
    /// Bytes written per step that writes it.
    pub bytes_per_step: usize,
    /// Steps of the run that write it (`None`: the run's length is not known).
    pub writes: Option<usize>,
}

impl Slot {
    /// When the slot is freed, in words.
    pub fn freed(&self) -> &'static str {
        match self.kind {
            SlotKind::CacheFeatures { .. } => {
                "replaced at each full step, freed when the denoising loop ends"
            }
            SlotKind::Store {
                reduce: crate::recipe::Reduce::Each,
            } => {
                "every step's maps kept (on the device, or in the spill file with on: Disk) for the later pass that reads them at the same timestep; freed when the job ends"
            }
            SlotKind::Store { .. } => "written out with the results when the run ends",
            SlotKind::Reference { .. } => "freed when the denoising loop ends",
            SlotKind::Read { .. } => "held by the pass or steps that stored it",
        }
    }
}

/// Every state slot of a compiled recipe (shapes from its graphs).
pub fn slots(c: &Compiled) -> Vec<Slot> {
    let mut out = Vec::new();
    let steps = c.steps;
    if let Some(d) = &c.cache {
        let bytes = d.bytes();
        out.push(Slot {
            name: super::cache::FEATURES.into(),
            kind: SlotKind::CacheFeatures {
                interval: d.interval,
            },
            shape: d.shape.clone(),
            bytes,
            bytes_per_step: bytes,
            writes: steps.map(|n| n.div_ceil(d.interval)),
        });
    }
    for (name, reduce) in &c.stores {
        // The store's shape and the steps that write it, from the segments that output it.
        let mut shape = None;
        let mut writes: Option<usize> = Some(0);
        for s in &c.segments {
            let found = s
                .graph
                .outputs()
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, i)| s.graph.node(i).shape.clone());
            if let Some(sh) = found {
                shape = Some(sh);
                writes = match (writes, s.steps, steps) {
                    (Some(w), Some((a, b)), _) => Some(w.saturating_add(b.saturating_sub(a))),
                    (Some(w), None, Some(n)) => Some(w.saturating_add(n)),
                    _ => None,
                };
            }
        }
        let shape = shape.unwrap_or_default();
        let per_step = shape.iter().product::<usize>() * 4;
        // `reduce: Each` keeps every step's maps; the others one tensor.
        let bytes = match (reduce, writes) {
            (crate::recipe::Reduce::Each, Some(w)) => per_step.saturating_mul(w),
            _ => per_step,
        };
        out.push(Slot {
            name: name.clone(),
            kind: SlotKind::Store { reduce: *reduce },
            shape,
            bytes,
            bytes_per_step: per_step,
            writes,
        });
    }
    // Reads of named state, one slot per input, with the segments that read it.
    let mut reads: Vec<Slot> = Vec::new();
    for seg in &c.segments {
        for (name, i) in seg.graph.inputs() {
            let crate::graph::keys::Key::Stored { name: store, .. } =
                crate::graph::keys::Key::parse(&name)
            else {
                continue;
            };
            let store = store.to_string();
            let shape = seg.graph.node(i).shape.clone();
            match reads.iter_mut().find(|r| r.name == name) {
                Some(Slot {
                    kind: SlotKind::Read { steps, .. },
                    ..
                }) => steps.push(seg.steps),
                _ => reads.push(Slot {
                    bytes_per_step: shape.iter().product::<usize>() * 4,
                    name,
                    kind: SlotKind::Read {
                        store,
                        steps: vec![seg.steps],
                    },
                    shape,
                    bytes: 0,
                    writes: None,
                }),
            }
        }
    }
    out.extend(reads);
    for r in &c.records {
        let shape = c
            .segments
            .iter()
            .find_map(|s| {
                s.graph
                    .inputs()
                    .into_iter()
                    .find(|(n, _)| *n == r.input)
                    .map(|(_, i)| s.graph.node(i).shape.clone())
            })
            .unwrap_or_default();
        let bytes = shape.iter().product::<usize>() * 4;
        out.push(Slot {
            name: r.input.clone(),
            kind: SlotKind::Reference {
                pass: r.name.clone(),
            },
            shape,
            bytes,
            bytes_per_step: 0,
            writes: Some(0),
        });
    }
    out
}

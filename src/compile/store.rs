//! Store outputs over the steps of a run: each `probs.<layer>` reduced as its Store says —
//! the last step's maps, their mean over the steps the rewrite was active in (prompt-to-prompt's
//! AttentionStore), or their sum.
//!
//! The maps a later pass reads ([`Stored`], named state) stay on the device: every step's
//! maps of a `reduce: Each` store by timestep, or a reduced store's result.
//!
//! Try it: the text-to-image loop feeds every step's outputs to a [`StoreAccumulator`];
//! `rewire video edit` keeps the inversion's [`Stored`] maps for the edit.

use crate::exec::{HostTensor, Value};
use crate::graph::keys::Key;
use crate::recipe::Reduce;
use std::collections::BTreeMap;

/// Accumulates the `probs.*` outputs of successive forwards.
#[derive(Debug, Clone, Default)]
pub struct StoreAccumulator {
    reduce: BTreeMap<String, Reduce>,
    acc: BTreeMap<String, (HostTensor, usize)>,
}

impl StoreAccumulator {
    /// `reduce`: output name → how to combine steps (from [`super::Compiled::stores`]).
    pub fn new(reduce: BTreeMap<String, Reduce>) -> Self {
        StoreAccumulator {
            reduce,
            acc: BTreeMap::new(),
        }
    }

    /// Adds one step's outputs (other outputs than stores are ignored).
    pub fn add(&mut self, outputs: &std::collections::HashMap<String, HostTensor>) {
        for (name, t) in outputs {
            let Some(&how) = self.reduce.get(name) else {
                continue;
            };
            match self.acc.get_mut(name) {
                Some((sum, n)) if how != Reduce::Last && sum.shape == t.shape => {
                    sum.data.iter_mut().zip(&t.data).for_each(|(a, b)| *a += b);
                    *n += 1;
                }
                _ => {
                    self.acc.insert(name.clone(), (t.clone(), 1));
                }
            }
        }
    }

    /// What output `name` holds so far (reduced as its store says), if any step wrote it.
    pub fn current(&self, name: &str) -> Option<HostTensor> {
        let (t, n) = self.acc.get(name)?;
        let mut t = t.clone();
        if self.reduce.get(name) == Some(&Reduce::Mean) && *n > 1 {
            t.data.iter_mut().for_each(|x| *x /= *n as f32);
        }
        Some(t)
    }

    /// The reduced maps, by output name.
    pub fn finish(self) -> BTreeMap<String, HostTensor> {
        let reduce = self.reduce;
        self.acc
            .into_iter()
            .map(|(name, (mut t, n))| {
                if reduce.get(&name) == Some(&Reduce::Mean) && n > 1 {
                    t.data.iter_mut().for_each(|x| *x /= n as f32);
                }
                (name, t)
            })
            .collect()
    }
}

/// Maps a pass stored for later steps and passes to read (named state): by store name and
/// layer, the maps of every timestep (`reduce: Each`) or one reduced tensor. They stay on the
/// device.
#[derive(Clone, Default)]
pub struct Stored {
    maps: BTreeMap<(String, String), Kept>,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Stored({} slots, {} bytes)",
            self.maps.len(),
            self.bytes()
        )
    }
}

#[derive(Clone)]
enum Kept {
    Each(Vec<(f64, Value)>),
    Reduced(Box<Value>),
}

/// Reading named state that is not there.
#[derive(Debug, thiserror::Error)]
pub enum StoredError {
    #[error(
        "`{input}`: no pass stored \"{name}\" for layer {layer}\n  hint: run the pass that writes it first (for `rewire video edit`: the inversion)"
    )]
    Missing {
        input: String,
        name: String,
        layer: String,
    },
    #[error(
        "`{input}`: \"{name}\" holds no maps at timestep {t} (stored at {stored:?})\n  hint: a pass reads a `reduce: Each` store at its own timesteps: give both passes the same step count"
    )]
    Timestep {
        input: String,
        name: String,
        t: f64,
        stored: Vec<f64>,
    },
    #[error(
        "`{input}`: the stored maps are {found:?}; the reading graph needs {expected:?}\n  hint: the passes' batches differ: the rewrite's branch must have as many items as the store recorded"
    )]
    Shape {
        input: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
}

impl Stored {
    /// Whether anything is stored.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Takes the Store outputs out of one step's kept device values: those of `reduce: Each`
    /// stores are kept under timestep `t`.
    pub fn record(&mut self, t: f64, kept: &mut crate::exec::State, each: &[String]) {
        for key in each {
            let Some(v) = kept.remove(key) else { continue };
            let Some((name, layer)) = Key::parse(key).store_parts() else {
                continue;
            };
            let e = self
                .maps
                .entry((name.to_string(), layer.to_string()))
                .or_insert_with(|| Kept::Each(Vec::new()));
            match e {
                Kept::Each(list) => list.push((t, v)),
                Kept::Reduced(_) => *e = Kept::Each(vec![(t, v)]),
            }
        }
    }

    /// Keeps a reduced store's maps (output name `probs.<layer>` or `stored.<name>.<layer>`).
    pub fn insert_reduced(&mut self, key: &str, t: &HostTensor, device: &burn::tensor::Device) {
        if let Some((name, layer)) = Key::parse(key).store_parts() {
            self.maps.insert(
                (name.to_string(), layer.to_string()),
                Kept::Reduced(Box::new(Value::from_host(t, device))),
            );
        }
    }

    /// The value of graph input `input` (`stored.<name>.<layer>`, shape `shape`) at timestep
    /// `t`; `None` when `input` is not a stored read.
    pub fn read(&self, input: &str, t: f64, shape: &[usize]) -> Option<Result<Value, StoredError>> {
        let Key::Stored { name, layer } = Key::parse(input) else {
            return None;
        };
        let Some(kept) = self.maps.get(&(name.to_string(), layer.to_string())) else {
            return Some(Err(StoredError::Missing {
                input: input.into(),
                name: name.into(),
                layer: layer.into(),
            }));
        };
        let v = match kept {
            Kept::Reduced(v) => v.as_ref(),
            Kept::Each(list) => match list.iter().find(|(s, _)| (s - t).abs() < 1e-6) {
                Some((_, v)) => v,
                None => {
                    return Some(Err(StoredError::Timestep {
                        input: input.into(),
                        name: name.into(),
                        t,
                        stored: list.iter().map(|(s, _)| *s).collect(),
                    }));
                }
            },
        };
        let found = v.dims();
        let ok =
            found.iter().product::<usize>() == shape.iter().product::<usize>() && shape.len() == 4;
        if !ok {
            return Some(Err(StoredError::Shape {
                input: input.into(),
                found,
                expected: shape.to_vec(),
            }));
        }
        let dims = [shape[0], shape[1], shape[2], shape[3]];
        Some(Ok(match v.clone() {
            Value::R4(x) => Value::R4(x.reshape(dims)),
            Value::R3(x) => Value::R4(x.reshape(dims)),
            Value::R2(x) => Value::R4(x.reshape(dims)),
            Value::R1(x) => Value::R4(x.reshape(dims)),
            p @ Value::Plan(_) => p,
        }))
    }

    /// Bytes held (f32), and the number of (store, layer) slots.
    pub fn bytes(&self) -> usize {
        let one = |v: &Value| v.dims().iter().product::<usize>() * 4;
        self.maps
            .values()
            .map(|k| match k {
                Kept::Each(list) => list.iter().map(|(_, v)| one(v)).sum(),
                Kept::Reduced(v) => one(v),
            })
            .sum()
    }

    /// The stored (name, layer) pairs.
    pub fn slots(&self) -> impl Iterator<Item = (&str, &str)> {
        self.maps.keys().map(|(n, l)| (n.as_str(), l.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_sum_and_last_over_steps() {
        let reduce: BTreeMap<String, Reduce> = [
            ("probs.a".to_string(), Reduce::Mean),
            ("probs.b".to_string(), Reduce::Sum),
            ("probs.c".to_string(), Reduce::Last),
        ]
        .into();
        let mut acc = StoreAccumulator::new(reduce);
        for step in [1.0f32, 3.0] {
            let outs = ["probs.a", "probs.b", "probs.c", "out"]
                .iter()
                .map(|n| {
                    (
                        n.to_string(),
                        HostTensor::new(vec![2], vec![step, 2.0 * step]),
                    )
                })
                .collect();
            acc.add(&outs);
        }
        let r = acc.finish();
        assert_eq!(r["probs.a"].data, vec![2.0, 4.0]);
        assert_eq!(r["probs.b"].data, vec![4.0, 8.0]);
        assert_eq!(r["probs.c"].data, vec![3.0, 6.0]);
        assert!(!r.contains_key("out"));
    }
}

//! Store outputs over the steps of a run: each `probs.<layer>` reduced as its Store says —
//! the last step's maps, their mean over the steps the rewrite was active in (prompt-to-prompt's
//! AttentionStore), or their sum.
//!
//! The maps a later pass reads ([`Stored`], named state): every step's maps of a `reduce: Each`
//! store by timestep (on the device, or in a spill file with `on: Disk`), or a reduced store's
//! result.
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
/// layer, the maps of every timestep (`reduce: Each`) or one reduced tensor, on the device or
/// (`on: Disk`) in a spill file.
#[derive(Clone, Default)]
pub struct Stored {
    maps: BTreeMap<(String, String), Kept>,
    /// The file `on: Disk` stores spill to (anonymous: deleted when the last clone is dropped).
    spill: Option<std::sync::Arc<std::sync::Mutex<Spill>>>,
}

struct Spill {
    file: std::fs::File,
    len: u64,
}

impl Spill {
    fn write(&mut self, t: &HostTensor) -> std::io::Result<u64> {
        use std::io::{Seek, SeekFrom, Write};
        let at = self.len;
        self.file.seek(SeekFrom::Start(at))?;
        let bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.file.write_all(&bytes)?;
        self.len += bytes.len() as u64;
        Ok(at)
    }

    fn read(&mut self, at: u64, shape: &[usize]) -> std::io::Result<HostTensor> {
        use std::io::{Read, Seek, SeekFrom};
        let n: usize = shape.iter().product();
        let mut bytes = vec![0u8; n * 4];
        self.file.seek(SeekFrom::Start(at))?;
        self.file.read_exact(&mut bytes)?;
        let data = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(HostTensor::new(shape.to_vec(), data))
    }
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
    /// Every step's maps in the spill file: (timestep, byte offset, shape).
    Disk(Vec<(f64, u64, Vec<usize>)>),
    Reduced(Box<Value>),
}

/// Reading named state that is not there.
#[derive(Debug, thiserror::Error)]
pub enum StoredError {
    #[error(
        "named state spilled to disk: {0}\n  hint: the spill file lives in the system's temporary folder (TMPDIR): it needs room for the store (`rewire explain` prints its size)"
    )]
    Spill(#[from] std::io::Error),
    #[error(
        "`{input}`: no pass stored \"{name}\" for layer {layer}\n  hint: run the pass that writes it first (for `rewire video edit`: the inversion)"
    )]
    Missing {
        input: String,
        name: String,
        layer: String,
    },
    #[error(
        "`{input}`: \"{name}\" holds no maps at timestep {t} (stored at {stored:?})\n  hint: a pass reads a `reduce: Each` store at its own timesteps: the store must be written at every step the read is active in, with the same scheduler and step count"
    )]
    Timestep {
        input: String,
        name: String,
        t: f64,
        stored: Vec<f64>,
    },
    #[error("`{input}`: {message}\n  hint: {hint}")]
    Mismatch {
        input: String,
        message: String,
        hint: &'static str,
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

    /// Moves the slots of store `name` (every layer) out into their own `Stored`.
    pub fn take(&mut self, name: &str) -> Stored {
        let keys: Vec<(String, String)> = self
            .maps
            .keys()
            .filter(|(n, _)| n == name)
            .cloned()
            .collect();
        let maps: BTreeMap<_, _> = keys
            .into_iter()
            .filter_map(|k| self.maps.remove_entry(&k))
            .collect();
        // The spill file goes along only when a slot taken reads it.
        let spilled = maps.values().any(|k| matches!(k, Kept::Disk(_)));
        Stored {
            maps,
            spill: if spilled { self.spill.clone() } else { None },
        }
    }

    /// Moves `other`'s slots in (replacing slots of the same store and layer). Slots spilled to
    /// disk read one spill file: `other`'s may be taken only when `self` has none or the same.
    pub fn absorb(&mut self, other: Stored) -> Result<(), StoredError> {
        let spilled = other.maps.values().any(|k| matches!(k, Kept::Disk(_)));
        if spilled {
            match (&self.spill, &other.spill) {
                (Some(a), Some(b)) if !std::sync::Arc::ptr_eq(a, b) => {
                    return Err(StoredError::Spill(std::io::Error::other(
                        "two spill files in one store: spill one pass's stores only",
                    )));
                }
                (None, _) => self.spill = other.spill,
                _ => {}
            }
        }
        self.maps.extend(other.maps);
        Ok(())
    }

    /// Takes the Store outputs out of one step's kept device values: those of `reduce: Each`
    /// stores (`each`) are kept under timestep `t`, on the device or, for those in `spill`,
    /// in the spill file.
    pub fn record(
        &mut self,
        t: f64,
        kept: &mut crate::exec::State,
        each: &[String],
        spill: &std::collections::BTreeSet<String>,
    ) -> Result<(), StoredError> {
        for key in each {
            let Some(v) = kept.remove(key) else { continue };
            let Some((name, layer)) = Key::parse(key).store_parts() else {
                continue;
            };
            let slot = (name.to_string(), layer.to_string());
            if spill.contains(key) {
                let file = match &self.spill {
                    Some(f) => f.clone(),
                    None => {
                        let f = std::sync::Arc::new(std::sync::Mutex::new(Spill {
                            file: tempfile::tempfile()?,
                            len: 0,
                        }));
                        self.spill = Some(f.clone());
                        f
                    }
                };
                let h = v.to_host();
                let at = file.lock().expect("the spill file's lock").write(&h)?;
                match self
                    .maps
                    .entry(slot)
                    .or_insert_with(|| Kept::Disk(Vec::new()))
                {
                    Kept::Disk(list) => list.push((t, at, h.shape)),
                    other => *other = Kept::Disk(vec![(t, at, h.shape)]),
                }
                continue;
            }
            match self
                .maps
                .entry(slot)
                .or_insert_with(|| Kept::Each(Vec::new()))
            {
                Kept::Each(list) => list.push((t, v)),
                other => *other = Kept::Each(vec![(t, v)]),
            }
        }
        Ok(())
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
    pub fn read(
        &self,
        input: &str,
        t: f64,
        shape: &[usize],
        device: &burn::tensor::Device,
    ) -> Option<Result<Value, StoredError>> {
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
        let missing = |stored: Vec<f64>| StoredError::Timestep {
            input: input.into(),
            name: name.into(),
            t,
            stored,
        };
        let from_disk;
        let v = match kept {
            Kept::Reduced(v) => v.as_ref(),
            Kept::Each(list) => match list.iter().find(|(s, _)| (s - t).abs() < 1e-6) {
                Some((_, v)) => v,
                None => return Some(Err(missing(list.iter().map(|(s, _)| *s).collect()))),
            },
            Kept::Disk(list) => match list.iter().find(|(s, _, _)| (s - t).abs() < 1e-6) {
                Some((_, at, sh)) => {
                    let file = self.spill.as_ref().expect("a spilled store has its file");
                    let h = match file.lock().expect("the spill file's lock").read(*at, sh) {
                        Ok(h) => h,
                        Err(e) => return Some(Err(e.into())),
                    };
                    from_disk = Value::from_host(&h, device);
                    &from_disk
                }
                None => return Some(Err(missing(list.iter().map(|(s, _, _)| *s).collect()))),
            },
        };
        let found = v.dims();
        if found == shape {
            // (Any rank: a window's carried K/V are `[rows, N, C]`.)
            return Some(Ok(v.clone()));
        }
        // The same maps, with the row axis dropped when there is one row.
        let ok = shape.len() == 4 && shape[0] == 1 && found[..] == shape[1..];
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

    /// Bytes held in memory (f32).
    pub fn bytes(&self) -> usize {
        let one = |v: &Value| v.dims().iter().product::<usize>() * 4;
        self.maps
            .values()
            .map(|k| match k {
                Kept::Each(list) => list.iter().map(|(_, v)| one(v)).sum(),
                Kept::Disk(_) => 0,
                Kept::Reduced(v) => one(v),
            })
            .sum()
    }

    /// Bytes spilled to disk.
    pub fn spilled_bytes(&self) -> u64 {
        self.spill
            .as_ref()
            .map_or(0, |f| f.lock().map_or(0, |f| f.len))
    }

    /// The stored (name, layer) pairs.
    pub fn slots(&self) -> impl Iterator<Item = (&str, &str)> {
        self.maps.keys().map(|(n, l)| (n.as_str(), l.as_str()))
    }
}

/// Checks, before a two-pass job runs, that every `stored.*` input of `later`'s graphs is an
/// output of `earlier`'s graphs with rows and maps of the same shape, and that a `reduce: Each`
/// store is written at every timestep the read is active at (`earlier_t`, `later_t`: the
/// passes' timesteps by step).
pub fn check_passes(
    earlier: &super::Compiled,
    earlier_t: &[f64],
    later: &super::Compiled,
    later_t: &[f64],
) -> Result<(), StoredError> {
    let steps = |r: Option<(usize, usize)>, n: usize| r.map_or(0..n, |(a, b)| a..b.min(n));
    // (name, layer) → (shape, timesteps written)
    let mut written: BTreeMap<(String, String), (Vec<usize>, Vec<f64>)> = BTreeMap::new();
    for seg in &earlier.segments {
        for (out, node) in seg.graph.outputs() {
            let Some((name, layer)) = Key::parse(&out).store_parts() else {
                continue;
            };
            let e = written
                .entry((name.to_string(), layer.to_string()))
                .or_insert_with(|| (seg.graph.node(node).shape.clone(), Vec::new()));
            e.1.extend(steps(seg.steps, earlier_t.len()).filter_map(|i| earlier_t.get(i)));
        }
    }
    for seg in &later.segments {
        for (input, node) in seg.graph.inputs() {
            let Key::Stored { name, layer } = Key::parse(&input) else {
                continue;
            };
            let shape = &seg.graph.node(node).shape;
            let Some((found, at)) = written.get(&(name.to_string(), layer.to_string())) else {
                return Err(StoredError::Missing {
                    input: input.clone(),
                    name: name.into(),
                    layer: layer.into(),
                });
            };
            let fits = found == shape || (shape.first() == Some(&1) && found[..] == shape[1..]);
            if !fits {
                return Err(StoredError::Shape {
                    input: input.clone(),
                    found: found.clone(),
                    expected: shape.clone(),
                });
            }
            let each = earlier.stores.iter().any(|(k, r)| {
                *r == Reduce::Each && Key::parse(k).store_parts() == Some((name, layer))
            });
            if each {
                let need: Vec<f64> = steps(seg.steps, later_t.len())
                    .filter_map(|i| later_t.get(i).copied())
                    .collect();
                if let Some(t) = need
                    .iter()
                    .find(|t| !at.iter().any(|s| (*s - **t).abs() < 1e-6))
                {
                    return Err(StoredError::Mismatch {
                        input: input.clone(),
                        message: format!(
                            "read at timestep {t}, but \"{name}\" is written only at timesteps {at:?}"
                        ),
                        hint: "a `reduce: Each` store is read at the reading step's own timestep: store at every step the read is active in (widen the store's steps or narrow the read's)",
                    });
                }
            }
        }
    }
    Ok(())
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

//! Store outputs over the steps of a run: each `probs.<layer>` reduced as its Store says —
//! the last step's maps, their mean over the steps the rewrite was active in (prompt-to-prompt's
//! AttentionStore), or their sum.
//!
//! Try it: the text-to-image loop feeds every step's outputs to a [`StoreAccumulator`].

use crate::exec::HostTensor;
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

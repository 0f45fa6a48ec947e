//! Where a UNet forward spends its time: each node timed (the device synchronised after it),
//! summed per op kind with FLOP/s and share of the total, as a table or JSON. tract's
//! `--profile` is the model. The numbers are wall time of one process on one machine: compare
//! rows of one profile, or the same command before and after a change.
//!
//! Try it: `rewire profile benches/configs/sd15-unet.json --size 32x32` (a config file runs with
//! deterministic random weights, no download) or `rewire profile models/tiny-sd --json`.

use serde::Serialize;
use std::collections::BTreeMap;

/// One node's time in one run.
#[derive(Debug, Clone, Serialize)]
pub struct StepTime {
    /// The node's diffusers path (the input's name for graph inputs).
    pub path: String,
    /// The op kind (`conv2d`, `attention`, `resnet`, ...).
    pub op: &'static str,
    pub seconds: f64,
    /// Estimated floating-point operations of the node (multiply-adds count two).
    pub flops: u64,
}

/// Totals of one op kind.
#[derive(Debug, Clone, Serialize)]
pub struct OpTotal {
    pub op: &'static str,
    pub nodes: usize,
    pub seconds: f64,
    /// Share of the forward's time, in [0, 1].
    pub share: f64,
    pub flops: u64,
    /// FLOPs per second (0 for ops without arithmetic worth counting).
    pub flops_per_second: f64,
}

/// A profile: the mean over `runs` forwards of each node's time.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub runs: usize,
    /// Wall time of one forward (mean), including what no node accounts for.
    pub seconds: f64,
    pub steps: Vec<StepTime>,
}

impl Profile {
    /// Averages the node times of several runs of one plan (same nodes in the same order).
    pub fn from_runs(runs: Vec<(f64, Vec<StepTime>)>) -> Profile {
        let n = runs.len().max(1) as f64;
        let seconds = runs.iter().map(|r| r.0).sum::<f64>() / n;
        let mut steps: Vec<StepTime> = runs.first().map(|r| r.1.clone()).unwrap_or_default();
        for s in &mut steps {
            s.seconds = 0.0;
        }
        for (_, run) in &runs {
            for (acc, s) in steps.iter_mut().zip(run) {
                acc.seconds += s.seconds / n;
            }
        }
        Profile {
            runs: runs.len(),
            seconds,
            steps,
        }
    }

    /// Per op kind, slowest first.
    pub fn by_op(&self) -> Vec<OpTotal> {
        let mut m: BTreeMap<&'static str, (usize, f64, u64)> = BTreeMap::new();
        for s in &self.steps {
            let e = m.entry(s.op).or_default();
            e.0 += 1;
            e.1 += s.seconds;
            e.2 += s.flops;
        }
        let total = self.seconds.max(f64::MIN_POSITIVE);
        let mut v: Vec<OpTotal> = m
            .into_iter()
            .map(|(op, (nodes, seconds, flops))| OpTotal {
                op,
                nodes,
                seconds,
                share: seconds / total,
                flops,
                flops_per_second: if seconds > 0.0 {
                    flops as f64 / seconds
                } else {
                    0.0
                },
            })
            .collect();
        v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        v
    }

    /// The `n` slowest nodes.
    pub fn slowest(&self, n: usize) -> Vec<&StepTime> {
        let mut v: Vec<&StepTime> = self.steps.iter().collect();
        v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        v.truncate(n);
        v
    }

    /// The profile as JSON: totals, per op kind, every node.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "runs": self.runs,
            "seconds": self.seconds,
            "by_op": self.by_op(),
            "nodes": self.steps,
        })
    }

    /// A table per op kind and the `top` slowest nodes.
    pub fn table(&self, top: usize) -> String {
        let mut s = format!(
            "forward: {:.3} s (mean of {} run{})\n\n{:<16} {:>6} {:>10} {:>7} {:>11}\n",
            self.seconds,
            self.runs,
            if self.runs == 1 { "" } else { "s" },
            "op",
            "nodes",
            "seconds",
            "share",
            "GFLOP/s"
        );
        for o in self.by_op() {
            s += &format!(
                "{:<16} {:>6} {:>10.4} {:>6.1}% {:>11}\n",
                o.op,
                o.nodes,
                o.seconds,
                100.0 * o.share,
                if o.flops > 0 {
                    format!("{:.1}", o.flops_per_second / 1e9)
                } else {
                    "-".into()
                }
            );
        }
        let accounted: f64 = self.steps.iter().map(|s| s.seconds).sum();
        s += &format!(
            "{:<16} {:>6} {:>10.4} {:>6.1}%\n\nslowest nodes:\n",
            "(between nodes)",
            "",
            (self.seconds - accounted).max(0.0),
            100.0 * (self.seconds - accounted).max(0.0) / self.seconds.max(f64::MIN_POSITIVE)
        );
        for n in self.slowest(top) {
            s += &format!(
                "  {:>9.4} s  {:<12} {}\n",
                n.seconds,
                n.op,
                if n.path.is_empty() { "(root)" } else { &n.path }
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(path: &str, op: &'static str, seconds: f64, flops: u64) -> StepTime {
        StepTime {
            path: path.into(),
            op,
            seconds,
            flops,
        }
    }

    #[test]
    fn sums_per_op_and_averages_runs() {
        let run = |k: f64| {
            (
                4.0 * k,
                vec![
                    step("conv_in", "conv2d", 1.0 * k, 2_000_000_000),
                    step("down.0", "conv2d", 1.0 * k, 2_000_000_000),
                    step("attn", "attention", 1.5 * k, 0),
                ],
            )
        };
        let p = Profile::from_runs(vec![run(1.0), run(3.0)]);
        assert_eq!(p.runs, 2);
        assert!((p.seconds - 8.0).abs() < 1e-12);
        let ops = p.by_op();
        assert_eq!(ops[0].op, "conv2d");
        assert_eq!(ops[0].nodes, 2);
        assert!((ops[0].seconds - 4.0).abs() < 1e-12);
        assert!((ops[0].share - 0.5).abs() < 1e-12);
        assert!((ops[0].flops_per_second - 1e9).abs() < 1.0);
        assert_eq!(ops[1].op, "attention");
        assert_eq!(p.slowest(1)[0].path, "attn");
        let t = p.table(2);
        assert!(t.contains("conv2d") && t.contains("50.0%") && t.contains("(between nodes)"));
        assert_eq!(p.to_json()["by_op"][0]["op"], "conv2d");
    }
}

//! Where a UNet forward spends its time: each node timed (the device synchronised after it),
//! summed per op kind with FLOP/s and share of the total, as a table or JSON. tract's
//! `--profile` is the model. The numbers are wall time of one process on one machine: compare
//! rows of one profile, or the same command before and after a change.
//!
//! Try it: `rewire profile benches/configs/sd15-unet.json --size 32x32` (a config file runs with
//! deterministic random weights, no download) or `rewire profile models/tiny-sd --json`.

use crate::compile::{CompileError, CompileOptions, compile_graph};
use crate::config::{ConfigError, UNetConfig};
use crate::exec::{ExecError, HostTensor, LowerOptions, Plan, Value};
use crate::graph::{Graph, GraphError, InputSpec};
use crate::recipe::Source;
use crate::unet::{ModelError, UNet};
use crate::weights::{RandomWeights, WeightSource};
use burn::tensor::Device;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Errors raised while setting up or running a profile.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("--runs must be at least 1")]
    NoRuns,
}

/// What to profile.
#[derive(Debug, Clone)]
pub struct ProfileOptions {
    /// Latent height and width (default: the config's sample_size).
    pub size: Option<(usize, usize)>,
    pub batch: usize,
    /// Timed forwards to average, after one untimed warm-up.
    pub runs: usize,
    pub lower: LowerOptions,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        ProfileOptions {
            size: None,
            batch: 2,
            runs: 1,
            lower: LowerOptions::default(),
        }
    }
}

/// Profiles one UNet forward of `model` (a pipeline or unet/ folder, or a UNet `config.json`
/// run with deterministic random weights), with a recipe's rewrites if given (its first step
/// segment), on random inputs.
pub fn profile_model(
    model: &Path,
    recipe: Option<&Source>,
    opts: &ProfileOptions,
    device: &Device,
) -> Result<Profile, ProfileError> {
    if opts.runs == 0 {
        return Err(ProfileError::NoRuns);
    }
    let random = RandomWeights::new(0);
    let (config, unet) = if model.is_file() {
        let config = UNetConfig::from_file(model)?;
        (config, None)
    } else {
        let unet = UNet::open(model)?;
        (unet.config.clone(), Some(unet))
    };
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(64) as usize;
    let (h, w) = opts.size.unwrap_or(match &config.sample_size {
        Some(serde_json::Value::Array(a)) if a.len() == 2 => (n(&a[0]), n(&a[1])),
        Some(v @ serde_json::Value::Number(_)) => (n(v), n(v)),
        _ => (64, 64),
    });
    let spec = InputSpec::new(opts.batch, h, w);
    spec.check()?;
    let base: Graph = match &unet {
        Some(u) => u.graph(spec)?,
        None => {
            let resolved = config.resolve(model)?;
            let g = crate::unet::build(&resolved, spec)?;
            g.check(None)?;
            g
        }
    };
    let graph = match recipe {
        Some(src) => {
            compile_graph(src, &base, &CompileOptions::default())?
                .segments
                .swap_remove(0)
                .graph
        }
        None => base,
    };
    let weights: &dyn WeightSource = match &unet {
        Some(u) => &u.weights,
        None => &random,
    };
    let plan = Plan::lower(&graph, weights, device, opts.lower)?;
    let inputs = random_inputs(&plan);
    let upload = || -> HashMap<String, Value> {
        inputs
            .iter()
            .map(|(k, t)| (k.clone(), Value::from_host(t, device)))
            .collect()
    };
    let finish = |out: HashMap<String, Value>| {
        // Read the outputs back: the run is over when they are on the host.
        out.into_values().for_each(|v| drop(v.to_host()));
    };
    finish(plan.run(upload())?);
    let mut runs = Vec::with_capacity(opts.runs);
    for _ in 0..opts.runs {
        let given = upload();
        let start = std::time::Instant::now();
        let (out, times) = plan.run_profiled(given)?;
        finish(out);
        runs.push((start.elapsed().as_secs_f64(), times));
    }
    Ok(Profile::from_runs(runs))
}

/// Deterministic random inputs for every input of a plan (`timestep` 500).
fn random_inputs(plan: &Plan) -> HashMap<String, HostTensor> {
    let rw = RandomWeights::new(99);
    plan.input_specs()
        .into_iter()
        .map(|(name, shape)| {
            let data = if name == "timestep" {
                vec![500.0; shape.iter().product()]
            } else {
                rw.values(name, &[shape.iter().product::<usize>(), 1])
            };
            (name.to_string(), HostTensor::new(shape.to_vec(), data))
        })
        .collect()
}

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

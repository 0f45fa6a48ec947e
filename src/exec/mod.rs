//! Lowering a checked graph to an executable plan on a Burn device, and running it. Nodes run
//! in topological order; each value is dropped right after its last consumer (the plan records,
//! per step, which inputs die there), so peak memory follows the live set, not the graph.
//! Kernels are chosen per op at lowering ([`Kernel`]), so an op's implementation can be swapped
//! (e.g. [`AttentionImpl`]) without touching the graph.
//!
//! Try it: `rewire forward models/tiny-sd --inputs tests/fixtures/unet_cases/baseline.safetensors --out /tmp/out.safetensors`.

pub mod cpu_attention;
pub mod cpu_conv;
pub mod cpu_ops;
pub(crate) mod kernels;
pub mod simd;
pub mod tome;

pub mod finite;
pub mod liveness;
pub mod options;

pub use finite::{FiniteCheck, set_default_finite_check};
pub use kernels::{AttentionImpl, Kernel, Value, attend};
pub use liveness::activation_bytes;
pub use options::{LowerOptions, WeightDtype};

use finite::{block_of, default_finite_check, unreachable_finite, value_finite};
use liveness::schedule;

use crate::graph::{Graph, GraphError, Op};
use crate::weights::{WeightError, WeightSource};
use burn::tensor::{Device, Tensor, TensorData};
use std::collections::HashMap;

/// Errors raised while lowering or running a plan.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Weight(#[from] WeightError),
    #[error(
        "missing input `{name}`: the graph needs {expected:?}\n  hint: the inputs file must hold {names}"
    )]
    MissingInput {
        name: String,
        expected: Vec<usize>,
        names: String,
    },
    #[error("input `{name}` has shape {found:?}, the plan was built for {expected:?}")]
    InputShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "{} ({op}) produced a non-finite value (NaN or ±Inf); it is the first node that did\n  hint: {hint}",
        if path.is_empty() { "the graph input" } else { path.as_str() }
    )]
    NonFinite {
        path: String,
        op: String,
        hint: &'static str,
    },
}

/// Kernels with weights already on the device, by node path and op.
#[derive(Debug, Default)]
pub struct KernelCache(HashMap<String, Kernel>);

struct Step {
    label: String,
    path: String,
    op: &'static str,
    /// Estimated FLOPs of the node (for profiles).
    flops: u64,
    /// The last node of a block, an input or an output: checked under [`FiniteCheck::Boundaries`].
    boundary: bool,
    kernel: Kernel,
    inputs: Vec<usize>,
    /// For each input: true when this step is its last reader (the value is moved, then gone).
    last_use: Vec<bool>,
    /// Bytes of the value it makes (f32; 0 for an output, which passes its input on).
    bytes: usize,
}

/// Named device tensors kept between plan runs (a Cache's features, for one).
pub type State = HashMap<String, Value>;

/// An executable plan: kernels with their weights on a device, in order.
pub struct Plan {
    device: Device,
    steps: Vec<Step>,
    /// Input name → (slot, expected shape).
    inputs: Vec<(String, usize, Vec<usize>)>,
    /// Output name → slot.
    outputs: Vec<(String, usize)>,
    check: FiniteCheck,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Plan({} steps on {:?})", self.steps.len(), self.device)
    }
}

/// A host-side f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        HostTensor { shape, data }
    }

    /// Largest absolute difference to another tensor of the same length (∞ if lengths differ).
    pub fn max_abs_diff(&self, other: &HostTensor) -> f32 {
        if self.shape != other.shape {
            return f32::INFINITY;
        }
        self.data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }
}

impl Plan {
    /// Lowers a graph (already checked) with weights from `weights` onto `device`.
    pub fn lower(
        graph: &Graph,
        weights: &dyn WeightSource,
        device: &Device,
        opts: LowerOptions,
    ) -> Result<Plan, ExecError> {
        Plan::lower_shared(graph, weights, device, opts, &mut KernelCache::default())
    }

    /// As [`Plan::lower`], reusing the kernels (and so the device weights) of nodes already
    /// lowered through `cache`: the plans of a recipe's step segments share one copy of the
    /// weights.
    pub fn lower_shared(
        graph: &Graph,
        weights: &dyn WeightSource,
        device: &Device,
        opts: LowerOptions,
        cache: &mut KernelCache,
    ) -> Result<Plan, ExecError> {
        let (order, slot, last_reader) = schedule(graph)?;
        let mut steps = Vec::with_capacity(order.len());
        let mut inputs = Vec::new();
        let mut outputs = Vec::new();
        for (i, &n) in order.iter().enumerate() {
            let node = graph.node(n);
            let ins: Vec<usize> = graph.inputs_of(n).iter().map(|s| slot[s]).collect();
            // A slot read twice by one step dies only at its final read in that step.
            let mut last_use: Vec<bool> = ins.iter().map(|&s| last_reader[s] == i).collect();
            for a in 0..ins.len() {
                if ins[a + 1..].contains(&ins[a]) {
                    last_use[a] = false;
                }
            }
            match &node.op {
                Op::Input { name, shape } => inputs.push((name.clone(), i, shape.clone())),
                Op::Output { name } => outputs.push((name.clone(), i)),
                _ => {}
            }
            let kernel = if node.op.weights().is_empty() {
                Kernel::lower(&node.path, &node.op, weights, device, opts)?
            } else {
                let key = format!("{}|{:?}", node.path, node.op);
                match cache.0.get(&key) {
                    Some(k) => k.clone(),
                    None => {
                        let mut k = Kernel::lower(&node.path, &node.op, weights, device, opts)?;
                        k.store_weights_as(opts.weights);
                        cache.0.insert(key, k.clone());
                        k
                    }
                }
            };
            let next = order.get(i + 1).map(|&m| block_of(&graph.node(m).path));
            let in_shapes: Vec<&[usize]> = graph
                .inputs_of(n)
                .iter()
                .map(|&m| graph.node(m).shape.as_slice())
                .collect();
            steps.push(Step {
                flops: node.op.flops(&in_shapes, &node.shape),
                label: node.label(),
                path: match &node.op {
                    Op::Input { name, .. } => name.clone(),
                    _ => node.path.clone(),
                },
                op: node.op.name(),
                boundary: matches!(node.op, Op::Input { .. } | Op::Output { .. })
                    || next.is_some_and(|b| b != block_of(&node.path)),
                kernel,
                inputs: ins,
                last_use,
                bytes: match node.op {
                    Op::Output { .. } => 0,
                    _ => node.shape.iter().product::<usize>() * 4,
                },
            });
        }
        Ok(Plan {
            device: device.clone(),
            steps,
            inputs,
            outputs,
            check: default_finite_check(),
        })
    }

    /// Sets when this plan checks its values for NaN and ±Inf.
    pub fn set_finite_check(&mut self, c: FiniteCheck) {
        self.check = c;
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The input names and shapes the plan expects.
    pub fn input_specs(&self) -> Vec<(&str, &[usize])> {
        self.inputs
            .iter()
            .map(|(n, _, s)| (n.as_str(), s.as_slice()))
            .collect()
    }

    /// Number of steps (nodes).
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Runs the plan on device tensors; returns the outputs by name. A NaN or ±Inf is an
    /// [`ExecError::NonFinite`] naming the first node that produced it (see [`FiniteCheck`]).
    pub fn run(&self, given: HashMap<String, Value>) -> Result<HashMap<String, Value>, ExecError> {
        match self.check {
            FiniteCheck::Off | FiniteCheck::EveryNode => self.run_checked(given, self.check, None),
            FiniteCheck::Boundaries => {
                // Device tensors are reference-counted: keeping the inputs costs no copy.
                let kept = given.clone();
                match self.run_checked(given, FiniteCheck::Boundaries, None) {
                    Err(ExecError::NonFinite { .. }) => {
                        self.run_checked(kept, FiniteCheck::EveryNode, None)?;
                        unreachable_finite()
                    }
                    other => other,
                }
            }
        }
    }

    /// [`Plan::run`] with each node timed: the device is synchronised after every node, so the
    /// times are the node's own (and the whole run is slower on asynchronous backends). The
    /// plan's finite check applies at block boundaries only.
    pub fn run_profiled(
        &self,
        given: HashMap<String, Value>,
    ) -> Result<(HashMap<String, Value>, Vec<crate::profile::StepTime>), ExecError> {
        let check = match self.check {
            FiniteCheck::Off => FiniteCheck::Off,
            _ => FiniteCheck::Boundaries,
        };
        let mut times = Vec::with_capacity(self.steps.len());
        let out = self.run_checked(given, check, Some(&mut times))?;
        Ok((out, times))
    }

    fn run_checked(
        &self,
        mut given: HashMap<String, Value>,
        check: FiniteCheck,
        mut times: Option<&mut Vec<crate::profile::StepTime>>,
    ) -> Result<HashMap<String, Value>, ExecError> {
        let mut slots: Vec<Option<Value>> = Vec::with_capacity(self.steps.len());
        slots.resize_with(self.steps.len(), || None);
        let names = || {
            self.inputs
                .iter()
                .map(|(n, _, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (name, slot, shape) in &self.inputs {
            let v = given.remove(name).ok_or_else(|| ExecError::MissingInput {
                name: name.clone(),
                expected: shape.clone(),
                names: names(),
            })?;
            if v.dims() != *shape {
                return Err(ExecError::InputShape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: v.dims(),
                });
            }
            slots[*slot] = Some(v);
        }
        let checked = |step: &Step, v: &Value| -> Result<(), ExecError> {
            let due = match check {
                FiniteCheck::Off => false,
                FiniteCheck::Boundaries => step.boundary,
                FiniteCheck::EveryNode => true,
            };
            if due && !value_finite(v) {
                return Err(ExecError::NonFinite {
                    path: if step.kernel.is_input() {
                        format!("input `{}`", step.path)
                    } else {
                        step.path.clone()
                    },
                    op: step.op.to_string(),
                    hint: if step.kernel.is_input() {
                        "the input holds NaN or Inf; check the inputs (or the previous step's output)"
                    } else {
                        "check this node's weights and inputs; an extreme rewrite weight, guidance or eps can overflow"
                    },
                });
            }
            Ok(())
        };
        for (i, step) in self.steps.iter().enumerate() {
            if step.kernel.is_input() {
                if let Some(v) = &slots[i] {
                    checked(step, v)?;
                }
                continue;
            }
            let args: Vec<Value> = step
                .inputs
                .iter()
                .zip(&step.last_use)
                .map(|(&s, &last)| {
                    let v = if last {
                        slots[s].take()
                    } else {
                        slots[s].clone()
                    };
                    v.unwrap_or_else(|| panic!("plan bug: {} reads an empty slot", step.label))
                })
                .collect();
            let start = times.as_ref().map(|_| std::time::Instant::now());
            let v = step.kernel.run(args);
            if let (Some(times), Some(start)) = (times.as_deref_mut(), start) {
                let _ = self.device.sync();
                times.push(crate::profile::StepTime {
                    path: step.path.clone(),
                    op: step.op,
                    seconds: start.elapsed().as_secs_f64(),
                    flops: step.flops,
                });
            }
            checked(step, &v)?;
            slots[i] = Some(v);
        }
        Ok(self
            .outputs
            .iter()
            .map(|(name, s)| (name.clone(), slots[*s].take().expect("output computed")))
            .collect())
    }

    /// The plan's inputs: name and shape.
    pub fn input_shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.inputs
            .iter()
            .map(|(n, _, s)| (n.as_str(), s.as_slice()))
    }

    /// Runs the plan on host tensors plus tensors already on the device (state kept from an
    /// earlier run, e.g. a Cache's features); the outputs named in `keep` stay on the device,
    /// the others come back to the host.
    pub fn run_with_state(
        &self,
        given: &HashMap<String, HostTensor>,
        state: State,
        keep: &[&str],
    ) -> Result<(HashMap<String, HostTensor>, State), ExecError> {
        let mut dev = state;
        for (name, _, shape) in &self.inputs {
            if dev.contains_key(name) {
                continue;
            }
            if let Some(t) = given.get(name) {
                if t.shape != *shape {
                    return Err(ExecError::InputShape {
                        name: name.clone(),
                        expected: shape.clone(),
                        found: t.shape.clone(),
                    });
                }
                dev.insert(name.clone(), Value::from_host(t, &self.device));
            }
        }
        dev.retain(|k, _| self.inputs.iter().any(|(n, _, _)| n == k));
        let mut host = HashMap::new();
        let mut kept = HashMap::new();
        for (k, v) in self.run(dev)? {
            if keep.contains(&k.as_str()) {
                kept.insert(k, v);
            } else {
                host.insert(k, v.to_host());
            }
        }
        Ok((host, kept))
    }

    /// Runs the plan on host tensors (by name) and returns host tensors.
    pub fn run_host(
        &self,
        given: &HashMap<String, HostTensor>,
    ) -> Result<HashMap<String, HostTensor>, ExecError> {
        Ok(self.run_with_state(given, State::new(), &[])?.0)
    }
}

/// Uploads host data as a rank-`D` tensor.
pub fn upload<const D: usize>(shape: &[usize], data: Vec<f32>, device: &Device) -> Tensor<D> {
    Tensor::<D>::from_data(TensorData::new(data, shape.to_vec()), device)
}

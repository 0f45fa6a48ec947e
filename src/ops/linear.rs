//! Linear ops: `y = x Wᵀ + b` on the last axis and the GEGLU feed-forward (`ff.net.0.proj`, a
//! gelu gate, `ff.net.2`), with [`LinearW`], the linear weights as a kernel holds them.
//!
//! Try it: `cargo test --release --test parity` checks both against diffusers.

use super::{Args, Family, Weights, count, want};
use crate::exec::kernels::{Held, host, on_cpu};
use crate::exec::{Kernel, LowerOptions, Value, WeightDtype, upload};
use crate::graph::{Op, Shape};
use crate::limits::MAX_CHANNELS;
use crate::weights::{WeightError, WeightSource};
use burn::tensor::activation::gelu;
use burn::tensor::module::linear;
use burn::tensor::{Device, Tensor};
use std::sync::Arc;

/// The linear family.
pub struct Linear;

/// The weights of one `Linear` op (or one linear layer inside another op).
pub fn linear_weights(i: usize, o: usize, bias: bool) -> Vec<(&'static str, Shape)> {
    let mut w = vec![("weight", vec![o, i])];
    if bias {
        w.push(("bias", vec![o]));
    }
    w
}

/// A lowered linear op.
// Kernels are built once per plan and never moved in a hot loop: size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum LinearKernel {
    Linear(LinearW),
    FeedForward { proj: LinearW, out: LinearW },
}

impl Family for Linear {
    fn name(&self, op: &Op) -> &'static str {
        match op {
            Op::Linear { .. } => "linear",
            Op::FeedForward { .. } => "geglu_ff",
            op => unreachable!("{op:?} is not a linear op"),
        }
    }

    fn arity(&self, op: &Op) -> usize {
        match op {
            Op::Linear { .. } | Op::FeedForward { .. } => 1,
            op => unreachable!("{} is not a linear op", op.name()),
        }
    }

    fn check_params(&self, op: &Op) -> Result<(), String> {
        match op {
            Op::Linear {
                in_features,
                out_features,
                ..
            } => {
                count(
                    "in_features",
                    *in_features,
                    4 * MAX_CHANNELS,
                    "4·MAX_CHANNELS",
                )?;
                count(
                    "out_features",
                    *out_features,
                    8 * MAX_CHANNELS,
                    "8·MAX_CHANNELS",
                )
            }
            Op::FeedForward { dim, inner } => {
                count("dim", *dim, MAX_CHANNELS, "MAX_CHANNELS")?;
                count("inner", *inner, 8 * MAX_CHANNELS, "8·MAX_CHANNELS")
            }
            op => unreachable!("{} is not a linear op", op.name()),
        }
    }

    fn infer(&self, op: &Op, inputs: &[&[usize]]) -> Result<Shape, String> {
        let x = inputs[0];
        match op {
            Op::Linear {
                in_features,
                out_features,
                ..
            } => {
                want(
                    x.last() == Some(in_features),
                    format!("input {x:?} does not end in {in_features} features"),
                )?;
                let mut s = x.to_vec();
                *s.last_mut().expect("non-empty") = *out_features;
                Ok(s)
            }
            Op::FeedForward { dim, .. } => {
                want(
                    x.last() == Some(dim),
                    format!("input {x:?} does not end in {dim}"),
                )?;
                Ok(x.to_vec())
            }
            op => unreachable!("{} is not a linear op", op.name()),
        }
    }

    fn weights(&self, op: &Op) -> Vec<(&'static str, Shape)> {
        match op {
            Op::Linear {
                in_features,
                out_features,
                bias,
            } => linear_weights(*in_features, *out_features, *bias),
            Op::FeedForward { dim, inner } => vec![
                ("net.0.proj.weight", vec![2 * inner, *dim]),
                ("net.0.proj.bias", vec![2 * inner]),
                ("net.2.weight", vec![*dim, *inner]),
                ("net.2.bias", vec![*dim]),
            ],
            op => unreachable!("{} is not a linear op", op.name()),
        }
    }

    fn flops(&self, op: &Op, _inputs: &[&[usize]], out: &[usize]) -> u64 {
        let n = super::elements(out);
        match op {
            Op::Linear {
                in_features,
                out_features,
                ..
            } => 2 * n / *out_features as u64 * (*in_features * *out_features) as u64,
            Op::FeedForward { dim, inner } => {
                let tokens = n / *dim as u64;
                2 * tokens * (*dim * 2 * inner + inner * dim) as u64
            }
            op => unreachable!("{} is not a linear op", op.name()),
        }
    }

    fn lower(&self, op: &Op, w: &mut Weights, dev: &Device, _opts: LowerOptions) -> Kernel {
        Kernel::Linear(match op {
            Op::Linear {
                in_features,
                out_features,
                bias,
            } => LinearKernel::Linear(LinearW::take(w, *in_features, *out_features, *bias, dev)),
            Op::FeedForward { dim, inner } => LinearKernel::FeedForward {
                proj: LinearW::take(w, *dim, 2 * inner, true, dev),
                out: LinearW::take(w, *inner, *dim, true, dev),
            },
            op => unreachable!("{} is not a linear op", op.name()),
        })
    }
}

impl LinearKernel {
    pub fn run(&self, mut args: Args) -> Value {
        match self {
            LinearKernel::Linear(l) => match args.take() {
                Value::R2(x) => Value::R2(l.apply(x)),
                Value::R3(x) => Value::R3(l.apply(x)),
                v => panic!("linear on rank {}", v.dims().len()),
            },
            LinearKernel::FeedForward { proj, out } => {
                let x = args.take().r3();
                if on_cpu(&x)
                    && let (Some(pw), Some(ow)) = (proj.w.host(), out.w.host())
                {
                    // On the host from end to end: one read, one upload.
                    let [b, n, _] = x.dims();
                    let dev = x.device();
                    let h = proj.apply_host(&host(x), b * n, &pw.f32());
                    let g = crate::exec::cpu_conv::geglu(&h, b * n, proj.outputs() / 2);
                    let y = out.apply_host(&g, b * n, &ow.f32());
                    return Value::R3(upload(&[b, n, out.outputs()], y, &dev));
                }
                let h = proj.apply(x);
                let mut parts = h.chunk(2, 2);
                let gate = parts.pop().expect("two chunks");
                let hidden = parts.pop().expect("two chunks");
                Value::R3(out.apply(hidden * gelu(gate)))
            }
        }
    }

    /// Holds the linear weights as `dtype`.
    pub fn store_weights_as(&mut self, dtype: WeightDtype) {
        match self {
            LinearKernel::Linear(l) => l.store_as(dtype),
            LinearKernel::FeedForward { proj, out } => {
                proj.store_as(dtype);
                out.store_as(dtype);
            }
        }
    }
}

/// Linear weights, transposed to `[in, out]`.
#[derive(Debug, Clone)]
pub struct LinearW {
    w: Held<2>,
    b: Option<Tensor<1>>,
    /// The bias on the host, for the CPU kernel.
    bias: Option<Arc<Vec<f32>>>,
}

impl LinearW {
    /// Loads `{path}.weight` `[out, in]` (and `{path}.bias`): [`linear_weights`].
    pub(crate) fn load(
        files: &dyn WeightSource,
        path: &str,
        i: usize,
        o: usize,
        bias: bool,
        dev: &Device,
    ) -> Result<Self, WeightError> {
        let mut w = Weights::read(files, path, &linear_weights(i, o, bias))?;
        Ok(Self::take(&mut w, i, o, bias, dev))
    }

    /// Takes the weights of [`linear_weights`] from `w`.
    pub(crate) fn take(w: &mut Weights, i: usize, o: usize, bias: bool, dev: &Device) -> Self {
        let wt = w.take();
        let mut t = vec![0f32; wt.len()];
        for r in 0..o {
            for c in 0..i {
                t[c * o + r] = wt[r * i + c];
            }
        }
        let bias = bias.then(|| w.take());
        LinearW {
            w: Held::new(t, [i, o], dev),
            b: bias.clone().map(|b| upload(&[o], b, dev)),
            bias: bias.map(Arc::new),
        }
    }

    pub(crate) fn apply<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if on_cpu(&x)
            && let Some(w) = self.w.host()
        {
            let dims = x.dims();
            let dev = x.device();
            let rows = dims[..D - 1].iter().product();
            let y = self.apply_host(&host(x), rows, &w.f32());
            let mut shape = dims;
            shape[D - 1] = self.outputs();
            return upload(&shape, y, &dev);
        }
        linear(x.clone(), self.w.tensor(&x.device()), self.b.clone())
    }

    fn outputs(&self) -> usize {
        self.w.shape()[1]
    }

    /// `x` `[rows, in]` through the CPU kernel with the weights `w` (`[in, out]`, as f32).
    fn apply_host(&self, x: &[f32], rows: usize, w: &[f32]) -> Vec<f32> {
        let o = self.outputs();
        let i = w.len() / o.max(1);
        crate::exec::cpu_conv::linear(x, rows, i, w, o, self.bias.as_deref().map(Vec::as_slice))
    }

    pub(crate) fn store_as(&mut self, dtype: WeightDtype) {
        self.w.store_as(dtype);
    }
}

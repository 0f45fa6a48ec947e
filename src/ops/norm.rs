//! Normalisation ops: group norm (NCHW), layer norm (last axis) and SiLU, with [`GroupNormW`],
//! a group norm's affine weights as a kernel holds them.
//!
//! Try it: `cargo test --release --test parity` checks them against diffusers.

use super::{Args, Family, Weights, count, eps_ok, want};
use crate::exec::kernels::{host, on_cpu};
use crate::exec::{Kernel, LowerOptions, Value, upload};
use crate::graph::{Op, Shape};
use crate::limits::MAX_CHANNELS;
use crate::weights::{WeightError, WeightSource};
use burn::tensor::activation::silu;
use burn::tensor::module::layer_norm;
use burn::tensor::{Device, Tensor};
use std::sync::Arc;

/// The normalisation family.
pub struct Norm;

/// The affine weights of a norm over `c` channels: `weight` and `bias`, `[c]` each.
pub fn norm_weights(c: usize) -> Vec<(&'static str, Shape)> {
    vec![("weight", vec![c]), ("bias", vec![c])]
}

/// A lowered normalisation op.
#[derive(Debug, Clone)]
pub enum NormKernel {
    GroupNorm(GroupNormW),
    LayerNorm {
        gamma: Tensor<1>,
        beta: Tensor<1>,
        eps: f64,
    },
    Silu,
}

impl Family for Norm {
    fn name(&self, op: &Op) -> &'static str {
        match op {
            Op::GroupNorm { .. } => "group_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Silu => "silu",
            op => unreachable!("{op:?} is not a norm op"),
        }
    }

    fn arity(&self, op: &Op) -> usize {
        match op {
            Op::GroupNorm { .. } | Op::LayerNorm { .. } | Op::Silu => 1,
            op => unreachable!("{} is not a norm op", op.name()),
        }
    }

    fn check_params(&self, op: &Op) -> Result<(), String> {
        match op {
            Op::GroupNorm {
                groups,
                channels,
                eps,
            } => {
                count("channels", *channels, MAX_CHANNELS, "MAX_CHANNELS")?;
                want(
                    *groups > 0 && channels.is_multiple_of(*groups),
                    format!("{channels} channels do not split into {groups} groups"),
                )?;
                eps_ok(*eps)
            }
            Op::LayerNorm { dim, eps } => {
                count("dim", *dim, 4 * MAX_CHANNELS, "4·MAX_CHANNELS")?;
                eps_ok(*eps)
            }
            Op::Silu => Ok(()),
            op => unreachable!("{} is not a norm op", op.name()),
        }
    }

    fn infer(&self, op: &Op, inputs: &[&[usize]]) -> Result<Shape, String> {
        let x = inputs[0];
        match op {
            Op::GroupNorm {
                groups, channels, ..
            } => {
                want(
                    x.len() == 4 && x[1] == *channels && channels % groups == 0,
                    format!("input {x:?} is not [B, {channels}, H, W] in {groups} groups"),
                )?;
                Ok(x.to_vec())
            }
            Op::LayerNorm { dim, .. } => {
                want(
                    x.last() == Some(dim),
                    format!("input {x:?} does not end in {dim}"),
                )?;
                Ok(x.to_vec())
            }
            Op::Silu => Ok(x.to_vec()),
            op => unreachable!("{} is not a norm op", op.name()),
        }
    }

    fn weights(&self, op: &Op) -> Vec<(&'static str, Shape)> {
        match op {
            Op::GroupNorm { channels: c, .. } | Op::LayerNorm { dim: c, .. } => norm_weights(*c),
            Op::Silu => vec![],
            op => unreachable!("{} is not a norm op", op.name()),
        }
    }

    fn lower(&self, op: &Op, w: &mut Weights, dev: &Device, _opts: LowerOptions) -> Kernel {
        Kernel::Norm(match op {
            Op::GroupNorm {
                groups,
                channels,
                eps,
            } => NormKernel::GroupNorm(GroupNormW::take(w, *groups, *channels, *eps, dev)),
            Op::LayerNorm { dim, eps } => NormKernel::LayerNorm {
                gamma: upload(&[*dim], w.take(), dev),
                beta: upload(&[*dim], w.take(), dev),
                eps: *eps,
            },
            Op::Silu => NormKernel::Silu,
            op => unreachable!("{} is not a norm op", op.name()),
        })
    }
}

impl NormKernel {
    pub fn run(&self, mut args: Args) -> Value {
        match self {
            NormKernel::GroupNorm(g) => Value::R4(g.apply(args.take().r4())),
            NormKernel::LayerNorm { gamma, beta, eps } => Value::R3(layer_norm(
                args.take().r3(),
                gamma.clone(),
                Some(beta.clone()),
                *eps,
            )),
            NormKernel::Silu => match args.take() {
                Value::R2(x) => Value::R2(silu(x)),
                Value::R3(x) => Value::R3(silu(x)),
                Value::R4(x) => Value::R4(silu(x)),
                Value::R1(x) => Value::R1(silu(x)),
                v => panic!("silu on {:?}", v.dims()),
            },
        }
    }
}

/// Group norm with its affine weights, shaped `[1, C, 1, 1]`.
#[derive(Debug, Clone)]
pub struct GroupNormW {
    groups: usize,
    eps: f64,
    gamma: Tensor<4>,
    beta: Tensor<4>,
    /// The affine weights on the host, for the CPU kernel ([`crate::exec::cpu_ops::group_norm`]).
    host: Arc<(Vec<f32>, Vec<f32>)>,
}

impl GroupNormW {
    /// Loads [`norm_weights`] of `c` channels at `path`.
    pub(crate) fn load(
        files: &dyn WeightSource,
        path: &str,
        groups: usize,
        c: usize,
        eps: f64,
        dev: &Device,
    ) -> Result<Self, WeightError> {
        let mut w = Weights::read(files, path, &norm_weights(c))?;
        Ok(Self::take(&mut w, groups, c, eps, dev))
    }

    /// Takes the weights of [`norm_weights`] from `w`.
    pub(crate) fn take(w: &mut Weights, groups: usize, c: usize, eps: f64, dev: &Device) -> Self {
        let (gamma, beta) = (w.take(), w.take());
        GroupNormW {
            groups,
            eps,
            gamma: upload(&[1, c, 1, 1], gamma.clone(), dev),
            beta: upload(&[1, c, 1, 1], beta.clone(), dev),
            host: Arc::new((gamma, beta)),
        }
    }

    /// `silu(norm(x))` in one pass on the CPU backend.
    pub(crate) fn apply_silu(&self, x: Tensor<4>) -> Tensor<4> {
        if on_cpu(&x) {
            return self.apply_cpu(x, true);
        }
        silu(self.apply(x))
    }

    /// `silu(norm(x))` of host data `[b, c, spatial]` through the CPU kernel.
    pub(crate) fn host_silu(&self, x: &[f32], b: usize, c: usize, spatial: usize) -> Vec<f32> {
        let (gamma, beta) = self.host.as_ref();
        crate::exec::cpu_ops::group_norm(x, b, c, spatial, self.groups, self.eps, gamma, beta, true)
    }

    fn apply_cpu(&self, x: Tensor<4>, silu: bool) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let dev = x.device();
        let (gamma, beta) = self.host.as_ref();
        let y = crate::exec::cpu_ops::group_norm(
            &host(x),
            b,
            c,
            h * w,
            self.groups,
            self.eps,
            gamma,
            beta,
            silu,
        );
        upload(&[b, c, h, w], y, &dev)
    }

    pub(crate) fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        if on_cpu(&x) {
            return self.apply_cpu(x, false);
        }
        let [b, c, h, w] = x.dims();
        let g = self.groups;
        let x = x.reshape([b, g, c / g * h * w]);
        let mean = x.clone().mean_dim(2);
        let xc = x - mean;
        let var = xc.clone().square().mean_dim(2);
        let x = xc / (var + self.eps).sqrt();
        x.reshape([b, c, h, w]) * self.gamma.clone() + self.beta.clone()
    }
}

//! Convolution ops: the 2-D convolution (NCHW) and diffusers' `ResnetBlock2D`, with [`ConvW`]
//! and [`ResnetW`], their weights as a kernel holds them.
//!
//! Try it: `cargo test --release --test parity` checks both against diffusers.

use super::linear::{LinearW, linear_weights};
use super::norm::{GroupNormW, norm_weights};
use super::{Args, Family, Weights, count, eps_ok, want};
use crate::exec::kernels::{Held, host, is_cpu, on_cpu};
use crate::exec::{Kernel, LowerOptions, Value, WeightDtype, upload};
use crate::graph::{Op, Shape};
use crate::limits::{MAX_CHANNELS, MAX_KERNEL};
use crate::weights::{WeightError, WeightSource};
use burn::tensor::activation::silu;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// The convolution family.
pub struct Conv;

/// The weights of one convolution: `weight` `[cout, cin, k, k]` and `bias` `[cout]`.
pub fn conv_weights(cin: usize, cout: usize, k: usize) -> Vec<(&'static str, Shape)> {
    vec![("weight", vec![cout, cin, k, k]), ("bias", vec![cout])]
}

/// A lowered convolution op.
// Kernels are built once per plan and never moved in a hot loop: size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ConvKernel {
    Conv2d(ConvW),
    Resnet(Box<ResnetW>),
}

impl Family for Conv {
    fn name(&self, op: &Op) -> &'static str {
        match op {
            Op::Conv2d { .. } => "conv2d",
            Op::Resnet { .. } => "resnet",
            op => unreachable!("{op:?} is not a convolution op"),
        }
    }

    fn arity(&self, op: &Op) -> usize {
        match op {
            Op::Conv2d { .. } => 1,
            Op::Resnet { .. } => 2,
            op => unreachable!("{} is not a convolution op", op.name()),
        }
    }

    fn check_params(&self, op: &Op) -> Result<(), String> {
        match op {
            Op::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            } => {
                count("in_channels", *in_channels, MAX_CHANNELS, "MAX_CHANNELS")?;
                count("out_channels", *out_channels, MAX_CHANNELS, "MAX_CHANNELS")?;
                count("kernel", *kernel, MAX_KERNEL, "MAX_KERNEL")?;
                count("stride", *stride, MAX_KERNEL, "MAX_KERNEL")?;
                want(
                    padding.iter().all(|p| p <= kernel),
                    format!("padding {padding:?} is wider than the {kernel}×{kernel} kernel"),
                )
            }
            Op::Resnet {
                in_channels,
                out_channels,
                temb_channels,
                groups,
                eps,
                output_scale,
            } => {
                count("in_channels", *in_channels, MAX_CHANNELS, "MAX_CHANNELS")?;
                count("out_channels", *out_channels, MAX_CHANNELS, "MAX_CHANNELS")?;
                count(
                    "temb_channels",
                    *temb_channels,
                    4 * MAX_CHANNELS,
                    "4·MAX_CHANNELS",
                )?;
                want(
                    *groups > 0
                        && in_channels.is_multiple_of(*groups)
                        && out_channels.is_multiple_of(*groups),
                    format!(
                        "{in_channels} and {out_channels} channels do not split into {groups} groups"
                    ),
                )?;
                eps_ok(*eps)?;
                want(
                    output_scale.is_finite() && *output_scale != 0.0,
                    format!("output_scale = {output_scale} is not a finite non-zero number"),
                )
            }
            op => unreachable!("{} is not a convolution op", op.name()),
        }
    }

    fn infer(&self, op: &Op, inputs: &[&[usize]]) -> Result<Shape, String> {
        match op {
            Op::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            } => {
                let x = inputs[0];
                want(
                    x.len() == 4 && x[1] == *in_channels,
                    format!("input {x:?} is not [B, {in_channels}, H, W]"),
                )?;
                let h = x[2] + padding[0] + padding[1];
                let w = x[3] + padding[2] + padding[3];
                want(
                    h >= *kernel && w >= *kernel,
                    format!("input {x:?} is smaller than the {kernel}×{kernel} kernel"),
                )?;
                Ok(vec![
                    x[0],
                    *out_channels,
                    (h - kernel) / stride + 1,
                    (w - kernel) / stride + 1,
                ])
            }
            Op::Resnet {
                in_channels,
                out_channels,
                temb_channels,
                ..
            } => {
                let (x, t) = (inputs[0], inputs[1]);
                want(
                    x.len() == 4 && x[1] == *in_channels,
                    format!("input {x:?} is not [B, {in_channels}, H, W]"),
                )?;
                want(
                    t == [x[0], *temb_channels],
                    format!("time embedding {t:?} is not [{}, {temb_channels}]", x[0]),
                )?;
                Ok(vec![x[0], *out_channels, x[2], x[3]])
            }
            op => unreachable!("{} is not a convolution op", op.name()),
        }
    }

    fn weights(&self, op: &Op) -> Vec<(&'static str, Shape)> {
        match op {
            Op::Conv2d {
                in_channels,
                out_channels,
                kernel,
                ..
            } => conv_weights(*in_channels, *out_channels, *kernel),
            Op::Resnet {
                in_channels: i,
                out_channels: o,
                temb_channels: t,
                ..
            } => {
                // Sub-layers in the order the lowering takes them.
                let sub = |names: [&'static str; 2], list: Vec<(&'static str, Shape)>| {
                    names.into_iter().zip(list.into_iter().map(|(_, s)| s))
                };
                let mut w: Vec<_> = sub(["norm1.weight", "norm1.bias"], norm_weights(*i))
                    .chain(sub(["conv1.weight", "conv1.bias"], conv_weights(*i, *o, 3)))
                    .chain(sub(
                        ["time_emb_proj.weight", "time_emb_proj.bias"],
                        linear_weights(*t, *o, true),
                    ))
                    .chain(sub(["norm2.weight", "norm2.bias"], norm_weights(*o)))
                    .chain(sub(["conv2.weight", "conv2.bias"], conv_weights(*o, *o, 3)))
                    .collect();
                if i != o {
                    w.extend(sub(
                        ["conv_shortcut.weight", "conv_shortcut.bias"],
                        conv_weights(*i, *o, 1),
                    ));
                }
                w
            }
            op => unreachable!("{} is not a convolution op", op.name()),
        }
    }

    fn flops(&self, op: &Op, _inputs: &[&[usize]], out: &[usize]) -> u64 {
        match op {
            Op::Conv2d {
                in_channels,
                kernel,
                ..
            } => 2 * super::elements(out) * (*in_channels * kernel * kernel) as u64,
            Op::Resnet {
                in_channels: i,
                out_channels: o,
                ..
            } => {
                let hw = (out[2] * out[3] * out[0]) as u64;
                let short = if i != o { 2 * hw * (*i * *o) as u64 } else { 0 };
                2 * hw * (*o * *i * 9 + *o * *o * 9) as u64 + short
            }
            op => unreachable!("{} is not a convolution op", op.name()),
        }
    }

    fn lower(&self, op: &Op, w: &mut Weights, dev: &Device, _opts: LowerOptions) -> Kernel {
        Kernel::Conv(match op {
            Op::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            } => ConvKernel::Conv2d(ConvW::take(
                w,
                *in_channels,
                *out_channels,
                *kernel,
                *stride,
                *padding,
                dev,
            )),
            Op::Resnet {
                in_channels: i,
                out_channels: o,
                temb_channels: t,
                groups,
                eps,
                output_scale,
            } => ConvKernel::Resnet(Box::new(ResnetW {
                norm1: GroupNormW::take(w, *groups, *i, *eps, dev),
                conv1: ConvW::take(w, *i, *o, 3, 1, [1; 4], dev),
                temb: LinearW::take(w, *t, *o, true, dev),
                norm2: GroupNormW::take(w, *groups, *o, *eps, dev),
                conv2: ConvW::take(w, *o, *o, 3, 1, [1; 4], dev),
                shortcut: (i != o).then(|| ConvW::take(w, *i, *o, 1, 1, [0; 4], dev)),
                scale: *output_scale,
            })),
            op => unreachable!("{} is not a convolution op", op.name()),
        })
    }
}

impl ConvKernel {
    pub fn run(&self, mut args: Args) -> Value {
        match self {
            ConvKernel::Conv2d(c) => Value::R4(c.apply(args.take().r4())),
            ConvKernel::Resnet(r) => {
                let x = args.take().r4();
                let t = args.take().r2();
                Value::R4(r.run(x, t))
            }
        }
    }

    /// Holds the convolution and linear weights as `dtype`.
    pub fn store_weights_as(&mut self, dtype: WeightDtype) {
        match self {
            ConvKernel::Conv2d(c) => c.store_as(dtype),
            ConvKernel::Resnet(r) => {
                r.conv1.store_as(dtype);
                r.temb.store_as(dtype);
                r.conv2.store_as(dtype);
                if let Some(s) = &mut r.shortcut {
                    s.store_as(dtype);
                }
            }
        }
    }
}

/// A 2-D convolution with its weights: `[cout, cin, k, k]` on the device, or on the host as
/// the `[cout, k·k·cin]` matrix the CPU kernel multiplies by (held with shape `[cout, k, k, cin]`).
#[derive(Debug, Clone)]
pub struct ConvW {
    w: Held<4>,
    b: Tensor<1>,
    /// The bias on the host, for the CPU kernel.
    bias: Arc<Vec<f32>>,
    stride: usize,
    pad: [usize; 4],
    opts: ConvOptions<2>,
}

impl ConvW {
    /// Loads [`conv_weights`] at `path`; padding (top, bottom, left, right).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load(
        files: &dyn WeightSource,
        path: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: [usize; 4],
        dev: &Device,
    ) -> Result<Self, WeightError> {
        let mut w = Weights::read(files, path, &conv_weights(cin, cout, k))?;
        Ok(Self::take(&mut w, cin, cout, k, stride, pad, dev))
    }

    /// Takes the weights of [`conv_weights`] from `w`.
    pub(crate) fn take(
        w: &mut Weights,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: [usize; 4],
        dev: &Device,
    ) -> Self {
        let (wt, b) = (w.take(), w.take());
        let w = if is_cpu(dev) {
            Held::new(
                crate::exec::cpu_conv::pack_conv_weight(&wt, cout, cin, k),
                [cout, k, k, cin],
                dev,
            )
        } else {
            Held::new(wt, [cout, cin, k, k], dev)
        };
        ConvW {
            w,
            b: upload(&[cout], b.clone(), dev),
            bias: Arc::new(b),
            stride,
            pad,
            opts: ConvOptions::new_with_padding(
                [stride, stride],
                [(pad[0], pad[1]), (pad[2], pad[3])],
                [1, 1],
                1,
            ),
        }
    }

    pub(crate) fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        if on_cpu(&x) && self.w.host().is_some() {
            let [b, c, h, w] = x.dims();
            let dev = x.device();
            let (y, [ho, wo]) = self.apply_host(&host(x), [b, c, h, w]);
            return upload(&[b, self.b.dims()[0], ho, wo], y, &dev);
        }
        let w = match &self.w {
            Held::Device(_) => self.w.tensor(&x.device()),
            Held::Host(..) => self.w.tensor(&x.device()).permute([0, 3, 1, 2]),
        };
        conv2d(x.clone(), w, Some(self.b.clone()), self.opts.clone())
    }

    /// The CPU kernel on host data `[b, c, h, w]`: the output and its height and width.
    /// Call only when the weights are held on the host.
    fn apply_host(&self, x: &[f32], [batch, cin, h, w]: [usize; 4]) -> (Vec<f32>, [usize; 2]) {
        let Held::Host(wt, [cout, k, _, _]) = &self.w else {
            unreachable!("apply_host is only called with host weights")
        };
        let dims = crate::exec::cpu_conv::ConvDims {
            batch,
            cin,
            h,
            w,
            cout: *cout,
            k: *k,
            stride: self.stride,
            pad: self.pad,
        };
        let (ho, wo) = dims.out_hw();
        (
            crate::exec::cpu_conv::conv2d(x, dims, &wt.f32(), &self.bias),
            [ho, wo],
        )
    }

    pub(crate) fn store_as(&mut self, dtype: WeightDtype) {
        self.w.store_as(dtype);
    }
}

/// A resnet's weights.
#[derive(Debug, Clone)]
pub struct ResnetW {
    norm1: GroupNormW,
    conv1: ConvW,
    temb: LinearW,
    norm2: GroupNormW,
    conv2: ConvW,
    shortcut: Option<ConvW>,
    scale: f64,
}

impl ResnetW {
    /// The resnet on inputs `x` and the time embedding `t`.
    fn run(&self, x: Tensor<4>, t: Tensor<2>) -> Tensor<4> {
        if on_cpu(&x) && self.on_host() {
            return self.run_cpu(x, t);
        }
        let h = self.conv1.apply(self.norm1.apply_silu(x.clone()));
        let [b, o] = [h.dims()[0], h.dims()[1]];
        let t = self.temb.apply(silu(t)).reshape([b, o, 1, 1]);
        let h = self.conv2.apply(self.norm2.apply_silu(h + t));
        let x = match &self.shortcut {
            Some(s) => s.apply(x),
            None => x,
        };
        let y = x + h;
        if self.scale != 1.0 { y / self.scale } else { y }
    }

    /// Whether every convolution's weights are on the host (the CPU backend).
    fn on_host(&self) -> bool {
        self.conv1.w.host().is_some()
            && self.conv2.w.host().is_some()
            && self.shortcut.as_ref().is_none_or(|s| s.w.host().is_some())
    }

    /// The resnet on the host from end to end (norms, convolutions, the time embedding's add,
    /// the skip add and the output scale), with one read of `x` and one upload.
    fn run_cpu(&self, x: Tensor<4>, t: Tensor<2>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let dev = x.device();
        let xs = host(x);
        let n1 = self.norm1.host_silu(&xs, b, c, h * w);
        let (mut hs, [ho, wo]) = self.conv1.apply_host(&n1, [b, c, h, w]);
        drop(n1);
        let o = self.conv1.bias.len();
        let tv = host(self.temb.apply(silu(t)));
        let p = ho * wo;
        if p > 0 {
            hs.par_chunks_mut(p)
                .zip(tv.par_iter())
                .for_each(|(row, &v)| row.iter_mut().for_each(|e| *e += v));
        }
        let n2 = self.norm2.host_silu(&hs, b, o, p);
        drop(hs);
        let (h2, _) = self.conv2.apply_host(&n2, [b, o, ho, wo]);
        drop(n2);
        let mut y = match &self.shortcut {
            Some(s) => s.apply_host(&xs, [b, c, h, w]).0,
            None => xs,
        };
        let scale = self.scale as f32;
        y.par_iter_mut().zip(h2.par_iter()).for_each(|(a, &v)| {
            let s = *a + v;
            *a = if self.scale != 1.0 { s / scale } else { s };
        });
        upload(&[b, o, ho, wo], y, &dev)
    }
}

//! One kernel per op, holding its weights. Weights are read once at lowering (f16/bf16 widened to
//! f32; linear weights transposed to `[in, out]`). On the CPU backend (flex) the linear and
//! convolution weights stay on the host, convolution weights permuted to `[cout, k·k·cin]`, for
//! rewire's own kernels ([`super::cpu_conv`]); on the other backends they are device tensors for
//! Burn's `linear` and `conv2d`.
//!
//! Try it: `cargo test --release --test parity` runs every kernel against diffusers' outputs.

use super::tome::MergePlan;
use super::{ExecError, HostTensor, LowerOptions, WeightDtype, upload};
use crate::graph::Op;
use crate::weights::{WeightError, WeightSource};
use burn::tensor::activation::{gelu, silu};
use burn::tensor::module::{attention, conv2d, interpolate, layer_norm, linear};
use burn::tensor::ops::{AttentionModuleOptions, ConvOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, FloatDType, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::Arc;

/// A device tensor of rank 1 to 4, or a token-merge plan.
#[derive(Debug, Clone)]
pub enum Value {
    R1(Tensor<1>),
    R2(Tensor<2>),
    R3(Tensor<3>),
    R4(Tensor<4>),
    Plan(std::sync::Arc<MergePlan>),
}

impl Value {
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Value::R1(t) => t.dims().to_vec(),
            Value::R2(t) => t.dims().to_vec(),
            Value::R3(t) => t.dims().to_vec(),
            Value::R4(t) => t.dims().to_vec(),
            Value::Plan(p) => vec![p.batch, p.tokens, p.merged],
        }
    }

    pub fn from_host(t: &HostTensor, device: &Device) -> Value {
        let d = t.data.clone();
        match t.shape.len() {
            1 => Value::R1(upload(&t.shape, d, device)),
            2 => Value::R2(upload(&t.shape, d, device)),
            3 => Value::R3(upload(&t.shape, d, device)),
            _ => Value::R4(upload(&t.shape, d, device)),
        }
    }

    pub fn to_host(self) -> HostTensor {
        let shape = self.dims();
        let data = match self {
            Value::R1(t) => t.into_data(),
            Value::R2(t) => t.into_data(),
            Value::R3(t) => t.into_data(),
            Value::R4(t) => t.into_data(),
            Value::Plan(p) => p.slot.clone().float().into_data(),
        };
        let data = data
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 data after convert");
        HostTensor { shape, data }
    }

    pub fn r1(self) -> Tensor<1> {
        match self {
            Value::R1(t) => t,
            v => panic!("kernel expected a rank-1 value, got {:?}", v.dims()),
        }
    }
    pub fn r2(self) -> Tensor<2> {
        match self {
            Value::R2(t) => t,
            v => panic!("kernel expected a rank-2 value, got {:?}", v.dims()),
        }
    }
    pub fn r3(self) -> Tensor<3> {
        match self {
            Value::R3(t) => t,
            v => panic!("kernel expected a rank-3 value, got {:?}", v.dims()),
        }
    }
    pub fn plan(self) -> std::sync::Arc<MergePlan> {
        match self {
            Value::Plan(p) => p,
            v => panic!("kernel expected a merge plan, got {:?}", v.dims()),
        }
    }
    pub fn r4(self) -> Tensor<4> {
        match self {
            Value::R4(t) => t,
            v => panic!("kernel expected a rank-4 value, got {:?}", v.dims()),
        }
    }
}

/// Which attention implementation a plan uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttentionImpl {
    /// A fused kernel: rewire's own on the CPU backend (flex; see
    /// [`super::cpu_attention`]), `burn::tensor::module::attention` on the others.
    #[default]
    Fused,
    /// `burn::tensor::module::attention` on every backend.
    Burn,
    /// Explicit `softmax(q kᵀ · scale) v` with materialised probabilities.
    Naive,
}

/// A weight matrix on the host for the CPU kernels ([`super::cpu_conv`]), in the dtype it is
/// held as: half precision keeps half the memory and is widened to f32 per call (exact).
#[derive(Debug, Clone)]
enum HostW {
    F32(Arc<Vec<f32>>),
    F16(Arc<Vec<half::f16>>),
    Bf16(Arc<Vec<half::bf16>>),
}

impl HostW {
    /// The same values held as `dtype` (rounded to nearest, as Burn's cast does).
    fn narrow(&self, dtype: WeightDtype) -> HostW {
        let v = self.f32();
        match dtype {
            WeightDtype::F32 => HostW::F32(Arc::new(v.into_owned())),
            WeightDtype::F16 => HostW::F16(Arc::new(
                v.par_iter().map(|&x| half::f16::from_f32(x)).collect(),
            )),
            WeightDtype::Bf16 => HostW::Bf16(Arc::new(
                v.par_iter().map(|&x| half::bf16::from_f32(x)).collect(),
            )),
        }
    }

    /// The values as f32 (borrowed when held as f32).
    fn f32(&self) -> Cow<'_, [f32]> {
        match self {
            HostW::F32(v) => Cow::Borrowed(v.as_slice()),
            HostW::F16(v) => Cow::Owned(v.par_iter().map(|x| x.to_f32()).collect()),
            HostW::Bf16(v) => Cow::Owned(v.par_iter().map(|x| x.to_f32()).collect()),
        }
    }
}

/// A weight: on the host on the CPU backend (flex), where rewire's own kernels use it in the
/// layout they want, laid out once at load; on the device for the other backends.
// Built once per kernel and never moved in a hot loop: size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Held<const D: usize> {
    Device(Tensor<D>),
    Host(HostW, [usize; D]),
}

impl<const D: usize> Held<D> {
    fn new(data: Vec<f32>, shape: [usize; D], dev: &Device) -> Self {
        if is_cpu(dev) {
            Held::Host(HostW::F32(Arc::new(data)), shape)
        } else {
            Held::Device(upload(&shape, data, dev))
        }
    }

    /// The weight as an f32 device tensor (only uploaded when it is held on the host and the
    /// input is on another device, which lowering never produces).
    fn tensor(&self, dev: &Device) -> Tensor<D> {
        match self {
            Held::Device(t) => widen(t.clone()),
            Held::Host(h, shape) => upload(shape, h.f32().into_owned(), dev),
        }
    }

    fn host(&self) -> Option<&HostW> {
        match self {
            Held::Host(h, _) => Some(h),
            Held::Device(_) => None,
        }
    }

    fn store_as(&mut self, dtype: WeightDtype) {
        *self = match self {
            Held::Device(t) => Held::Device(narrow_to(t.clone(), dtype)),
            Held::Host(h, shape) => Held::Host(h.narrow(dtype), *shape),
        };
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
    /// Loads `{path}.weight` `[out, in]` (and `{path}.bias`).
    pub(crate) fn load(
        files: &dyn WeightSource,
        path: &str,
        i: usize,
        o: usize,
        bias: bool,
        dev: &Device,
    ) -> Result<Self, WeightError> {
        let w = files.read(&format!("{path}.weight"), &[o, i])?;
        let mut t = vec![0f32; w.len()];
        for r in 0..o {
            for c in 0..i {
                t[c * o + r] = w[r * i + c];
            }
        }
        let bias = if bias {
            Some(files.read(&format!("{path}.bias"), &[o])?)
        } else {
            None
        };
        Ok(LinearW {
            w: Held::new(t, [i, o], dev),
            b: bias.clone().map(|b| upload(&[o], b, dev)),
            bias: bias.map(Arc::new),
        })
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
        match &self.w {
            Held::Device(t) => t.dims()[1],
            Held::Host(_, shape) => shape[1],
        }
    }

    /// `x` `[rows, in]` through the CPU kernel with the weights `w` (`[in, out]`, as f32).
    fn apply_host(&self, x: &[f32], rows: usize, w: &[f32]) -> Vec<f32> {
        let o = self.outputs();
        let i = w.len() / o.max(1);
        super::cpu_conv::linear(x, rows, i, w, o, self.bias.as_deref().map(Vec::as_slice))
    }

    fn store_as(&mut self, dtype: WeightDtype) {
        self.w.store_as(dtype);
    }
}

/// A weight held as `dtype` (f32 stays as it is).
fn narrow_to<const D: usize>(w: Tensor<D>, dtype: WeightDtype) -> Tensor<D> {
    match dtype {
        WeightDtype::F32 => w,
        WeightDtype::F16 => w.cast(FloatDType::F16),
        WeightDtype::Bf16 => w.cast(FloatDType::BF16),
    }
}

/// A weight as f32 for computing (no work when it is held as f32).
fn widen<const D: usize>(w: Tensor<D>) -> Tensor<D> {
    w.cast(FloatDType::F32)
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
    /// Loads `{path}.weight` `[cout, cin, k, k]` and `{path}.bias`; padding (top, bottom, left, right).
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
        let w = files.read(&format!("{path}.weight"), &[cout, cin, k, k])?;
        let b = files.read(&format!("{path}.bias"), &[cout])?;
        let w = if is_cpu(dev) {
            Held::new(
                super::cpu_conv::pack_conv_weight(&w, cout, cin, k),
                [cout, k, k, cin],
                dev,
            )
        } else {
            Held::new(w, [cout, cin, k, k], dev)
        };
        Ok(ConvW {
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
        })
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
        let dims = super::cpu_conv::ConvDims {
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
            super::cpu_conv::conv2d(x, dims, &wt.f32(), &self.bias),
            [ho, wo],
        )
    }

    fn store_as(&mut self, dtype: WeightDtype) {
        self.w.store_as(dtype);
    }
}

/// Group norm with its affine weights, shaped `[1, C, 1, 1]`.
#[derive(Debug, Clone)]
pub struct GroupNormW {
    groups: usize,
    eps: f64,
    gamma: Tensor<4>,
    beta: Tensor<4>,
    /// The affine weights on the host, for the CPU kernel ([`super::cpu_ops::group_norm`]).
    host: std::sync::Arc<(Vec<f32>, Vec<f32>)>,
}

impl GroupNormW {
    /// Loads `{path}.weight` and `{path}.bias` of `c` channels.
    pub(crate) fn load(
        files: &dyn WeightSource,
        path: &str,
        groups: usize,
        c: usize,
        eps: f64,
        dev: &Device,
    ) -> Result<Self, WeightError> {
        let gamma = files.read(&format!("{path}.weight"), &[c])?;
        let beta = files.read(&format!("{path}.bias"), &[c])?;
        Ok(GroupNormW {
            groups,
            eps,
            gamma: upload(&[1, c, 1, 1], gamma.clone(), dev),
            beta: upload(&[1, c, 1, 1], beta.clone(), dev),
            host: std::sync::Arc::new((gamma, beta)),
        })
    }

    /// `silu(norm(x))` in one pass on the CPU backend.
    pub(crate) fn apply_silu(&self, x: Tensor<4>) -> Tensor<4> {
        if on_cpu(&x) {
            return self.apply_cpu(x, true);
        }
        silu(self.apply(x))
    }

    /// `silu(norm(x))` of host data `[b, c, spatial]` through the CPU kernel.
    fn host_silu(&self, x: &[f32], b: usize, c: usize, spatial: usize) -> Vec<f32> {
        let (gamma, beta) = self.host.as_ref();
        super::cpu_ops::group_norm(x, b, c, spatial, self.groups, self.eps, gamma, beta, true)
    }

    fn apply_cpu(&self, x: Tensor<4>, silu: bool) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let dev = x.device();
        let (gamma, beta) = self.host.as_ref();
        let y = super::cpu_ops::group_norm(
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

/// A lowered op.
// Kernels are built once per plan and never moved in a hot loop: size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Kernel {
    Input,
    Output,
    TimestepProj {
        freqs: Tensor<2>,
        flip: bool,
        batch: usize,
        /// An odd dim gets a zero column, as in diffusers.
        pad: bool,
    },
    Linear(LinearW),
    Conv2d(ConvW),
    GroupNorm(GroupNormW),
    LayerNorm {
        gamma: Tensor<1>,
        beta: Tensor<1>,
        eps: f64,
    },
    Silu,
    Resnet(Box<ResnetW>),
    ToTokens,
    ToImage {
        height: usize,
        width: usize,
    },
    Attention {
        heads: usize,
        imp: AttentionImpl,
    },
    FeedForward {
        proj: LinearW,
        out: LinearW,
    },
    Add {
        scale: f64,
    },
    Concat {
        axis: usize,
    },
    Upsample {
        height: usize,
        width: usize,
    },
    Reshape {
        shape: Vec<usize>,
    },
    /// `[B, Nk, 1]` row factors.
    ScaleKeys(Tensor<3>),
    AugmentQ {
        heads: usize,
    },
    /// `[B, Nk, 1, 1]` biases already multiplied by √(d+1).
    AugmentK {
        heads: usize,
        bias: Tensor<4>,
    },
    AttnProbs {
        heads: usize,
        items: Vec<usize>,
    },
    ProbsReweight {
        /// `[rows, 1, 1, Nk]`.
        weights: Tensor<4>,
        /// `[rows, 1, 1, 1]`: 1 where the row is renormalised.
        renorm: Option<Tensor<4>>,
    },
    ProbsReplace {
        from: usize,
        to: usize,
    },
    ProbsStore {
        rows: Vec<usize>,
        head_mean: bool,
    },
    ProbsSet {
        rows: Vec<usize>,
    },
    AttnMix {
        heads: usize,
        items: Vec<usize>,
    },
    KvGather {
        index: Vec<Vec<usize>>,
    },
    TomeMatch {
        grid: (usize, usize),
        sx: usize,
        sy: usize,
        r: usize,
        seed: Option<u64>,
    },
    TomeMerge,
    TomeUnmerge,
}

impl Kernel {
    /// Holds the kernel's linear and convolution weights as `dtype` (see [`WeightDtype`]).
    pub fn store_weights_as(&mut self, dtype: WeightDtype) {
        if dtype == WeightDtype::F32 {
            return;
        }
        match self {
            Kernel::Linear(l) => l.store_as(dtype),
            Kernel::Conv2d(c) => c.store_as(dtype),
            Kernel::Resnet(r) => {
                r.conv1.store_as(dtype);
                r.temb.store_as(dtype);
                r.conv2.store_as(dtype);
                if let Some(s) = &mut r.shortcut {
                    s.store_as(dtype);
                }
            }
            Kernel::FeedForward { proj, out } => {
                proj.store_as(dtype);
                out.store_as(dtype);
            }
            _ => {}
        }
    }

    /// Builds the kernel for `op` at `path`, reading its weights.
    pub fn lower(
        path: &str,
        op: &Op,
        f: &dyn WeightSource,
        dev: &Device,
        opts: LowerOptions,
    ) -> Result<Kernel, ExecError> {
        let sub = |s: &str| format!("{path}.{s}");
        Ok(match op {
            Op::Input { .. } => Kernel::Input,
            Op::Output { .. } => Kernel::Output,
            Op::TimestepProj {
                dim,
                flip_sin_to_cos,
                shift,
                batch,
            } => {
                // diffusers get_timestep_embedding: exp(-ln(10000) · i / (half − shift)), in f32.
                let half = dim / 2;
                let freqs: Vec<f32> = (0..half)
                    .map(|i| {
                        let e = (-(10000f64.ln()) as f32 * i as f32) / (half as f64 - shift) as f32;
                        (e as f64).exp() as f32
                    })
                    .collect();
                Kernel::TimestepProj {
                    freqs: upload(&[1, half], freqs, dev),
                    flip: *flip_sin_to_cos,
                    batch: *batch,
                    pad: dim % 2 == 1,
                }
            }
            Op::Linear {
                in_features,
                out_features,
                bias,
            } => Kernel::Linear(LinearW::load(
                f,
                path,
                *in_features,
                *out_features,
                *bias,
                dev,
            )?),
            Op::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            } => Kernel::Conv2d(ConvW::load(
                f,
                path,
                *in_channels,
                *out_channels,
                *kernel,
                *stride,
                *padding,
                dev,
            )?),
            Op::GroupNorm {
                groups,
                channels,
                eps,
            } => Kernel::GroupNorm(GroupNormW::load(f, path, *groups, *channels, *eps, dev)?),
            Op::LayerNorm { dim, eps } => Kernel::LayerNorm {
                gamma: upload(&[*dim], f.read(&sub("weight"), &[*dim])?, dev),
                beta: upload(&[*dim], f.read(&sub("bias"), &[*dim])?, dev),
                eps: *eps,
            },
            Op::Silu => Kernel::Silu,
            Op::Resnet {
                in_channels: i,
                out_channels: o,
                temb_channels: t,
                groups,
                eps,
                output_scale,
            } => Kernel::Resnet(Box::new(ResnetW {
                norm1: GroupNormW::load(f, &sub("norm1"), *groups, *i, *eps, dev)?,
                conv1: ConvW::load(f, &sub("conv1"), *i, *o, 3, 1, [1; 4], dev)?,
                temb: LinearW::load(f, &sub("time_emb_proj"), *t, *o, true, dev)?,
                norm2: GroupNormW::load(f, &sub("norm2"), *groups, *o, *eps, dev)?,
                conv2: ConvW::load(f, &sub("conv2"), *o, *o, 3, 1, [1; 4], dev)?,
                shortcut: if i != o {
                    Some(ConvW::load(
                        f,
                        &sub("conv_shortcut"),
                        *i,
                        *o,
                        1,
                        1,
                        [0; 4],
                        dev,
                    )?)
                } else {
                    None
                },
                scale: *output_scale,
            })),
            Op::ToTokens => Kernel::ToTokens,
            Op::ToImage { height, width } => Kernel::ToImage {
                height: *height,
                width: *width,
            },
            Op::Attention(a) => Kernel::Attention {
                heads: a.heads,
                imp: opts.attention,
            },
            Op::FeedForward { dim, inner } => Kernel::FeedForward {
                proj: LinearW::load(f, &sub("net.0.proj"), *dim, 2 * inner, true, dev)?,
                out: LinearW::load(f, &sub("net.2"), *inner, *dim, true, dev)?,
            },
            Op::Add { scale } => Kernel::Add { scale: *scale },
            Op::Concat { axis } => Kernel::Concat { axis: *axis },
            Op::Upsample { height, width } => Kernel::Upsample {
                height: *height,
                width: *width,
            },
            Op::Reshape { shape } => Kernel::Reshape {
                shape: shape.clone(),
            },
            Op::ScaleKeys { keys, weights } => {
                let b = weights.len() / keys;
                Kernel::ScaleKeys(upload(&[b, *keys, 1], weights.clone(), dev))
            }
            Op::AugmentQ { heads } => Kernel::AugmentQ { heads: *heads },
            Op::AugmentK { heads, keys, bias } => {
                let b = bias.len() / keys;
                // The head dim is only known from the input; the factor √(d+1) is applied at
                // run time, so store the raw bias here.
                Kernel::AugmentK {
                    heads: *heads,
                    bias: upload(&[b, *keys, 1, 1], bias.clone(), dev),
                }
            }
            Op::AttnProbs { heads, items } => Kernel::AttnProbs {
                heads: *heads,
                items: items.clone(),
            },
            Op::ProbsReweight {
                keys,
                weights,
                renormalize,
            } => {
                let rows = renormalize.len();
                let any = renormalize.iter().any(|&r| r);
                Kernel::ProbsReweight {
                    weights: upload(&[rows, 1, 1, *keys], weights.clone(), dev),
                    renorm: any.then(|| {
                        upload(
                            &[rows, 1, 1, 1],
                            renormalize.iter().map(|&r| r as u8 as f32).collect(),
                            dev,
                        )
                    }),
                }
            }
            Op::ProbsReplace { from, to } => Kernel::ProbsReplace {
                from: *from,
                to: *to,
            },
            Op::ProbsSet { rows } => Kernel::ProbsSet { rows: rows.clone() },
            Op::ProbsStore { rows, head_mean } => Kernel::ProbsStore {
                rows: rows.clone(),
                head_mean: *head_mean,
            },
            Op::AttnMix { heads, items } => Kernel::AttnMix {
                heads: *heads,
                items: items.clone(),
            },
            Op::KvGather { index } => Kernel::KvGather {
                index: index.clone(),
            },
            Op::TomeMatch {
                grid,
                sx,
                sy,
                r,
                seed,
            } => Kernel::TomeMatch {
                grid: *grid,
                sx: *sx,
                sy: *sy,
                r: *r,
                seed: *seed,
            },
            Op::TomeMerge => Kernel::TomeMerge,
            Op::TomeUnmerge => Kernel::TomeUnmerge,
        })
    }

    /// Runs the kernel. Shapes were checked when the graph was built, so a mismatch here is a
    /// bug in rewire, not in the input.
    pub fn run(&self, args: Vec<Value>) -> Value {
        let mut args = args.into_iter();
        let mut arg = |_port: usize| args.next().expect("arity checked when the graph was built");
        match self {
            Kernel::Input => unreachable!("inputs are placed, not run"),
            Kernel::Output => arg(0),
            Kernel::TimestepProj {
                freqs,
                flip,
                batch,
                pad,
            } => {
                let t = arg(0).r1();
                let n = t.dims()[0];
                let t = t.reshape([n, 1]);
                let t = if n == *batch {
                    t
                } else {
                    t.repeat_dim(0, *batch)
                };
                let e = t * freqs.clone();
                let (s, c) = (e.clone().sin(), e.cos());
                let mut parts = if *flip { vec![c, s] } else { vec![s, c] };
                if *pad {
                    parts.push(Tensor::<2>::zeros([*batch, 1], &freqs.device()));
                }
                Value::R2(Tensor::cat(parts, 1))
            }
            Kernel::Linear(l) => match arg(0) {
                Value::R2(x) => Value::R2(l.apply(x)),
                Value::R3(x) => Value::R3(l.apply(x)),
                v => panic!("linear on rank {}", v.dims().len()),
            },
            Kernel::Conv2d(c) => Value::R4(c.apply(arg(0).r4())),
            Kernel::GroupNorm(g) => Value::R4(g.apply(arg(0).r4())),
            Kernel::LayerNorm { gamma, beta, eps } => Value::R3(layer_norm(
                arg(0).r3(),
                gamma.clone(),
                Some(beta.clone()),
                *eps,
            )),
            Kernel::Silu => match arg(0) {
                Value::R2(x) => Value::R2(silu(x)),
                Value::R3(x) => Value::R3(silu(x)),
                Value::R4(x) => Value::R4(silu(x)),
                Value::R1(x) => Value::R1(silu(x)),
                v => panic!("silu on {:?}", v.dims()),
            },
            Kernel::Resnet(r) => {
                let ResnetW {
                    norm1,
                    conv1,
                    temb,
                    norm2,
                    conv2,
                    shortcut,
                    scale,
                } = r.as_ref();
                let x = arg(0).r4();
                let t = arg(1).r2();
                if on_cpu(&x) && r.on_host() {
                    return Value::R4(r.run_cpu(x, t));
                }
                let h = conv1.apply(norm1.apply_silu(x.clone()));
                let [b, o] = [h.dims()[0], h.dims()[1]];
                let t = temb.apply(silu(t)).reshape([b, o, 1, 1]);
                let h = conv2.apply(norm2.apply_silu(h + t));
                let x = match shortcut {
                    Some(s) => s.apply(x),
                    None => x,
                };
                let y = x + h;
                Value::R4(if *scale != 1.0 { y / *scale } else { y })
            }
            Kernel::ToTokens => {
                let x = arg(0).r4();
                let [b, c, h, w] = x.dims();
                Value::R3(x.reshape([b, c, h * w]).swap_dims(1, 2))
            }
            Kernel::ToImage { height, width } => {
                let x = arg(0).r3();
                let [b, _, c] = x.dims();
                Value::R4(x.swap_dims(1, 2).reshape([b, c, *height, *width]))
            }
            Kernel::Attention { heads, imp } => {
                let (q, k, v) = (arg(0).r3(), arg(1).r3(), arg(2).r3());
                Value::R3(attend_nan_safe(q, k, v, *heads, *imp))
            }
            Kernel::FeedForward { proj, out } => {
                let x = arg(0).r3();
                if on_cpu(&x)
                    && let (Some(pw), Some(ow)) = (proj.w.host(), out.w.host())
                {
                    // On the host from end to end: one read, one upload.
                    let [b, n, _] = x.dims();
                    let dev = x.device();
                    let h = proj.apply_host(&host(x), b * n, &pw.f32());
                    let g = super::cpu_conv::geglu(&h, b * n, proj.outputs() / 2);
                    let y = out.apply_host(&g, b * n, &ow.f32());
                    return Value::R3(upload(&[b, n, out.outputs()], y, &dev));
                }
                let h = proj.apply(x);
                let mut parts = h.chunk(2, 2);
                let gate = parts.pop().expect("two chunks");
                let hidden = parts.pop().expect("two chunks");
                Value::R3(out.apply(hidden * gelu(gate)))
            }
            Kernel::Add { scale } => {
                let (x, y) = (arg(0), arg(1));
                let s = *scale;
                match (x, y) {
                    (Value::R2(x), Value::R2(y)) => Value::R2(scaled(x + y, s)),
                    (Value::R3(x), Value::R3(y)) => Value::R3(scaled(x + y, s)),
                    (Value::R4(x), Value::R4(y)) => Value::R4(scaled(x + y, s)),
                    (Value::R1(x), Value::R1(y)) => Value::R1(scaled(x + y, s)),
                    (x, y) => panic!("add of ranks {:?} and {:?}", x.dims(), y.dims()),
                }
            }
            Kernel::Concat { axis } => match (arg(0), arg(1)) {
                (Value::R2(x), Value::R2(y)) => Value::R2(Tensor::cat(vec![x, y], *axis)),
                (Value::R3(x), Value::R3(y)) => Value::R3(Tensor::cat(vec![x, y], *axis)),
                (Value::R4(x), Value::R4(y)) => Value::R4(Tensor::cat(vec![x, y], *axis)),
                (x, y) => panic!("concat of ranks {:?} and {:?}", x.dims(), y.dims()),
            },
            Kernel::Upsample { height, width } => Value::R4(interpolate(
                arg(0).r4(),
                InterpolateOptions::new(InterpolateMode::Nearest)
                    .with_output_size([*height, *width]),
            )),
            Kernel::Reshape { shape } => {
                let x = arg(0);
                reshape(x, shape)
            }
            Kernel::ScaleKeys(w) => Value::R3(arg(0).r3() * w.clone()),
            Kernel::AugmentQ { heads } => {
                let q = arg(0).r3();
                let [b, n, c] = q.dims();
                let d = c / heads;
                let q = q.reshape([b, n, *heads, d]) * (((d + 1) as f64) / d as f64).sqrt();
                let one = Tensor::<4>::ones([b, n, *heads, 1], &q.device());
                Value::R3(Tensor::cat(vec![q, one], 3).reshape([b, n, heads * (d + 1)]))
            }
            Kernel::AugmentK { heads, bias } => {
                let k = arg(0).r3();
                let [b, n, c] = k.dims();
                let d = c / heads;
                let k = k.reshape([b, n, *heads, d]);
                let extra = (bias.clone() * ((d + 1) as f64).sqrt()).repeat_dim(2, *heads);
                Value::R3(Tensor::cat(vec![k, extra], 3).reshape([b, n, heads * (d + 1)]))
            }
            Kernel::AttnProbs { heads, items } => {
                let (q, k) = (arg(0).r3(), arg(1).r3());
                let dev = q.device();
                let (q, k) = (pick(q, items, &dev), pick(k, items, &dev));
                let d = q.dims()[2] / heads;
                let (q, k) = (split_heads(q, *heads), split_heads(k, *heads));
                let s = q.matmul(k.swap_dims(2, 3)) * (1.0 / (d as f64).sqrt());
                Value::R4(burn::tensor::activation::softmax(s, 3))
            }
            Kernel::ProbsReweight { weights, renorm } => {
                let p = arg(0).r4() * weights.clone();
                Value::R4(match renorm {
                    None => p,
                    Some(m) => {
                        let sum = p.clone().sum_dim(3);
                        let div = sum * m.clone() - m.clone() + 1.0;
                        p / div
                    }
                })
            }
            Kernel::ProbsReplace { from, to } => {
                let p = arg(0).r4();
                let n = p.dims()[0];
                let idx: Vec<usize> = (0..n).map(|r| if r == *to { *from } else { r }).collect();
                let dev = p.device();
                Value::R4(pick4(p, &idx, &dev))
            }
            Kernel::ProbsSet { rows } => {
                // Rows of [p; stored] picked: row r is stored row k where rows[k] = r.
                let p = arg(0).r4();
                let s = arg(1).r4();
                let n = p.dims()[0];
                let idx: Vec<usize> = (0..n)
                    .map(|r| rows.iter().position(|&x| x == r).map_or(r, |k| n + k))
                    .collect();
                let dev = p.device();
                Value::R4(pick4(Tensor::cat(vec![p, s], 0), &idx, &dev))
            }
            Kernel::ProbsStore { rows, head_mean } => {
                let p = arg(0).r4();
                let dev = p.device();
                let p = pick4(p, rows, &dev);
                let [r, h, nq, nk] = p.dims();
                match (head_mean, r) {
                    (false, 1) => Value::R3(p.reshape([h, nq, nk])),
                    (false, _) => Value::R4(p),
                    (true, 1) => Value::R2(p.mean_dim(1).reshape([nq, nk])),
                    (true, _) => Value::R3(p.mean_dim(1).reshape([r, nq, nk])),
                }
            }
            Kernel::KvGather { index } => {
                let x = arg(0).r3();
                let dev = x.device();
                let parts: Vec<Tensor<3>> =
                    index.iter().map(|ix| pick(x.clone(), ix, &dev)).collect();
                Value::R3(Tensor::cat(parts, 1))
            }
            Kernel::TomeMatch {
                grid,
                sx,
                sy,
                r,
                seed,
            } => {
                let m = arg(0).r3();
                Value::Plan(std::sync::Arc::new(super::tome::plan(
                    m, *grid, *sx, *sy, *r, *seed,
                )))
            }
            Kernel::TomeMerge => {
                let (x, p) = (arg(0).r3(), arg(1).plan());
                Value::R3(p.merge(x))
            }
            Kernel::TomeUnmerge => {
                let (y, p) = (arg(0).r3(), arg(1).plan());
                Value::R3(p.unmerge(y))
            }
            Kernel::AttnMix { heads, items } => {
                let (q, k, v, p) = (arg(0).r3(), arg(1).r3(), arg(2).r3(), arg(3).r4());
                let dev = q.device();
                let [b, nq, _] = q.dims();
                let cv = v.dims()[2];
                let vi = split_heads(pick(v.clone(), items, &dev), *heads);
                let mixed = p.matmul(vi).swap_dims(1, 2).reshape([items.len(), nq, cv]);
                let rest: Vec<usize> = (0..b).filter(|i| !items.contains(i)).collect();
                if rest.is_empty() {
                    Value::R3(pick(mixed, &inverse(items), &dev))
                } else {
                    let o = attend_nan_safe(
                        pick(q, &rest, &dev),
                        pick(k, &rest, &dev),
                        pick(v, &rest, &dev),
                        *heads,
                        AttentionImpl::Fused,
                    );
                    let order: Vec<usize> = items.iter().chain(&rest).copied().collect();
                    Value::R3(pick(Tensor::cat(vec![mixed, o], 0), &inverse(&order), &dev))
                }
            }
        }
    }
}

fn scaled<const D: usize>(t: Tensor<D>, s: f64) -> Tensor<D> {
    if s == 1.0 { t } else { t * s }
}

/// [`attend`] that never turns NaN into numbers: fused kernels keep a running maximum that
/// skips NaN, so a NaN query, key or value could come out finite. Adds 0 to every output, or
/// NaN when any input holds NaN or ±Inf (`x · 0` is NaN exactly for those).
pub fn attend_nan_safe(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    imp: AttentionImpl,
) -> Tensor<3> {
    if uses_cpu_kernel(&q, imp) {
        // rewire's CPU kernel carries a NaN score through the softmax (cpu_attention's
        // `nan_stays_nan` test): no poison pass needed.
        return attend(q, k, v, heads, imp);
    }
    let poison = nan_or_zero(q.clone()) + nan_or_zero(k.clone()) + nan_or_zero(v.clone());
    attend(q, k, v, heads, imp) + poison.reshape([1, 1, 1])
}

/// Whether [`attend`] runs rewire's CPU kernel for these inputs.
fn uses_cpu_kernel(q: &Tensor<3>, imp: AttentionImpl) -> bool {
    #[cfg(feature = "flex")]
    {
        imp == AttentionImpl::Fused && q.device() == Device::flex()
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (q, imp);
        false
    }
}

/// A one-element tensor: 0 when `t` is finite, NaN otherwise.
fn nan_or_zero(t: Tensor<3>) -> Tensor<1> {
    (t * 0.0).sum()
}

fn reshape(x: Value, shape: &[usize]) -> Value {
    macro_rules! to {
        ($t:expr) => {
            match shape.len() {
                1 => Value::R1($t.reshape([shape[0]])),
                2 => Value::R2($t.reshape([shape[0], shape[1]])),
                3 => Value::R3($t.reshape([shape[0], shape[1], shape[2]])),
                _ => Value::R4($t.reshape([shape[0], shape[1], shape[2], shape[3]])),
            }
        };
    }
    match x {
        Value::R1(t) => to!(t),
        Value::R2(t) => to!(t),
        Value::R3(t) => to!(t),
        Value::R4(t) => to!(t),
        Value::Plan(_) => panic!("reshape of a merge plan"),
    }
}

/// Rows `idx` of a batch (axis 0).
fn pick(t: Tensor<3>, idx: &[usize], dev: &Device) -> Tensor<3> {
    if idx.len() == t.dims()[0] && idx.iter().enumerate().all(|(i, &j)| i == j) {
        return t;
    }
    t.select(0, index(idx, dev))
}

fn pick4(t: Tensor<4>, idx: &[usize], dev: &Device) -> Tensor<4> {
    if idx.len() == t.dims()[0] && idx.iter().enumerate().all(|(i, &j)| i == j) {
        return t;
    }
    t.select(0, index(idx, dev))
}

fn index(idx: &[usize], dev: &Device) -> Tensor<1, burn::tensor::Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::<1, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(v, [idx.len()]), dev)
}

/// For a permutation `order` (position → item), the positions of items 0..n in it.
fn inverse(order: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; order.len()];
    for (pos, &item) in order.iter().enumerate() {
        inv[item] = pos;
    }
    inv
}

fn split_heads(t: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, n, c] = t.dims();
    t.reshape([b, n, heads, c / heads]).swap_dims(1, 2)
}

/// Multi-head attention on `[B, N, h·d]` tensors.
pub fn attend(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    imp: AttentionImpl,
) -> Tensor<3> {
    let [b, n, c] = q.dims();
    let cv = v.dims()[2];
    #[cfg(feature = "flex")]
    if uses_cpu_kernel(&q, imp) {
        return cpu_attend(q, k, v, heads);
    }
    let (q, k, v) = (
        split_heads(q, heads),
        split_heads(k, heads),
        split_heads(v, heads),
    );
    let o = match imp {
        AttentionImpl::Fused | AttentionImpl::Burn => {
            attention(q, k, v, None, None, AttentionModuleOptions::default())
        }
        AttentionImpl::Naive => {
            let d = c / heads;
            let s = q.matmul(k.swap_dims(2, 3)) * (1.0 / (d as f64).sqrt());
            burn::tensor::activation::softmax(s, 3).matmul(v)
        }
    };
    o.swap_dims(1, 2).reshape([b, n, cv])
}

/// Whether a tensor lives on the CPU backend (flex), where rewire's own CPU kernels run.
fn on_cpu<const D: usize>(t: &Tensor<D>) -> bool {
    #[cfg(feature = "flex")]
    {
        t.device() == Device::flex()
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = t;
        false
    }
}

/// Whether `dev` is the CPU backend (flex).
fn is_cpu(dev: &Device) -> bool {
    #[cfg(feature = "flex")]
    {
        *dev == Device::flex()
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = dev;
        false
    }
}

/// A tensor's values as f32 on the host.
fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data after convert")
}

/// [`attend`] through rewire's CPU kernel: the tensors' data in, one upload out.
#[cfg(feature = "flex")]
fn cpu_attend(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
    use super::cpu_attention::{Dims, attention};
    let [batch, queries, c] = q.dims();
    let keys = k.dims()[1];
    let cv = v.dims()[2];
    let dev = q.device();
    let dims = Dims {
        batch,
        queries,
        keys,
        heads,
        dqk: c / heads,
        dv: cv / heads,
    };
    let scale = 1.0 / ((c / heads) as f32).sqrt();
    let out = attention(&host(q), &host(k), &host(v), dims, scale);
    Tensor::<3>::from_data(
        burn::tensor::TensorData::new(out, [batch, queries, cv]),
        &dev,
    )
}

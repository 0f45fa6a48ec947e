//! The lowered form of an op: [`Kernel`], one variant per op family, each holding the family's
//! kernel (in `crate::ops`), and [`Value`], what flows between kernels. Also the weight holders
//! the families share: weights are read once at lowering (f16/bf16 widened to f32; linear
//! weights transposed to `[in, out]`). On the CPU backend (flex) the linear and convolution
//! weights stay on the host, convolution weights permuted to `[cout, k·k·cin]`, for rewire's own
//! kernels ([`super::cpu_conv`]); on the other backends they are device tensors for Burn's
//! `linear` and `conv2d`.
//!
//! Try it: `cargo test --release --test parity` runs every kernel against diffusers' outputs.

use super::tome::MergePlan;
use super::{ExecError, HostTensor, LowerOptions, WeightDtype, upload};
use crate::graph::Op;
pub use crate::ops::attention::{AttentionImpl, AttentionKernel, attend};
pub use crate::ops::conv::{ConvKernel, ConvW};
pub use crate::ops::embed::EmbedKernel;
pub use crate::ops::layout::LayoutKernel;
pub use crate::ops::linear::{LinearKernel, LinearW};
pub use crate::ops::norm::{GroupNormW, NormKernel};
pub use crate::ops::probs::ProbsKernel;
pub use crate::ops::tome::TomeKernel;
use crate::ops::{Args, Weights, family};
use crate::weights::WeightSource;
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

/// A lowered op: one variant per op family (see [`crate::ops`]).
// Kernels are built once per plan and never moved in a hot loop: size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Kernel {
    Layout(LayoutKernel),
    Embed(EmbedKernel),
    Linear(LinearKernel),
    Conv(ConvKernel),
    Norm(NormKernel),
    Attention(AttentionKernel),
    Probs(ProbsKernel),
    Tome(TomeKernel),
}

impl Kernel {
    /// Whether the kernel is a graph input (placed, not run).
    pub fn is_input(&self) -> bool {
        matches!(self, Kernel::Layout(LayoutKernel::Input))
    }

    /// Holds the kernel's linear and convolution weights as `dtype` (see [`WeightDtype`]).
    pub fn store_weights_as(&mut self, dtype: WeightDtype) {
        if dtype == WeightDtype::F32 {
            return;
        }
        match self {
            Kernel::Linear(k) => k.store_weights_as(dtype),
            Kernel::Conv(k) => k.store_weights_as(dtype),
            _ => {}
        }
    }

    /// Builds the kernel for `op` at `path`, reading its weights through the op's weight list
    /// (the one [`crate::graph::Graph::check`] checks).
    pub fn lower(
        path: &str,
        op: &Op,
        f: &dyn WeightSource,
        dev: &Device,
        opts: LowerOptions,
    ) -> Result<Kernel, ExecError> {
        let fam = family(op);
        let mut w = Weights::read(f, path, &fam.weights(op))?;
        Ok(fam.lower(op, &mut w, dev, opts))
    }

    /// Runs the kernel. Shapes were checked when the graph was built, so a mismatch here is a
    /// bug in rewire, not in the input.
    pub fn run(&self, args: Vec<Value>) -> Value {
        let args = Args::new(args);
        match self {
            Kernel::Layout(k) => k.run(args),
            Kernel::Embed(k) => k.run(args),
            Kernel::Linear(k) => k.run(args),
            Kernel::Conv(k) => k.run(args),
            Kernel::Norm(k) => k.run(args),
            Kernel::Attention(k) => k.run(args),
            Kernel::Probs(k) => k.run(args),
            Kernel::Tome(k) => k.run(args),
        }
    }
}

/// A weight matrix on the host for the CPU kernels ([`super::cpu_conv`]), in the dtype it is
/// held as: half precision keeps half the memory and is widened to f32 per call (exact).
#[derive(Debug, Clone)]
pub(crate) enum HostW {
    F32(Arc<Vec<f32>>),
    F16(Arc<Vec<half::f16>>),
    Bf16(Arc<Vec<half::bf16>>),
}

impl HostW {
    /// The same values held as `dtype` (rounded to nearest, as Burn's cast does).
    pub(crate) fn narrow(&self, dtype: WeightDtype) -> HostW {
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
    pub(crate) fn f32(&self) -> Cow<'_, [f32]> {
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
pub(crate) enum Held<const D: usize> {
    Device(Tensor<D>),
    Host(HostW, [usize; D]),
}

impl<const D: usize> Held<D> {
    pub(crate) fn new(data: Vec<f32>, shape: [usize; D], dev: &Device) -> Self {
        if is_cpu(dev) {
            Held::Host(HostW::F32(Arc::new(data)), shape)
        } else {
            Held::Device(upload(&shape, data, dev))
        }
    }

    /// The weight as an f32 device tensor (only uploaded when it is held on the host and the
    /// input is on another device, which lowering never produces).
    pub(crate) fn tensor(&self, dev: &Device) -> Tensor<D> {
        match self {
            Held::Device(t) => widen(t.clone()),
            Held::Host(h, shape) => upload(shape, h.f32().into_owned(), dev),
        }
    }

    pub(crate) fn host(&self) -> Option<&HostW> {
        match self {
            Held::Host(h, _) => Some(h),
            Held::Device(_) => None,
        }
    }

    /// The weight's shape as held.
    pub(crate) fn shape(&self) -> [usize; D] {
        match self {
            Held::Device(t) => t.dims(),
            Held::Host(_, shape) => *shape,
        }
    }

    pub(crate) fn store_as(&mut self, dtype: WeightDtype) {
        *self = match self {
            Held::Device(t) => Held::Device(narrow_to(t.clone(), dtype)),
            Held::Host(h, shape) => Held::Host(h.narrow(dtype), *shape),
        };
    }
}

/// A weight held as `dtype` (f32 stays as it is).
pub(crate) fn narrow_to<const D: usize>(w: Tensor<D>, dtype: WeightDtype) -> Tensor<D> {
    match dtype {
        WeightDtype::F32 => w,
        WeightDtype::F16 => w.cast(FloatDType::F16),
        WeightDtype::Bf16 => w.cast(FloatDType::BF16),
    }
}

/// A weight as f32 for computing (no work when it is held as f32).
pub(crate) fn widen<const D: usize>(w: Tensor<D>) -> Tensor<D> {
    w.cast(FloatDType::F32)
}

/// Whether a tensor lives on the CPU backend (flex), where rewire's own CPU kernels run.
pub(crate) fn on_cpu<const D: usize>(t: &Tensor<D>) -> bool {
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
pub(crate) fn is_cpu(dev: &Device) -> bool {
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
pub(crate) fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data after convert")
}

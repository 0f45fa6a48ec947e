//! The sinusoidal timestep projection (diffusers `Timesteps`): `[T]` → `[batch, dim]`.
//!
//! Try it: `cargo test --release --test parity` checks it against diffusers' `time_proj`.

use super::{Args, Family, Weights, count, want};
use crate::exec::{Kernel, LowerOptions, Value, upload};
use crate::graph::{Op, Shape};
use burn::tensor::{Device, Tensor};

/// The embedding family.
pub struct Embed;

/// A lowered timestep projection.
#[derive(Debug, Clone)]
pub struct EmbedKernel {
    freqs: Tensor<2>,
    flip: bool,
    batch: usize,
    /// An odd dim gets a zero column, as in diffusers.
    pad: bool,
}

impl Family for Embed {
    fn name(&self, op: &Op) -> &'static str {
        match op {
            Op::TimestepProj { .. } => "timestep_proj",
            op => unreachable!("{op:?} is not an embedding op"),
        }
    }

    fn arity(&self, op: &Op) -> usize {
        match op {
            Op::TimestepProj { .. } => 1,
            op => unreachable!("{} is not an embedding op", op.name()),
        }
    }

    fn check_params(&self, op: &Op) -> Result<(), String> {
        let Op::TimestepProj {
            dim, shift, batch, ..
        } = op
        else {
            unreachable!("{} is not an embedding op", op.name())
        };
        count("dim", *dim, crate::limits::MAX_CHANNELS, "MAX_CHANNELS")?;
        // SDXL's text_time projection runs over batch × time ids.
        count(
            "batch",
            *batch,
            crate::limits::MAX_BATCH * crate::limits::MAX_TEXT_LEN,
            "MAX_BATCH·MAX_TEXT_LEN",
        )?;
        want(
            shift.is_finite() && (((dim / 2) as f64) - shift).abs() > 0.5,
            format!("shift = {shift} does not fit a {dim}-wide projection"),
        )
    }

    fn infer(&self, op: &Op, inputs: &[&[usize]]) -> Result<Shape, String> {
        let Op::TimestepProj { dim, batch, .. } = op else {
            unreachable!("{} is not an embedding op", op.name())
        };
        let t = inputs[0];
        want(
            t.len() == 1 && (t[0] == 1 || t[0] == *batch),
            format!("timestep must be [1] or [{batch}], got {t:?}"),
        )?;
        Ok(vec![*batch, *dim])
    }

    fn lower(&self, op: &Op, _w: &mut Weights, dev: &Device, _opts: LowerOptions) -> Kernel {
        let Op::TimestepProj {
            dim,
            flip_sin_to_cos,
            shift,
            batch,
        } = op
        else {
            unreachable!("{} is not an embedding op", op.name())
        };
        // diffusers get_timestep_embedding: exp(-ln(10000) · i / (half − shift)), in f32.
        let half = dim / 2;
        let freqs: Vec<f32> = (0..half)
            .map(|i| {
                let e = (-(10000f64.ln()) as f32 * i as f32) / (half as f64 - shift) as f32;
                (e as f64).exp() as f32
            })
            .collect();
        Kernel::Embed(EmbedKernel {
            freqs: upload(&[1, half], freqs, dev),
            flip: *flip_sin_to_cos,
            batch: *batch,
            pad: dim % 2 == 1,
        })
    }
}

impl EmbedKernel {
    pub fn run(&self, mut args: Args) -> Value {
        let t = args.take().r1();
        let n = t.dims()[0];
        let t = t.reshape([n, 1]);
        let t = if n == self.batch {
            t
        } else {
            t.repeat_dim(0, self.batch)
        };
        let e = t * self.freqs.clone();
        let (s, c) = (e.clone().sin(), e.cos());
        let mut parts = if self.flip { vec![c, s] } else { vec![s, c] };
        if self.pad {
            parts.push(Tensor::<2>::zeros([self.batch, 1], &self.freqs.device()));
        }
        Value::R2(Tensor::cat(parts, 1))
    }
}

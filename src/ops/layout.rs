//! Layout ops: graph inputs and outputs, `[B, C, H, W]` ↔ tokens, reshapes, the (scaled)
//! residual add, concatenation and nearest-neighbour upsampling. None reads weights.
//!
//! Try it: `rewire graph models/tiny-sd --format text` lists them (`input`, `to_tokens`, `add`, ...).

use super::{Args, Family, Weights, want};
use crate::exec::{Kernel, LowerOptions, Value};
use crate::graph::{Op, Shape};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor};

/// The layout family.
pub struct Layout;

/// A lowered layout op.
#[derive(Debug, Clone)]
pub enum LayoutKernel {
    Input,
    Output,
    ToTokens,
    ToImage { height: usize, width: usize },
    Add { scale: f64 },
    Concat { axis: usize },
    Upsample { height: usize, width: usize },
    Reshape { shape: Vec<usize> },
}

impl Family for Layout {
    fn name(&self, op: &Op) -> &'static str {
        match op {
            Op::Input { .. } => "input",
            Op::Output { .. } => "output",
            Op::ToTokens => "to_tokens",
            Op::ToImage { .. } => "to_image",
            Op::Add { .. } => "add",
            Op::Concat { .. } => "concat",
            Op::Upsample { .. } => "upsample",
            Op::Reshape { .. } => "reshape",
            op => unreachable!("{op:?} is not a layout op"),
        }
    }

    fn arity(&self, op: &Op) -> usize {
        match op {
            Op::Input { .. } => 0,
            Op::Output { .. }
            | Op::ToTokens
            | Op::ToImage { .. }
            | Op::Upsample { .. }
            | Op::Reshape { .. } => 1,
            Op::Add { .. } | Op::Concat { .. } => 2,
            op => unreachable!("{} is not a layout op", op.name()),
        }
    }

    fn check_params(&self, op: &Op) -> Result<(), String> {
        match op {
            Op::Add { scale } => want(scale.is_finite(), format!("scale = {scale} is not finite")),
            Op::ToImage { height, width } | Op::Upsample { height, width } => want(
                *height > 0 && *width > 0,
                format!("size {height}×{width} is empty"),
            ),
            _ => Ok(()),
        }
    }

    fn infer(&self, op: &Op, inputs: &[&[usize]]) -> Result<Shape, String> {
        match op {
            Op::Input { shape, .. } => Ok(shape.clone()),
            Op::Output { .. } => Ok(inputs[0].to_vec()),
            Op::ToTokens => {
                let x = inputs[0];
                want(x.len() == 4, format!("input {x:?} is not [B, C, H, W]"))?;
                Ok(vec![x[0], x[2] * x[3], x[1]])
            }
            Op::ToImage { height, width } => {
                let x = inputs[0];
                want(
                    x.len() == 3 && x[1] == height * width,
                    format!("input {x:?} is not [B, {}, C]", height * width),
                )?;
                Ok(vec![x[0], x[2], *height, *width])
            }
            Op::Add { .. } => {
                want(
                    inputs[0] == inputs[1],
                    format!("operands {:?} and {:?} differ", inputs[0], inputs[1]),
                )?;
                Ok(inputs[0].to_vec())
            }
            Op::Concat { axis } => {
                let (a, b) = (inputs[0], inputs[1]);
                let same_rank = a.len() == b.len() && *axis < a.len();
                let others = same_rank
                    && a.iter()
                        .zip(b)
                        .enumerate()
                        .all(|(i, (x, y))| i == *axis || x == y);
                want(
                    others,
                    format!("cannot concatenate {a:?} and {b:?} along axis {axis}"),
                )?;
                let mut s = a.to_vec();
                s[*axis] += b[*axis];
                Ok(s)
            }
            Op::Upsample { height, width } => {
                let x = inputs[0];
                want(x.len() == 4, format!("input {x:?} is not [B, C, H, W]"))?;
                Ok(vec![x[0], x[1], *height, *width])
            }
            Op::Reshape { shape } => {
                let n: usize = inputs[0].iter().product();
                want(
                    crate::limits::elements(shape) == Some(n),
                    format!("cannot reshape {:?} to {shape:?}", inputs[0]),
                )?;
                Ok(shape.clone())
            }
            op => unreachable!("{} is not a layout op", op.name()),
        }
    }

    fn lower(&self, op: &Op, _w: &mut Weights, _dev: &Device, _opts: LowerOptions) -> Kernel {
        Kernel::Layout(match op {
            Op::Input { .. } => LayoutKernel::Input,
            Op::Output { .. } => LayoutKernel::Output,
            Op::ToTokens => LayoutKernel::ToTokens,
            Op::ToImage { height, width } => LayoutKernel::ToImage {
                height: *height,
                width: *width,
            },
            Op::Add { scale } => LayoutKernel::Add { scale: *scale },
            Op::Concat { axis } => LayoutKernel::Concat { axis: *axis },
            Op::Upsample { height, width } => LayoutKernel::Upsample {
                height: *height,
                width: *width,
            },
            Op::Reshape { shape } => LayoutKernel::Reshape {
                shape: shape.clone(),
            },
            op => unreachable!("{} is not a layout op", op.name()),
        })
    }
}

impl LayoutKernel {
    pub fn run(&self, mut args: Args) -> Value {
        match self {
            LayoutKernel::Input => unreachable!("inputs are placed, not run"),
            LayoutKernel::Output => args.take(),
            LayoutKernel::ToTokens => {
                let x = args.take().r4();
                let [b, c, h, w] = x.dims();
                Value::R3(x.reshape([b, c, h * w]).swap_dims(1, 2))
            }
            LayoutKernel::ToImage { height, width } => {
                let x = args.take().r3();
                let [b, _, c] = x.dims();
                Value::R4(x.swap_dims(1, 2).reshape([b, c, *height, *width]))
            }
            LayoutKernel::Add { scale } => {
                let (x, y) = (args.take(), args.take());
                let s = *scale;
                match (x, y) {
                    (Value::R2(x), Value::R2(y)) => Value::R2(scaled(x + y, s)),
                    (Value::R3(x), Value::R3(y)) => Value::R3(scaled(x + y, s)),
                    (Value::R4(x), Value::R4(y)) => Value::R4(scaled(x + y, s)),
                    (Value::R1(x), Value::R1(y)) => Value::R1(scaled(x + y, s)),
                    (x, y) => panic!("add of ranks {:?} and {:?}", x.dims(), y.dims()),
                }
            }
            LayoutKernel::Concat { axis } => match (args.take(), args.take()) {
                (Value::R2(x), Value::R2(y)) => Value::R2(Tensor::cat(vec![x, y], *axis)),
                (Value::R3(x), Value::R3(y)) => Value::R3(Tensor::cat(vec![x, y], *axis)),
                (Value::R4(x), Value::R4(y)) => Value::R4(Tensor::cat(vec![x, y], *axis)),
                (x, y) => panic!("concat of ranks {:?} and {:?}", x.dims(), y.dims()),
            },
            LayoutKernel::Upsample { height, width } => Value::R4(interpolate(
                args.take().r4(),
                InterpolateOptions::new(InterpolateMode::Nearest)
                    .with_output_size([*height, *width]),
            )),
            LayoutKernel::Reshape { shape } => reshape(args.take(), shape),
        }
    }
}

fn scaled<const D: usize>(t: Tensor<D>, s: f64) -> Tensor<D> {
    if s == 1.0 { t } else { t * s }
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

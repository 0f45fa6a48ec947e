//! Token-merging ops (tomesd): the bipartite soft matching that makes a merge plan, and the
//! merge and unmerge by that plan. The plan itself is [`crate::exec::tome::MergePlan`].
//!
//! Try it: `cargo test --release --test recipes` runs the `tome` recipe.

use super::{Args, Family, Weights, want};
use crate::exec::{Kernel, LowerOptions, Value};
use crate::graph::{Op, Shape};
use burn::tensor::Device;
use std::sync::Arc;

/// The token-merging family.
pub struct Tome;

/// A lowered token-merging op.
#[derive(Debug, Clone)]
pub enum TomeKernel {
    Match {
        grid: (usize, usize),
        sx: usize,
        sy: usize,
        r: usize,
        seed: Option<u64>,
    },
    Merge,
    Unmerge,
}

/// How many of `n` tokens tomesd's matching merges: `r`, at most the non-destination tokens.
pub fn tome_merged(n: usize, grid: (usize, usize), sx: usize, sy: usize, r: usize) -> usize {
    let dst = (grid.0 / sy.max(1)) * (grid.1 / sx.max(1));
    r.min(n.saturating_sub(dst))
}

impl Family for Tome {
    fn name(&self, op: &Op) -> &'static str {
        match op {
            Op::TomeMatch { .. } => "tome_match",
            Op::TomeMerge => "tome_merge",
            Op::TomeUnmerge => "tome_unmerge",
            op => unreachable!("{op:?} is not a token-merging op"),
        }
    }

    fn arity(&self, op: &Op) -> usize {
        match op {
            Op::TomeMatch { .. } => 1,
            Op::TomeMerge | Op::TomeUnmerge => 2,
            op => unreachable!("{} is not a token-merging op", op.name()),
        }
    }

    fn infer(&self, op: &Op, inputs: &[&[usize]]) -> Result<Shape, String> {
        match op {
            Op::TomeMatch {
                grid, sx, sy, r, ..
            } => {
                let x = inputs[0];
                want(
                    x.len() == 3 && x[1] == grid.0 * grid.1,
                    format!("metric {x:?} is not [B, {}·{}, C]", grid.0, grid.1),
                )?;
                want(
                    *sx > 0 && *sy > 0 && *sx <= grid.1 && *sy <= grid.0,
                    format!("{sx}×{sy} cells do not fit the {}×{} grid", grid.1, grid.0),
                )?;
                Ok(vec![
                    x[0],
                    x[1],
                    x[1] - tome_merged(x[1], *grid, *sx, *sy, *r),
                ])
            }
            Op::TomeMerge => {
                let (x, p) = (inputs[0], inputs[1]);
                want(
                    x.len() == 3 && p.len() == 3 && x[0] == p[0] && x[1] == p[1],
                    format!("tokens {x:?} do not fit the merge plan {p:?}"),
                )?;
                Ok(vec![x[0], p[2], x[2]])
            }
            Op::TomeUnmerge => {
                let (y, p) = (inputs[0], inputs[1]);
                want(
                    y.len() == 3 && p.len() == 3 && y[0] == p[0] && y[1] == p[2],
                    format!("merged tokens {y:?} do not fit the merge plan {p:?}"),
                )?;
                Ok(vec![y[0], p[1], y[2]])
            }
            op => unreachable!("{} is not a token-merging op", op.name()),
        }
    }

    fn lower(&self, op: &Op, _w: &mut Weights, _dev: &Device, _opts: LowerOptions) -> Kernel {
        Kernel::Tome(match op {
            Op::TomeMatch {
                grid,
                sx,
                sy,
                r,
                seed,
            } => TomeKernel::Match {
                grid: *grid,
                sx: *sx,
                sy: *sy,
                r: *r,
                seed: *seed,
            },
            Op::TomeMerge => TomeKernel::Merge,
            Op::TomeUnmerge => TomeKernel::Unmerge,
            op => unreachable!("{} is not a token-merging op", op.name()),
        })
    }
}

impl TomeKernel {
    pub fn run(&self, mut args: Args) -> Value {
        match self {
            TomeKernel::Match {
                grid,
                sx,
                sy,
                r,
                seed,
            } => {
                let m = args.take().r3();
                Value::Plan(Arc::new(crate::exec::tome::plan(
                    m, *grid, *sx, *sy, *r, *seed,
                )))
            }
            TomeKernel::Merge => {
                let (x, p) = (args.take().r3(), args.take().plan());
                Value::R3(p.merge(x))
            }
            TomeKernel::Unmerge => {
                let (y, p) = (args.take().r3(), args.take().plan());
                Value::R3(p.unmerge(y))
            }
        }
    }
}

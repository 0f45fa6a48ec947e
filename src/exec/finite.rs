//! Checking a plan's values for NaN and ±Inf: when ([`FiniteCheck`]), where (block
//! boundaries), and the error when a rerun node by node cannot find the culprit.
//!
//! Try it: `rewire forward models/tiny-sd --inputs tests/fixtures/unet_cases/baseline.safetensors --out /tmp/out.safetensors --check-finite`.

use super::{ExecError, Value};
use burn::tensor::Tensor;
use std::collections::HashMap;

/// When a plan checks its values for NaN and ±Inf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FiniteCheck {
    /// Never (benchmarks).
    Off,
    /// The inputs, the last node of each block (`down_blocks.N`, `mid_block`, `up_blocks.N`, ...)
    /// and the outputs; when one fails, the run is repeated with every node checked to name the
    /// first node that produced the value. The cost is one reduction per block.
    #[default]
    Boundaries,
    /// Every node (`--check-finite`).
    EveryNode,
}

static DEFAULT_CHECK: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);

/// Sets the [`FiniteCheck`] of plans lowered from now on (the CLI's `--check-finite`).
pub fn set_default_finite_check(c: FiniteCheck) {
    let v = match c {
        FiniteCheck::Off => 0,
        FiniteCheck::Boundaries => 1,
        FiniteCheck::EveryNode => 2,
    };
    DEFAULT_CHECK.store(v, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn default_finite_check() -> FiniteCheck {
    match DEFAULT_CHECK.load(std::sync::atomic::Ordering::Relaxed) {
        0 => FiniteCheck::Off,
        2 => FiniteCheck::EveryNode,
        _ => FiniteCheck::Boundaries,
    }
}

/// The block a node path belongs to (`down_blocks.1`, `mid_block`, `conv_in`, ...).
pub(crate) fn block_of(path: &str) -> &str {
    let mut dots = path.match_indices('.').map(|(i, _)| i);
    match (
        path.starts_with("down_blocks.") || path.starts_with("up_blocks."),
        dots.nth(1),
    ) {
        (true, Some(i)) => &path[..i],
        _ => path.split('.').next().unwrap_or(path),
    }
}

pub(crate) fn value_finite(v: &Value) -> bool {
    fn ok<const D: usize>(t: &Tensor<D>) -> bool {
        !t.clone().is_finite().bool_not().any().into_scalar::<bool>()
    }
    match v {
        Value::R1(t) => ok(t),
        Value::R2(t) => ok(t),
        Value::R3(t) => ok(t),
        Value::R4(t) => ok(t),
        Value::Plan(_) => true,
    }
}

/// A run that found a non-finite value at a block boundary and none at any node when repeated
/// node by node: the backend is not deterministic about NaN, which is itself worth an error.
pub(crate) fn unreachable_finite() -> Result<HashMap<String, Value>, ExecError> {
    Err(ExecError::NonFinite {
        path: "(a block boundary)".into(),
        op: "unknown".into(),
        hint: "a value was non-finite at a block boundary but no node produced it when rerun node by node; rerun with --check-finite",
    })
}

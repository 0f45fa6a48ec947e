//! Options that pick kernels at lowering time: the attention implementation and how the
//! linear and convolution weights are held.
//!
//! Try it: `rewire profile models/tiny-sd --attention naive --weights f16`.

use super::AttentionImpl;

/// Options that pick kernels at lowering time.
#[derive(Debug, Clone, Copy, Default)]
pub struct LowerOptions {
    pub attention: AttentionImpl,
    /// How the linear and convolution weights are held on the device.
    pub weights: WeightDtype,
}

/// How linear and convolution weights (nearly all of a UNet's parameters) are held on the
/// device. Computation is f32 either way: a half-precision weight is widened to f32 where it is
/// used, so an f16 checkpoint held as `F16` gives the same results as `F32` (widening is exact)
/// in half the weight memory, for one conversion per use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightDtype {
    /// f32 (the default: fastest).
    #[default]
    F32,
    /// IEEE half precision: exact for f16 checkpoints.
    F16,
    /// bfloat16: exact for bf16 checkpoints.
    Bf16,
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(WeightDtype::F32),
            "f16" | "float16" | "fp16" => Ok(WeightDtype::F16),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            other => Err(format!(
                "unknown weight dtype {other:?}: use f32, f16 or bf16"
            )),
        }
    }
}

//! Where a model's weights come from ([`WeightSource`]): checkpoint files, or deterministic
//! random weights ([`RandomWeights`]) for benchmarks and configs with no checkpoint.
//!
//! Try it: `cargo bench` (the published architectures run on random weights).

use super::WeightError;
use std::path::{Path, PathBuf};

/// Where a model's weights come from: checkpoint files, or generated random weights.
pub trait WeightSource {
    /// What to name in messages.
    fn origin(&self) -> &Path;
    /// Checks a tensor exists with this shape.
    fn check(&self, name: &str, shape: &[usize]) -> Result<(), WeightError>;
    /// Reads a tensor as f32, checking its shape.
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightError>;
}

/// Deterministic random weights for any name and shape (benchmarks of published
/// architectures without downloading them, and tests of configs with no checkpoint).
/// Matrices and kernels are uniform in ±1/√fan_in like PyTorch's default init; norm scales are
/// 1; biases are small.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    pub seed: u64,
    origin: PathBuf,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        RandomWeights {
            seed,
            origin: PathBuf::from(format!("<random weights, seed {seed}>")),
        }
    }

    /// The values for one tensor.
    pub fn values(&self, name: &str, shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let is_norm = shape.len() == 1 && name.contains("norm");
        if is_norm && name.ends_with(".weight") {
            return vec![1.0; n];
        }
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let bound = if shape.len() >= 2 {
            1.0 / (fan_in as f32).sqrt()
        } else {
            0.02
        };
        let mut state = self.seed ^ fnv1a(name.as_bytes());
        (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                let u = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                (2.0 * u - 1.0) * bound
            })
            .collect()
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl WeightSource for RandomWeights {
    fn origin(&self) -> &Path {
        &self.origin
    }
    fn check(&self, _: &str, _: &[usize]) -> Result<(), WeightError> {
        Ok(())
    }
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightError> {
        Ok(self.values(name, shape))
    }
}

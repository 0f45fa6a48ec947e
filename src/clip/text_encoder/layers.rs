//! The text encoder's weights on the device: linear layers (q, k and v fused), layer norms and
//! one encoder layer's set of them.
//!
//! Try it: `cargo test --release --test text_encoder`.

use crate::exec::upload;
use crate::weights::{TensorFiles, WeightError};
use burn::tensor::module::{layer_norm, linear};
use burn::tensor::{Device, Tensor};

/// Linear weights, transposed to `[in, out]` for Burn's `linear`.
#[derive(Debug, Clone)]
pub(super) struct LinearW {
    pub(super) w: Tensor<2>,
    pub(super) b: Tensor<1>,
}

/// Reads `{path}.weight` (`[out, in]`) transposed to `[in, out]`, and `{path}.bias`.
fn read_linear(
    files: &TensorFiles,
    path: &str,
    i: usize,
    o: usize,
) -> Result<(Vec<f32>, Vec<f32>), WeightError> {
    let w = files.read_f32_shaped(&format!("{path}.weight"), &[o, i])?;
    let mut t = vec![0f32; w.len()];
    for r in 0..o {
        for c in 0..i {
            t[c * o + r] = w[r * i + c];
        }
    }
    let b = files.read_f32_shaped(&format!("{path}.bias"), &[o])?;
    Ok((t, b))
}

impl LinearW {
    pub(super) fn load(
        files: &TensorFiles,
        path: &str,
        i: usize,
        o: usize,
        dev: &Device,
    ) -> Result<Self, WeightError> {
        let (w, b) = read_linear(files, path, i, o)?;
        Ok(LinearW {
            w: upload(&[i, o], w, dev),
            b: upload(&[o], b, dev),
        })
    }

    /// q, k and v projections side by side: `[in, 3·out]`.
    pub(super) fn load_qkv(
        files: &TensorFiles,
        path: &str,
        dim: usize,
        dev: &Device,
    ) -> Result<Self, WeightError> {
        let parts = ["q_proj", "k_proj", "v_proj"]
            .map(|p| read_linear(files, &format!("{path}.{p}"), dim, dim));
        let mut w = vec![0f32; dim * 3 * dim];
        let mut b = Vec::with_capacity(3 * dim);
        for (j, part) in parts.into_iter().enumerate() {
            let (pw, pb) = part?;
            for r in 0..dim {
                w[r * 3 * dim + j * dim..r * 3 * dim + (j + 1) * dim]
                    .copy_from_slice(&pw[r * dim..(r + 1) * dim]);
            }
            b.extend(pb);
        }
        Ok(LinearW {
            w: upload(&[dim, 3 * dim], w, dev),
            b: upload(&[3 * dim], b, dev),
        })
    }

    pub(super) fn apply(&self, x: Tensor<3>) -> Tensor<3> {
        linear(x, self.w.clone(), Some(self.b.clone()))
    }
}

/// Layer norm weights.
#[derive(Debug, Clone)]
pub(super) struct NormW {
    pub(super) gamma: Tensor<1>,
    pub(super) beta: Tensor<1>,
}

impl NormW {
    pub(super) fn load(
        files: &TensorFiles,
        path: &str,
        dim: usize,
        dev: &Device,
    ) -> Result<Self, WeightError> {
        Ok(NormW {
            gamma: upload(
                &[dim],
                files.read_f32_shaped(&format!("{path}.weight"), &[dim])?,
                dev,
            ),
            beta: upload(
                &[dim],
                files.read_f32_shaped(&format!("{path}.bias"), &[dim])?,
                dev,
            ),
        })
    }

    pub(super) fn apply(&self, x: Tensor<3>, eps: f64) -> Tensor<3> {
        layer_norm(x, self.gamma.clone(), Some(self.beta.clone()), eps)
    }
}

/// One `CLIPEncoderLayer`.
#[derive(Debug, Clone)]
pub(super) struct LayerW {
    pub(super) norm1: NormW,
    pub(super) qkv: LinearW,
    pub(super) out: LinearW,
    pub(super) norm2: NormW,
    pub(super) fc1: LinearW,
    pub(super) fc2: LinearW,
}

//! A VAE's `config.json` ([`VaeConfig`], diffusers' `AutoencoderKL` defaults) and the checks
//! of the fields that change the computation.
//!
//! Try it: `cargo test --release --test vae`.

use super::VaeError;
use serde::Deserialize;
use std::path::Path;

/// `vae/config.json` as diffusers writes it for `AutoencoderKL`. Unknown fields are accepted;
/// the ones that change the computation are checked by [`VaeConfig::validate`]. Defaults are
/// diffusers' `AutoencoderKL.__init__` defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default)]
    pub _class_name: Option<String>,
    #[serde(default = "d_three")]
    pub in_channels: usize,
    #[serde(default = "d_three")]
    pub out_channels: usize,
    #[serde(default = "d_four")]
    pub latent_channels: usize,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<serde_json::Value>,
    #[serde(default)]
    pub latents_std: Option<serde_json::Value>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

fn d_three() -> usize {
    3
}
fn d_four() -> usize {
    4
}
fn d_one() -> usize {
    1
}
fn d_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn d_block_out() -> Vec<usize> {
    vec![64]
}
fn d_act() -> String {
    "silu".into()
}
fn d_groups() -> usize {
    32
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}

impl VaeConfig {
    /// Reads and parses `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, VaeError> {
        use crate::limits::{MAX_CONFIG_BYTES, ReadError, read_text_capped};
        let text =
            read_text_capped(path, MAX_CONFIG_BYTES, "MAX_CONFIG_BYTES").map_err(|e| match e {
                ReadError::Io(source) => VaeError::Read {
                    path: path.to_path_buf(),
                    source,
                },
                other => VaeError::Json {
                    path: path.to_path_buf(),
                    line: 0,
                    column: 0,
                    message: other.to_string(),
                },
            })?;
        Self::from_json(&text, path)
    }

    /// Parses config JSON; `path` is used in messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, VaeError> {
        serde_json::from_str(text).map_err(|e| VaeError::Json {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })
    }

    /// Checks every field that changes the computation.
    pub fn validate(&self, path: &Path) -> Result<(), VaeError> {
        let unsupported = |field: String, value: String, supported: &'static str| {
            Err(VaeError::Unsupported {
                path: path.to_path_buf(),
                field,
                value,
                supported,
            })
        };
        let invalid = |message: String, hint: &'static str| {
            Err(VaeError::Invalid {
                path: path.to_path_buf(),
                message,
                hint,
            })
        };
        if let Some(c) = &self._class_name
            && c != "AutoencoderKL"
        {
            return unsupported(
                "_class_name".into(),
                format!("{c:?}"),
                "\"AutoencoderKL\" (pass the pipeline's vae/ folder)",
            );
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return unsupported(
                "act_fn".into(),
                format!("{:?}", self.act_fn),
                "\"silu\" (or its alias \"swish\")",
            );
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return invalid(
                "`block_out_channels` is empty".into(),
                "give at least one channel count",
            );
        }
        for (field, list) in [
            ("down_block_types", &self.down_block_types),
            ("up_block_types", &self.up_block_types),
        ] {
            if list.len() != n {
                return Err(VaeError::Length {
                    path: path.to_path_buf(),
                    field,
                    found: list.len(),
                    expected: n,
                });
            }
        }
        for (i, t) in self.down_block_types.iter().enumerate() {
            if t != "DownEncoderBlock2D" {
                return unsupported(
                    format!("down_block_types[{i}]"),
                    format!("{t:?}"),
                    "\"DownEncoderBlock2D\"",
                );
            }
        }
        for (i, t) in self.up_block_types.iter().enumerate() {
            if t != "UpDecoderBlock2D" {
                return unsupported(
                    format!("up_block_types[{i}]"),
                    format!("{t:?}"),
                    "\"UpDecoderBlock2D\"",
                );
            }
        }
        if self.layers_per_block == 0 {
            return invalid(
                "`layers_per_block` is 0".into(),
                "every block needs at least one resnet",
            );
        }
        {
            use crate::limits::{MAX_BLOCKS, MAX_CHANNELS, MAX_LAYERS_PER_BLOCK, at_most};
            let mut checks = vec![
                ("block_out_channels (entries)", n, MAX_BLOCKS, "MAX_BLOCKS"),
                (
                    "layers_per_block",
                    self.layers_per_block,
                    MAX_LAYERS_PER_BLOCK,
                    "MAX_LAYERS_PER_BLOCK",
                ),
            ];
            for &c in &self.block_out_channels {
                checks.push(("block_out_channels", c, MAX_CHANNELS, "MAX_CHANNELS"));
            }
            for (field, v, max, name) in checks {
                if let Err(e) = at_most(v, max, name) {
                    return invalid(
                        format!("`{field}` = {e}"),
                        "no published VAE comes near this; check the config",
                    );
                }
            }
        }
        let g = self.norm_num_groups;
        if g == 0 {
            return invalid(
                "`norm_num_groups` is 0".into(),
                "use a positive group count",
            );
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || c % g != 0)
        {
            return invalid(
                format!(
                    "`block_out_channels` entry {c} is not a positive multiple of `norm_num_groups` ({g})"
                ),
                "group norm needs every channel count divisible by the group count",
            );
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return invalid(
                "`in_channels`, `out_channels` and `latent_channels` must be positive".into(),
                "use the channel counts of the checkpoint",
            );
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return unsupported(
                "scaling_factor".into(),
                self.scaling_factor.to_string(),
                "a finite non-zero number",
            );
        }
        if let Some(s) = self.shift_factor
            && !s.is_finite()
        {
            return unsupported(
                "shift_factor".into(),
                s.to_string(),
                "null or a finite number",
            );
        }
        for (field, v) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if let Some(v) = v
                && !v.is_null()
            {
                return unsupported(
                    field.into(),
                    v.to_string(),
                    "null (per-channel latent statistics are not implemented)",
                );
            }
        }
        Ok(())
    }

    /// How much smaller the latents are than the image: `2^(len(block_out_channels) - 1)`.
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

//! `unet/config.json` as diffusers writes it ([`UNetConfig`]), with diffusers' defaults, and
//! reading it from a file or a string.
//!
//! Try it: `rewire inspect models/tiny-sd` (reads `models/tiny-sd/unet/config.json`).

use super::ConfigError;
use serde::Deserialize;
use std::path::Path;

/// An int, or one int per block (diffusers accepts both for several fields).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

/// A bool, or one bool per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlockBool {
    One(bool),
    Each(Vec<bool>),
}

/// `config.json` as diffusers writes it. Unknown fields are accepted (diffusers adds private
/// `_` fields and fields for other model families); the ones that change the computation are
/// checked in [`UNetConfig::resolve`].
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default)]
    pub _class_name: Option<String>,
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    #[serde(default = "d_in_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up_types")]
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: Option<PerBlockBool>,
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock,
    #[serde(default = "d_one_pb")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: Option<PerBlock>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub dual_cross_attention: bool,
    #[serde(default, deserialize_with = "null_is_false")]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub upcast_attention: bool,
    #[serde(default = "d_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default, deserialize_with = "null_is_false")]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default, deserialize_with = "null_is_false")]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

/// A boolean field that published configs may write as `null` (SDXL base's
/// `"upcast_attention": null`): diffusers reads `null` as its default, false.
fn null_is_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(<Option<bool> as serde::Deserialize>::deserialize(d)?.unwrap_or(false))
}

fn d_in_channels() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_down_types() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up_types() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_mid_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_block_out() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers() -> PerBlock {
    PerBlock::One(2)
}
fn d_one() -> usize {
    1
}
fn d_one_pb() -> PerBlock {
    PerBlock::One(1)
}
fn d_one_f() -> f64 {
    1.0
}
fn d_act() -> String {
    "silu".into()
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> PerBlock {
    PerBlock::One(1280)
}
fn d_head_dim() -> Option<PerBlock> {
    Some(PerBlock::One(8))
}
fn d_shift() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_three() -> usize {
    3
}
fn d_default() -> String {
    "default".into()
}

impl UNetConfig {
    /// Reads `config.json` from `path` (a file, a `unet/` folder or a pipeline folder).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        use crate::limits::{MAX_CONFIG_BYTES, ReadError, read_text_capped};
        let text =
            read_text_capped(path, MAX_CONFIG_BYTES, "MAX_CONFIG_BYTES").map_err(|e| match e {
                ReadError::Io(source) => ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                },
                other => ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message: other.to_string(),
                },
            })?;
        Self::from_json(&text, path)
    }

    /// Parses config JSON; `path` is used in messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|e| ConfigError::Json {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })
    }
}

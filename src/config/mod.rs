//! UNet configuration: the real diffusers `unet/config.json`, deserialised and resolved into
//! per-block facts (channels, heads, transformer depth, cross-attention width) the graph builder
//! needs. Covers the fields `UNet2DConditionModel` uses for SD 1.x, SD 2.x and SDXL; a value this
//! crate does not implement is a [`ConfigError::Unsupported`] naming the field, never a silent
//! default.
//!
//! Try it: `rewire inspect models/tiny-sd` (reads `models/tiny-sd/unet/config.json`).

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Errors raised while reading or resolving a UNet config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read {path}: {source}\n  hint: point rewire at a diffusers pipeline folder or its unet/ folder"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON at line {line}, column {column}: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error(
        "{path}: unsupported value for `{field}`: {value}\n  hint: rewire supports {supported}"
    )]
    Unsupported {
        path: PathBuf,
        field: &'static str,
        value: String,
        supported: &'static str,
    },
    #[error("{path}: field `{field}` has {found} entries, expected {expected} (one per block)")]
    Length {
        path: PathBuf,
        field: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "{path}: `{field}` = {source}\n  hint: no published Stable Diffusion UNet comes near this; check the config"
    )]
    Limit {
        path: PathBuf,
        field: String,
        source: crate::limits::Exceeded,
    },
}

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

/// The kind of a down or up block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum BlockKind {
    /// Resnets only (`DownBlock2D` / `UpBlock2D`).
    Plain,
    /// Resnets each followed by a `Transformer2DModel` (`CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`).
    CrossAttn,
}

/// One down or up block with every per-block field resolved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlockSpec {
    pub kind: BlockKind,
    /// Number of (resnet[, attention]) layers: layers_per_block (+1 for up blocks).
    pub layers: usize,
    pub out_channels: usize,
    /// Channels entering the block (down) or of the previous block's output (up).
    pub in_channels: usize,
    pub heads: usize,
    pub transformer_layers: Vec<usize>,
    pub cross_attention_dim: usize,
    pub only_cross_attention: bool,
    /// Down blocks: a downsampler at the end; up blocks: an upsampler at the end.
    pub resample: bool,
}

/// The mid block, when present.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MidSpec {
    pub with_attention: bool,
    pub channels: usize,
    pub heads: usize,
    pub transformer_layers: usize,
    pub cross_attention_dim: usize,
}

/// SDXL's `addition_embed_type: "text_time"` embedding.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TextTimeSpec {
    pub time_embed_dim: usize,
    pub input_dim: usize,
}

/// Everything the graph builder needs, resolved and checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Resolved {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down: Vec<BlockSpec>,
    pub mid: Option<MidSpec>,
    pub up: Vec<BlockSpec>,
    pub norm_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub time_embed_dim: usize,
    pub downsample_padding: usize,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub mid_block_scale_factor: f64,
    pub resnet_out_scale_factor: f64,
    pub text_time: Option<TextTimeSpec>,
    /// Width of the encoder hidden states the first cross-attention expects.
    pub context_dim: usize,
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

    /// Checks every field that changes the computation and resolves per-block values.
    pub fn resolve(&self, path: &Path) -> Result<Resolved, ConfigError> {
        let p = || path.to_path_buf();
        let unsupported = |field: &'static str, value: String, supported: &'static str| {
            Err(ConfigError::Unsupported {
                path: p(),
                field,
                value,
                supported,
            })
        };
        if let Some(c) = &self._class_name
            && c != "UNet2DConditionModel"
        {
            return unsupported("_class_name", c.clone(), "UNet2DConditionModel");
        }
        if self.act_fn != "silu" {
            return unsupported("act_fn", self.act_fn.clone(), "\"silu\"");
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported(
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift.clone(),
                "\"default\"",
            );
        }
        if self.time_embedding_type != "positional" {
            return unsupported(
                "time_embedding_type",
                self.time_embedding_type.clone(),
                "\"positional\"",
            );
        }
        if self.attention_type != "default" {
            return unsupported("attention_type", self.attention_type.clone(), "\"default\"");
        }
        macro_rules! must_be_none {
            ($($field:ident),*) => {$(
                if let Some(v) = &self.$field {
                    return unsupported(stringify!($field), format!("{v:?}"), "null (not set)");
                }
            )*};
        }
        must_be_none!(
            class_embed_type,
            num_class_embeds,
            encoder_hid_dim,
            encoder_hid_dim_type,
            time_embedding_dim,
            time_embedding_act_fn,
            timestep_post_act,
            time_cond_proj_dim,
            cross_attention_norm
        );
        if self.center_input_sample {
            return unsupported("center_input_sample", "true".into(), "false");
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention", "true".into(), "false");
        }
        if self.resnet_skip_time_act {
            return unsupported("resnet_skip_time_act", "true".into(), "false");
        }
        if self.class_embeddings_concat {
            return unsupported("class_embeddings_concat", "true".into(), "false");
        }
        if self.reverse_transformer_layers_per_block.is_some() {
            return unsupported(
                "reverse_transformer_layers_per_block",
                "a value".into(),
                "null (up blocks mirror transformer_layers_per_block)",
            );
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return unsupported(
                "conv_in_kernel",
                format!("{}/{}", self.conv_in_kernel, self.conv_out_kernel),
                "odd kernel sizes",
            );
        }

        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(ConfigError::Invalid {
                path: p(),
                message: "block_out_channels is empty".into(),
            });
        }
        for (field, len) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ] {
            if len != n {
                return Err(ConfigError::Length {
                    path: p(),
                    field,
                    found: len,
                    expected: n,
                });
            }
        }
        let per = |field: &'static str, v: &PerBlock| -> Result<Vec<usize>, ConfigError> {
            match v {
                PerBlock::One(x) => Ok(vec![*x; n]),
                PerBlock::Each(xs) if xs.len() == n => Ok(xs.clone()),
                PerBlock::Each(xs) => Err(ConfigError::Length {
                    path: p(),
                    field,
                    found: xs.len(),
                    expected: n,
                }),
            }
        };
        let layers = per("layers_per_block", &self.layers_per_block)?;
        let cross = per("cross_attention_dim", &self.cross_attention_dim)?;
        let tlayers = per(
            "transformer_layers_per_block",
            &self.transformer_layers_per_block,
        )?;
        // diffusers' quirk: `num_attention_heads = num_attention_heads or attention_head_dim`;
        // SD 1.x configs name the head *count* attention_head_dim.
        let heads_src = match (&self.num_attention_heads, &self.attention_head_dim) {
            (Some(h), _) => ("num_attention_heads", h),
            (None, Some(h)) => ("attention_head_dim", h),
            (None, None) => {
                return Err(ConfigError::Invalid {
                    path: p(),
                    message: "neither num_attention_heads nor attention_head_dim is set".into(),
                });
            }
        };
        let heads = per(heads_src.0, heads_src.1)?;
        {
            use crate::limits::*;
            let limit = |field: &str, v: &[usize], max: usize, name: &'static str| {
                for (i, &x) in v.iter().enumerate() {
                    at_most(x, max, name).map_err(|source| ConfigError::Limit {
                        path: p(),
                        field: if v.len() == 1 {
                            field.to_string()
                        } else {
                            format!("{field}[{i}]")
                        },
                        source,
                    })?;
                }
                Ok::<(), ConfigError>(())
            };
            limit("block_out_channels", &[n], MAX_BLOCKS, "MAX_BLOCKS")?;
            limit(
                "layers_per_block",
                &layers,
                MAX_LAYERS_PER_BLOCK,
                "MAX_LAYERS_PER_BLOCK",
            )?;
            limit(
                "transformer_layers_per_block",
                &tlayers,
                MAX_TRANSFORMER_LAYERS,
                "MAX_TRANSFORMER_LAYERS",
            )?;
            limit("cross_attention_dim", &cross, MAX_CHANNELS, "MAX_CHANNELS")?;
            limit(
                "block_out_channels",
                &self.block_out_channels,
                MAX_CHANNELS,
                "MAX_CHANNELS",
            )?;
            limit(heads_src.0, &heads, MAX_HEADS, "MAX_HEADS")?;
            for (field, v) in [
                ("in_channels", self.in_channels),
                ("out_channels", self.out_channels),
                (
                    "addition_time_embed_dim",
                    self.addition_time_embed_dim.unwrap_or(0),
                ),
                (
                    "projection_class_embeddings_input_dim",
                    self.projection_class_embeddings_input_dim.unwrap_or(0),
                ),
            ] {
                limit(field, &[v], MAX_CHANNELS, "MAX_CHANNELS")?;
            }
            for (field, v) in [
                ("conv_in_kernel", self.conv_in_kernel),
                ("conv_out_kernel", self.conv_out_kernel),
                ("downsample_padding", self.downsample_padding),
            ] {
                limit(field, &[v], MAX_KERNEL, "MAX_KERNEL")?;
            }
            if let Some(i) = layers.iter().position(|&l| l == 0) {
                return Err(ConfigError::Invalid {
                    path: p(),
                    message: format!(
                        "`layers_per_block` is 0 for block {i}\n  hint: every block has at least one resnet (SD: 2)"
                    ),
                });
            }
            for (field, v) in [
                ("in_channels", self.in_channels),
                ("out_channels", self.out_channels),
            ] {
                if v == 0 {
                    return Err(ConfigError::Invalid {
                        path: p(),
                        message: format!("`{field}` is 0\n  hint: SD UNets have 4 latent channels"),
                    });
                }
            }
            for (field, v) in [
                ("norm_eps", self.norm_eps),
                ("freq_shift", self.freq_shift),
                ("mid_block_scale_factor", self.mid_block_scale_factor),
                ("resnet_out_scale_factor", self.resnet_out_scale_factor),
            ] {
                if !v.is_finite() || (field == "norm_eps" && v <= 0.0) {
                    return Err(ConfigError::Invalid {
                        path: p(),
                        message: format!(
                            "`{field}` = {v} is not {}\n  hint: diffusers' default is {}",
                            if field == "norm_eps" {
                                "a finite number > 0"
                            } else {
                                "a finite number"
                            },
                            match field {
                                "norm_eps" => "1e-5",
                                "freq_shift" => "0",
                                _ => "1.0",
                            }
                        ),
                    });
                }
            }
            if self.norm_eps > 1e6 {
                return Err(ConfigError::Invalid {
                    path: p(),
                    message: format!(
                        "`norm_eps` = {} is above 1e6: the normalisation would erase the signal\n  hint: diffusers' default is 1e-5",
                        self.norm_eps
                    ),
                });
            }
            if self.norm_eps > 1.0 {
                eprintln!(
                    "warning: {}: `norm_eps` = {} is unusually large (diffusers' default is 1e-5)",
                    path.display(),
                    self.norm_eps
                );
            }
        }
        let only_cross = match &self.only_cross_attention {
            None => vec![false; n],
            Some(PerBlockBool::One(b)) => vec![*b; n],
            Some(PerBlockBool::Each(v)) if v.len() == n => v.clone(),
            Some(PerBlockBool::Each(v)) => {
                return Err(ConfigError::Length {
                    path: p(),
                    field: "only_cross_attention",
                    found: v.len(),
                    expected: n,
                });
            }
        };
        let groups = match self.norm_num_groups {
            Some(g) if g > 0 => g,
            other => {
                return unsupported(
                    "norm_num_groups",
                    format!("{other:?}"),
                    "a positive group count",
                );
            }
        };
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 {
                return Err(ConfigError::Invalid {
                    path: p(),
                    message: format!("block_out_channels[{i}] is 0"),
                });
            }
            if c % groups != 0 {
                return Err(ConfigError::Invalid {
                    path: p(),
                    message: format!(
                        "block_out_channels[{i}] = {c} is not divisible by norm_num_groups = {groups}"
                    ),
                });
            }
            if heads[i] == 0 || c % heads[i] != 0 {
                return Err(ConfigError::Invalid {
                    path: p(),
                    message: format!(
                        "block_out_channels[{i}] = {c} is not divisible by the head count {} (from {})",
                        heads[i], heads_src.0
                    ),
                });
            }
        }

        let mut down = Vec::with_capacity(n);
        let mut out_ch = self.block_out_channels[0];
        for (i, t) in self.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = self.block_out_channels[i];
            let kind = match t.as_str() {
                "DownBlock2D" => BlockKind::Plain,
                "CrossAttnDownBlock2D" => BlockKind::CrossAttn,
                other => {
                    return unsupported(
                        "down_block_types",
                        format!("\"{other}\" (block {i})"),
                        "\"DownBlock2D\" and \"CrossAttnDownBlock2D\"",
                    );
                }
            };
            down.push(BlockSpec {
                kind,
                layers: layers[i],
                out_channels: out_ch,
                in_channels: in_ch,
                heads: heads[i],
                transformer_layers: vec![tlayers[i]; layers[i]],
                cross_attention_dim: cross[i],
                only_cross_attention: only_cross[i],
                resample: i + 1 != n,
            });
        }

        let mid = match self.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => Some(MidSpec {
                with_attention: true,
                channels: self.block_out_channels[n - 1],
                heads: heads[n - 1],
                transformer_layers: tlayers[n - 1],
                cross_attention_dim: cross[n - 1],
            }),
            Some("UNetMidBlock2D") => Some(MidSpec {
                with_attention: false,
                channels: self.block_out_channels[n - 1],
                heads: heads[n - 1],
                transformer_layers: 0,
                cross_attention_dim: cross[n - 1],
            }),
            Some(other) => {
                return unsupported(
                    "mid_block_type",
                    format!("\"{other}\""),
                    "\"UNetMidBlock2DCrossAttn\", \"UNetMidBlock2D\" and null",
                );
            }
        };

        let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
        let (r_ch, r_heads, r_layers, r_t, r_cross) = (
            rev(&self.block_out_channels),
            rev(&heads),
            rev(&layers),
            rev(&tlayers),
            rev(&cross),
        );
        let r_only: Vec<bool> = only_cross.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut out_ch = r_ch[0];
        for (i, t) in self.up_block_types.iter().enumerate() {
            let prev = out_ch;
            out_ch = r_ch[i];
            let kind = match t.as_str() {
                "UpBlock2D" => BlockKind::Plain,
                "CrossAttnUpBlock2D" => BlockKind::CrossAttn,
                other => {
                    return unsupported(
                        "up_block_types",
                        format!("\"{other}\" (block {i})"),
                        "\"UpBlock2D\" and \"CrossAttnUpBlock2D\"",
                    );
                }
            };
            up.push(BlockSpec {
                kind,
                layers: r_layers[i] + 1,
                out_channels: out_ch,
                in_channels: prev,
                heads: r_heads[i],
                transformer_layers: vec![r_t[i]; r_layers[i] + 1],
                cross_attention_dim: r_cross[i],
                only_cross_attention: r_only[i],
                resample: i + 1 != n,
            });
        }

        let time_embed_dim = self.block_out_channels[0] * 4;
        let text_time = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let t = self
                    .addition_time_embed_dim
                    .ok_or_else(|| ConfigError::Invalid {
                        path: p(),
                        message: "addition_embed_type \"text_time\" needs addition_time_embed_dim"
                            .into(),
                    })?;
                let i = self.projection_class_embeddings_input_dim.ok_or_else(|| {
                    ConfigError::Invalid {
                        path: p(),
                        message: "addition_embed_type \"text_time\" needs projection_class_embeddings_input_dim".into(),
                    }
                })?;
                Some(TextTimeSpec {
                    time_embed_dim: t,
                    input_dim: i,
                })
            }
            Some(other) => {
                return unsupported(
                    "addition_embed_type",
                    format!("\"{other}\""),
                    "\"text_time\" (SDXL) and null",
                );
            }
        };
        let context_dim = down
            .iter()
            .find(|b| b.kind == BlockKind::CrossAttn)
            .map(|b| b.cross_attention_dim)
            .unwrap_or(cross[0]);

        Ok(Resolved {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            block_out_channels: self.block_out_channels.clone(),
            down,
            mid,
            up,
            norm_groups: groups,
            norm_eps: self.norm_eps,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            time_embed_dim,
            downsample_padding: self.downsample_padding,
            conv_in_kernel: self.conv_in_kernel,
            conv_out_kernel: self.conv_out_kernel,
            use_linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention,
            mid_block_scale_factor: self.mid_block_scale_factor,
            resnet_out_scale_factor: self.resnet_out_scale_factor,
            text_time,
            context_dim,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Resolved, ConfigError> {
        let p = Path::new("config.json");
        UNetConfig::from_json(json, p)?.resolve(p)
    }

    #[test]
    fn sd15_defaults_resolve() {
        let r = parse(r#"{"attention_head_dim": 8, "cross_attention_dim": 768}"#).unwrap();
        assert_eq!(r.down.len(), 4);
        assert_eq!(r.down[0].heads, 8);
        assert_eq!(r.up[0].layers, 3);
        assert_eq!(r.up[1].in_channels, 1280);
        assert_eq!(r.context_dim, 768);
        assert_eq!(r.time_embed_dim, 1280);
    }

    #[test]
    fn per_block_lists_must_match_block_count() {
        let e = parse(r#"{"attention_head_dim": [5, 10]}"#).unwrap_err();
        assert!(
            e.to_string()
                .contains("`attention_head_dim` has 2 entries, expected 4"),
            "{e}"
        );
    }

    #[test]
    fn unknown_block_type_is_named() {
        let e = parse(r#"{"down_block_types": ["AttnDownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D"]}"#)
            .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("down_block_types") && s.contains("AttnDownBlock2D"),
            "{s}"
        );
    }
}

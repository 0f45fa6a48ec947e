//! A text encoder's `config.json` ([`TextEncoderConfig`], transformers' `CLIPTextConfig`
//! defaults) and the activation it names ([`Activation`]).
//!
//! Try it: `cargo test --release --test text_encoder`.

use super::TextEncoderError;
use serde::Deserialize;
use std::path::Path;

/// The activation between `fc1` and `fc2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(1.702 x)` (OpenAI CLIP, SD 1.x).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP, SD 2.x, SDXL's second encoder).
    Gelu,
}

/// `config.json` as transformers writes it for `CLIPTextModel`; absent fields take
/// transformers' `CLIPTextConfig` defaults, unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct TextEncoderConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`, SDXL's second encoder).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// The end token the pooled output is read at (transformers: the first position holding
    /// it; with the legacy value 2, the position of the largest id).
    #[serde(default)]
    pub eos_token_id: Option<i64>,
    /// `["CLIPTextModel"]` or `["CLIPTextModelWithProjection"]`.
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

fn d_vocab() -> usize {
    49408
}
fn d_hidden() -> usize {
    512
}
fn d_intermediate() -> usize {
    2048
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    8
}
fn d_positions() -> usize {
    77
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}

impl TextEncoderConfig {
    pub fn from_file(path: &Path) -> Result<Self, TextEncoderError> {
        let text = std::fs::read_to_string(path).map_err(|source| TextEncoderError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses config JSON; `path` is used in messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, TextEncoderError> {
        serde_json::from_str(text).map_err(|e| TextEncoderError::Json {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })
    }

    /// Checks every value that changes the computation; returns the activation.
    pub fn validate(&self, path: &Path) -> Result<Activation, TextEncoderError> {
        let p = || path.to_path_buf();
        if let Some(t) = &self.model_type
            && t != "clip_text_model"
        {
            return Err(TextEncoderError::Unsupported {
                path: p(),
                field: "model_type",
                value: format!("\"{t}\""),
                supported: "\"clip_text_model\" (a CLIPTextModel config)",
            });
        }
        let act = match self.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(TextEncoderError::Unsupported {
                    path: p(),
                    field: "hidden_act",
                    value: format!("\"{other}\""),
                    supported: "\"quick_gelu\" and \"gelu\"",
                });
            }
        };
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(TextEncoderError::Invalid {
                    path: p(),
                    message: format!("`{field}` is 0"),
                });
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(TextEncoderError::Invalid {
                path: p(),
                message: format!(
                    "hidden_size = {} is not divisible by num_attention_heads = {}",
                    self.hidden_size, self.num_attention_heads
                ),
            });
        }
        if let Some(e) = self.eos_token_id
            && (e < 0 || e as u64 >= self.vocab_size as u64)
        {
            return Err(TextEncoderError::Invalid {
                path: p(),
                message: format!(
                    "`eos_token_id` = {e} is not a token of the vocabulary (vocab_size = {})\n  hint: CLIP's end token is 49407",
                    self.vocab_size
                ),
            });
        }
        if self.projection_dim == Some(0) {
            return Err(TextEncoderError::Invalid {
                path: p(),
                message: "`projection_dim` is 0".into(),
            });
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return Err(TextEncoderError::Invalid {
                path: p(),
                message: format!(
                    "layer_norm_eps = {} is not a non-negative number",
                    self.layer_norm_eps
                ),
            });
        }
        Ok(act)
    }
}

//! CLIP text encoder (transformers `CLIPTextModel`), read from a pipeline's `text_encoder/`:
//! `config.json` and `model.safetensors` (f32, f16 or bf16, computed in f32; sharded and `.fp16`
//! files are found too). [`TextEncoder::encode`] maps token ids to `last_hidden_state`, the
//! `[batch, seq, hidden]` tensor a Stable Diffusion UNet takes as `encoder_hidden_states`.
//!
//! Tensor names are transformers' (`text_model.embeddings.token_embedding.weight`,
//! `text_model.encoder.layers.{i}.self_attn.q_proj.weight`, ...); files written without the
//! `text_model.` prefix (as recent transformers versions do) are read too. A config value this
//! module does not implement is a [`TextEncoderError::Unsupported`] naming the field; a missing
//! or mis-shaped tensor is an error naming the tensor.
//!
//! Try it: `cargo test --release --test text_encoder` (encodes the fixture prompts with
//! `models/tiny-sd/text_encoder` and compares with transformers).

use crate::exec::{HostTensor, upload};
use crate::weights::{TensorFiles, WeightError};
use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::module::{attention, embedding};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::path::{Path, PathBuf};

mod config;
mod layers;

pub use config::{Activation, TextEncoderConfig};

use layers::{LayerW, LinearW, NormW};

/// Errors raised while opening a text encoder or encoding token ids.
#[derive(Debug, thiserror::Error)]
pub enum TextEncoderError {
    #[error(
        "{path} is not a CLIP text encoder folder: no config.json in it or in its text_encoder/\n  hint: pass a pipeline folder (with text_encoder/) or the text_encoder/ folder itself"
    )]
    NotFound { path: PathBuf },
    #[error(
        "cannot read {path}: {source}\n  hint: point rewire at a diffusers pipeline folder or its text_encoder/ folder"
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
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(transparent)]
    Weight(#[from] WeightError),
    #[error(
        "no token ids to encode (an empty batch or empty prompts)\n  hint: pass at least one tokenized prompt"
    )]
    Empty,
    #[error(
        "prompt {item} has {len} tokens, prompt 0 has {expected}\n  hint: pad every prompt to the same length (the tokenizer pads to max_position_embeddings)"
    )]
    Ragged {
        item: usize,
        len: usize,
        expected: usize,
    },
    #[error(
        "prompt {item} has {len} tokens, more than max_position_embeddings = {max}\n  hint: truncate the prompt to {max} tokens"
    )]
    TooLong { item: usize, len: usize, max: usize },
    #[error(
        "prompt {item}, position {position}: token id {id} is not below vocab_size = {vocab}\n  hint: the tokenizer does not match this text encoder"
    )]
    TokenOutOfRange {
        item: usize,
        position: usize,
        id: u32,
        vocab: usize,
    },
}

/// An opened CLIP text encoder with its weights on a device.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    /// The `text_encoder/` folder read.
    pub dir: PathBuf,
    pub config: TextEncoderConfig,
    act: Activation,
    device: Device,
    /// `[vocab, hidden]`.
    token_embedding: Tensor<2>,
    /// `[max_positions, hidden]`.
    position_embedding: Tensor<2>,
    layers: Vec<LayerW>,
    final_norm: NormW,
    /// `text_projection` transposed to `[hidden, projection_dim]` (no bias), when the model
    /// is a `CLIPTextModelWithProjection`.
    projection: Option<Tensor<2>>,
}

/// What [`TextEncoder::encode_all`] returns: the states a pipeline may condition on.
#[derive(Debug, Clone)]
pub struct TextOutput {
    /// `last_hidden_state`: the last layer's output after `final_layer_norm`
    /// (`[batch, seq, hidden]`; SD 1.x and 2.x condition on it).
    pub last: Tensor<3>,
    /// `hidden_states[-2]`: the output of the second-to-last layer, without the final norm
    /// (the embedding output for a one-layer encoder; SDXL conditions on it).
    pub penultimate: Tensor<3>,
    /// `text_embeds`: `text_projection(last[eos position])`, `[batch, projection_dim]`, for an
    /// encoder with a projection (SDXL's second encoder); `None` otherwise.
    pub pooled: Option<Tensor<2>>,
}

impl TextEncoder {
    /// Opens a pipeline folder (reads its `text_encoder/`) or a text encoder folder, and loads
    /// the weights onto `device`.
    pub fn open(path: &Path, device: &Device) -> Result<Self, TextEncoderError> {
        let dir = crate::weights::component_dir(path, "text_encoder").ok_or_else(|| {
            TextEncoderError::NotFound {
                path: path.to_path_buf(),
            }
        })?;
        let cfg_path = dir.join("config.json");
        let config = TextEncoderConfig::from_file(&cfg_path)?;
        let act = config.validate(&cfg_path)?;
        let files = TensorFiles::open_dir(&dir)?;
        Self::load(dir, config, act, &files, device)
    }

    fn load(
        dir: PathBuf,
        config: TextEncoderConfig,
        act: Activation,
        files: &TensorFiles,
        dev: &Device,
    ) -> Result<Self, TextEncoderError> {
        // transformers 4 writes `text_model.…`; transformers 5 drops the prefix.
        let prefix = if files.names().any(|n| n.starts_with("text_model.")) {
            "text_model."
        } else {
            ""
        };
        let (h, m) = (config.hidden_size, config.intermediate_size);
        let name = |s: &str| format!("{prefix}{s}");
        let token_embedding = upload(
            &[config.vocab_size, h],
            files.read_f32_shaped(
                &name("embeddings.token_embedding.weight"),
                &[config.vocab_size, h],
            )?,
            dev,
        );
        let position_embedding = upload(
            &[config.max_position_embeddings, h],
            files.read_f32_shaped(
                &name("embeddings.position_embedding.weight"),
                &[config.max_position_embeddings, h],
            )?,
            dev,
        );
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = |s: &str| name(&format!("encoder.layers.{i}.{s}"));
                Ok(LayerW {
                    norm1: NormW::load(files, &l("layer_norm1"), h, dev)?,
                    qkv: LinearW::load_qkv(files, &l("self_attn"), h, dev)?,
                    out: LinearW::load(files, &l("self_attn.out_proj"), h, h, dev)?,
                    norm2: NormW::load(files, &l("layer_norm2"), h, dev)?,
                    fc1: LinearW::load(files, &l("mlp.fc1"), h, m, dev)?,
                    fc2: LinearW::load(files, &l("mlp.fc2"), m, h, dev)?,
                })
            })
            .collect::<Result<Vec<_>, WeightError>>()?;
        let extra = name(&format!(
            "encoder.layers.{}.layer_norm1.weight",
            config.num_hidden_layers
        ));
        if files.contains(&extra) {
            return Err(TextEncoderError::Invalid {
                path: dir.join("config.json"),
                message: format!(
                    "`num_hidden_layers` = {} but the weights hold more layers (`{extra}` exists)\n  hint: set num_hidden_layers to the number of encoder.layers.N in the weights",
                    config.num_hidden_layers
                ),
            });
        }
        let final_norm = NormW::load(files, &name("final_layer_norm"), h, dev)?;
        let with_projection = config
            .architectures
            .iter()
            .flatten()
            .any(|a| a == "CLIPTextModelWithProjection");
        let projection = if with_projection || files.contains("text_projection.weight") {
            let p = config.projection_dim.unwrap_or(512);
            let w = files.read_f32_shaped("text_projection.weight", &[p, h])?;
            let mut t = vec![0f32; w.len()];
            for r in 0..p {
                for c in 0..h {
                    t[c * p + r] = w[r * h + c];
                }
            }
            Some(upload(&[h, p], t, dev))
        } else {
            None
        };
        Ok(TextEncoder {
            dir,
            config,
            act,
            device: dev.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_norm,
            projection,
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `last_hidden_state` (`[batch, seq, hidden]`) for a batch of equal-length token id
    /// sequences (no padding mask: pipelines pad with the end token and attend to it, as
    /// diffusers does).
    ///
    /// # Panics
    /// On an empty batch, unequal lengths, a sequence longer than `max_position_embeddings` or a
    /// token id outside the vocabulary; [`TextEncoder::try_encode`] returns these as errors.
    pub fn encode(&self, ids: &[Vec<u32>]) -> Tensor<3> {
        self.try_encode(ids).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`TextEncoder::encode`], with bad token ids as an error.
    pub fn try_encode(&self, ids: &[Vec<u32>]) -> Result<Tensor<3>, TextEncoderError> {
        Ok(self.encode_all(ids)?.last)
    }

    /// Whether the encoder has a `text_projection` (gives [`TextOutput::pooled`]).
    pub fn has_projection(&self) -> bool {
        self.projection.is_some()
    }

    /// Checks a batch of token id sequences and flattens it.
    fn check_ids(&self, ids: &[Vec<u32>]) -> Result<(usize, usize, Vec<i64>), TextEncoderError> {
        let cfg = &self.config;
        let first = ids.first().ok_or(TextEncoderError::Empty)?;
        let (b, s) = (ids.len(), first.len());
        if s == 0 {
            return Err(TextEncoderError::Empty);
        }
        let mut flat = Vec::with_capacity(b * s);
        for (item, seq) in ids.iter().enumerate() {
            if seq.len() != s {
                return Err(TextEncoderError::Ragged {
                    item,
                    len: seq.len(),
                    expected: s,
                });
            }
            if s > cfg.max_position_embeddings {
                return Err(TextEncoderError::TooLong {
                    item,
                    len: s,
                    max: cfg.max_position_embeddings,
                });
            }
            for (position, &id) in seq.iter().enumerate() {
                if id as usize >= cfg.vocab_size {
                    return Err(TextEncoderError::TokenOutOfRange {
                        item,
                        position,
                        id,
                        vocab: cfg.vocab_size,
                    });
                }
                flat.push(id as i64);
            }
        }
        Ok((b, s, flat))
    }

    /// The position each sequence's pooled output is read at, as transformers' `CLIPTextModel`
    /// does: the first end token (`eos_token_id`), or with the legacy `eos_token_id` 2 (or
    /// none in the config) the first position of the largest id.
    fn pool_positions(&self, ids: &[Vec<u32>]) -> Vec<usize> {
        let argmax = |seq: &[u32]| {
            let mut best = 0;
            for (i, &v) in seq.iter().enumerate() {
                if v > seq[best] {
                    best = i;
                }
            }
            best
        };
        ids.iter()
            .map(|seq| match self.config.eos_token_id {
                Some(e) if e != 2 => seq.iter().position(|&v| v as i64 == e).unwrap_or(0),
                _ => argmax(seq),
            })
            .collect()
    }

    /// Encodes a batch of equal-length token id sequences: `last_hidden_state`,
    /// `hidden_states[-2]` and, with a projection, the pooled `text_embeds` (no padding mask:
    /// pipelines pad and attend to the padding, as diffusers does).
    pub fn encode_all(&self, ids: &[Vec<u32>]) -> Result<TextOutput, TextEncoderError> {
        let cfg = &self.config;
        let (b, s, flat) = self.check_ids(ids)?;
        let pool_at = self.pool_positions(ids);
        let ids_t = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, s]), &self.device);
        let pos = self
            .position_embedding
            .clone()
            .narrow(0, 0, s)
            .unsqueeze_dim::<3>(0);
        let mut x = embedding(self.token_embedding.clone(), ids_t) + pos;
        let eps = cfg.layer_norm_eps;
        let heads = cfg.num_attention_heads;
        let n = self.layers.len();
        let mut penultimate = if n == 0 { Some(x.clone()) } else { None };
        for (li, l) in self.layers.iter().enumerate() {
            if li + 1 == n {
                penultimate = Some(x.clone());
            }
            let h = l.qkv.apply(l.norm1.apply(x.clone(), eps));
            let mut qkv = h.chunk(3, 2).into_iter().map(|t| split_heads(t, heads));
            let (q, k, v) = (
                qkv.next().expect("three chunks"),
                qkv.next().expect("three chunks"),
                qkv.next().expect("three chunks"),
            );
            let o = attention(
                q,
                k,
                v,
                None,
                None,
                AttentionModuleOptions {
                    is_causal: true,
                    ..Default::default()
                },
            );
            x = x + l.out.apply(merge_heads(o));
            let h = l.fc1.apply(l.norm2.apply(x.clone(), eps));
            let h = match self.act {
                Activation::QuickGelu => h.clone() * sigmoid(h * 1.702),
                Activation::Gelu => gelu(h),
            };
            x = x + l.fc2.apply(h);
        }
        // hidden_states[-2] of a one-layer encoder is the embedding output; of none, the
        // embedding output too (there is no earlier state).
        let penultimate = penultimate.unwrap_or_else(|| x.clone());
        let last = self.final_norm.apply(x, eps);
        let pooled = self.projection.as_ref().map(|w| {
            let hidden = cfg.hidden_size;
            let rows: Vec<i64> = pool_at
                .iter()
                .enumerate()
                .map(|(i, &p)| (i * s + p) as i64)
                .collect();
            let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [b]), &self.device);
            let picked = last.clone().reshape([b * s, hidden]).select(0, rows);
            picked.matmul(w.clone())
        });
        Ok(TextOutput {
            last,
            penultimate,
            pooled,
        })
    }
}

fn split_heads(t: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, n, c] = t.dims();
    t.reshape([b, n, heads, c / heads]).swap_dims(1, 2)
}

fn merge_heads(t: Tensor<4>) -> Tensor<3> {
    let [b, h, n, d] = t.dims();
    t.swap_dims(1, 2).reshape([b, n, h * d])
}

/// Reads hidden states back to the host as f32.
pub fn hidden_states_to_host(t: Tensor<3>) -> HostTensor {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data after convert");
    HostTensor::new(shape, data)
}

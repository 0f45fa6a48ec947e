//! The typed op graph: one node per op, each carrying its diffusers module path and its output
//! shape, wired by edges that carry the shape flowing along them (tract-style facts). The graph is
//! built for one [`InputSpec`] (batch, latent size, text length), so every shape is concrete.
//! [`Graph::check`] is the consistency check run after construction and after every pass: every
//! wire agrees with its producer and consumer, and every weight exists with the expected shape.
//!
//! Try it: `rewire graph models/tiny-sd --format text`.

pub mod core;
pub mod dump;
pub mod keys;
pub mod patch;

pub use self::core::{Graph, Node, Wire};

use serde::{Deserialize, Serialize};

/// A concrete tensor shape.
pub type Shape = Vec<usize>;

/// Errors found by shape inference or the consistency check.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("{path} ({op}): {message}")]
    Shape {
        path: String,
        op: String,
        message: String,
    },
    #[error(
        "{path} ({op}): wire from `{from}` carries {wire:?} but the producer makes {produced:?}"
    )]
    Wire {
        path: String,
        op: String,
        from: String,
        wire: Shape,
        produced: Shape,
    },
    #[error("{path} ({op}): expects {expected} inputs, found {found}")]
    Arity {
        path: String,
        op: String,
        expected: usize,
        found: usize,
    },
    #[error("the graph has a cycle through {path}")]
    Cycle { path: String },
    #[error(transparent)]
    Weight(#[from] crate::weights::WeightError),
    #[error("{what} = {source}\n  hint: {hint}")]
    Limit {
        what: String,
        source: Box<crate::limits::Exceeded>,
        hint: &'static str,
    },
}

/// What the graph is built for: concrete sizes of every input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    pub batch: usize,
    /// Latent height and width.
    pub height: usize,
    pub width: usize,
    /// Text length (keys of cross-attention), 77 for CLIP.
    pub text_len: usize,
    /// Length of the `timestep` input: 1 (broadcast) or `batch`.
    pub timesteps: usize,
    /// Number of `time_ids` per item for text_time (SDXL: 6).
    pub time_ids: usize,
}

impl InputSpec {
    /// Checks every size against [`crate::limits`] (and that none is 0), before anything is
    /// allocated for it.
    pub fn check(&self) -> Result<(), GraphError> {
        use crate::limits::*;
        for (what, v) in [
            ("batch", self.batch),
            ("latent height", self.height),
            ("latent width", self.width),
            ("text length", self.text_len),
            ("timesteps", self.timesteps),
        ] {
            if v == 0 {
                return Err(GraphError::Shape {
                    path: String::new(),
                    op: "input".into(),
                    message: format!("the {what} is 0; every input size must be at least 1"),
                });
            }
        }
        let lim = |what: &str, v: usize, max: usize, name: &'static str, hint: &'static str| {
            at_most(v, max, name).map_err(|source| GraphError::Limit {
                what: what.into(),
                source: Box::new(source),
                hint,
            })
        };
        lim(
            "batch",
            self.batch,
            MAX_BATCH,
            "MAX_BATCH",
            "run fewer prompts at once (the batch is 2 per prompt with guidance)",
        )?;
        for (what, v) in [("latent height", self.height), ("latent width", self.width)] {
            lim(
                what,
                v,
                MAX_LATENT_SIDE,
                "MAX_LATENT_SIDE",
                "the latent is the image size / 8 (e.g. 64 for 512 pixels)",
            )?;
        }
        lim(
            "latent height × width",
            self.height.saturating_mul(self.width),
            MAX_LATENT_AREA,
            "MAX_LATENT_AREA",
            "the latent is the image size / 8 (e.g. 64×64 for 512×512 pixels)",
        )?;
        lim(
            "text length",
            self.text_len,
            MAX_TEXT_LEN,
            "MAX_TEXT_LEN",
            "CLIP's text length is 77",
        )?;
        lim(
            "timesteps",
            self.timesteps,
            self.batch,
            "MAX_BATCH",
            "the timestep input is [1] or [batch]",
        )?;
        lim(
            "time_ids",
            self.time_ids,
            MAX_TEXT_LEN,
            "MAX_TEXT_LEN",
            "SDXL has 6 time ids",
        )?;
        Ok(())
    }

    pub fn new(batch: usize, height: usize, width: usize) -> Self {
        InputSpec {
            batch,
            height,
            width,
            text_len: 77,
            timesteps: 1,
            time_ids: 6,
        }
    }
}

/// Self- or cross-attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum AttnKind {
    #[serde(rename = "self")]
    SelfAttn,
    #[serde(rename = "cross")]
    Cross,
}

impl std::fmt::Display for AttnKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttnKind::SelfAttn => "self",
            AttnKind::Cross => "cross",
        })
    }
}

/// Where in the UNet a layer sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Place {
    #[serde(rename = "down")]
    Down,
    #[serde(rename = "mid")]
    Mid,
    #[serde(rename = "up")]
    Up,
}

impl Place {
    pub fn of_path(path: &str) -> Place {
        if path.starts_with("down") {
            Place::Down
        } else if path.starts_with("mid") {
            Place::Mid
        } else {
            Place::Up
        }
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Place::Down => "down",
            Place::Mid => "mid",
            Place::Up => "up",
        })
    }
}

/// Facts about one attention layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttnInfo {
    pub kind: AttnKind,
    pub place: Place,
    pub heads: usize,
    pub head_dim: usize,
    pub queries: usize,
    pub keys: usize,
    /// The query grid (height, width) in latent tokens.
    pub grid: (usize, usize),
    /// How many times the latent was downsampled to reach this grid (1, 2, 4, ...).
    pub downsample: usize,
    /// diffusers' upcast_attention (computation here is f32 throughout).
    pub upcast: bool,
}

/// One operation. Every op has exactly one output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A graph input, by name (`sample`, `timestep`, `encoder_hidden_states`, `text_embeds`,
    /// `time_ids`).
    Input {
        name: String,
        shape: Shape,
    },
    /// Sinusoidal timestep projection (diffusers `Timesteps`): `[T]` → `[batch, dim]`, with `T`
    /// 1 (broadcast) or `batch`.
    TimestepProj {
        dim: usize,
        flip_sin_to_cos: bool,
        shift: f64,
        batch: usize,
    },
    /// `y = x Wᵀ + b` on the last axis; weights `path.weight` `[out, in]`, `path.bias` `[out]`.
    Linear {
        in_features: usize,
        out_features: usize,
        bias: bool,
    },
    /// 2-D convolution, NCHW; padding as (top, bottom, left, right).
    Conv2d {
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: [usize; 4],
    },
    GroupNorm {
        groups: usize,
        channels: usize,
        eps: f64,
    },
    LayerNorm {
        dim: usize,
        eps: f64,
    },
    Silu,
    /// diffusers `ResnetBlock2D` (inputs: x, temb).
    Resnet {
        in_channels: usize,
        out_channels: usize,
        temb_channels: usize,
        groups: usize,
        eps: f64,
        output_scale: f64,
    },
    /// `[B, C, H, W]` → `[B, H·W, C]`.
    ToTokens,
    /// `[B, H·W, C]` → `[B, C, H, W]`.
    ToImage {
        height: usize,
        width: usize,
    },
    /// Scaled dot-product attention over heads (inputs: q `[B, Nq, h·d]`, k, v `[B, Nk, h·d]`).
    Attention(AttnInfo),
    /// GEGLU feed-forward (`ff.net.0.proj`, gelu gate, `ff.net.2`).
    FeedForward {
        dim: usize,
        inner: usize,
    },
    /// Elementwise sum of two inputs of one shape, times `scale` (1 for a plain residual).
    Add {
        scale: f64,
    },
    /// Concatenation along `axis`.
    Concat {
        axis: usize,
    },
    /// Nearest-neighbour upsampling to a size.
    Upsample {
        height: usize,
        width: usize,
    },
    /// Reshape to a shape with the same element count.
    Reshape {
        shape: Shape,
    },
    /// A graph output.
    Output {
        name: String,
    },
    /// Multiplies V's rows per batch item and key: `v[b, j, :] *= weights[b·keys + j]`
    /// (a fused non-renormalised reweight: `P·diag(w)·V = P·(w⊙V)`).
    ScaleKeys {
        keys: usize,
        weights: Vec<f32>,
    },
    /// Widens Q per head to fold a score bias into the fused kernel: `[q·√((d+1)/d), 1]`.
    AugmentQ {
        heads: usize,
    },
    /// Widens K per head with a per-key score bias: `[k, bias[b·keys + j]·√(d+1)]`, so that
    /// `softmax(q'·k'/√(d+1)) = softmax(q·k/√d + bias)` (a fused renormalised reweight,
    /// bias = log w).
    AugmentK {
        heads: usize,
        keys: usize,
        bias: Vec<f32>,
    },
    /// Attention probabilities of some batch items (inputs q, k): `[items, heads, Nq, Nk]`.
    AttnProbs {
        heads: usize,
        items: Vec<usize>,
    },
    /// Multiplies probability rows per key (`P[r, :, :, j] *= weights[r·keys + j]`), then
    /// renormalises the rows flagged.
    ProbsReweight {
        keys: usize,
        weights: Vec<f32>,
        renormalize: Vec<bool>,
    },
    /// Row `to` of the probabilities takes row `from`'s values.
    ProbsReplace {
        from: usize,
        to: usize,
    },
    /// Rows `rows` of the probabilities (input 0) take the rows of input 1 in order (maps read
    /// from named state).
    ProbsSet {
        rows: Vec<usize>,
    },
    /// Some rows of the probabilities (the row axis dropped when one row), optionally averaged
    /// over heads: what a Store records.
    ProbsStore {
        rows: Vec<usize>,
        head_mean: bool,
    },
    /// Attention output (inputs q, k, v, P): the given probabilities for `items`, the fused
    /// kernel for every other item.
    AttnMix {
        heads: usize,
        items: Vec<usize>,
    },
    /// Tokens of other batch items concatenated along the sequence: for each source `s`, item
    /// `b` reads item `index[s][b]` (cross-frame and sparse-causal K/V).
    KvGather {
        index: Vec<Vec<usize>>,
    },
    /// tomesd's bipartite soft matching on a metric `[B, N, C]` over an `h × w` token grid:
    /// each `sy × sx` cell's destination token (top-left, or random with `seed`) receives the
    /// most similar other tokens, `r` of them at most. Its output is a merge plan, typed
    /// `[B, N, M]` with `M` the merged token count.
    TomeMatch {
        grid: (usize, usize),
        sx: usize,
        sy: usize,
        r: usize,
        seed: Option<u64>,
    },
    /// Mean-merges tokens by a plan (inputs x `[B, N, C]`, plan `[B, N, M]`): `[B, M, C]`.
    TomeMerge,
    /// Copies merged tokens back to every token they hold (inputs y `[B, M, C]`, plan).
    TomeUnmerge,
}

impl Op {
    /// A short name for listings.
    pub fn name(&self) -> &'static str {
        crate::ops::family(self).name(self)
    }

    /// Number of inputs the op takes.
    pub fn arity(&self) -> usize {
        crate::ops::family(self).arity(self)
    }

    /// The weights the op reads, relative to its path, with their expected shapes: the one
    /// list the loader's check and the lowering both read (see [`crate::ops::Family::weights`]).
    pub fn weights(&self) -> Vec<(&'static str, Shape)> {
        crate::ops::family(self).weights(self)
    }

    /// Infers the output shape from the input shapes; `Err` says what does not fit.
    pub fn infer(&self, inputs: &[&[usize]]) -> Result<Shape, String> {
        self.check_params()?;
        let shape = self.infer_shape(inputs)?;
        if crate::limits::elements(&shape).is_none() {
            return Err(format!(
                "output {shape:?} has more than {} elements (src/limits.rs: MAX_TENSOR_ELEMENTS)",
                crate::limits::MAX_TENSOR_ELEMENTS
            ));
        }
        Ok(shape)
    }

    /// Checks the op's own fields (no shapes involved): what a forged plan could carry that
    /// would divide by zero, loop forever or allocate without bound in inference or a kernel.
    pub fn check_params(&self) -> Result<(), String> {
        crate::ops::family(self).check_params(self)
    }

    fn infer_shape(&self, inputs: &[&[usize]]) -> Result<Shape, String> {
        crate::ops::family(self).infer(self, inputs)
    }

    /// Parameters read by the op.
    pub fn parameters(&self) -> usize {
        self.weights()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Estimated floating-point operations (multiply-adds count 2) for the given output shape.
    pub fn flops(&self, inputs: &[&[usize]], out: &[usize]) -> u64 {
        crate::ops::family(self).flops(self, inputs, out)
    }
}

pub use crate::ops::tome::tome_merged;

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
        match self {
            Op::Input { .. } => "input",
            Op::TimestepProj { .. } => "timestep_proj",
            Op::Linear { .. } => "linear",
            Op::Conv2d { .. } => "conv2d",
            Op::GroupNorm { .. } => "group_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Silu => "silu",
            Op::Resnet { .. } => "resnet",
            Op::ToTokens => "to_tokens",
            Op::ToImage { .. } => "to_image",
            Op::Attention(_) => "attention",
            Op::FeedForward { .. } => "geglu_ff",
            Op::Add { .. } => "add",
            Op::Concat { .. } => "concat",
            Op::Upsample { .. } => "upsample",
            Op::Reshape { .. } => "reshape",
            Op::Output { .. } => "output",
            Op::ScaleKeys { .. } => "scale_keys",
            Op::AugmentQ { .. } => "augment_q",
            Op::AugmentK { .. } => "augment_k",
            Op::AttnProbs { .. } => "attn_probs",
            Op::ProbsReweight { .. } => "probs_reweight",
            Op::ProbsReplace { .. } => "probs_replace",
            Op::ProbsStore { .. } => "probs_store",
            Op::ProbsSet { .. } => "probs_set",
            Op::AttnMix { .. } => "attn_mix",
            Op::KvGather { .. } => "kv_gather",
            Op::TomeMatch { .. } => "tome_match",
            Op::TomeMerge => "tome_merge",
            Op::TomeUnmerge => "tome_unmerge",
        }
    }

    /// Number of inputs the op takes.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input { .. } => 0,
            Op::Resnet { .. }
            | Op::Add { .. }
            | Op::Concat { .. }
            | Op::AttnProbs { .. }
            | Op::ProbsSet { .. }
            | Op::TomeMerge
            | Op::TomeUnmerge => 2,
            Op::Attention(_) => 3,
            Op::AttnMix { .. } => 4,
            _ => 1,
        }
    }

    /// The weights the op reads, relative to its path, with their expected shapes.
    pub fn weights(&self) -> Vec<(&'static str, Shape)> {
        match self {
            Op::Linear {
                in_features,
                out_features,
                bias,
            } => {
                let mut w = vec![("weight", vec![*out_features, *in_features])];
                if *bias {
                    w.push(("bias", vec![*out_features]));
                }
                w
            }
            Op::Conv2d {
                in_channels,
                out_channels,
                kernel,
                ..
            } => vec![
                (
                    "weight",
                    vec![*out_channels, *in_channels, *kernel, *kernel],
                ),
                ("bias", vec![*out_channels]),
            ],
            Op::GroupNorm { channels, .. } => {
                vec![("weight", vec![*channels]), ("bias", vec![*channels])]
            }
            Op::LayerNorm { dim, .. } => vec![("weight", vec![*dim]), ("bias", vec![*dim])],
            Op::Resnet {
                in_channels: i,
                out_channels: o,
                temb_channels: t,
                ..
            } => {
                let mut w = vec![
                    ("norm1.weight", vec![*i]),
                    ("norm1.bias", vec![*i]),
                    ("conv1.weight", vec![*o, *i, 3, 3]),
                    ("conv1.bias", vec![*o]),
                    ("time_emb_proj.weight", vec![*o, *t]),
                    ("time_emb_proj.bias", vec![*o]),
                    ("norm2.weight", vec![*o]),
                    ("norm2.bias", vec![*o]),
                    ("conv2.weight", vec![*o, *o, 3, 3]),
                    ("conv2.bias", vec![*o]),
                ];
                if i != o {
                    w.push(("conv_shortcut.weight", vec![*o, *i, 1, 1]));
                    w.push(("conv_shortcut.bias", vec![*o]));
                }
                w
            }
            Op::FeedForward { dim, inner } => vec![
                ("net.0.proj.weight", vec![2 * inner, *dim]),
                ("net.0.proj.bias", vec![2 * inner]),
                ("net.2.weight", vec![*dim, *inner]),
                ("net.2.bias", vec![*dim]),
            ],
            _ => vec![],
        }
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
        use crate::limits::{MAX_CHANNELS, MAX_HEADS, MAX_KERNEL};
        let want = |cond: bool, msg: String| if cond { Ok(()) } else { Err(msg) };
        let eps_ok = |eps: f64| eps.is_finite() && eps > 0.0;
        let count = |what: &str, v: usize, max: usize, name: &str| {
            want(
                (1..=max).contains(&v),
                format!("{what} = {v} is outside 1..={max} (src/limits.rs: {name})"),
            )
        };
        match self {
            Op::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            } => {
                count("in_channels", *in_channels, MAX_CHANNELS, "MAX_CHANNELS")?;
                count("out_channels", *out_channels, MAX_CHANNELS, "MAX_CHANNELS")?;
                count("kernel", *kernel, MAX_KERNEL, "MAX_KERNEL")?;
                count("stride", *stride, MAX_KERNEL, "MAX_KERNEL")?;
                want(
                    padding.iter().all(|p| p <= kernel),
                    format!("padding {padding:?} is wider than the {kernel}×{kernel} kernel"),
                )
            }
            Op::Linear {
                in_features,
                out_features,
                ..
            } => {
                count(
                    "in_features",
                    *in_features,
                    4 * MAX_CHANNELS,
                    "4·MAX_CHANNELS",
                )?;
                count(
                    "out_features",
                    *out_features,
                    8 * MAX_CHANNELS,
                    "8·MAX_CHANNELS",
                )
            }
            Op::GroupNorm {
                groups,
                channels,
                eps,
            } => {
                count("channels", *channels, MAX_CHANNELS, "MAX_CHANNELS")?;
                want(
                    *groups > 0 && channels.is_multiple_of(*groups),
                    format!("{channels} channels do not split into {groups} groups"),
                )?;
                want(
                    eps_ok(*eps),
                    format!("eps = {eps} is not a finite number > 0"),
                )
            }
            Op::LayerNorm { dim, eps } => {
                count("dim", *dim, 4 * MAX_CHANNELS, "4·MAX_CHANNELS")?;
                want(
                    eps_ok(*eps),
                    format!("eps = {eps} is not a finite number > 0"),
                )
            }
            Op::Resnet {
                in_channels,
                out_channels,
                temb_channels,
                groups,
                eps,
                output_scale,
            } => {
                count("in_channels", *in_channels, MAX_CHANNELS, "MAX_CHANNELS")?;
                count("out_channels", *out_channels, MAX_CHANNELS, "MAX_CHANNELS")?;
                count(
                    "temb_channels",
                    *temb_channels,
                    4 * MAX_CHANNELS,
                    "4·MAX_CHANNELS",
                )?;
                want(
                    *groups > 0
                        && in_channels.is_multiple_of(*groups)
                        && out_channels.is_multiple_of(*groups),
                    format!(
                        "{in_channels} and {out_channels} channels do not split into {groups} groups"
                    ),
                )?;
                want(
                    eps_ok(*eps),
                    format!("eps = {eps} is not a finite number > 0"),
                )?;
                want(
                    output_scale.is_finite() && *output_scale != 0.0,
                    format!("output_scale = {output_scale} is not a finite non-zero number"),
                )
            }
            Op::TimestepProj {
                dim, shift, batch, ..
            } => {
                count("dim", *dim, MAX_CHANNELS, "MAX_CHANNELS")?;
                // SDXL's text_time projection runs over batch × time ids.
                count(
                    "batch",
                    *batch,
                    crate::limits::MAX_BATCH * crate::limits::MAX_TEXT_LEN,
                    "MAX_BATCH·MAX_TEXT_LEN",
                )?;
                want(
                    shift.is_finite() && (((dim / 2) as f64) - shift).abs() > 0.5,
                    format!("shift = {shift} does not fit a {dim}-wide projection"),
                )
            }
            Op::Attention(a) => {
                count("heads", a.heads, MAX_HEADS, "MAX_HEADS")?;
                count("head_dim", a.head_dim, MAX_CHANNELS, "MAX_CHANNELS")
            }
            Op::AugmentQ { heads } | Op::AugmentK { heads, .. } => {
                count("heads", *heads, MAX_HEADS, "MAX_HEADS")?;
                if let Op::AugmentK { bias, .. } = self {
                    want(
                        bias.iter().all(|b| b.is_finite()),
                        "a score bias is not finite".into(),
                    )?;
                }
                Ok(())
            }
            Op::AttnProbs { heads, .. } | Op::AttnMix { heads, .. } => {
                count("heads", *heads, MAX_HEADS, "MAX_HEADS")
            }
            Op::ScaleKeys { weights, .. } | Op::ProbsReweight { weights, .. } => want(
                weights.iter().all(|w| w.is_finite() && *w >= 0.0),
                "a weight is not a finite number ≥ 0".into(),
            ),
            Op::Add { scale } => want(scale.is_finite(), format!("scale = {scale} is not finite")),
            Op::FeedForward { dim, inner } => {
                count("dim", *dim, MAX_CHANNELS, "MAX_CHANNELS")?;
                count("inner", *inner, 8 * MAX_CHANNELS, "8·MAX_CHANNELS")
            }
            Op::ToImage { height, width } | Op::Upsample { height, width } => want(
                *height > 0 && *width > 0,
                format!("size {height}×{width} is empty"),
            ),
            _ => Ok(()),
        }
    }

    fn infer_shape(&self, inputs: &[&[usize]]) -> Result<Shape, String> {
        let want = |cond: bool, msg: String| if cond { Ok(()) } else { Err(msg) };
        match self {
            Op::Input { shape, .. } => Ok(shape.clone()),
            Op::Output { .. } => Ok(inputs[0].to_vec()),
            Op::TimestepProj { dim, batch, .. } => {
                let t = inputs[0];
                want(
                    t.len() == 1 && (t[0] == 1 || t[0] == *batch),
                    format!("timestep must be [1] or [{batch}], got {t:?}"),
                )?;
                Ok(vec![*batch, *dim])
            }
            Op::Linear {
                in_features,
                out_features,
                ..
            } => {
                let x = inputs[0];
                want(
                    x.last() == Some(in_features),
                    format!("input {x:?} does not end in {in_features} features"),
                )?;
                let mut s = x.to_vec();
                *s.last_mut().expect("non-empty") = *out_features;
                Ok(s)
            }
            Op::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            } => {
                let x = inputs[0];
                want(
                    x.len() == 4 && x[1] == *in_channels,
                    format!("input {x:?} is not [B, {in_channels}, H, W]"),
                )?;
                let h = x[2] + padding[0] + padding[1];
                let w = x[3] + padding[2] + padding[3];
                want(
                    h >= *kernel && w >= *kernel,
                    format!("input {x:?} is smaller than the {kernel}×{kernel} kernel"),
                )?;
                Ok(vec![
                    x[0],
                    *out_channels,
                    (h - kernel) / stride + 1,
                    (w - kernel) / stride + 1,
                ])
            }
            Op::GroupNorm {
                groups, channels, ..
            } => {
                let x = inputs[0];
                want(
                    x.len() == 4 && x[1] == *channels && channels % groups == 0,
                    format!("input {x:?} is not [B, {channels}, H, W] in {groups} groups"),
                )?;
                Ok(x.to_vec())
            }
            Op::LayerNorm { dim, .. } => {
                let x = inputs[0];
                want(
                    x.last() == Some(dim),
                    format!("input {x:?} does not end in {dim}"),
                )?;
                Ok(x.to_vec())
            }
            Op::Silu => Ok(inputs[0].to_vec()),
            Op::Resnet {
                in_channels,
                out_channels,
                temb_channels,
                ..
            } => {
                let (x, t) = (inputs[0], inputs[1]);
                want(
                    x.len() == 4 && x[1] == *in_channels,
                    format!("input {x:?} is not [B, {in_channels}, H, W]"),
                )?;
                want(
                    t == [x[0], *temb_channels],
                    format!("time embedding {t:?} is not [{}, {temb_channels}]", x[0]),
                )?;
                Ok(vec![x[0], *out_channels, x[2], x[3]])
            }
            Op::ToTokens => {
                let x = inputs[0];
                want(x.len() == 4, format!("input {x:?} is not [B, C, H, W]"))?;
                Ok(vec![x[0], x[2] * x[3], x[1]])
            }
            Op::ToImage { height, width } => {
                let x = inputs[0];
                want(
                    x.len() == 3 && x[1] == height * width,
                    format!("input {x:?} is not [B, {}, C]", height * width),
                )?;
                Ok(vec![x[0], x[2], *height, *width])
            }
            Op::Attention(a) => {
                let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
                attn_qkv(a.heads, q, k, v)?;
                // A renormalised reweight widens Q and K by one per head (AugmentQ/AugmentK).
                want(
                    q[2] == a.heads * a.head_dim || q[2] == a.heads * (a.head_dim + 1),
                    format!(
                        "query width {} is not {} heads × head_dim {}",
                        q[2], a.heads, a.head_dim
                    ),
                )?;
                Ok(vec![q[0], q[1], v[2]])
            }
            Op::ScaleKeys { keys, weights } => {
                let v = inputs[0];
                want(
                    v.len() == 3 && v[1] == *keys && weights.len() == v[0] * keys,
                    format!(
                        "values {v:?} do not fit {} weights over {keys} keys",
                        weights.len()
                    ),
                )?;
                Ok(v.to_vec())
            }
            Op::AugmentQ { heads } => {
                let q = inputs[0];
                want(
                    q.len() == 3 && q[2].is_multiple_of(*heads),
                    format!("queries {q:?} do not split into {heads} heads"),
                )?;
                Ok(vec![q[0], q[1], q[2] + heads])
            }
            Op::AugmentK { heads, keys, bias } => {
                let k = inputs[0];
                want(
                    k.len() == 3
                        && k[2].is_multiple_of(*heads)
                        && k[1] == *keys
                        && bias.len() == k[0] * keys,
                    format!(
                        "keys {k:?} do not fit {heads} heads and {} biases over {keys} keys",
                        bias.len()
                    ),
                )?;
                Ok(vec![k[0], k[1], k[2] + heads])
            }
            Op::AttnProbs { heads, items } => {
                let (q, k) = (inputs[0], inputs[1]);
                attn_qkv(*heads, q, k, k)?;
                want(
                    !items.is_empty() && items.iter().all(|&i| i < q[0]),
                    format!("items {items:?} outside the batch of {}", q[0]),
                )?;
                Ok(vec![items.len(), *heads, q[1], k[1]])
            }
            Op::ProbsReweight {
                keys,
                weights,
                renormalize,
            } => {
                let p = inputs[0];
                want(
                    p.len() == 4
                        && p[3] == *keys
                        && weights.len() == p[0] * keys
                        && renormalize.len() == p[0],
                    format!(
                        "probabilities {p:?} do not fit {} weights over {keys} keys",
                        weights.len()
                    ),
                )?;
                Ok(p.to_vec())
            }
            Op::ProbsReplace { from, to } => {
                let p = inputs[0];
                want(
                    p.len() == 4 && *from < p[0] && *to < p[0],
                    format!("rows {from} → {to} outside probabilities {p:?}"),
                )?;
                Ok(p.to_vec())
            }
            Op::ProbsSet { rows } => {
                let (p, s) = (inputs[0], inputs[1]);
                want(
                    p.len() == 4
                        && s.len() == 4
                        && s[0] == rows.len()
                        && s[1..] == p[1..]
                        && rows.iter().all(|&r| r < p[0]),
                    format!(
                        "maps {s:?} do not fit rows {rows:?} of probabilities {p:?} (need [{}, heads, queries, keys] alike)",
                        rows.len()
                    ),
                )?;
                Ok(p.to_vec())
            }
            Op::ProbsStore { rows, head_mean } => {
                let p = inputs[0];
                want(
                    p.len() == 4 && !rows.is_empty() && rows.iter().all(|&r| r < p[0]),
                    format!("rows {rows:?} outside probabilities {p:?}"),
                )?;
                let mut s = vec![rows.len()];
                if !head_mean {
                    s.push(p[1]);
                }
                s.extend([p[2], p[3]]);
                if rows.len() == 1 {
                    s.remove(0);
                }
                Ok(s)
            }
            Op::KvGather { index } => {
                let x = inputs[0];
                // Every source lists one input item per output item (the output may have
                // fewer or more items than the input: a window's carried frames).
                want(
                    x.len() == 3
                        && !index.is_empty()
                        && !index[0].is_empty()
                        && index
                            .iter()
                            .all(|ix| ix.len() == index[0].len() && ix.iter().all(|&i| i < x[0])),
                    format!(
                        "input {x:?} does not fit a gather over {} sources",
                        index.len()
                    ),
                )?;
                Ok(vec![index[0].len(), x[1] * index.len(), x[2]])
            }
            Op::TomeMatch {
                grid, sx, sy, r, ..
            } => {
                let x = inputs[0];
                want(
                    x.len() == 3 && x[1] == grid.0 * grid.1,
                    format!("metric {x:?} is not [B, {}·{}, C]", grid.0, grid.1),
                )?;
                want(
                    *sx > 0 && *sy > 0 && *sx <= grid.1 && *sy <= grid.0,
                    format!("{sx}×{sy} cells do not fit the {}×{} grid", grid.1, grid.0),
                )?;
                Ok(vec![
                    x[0],
                    x[1],
                    x[1] - tome_merged(x[1], *grid, *sx, *sy, *r),
                ])
            }
            Op::TomeMerge => {
                let (x, p) = (inputs[0], inputs[1]);
                want(
                    x.len() == 3 && p.len() == 3 && x[0] == p[0] && x[1] == p[1],
                    format!("tokens {x:?} do not fit the merge plan {p:?}"),
                )?;
                Ok(vec![x[0], p[2], x[2]])
            }
            Op::TomeUnmerge => {
                let (y, p) = (inputs[0], inputs[1]);
                want(
                    y.len() == 3 && p.len() == 3 && y[0] == p[0] && y[1] == p[2],
                    format!("merged tokens {y:?} do not fit the merge plan {p:?}"),
                )?;
                Ok(vec![y[0], p[1], y[2]])
            }
            Op::AttnMix { heads, items } => {
                let (q, k, v, p) = (inputs[0], inputs[1], inputs[2], inputs[3]);
                attn_qkv(*heads, q, k, v)?;
                want(
                    p == [items.len(), *heads, q[1], k[1]],
                    format!(
                        "probabilities {p:?} are not [{}, {heads}, {}, {}]",
                        items.len(),
                        q[1],
                        k[1]
                    ),
                )?;
                want(
                    items.iter().all(|&i| i < q[0]),
                    format!("items {items:?} outside the batch of {}", q[0]),
                )?;
                Ok(vec![q[0], q[1], v[2]])
            }
            Op::FeedForward { dim, .. } => {
                let x = inputs[0];
                want(
                    x.last() == Some(dim),
                    format!("input {x:?} does not end in {dim}"),
                )?;
                Ok(x.to_vec())
            }
            Op::Add { .. } => {
                want(
                    inputs[0] == inputs[1],
                    format!("operands {:?} and {:?} differ", inputs[0], inputs[1]),
                )?;
                Ok(inputs[0].to_vec())
            }
            Op::Concat { axis } => {
                let (a, b) = (inputs[0], inputs[1]);
                let same_rank = a.len() == b.len() && *axis < a.len();
                let others = same_rank
                    && a.iter()
                        .zip(b)
                        .enumerate()
                        .all(|(i, (x, y))| i == *axis || x == y);
                want(
                    others,
                    format!("cannot concatenate {a:?} and {b:?} along axis {axis}"),
                )?;
                let mut s = a.to_vec();
                s[*axis] += b[*axis];
                Ok(s)
            }
            Op::Upsample { height, width } => {
                let x = inputs[0];
                want(x.len() == 4, format!("input {x:?} is not [B, C, H, W]"))?;
                Ok(vec![x[0], x[1], *height, *width])
            }
            Op::Reshape { shape } => {
                let n: usize = inputs[0].iter().product();
                want(
                    crate::limits::elements(shape) == Some(n),
                    format!("cannot reshape {:?} to {shape:?}", inputs[0]),
                )?;
                Ok(shape.clone())
            }
        }
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
        let n = |s: &[usize]| s.iter().product::<usize>() as u64;
        match self {
            Op::Linear {
                in_features,
                out_features,
                ..
            } => 2 * n(out) / *out_features as u64 * (*in_features * *out_features) as u64,
            Op::Conv2d {
                in_channels,
                kernel,
                ..
            } => 2 * n(out) * (*in_channels * kernel * kernel) as u64,
            Op::Resnet {
                in_channels: i,
                out_channels: o,
                ..
            } => {
                let hw = (out[2] * out[3] * out[0]) as u64;
                let short = if i != o { 2 * hw * (*i * *o) as u64 } else { 0 };
                2 * hw * (*o * *i * 9 + *o * *o * 9) as u64 + short
            }
            Op::Attention(a) => {
                let b = inputs[0][0] as u64;
                4 * b * (a.heads * a.queries * a.keys * a.head_dim) as u64
            }
            Op::AttnProbs { heads, .. } => 2 * n(out) * (inputs[0][2] / heads) as u64,
            Op::AttnMix { heads, .. } => {
                2 * n(inputs[3]) * (inputs[2][2] / heads) as u64 + {
                    let b = inputs[0][0] as u64;
                    let rest = b.saturating_sub(inputs[3][0] as u64);
                    4 * rest * (inputs[0][1] * inputs[1][1] * inputs[0][2]) as u64
                }
            }
            Op::FeedForward { dim, inner } => {
                let tokens = n(out) / *dim as u64;
                2 * tokens * (*dim * 2 * inner + inner * dim) as u64
            }
            _ => n(out),
        }
    }
}

/// How many of `n` tokens tomesd's matching merges: `r`, at most the non-destination tokens.
pub fn tome_merged(n: usize, grid: (usize, usize), sx: usize, sy: usize, r: usize) -> usize {
    let dst = (grid.0 / sy.max(1)) * (grid.1 / sx.max(1));
    r.min(n.saturating_sub(dst))
}

/// Checks the q, k, v shapes of one attention: `[B, Nq, h·dq]`, `[B, Nk, h·dq]`, `[B, Nk, h·dv]`.
fn attn_qkv(heads: usize, q: &[usize], k: &[usize], v: &[usize]) -> Result<(), String> {
    let ok = q.len() == 3
        && k.len() == 3
        && v.len() == 3
        && q[2].is_multiple_of(heads)
        && v[2].is_multiple_of(heads)
        && k[2] == q[2]
        && k[0] == q[0]
        && v[0] == q[0]
        && v[1] == k[1];
    if ok {
        Ok(())
    } else {
        Err(format!(
            "query {q:?}, key {k:?}, value {v:?} are not [B, Nq, {heads}·dq], [B, Nk, {heads}·dq], [B, Nk, {heads}·dv]"
        ))
    }
}

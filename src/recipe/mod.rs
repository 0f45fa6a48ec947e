//! The recipe language: a `.ron` file naming a list of rewrites, each selecting attention layers
//! (path globs, kind, place, query bounds), a step range and a CFG branch, and an op. Parsing keeps
//! source positions so that every error says `recipe.ron:LINE:COL`, what is wrong and what to do.
//! The grammar is documented in `docs/recipes.md`.
//!
//! Try it: `rewire check rewrites/reweight.ron --model models/tiny-sd`.

pub mod select;
mod source;
pub mod spans;

pub use source::{Source, at};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Errors in a recipe, located in its source.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{col}: {message}\n  hint: {hint}", file.display())]
    At {
        file: PathBuf,
        line: usize,
        col: usize,
        /// A stable name for the problem, for programs (`no-match`, `bad-glob`, ...).
        code: &'static str,
        message: String,
        hint: String,
    },
}

impl RecipeError {
    /// The problem's code, if located.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            RecipeError::At { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A recipe: a name and its rewrites, applied in order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    #[serde(default)]
    pub rewrites: Vec<Rewrite>,
}

/// One rewrite: where, when, on which half of the batch, and what.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    #[serde(default)]
    pub select: Select,
    #[serde(default)]
    pub steps: Option<Steps>,
    /// The CFG half, written `branch: Both`; unset means the op's default ([`Rewrite::branch`]).
    #[serde(default, with = "written", skip_serializing_if = "Option::is_none")]
    pub branch: Option<Branch>,
    /// The pass of a multi-pass job the rewrite belongs to, written `pass: "invert"` (`rewire
    /// video edit` runs `"invert"` then `"edit"`); unset: every pass.
    #[serde(default, with = "written", skip_serializing_if = "Option::is_none")]
    pub pass: Option<String>,
    pub op: RewriteOp,
    /// Explicit order among rewrites landing on one layer whose order matters (lower first).
    #[serde(default)]
    pub order: Option<i32>,
}

/// Optional fields written as plain values (`branch: Both`, not `Some(Both)`); absent is `None`.
mod written {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        T::deserialize(d).map(Some)
    }

    pub fn serialize<S: Serializer, T: Serialize>(b: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => b.serialize(s),
            None => s.serialize_none(),
        }
    }
}

impl Rewrite {
    /// The CFG half the rewrite applies to: as written, else the op's default — the whole batch
    /// for ops that change token counts or act on the whole batch (MergeTokens, MergeKv,
    /// ReplaceKv — frame groups and reference passes span both CFG halves —, Cache: what a
    /// tomesd, Text2Video-Zero or DeepCache user means), the cond half for the others.
    pub fn branch(&self) -> Branch {
        self.branch.unwrap_or(match &self.op {
            RewriteOp::MergeKv { .. }
            | RewriteOp::MergeTokens { .. }
            | RewriteOp::Cache { .. }
            | RewriteOp::ReplaceKv { .. } => Branch::Both,
            _ => Branch::Cond,
        })
    }

    /// Whether the rewrite applies in pass `pass` (`None`: a single-pass job, where every
    /// rewrite applies).
    pub fn in_pass(&self, pass: Option<&str>) -> bool {
        match (&self.pass, pass) {
            (Some(mine), Some(p)) => mine == p,
            _ => true,
        }
    }
}

/// Which attention layers a rewrite applies to. Every given criterion must hold; an empty
/// `Select()` selects every attention layer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Select {
    /// Globs over diffusers paths (`*` matches any run of characters, dots included).
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub kind: Option<Kind>,
    #[serde(default)]
    pub place: Vec<PlaceSel>,
    #[serde(default)]
    pub max_queries: Option<usize>,
    #[serde(default)]
    pub min_queries: Option<usize>,
    /// Only layers whose query grid is the latent downsampled at most this many times (1 = full
    /// resolution), like tomesd's max_downsample.
    #[serde(default)]
    pub max_downsample: Option<usize>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Kind {
    #[serde(rename = "Self")]
    SelfAttn,
    Cross,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum PlaceSel {
    Down,
    Mid,
    Up,
}

/// A denoising step range, half-open: `Indices(0, 2)` is steps 0 and 1; `Fraction(0.0, 0.4)` is
/// steps `floor(0.0·N) .. floor(0.4·N)` of an N-step run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub enum Steps {
    Indices(usize, usize),
    Fraction(f64, f64),
}

impl Steps {
    /// The half-open range of step indices in an `n`-step run.
    pub fn range(&self, n: usize) -> (usize, usize) {
        match *self {
            Steps::Indices(a, b) => (a, b),
            Steps::Fraction(a, b) => (
                (a * n as f64 + 1e-9).floor() as usize,
                (b * n as f64 + 1e-9).floor() as usize,
            ),
        }
    }
}

/// Which half of a classifier-free-guidance batch (diffusers order: `[uncond..., cond...]`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Branch {
    #[default]
    Cond,
    Uncond,
    Both,
}

impl Branch {
    /// The batch items of this branch in a batch of `b` (a batch of 1 is all cond).
    pub fn items(&self, b: usize) -> Vec<usize> {
        if b == 1 {
            return match self {
                Branch::Uncond => vec![],
                _ => vec![0],
            };
        }
        let half = b / 2;
        match self {
            Branch::Cond => (half..b).collect(),
            Branch::Uncond => (0..half).collect(),
            Branch::Both => (0..b).collect(),
        }
    }
}

/// One item of the batch, by absolute index.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchItem(pub usize);

/// Where a store's maps are kept between passes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum StoreOn {
    #[default]
    Device,
    /// A temporary file, deleted when the job ends.
    Disk,
}

/// Where replaced maps come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum MapSource {
    /// Another item of the batch.
    BatchItem(usize),
    /// The maps a `Store(name: ...)` recorded (named state).
    Stored(String),
}

/// What a store records.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum StoreWhat {
    /// `[heads, queries, keys]` per item.
    #[default]
    Probs,
    /// The mean over heads, `[queries, keys]` per item.
    HeadMean,
}

/// How a store combines the steps of a run.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Reduce {
    /// The last step's maps.
    #[default]
    Last,
    /// The mean over the steps the rewrite is active in (prompt-to-prompt's AttentionStore).
    Mean,
    /// The sum over those steps.
    Sum,
    /// Every step's maps, kept by the step's timestep: a later pass reads, at each of its
    /// steps, the maps stored at the same timestep (FateZero: inversion → edit).
    Each,
}

fn default_store_name() -> String {
    "probs".into()
}
fn two() -> usize {
    2
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

/// Which frame of the same group (`[uncond f0..fN-1, cond f0..fN-1]`) a frame reads K/V from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum FrameSrc {
    /// Frame 0 (Text2Video-Zero's cross-frame attention).
    First,
    /// The previous frame, clipped to frame 0 (same as `Offset(-1)`).
    Prev,
    /// Frame `N / 2`.
    Mid,
    /// Frame `N − 1`.
    Last,
    /// Frame `i + k`, clipped to the clip.
    Offset(i64),
}

impl FrameSrc {
    /// The frame that frame `i` of `n` reads.
    pub fn frame(&self, i: usize, n: usize) -> usize {
        let last = n as i64 - 1;
        let f = match *self {
            FrameSrc::First => 0,
            FrameSrc::Prev => i as i64 - 1,
            FrameSrc::Mid => (n / 2) as i64,
            FrameSrc::Last => last,
            FrameSrc::Offset(k) => (i as i64).saturating_add(k),
        };
        f.clamp(0, last) as usize
    }
}

/// Where replaced K/V come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum KvSource {
    /// Other frames of the batch, concatenated along the sequence in the order given.
    Frames(Vec<FrameSrc>),
    /// Named state: the K/V input recorded at the same layer by an earlier pass of the job
    /// (`Stored("reference")`: the reference pass, run on the reference image). `Reference(..)`
    /// is the older spelling of the same source.
    #[serde(alias = "Reference")]
    Stored(String),
}

/// Whether replaced K/V stand alone or are joined to the layer's own.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum KvMode {
    #[default]
    Replace,
    /// The source's K/V first, then the layer's own.
    ConcatWithSelf,
}

/// The op a rewrite inserts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub enum RewriteOp {
    /// prompt-to-prompt's equalizer: cross-attention probabilities multiplied per key token,
    /// optionally renormalised per query row.
    Reweight {
        #[serde(default)]
        tokens: BTreeMap<usize, f32>,
        #[serde(default)]
        words: BTreeMap<String, f32>,
        #[serde(default)]
        renormalize: bool,
    },
    /// Records attention probabilities as `probs.<layer path>`.
    Store {
        #[serde(default = "default_store_name")]
        name: String,
        #[serde(default)]
        what: StoreWhat,
        #[serde(default)]
        reduce: Reduce,
        #[serde(default)]
        max_queries: Option<usize>,
        /// Where a `reduce: Each` store keeps its maps between passes: on the device (default)
        /// or spilled to a file on disk (read back step by step: memory that does not grow
        /// with the run).
        #[serde(default)]
        on: StoreOn,
    },
    /// prompt-to-prompt word swap: item `to` attends with item `from`'s probabilities; or, with
    /// `from: Stored("name")`, the branch's items attend with the maps a `Store(name: "name")`
    /// recorded in an earlier pass (item k of the branch takes stored row k; at each step the
    /// maps stored at the same timestep when the store is `reduce: Each`) or at earlier steps.
    ReplaceMaps {
        from: MapSource,
        /// The item replaced, for `from: BatchItem(...)`; unset for `Stored` (the branch).
        #[serde(default, with = "written", skip_serializing_if = "Option::is_none")]
        to: Option<BatchItem>,
        /// Also replace self-attention maps, on layers with at most this many queries.
        #[serde(default)]
        self_max_queries: Option<usize>,
    },
    /// Self-attention K/V taken from other frames or from a reference pass.
    ReplaceKv {
        source: KvSource,
        #[serde(default)]
        mode: KvMode,
        /// Frames per group for `Frames` sources (else `--frames`).
        #[serde(default)]
        frames: Option<usize>,
    },
    /// ToMe on K and V only: tomesd's bipartite matching computed from the layer input merges
    /// the K/V tokens before the projections; Q keeps every token; no unmerge.
    MergeKv {
        ratio: f64,
        #[serde(default = "two")]
        sx: usize,
        #[serde(default = "two")]
        sy: usize,
        /// Random destination per cell (seeded) instead of the top-left token.
        #[serde(default)]
        random: Option<u64>,
    },
    /// tomesd: merge the block's tokens before its attention (`attn`), cross-attention
    /// (`cross`) and feed-forward (`mlp`), unmerge after; blocks downsampled at most
    /// `max_downsample` times.
    MergeTokens {
        ratio: f64,
        #[serde(default = "two")]
        sx: usize,
        #[serde(default = "two")]
        sy: usize,
        #[serde(default = "one")]
        max_downsample: usize,
        #[serde(default = "yes")]
        attn: bool,
        #[serde(default)]
        cross: bool,
        #[serde(default)]
        mlp: bool,
    },
    /// DeepCache: at every `interval`-th step (steps 0, interval, 2·interval, …) the whole UNet
    /// runs and records the features entering shallow branch `branch`; the steps between run
    /// only the shallow part (time embedding, conv_in, the shallow down layers whose skips the
    /// shallow up layers read, those up layers, conv_out) on the recorded features. `branch` is
    /// DeepCache's `cache_branch_id`: block `branch / 3` from the outside, layer `branch % 3`
    /// counted from that up block's last layer. Acts on the whole UNet: no select or steps.
    Cache {
        interval: usize,
        #[serde(default)]
        branch: usize,
    },
}

impl RewriteOp {
    pub fn name(&self) -> &'static str {
        match self {
            RewriteOp::Reweight { .. } => "Reweight",
            RewriteOp::Store { .. } => "Store",
            RewriteOp::ReplaceMaps { .. } => "ReplaceMaps",
            RewriteOp::ReplaceKv { .. } => "ReplaceKv",
            RewriteOp::MergeKv { .. } => "MergeKv",
            RewriteOp::MergeTokens { .. } => "MergeTokens",
            RewriteOp::Cache { .. } => "Cache",
        }
    }

    /// Whether the op changes what attention attends to (K/V or the token set).
    pub fn is_kv(&self) -> bool {
        matches!(
            self,
            RewriteOp::ReplaceKv { .. } | RewriteOp::MergeKv { .. } | RewriteOp::MergeTokens { .. }
        )
    }
}

//! The resolved UNet config ([`Resolved`]): every per-block fact the graph builder needs,
//! checked.
//!
//! Try it: `rewire inspect models/tiny-sd`.

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

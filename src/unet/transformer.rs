//! `Transformer2DModel` and `BasicTransformerBlock`: group norm, proj_in (1×1 conv or linear),
//! per block self-attention (`attn1`), cross-attention (`attn2`) and the GEGLU feed-forward, each
//! with its residual, then proj_out and the outer residual. Attention is split into its
//! `to_q`/`to_k`/`to_v` projections, the attention core (the node rewrites target, at the
//! `attnN` path) and `to_out.0`, so rewrites can act on the K/V input, the probabilities or V.
//!
//! Try it: `rewire inspect models/tiny-sd`.

use super::Ctx;
use crate::graph::{AttnInfo, AttnKind, Graph, GraphError, Op, Place};
use petgraph::stable_graph::NodeIndex;

/// One attention layer at `path`: `x` are the queries' tokens, `kv` the keys' and values'.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    g: &mut Graph,
    path: &str,
    kind: AttnKind,
    dim: usize,
    kv_dim: usize,
    heads: usize,
    upcast: bool,
    grid: (usize, usize),
    x: NodeIndex,
    kv: NodeIndex,
) -> Result<NodeIndex, GraphError> {
    let inner = dim; // diffusers: heads × (channels / heads)
    let lin = |i, o, bias| Op::Linear {
        in_features: i,
        out_features: o,
        bias,
    };
    let q = g.add(format!("{path}.to_q"), lin(dim, inner, false), &[x])?;
    let k = g.add(format!("{path}.to_k"), lin(kv_dim, inner, false), &[kv])?;
    let v = g.add(format!("{path}.to_v"), lin(kv_dim, inner, false), &[kv])?;
    let spec = g.spec;
    let info = AttnInfo {
        kind,
        place: Place::of_path(path),
        heads,
        head_dim: inner / heads,
        queries: g.node(x).shape[1],
        keys: g.node(kv).shape[1],
        grid,
        // The stride-2 convs round up: the level is the power of two whose ceil-division of
        // the latent gives this grid.
        downsample: (0..16)
            .map(|l| 1usize << l)
            .find(|p| spec.height.div_ceil(*p) == grid.0)
            .unwrap_or(1),
        upcast,
    };
    let a = g.add(path, Op::Attention(info), &[q, k, v])?;
    g.add(format!("{path}.to_out.0"), lin(inner, dim, true), &[a])
}

/// A `Transformer2DModel` at `path` over an image `x` of `channels` channels.
#[allow(clippy::too_many_arguments)]
pub fn transformer_2d(
    g: &mut Graph,
    ctx: &Ctx,
    path: &str,
    channels: usize,
    heads: usize,
    depth: usize,
    cross_dim: usize,
    only_cross: bool,
    x: NodeIndex,
) -> Result<NodeIndex, GraphError> {
    let cfg = ctx.cfg;
    let (h, w) = (g.node(x).shape[2], g.node(x).shape[3]);
    let residual = x;
    let n = g.add(
        format!("{path}.norm"),
        Op::GroupNorm {
            groups: cfg.norm_groups,
            channels,
            eps: 1e-6,
        },
        &[x],
    )?;
    let mut t = if cfg.use_linear_projection {
        let t = g.add(path, Op::ToTokens, &[n])?;
        g.add(
            format!("{path}.proj_in"),
            Op::Linear {
                in_features: channels,
                out_features: channels,
                bias: true,
            },
            &[t],
        )?
    } else {
        let c = g.add(
            format!("{path}.proj_in"),
            Op::Conv2d {
                in_channels: channels,
                out_channels: channels,
                kernel: 1,
                stride: 1,
                padding: [0; 4],
            },
            &[n],
        )?;
        g.add(path, Op::ToTokens, &[c])?
    };
    let context_dim = g.node(ctx.context).shape[2];
    if context_dim != cross_dim {
        return Err(GraphError::Shape {
            path: path.into(),
            op: "transformer".into(),
            message: format!(
                "encoder_hidden_states have {context_dim} features but this block's cross_attention_dim is {cross_dim}"
            ),
        });
    }
    for k in 0..depth {
        let bp = format!("{path}.transformer_blocks.{k}");
        let ln = |g: &mut Graph, name: &str, x| {
            g.add(
                format!("{bp}.{name}"),
                Op::LayerNorm {
                    dim: channels,
                    eps: 1e-5,
                },
                &[x],
            )
        };
        let n1 = ln(g, "norm1", t)?;
        let (kind1, kv1, kv1_dim) = if only_cross {
            (AttnKind::Cross, ctx.context, cross_dim)
        } else {
            (AttnKind::SelfAttn, n1, channels)
        };
        let a1 = attention(
            g,
            &format!("{bp}.attn1"),
            kind1,
            channels,
            kv1_dim,
            heads,
            cfg.upcast_attention,
            (h, w),
            n1,
            kv1,
        )?;
        t = g.add(format!("{bp}.attn1"), Op::Add { scale: 1.0 }, &[a1, t])?;
        let n2 = ln(g, "norm2", t)?;
        let a2 = attention(
            g,
            &format!("{bp}.attn2"),
            AttnKind::Cross,
            channels,
            cross_dim,
            heads,
            cfg.upcast_attention,
            (h, w),
            n2,
            ctx.context,
        )?;
        t = g.add(format!("{bp}.attn2"), Op::Add { scale: 1.0 }, &[a2, t])?;
        let n3 = ln(g, "norm3", t)?;
        let f = g.add(
            format!("{bp}.ff"),
            Op::FeedForward {
                dim: channels,
                inner: channels * 4,
            },
            &[n3],
        )?;
        t = g.add(format!("{bp}.ff"), Op::Add { scale: 1.0 }, &[f, t])?;
    }
    let out = if cfg.use_linear_projection {
        let p = g.add(
            format!("{path}.proj_out"),
            Op::Linear {
                in_features: channels,
                out_features: channels,
                bias: true,
            },
            &[t],
        )?;
        g.add(
            path,
            Op::ToImage {
                height: h,
                width: w,
            },
            &[p],
        )?
    } else {
        let im = g.add(
            path,
            Op::ToImage {
                height: h,
                width: w,
            },
            &[t],
        )?;
        g.add(
            format!("{path}.proj_out"),
            Op::Conv2d {
                in_channels: channels,
                out_channels: channels,
                kernel: 1,
                stride: 1,
                padding: [0; 4],
            },
            &[im],
        )?
    };
    g.add(path, Op::Add { scale: 1.0 }, &[out, residual])
}

//! Down, mid and up blocks: resnets, their transformers, down/up sampling and the skip
//! concatenations, named as diffusers names them.
//!
//! Try it: `rewire graph models/tiny-sd --format text | grep up_blocks.1`.

use super::{Ctx, transformer};
use crate::config::{BlockKind, BlockSpec, MidSpec};
use crate::graph::{Graph, GraphError, Op};
use petgraph::stable_graph::NodeIndex;

fn resnet(
    g: &mut Graph,
    ctx: &Ctx,
    path: String,
    in_channels: usize,
    out_channels: usize,
    output_scale: f64,
    x: NodeIndex,
) -> Result<NodeIndex, GraphError> {
    g.add(
        path,
        Op::Resnet {
            in_channels,
            out_channels,
            temb_channels: ctx.cfg.time_embed_dim,
            groups: ctx.cfg.norm_groups,
            eps: ctx.cfg.norm_eps,
            output_scale,
        },
        &[x, ctx.temb],
    )
}

/// A down block; pushes every output that a later up block reads onto `skips`.
pub fn down_block(
    g: &mut Graph,
    ctx: &Ctx,
    i: usize,
    blk: &BlockSpec,
    mut x: NodeIndex,
    skips: &mut Vec<NodeIndex>,
) -> Result<NodeIndex, GraphError> {
    let base = format!("down_blocks.{i}");
    for j in 0..blk.layers {
        let cin = if j == 0 {
            blk.in_channels
        } else {
            blk.out_channels
        };
        x = resnet(
            g,
            ctx,
            format!("{base}.resnets.{j}"),
            cin,
            blk.out_channels,
            ctx.cfg.resnet_out_scale_factor,
            x,
        )?;
        if blk.kind == BlockKind::CrossAttn {
            x = transformer::transformer_2d(
                g,
                ctx,
                &format!("{base}.attentions.{j}"),
                blk.out_channels,
                blk.heads,
                blk.transformer_layers[j],
                blk.cross_attention_dim,
                blk.only_cross_attention,
                x,
            )?;
        }
        skips.push(x);
    }
    if blk.resample {
        let p = ctx.cfg.downsample_padding;
        // diffusers pads (0, 1, 0, 1) itself when downsample_padding is 0.
        let padding = if p == 0 { [0, 1, 0, 1] } else { [p; 4] };
        x = g.add(
            format!("{base}.downsamplers.0.conv"),
            Op::Conv2d {
                in_channels: blk.out_channels,
                out_channels: blk.out_channels,
                kernel: 3,
                stride: 2,
                padding,
            },
            &[x],
        )?;
        skips.push(x);
    }
    Ok(x)
}

/// `UNetMidBlock2DCrossAttn` (or `UNetMidBlock2D`).
pub fn mid_block(
    g: &mut Graph,
    ctx: &Ctx,
    mid: &MidSpec,
    x: NodeIndex,
) -> Result<NodeIndex, GraphError> {
    let c = mid.channels;
    let scale = ctx.cfg.mid_block_scale_factor;
    let mut x = resnet(g, ctx, "mid_block.resnets.0".into(), c, c, scale, x)?;
    if mid.with_attention {
        x = transformer::transformer_2d(
            g,
            ctx,
            "mid_block.attentions.0",
            c,
            mid.heads,
            mid.transformer_layers,
            mid.cross_attention_dim,
            false,
            x,
        )?;
    }
    resnet(g, ctx, "mid_block.resnets.1".into(), c, c, scale, x)
}

/// An up block; pops the skips it concatenates.
pub fn up_block(
    g: &mut Graph,
    ctx: &Ctx,
    i: usize,
    blk: &BlockSpec,
    mut x: NodeIndex,
    skips: &mut Vec<NodeIndex>,
) -> Result<NodeIndex, GraphError> {
    let base = format!("up_blocks.{i}");
    for j in 0..blk.layers {
        let skip = skips.pop().ok_or_else(|| GraphError::Shape {
            path: format!("{base}.resnets.{j}"),
            op: "concat".into(),
            message: "no skip connection left: down and up blocks do not mirror each other".into(),
        })?;
        let cat = g.add(
            format!("{base}.resnets.{j}"),
            Op::Concat { axis: 1 },
            &[x, skip],
        )?;
        let cin = g.node(cat).shape[1];
        x = resnet(
            g,
            ctx,
            format!("{base}.resnets.{j}"),
            cin,
            blk.out_channels,
            ctx.cfg.resnet_out_scale_factor,
            cat,
        )?;
        if blk.kind == BlockKind::CrossAttn {
            x = transformer::transformer_2d(
                g,
                ctx,
                &format!("{base}.attentions.{j}"),
                blk.out_channels,
                blk.heads,
                blk.transformer_layers[j],
                blk.cross_attention_dim,
                blk.only_cross_attention,
                x,
            )?;
        }
    }
    if blk.resample {
        // diffusers upsamples to the size of the next skip (forward_upsample_size), which is
        // exactly 2× whenever the latent divides evenly.
        let (h, w) = match skips.last() {
            Some(&s) => (g.node(s).shape[2], g.node(s).shape[3]),
            None => (g.node(x).shape[2] * 2, g.node(x).shape[3] * 2),
        };
        x = g.add(
            format!("{base}.upsamplers.0"),
            Op::Upsample {
                height: h,
                width: w,
            },
            &[x],
        )?;
        x = g.add(
            format!("{base}.upsamplers.0.conv"),
            Op::Conv2d {
                in_channels: blk.out_channels,
                out_channels: blk.out_channels,
                kernel: 3,
                stride: 1,
                padding: [1; 4],
            },
            &[x],
        )?;
    }
    Ok(x)
}

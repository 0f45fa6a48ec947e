//! Timestep embedding (`time_proj` + `time_embedding`) and SDXL's text_time embedding
//! (`add_time_proj` + `add_embedding`).
//!
//! Try it: `rewire graph models/tiny-sd --format text | head`.

use crate::config::{Resolved, TextTimeSpec};
use crate::graph::{Graph, GraphError, Op};
use petgraph::stable_graph::NodeIndex;

/// `TimestepEmbedding`: linear_1, silu, linear_2 under `path`.
fn mlp(
    g: &mut Graph,
    path: &str,
    input_dim: usize,
    dim: usize,
    x: NodeIndex,
) -> Result<NodeIndex, GraphError> {
    let h = g.add(
        format!("{path}.linear_1"),
        Op::Linear {
            in_features: input_dim,
            out_features: dim,
            bias: true,
        },
        &[x],
    )?;
    let h = g.add(path, Op::Silu, &[h])?;
    g.add(
        format!("{path}.linear_2"),
        Op::Linear {
            in_features: dim,
            out_features: dim,
            bias: true,
        },
        &[h],
    )
}

/// `time_proj` then `time_embedding`: `[T]` → `[B, time_embed_dim]`.
pub fn time_embedding(
    g: &mut Graph,
    cfg: &Resolved,
    timestep: NodeIndex,
) -> Result<NodeIndex, GraphError> {
    let c0 = cfg.block_out_channels[0];
    let t = g.add(
        "time_proj",
        Op::TimestepProj {
            dim: c0,
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            shift: cfg.freq_shift,
            batch: g.spec.batch,
        },
        &[timestep],
    )?;
    mlp(g, "time_embedding", c0, cfg.time_embed_dim, t)
}

/// SDXL's `add_time_proj(time_ids.flatten())` concatenated after `text_embeds`, then
/// `add_embedding`: the result is added to the time embedding.
pub fn text_time_embedding(
    g: &mut Graph,
    cfg: &Resolved,
    tt: &TextTimeSpec,
) -> Result<NodeIndex, GraphError> {
    let spec = g.spec;
    let b = spec.batch;
    let n_ids = spec.time_ids;
    let text_dim = tt
        .input_dim
        .checked_sub(n_ids * tt.time_embed_dim)
        .filter(|&d| d > 0)
        .ok_or_else(|| GraphError::Shape {
            path: "add_embedding".into(),
            op: "text_time".into(),
            message: format!(
                "projection_class_embeddings_input_dim {} leaves no room for text_embeds after {n_ids} time ids × {}",
                tt.input_dim, tt.time_embed_dim
            ),
        })?;
    let text = g.add(
        "",
        Op::Input {
            name: "text_embeds".into(),
            shape: vec![b, text_dim],
        },
        &[],
    )?;
    let ids = g.add(
        "",
        Op::Input {
            name: "time_ids".into(),
            shape: vec![b, n_ids],
        },
        &[],
    )?;
    let flat = g.add(
        "add_time_proj",
        Op::Reshape {
            shape: vec![b * n_ids],
        },
        &[ids],
    )?;
    let proj = g.add(
        "add_time_proj",
        Op::TimestepProj {
            dim: tt.time_embed_dim,
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            shift: cfg.freq_shift,
            batch: b * n_ids,
        },
        &[flat],
    )?;
    let proj = g.add(
        "add_time_proj",
        Op::Reshape {
            shape: vec![b, n_ids * tt.time_embed_dim],
        },
        &[proj],
    )?;
    let cat = g.add("add_embedding", Op::Concat { axis: 1 }, &[text, proj])?;
    mlp(g, "add_embedding", tt.input_dim, cfg.time_embed_dim, cat)
}

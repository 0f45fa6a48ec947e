//! The diffusers `UNet2DConditionModel`, built as a typed op graph from its real `config.json`,
//! with node paths equal to the checkpoint's module paths so weights map with no remapping.
//! One file per component, as in diffusers: time and text_time embeddings
//! ([`embeddings`]), resnets and sampling ([`blocks`]), `Transformer2DModel` and its attention
//! ([`transformer`]).
//!
//! Try it: `rewire inspect models/tiny-sd --size 16x16 --batch 2`.

pub mod blocks;
pub mod embeddings;
pub mod transformer;

use crate::config::{ConfigError, Resolved, UNetConfig};
use crate::graph::{Graph, GraphError, InputSpec, Op};
use crate::weights::{TensorFiles, WeightError};
use petgraph::stable_graph::NodeIndex;
use std::path::{Path, PathBuf};

/// Errors raised while opening a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "{path} is not a diffusers UNet folder: no config.json in it or in its unet/\n  hint: pass a pipeline folder (with unet/) or the unet/ folder itself"
    )]
    NotFound { path: PathBuf },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weight(#[from] WeightError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(
        "{weights} holds {count} tensors that the config.json beside it does not build, e.g. `{example}`\n  hint: the config's layer counts ({field}) do not match the checkpoint; use the config.json that came with these weights"
    )]
    Unused {
        weights: PathBuf,
        count: usize,
        example: String,
        field: &'static str,
    },
}

/// An opened UNet: config, resolved facts and memory-mapped weights.
#[derive(Debug)]
pub struct UNet {
    pub dir: PathBuf,
    pub config: UNetConfig,
    pub resolved: Resolved,
    pub weights: TensorFiles,
}

impl UNet {
    /// Opens a pipeline folder (reads its `unet/`) or a UNet folder.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let dir =
            crate::weights::component_dir(path, "unet").ok_or_else(|| ModelError::NotFound {
                path: path.to_path_buf(),
            })?;
        let cfg_path = dir.join("config.json");
        let config = UNetConfig::from_file(&cfg_path)?;
        let resolved = config.resolve(&cfg_path)?;
        let weights = TensorFiles::open_dir(&dir)?;
        check_layer_counts(&resolved, &weights)?;
        Ok(UNet {
            dir,
            config,
            resolved,
            weights,
        })
    }

    /// Builds the graph for an input spec and runs the consistency check, weights included.
    pub fn graph(&self, spec: InputSpec) -> Result<Graph, ModelError> {
        let g = build(&self.resolved, spec)?;
        g.check(Some(&self.weights as &dyn crate::weights::WeightSource))?;
        Ok(g)
    }

    /// A fingerprint of the resolved config and the weights (see [`TensorFiles::fingerprint`]).
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(serde_json::to_string(&self.resolved).unwrap_or_default());
        h.update(self.weights.fingerprint());
        format!("{:x}", h.finalize())
    }
}

/// The config's layer counts against the checkpoint: every tensor of a block layer
/// (`down_blocks.*`, `mid_block.*`, `up_blocks.*`) must be read by the graph the config builds.
/// (Missing tensors are found by the graph's weight check.)
fn check_layer_counts(cfg: &Resolved, weights: &TensorFiles) -> Result<(), ModelError> {
    let g = build(cfg, InputSpec::new(1, 8, 8))?;
    let used: std::collections::HashSet<String> =
        g.weight_list().into_iter().map(|(n, _)| n).collect();
    let mut unused: Vec<&str> = weights
        .names()
        .filter(|n| {
            (n.starts_with("down_blocks.")
                || n.starts_with("mid_block.")
                || n.starts_with("up_blocks."))
                && !used.contains(*n)
        })
        .collect();
    if unused.is_empty() {
        return Ok(());
    }
    unused.sort();
    let has = |part: &str| unused.iter().find(|n| n.contains(part)).copied();
    let (field, example) = if let Some(e) = has(".resnets.") {
        ("layers_per_block", e)
    } else if let Some(e) = has(".transformer_blocks.") {
        ("transformer_layers_per_block", e)
    } else if let Some(e) = has(".attentions.") {
        ("down_block_types / up_block_types / mid_block_type", e)
    } else {
        ("block_out_channels", unused[0])
    };
    let example = example.to_string();
    Err(ModelError::Unused {
        weights: weights.origin().to_path_buf(),
        count: unused.len(),
        example,
        field,
    })
}

/// Builds the whole UNet graph for a resolved config and an input spec.
pub fn build(cfg: &Resolved, spec: InputSpec) -> Result<Graph, GraphError> {
    spec.check()?;
    let mut g = Graph::new(spec);
    let b = spec.batch;
    let sample = g.add(
        "",
        Op::Input {
            name: "sample".into(),
            shape: vec![b, cfg.in_channels, spec.height, spec.width],
        },
        &[],
    )?;
    let timestep = g.add(
        "",
        Op::Input {
            name: "timestep".into(),
            shape: vec![spec.timesteps],
        },
        &[],
    )?;
    let context = g.add(
        "",
        Op::Input {
            name: "encoder_hidden_states".into(),
            shape: vec![b, spec.text_len, cfg.context_dim],
        },
        &[],
    )?;

    let temb = embeddings::time_embedding(&mut g, cfg, timestep)?;
    let temb = match &cfg.text_time {
        Some(tt) => {
            let aug = embeddings::text_time_embedding(&mut g, cfg, tt)?;
            g.add("add_embedding", Op::Add { scale: 1.0 }, &[temb, aug])?
        }
        None => temb,
    };

    let k = cfg.conv_in_kernel;
    let mut x = g.add(
        "conv_in",
        Op::Conv2d {
            in_channels: cfg.in_channels,
            out_channels: cfg.block_out_channels[0],
            kernel: k,
            stride: 1,
            padding: [k / 2; 4],
        },
        &[sample],
    )?;
    let ctx = Ctx {
        cfg,
        temb,
        context,
        spec,
    };

    let mut skips: Vec<NodeIndex> = vec![x];
    for (i, blk) in cfg.down.iter().enumerate() {
        x = blocks::down_block(&mut g, &ctx, i, blk, x, &mut skips)?;
    }
    if let Some(mid) = &cfg.mid {
        x = blocks::mid_block(&mut g, &ctx, mid, x)?;
    }
    for (i, blk) in cfg.up.iter().enumerate() {
        x = blocks::up_block(&mut g, &ctx, i, blk, x, &mut skips)?;
    }
    let c0 = cfg.block_out_channels[0];
    x = g.add(
        "conv_norm_out",
        Op::GroupNorm {
            groups: cfg.norm_groups,
            channels: c0,
            eps: cfg.norm_eps,
        },
        &[x],
    )?;
    x = g.add("conv_act", Op::Silu, &[x])?;
    let k = cfg.conv_out_kernel;
    x = g.add(
        "conv_out",
        Op::Conv2d {
            in_channels: c0,
            out_channels: cfg.out_channels,
            kernel: k,
            stride: 1,
            padding: [k / 2; 4],
        },
        &[x],
    )?;
    g.add("", Op::Output { name: "out".into() }, &[x])?;
    Ok(g)
}

/// What every block needs from the whole model.
pub struct Ctx<'a> {
    pub cfg: &'a Resolved,
    pub temb: NodeIndex,
    pub context: NodeIndex,
    pub spec: InputSpec,
}

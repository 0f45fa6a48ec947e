//! The shapes the recipe and graph commands work on: the input spec of `--size HxW --batch N`
//! (default: the config's sample_size), the batch `--prompt` implies, the recipe's words bound
//! to the last prompt, and the recipe compiled for all of it (`check`, `explain`, `diff`,
//! `compile`).
//!
//! Try it: `cargo run --release -- explain rewrites/p2p_store.ron --model models/tiny-sd --size 8x8`.

use crate::clip::tokenizer::{Tokenizer, TokenizerError};
use crate::compile::{self, CompileError, CompileOptions, Compiled};
use crate::graph::{Graph, GraphError, InputSpec};
use crate::recipe::{RecipeError, Source};
use crate::size::{self, Order, SizeError};
use crate::unet::{ModelError, UNet};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A shape argument refused, or the model, recipe or compile failing.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error("--batch must be at least 1")]
    NoBatch,
    #[error("--batch {batch} --size {h}x{w}: {refused}")]
    Spec {
        batch: usize,
        h: usize,
        w: usize,
        refused: Box<GraphError>,
    },
    #[error(
        "--batch {batch} and {prompts} --prompt{} disagree\n  hint: with guidance a run's batch is twice its prompts ({}); give one of them",
        if *.prompts == 1 { "" } else { "s" },
        2 * .prompts
    )]
    Batch { batch: usize, prompts: usize },
    #[error("--prompt binds words with the pipeline's tokenizer, and {model} has none")]
    Tokenizer {
        model: PathBuf,
        #[source]
        source: TokenizerError,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Compile(#[from] CompileError),
}

/// What a recipe is compiled for (the flags `check`, `explain`, `diff` and `compile` share).
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// Latent size HxW (default: the config's sample_size).
    pub size: Option<String>,
    /// Batch size (default 2; with prompts, twice their number).
    pub batch: Option<usize>,
    /// The prompts of the run; the recipe's words bind to the last one.
    pub prompt: Vec<String>,
    /// Text length (keys of cross-attention).
    pub text_len: usize,
    pub steps: Option<usize>,
    pub frames: Option<usize>,
    /// The pass to compile (default: the last the recipe names).
    pub pass: Option<String>,
}

/// The latent size of the config's sample_size (64×64 without one).
pub fn default_size(unet: &UNet) -> (usize, usize) {
    match &unet.config.sample_size {
        Some(serde_json::Value::Number(n)) => {
            let n = n.as_u64().unwrap_or(64) as usize;
            (n, n)
        }
        Some(serde_json::Value::Array(a)) if a.len() == 2 => (
            a[0].as_u64().unwrap_or(64) as usize,
            a[1].as_u64().unwrap_or(64) as usize,
        ),
        _ => (64, 64),
    }
}

/// The input spec of `--size HxW` (default: the config's) and `--batch`, checked.
pub fn spec_for(unet: &UNet, size: Option<&str>, batch: usize) -> Result<InputSpec, ShapeError> {
    let (h, w) = match size {
        Some(s) => size::parse("--size", s, Order::HxW)?,
        None => default_size(unet),
    };
    if batch == 0 {
        return Err(ShapeError::NoBatch);
    }
    let spec = InputSpec::new(batch, h, w);
    spec.check().map_err(|refused| ShapeError::Spec {
        batch,
        h,
        w,
        refused: Box::new(refused),
    })?;
    Ok(spec)
}

/// The model at `model` and its graph for `--size` and `--batch`.
pub fn open_graph(
    model: &Path,
    size: Option<&str>,
    batch: usize,
) -> Result<(UNet, Graph), ShapeError> {
    let unet = UNet::open(model)?;
    let spec = spec_for(&unet, size, batch)?;
    let graph = unet.graph(spec)?;
    Ok((unet, graph))
}

impl Shape {
    /// The batch a recipe is compiled for: `--batch`, else twice the prompts (CFG), else 2.
    pub fn batch(&self) -> Result<usize, ShapeError> {
        match (self.batch, self.prompt.len()) {
            (Some(b), 0) => Ok(b),
            (None, 0) => Ok(2),
            (None, p) => Ok(2 * p),
            (Some(b), p) if b == 2 * p => Ok(b),
            (Some(batch), prompts) => Err(ShapeError::Batch { batch, prompts }),
        }
    }

    /// The recipe's words bound to the last prompt (with the pipeline's tokenizer).
    pub fn words(&self, model: &Path) -> Result<Option<HashMap<String, Vec<usize>>>, ShapeError> {
        let Some(last) = self.prompt.last() else {
            return Ok(None);
        };
        let tok =
            Tokenizer::open(&model.join("tokenizer")).map_err(|source| ShapeError::Tokenizer {
                model: model.into(),
                source,
            })?;
        Ok(Some(tok.word_positions(last)))
    }
}

/// The recipe at `recipe` compiled on the model at `model` for `shape`.
pub fn compile_for(
    recipe: &Path,
    model: &Path,
    shape: &Shape,
    fuse: bool,
    require_bound_words: bool,
) -> Result<(UNet, Source, Compiled), ShapeError> {
    let words = shape.words(model)?;
    let unet = UNet::open(model)?;
    let mut spec = spec_for(&unet, shape.size.as_deref(), shape.batch()?)?;
    spec.text_len = shape.text_len;
    let src = Source::load(recipe)?;
    let opts = CompileOptions {
        fuse,
        steps: shape.steps,
        require_bound_words,
        words,
        frames: shape.frames,
        references: None,
        pass: shape.pass.clone(),
        passes: Vec::new(),
        stop_after: None,
    };
    let c = compile::compile(&src, &unet, spec, &opts)?;
    Ok((unet, src, c))
}

//! The `run` command's job around the [`Pipeline`]: the recipe or the plan file it applies
//! (a plan checked against the run's shapes, UNet calls and prompt), and its outputs written
//! all or nothing: the pictures, the Store rewrites' maps and a heat-map PNG per prompt.
//!
//! Try it: `cargo run --release -- run models/shapes-sd --recipe rewrites/p2p_store.ron --prompt "a red circle on the left" -o store.png`.

use crate::compile::Compiled;
use crate::compile::plan_file::{PlanError, PlanFile};
use crate::graph::keys::Key;
use crate::picture::{self, PictureError};
use crate::pipeline::{Pipeline, PipelineError, RunOptions, RunOutput};
use crate::recipe::{RecipeError, Source};
use crate::unet::ModelError;
use crate::weights::{Staged, WeightError, encode_f32, write_error};
use std::path::{Path, PathBuf};

/// Why a run's recipe or plan could not be applied, or its outputs not written.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Pipeline(Box<PipelineError>),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Picture(#[from] PictureError),
    #[error(transparent)]
    Weights(#[from] WeightError),
}

impl From<PipelineError> for RunError {
    fn from(e: PipelineError) -> RunError {
        RunError::Pipeline(Box::new(e))
    }
}

/// The recipe at `recipe` compiled for the run, or the plan at `plan` checked against it.
pub fn compiled(
    pipe: &Pipeline,
    opts: &RunOptions,
    recipe: Option<&Path>,
    plan: Option<&Path>,
) -> Result<Option<Compiled>, RunError> {
    Ok(match (recipe, plan) {
        (Some(r), _) => Some(pipe.compile(opts, &Source::load(r)?)?),
        (None, Some(p)) => {
            let plan = PlanFile::load(p, &pipe.unet.fingerprint())?;
            let spec = pipe.unet_spec(opts)?;
            // Steps here are UNet calls: PNDM makes one more, image to image fewer.
            let calls = pipe.schedule(opts)?.1.len();
            plan.check_run(
                p,
                spec,
                Some(calls),
                opts.prompts.last().map(|s| s.as_str()),
            )?;
            Some(plan.compiled(p, &pipe.unet.graph(spec)?)?)
        }
        (None, None) => None,
    })
}

/// `out` with `suffix` after its stem and extension `ext`.
pub fn sibling(out: &Path, suffix: &str, ext: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    out.with_file_name(format!("{stem}{suffix}.{ext}"))
}

/// What a run wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// Every file, in the order staged.
    pub paths: Vec<PathBuf>,
    /// How many stored maps the `.store.safetensors` file holds.
    pub stored: usize,
}

/// Writes a run's pictures (`output`, or NAME_0.png, NAME_1.png, ... for several prompts), its
/// stored maps (NAME.store.safetensors) and the heat maps of each prompt's aggregated
/// cross-attention (NAME_heat.png, NAME_i_heat.png). Every output is staged under a temporary
/// name and renamed into place only when all of them are written.
pub fn write(output: &Path, out: &RunOutput) -> Result<Written, RunError> {
    let mut staged = Staged::new();
    let stage = |staged: &mut Staged, path: &Path, bytes: &[u8]| {
        staged.stage(path, bytes).map_err(|e| write_error(path, e))
    };
    let several = out.images.len() > 1;
    let mut rgb = Vec::new();
    for (i, img) in out.images.iter().enumerate() {
        let path = if several {
            sibling(output, &format!("_{i}"), "png")
        } else {
            output.to_path_buf()
        };
        let im = picture::to_rgb(img)?;
        stage(&mut staged, &path, &picture::png_bytes(&im, &path)?)?;
        rgb.push(im);
    }
    let mut stored = 0;
    if !out.stores.is_empty() {
        let path = sibling(output, ".store", "safetensors");
        let t: Vec<(String, Vec<usize>, Vec<f32>)> = out
            .stores
            .iter()
            .map(|(k, v)| (k.clone(), v.shape.clone(), v.data.clone()))
            .collect();
        stage(&mut staged, &path, &encode_f32(&path, &t)?)?;
        stored = t.len();
        for (i, im) in rgb.iter().enumerate() {
            let key = out.stores.keys().find(
                |k| matches!(Key::parse(k), Key::AggregateCross { prompt, .. } if prompt == i),
            );
            if let Some(key) = key {
                let tiles = picture::heat_maps(&out.stores[key], &out.tokens[i], im, 128)?;
                let suffix = if several {
                    format!("_{i}_heat")
                } else {
                    "_heat".into()
                };
                let path = sibling(output, &suffix, "png");
                stage(&mut staged, &path, &picture::png_bytes(&tiles, &path)?)?;
            }
        }
    }
    let paths: Vec<PathBuf> = staged.paths().map(Path::to_path_buf).collect();
    staged.commit().map_err(|e| write_error(output, e))?;
    Ok(Written { paths, stored })
}

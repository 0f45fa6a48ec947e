//! FateZero's edit of a clip (`rewire video edit`): both passes compiled from one recipe
//! (`pass: "invert"`, `pass: "edit"`), what the edit reads checked against what the inversion
//! writes, the job's memory estimated before anything is allocated, then the DDIM inversion of
//! the frames (stores recording) and the guided edit (rewrites reading them).
//!
//! Try it: `rewire video edit models/shapes-sd docs/video/frames_in --source-prompt "a red circle" --prompt "a blue circle" -o edit.gif`.

use crate::exec::HostTensor;
use crate::pipeline::{Pipeline, PipelineError, RunOptions};
use crate::recipe::Source;

/// FateZero's built-in recipe (`rewire video edit`): sparse-causal attention in both passes,
/// maps stored while inverting and read while editing.
pub const FATEZERO: &str = include_str!("../../rewrites/fatezero.ron");

/// The passes of `rewire video edit`, in order: the inversion (the recipe's stores record),
/// then the edit (its rewrites read them).
pub const EDIT_PASSES: [&str; 2] = ["invert", "edit"];

/// FateZero's edit of a clip.
#[derive(Debug, Clone)]
pub struct EditOptions {
    /// The prompt describing the clip (the inversion's).
    pub source_prompt: String,
    /// The prompt of the edit.
    pub prompt: String,
    pub negative: Option<String>,
    pub steps: usize,
    pub guidance: f32,
    pub weights: crate::exec::WeightDtype,
}

/// What an edit produced.
#[derive(Debug, Clone)]
pub struct Edited {
    /// The inversion of the frames (with what the recipe stored).
    pub inversion: crate::invert::Inversion,
    /// The edit's latents after each step, `[F, C, h, w]`.
    pub latents_per_step: Vec<HostTensor>,
    /// The edited frames `[H, W, 3]` in [0, 1].
    pub frames: Vec<HostTensor>,
}

/// FateZero: the frames are VAE-encoded and DDIM-inverted as one batch under the source prompt
/// while the recipe's `pass: "invert"` rewrites apply and its stores record; then the inverted
/// latents are denoised with classifier-free guidance (DDIM, the inversion's schedule run
/// backwards) under the edit prompt while its `pass: "edit"` rewrites apply and read the stored
/// maps (named state). Rewrites without a pass apply to both. `recipe: None` is the plain
/// per-frame edit. Both passes are compiled, their state checked against each other and the
/// memory estimated before anything is encoded. `progress(pass, step, total)` after each step.
pub fn edit(
    pipe: &Pipeline,
    opts: &EditOptions,
    recipe: Option<&Source>,
    frames: &[HostTensor],
    progress: impl FnMut(&str, usize, usize),
) -> Result<Edited, PipelineError> {
    let first = frames.first().ok_or(PipelineError::NoPicture)?;
    let [h, w, 3] = first.shape[..] else {
        return Err(PipelineError::PictureSizes {
            index: 0,
            found: first.shape.clone(),
            expected: vec![0, 0, 3],
        });
    };
    let f = pipe.vae.downsample_factor();
    let (lh, lw) = (h / f, w / f);
    let job = prepare(pipe, opts, recipe, frames.len(), lh, lw)?;
    let latents_0 = crate::invert::encode(pipe, &inversion_options(opts), frames)?;
    run_prepared(pipe, opts, job, latents_0, progress)
}

fn inversion_options(opts: &EditOptions) -> crate::invert::InvertOptions {
    crate::invert::InvertOptions {
        prompt: opts.source_prompt.clone(),
        steps: opts.steps,
        weights: opts.weights,
    }
}

/// As [`edit`], from the frames' latents `[F, C, h, w]` (already encoded).
pub fn edit_latents(
    pipe: &Pipeline,
    opts: &EditOptions,
    recipe: Option<&Source>,
    latents_0: HostTensor,
    progress: impl FnMut(&str, usize, usize),
) -> Result<Edited, PipelineError> {
    let [n, _, lh, lw] = crate::invert::latents_dims(pipe, &latents_0)?;
    let job = prepare(pipe, opts, recipe, n, lh, lw)?;
    run_prepared(pipe, opts, job, latents_0, progress)
}

/// Both passes of an edit, compiled and checked.
struct Prepared {
    inv: Option<crate::compile::Compiled>,
    run: RunOptions,
    edit: Option<crate::compile::Compiled>,
}

/// Compiles both passes for `n` frames of `lh`×`lw` latents, checks that what the edit reads
/// is what the inversion writes (shapes, timesteps), and that the job fits in memory.
fn prepare(
    pipe: &Pipeline,
    opts: &EditOptions,
    recipe: Option<&Source>,
    n: usize,
    lh: usize,
    lw: usize,
) -> Result<Prepared, PipelineError> {
    let f = pipe.vae.downsample_factor();
    let (h, w) = (lh * f, lw * f);
    let passes: Vec<String> = EDIT_PASSES.iter().map(|p| p.to_string()).collect();
    let inv_run = RunOptions {
        frames: Some(n),
        pass: Some(EDIT_PASSES[0].into()),
        passes: passes.clone(),
        ..inversion_options(opts).run_options(n, w, h)
    };
    let inv = recipe.map(|r| pipe.compile(&inv_run, r)).transpose()?;
    let run = RunOptions {
        prompts: vec![opts.prompt.clone(); n],
        negative: opts.negative.clone(),
        steps: opts.steps,
        guidance: opts.guidance,
        // DDIM: the edit runs the inversion's schedule backwards, whatever the pipeline's
        // scheduler (the stored maps are read at the same timesteps).
        scheduler: Some("ddim".into()),
        size: Some((w, h)),
        weights: opts.weights,
        frames: Some(n),
        pass: Some(EDIT_PASSES[1].into()),
        passes,
        ..Default::default()
    };
    let edit = recipe.map(|r| pipe.compile(&run, r)).transpose()?;
    if let (Some(i), Some(e)) = (&inv, &edit) {
        let inv_t = crate::scheduler::DdimInverse::from_config(&pipe.scheduler)
            .and_then(|mut s| s.set_timesteps(opts.steps).map(|()| s.timesteps().to_vec()))
            .map_err(|e| PipelineError::Component {
                component: "scheduler",
                message: e.to_string(),
            })?;
        let edit_t = pipe.schedule(&run)?.1;
        crate::compile::store::check_passes(i, &inv_t, e, &edit_t)?;
    }
    // What the job will hold, before anything is allocated.
    let need = edit_memory(pipe, &inv_run, inv.as_ref(), &run, edit.as_ref())?;
    if let Some(avail) = crate::limits::available_memory()
        && need.total() > avail
    {
        let mib = |b: u64| b >> 20;
        return Err(PipelineError::Memory {
            what: format!("editing {n} frames"),
            need_mib: mib(need.total()),
            available_mib: mib(avail),
            detail: format!(
                "activations {} MiB, stores kept in memory {} MiB; the weights ({} MiB) are loaded already",
                mib(need.activations),
                mib(need.stores),
                mib(need.weights)
            ),
            hint: if need.stores > 0 {
                "spill the recipe's stores to disk (Store(..., reduce: Each, on: Disk)), or edit fewer frames at a time".into()
            } else {
                "edit fewer frames at a time".into()
            },
        });
    }
    Ok(Prepared { inv, run, edit })
}

fn run_prepared(
    pipe: &Pipeline,
    opts: &EditOptions,
    job: Prepared,
    latents_0: HostTensor,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<Edited, PipelineError> {
    let inversion = crate::invert::invert_with(
        pipe,
        &inversion_options(opts),
        latents_0,
        job.inv.as_ref(),
        |i, k| progress(EDIT_PASSES[0], i, k),
    )?;
    let run = RunOptions {
        latents: Some(inversion.latents().clone()),
        ..job.run
    };
    let out = pipe.run_reading(&run, job.edit.as_ref(), &inversion.stored, |i, k| {
        progress(EDIT_PASSES[1], i, k)
    })?;
    Ok(Edited {
        inversion,
        latents_per_step: out.latents_per_step,
        frames: out.images,
    })
}

/// The memory an edit holds at most, estimated before it allocates (f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EditMemory {
    /// The most bytes of UNet values alive at once, over both passes' graphs.
    pub activations: u64,
    /// The UNet's weights.
    pub weights: u64,
    /// The recipe's `reduce: Each` stores kept in memory (every step's maps).
    pub stores: u64,
    /// Those spilled to disk (`on: Disk`).
    pub stores_on_disk: u64,
}

impl EditMemory {
    /// What the job will add to the memory in use once the model is loaded: the activations
    /// and the stores kept in memory (the weights are held already).
    pub fn total(&self) -> u64 {
        self.activations + self.stores
    }
}

/// Estimates an edit's memory from the compiled passes (`None`: plain UNet graphs).
pub fn edit_memory(
    pipe: &Pipeline,
    inv_run: &RunOptions,
    inv: Option<&crate::compile::Compiled>,
    run: &RunOptions,
    edit: Option<&crate::compile::Compiled>,
) -> Result<EditMemory, PipelineError> {
    let mut activations = 0usize;
    for (opts, c) in [(inv_run, inv), (run, edit)] {
        let graphs: Vec<crate::graph::Graph> = match c {
            Some(c) => c.segments.iter().map(|s| s.graph.clone()).collect(),
            None => vec![pipe.unet.graph(pipe.unet_spec(opts)?)?],
        };
        for g in &graphs {
            activations = activations.max(crate::exec::activation_bytes(g)?);
        }
    }
    let (mut stores, mut stores_on_disk) = (0u64, 0u64);
    if let Some(c) = inv {
        for s in crate::compile::state::slots(c) {
            if s.kind
                == (crate::compile::state::SlotKind::Store {
                    reduce: crate::recipe::Reduce::Each,
                })
            {
                if c.spill.contains(&s.name) {
                    stores_on_disk += s.bytes as u64;
                } else {
                    stores += s.bytes as u64;
                }
            }
        }
    }
    Ok(EditMemory {
        activations: activations as u64,
        // Held as f32 on the device (the CPU backend's weights, the host copies).
        weights: pipe
            .unet
            .weights
            .names()
            .filter_map(|n| pipe.unet.weights.shape(n))
            .map(|s| s.iter().product::<usize>() as u64 * 4)
            .sum(),
        stores,
        stores_on_disk,
    })
}

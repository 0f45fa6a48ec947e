//! FateZero's edit of a clip (`rewire video edit`): both passes compiled from one recipe
//! (`pass: "invert"`, `pass: "edit"`), what the edit reads checked against what the inversion
//! writes, the job's memory estimated before anything is allocated, then the DDIM inversion of
//! the frames (stores recording) and the guided edit (rewrites reading them).
//!
//! Try it: `rewire video edit models/shapes-sd docs/video/frames_in --source-prompt "a red circle" --prompt "a blue circle" -o edit.gif`.

use crate::compile::store::Stored;
use crate::exec::HostTensor;
use crate::pipeline::{Pipeline, PipelineError, RunOptions};
use crate::recipe::Source;
use std::ops::Range;

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
    /// Frames per window (`None` or 0: the whole clip as one batch). Windows run in order and
    /// carry the anchor and previous frame's K/V (see [`super::window`]): the same edit in the
    /// memory of one window.
    pub window: Option<usize>,
    /// Keep every step's latents ([`Edited::latents_per_step`], the inversion's); else only
    /// the final inverted latents, so that the host holds nothing that grows with the steps.
    pub keep_latents_per_step: bool,
}

/// What an edit produced.
#[derive(Debug, Clone)]
pub struct Edited {
    /// The inversion of the frames (with what the recipe stored: with windows, the last
    /// window's maps; every other window's were freed after its edit).
    pub inversion: crate::invert::Inversion,
    /// Frames per window (the clip's length without windows).
    pub window: usize,
    /// The edit's latents after each step, `[F, C, h, w]` (empty unless
    /// [`EditOptions::keep_latents_per_step`]).
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
    // Every frame's size up front: a window's encode sees only its own frames.
    if let Some((index, p)) = frames
        .iter()
        .enumerate()
        .find(|(_, p)| p.shape != first.shape)
    {
        return Err(PipelineError::PictureSizes {
            index,
            found: p.shape.clone(),
            expected: first.shape.clone(),
        });
    }
    let f = pipe.vae.downsample_factor();
    let (lh, lw) = (h / f, w / f);
    let jobs = prepare(pipe, opts, recipe, frames.len(), lh, lw)?;
    let inv = inversion_options(opts);
    run_windows(
        pipe,
        opts,
        &jobs,
        |r| crate::invert::encode(pipe, &inv, &frames[r]),
        progress,
    )
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
    let jobs = prepare(pipe, opts, recipe, n, lh, lw)?;
    run_windows(
        pipe,
        opts,
        &jobs,
        |r| Ok(super::frames_of(&latents_0, r)),
        progress,
    )
}

/// Appends batch `b` to batch `a` along the first axis.
fn append(a: &mut HostTensor, b: &HostTensor) {
    a.shape[0] += b.shape[0];
    a.data.extend_from_slice(&b.data);
}

/// Both passes of an edit, compiled and checked.
struct Prepared {
    inv_run: RunOptions,
    inv: Option<crate::compile::Compiled>,
    run: RunOptions,
    edit: Option<crate::compile::Compiled>,
}

/// An edit's windows and the passes compiled for each kind of window (its frame count, and
/// whether it reads K/V carried from the one before).
struct Windows {
    size: usize,
    ranges: Vec<Range<usize>>,
    kinds: Vec<((usize, bool), Prepared)>,
}

impl Windows {
    fn job(&self, k: usize) -> &Prepared {
        let key = (self.ranges[k].len(), k > 0 && self.ranges.len() > 1);
        &self
            .kinds
            .iter()
            .find(|(kk, _)| *kk == key)
            .expect("every kind of window is compiled")
            .1
    }
}

/// Compiles both passes for each kind of window of `n` frames of `lh`×`lw` latents (the
/// carry wired in when there is more than one window), checks that what the edit reads is
/// what the inversion writes (shapes, timesteps), and that one window fits in memory.
fn prepare(
    pipe: &Pipeline,
    opts: &EditOptions,
    recipe: Option<&Source>,
    n: usize,
    lh: usize,
    lw: usize,
) -> Result<Windows, PipelineError> {
    let size = match opts.window {
        Some(w) if w > 0 && w < n => w,
        _ => n,
    };
    let ranges = super::window::windows(n, size);
    let mut kinds: Vec<((usize, bool), Prepared)> = Vec::new();
    let mut need: Option<EditMemory> = None;
    for (k, r) in ranges.iter().enumerate() {
        let key = (r.len(), k > 0 && ranges.len() > 1);
        if kinds.iter().any(|(kk, _)| *kk == key) {
            continue;
        }
        let mut job = prepare_one(pipe, opts, recipe, r.len(), lh, lw)?;
        if let (Some(src), true) = (recipe, ranges.len() > 1) {
            for (pass, c) in [
                (EDIT_PASSES[0], &mut job.inv),
                (EDIT_PASSES[1], &mut job.edit),
            ] {
                if let Some(compiled) = c.as_ref()
                    && let Some(carried) =
                        super::window::carry(compiled, src, Some(pass), r.len(), key.1)?
                {
                    *c = Some(carried);
                }
            }
        }
        let m = edit_memory(pipe, &job)?;
        if need.is_none_or(|n| m.total() > n.total()) {
            need = Some(m);
        }
        kinds.push((key, job));
    }
    // What the job will hold, before anything is allocated.
    if let (Some(need), Some(avail)) = (need, crate::limits::available_memory())
        && need.total() > avail
    {
        let mib = |b: u64| b >> 20;
        let mut hint = String::new();
        if size > 1 {
            hint.push_str(&format!(
                "edit in smaller windows (--window {}), ",
                (size / 2).max(1)
            ));
        }
        if need.stores > 0 {
            hint.push_str(
                "spill the recipe's stores to disk (Store(..., reduce: Each, on: Disk)), ",
            );
        }
        hint.push_str("or edit fewer frames");
        return Err(PipelineError::Memory {
            what: if size < n {
                format!("editing {n} frames in windows of {size}")
            } else {
                format!("editing {n} frames at once")
            },
            need_mib: mib(need.total()),
            available_mib: mib(avail),
            detail: format!(
                "activations {} MiB, stores kept in memory {} MiB, K/V carried between windows {} MiB; the weights ({} MiB) are loaded already",
                mib(need.activations),
                mib(need.stores),
                mib(need.carry),
                mib(need.weights)
            ),
            hint,
        });
    }
    Ok(Windows {
        size,
        ranges,
        kinds,
    })
}

/// Compiles both passes for `n` frames and checks the edit's reads against the inversion's
/// writes.
fn prepare_one(
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
    Ok(Prepared {
        inv_run,
        inv,
        run,
        edit,
    })
}

/// Runs the windows in order: each is encoded (`latents_of`), inverted while its stores record,
/// then edited while its rewrites read them; the K/V carried from the window before are read
/// in both passes, and each window's stored maps are freed once it is edited.
fn run_windows(
    pipe: &Pipeline,
    opts: &EditOptions,
    w: &Windows,
    mut latents_of: impl FnMut(Range<usize>) -> Result<HostTensor, PipelineError>,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<Edited, PipelineError> {
    let (inv_name, edit_name) = (
        super::window::carry_name(Some(EDIT_PASSES[0])),
        super::window::carry_name(Some(EDIT_PASSES[1])),
    );
    let many = w.ranges.len() > 1;
    let (mut inv_carry, mut edit_carry) = (Stored::default(), Stored::default());
    // One set of kernels for every window and both passes: the weights load once.
    let mut kernels = crate::exec::KernelCache::default();
    let mut all: Option<Edited> = None;
    for (k, r) in w.ranges.iter().enumerate() {
        let job = w.job(k);
        // The window before's maps were read by its edit: free them before this one records.
        if let Some(a) = all.as_mut() {
            a.inversion.stored = Stored::default();
        }
        let latents_0 = latents_of(r.clone())?;
        let label = |pass: &str| {
            if many {
                format!("{pass} {}-{}", r.start, r.end - 1)
            } else {
                pass.to_string()
            }
        };
        let inv_label = label(EDIT_PASSES[0]);
        let mut inversion = crate::invert::invert_reading(
            pipe,
            &inversion_options(opts),
            latents_0,
            job.inv.as_ref(),
            &inv_carry,
            &mut kernels,
            |i, n| progress(&inv_label, i, n),
        )?;
        inv_carry = inversion.stored.take(&inv_name);
        // The edit reads this window's maps and the edit's carry from the window before.
        inversion.stored.absorb(std::mem::take(&mut edit_carry))?;
        let run = RunOptions {
            latents: Some(inversion.latents().clone()),
            keep_latents_per_step: opts.keep_latents_per_step,
            ..job.run.clone()
        };
        if !opts.keep_latents_per_step {
            // Only the final inverted latents (what the edit starts from).
            let last = inversion.latents_per_step.pop();
            inversion.latents_per_step = last.into_iter().collect();
        }
        let edit_label = label(EDIT_PASSES[1]);
        let mut out = pipe.run_with_kernels(
            &run,
            job.edit.as_ref(),
            &inversion.stored,
            &mut kernels,
            |i, n| progress(&edit_label, i, n),
        )?;
        drop(inversion.stored.take(&edit_name));
        edit_carry = out.stored.take(&edit_name);
        let this = Edited {
            inversion,
            window: w.size,
            latents_per_step: out.latents_per_step,
            frames: out.images,
        };
        all = Some(match all {
            None => this,
            Some(mut a) => {
                append(&mut a.inversion.latents_0, &this.inversion.latents_0);
                for (x, y) in a
                    .inversion
                    .latents_per_step
                    .iter_mut()
                    .zip(&this.inversion.latents_per_step)
                {
                    append(x, y);
                }
                for (x, y) in a.latents_per_step.iter_mut().zip(&this.latents_per_step) {
                    append(x, y);
                }
                a.frames.extend(this.frames);
                // Only the last window's maps are kept: the others' were read already.
                a.inversion.stored = this.inversion.stored;
                a
            }
        });
    }
    all.ok_or(PipelineError::NoPicture)
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
    /// The K/V windows carry to the next (every step's, both passes', read and recorded).
    pub carry: u64,
}

impl EditMemory {
    /// What the job will add to the memory in use once the model is loaded: the activations
    /// and the stores kept in memory (the weights are held already).
    pub fn total(&self) -> u64 {
        self.activations + self.stores + self.carry
    }
}

/// Estimates one window's memory from its compiled passes (`None`: plain UNet graphs).
fn edit_memory(pipe: &Pipeline, job: &Prepared) -> Result<EditMemory, PipelineError> {
    let mut activations = 0usize;
    for (opts, c) in [(&job.inv_run, &job.inv), (&job.run, &job.edit)] {
        let graphs: Vec<&crate::graph::Graph> = match c {
            Some(c) => c.segments.iter().map(|s| &s.graph).collect(),
            None => {
                let g = pipe.unet.graph(pipe.unet_spec(opts)?)?;
                activations = activations.max(crate::exec::activation_bytes(&g)?);
                vec![]
            }
        };
        for g in graphs {
            activations = activations.max(crate::exec::activation_bytes(g)?);
        }
    }
    let (mut stores, mut stores_on_disk, mut carry) = (0u64, 0u64, 0u64);
    let each = crate::compile::state::SlotKind::Store {
        reduce: crate::recipe::Reduce::Each,
    };
    // The K/V carried between windows, both passes': the window before's (read) and this
    // one's (recorded) are held together.
    for c in [&job.inv, &job.edit].into_iter().flatten() {
        for s in crate::compile::state::slots(c) {
            if s.kind == each && super::window::is_carry(&s.name) {
                carry += 2 * s.bytes as u64;
            }
        }
    }
    if let Some(c) = &job.inv {
        for s in crate::compile::state::slots(c) {
            if s.kind == each && !super::window::is_carry(&s.name) {
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
        carry,
    })
}

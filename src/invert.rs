//! DDIM inversion: pictures → VAE latents (the posterior mean × scaling factor) → the UNet run
//! backwards with diffusers' `DDIMInverseScheduler` (built from the pipeline's scheduler config)
//! on the prompt's text states, without guidance. The inverted latents, run forward again with
//! DDIM and the same prompt, reconstruct the picture; editing methods (FateZero, prompt-to-prompt
//! on real images) start from them.
//!
//! The latents stay on the device from step to step (the scheduler steps device tensors); each
//! step's come back to the host for [`Inversion::latents_per_step`], one download per step.
//!
//! Try it: `rewire invert models/shapes-sd --prompt "a red circle on the left" picture.png -o inv.safetensors`,
//! then `rewire run models/shapes-sd --prompt "a red circle on the left" --guidance 1 --scheduler ddim --latents inv.safetensors -o recon.png`.

use crate::compile::store::{StoreAccumulator, Stored};
use crate::exec::{HostTensor, KernelCache, LowerOptions, Plan, Value};
use crate::pipeline::{Pipeline, PipelineError, RunOptions};
use crate::scheduler::DdimInverse;

/// What an inversion needs: the prompt (one for every picture), the step count, how weights
/// are held.
#[derive(Debug, Clone)]
pub struct InvertOptions {
    pub prompt: String,
    pub steps: usize,
    pub weights: crate::exec::WeightDtype,
}

/// An inversion's result.
#[derive(Debug, Clone)]
pub struct Inversion {
    /// The pictures' latents `[F, C, h, w]` before the first step.
    pub latents_0: HostTensor,
    /// The latents after each inversion step, `[F, C, h, w]` each (downloaded as each step
    /// ends: editing passes read them).
    pub latents_per_step: Vec<HostTensor>,
    /// The inversion's timesteps, rising.
    pub timesteps: Vec<f64>,
    /// What the recipe's stores recorded (named state for a later pass).
    pub stored: crate::compile::store::Stored,
}

impl Inversion {
    /// The final inverted latents (the noisiest).
    pub fn latents(&self) -> &HostTensor {
        self.latents_per_step.last().unwrap_or(&self.latents_0)
    }
}

impl InvertOptions {
    /// The run an inversion of `n` pictures of `width`×`height` pixels is: one cond item per
    /// picture, no guidance (what a recipe's invert pass is compiled for).
    pub fn run_options(&self, n: usize, width: usize, height: usize) -> RunOptions {
        RunOptions {
            prompts: vec![self.prompt.clone(); n],
            steps: self.steps,
            guidance: 1.0,
            size: Some((width, height)),
            weights: self.weights,
            // The inversion's steps are DDIM's (`DdimInverse`), whatever the pipeline's
            // scheduler: a recipe compiled for it must have DDIM's step count.
            scheduler: Some("ddim".into()),
            ..Default::default()
        }
    }
}

/// Inverts pictures `[H, W, 3]` in [0, 1] (all of one size; they run as one batch); calls
/// `progress(step, total)` after each step.
pub fn invert(
    pipe: &Pipeline,
    opts: &InvertOptions,
    pictures: &[HostTensor],
    progress: impl FnMut(usize, usize),
) -> Result<Inversion, PipelineError> {
    let latents_0 = encode(pipe, opts, pictures)?;
    invert_latents(pipe, opts, latents_0, progress)
}

/// The pictures' latents `[F, C, h, w]` (the posterior mean × scaling factor), as one batch.
pub fn encode(
    pipe: &Pipeline,
    opts: &InvertOptions,
    pictures: &[HostTensor],
) -> Result<HostTensor, PipelineError> {
    let first = pictures.first().ok_or(PipelineError::NoPicture)?;
    let (h, w) = (first.shape[0], first.shape[1]);
    if let Some((i, p)) = pictures
        .iter()
        .enumerate()
        .find(|(_, p)| p.shape != first.shape)
    {
        return Err(PipelineError::PictureSizes {
            index: i,
            found: p.shape.clone(),
            expected: first.shape.clone(),
        });
    }
    let n = pictures.len();
    crate::limits::at_most(n, crate::limits::MAX_BATCH, "MAX_BATCH").map_err(|e| {
        PipelineError::PictureCount {
            count: n,
            reason: e.to_string(),
        }
    })?;
    // No guidance: one cond item per picture.
    let run = opts.run_options(n, w, h);
    let spec = pipe.unet_spec(&run)?;
    let (c, lh, lw) = (pipe.unet.resolved.in_channels, spec.height, spec.width);

    // The pictures' latents, as one batch.
    let f = pipe.vae.downsample_factor();
    let mut chw = Vec::with_capacity(n * 3 * h * w);
    for p in pictures {
        let mut one = vec![0f32; 3 * h * w];
        for (i, v) in p.data.iter().enumerate() {
            one[(i % 3) * h * w + i / 3] = v * 2.0 - 1.0;
        }
        chw.extend(one);
    }
    if h != lh * f || w != lw * f {
        return Err(PipelineError::PictureSizes {
            index: 0,
            found: first.shape.clone(),
            expected: vec![lh * f, lw * f, 3],
        });
    }
    let img = crate::exec::upload::<4>(&[n, 3, h, w], chw, &pipe.device);
    let z = Value::R4(pipe.vae.encode(img)).to_host();
    Ok(HostTensor::new(vec![n, c, lh, lw], z.data))
}

/// The dims of latents `[F, C, h, w]`, or the error naming what they are.
pub fn latents_dims(pipe: &Pipeline, latents: &HostTensor) -> Result<[usize; 4], PipelineError> {
    match latents.shape[..] {
        [n, c, h, w] => Ok([n, c, h, w]),
        _ => Err(PipelineError::Latents {
            found: latents.shape.clone(),
            batch: 1,
            channels: pipe.unet.resolved.in_channels,
            height: 0,
            width: 0,
        }),
    }
}

/// Inverts latents `[F, C, h, w]` (already encoded) under the prompt.
pub fn invert_latents(
    pipe: &Pipeline,
    opts: &InvertOptions,
    latents_0: HostTensor,
    progress: impl FnMut(usize, usize),
) -> Result<Inversion, PipelineError> {
    invert_with(pipe, opts, latents_0, None, progress)
}

/// As [`invert_latents`], with a recipe's invert pass compiled for
/// [`InvertOptions::run_options`]: its rewrites apply at their steps and its stores record
/// (kept in [`Inversion::stored`] for the pass that reads them).
pub fn invert_with(
    pipe: &Pipeline,
    opts: &InvertOptions,
    latents_0: HostTensor,
    compiled: Option<&crate::compile::Compiled>,
    progress: impl FnMut(usize, usize),
) -> Result<Inversion, PipelineError> {
    invert_reading(
        pipe,
        opts,
        latents_0,
        compiled,
        &Stored::default(),
        &mut KernelCache::default(),
        progress,
    )
}

/// As [`invert_with`], with named state an earlier run stored (`read`: a window's carried
/// K/V) for the pass's `Stored(...)` inputs, and kernels shared with the job's other runs
/// (`kernels`: a clip's windows load the weights once).
pub fn invert_reading(
    pipe: &Pipeline,
    opts: &InvertOptions,
    latents_0: HostTensor,
    compiled: Option<&crate::compile::Compiled>,
    read: &Stored,
    kernels: &mut KernelCache,
    mut progress: impl FnMut(usize, usize),
) -> Result<Inversion, PipelineError> {
    let [n, c, lh, lw] = latents_dims(pipe, &latents_0)?;
    let f = pipe.vae.downsample_factor();
    let run = opts.run_options(n, lw * f, lh * f);
    let spec = pipe.unet_spec(&run)?;
    if c != pipe.unet.resolved.in_channels || (spec.height, spec.width) != (lh, lw) {
        return Err(PipelineError::Latents {
            found: latents_0.shape.clone(),
            batch: n,
            channels: pipe.unet.resolved.in_channels,
            height: spec.height,
            width: spec.width,
        });
    }
    let cond = pipe.conditioning(&run, (lw * f, lh * f))?;
    let sched = DdimInverse::from_config(&pipe.scheduler)
        .and_then(|mut s| s.set_timesteps(opts.steps).map(|()| s))
        .map_err(|e| PipelineError::Component {
            component: "scheduler",
            message: e.to_string(),
        })?;
    let timesteps = sched.timesteps().to_vec();
    if let Some(c) = compiled {
        if c.spec != spec {
            return Err(PipelineError::Spec {
                compiled: c.spec,
                run: spec,
            });
        }
        if let Some(k) = c.steps
            && k != timesteps.len()
        {
            return Err(PipelineError::Steps {
                compiled: k,
                run: timesteps.len(),
            });
        }
    }
    let lo = LowerOptions {
        weights: opts.weights,
        ..Default::default()
    };
    let mut lower = |g: &crate::graph::Graph| {
        Plan::lower_shared(g, &pipe.unet.weights, &pipe.device, lo, kernels)
    };
    // One plan per step segment of the recipe's pass (the plain UNet without one).
    let plans: Vec<(Option<(usize, usize)>, Plan)> = match compiled {
        None => vec![(None, lower(&pipe.unet.graph(spec)?)?)],
        Some(c) => c
            .segments
            .iter()
            .map(|s| Ok((s.steps, lower(&s.graph)?)))
            .collect::<Result<_, crate::exec::ExecError>>()?,
    };
    let each = crate::pipeline::each_stores(compiled);
    let spill = compiled.map(|c| c.spill.clone()).unwrap_or_default();
    let keep: Vec<&str> = each.iter().map(String::as_str).collect();
    let mut reduced = StoreAccumulator::new(compiled.map(|c| c.stores.clone()).unwrap_or_default());
    let mut stored = Stored::default();
    // The latents and the text states on the device, for every step.
    let mut x = crate::exec::upload::<4>(&[n, c, lh, lw], latents_0.data.clone(), &pipe.device);
    let constants: crate::exec::State = cond
        .constants()
        .iter()
        .map(|(k, v)| (k.clone(), Value::from_host(v, &pipe.device)))
        .collect();
    let mut keep = keep;
    keep.push(crate::pipeline::UNET_OUT);
    let mut per_step = Vec::with_capacity(timesteps.len());
    for (i, &t) in timesteps.iter().enumerate() {
        let plan = &plans
            .iter()
            .find(|(r, _)| r.is_none_or(|(a, b)| a <= i && i < b))
            .expect("segments cover every step")
            .1;
        let mut state = constants.clone();
        state.insert("sample".to_string(), Value::R4(x.clone()));
        crate::pipeline::read_stored(plan, t, read, &reduced, &pipe.device, &mut state)?;
        let (out, mut kept) =
            plan.run_with_state(&crate::pipeline::timestep_input(t), state, &keep)?;
        let eps = crate::pipeline::unet_out(&mut kept)?;
        stored.record(t, &mut kept, &each, &spill)?;
        reduced.add(&out);
        x = sched.step_tensor(eps, t, x);
        per_step.push(Value::R4(x.clone()).to_host());
        progress(i + 1, timesteps.len());
    }
    for (k, t) in &reduced.finish() {
        stored.insert_reduced(k, t, &pipe.device);
    }
    Ok(Inversion {
        latents_0,
        latents_per_step: per_step,
        timesteps,
        stored,
    })
}

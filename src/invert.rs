//! DDIM inversion: pictures → VAE latents (the posterior mean × scaling factor) → the UNet run
//! backwards with diffusers' `DDIMInverseScheduler` (built from the pipeline's scheduler config)
//! on the prompt's text states, without guidance. The inverted latents, run forward again with
//! DDIM and the same prompt, reconstruct the picture; editing methods (FateZero, prompt-to-prompt
//! on real images) start from them.
//!
//! Try it: `rewire invert models/shapes-sd --prompt "a red circle on the left" picture.png -o inv.safetensors`,
//! then `rewire run models/shapes-sd --prompt "a red circle on the left" --guidance 1 --scheduler ddim --latents inv.safetensors -o recon.png`.

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
    /// The latents after each inversion step, `[F, C, h, w]` each.
    pub latents_per_step: Vec<HostTensor>,
    /// The inversion's timesteps, rising.
    pub timesteps: Vec<f64>,
}

impl Inversion {
    /// The final inverted latents (the noisiest).
    pub fn latents(&self) -> &HostTensor {
        self.latents_per_step.last().unwrap_or(&self.latents_0)
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
    let run = RunOptions {
        prompts: vec![opts.prompt.clone(); n],
        steps: opts.steps,
        guidance: 1.0,
        size: Some((w, h)),
        weights: opts.weights,
        ..Default::default()
    };
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
    let latents_0 = HostTensor::new(vec![n, c, lh, lw], z.data);

    invert_latents(pipe, opts, latents_0, progress)
}

/// Inverts latents `[F, C, h, w]` (already encoded) under the prompt.
pub fn invert_latents(
    pipe: &Pipeline,
    opts: &InvertOptions,
    latents_0: HostTensor,
    mut progress: impl FnMut(usize, usize),
) -> Result<Inversion, PipelineError> {
    let [n, c, lh, lw] = latents_0.shape[..] else {
        return Err(PipelineError::Latents {
            found: latents_0.shape.clone(),
            batch: 1,
            channels: pipe.unet.resolved.in_channels,
            height: 0,
            width: 0,
        });
    };
    let f = pipe.vae.downsample_factor();
    let run = RunOptions {
        prompts: vec![opts.prompt.clone(); n],
        steps: opts.steps,
        guidance: 1.0,
        size: Some((lw * f, lh * f)),
        weights: opts.weights,
        ..Default::default()
    };
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
    let graph = pipe.unet.graph(spec)?;
    let plan = Plan::lower_shared(
        &graph,
        &pipe.unet.weights,
        &pipe.device,
        LowerOptions {
            weights: opts.weights,
            ..Default::default()
        },
        &mut KernelCache::default(),
    )?;
    let mut x = latents_0.data.clone();
    let mut per_step = Vec::with_capacity(timesteps.len());
    for (i, &t) in timesteps.iter().enumerate() {
        let inputs = cond.unet_inputs(HostTensor::new(vec![n, c, lh, lw], x.clone()), t);
        let out = plan.run_host(&inputs)?;
        x = sched.step(&out["out"].data, t, &x);
        per_step.push(HostTensor::new(vec![n, c, lh, lw], x.clone()));
        progress(i + 1, timesteps.len());
    }
    Ok(Inversion {
        latents_0,
        latents_per_step: per_step,
        timesteps,
    })
}

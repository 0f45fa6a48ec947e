//! What a run is set up with before its loop: the latent size (from `--size`, the init image
//! or the UNet's sample size), the UNet's input spec, the scheduler with the timesteps that
//! run (img2img's `strength`), and the recipe compiled for these shapes and steps.
//!
//! Try it: `cargo run --release -- run models/tiny-sd --prompt a --size 63x64 -o out.png`
//! (refused: the size is not a multiple of the VAE factor).

use super::conditioning::check_words_2;
use super::{Pipeline, PipelineError, RunOptions, component};
use crate::compile::{CompileOptions, Compiled};
use crate::graph::InputSpec;
use crate::recipe::Source;
use crate::scheduler::Scheduler;

impl Pipeline {
    /// The latent size of a run (`--size`, else the init image's size, else the UNet's
    /// sample_size × the VAE factor), checked against the VAE factor.
    pub fn latent_size(&self, opts: &RunOptions) -> Result<(usize, usize), PipelineError> {
        let f = self.vae.downsample_factor();
        let image = match &opts.init_image {
            Some(i) if i.shape.len() == 3 && i.shape[2] == 3 => Some((i.shape[1], i.shape[0])),
            Some(i) => {
                return Err(PipelineError::Image {
                    shape: i.shape.clone(),
                });
            }
            None => None,
        };
        let (w, h) = match (opts.size, image) {
            (Some(size), Some(image)) if size != image => {
                return Err(PipelineError::ImageSize { image, size });
            }
            (Some(s), _) => s,
            (None, Some(s)) => s,
            (None, None) => {
                let n = match &self.unet.config.sample_size {
                    Some(serde_json::Value::Number(n)) => n.as_u64().unwrap_or(64) as usize,
                    _ => 64,
                };
                (n * f, n * f)
            }
        };
        if w == 0 || h == 0 || w % f != 0 || h % f != 0 {
            return Err(PipelineError::Size {
                width: w,
                height: h,
                factor: f,
            });
        }
        Ok((h / f, w / f))
    }

    /// The UNet's input spec for a run: batch (2 per prompt with guidance), latent size and text
    /// length. A plan must have been compiled for exactly this spec.
    pub fn unet_spec(&self, opts: &RunOptions) -> Result<InputSpec, PipelineError> {
        let p = opts.prompts.len();
        if p == 0 {
            return Err(PipelineError::NoPrompt);
        }
        let (lh, lw) = self.latent_size(opts)?;
        let batch = if opts.guidance > 1.0 { 2 * p } else { p };
        let mut spec = InputSpec::new(batch, lh, lw);
        spec.text_len = self.tokenizer.max_length();
        Ok(spec)
    }

    /// The scheduler set up for a run, and the timesteps its loop runs the UNet at: one per step
    /// (PNDM with skip_prk_steps: one more, as in diffusers), or with an init image only the last
    /// `strength × steps` of them (diffusers' img2img `get_timesteps`). A recipe's step indices
    /// count these UNet calls from 0.
    pub fn schedule(&self, opts: &RunOptions) -> Result<(Scheduler, Vec<f64>), PipelineError> {
        let mut sched = match &opts.scheduler {
            Some(name) => {
                // Switching to PNDM from another class's config: Stable Diffusion runs PNDM
                // with skip_prk_steps (its own configs say so); other classes do not set it.
                let mut config = self.scheduler.clone();
                let pndm = matches!(
                    name.to_lowercase().as_str(),
                    "pndm" | "plms" | "pndmscheduler"
                );
                if pndm && config.raw("skip_prk_steps").is_none() {
                    config.set("skip_prk_steps", serde_json::Value::Bool(true));
                }
                Scheduler::from_name(name, &config)
            }
            None => Scheduler::from_config(&self.scheduler),
        }
        .map_err(component("scheduler"))?;
        sched
            .set_timesteps(opts.steps)
            .and_then(|()| sched.check_schedule())
            .map_err(component("scheduler"))?;
        let mut timesteps = sched.timesteps().to_vec();
        if opts.init_image.is_some() {
            if !(opts.strength > 0.0 && opts.strength <= 1.0) {
                return Err(PipelineError::Strength {
                    strength: opts.strength,
                });
            }
            let init = ((opts.steps as f64 * opts.strength as f64) as usize).min(opts.steps);
            let start = (opts.steps - init) * sched.order();
            if start >= timesteps.len() || init == 0 {
                return Err(PipelineError::NoSteps {
                    strength: opts.strength,
                    steps: opts.steps,
                });
            }
            timesteps.drain(..start);
        }
        Ok((sched, timesteps))
    }

    /// Compiles a recipe for a run: its shapes and step count, words bound to the last prompt.
    pub fn compile(&self, opts: &RunOptions, src: &Source) -> Result<Compiled, PipelineError> {
        let base = self.unet.graph(self.unet_spec(opts)?)?;
        let last = opts.prompts.last().ok_or(PipelineError::NoPrompt)?;
        let words = self.tokenizer.word_positions(last);
        if let Some(second) = &self.second {
            let last_2 = self.prompts_2(opts)?.pop().unwrap_or_default();
            check_words_2(src, &words, &second.tokenizer.word_positions(&last_2))?;
        }
        let copts = CompileOptions {
            fuse: opts.fuse,
            steps: Some(self.schedule(opts)?.1.len()),
            words: Some(words),
            require_bound_words: true,
            frames: opts.frames,
            references: Some(vec![]),
            pass: opts.pass.clone(),
            passes: opts.passes.clone(),
            stop_after: None,
        };
        Ok(crate::compile::compile_graph(src, &base, &copts)?)
    }
}

//! The denoising loop: the UNet plans lowered per step segment (the run constants, the text
//! states' K/V projections, hoisted out of the loop into a prologue run once), classifier-free
//! guidance and the scheduler's steps on device tensors, the stores reduced over the steps,
//! then the VAE decode. Also the step helpers the inversion and edit jobs share:
//! [`timestep_input`], [`unet_out`], [`each_stores`] and [`read_stored`].
//!
//! Try it: `cargo test --release --test pipeline hoisting_changes_nothing`.

use super::aggregate::aggregate_cross;
use super::latents::{gaussian, image_tensor};
use super::{Pipeline, PipelineError, RunOptions, RunOutput};
use crate::compile::Compiled;
use crate::compile::store::{StoreAccumulator, Stored};
use crate::exec::{HostTensor, KernelCache, LowerOptions, Plan, State, Value};
use crate::recipe::Source;
use burn::tensor::{Device, Tensor};
use std::collections::HashMap;

impl Pipeline {
    /// Runs the job with a recipe compiled for it; `progress(step, total)` is called after each
    /// step.
    pub fn run(
        &self,
        opts: &RunOptions,
        recipe: Option<&Source>,
        progress: impl FnMut(usize, usize),
    ) -> Result<RunOutput, PipelineError> {
        let compiled = match recipe {
            Some(src) => Some(self.compile(opts, src)?),
            None => None,
        };
        self.run_compiled(opts, compiled.as_ref(), progress)
    }

    /// Runs the job with an already compiled recipe (from [`Pipeline::compile`] or a plan file
    /// made for [`Pipeline::unet_spec`]).
    pub fn run_compiled(
        &self,
        opts: &RunOptions,
        compiled: Option<&Compiled>,
        progress: impl FnMut(usize, usize),
    ) -> Result<RunOutput, PipelineError> {
        self.run_reading(opts, compiled, &Stored::default(), progress)
    }

    /// As [`Pipeline::run_compiled`], with the maps earlier passes stored (`read`) for the
    /// recipe's `Stored(...)` reads.
    pub fn run_reading(
        &self,
        opts: &RunOptions,
        compiled: Option<&Compiled>,
        read: &Stored,
        progress: impl FnMut(usize, usize),
    ) -> Result<RunOutput, PipelineError> {
        self.run_with_kernels(opts, compiled, read, &mut KernelCache::default(), progress)
    }

    /// As [`Pipeline::run_reading`], with kernels (their weights on the device) shared with
    /// earlier runs of the job: a clip's windows load the weights once.
    pub fn run_with_kernels(
        &self,
        opts: &RunOptions,
        compiled: Option<&Compiled>,
        read: &Stored,
        cache: &mut KernelCache,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<RunOutput, PipelineError> {
        let spec = self.unet_spec(opts)?;
        let p = opts.prompts.len();
        let (lh, lw) = (spec.height, spec.width);
        let cfg = opts.guidance > 1.0;
        let batch = spec.batch;
        let channels = self.unet.resolved.in_channels;

        // Text: [negative × P, prompts] (diffusers' order), encoded at once.
        let f = self.vae.downsample_factor();
        let cond = self.conditioning(opts, (lw * f, lh * f))?;

        if let Some(c) = compiled {
            if c.spec != spec {
                return Err(PipelineError::Spec {
                    compiled: c.spec,
                    run: spec,
                });
            }
            let run = self.schedule(opts)?.1.len();
            if let Some(n) = c.steps
                && n != run
            {
                return Err(PipelineError::Steps { compiled: n, run });
            }
        }
        // The run's constants (the text states) for the hoisting prologues.
        let constants = cond.constants();
        // A graph's step plan and the values its prologue hoisted (computed here, once).
        let lower = |g: &crate::graph::Graph,
                     cache: &mut KernelCache|
         -> Result<(Plan, State), PipelineError> {
            let lo = LowerOptions {
                weights: opts.weights,
                ..Default::default()
            };
            let split = if opts.no_hoist {
                None
            } else {
                crate::compile::hoist::split(g).map_err(crate::exec::ExecError::from)?
            };
            match split {
                None => Ok((
                    Plan::lower_shared(g, &self.unet.weights, &self.device, lo, cache)?,
                    State::new(),
                )),
                Some(s) => {
                    let prologue = Plan::lower_shared(
                        &s.prologue,
                        &self.unet.weights,
                        &self.device,
                        lo,
                        cache,
                    )?;
                    let names: Vec<&str> = s.values.iter().map(|v| v.name.as_str()).collect();
                    let (_, hoisted) = prologue.run_with_state(&constants, State::new(), &names)?;
                    let step =
                        Plan::lower_shared(&s.step, &self.unet.weights, &self.device, lo, cache)?;
                    Ok((step, hoisted))
                }
            }
        };
        // Per step segment: the plan of its (full) steps and, with a Cache, of its cached
        // steps, each with its hoisted constants.
        type Lowered = (Plan, State);
        type SegmentPlans = (Option<(usize, usize)>, Lowered, Option<Lowered>);
        let plans: Vec<SegmentPlans> = match compiled {
            None => vec![(None, lower(&self.unet.graph(spec)?, cache)?, None)],
            Some(c) => c
                .segments
                .iter()
                .map(|s| {
                    let cached = match &s.cached {
                        Some(g) => Some(lower(g, cache)?),
                        None => None,
                    };
                    Ok((s.steps, lower(&s.graph, cache)?, cached))
                })
                .collect::<Result<_, PipelineError>>()?,
        };
        let deep = compiled.and_then(|c| c.cache.as_ref());
        let plan_for = |i: usize, have_features: bool| {
            let (_, full, cached) = plans
                .iter()
                .find(|(r, _, _)| r.is_none_or(|(a, b)| a <= i && i < b))
                .expect("segments cover every step");
            match (deep, cached) {
                (Some(d), Some(p)) if !d.full(i) && have_features => p,
                _ => full,
            }
        };

        // Scheduler and initial latents. From here on the latents are a device tensor: the
        // guidance, the scheduler's steps and its history run on the device; the host gets the
        // UNet's stores, the latents when asked for each step, and the final ones.
        let (mut sched, timesteps) = self.schedule(opts)?;
        let per = channels * lh * lw;
        let shape = [p, channels, lh, lw];
        let noise: Vec<f32> = match &opts.latents {
            Some(l) => {
                let ok = l.shape.len() == 4
                    && (l.shape[0] == p || l.shape[0] == 1)
                    && l.shape[1..] == [channels, lh, lw];
                if !ok {
                    return Err(PipelineError::Latents {
                        found: l.shape.clone(),
                        batch: p,
                        channels,
                        height: lh,
                        width: lw,
                    });
                }
                if l.shape[0] == p {
                    l.data.clone()
                } else {
                    l.data.iter().copied().cycle().take(p * per).collect()
                }
            }
            None => gaussian(opts.seed, p * per),
        };
        let noise = crate::exec::upload::<4>(&shape, noise, &self.device);
        let mut latents: Tensor<4> = match &opts.init_image {
            // Image to image: the image's latents (one for every prompt) noised to the first
            // timestep that runs.
            Some(img) => {
                let z = self.vae.encode(image_tensor(img, &self.device));
                if z.dims() != [1, channels, lh, lw] {
                    return Err(PipelineError::Latents {
                        found: z.dims().to_vec(),
                        batch: 1,
                        channels,
                        height: lh,
                        width: lw,
                    });
                }
                sched.add_noise_tensor(z.repeat_dim(0, p), noise, timesteps[0])
            }
            None => noise.mul_scalar(sched.init_noise_sigma()),
        };
        // The text conditioning goes to the device once, for every step.
        let constants: State = constants
            .iter()
            .map(|(k, v)| (k.clone(), Value::from_host(v, &self.device)))
            .collect();

        let mut stores =
            StoreAccumulator::new(compiled.map(|c| c.stores.clone()).unwrap_or_default());
        // `reduce: Each` stores stay on the device, every step's maps by timestep.
        let each = each_stores(compiled);
        let spill = compiled.map(|c| c.spill.clone()).unwrap_or_default();
        let mut keep = vec![crate::compile::cache::FEATURES, UNET_OUT];
        keep.extend(each.iter().map(String::as_str));
        let mut own = Stored::default();
        let mut latents_per_step = Vec::new();
        let mut features: HashMap<String, Value> = HashMap::new();
        for (i, &t) in timesteps.iter().enumerate() {
            // The UNet's sample: the latents scaled, twice over with guidance
            // ([uncond, cond], both from the same latents).
            let model_in = sched.scale_model_input_tensor(latents.clone(), t);
            let model_in = if cfg {
                Tensor::cat(vec![model_in.clone(), model_in], 0)
            } else {
                model_in
            };
            debug_assert_eq!(model_in.dims()[0], batch);
            // A Cache's features stay on the device from a full step to the next.
            // (Device tensors are reference-counted: the clones copy no data.)
            let have = features.contains_key(crate::compile::cache::FEATURES);
            let (plan, hoisted) = plan_for(i, have);
            let mut state = constants.clone();
            state.extend(hoisted.clone());
            state.extend(features.clone());
            state.insert("sample".to_string(), Value::R4(model_in));
            read_stored(plan, t, read, &stores, &self.device, &mut state)?;
            let (out, mut kept) = plan.run_with_state(&timestep_input(t), state, &keep)?;
            let eps = unet_out(&mut kept)?;
            own.record(t, &mut kept, &each, &spill)?;
            if !kept.is_empty() {
                features = kept;
            }
            stores.add(&out);
            // Classifier-free guidance: u + g·(c − u).
            let noise = if cfg {
                let u = eps.clone().narrow(0, 0, p);
                let c = eps.narrow(0, p, p);
                u.clone().add(c.sub(u).mul_scalar(opts.guidance))
            } else {
                eps
            };
            latents = sched.step_tensor(noise, t, latents);
            if opts.keep_latents_per_step {
                latents_per_step.push(Value::R4(latents.clone()).to_host());
            }
            progress(i + 1, timesteps.len());
        }
        let final_latents = match latents_per_step.last() {
            Some(l) => l.clone(),
            None => Value::R4(latents.clone()).to_host(),
        };

        // Decode.
        let img = Value::R4(self.vae.decode(latents)).to_host();
        let (h, w) = (img.shape[2], img.shape[3]);
        let images = (0..p)
            .map(|k| {
                let mut data = vec![0f32; h * w * 3];
                for c in 0..3 {
                    for y in 0..h {
                        for x in 0..w {
                            let v = img.data[((k * 3 + c) * h + y) * w + x];
                            data[(y * w + x) * 3 + c] = (v / 2.0 + 0.5).clamp(0.0, 1.0);
                        }
                    }
                }
                HostTensor::new(vec![h, w, 3], data)
            })
            .collect();

        let mut stores = stores.finish();
        for (k, t) in &stores {
            own.insert_reduced(k, t, &self.device);
        }
        if let Some(c) = compiled {
            aggregate_cross(c, &mut stores, p);
        }
        let tokens = opts
            .prompts
            .iter()
            .map(|pr| {
                self.tokenizer
                    .encode_unpadded(pr)
                    .iter()
                    .map(|&id| self.tokenizer.decode_token(id))
                    .collect()
            })
            .collect();
        Ok(RunOutput {
            images,
            latents_per_step,
            latents: final_latents,
            stores,
            tokens,
            stored: own,
        })
    }
}

/// The UNet plan's output: the model's prediction, kept on the device.
pub(crate) const UNET_OUT: &str = "out";

/// A step's host input: the timestep `[1]` (everything else the UNet reads is on the device).
pub(crate) fn timestep_input(t: f64) -> HashMap<String, HostTensor> {
    HashMap::from([(
        "timestep".to_string(),
        HostTensor::new(vec![1], vec![t as f32]),
    )])
}

/// Takes the UNet's prediction `out` from the outputs a plan kept on the device.
pub(crate) fn unet_out(kept: &mut State) -> Result<burn::tensor::Tensor<4>, PipelineError> {
    match kept.remove(UNET_OUT) {
        Some(Value::R4(t)) => Ok(t),
        other => Err(PipelineError::Component {
            component: "unet",
            message: format!(
                "the plan's `{UNET_OUT}` output is {}, expected the prediction [batch, channels, h, w]\n  hint: run a plan compiled from a UNet",
                match other {
                    None => "missing".to_string(),
                    Some(v) => format!("{:?}", v.dims()),
                }
            ),
        }),
    }
}

/// The output names of a compiled recipe's `reduce: Each` stores.
pub fn each_stores(compiled: Option<&Compiled>) -> Vec<String> {
    compiled
        .map(|c| {
            c.stores
                .iter()
                .filter(|(_, r)| **r == crate::recipe::Reduce::Each)
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Puts into `state` the maps a plan reads from named state at timestep `t`: an earlier pass's
/// (`read`), else what this run's reduced stores hold so far (a read at later steps).
pub fn read_stored(
    plan: &Plan,
    t: f64,
    read: &Stored,
    own: &StoreAccumulator,
    device: &Device,
    state: &mut State,
) -> Result<(), PipelineError> {
    for (name, shape) in plan.input_shapes() {
        let v = match read.read(name, t, shape, device) {
            None => continue,
            Some(Ok(v)) => v,
            Some(Err(e @ crate::compile::store::StoredError::Missing { .. })) => {
                let so_far = match crate::graph::keys::Key::parse(name) {
                    crate::graph::keys::Key::Stored { name: n, layer } => {
                        own.current(&crate::graph::keys::Key::store(n, layer).to_string())
                    }
                    _ => None,
                };
                let Some(h) = so_far else {
                    return Err(e.into());
                };
                let mut one = Stored::default();
                one.insert_reduced(name, &h, device);
                one.read(name, t, shape, device).expect("a stored read")?
            }
            Some(Err(e)) => return Err(e.into()),
        };
        state.insert(name.to_string(), v);
    }
    Ok(())
}

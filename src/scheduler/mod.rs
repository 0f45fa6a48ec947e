//! Diffusion schedulers built from a diffusers `scheduler/scheduler_config.json`: DDIM, PNDM
//! (PLMS, `skip_prk_steps: true`), Euler (discrete) and DPM-Solver++ 2M, matching diffusers 0.42
//! step for step. The math runs in `f32`, in the order torch runs it, so a denoising loop written
//! against [`Scheduler`] reproduces a diffusers pipeline's latents. Each step is written once over
//! the elementwise operations it needs and runs on host vectors ([`Scheduler::step`]) or on
//! device tensors ([`Scheduler::step_tensor`], what the pipeline's loop uses: the latents and a
//! scheduler's history never leave the device); the two give the same bits on the CPU backend.
//!
//! `_class_name` picks the scheduler ([`Scheduler::open`], [`Scheduler::from_config`]);
//! [`Scheduler::from_name`] overrides it (`ddim`, `pndm`, `euler`, `dpmpp2m`). Unknown fields are
//! ignored; a field the chosen scheduler reads with a value rewire does not implement is a
//! [`SchedulerError`] naming the file and the field, never a silent default.
//!
//! A denoising loop:
//!
//! ```no_run
//! # use rewire::scheduler::Scheduler;
//! # fn unet(x: &[f32], _t: f64) -> Vec<f32> { x.to_vec() }
//! let mut s = Scheduler::open("models/tiny-sd".as_ref())?;
//! s.set_timesteps(20)?;
//! let mut x: Vec<f32> = vec![0.0; 4 * 8 * 8]; // initial noise
//! x.iter_mut().for_each(|v| *v *= s.init_noise_sigma());
//! for t in s.timesteps().to_vec() {
//!     let eps = unet(&s.scale_model_input(&x, t), t);
//!     x = s.step(&eps, t, &x);
//! }
//! # Ok::<(), rewire::scheduler::SchedulerError>(())
//! ```
//!
//! The same loop on the device: `x` a `Tensor<4>`, `s.scale_model_input_tensor(x.clone(), t)`
//! for the UNet and `x = s.step_tensor(eps, t, x)`. Try it:
//! `cargo test --release --lib scheduler::tests`.

mod config;
mod ddim;
mod dpmpp2m;
mod euler;
mod latent;
mod numerics;
mod pndm;
#[cfg(test)]
mod tests;

pub use config::{Prediction, SchedulerConfig, Spacing};
pub use ddim::{Ddim, DdimInverse};
pub use dpmpp2m::DpmSolverMultistep;
pub use euler::EulerDiscrete;
pub use pndm::Pndm;

pub(crate) use config::{Common, ConfigReader};
pub(crate) use numerics::{index_for_timestep, integral, np_arange, np_interp, np_linspace};

use burn::tensor::Tensor;
use std::path::{Path, PathBuf};

/// Errors raised while reading a scheduler config or building a scheduler from it.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(
        "cannot read {path}: {source}\n  hint: point rewire at a diffusers pipeline folder, its scheduler/ folder or a scheduler_config.json"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON at line {line}, column {column}: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: field `{field}` must be {expected}, found {found}")]
    Type {
        path: PathBuf,
        field: String,
        expected: &'static str,
        found: String,
    },
    #[error("{path}: no `{field}` to pick the scheduler from\n  hint: {hint}")]
    Missing {
        path: PathBuf,
        field: &'static str,
        hint: String,
    },
    #[error("{path}: unknown scheduler `{name}` (from `{field}`)\n  hint: {hint}")]
    UnknownClass {
        path: PathBuf,
        /// `_class_name`, or `name` when the class came from [`Scheduler::from_name`].
        field: &'static str,
        name: String,
        hint: String,
    },
    #[error("{path}: {class} with `{field}` = {value} is not supported\n  hint: {hint}")]
    Unsupported {
        path: PathBuf,
        class: &'static str,
        field: &'static str,
        value: String,
        hint: String,
    },
    #[error("{path}: invalid `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
    #[error(
        "{path}: {class} cannot take {requested} inference steps\n  hint: ask for 1 to num_train_timesteps ({max}) steps"
    )]
    Steps {
        path: PathBuf,
        class: &'static str,
        requested: usize,
        max: usize,
    },
}

/// The scheduler names [`Scheduler::from_name`] accepts, with their diffusers class.
pub const SCHEDULER_NAMES: [(&str, &str); 4] = [
    ("ddim", Ddim::CLASS),
    ("pndm", Pndm::CLASS),
    ("euler", EulerDiscrete::CLASS),
    ("dpmpp2m", DpmSolverMultistep::CLASS),
];

/// A diffusion scheduler: one of the diffusers classes rewire implements.
///
/// Stepping is stateful (PNDM keeps a history of model outputs, DPM-Solver++ the previous one,
/// Euler and DPM-Solver++ their position in the schedule): call [`Scheduler::set_timesteps`]
/// before each denoising run, then [`Scheduler::step`] once per timestep, in order.
#[derive(Debug, Clone)]
pub enum Scheduler {
    Ddim(Ddim),
    Pndm(Pndm),
    Euler(EulerDiscrete),
    DpmSolverMultistep(DpmSolverMultistep),
}

impl Scheduler {
    /// Reads a scheduler config (a file, a `scheduler/` folder or a pipeline folder) and builds the
    /// class its `_class_name` names.
    pub fn open(path: &Path) -> Result<Self, SchedulerError> {
        Self::from_config(&SchedulerConfig::open(path)?)
    }

    /// Builds the class `_class_name` names.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let Some(name) = config.class_name()? else {
            return Err(SchedulerError::Missing {
                path: config.path.clone(),
                field: "_class_name",
                hint: format!(
                    "add `\"_class_name\": \"DDIMScheduler\"` (or another class), or pick one with Scheduler::from_name ({})",
                    short_names()
                ),
            });
        };
        Self::build(&name, "_class_name", config)
    }

    /// Builds the scheduler `name` names, whatever the config's `_class_name` says: a short name
    /// (`ddim`, `pndm`, `euler`, `dpmpp2m`, case-insensitive) or a diffusers class name
    /// (`EulerDiscreteScheduler`). The config's other fields are read as that class reads them
    /// (missing ones take its defaults), like diffusers' `Class.from_config(other.config)`.
    pub fn from_name(name: &str, config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        Self::build(name, "name", config)
    }

    fn build(
        name: &str,
        field: &'static str,
        config: &SchedulerConfig,
    ) -> Result<Self, SchedulerError> {
        let lower = name.to_ascii_lowercase();
        let short = SCHEDULER_NAMES
            .iter()
            .find(|(s, c)| *s == lower || c.to_ascii_lowercase() == lower)
            .map(|(s, _)| *s)
            .or(match lower.as_str() {
                "plms" => Some("pndm"),
                "dpm++2m" | "dpmsolver++" | "dpmsolvermultistep" => Some("dpmpp2m"),
                _ => None,
            });
        match short {
            Some("ddim") => Ok(Self::Ddim(Ddim::from_config(config)?)),
            Some("pndm") => Ok(Self::Pndm(Pndm::from_config(config)?)),
            Some("euler") => Ok(Self::Euler(EulerDiscrete::from_config(config)?)),
            Some(_) => Ok(Self::DpmSolverMultistep(DpmSolverMultistep::from_config(
                config,
            )?)),
            None => {
                let candidates = SCHEDULER_NAMES
                    .iter()
                    .flat_map(|(s, c)| [*s, *c])
                    .map(|c| {
                        (
                            strsim::normalized_levenshtein(&lower, &c.to_ascii_lowercase()),
                            c,
                        )
                    })
                    .filter(|(score, _)| *score >= 0.5)
                    .max_by(|a, b| a.0.total_cmp(&b.0));
                let mut hint = format!(
                    "rewire implements {}; pick one with Scheduler::from_name ({})",
                    SCHEDULER_NAMES
                        .iter()
                        .map(|(_, c)| *c)
                        .collect::<Vec<_>>()
                        .join(", "),
                    short_names()
                );
                if let Some((_, best)) = candidates {
                    hint = format!("did you mean `{best}`? {hint}");
                }
                Err(SchedulerError::UnknownClass {
                    path: config.path.clone(),
                    field,
                    name: name.into(),
                    hint,
                })
            }
        }
    }

    /// The diffusers class name (`"DDIMScheduler"`, ...).
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Ddim(_) => Ddim::CLASS,
            Self::Pndm(_) => Pndm::CLASS,
            Self::Euler(_) => EulerDiscrete::CLASS,
            Self::DpmSolverMultistep(_) => DpmSolverMultistep::CLASS,
        }
    }

    /// Sets the inference schedule (`num_inference_steps`) and resets the stepping state.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        match self {
            Self::Ddim(s) => s.set_timesteps(num_inference_steps),
            Self::Pndm(s) => s.set_timesteps(num_inference_steps),
            Self::Euler(s) => s.set_timesteps(num_inference_steps),
            Self::DpmSolverMultistep(s) => s.set_timesteps(num_inference_steps),
        }
    }

    /// Checks that every timestep of the schedule set by [`Self::set_timesteps`] lies inside
    /// the training schedule `0..num_train_timesteps` ([`Self::step`] reads `alphas_cumprod` at
    /// it): leading spacing adds `steps_offset`, so e.g. 1000 steps with `steps_offset: 1` end
    /// one past it. Call it before stepping through a schedule built from an untrusted config.
    pub fn check_schedule(&self) -> Result<(), SchedulerError> {
        let common = match self {
            Self::Ddim(s) => &s.common,
            Self::Pndm(s) => &s.common,
            Self::Euler(s) => &s.common,
            Self::DpmSolverMultistep(s) => &s.common,
        };
        common.check_timesteps(self.timesteps())
    }

    /// The timesteps to run the UNet at, in order (empty before [`Self::set_timesteps`]). PNDM
    /// repeats one timestep (one more entry than steps asked for); Euler's are fractional for
    /// some step counts, hence `f64`.
    pub fn timesteps(&self) -> &[f64] {
        match self {
            Self::Ddim(s) => s.timesteps(),
            Self::Pndm(s) => s.timesteps(),
            Self::Euler(s) => s.timesteps(),
            Self::DpmSolverMultistep(s) => s.timesteps(),
        }
    }

    /// The standard deviation of the initial noise: multiply the starting latents by it.
    pub fn init_noise_sigma(&self) -> f32 {
        match self {
            Self::Ddim(_) | Self::Pndm(_) | Self::DpmSolverMultistep(_) => 1.0,
            Self::Euler(s) => s.init_noise_sigma(),
        }
    }

    /// The UNet input for `sample` at timestep `t` (Euler divides by `sqrt(sigma² + 1)`; the
    /// others return the sample unchanged).
    pub fn scale_model_input(&self, sample: &[f32], t: f64) -> Vec<f32> {
        match self {
            Self::Euler(s) => s.scale_model_input(sample, t),
            _ => sample.to_vec(),
        }
    }

    /// One denoising step: the sample at the next (less noisy) timestep.
    ///
    /// # Panics
    /// Before [`Self::set_timesteps`], when the lengths of `model_output` and `sample` differ, or
    /// when `t` is not a timestep of the schedule.
    pub fn step(&mut self, model_output: &[f32], t: f64, sample: &[f32]) -> Vec<f32> {
        match self {
            Self::Ddim(s) => s.step(model_output, t, sample),
            Self::Pndm(s) => s.step(model_output, t, sample),
            Self::Euler(s) => s.step(model_output, t, sample),
            Self::DpmSolverMultistep(s) => s.step(model_output, t, sample),
        }
    }

    /// `original` noised to timestep `t` of the schedule: where image-to-image starts.
    ///
    /// # Panics
    /// When the lengths differ or `t` is not in the schedule.
    pub fn add_noise(&self, original: &[f32], noise: &[f32], t: f64) -> Vec<f32> {
        match self {
            Self::Ddim(s) => s.add_noise(original, noise, t),
            Self::Pndm(s) => s.add_noise(original, noise, t),
            Self::Euler(s) => s.add_noise(original, noise, t),
            Self::DpmSolverMultistep(s) => s.add_noise(original, noise, t),
        }
    }

    /// [`Self::scale_model_input`] on a device tensor.
    pub fn scale_model_input_tensor(&self, sample: Tensor<4>, t: f64) -> Tensor<4> {
        match self {
            Self::Euler(s) => s.scale_model_input_tensor(sample, t),
            _ => sample,
        }
    }

    /// [`Self::step`] on device tensors `[batch, channels, h, w]`: the same operations in the
    /// same order (the same results on the CPU backend), with the scheduler's history (PNDM's
    /// past outputs, DPM-Solver++'s previous data prediction) kept on the device.
    ///
    /// # Panics
    /// As [`Self::step`]: before [`Self::set_timesteps`], when the shapes of `model_output` and
    /// `sample` differ, or when `t` is not a timestep of the schedule.
    pub fn step_tensor(&mut self, model_output: Tensor<4>, t: f64, sample: Tensor<4>) -> Tensor<4> {
        match self {
            Self::Ddim(s) => s.step_tensor(model_output, t, sample),
            Self::Pndm(s) => s.step_tensor(model_output, t, sample),
            Self::Euler(s) => s.step_tensor(model_output, t, sample),
            Self::DpmSolverMultistep(s) => s.step_tensor(model_output, t, sample),
        }
    }

    /// [`Self::add_noise`] on device tensors.
    ///
    /// # Panics
    /// When the shapes differ or `t` is not in the schedule.
    pub fn add_noise_tensor(&self, original: Tensor<4>, noise: Tensor<4>, t: f64) -> Tensor<4> {
        match self {
            Self::Ddim(s) => s.add_noise_tensor(original, noise, t),
            Self::Pndm(s) => s.add_noise_tensor(original, noise, t),
            Self::Euler(s) => s.add_noise_tensor(original, noise, t),
            Self::DpmSolverMultistep(s) => s.add_noise_tensor(original, noise, t),
        }
    }

    /// diffusers' `scheduler.order` (1 for all four: one UNet call per step).
    pub fn order(&self) -> usize {
        1
    }
}

fn short_names() -> String {
    SCHEDULER_NAMES
        .iter()
        .map(|(s, _)| *s)
        .collect::<Vec<_>>()
        .join(", ")
}

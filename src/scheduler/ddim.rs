//! diffusers' `DDIMScheduler` with `eta = 0` (deterministic DDIM, what Stable Diffusion pipelines
//! run): timesteps by `timestep_spacing`, then `x_prev = sqrt(ᾱ_prev)·x̂₀ + sqrt(1 - ᾱ_prev)·ε̂`;
//! and its inverse, `DDIMInverseScheduler`. Both step host vectors or device tensors.

use super::latent::{Latent, check_same};
use super::{
    Common, ConfigReader, Prediction, SchedulerConfig, SchedulerError, Spacing, integral,
    np_arange, np_linspace,
};
use burn::tensor::Tensor;

/// `DDIMScheduler` (eta 0, `clip_sample: false`, no thresholding).
#[derive(Debug, Clone)]
pub struct Ddim {
    pub(crate) common: Common,
    /// `alphas_cumprod[0]`, or 1 with `set_alpha_to_one`: ᾱ before the first training step.
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
}

impl Ddim {
    pub const CLASS: &'static str = "DDIMScheduler";

    /// Reads the fields `DDIMScheduler` uses (with its defaults: `clip_sample: true`, which rewire
    /// refuses, `set_alpha_to_one: true`, `timestep_spacing: "leading"`).
    pub fn from_config(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let (common, final_alpha_cumprod) = read_ddim(config, Self::CLASS)?;
        Ok(Self {
            common,
            final_alpha_cumprod,
            num_inference_steps: 0,
            timesteps: Vec::new(),
        })
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<(), SchedulerError> {
        self.common.check_steps(n)?;
        let t_train = self.common.num_train_timesteps;
        let ts: Vec<i64> = match self.common.spacing {
            Spacing::Linspace => np_linspace(0.0, (t_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|v| v.round_ties_even() as i64)
                .collect(),
            Spacing::Leading => {
                let ratio = (t_train / n) as i64;
                (0..n as i64)
                    .rev()
                    .map(|i| i * ratio + self.common.steps_offset)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = t_train as f64 / n as f64;
                np_arange(t_train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|v| v.round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        self.num_inference_steps = n;
        self.timesteps = ts.into_iter().map(|t| t as f64).collect();
        Ok(())
    }

    /// `add_noise`: `original` noised to timestep `t` (image-to-image's start).
    pub fn add_noise(&self, original: &[f32], noise: &[f32], t: f64) -> Vec<f32> {
        self.common
            .add_noise_vp(Self::CLASS, original.to_vec(), noise.to_vec(), t)
    }

    /// [`Self::add_noise`] on device tensors.
    pub fn add_noise_tensor(&self, original: Tensor<4>, noise: Tensor<4>, t: f64) -> Tensor<4> {
        self.common.add_noise_vp(Self::CLASS, original, noise, t)
    }

    /// The timesteps of the schedule.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// `DDIMScheduler.step` with `eta = 0`, in float32 as torch computes it.
    pub fn step(&mut self, model_output: &[f32], t: f64, sample: &[f32]) -> Vec<f32> {
        self.step_any(model_output.to_vec(), t, sample.to_vec())
    }

    /// [`Self::step`] on device tensors (the same operations, the same results).
    pub fn step_tensor(&mut self, model_output: Tensor<4>, t: f64, sample: Tensor<4>) -> Tensor<4> {
        self.step_any(model_output, t, sample)
    }

    fn step_any<L: Latent>(&mut self, model_output: L, t: f64, sample: L) -> L {
        assert!(
            self.num_inference_steps > 0,
            "{}: call set_timesteps before step",
            Self::CLASS
        );
        check_same(Self::CLASS, &model_output, &sample);
        let t = integral(Self::CLASS, t);
        let prev_t = t - (self.common.num_train_timesteps / self.num_inference_steps) as i64;
        let alpha_prod_t = self.common.alpha_prod(t);
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.common.alpha_prod(prev_t)
        } else {
            self.final_alpha_cumprod
        };
        // sqrt(1 - ᾱ_prev - std_dev_t²) with std_dev_t = eta · sqrt(variance) = 0.
        ddim_move(
            self.common.prediction,
            model_output,
            sample,
            alpha_prod_t,
            alpha_prod_t_prev,
        )
    }
}

/// The fields DDIM and its inverse read: the common ones, `clip_sample` and `thresholding`
/// false, and ᾱ before the first training step (1 with `set_alpha_to_one`, diffusers' default).
fn read_ddim(
    config: &SchedulerConfig,
    class: &'static str,
) -> Result<(Common, f32), SchedulerError> {
    let r = ConfigReader { config, class };
    let common = r.common(Spacing::Leading)?;
    r.require_bool("clip_sample", true, false)?;
    r.require_bool("thresholding", false, false)?;
    let alpha_one = if r.bool("set_alpha_to_one", true)? {
        1.0
    } else {
        common.alphas_cumprod[0]
    };
    Ok((common, alpha_one))
}

/// A deterministic DDIM move of `sample` from noise level ᾱ `from` to ᾱ `to` (down for
/// sampling, up for inversion): `sqrt(to)·x̂₀ + sqrt(1 − to)·ε̂`, in float32 as torch computes it.
fn ddim_move<L: Latent>(prediction: Prediction, m: L, x: L, from: f32, to: f32) -> L {
    let (sqrt_a, sqrt_b) = (from.sqrt(), (1.0 - from).sqrt());
    let (sqrt_to, dir_coeff) = (to.sqrt(), (1.0 - to).sqrt());
    let (x0, eps) = match prediction {
        // (x − sqrt_b·m) / sqrt_a, m
        Prediction::Epsilon => (x.minus(m.clone().times(sqrt_b)).over(sqrt_a), m),
        // sqrt_a·x − sqrt_b·m, sqrt_a·m + sqrt_b·x
        Prediction::V => (
            x.clone().times(sqrt_a).minus(m.clone().times(sqrt_b)),
            m.times(sqrt_a).plus(x.times(sqrt_b)),
        ),
    };
    x0.times(sqrt_to).plus(eps.times(dir_coeff))
}

/// diffusers' `DDIMInverseScheduler` (eta 0): DDIM run backwards, from an image's latents
/// toward noise, for inversion. Timesteps rise (`[1, 51, …, 951]` for 20 leading steps); a
/// step from `t − Δ` to `t` (`Δ = num_train_timesteps // steps`) is
/// `x = sqrt(ᾱ_t)·x̂₀ + sqrt(1 − ᾱ_t)·ε̂` with `x̂₀ = (x − sqrt(1 − ᾱ_{t−Δ})·ε̂) / sqrt(ᾱ_{t−Δ})`,
/// and `ᾱ` before the first training step as for DDIM (`set_alpha_to_one`). Built from the
/// pipeline's scheduler config, as `DDIMInverseScheduler.from_config(pipe.scheduler.config)`.
#[derive(Debug, Clone)]
pub struct DdimInverse {
    common: Common,
    initial_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
}

impl DdimInverse {
    pub const CLASS: &'static str = "DDIMInverseScheduler";

    pub fn from_config(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let (common, initial_alpha_cumprod) = read_ddim(config, Self::CLASS)?;
        if common.spacing == Spacing::Linspace {
            return Err(SchedulerError::Unsupported {
                path: common.path.clone(),
                class: Self::CLASS,
                field: "timestep_spacing",
                value: "\"linspace\"".into(),
                hint: "DDIMInverseScheduler takes \"leading\" or \"trailing\" spacing, as in diffusers"
                    .into(),
            });
        }
        Ok(Self {
            common,
            initial_alpha_cumprod,
            num_inference_steps: 0,
            timesteps: Vec::new(),
        })
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<(), SchedulerError> {
        self.common.check_steps(n)?;
        let t_train = self.common.num_train_timesteps;
        let ts: Vec<f64> = match self.common.spacing {
            Spacing::Trailing => {
                let ratio = t_train as f64 / n as f64;
                let mut v: Vec<f64> = np_arange(t_train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|v| v.round_ties_even() - 1.0)
                    .collect();
                v.reverse();
                v
            }
            _ => {
                let ratio = (t_train / n) as f64;
                (0..n)
                    .map(|i| (i as f64 * ratio).round_ties_even() + self.common.steps_offset as f64)
                    .collect()
            }
        };
        self.common.check_timesteps(&ts)?;
        self.num_inference_steps = n;
        self.timesteps = ts;
        Ok(())
    }

    /// The timesteps of the inversion, rising.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// `DDIMInverseScheduler.step`: the latents one step noisier, in float32 as torch computes.
    pub fn step(&self, model_output: &[f32], t: f64, sample: &[f32]) -> Vec<f32> {
        self.step_any(model_output.to_vec(), t, sample.to_vec())
    }

    /// [`Self::step`] on device tensors (the same operations, the same results).
    pub fn step_tensor(&self, model_output: Tensor<4>, t: f64, sample: Tensor<4>) -> Tensor<4> {
        self.step_any(model_output, t, sample)
    }

    fn step_any<L: Latent>(&self, model_output: L, t: f64, sample: L) -> L {
        assert!(
            self.num_inference_steps > 0,
            "{}: call set_timesteps before step",
            Self::CLASS
        );
        check_same(Self::CLASS, &model_output, &sample);
        let to = integral(Self::CLASS, t);
        let t_train = self.common.num_train_timesteps as i64;
        let from = (to - t_train / self.num_inference_steps as i64).min(t_train - 1);
        let alpha_from = if from >= 0 {
            self.common.alpha_prod(from)
        } else {
            self.initial_alpha_cumprod
        };
        let alpha_to = self.common.alpha_prod(to);
        ddim_move(
            self.common.prediction,
            model_output,
            sample,
            alpha_from,
            alpha_to,
        )
    }
}

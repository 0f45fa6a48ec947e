//! diffusers' `EulerDiscreteScheduler` (deterministic: `s_churn = 0`): the Euler method on the
//! probability-flow ODE in sigma space, with sigmas linearly interpolated at float timesteps.
//! Steps host vectors or device tensors.

use super::latent::{Latent, check_same};
use super::{
    Common, ConfigReader, Prediction, SchedulerConfig, SchedulerError, Spacing, index_for_timestep,
    np_arange, np_interp, np_linspace,
};
use burn::tensor::Tensor;

/// `EulerDiscreteScheduler` (`interpolation_type: "linear"`, `timestep_type: "discrete"`, no
/// Karras/exponential/beta sigmas).
#[derive(Debug, Clone)]
pub struct EulerDiscrete {
    pub(crate) common: Common,
    /// The sigma of the last step: `0` (`final_sigmas_type: "zero"`) or the smallest training
    /// sigma (`"sigma_min"`).
    sigma_min_last: bool,
    timesteps: Vec<f64>,
    /// One per timestep plus the final one, in float32; before `set_timesteps`, the training sigmas.
    sigmas: Vec<f32>,
    step_index: Option<usize>,
}

impl EulerDiscrete {
    pub const CLASS: &'static str = "EulerDiscreteScheduler";

    /// Reads the fields `EulerDiscreteScheduler` uses (default `timestep_spacing: "linspace"`).
    pub fn from_config(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let r = ConfigReader {
            config,
            class: Self::CLASS,
        };
        let common = r.common(Spacing::Linspace)?;
        r.choice("interpolation_type", "linear", &["linear"])?;
        r.choice("timestep_type", "discrete", &["discrete"])?;
        for field in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
        ] {
            r.require_bool(field, false, false)?;
        }
        let sigma_min_last =
            r.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        // Before set_timesteps: the training sigmas, noisiest first, then 0.
        let mut sigmas: Vec<f32> = common.train_sigmas().into_iter().rev().collect();
        sigmas.push(0.0);
        Ok(Self {
            common,
            sigma_min_last,
            timesteps: Vec::new(),
            sigmas,
            step_index: None,
        })
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<(), SchedulerError> {
        self.common.check_steps(n)?;
        let t_train = self.common.num_train_timesteps;
        let ts: Vec<f32> = match self.common.spacing {
            Spacing::Linspace => np_linspace(0.0, (t_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|v| v as f32)
                .collect(),
            Spacing::Leading => {
                let ratio = t_train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio) as f32 + self.common.steps_offset as f32)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = t_train as f64 / n as f64;
                np_arange(t_train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|v| v.round_ties_even() as f32 - 1.0)
                    .collect()
            }
        };
        let train = self.common.train_sigmas();
        let mut sigmas: Vec<f32> = ts
            .iter()
            .map(|&t| np_interp(f64::from(t), &train) as f32)
            .collect();
        sigmas.push(if self.sigma_min_last { train[0] } else { 0.0 });
        self.timesteps = ts.into_iter().map(f64::from).collect();
        self.sigmas = sigmas;
        self.step_index = None;
        Ok(())
    }

    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The largest sigma, or `sqrt(max² + 1)` with `timestep_spacing: "leading"`.
    pub fn init_noise_sigma(&self) -> f32 {
        let max = self
            .sigmas
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        match self.common.spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    fn index(&self, t: f64) -> usize {
        self.step_index.unwrap_or_else(|| {
            index_for_timestep(&self.timesteps, t).unwrap_or_else(|| {
                panic!(
                    "{}: timestep {t} is not in the schedule; pass a value from timesteps() after set_timesteps",
                    Self::CLASS
                )
            })
        })
    }

    /// `add_noise`: `original + sigma_t·noise` (image-to-image's start).
    pub fn add_noise(&self, original: &[f32], noise: &[f32], t: f64) -> Vec<f32> {
        self.add_noise_any(original.to_vec(), noise.to_vec(), t)
    }

    /// [`Self::add_noise`] on device tensors.
    pub fn add_noise_tensor(&self, original: Tensor<4>, noise: Tensor<4>, t: f64) -> Tensor<4> {
        self.add_noise_any(original, noise, t)
    }

    fn add_noise_any<L: Latent>(&self, original: L, noise: L, t: f64) -> L {
        check_same(Self::CLASS, &noise, &original);
        let sigma = self.sigmas[self.index(t)];
        original.plus(noise.times(sigma))
    }

    /// `sample / sqrt(sigma² + 1)` for the current step's sigma.
    pub fn scale_model_input(&self, sample: &[f32], t: f64) -> Vec<f32> {
        self.scale_any(sample.to_vec(), t)
    }

    /// [`Self::scale_model_input`] on a device tensor.
    pub fn scale_model_input_tensor(&self, sample: Tensor<4>, t: f64) -> Tensor<4> {
        self.scale_any(sample, t)
    }

    fn scale_any<L: Latent>(&self, sample: L, t: f64) -> L {
        let sigma = self.sigmas[self.index(t)];
        let d = (sigma * sigma + 1.0).sqrt();
        sample.over(d)
    }

    /// `EulerDiscreteScheduler.step` with `s_churn = 0`, in float32 as torch computes it.
    pub fn step(&mut self, model_output: &[f32], t: f64, sample: &[f32]) -> Vec<f32> {
        self.step_any(model_output.to_vec(), t, sample.to_vec())
    }

    /// [`Self::step`] on device tensors (the same operations, the same results).
    pub fn step_tensor(&mut self, model_output: Tensor<4>, t: f64, sample: Tensor<4>) -> Tensor<4> {
        self.step_any(model_output, t, sample)
    }

    fn step_any<L: Latent>(&mut self, m: L, t: f64, x: L) -> L {
        check_same(Self::CLASS, &m, &x);
        let i = self.index(t);
        let sigma = self.sigmas[i];
        // gamma = 0: sigma_hat = sigma * (gamma + 1) = sigma.
        let sigma_hat = sigma;
        let dt = self.sigmas[i + 1] - sigma_hat;
        let v_scale = -sigma / (sigma * sigma + 1.0).sqrt();
        let v_div = sigma * sigma + 1.0;
        let x0 = match self.common.prediction {
            // x − sigma_hat·m
            Prediction::Epsilon => x.clone().minus(m.times(sigma_hat)),
            // m·v_scale + x / v_div
            Prediction::V => m.times(v_scale).plus(x.clone().over(v_div)),
        };
        // x + ((x − x0) / sigma_hat)·dt
        let derivative = x.clone().minus(x0).over(sigma_hat);
        let out = x.plus(derivative.times(dt));
        self.step_index = Some(i + 1);
        out
    }
}

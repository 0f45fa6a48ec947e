//! diffusers' `PNDMScheduler` with `skip_prk_steps: true` (the PLMS sampler Stable Diffusion 1.x
//! ships with): a linear multistep method over the last four model outputs, with a second-order
//! start that spends two UNet calls on the first step (the repeated timestep in the schedule).
//! Steps host vectors or device tensors; the history stays where its steps ran.

use super::latent::{Held, Latent, check_same};
use super::{
    Common, ConfigReader, Prediction, SchedulerConfig, SchedulerError, Spacing, integral,
    np_arange, np_linspace,
};
use burn::tensor::Tensor;

/// `PNDMScheduler` (PLMS only: `skip_prk_steps: true`).
#[derive(Debug, Clone)]
pub struct Pndm {
    pub(crate) common: Common,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
    /// Past model outputs (diffusers' `ets`), newest last; at most four are kept, on the host
    /// or the device as the steps ran.
    ets: Vec<Held>,
    /// The sample of the first step, reused by the second (diffusers' `cur_sample`).
    cur_sample: Option<Held>,
    counter: usize,
}

impl Pndm {
    pub const CLASS: &'static str = "PNDMScheduler";

    /// Reads the fields `PNDMScheduler` uses (defaults: `set_alpha_to_one: false`,
    /// `timestep_spacing: "leading"`, `skip_prk_steps: false`, which rewire refuses).
    pub fn from_config(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let r = ConfigReader {
            config,
            class: Self::CLASS,
        };
        let common = r.common(Spacing::Leading)?;
        if !r.bool("skip_prk_steps", false)? {
            return Err(r.unsupported(
                "skip_prk_steps",
                if config.raw("skip_prk_steps").is_some_and(|v| !v.is_null()) {
                    "false"
                } else {
                    "false (the PNDMScheduler default)"
                },
                "rewire implements PNDM's PLMS steps only (Runge-Kutta warm-up skipped, as Stable Diffusion configs set); add `\"skip_prk_steps\": true`",
            ));
        }
        let final_alpha_cumprod = if r.bool("set_alpha_to_one", false)? {
            1.0
        } else {
            common.alphas_cumprod[0]
        };
        Ok(Self {
            common,
            final_alpha_cumprod,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            ets: Vec::new(),
            cur_sample: None,
            counter: 0,
        })
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<(), SchedulerError> {
        self.common.check_steps(n)?;
        let t_train = self.common.num_train_timesteps;
        // Ascending, as diffusers' `_timesteps`.
        let asc: Vec<i64> = match self.common.spacing {
            Spacing::Linspace => np_linspace(0.0, (t_train - 1) as f64, n)
                .into_iter()
                .map(|v| v.round_ties_even() as i64)
                .collect(),
            Spacing::Leading => {
                let ratio = (t_train / n) as i64;
                (0..n as i64)
                    .map(|i| i * ratio + self.common.steps_offset)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = t_train as f64 / n as f64;
                np_arange(t_train as f64, 0.0, -ratio)
                    .into_iter()
                    .rev()
                    .map(|v| v.round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        // plms = concat(_timesteps[:-1], _timesteps[-2:-1], _timesteps[-1:])[::-1]
        let k = asc.len();
        let mut plms: Vec<i64> = asc[..k - 1].to_vec();
        if k >= 2 {
            plms.push(asc[k - 2]);
        }
        plms.push(asc[k - 1]);
        plms.reverse();
        self.timesteps = plms.into_iter().map(|t| t as f64).collect();
        self.num_inference_steps = n;
        self.ets.clear();
        self.cur_sample = None;
        self.counter = 0;
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

    /// `PNDMScheduler.step_plms`, in float32 as torch computes it.
    pub fn step(&mut self, model_output: &[f32], t: f64, sample: &[f32]) -> Vec<f32> {
        self.step_any(model_output.to_vec(), t, sample.to_vec())
    }

    /// [`Self::step`] on device tensors (the same operations, the same results); the past
    /// outputs the next steps read stay on the device.
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
        let ratio = (self.common.num_train_timesteps / self.num_inference_steps) as i64;
        let mut timestep = integral(Self::CLASS, t);
        let mut prev_timestep = timestep - ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.keep());
        } else {
            prev_timestep = timestep;
            timestep += ratio;
        }

        let mut sample = sample;
        let et = |k: usize| L::from_held(&self.ets[k], &model_output);
        let combined = match (self.ets.len(), self.counter) {
            (1, 0) => {
                self.cur_sample = Some(sample.keep());
                model_output
            }
            (1, 1) => {
                let held = self
                    .cur_sample
                    .take()
                    .expect("the first PLMS step keeps its sample");
                sample = L::from_held(&held, &sample);
                // (m + e1) / 2
                model_output.clone().plus(et(0)).over(2.0)
            }
            (2, _) => {
                let (e2, e1) = (et(0), et(1));
                // (3·e1 − e2) / 2
                e1.times(3.0).minus(e2).over(2.0)
            }
            (3, _) => {
                let (e3, e2, e1) = (et(0), et(1), et(2));
                // (23·e1 − 16·e2 + 5·e3) / 12
                e1.times(23.0)
                    .minus(e2.times(16.0))
                    .plus(e3.times(5.0))
                    .over(12.0)
            }
            _ => {
                let n = self.ets.len();
                let (e4, e3, e2, e1) = (et(n - 4), et(n - 3), et(n - 2), et(n - 1));
                let c = (1.0f64 / 24.0) as f32;
                // c·(55·e1 − 59·e2 + 37·e3 − 9·e4)
                e1.times(55.0)
                    .minus(e2.times(59.0))
                    .plus(e3.times(37.0))
                    .minus(e4.times(9.0))
                    .times(c)
            }
        };
        let prev = self.prev_sample(sample, timestep, prev_timestep, combined);
        self.counter += 1;
        prev
    }

    /// Formula (9) of the PNDM paper (diffusers' `_get_prev_sample`).
    fn prev_sample<L: Latent>(&self, sample: L, t: i64, prev_t: i64, model_output: L) -> L {
        let alpha_prod_t = self.common.alpha_prod(t);
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.common.alpha_prod(prev_t)
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let denom = alpha_prod_t * beta_prod_t_prev.sqrt()
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        let diff = alpha_prod_t_prev - alpha_prod_t;
        let eps = match self.common.prediction {
            Prediction::Epsilon => model_output,
            // sqrt_a·m + sqrt_b·x
            Prediction::V => model_output
                .times(sqrt_a)
                .plus(sample.clone().times(sqrt_b)),
        };
        // sample_coeff·x − (diff·eps) / denom
        sample
            .times(sample_coeff)
            .minus(eps.times(diff).over(denom))
    }
}

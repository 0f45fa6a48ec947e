//! diffusers' `PNDMScheduler` with `skip_prk_steps: true` (the PLMS sampler Stable Diffusion 1.x
//! ships with): a linear multistep method over the last four model outputs, with a second-order
//! start that spends two UNet calls on the first step (the repeated timestep in the schedule).

use super::{
    Common, ConfigReader, Prediction, SchedulerConfig, SchedulerError, Spacing, check_len,
    integral, np_arange, np_linspace,
};

/// `PNDMScheduler` (PLMS only: `skip_prk_steps: true`).
#[derive(Debug, Clone)]
pub struct Pndm {
    pub(crate) common: Common,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
    /// Past model outputs (diffusers' `ets`), newest last; at most four are kept.
    ets: Vec<Vec<f32>>,
    /// The sample of the first step, reused by the second (diffusers' `cur_sample`).
    cur_sample: Option<Vec<f32>>,
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
        self.common.add_noise_vp(Self::CLASS, original, noise, t)
    }

    /// The timesteps of the schedule.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// `PNDMScheduler.step_plms`, in float32 as torch computes it.
    pub fn step(&mut self, model_output: &[f32], t: f64, sample: &[f32]) -> Vec<f32> {
        assert!(
            self.num_inference_steps > 0,
            "{}: call set_timesteps before step",
            Self::CLASS
        );
        check_len(Self::CLASS, model_output, sample);
        let ratio = (self.common.num_train_timesteps / self.num_inference_steps) as i64;
        let mut timestep = integral(Self::CLASS, t);
        let mut prev_timestep = timestep - ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.to_vec());
        } else {
            prev_timestep = timestep;
            timestep += ratio;
        }

        let mut sample = sample;
        let held;
        let combined: Vec<f32> = match (self.ets.len(), self.counter) {
            (1, 0) => {
                self.cur_sample = Some(sample.to_vec());
                model_output.to_vec()
            }
            (1, 1) => {
                held = self
                    .cur_sample
                    .take()
                    .expect("the first PLMS step keeps its sample");
                sample = &held;
                let e1 = &self.ets[0];
                model_output
                    .iter()
                    .zip(e1)
                    .map(|(&m, &e)| (m + e) / 2.0)
                    .collect()
            }
            (2, _) => {
                let (e2, e1) = (&self.ets[0], &self.ets[1]);
                e1.iter()
                    .zip(e2)
                    .map(|(&a, &b)| (3.0 * a - b) / 2.0)
                    .collect()
            }
            (3, _) => {
                let (e3, e2, e1) = (&self.ets[0], &self.ets[1], &self.ets[2]);
                (0..e1.len())
                    .map(|i| (23.0 * e1[i] - 16.0 * e2[i] + 5.0 * e3[i]) / 12.0)
                    .collect()
            }
            _ => {
                let n = self.ets.len();
                let (e4, e3, e2, e1) = (
                    &self.ets[n - 4],
                    &self.ets[n - 3],
                    &self.ets[n - 2],
                    &self.ets[n - 1],
                );
                let c = (1.0f64 / 24.0) as f32;
                (0..e1.len())
                    .map(|i| c * (55.0 * e1[i] - 59.0 * e2[i] + 37.0 * e3[i] - 9.0 * e4[i]))
                    .collect()
            }
        };
        let prev = self.prev_sample(sample, timestep, prev_timestep, &combined);
        self.counter += 1;
        prev
    }

    /// Formula (9) of the PNDM paper (diffusers' `_get_prev_sample`).
    fn prev_sample(&self, sample: &[f32], t: i64, prev_t: i64, model_output: &[f32]) -> Vec<f32> {
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
        model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| {
                let eps = match self.common.prediction {
                    Prediction::Epsilon => m,
                    Prediction::V => sqrt_a * m + sqrt_b * x,
                };
                sample_coeff * x - diff * eps / denom
            })
            .collect()
    }
}

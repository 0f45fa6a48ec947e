//! diffusers' `DPMSolverMultistepScheduler` as DPM-Solver++ 2M (`algorithm_type: "dpmsolver++"`,
//! `solver_order: 2`): data-prediction multistep updates in log-SNR time, first order on the first
//! step and, per `lower_order_final` / `euler_at_final` / `final_sigmas_type`, near the end.
//! Steps host vectors or device tensors; the previous data prediction stays where its step ran.

use super::latent::{Held, Latent, check_same};
use super::{
    Common, ConfigReader, Prediction, SchedulerConfig, SchedulerError, Spacing, index_for_timestep,
    np_arange, np_interp, np_linspace,
};
use burn::tensor::Tensor;

/// `DPMSolverMultistepScheduler` with `algorithm_type: "dpmsolver++"`, `solver_order` 1 or 2.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    pub(crate) common: Common,
    solver_order: usize,
    /// `solver_type: "heun"` (else midpoint).
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    /// `final_sigmas_type: "sigma_min"` (else `"zero"`).
    sigma_min_last: bool,
    lambda_min_clipped: f64,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    /// The converted (x₀-predicting) model outputs of the last `solver_order` steps, oldest
    /// first, on the host or the device as the steps ran.
    model_outputs: Vec<Option<Held>>,
    lower_order_nums: usize,
    step_index: Option<usize>,
}

impl DpmSolverMultistep {
    pub const CLASS: &'static str = "DPMSolverMultistepScheduler";

    /// Reads the fields `DPMSolverMultistepScheduler` uses (defaults: `solver_order: 2`,
    /// `lower_order_final: true`, `final_sigmas_type: "zero"`, `timestep_spacing: "linspace"`).
    pub fn from_config(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let r = ConfigReader {
            config,
            class: Self::CLASS,
        };
        let common = r.common(Spacing::Linspace)?;
        // diffusers maps "deis" to "dpmsolver++".
        let algorithm = r.string("algorithm_type", "dpmsolver++")?;
        if algorithm != "dpmsolver++" && algorithm != "deis" {
            return Err(r.unsupported(
                "algorithm_type",
                format!("\"{algorithm}\""),
                "rewire implements DPM-Solver++ (2M): set `\"algorithm_type\": \"dpmsolver++\"`",
            ));
        }
        let solver_order = r.usize("solver_order", 2)?;
        if !(1..=2).contains(&solver_order) {
            return Err(r.unsupported(
                "solver_order",
                solver_order,
                "rewire implements DPM-Solver++ of order 1 and 2 (2M); set `\"solver_order\": 2`",
            ));
        }
        // diffusers maps "logrho", "bh1" and "bh2" to "midpoint".
        let heun = r.choice(
            "solver_type",
            "midpoint",
            &["midpoint", "heun", "logrho", "bh1", "bh2"],
        )? == "heun";
        for field in [
            "thresholding",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
        ] {
            r.require_bool(field, false, false)?;
        }
        if let Some(v) = config.raw("variance_type").filter(|v| !v.is_null()) {
            return Err(r.unsupported(
                "variance_type",
                v,
                "rewire supports `variance_type: null` (a UNet predicting the noise only)",
            ));
        }
        let sigma_min_last =
            r.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        Ok(Self {
            solver_order,
            heun,
            lower_order_final: r.bool("lower_order_final", true)?,
            euler_at_final: r.bool("euler_at_final", false)?,
            sigma_min_last,
            lambda_min_clipped: r.float("lambda_min_clipped", f64::NEG_INFINITY)?,
            common,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
            step_index: None,
        })
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<(), SchedulerError> {
        self.common.check_steps(n)?;
        let t_train = self.common.num_train_timesteps;
        // clipped_idx = searchsorted(flip(lambda_t), lambda_min_clipped): how many log-SNRs fall
        // below the clip, counted from the noisiest end.
        let clipped = self
            .common
            .alphas_cumprod
            .iter()
            .filter(|&&a| {
                let lambda = a.sqrt().ln() - (1.0 - a).sqrt().ln();
                f64::from(lambda) < self.lambda_min_clipped
            })
            .count();
        let last = t_train - clipped;
        let ts: Vec<i64> = match self.common.spacing {
            Spacing::Linspace => {
                let mut v: Vec<i64> = np_linspace(0.0, last as f64 - 1.0, n + 1)
                    .into_iter()
                    .rev()
                    .map(|v| v.round_ties_even() as i64)
                    .collect();
                v.pop();
                v
            }
            Spacing::Leading => {
                let ratio = (last / (n + 1)) as i64;
                (1..=n as i64)
                    .rev()
                    .map(|i| i * ratio + self.common.steps_offset)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = t_train as f64 / n as f64;
                np_arange(last as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|v| v.round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        let train = self.common.train_sigmas();
        let mut sigmas: Vec<f32> = ts
            .iter()
            .map(|&t| np_interp(t as f64, &train) as f32)
            .collect();
        sigmas.push(if self.sigma_min_last { train[0] } else { 0.0 });
        self.timesteps = ts.into_iter().map(|t| t as f64).collect();
        self.sigmas = sigmas;
        self.model_outputs = vec![None; self.solver_order];
        self.lower_order_nums = 0;
        self.step_index = None;
        Ok(())
    }

    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// `(alpha_t, sigma_t)` of a sigma: `alpha_t = 1 / sqrt(sigma² + 1)`, `sigma_t = sigma·alpha_t`.
    fn alpha_sigma(sigma: f32) -> (f32, f32) {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha, sigma * alpha)
    }

    /// `add_noise`: `alpha_t·original + sigma_t·noise` for timestep `t`'s sigma
    /// (image-to-image's start).
    pub fn add_noise(&self, original: &[f32], noise: &[f32], t: f64) -> Vec<f32> {
        self.add_noise_any(original.to_vec(), noise.to_vec(), t)
    }

    /// [`Self::add_noise`] on device tensors.
    pub fn add_noise_tensor(&self, original: Tensor<4>, noise: Tensor<4>, t: f64) -> Tensor<4> {
        self.add_noise_any(original, noise, t)
    }

    fn add_noise_any<L: Latent>(&self, original: L, noise: L, t: f64) -> L {
        check_same(Self::CLASS, &noise, &original);
        let i = index_for_timestep(&self.timesteps, t).unwrap_or_else(|| {
            panic!(
                "{}: timestep {t} is not in the schedule; pass a value from timesteps() after set_timesteps",
                Self::CLASS
            )
        });
        let (a, s) = Self::alpha_sigma(self.sigmas[i]);
        // a·original + s·noise
        original.times(a).plus(noise.times(s))
    }

    /// `DPMSolverMultistepScheduler.step`, in float32 as torch computes it.
    pub fn step(&mut self, model_output: &[f32], t: f64, sample: &[f32]) -> Vec<f32> {
        self.step_any(model_output.to_vec(), t, sample.to_vec())
    }

    /// [`Self::step`] on device tensors (the same operations, the same results); the data
    /// prediction the next step reads stays on the device.
    pub fn step_tensor(&mut self, model_output: Tensor<4>, t: f64, sample: Tensor<4>) -> Tensor<4> {
        self.step_any(model_output, t, sample)
    }

    fn step_any<L: Latent>(&mut self, model_output: L, t: f64, sample: L) -> L {
        assert!(
            !self.timesteps.is_empty(),
            "{}: call set_timesteps before step",
            Self::CLASS
        );
        check_same(Self::CLASS, &model_output, &sample);
        let n = self.timesteps.len();
        let i = self
            .step_index
            .unwrap_or_else(|| index_for_timestep(&self.timesteps, t).unwrap_or(n - 1));
        let lower_order_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || !self.sigma_min_last);
        // diffusers' `lower_order_second` only matters for third order, which rewire does not
        // implement: with solver_order 2 every step after the first is second order unless it is
        // the lower-order final one.

        // convert_model_output: the data prediction x0.
        let (alpha_s0, sigma_s0) = Self::alpha_sigma(self.sigmas[i]);
        let x0 = match self.common.prediction {
            // (x − sigma_s0·m) / alpha_s0
            Prediction::Epsilon => sample
                .clone()
                .minus(model_output.times(sigma_s0))
                .over(alpha_s0),
            // alpha_s0·x − sigma_s0·m
            Prediction::V => sample
                .clone()
                .times(alpha_s0)
                .minus(model_output.times(sigma_s0)),
        };
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0.keep()));

        let (alpha_t, sigma_t) = Self::alpha_sigma(self.sigmas[i + 1]);
        let lambda_t = alpha_t.ln() - sigma_t.ln();
        let lambda_s0 = alpha_s0.ln() - sigma_s0.ln();
        let h = lambda_t - lambda_s0;
        let ratio = sigma_t / sigma_s0;
        let b = alpha_t * ((-h).exp() - 1.0);
        // The newest stored output is this step's x0.
        let m0 = x0;

        let first_order = self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final;
        let prev = if first_order {
            // ratio·x − b·m0
            sample.times(ratio).minus(m0.times(b))
        } else {
            let m1 = L::from_held(
                self.model_outputs[self.solver_order - 2]
                    .as_ref()
                    .expect("the previous step's output"),
                &sample,
            );
            let (alpha_s1, sigma_s1) = Self::alpha_sigma(self.sigmas[i - 1]);
            let lambda_s1 = alpha_s1.ln() - sigma_s1.ln();
            let h_0 = lambda_s0 - lambda_s1;
            let r0 = h_0 / h;
            let inv_r0 = 1.0 / r0;
            let c1 = if self.heun {
                alpha_t * (((-h).exp() - 1.0) / h + 1.0)
            } else {
                0.5 * b
            };
            // d1 = inv_r0·(m0 − m1); ratio·x − b·m0 ± c1·d1
            let d1 = m0.clone().minus(m1).times(inv_r0);
            let base = sample.times(ratio).minus(m0.times(b));
            if self.heun {
                base.plus(d1.times(c1))
            } else {
                base.minus(d1.times(c1))
            }
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        prev
    }
}

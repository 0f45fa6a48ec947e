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

mod ddim;
mod dpmpp2m;
mod euler;
mod latent;
mod pndm;

pub use ddim::{Ddim, DdimInverse};
pub use dpmpp2m::DpmSolverMultistep;
pub use euler::EulerDiscrete;
pub use pndm::Pndm;

use burn::tensor::Tensor;
use latent::{Latent, check_same};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
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

/// A scheduler config as diffusers writes it: the JSON object and the file it came from (named in
/// every error). Fields are read, typed, by the scheduler that uses them; the rest is ignored.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    path: PathBuf,
    values: Map<String, Value>,
}

impl SchedulerConfig {
    /// Reads `path`: a `scheduler_config.json`, a `scheduler/` folder or a pipeline folder.
    pub fn open(path: &Path) -> Result<Self, SchedulerError> {
        let file = if path.is_dir() {
            let direct = path.join("scheduler_config.json");
            if direct.is_file() {
                direct
            } else {
                path.join("scheduler").join("scheduler_config.json")
            }
        } else {
            path.to_path_buf()
        };
        use crate::limits::{MAX_CONFIG_BYTES, ReadError, read_text_capped};
        let text =
            read_text_capped(&file, MAX_CONFIG_BYTES, "MAX_CONFIG_BYTES").map_err(|e| match e {
                ReadError::Io(source) => SchedulerError::Read {
                    path: file.clone(),
                    source,
                },
                other => SchedulerError::Json {
                    path: file.clone(),
                    line: match other {
                        ReadError::Utf8 { line, .. } => line,
                        _ => 0,
                    },
                    column: match other {
                        ReadError::Utf8 { col, .. } => col,
                        _ => 0,
                    },
                    message: other.to_string(),
                },
            })?;
        Self::from_json(&text, &file)
    }

    /// Parses config JSON; `path` is used in messages. Python's `Infinity`, `-Infinity` and `NaN`
    /// (which diffusers writes for e.g. `lambda_min_clipped`) are accepted.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, SchedulerError> {
        let value: Value =
            serde_json::from_str(&quote_non_finite(text)).map_err(|e| SchedulerError::Json {
                path: path.to_path_buf(),
                line: e.line(),
                column: e.column(),
                message: e.to_string(),
            })?;
        Self::from_value(value, path)
    }

    /// Wraps an already parsed JSON object; `path` is used in messages.
    pub fn from_value(value: Value, path: &Path) -> Result<Self, SchedulerError> {
        match value {
            Value::Object(values) => Ok(Self {
                path: path.to_path_buf(),
                values,
            }),
            other => Err(SchedulerError::Type {
                path: path.to_path_buf(),
                field: "(top level)".into(),
                expected: "a JSON object",
                found: short(&other),
            }),
        }
    }

    /// The file this config was read from (or the name given for it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `_class_name`, when present.
    pub fn class_name(&self) -> Result<Option<String>, SchedulerError> {
        self.get("_class_name", "a string")
    }

    /// Sets a field (e.g. to adapt another class's config when switching schedulers).
    pub fn set(&mut self, field: &str, value: Value) {
        self.values.insert(field.to_string(), value);
    }

    /// The raw value of `field`, if present.
    pub fn raw(&self, field: &str) -> Option<&Value> {
        self.values.get(field)
    }

    /// `field` deserialised as `T`; absent and `null` are `None`.
    fn get<T: DeserializeOwned>(
        &self,
        field: &str,
        expected: &'static str,
    ) -> Result<Option<T>, SchedulerError> {
        match self.values.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                serde_json::from_value(v.clone())
                    .map(Some)
                    .map_err(|_| SchedulerError::Type {
                        path: self.path.clone(),
                        field: field.into(),
                        expected,
                        found: short(v),
                    })
            }
        }
    }
}

/// A JSON value shortened for a message.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

/// Turns Python's bare `Infinity`, `-Infinity` and `NaN` tokens (outside strings) into strings so
/// that strict JSON parsers accept them; [`ConfigReader::float`] reads them back.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    /// The noise (`"epsilon"`).
    Epsilon,
    /// The velocity (`"v_prediction"`, SD 2.x 768 models).
    V,
}

/// How inference timesteps are spread over the training timesteps (`timestep_spacing`, Table 2 of
/// "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// The fields every scheduler here shares, resolved with the class's defaults.
#[derive(Debug, Clone)]
pub(crate) struct Common {
    pub path: PathBuf,
    pub class: &'static str,
    pub num_train_timesteps: usize,
    /// `cumprod(1 - betas)` as torch computes it (float32 values, float64 accumulation).
    pub alphas_cumprod: Vec<f32>,
    pub steps_offset: i64,
    pub spacing: Spacing,
    pub prediction: Prediction,
}

impl Common {
    /// Checks `n` against `num_train_timesteps`.
    pub fn check_steps(&self, n: usize) -> Result<(), SchedulerError> {
        if n == 0 || n > self.num_train_timesteps {
            return Err(SchedulerError::Steps {
                path: self.path.clone(),
                class: self.class,
                requested: n,
                max: self.num_train_timesteps,
            });
        }
        Ok(())
    }

    /// Checks every timestep of a schedule against the training schedule.
    pub fn check_timesteps(&self, ts: &[f64]) -> Result<(), SchedulerError> {
        let t = self.num_train_timesteps as f64;
        if let Some(bad) = ts.iter().find(|&&x| !(x >= 0.0 && x < t)) {
            return Err(SchedulerError::Invalid {
                path: self.path.clone(),
                field: "steps_offset",
                message: format!(
                    "timestep {bad} of a {}-step schedule is outside the training schedule 0..{t} (steps_offset = {})\n  hint: ask for fewer steps or lower steps_offset",
                    ts.len(),
                    self.steps_offset
                ),
            });
        }
        Ok(())
    }

    /// `alphas_cumprod[t]`, for an integral `t` inside the training schedule.
    pub fn alpha_prod(&self, t: i64) -> f32 {
        let i = usize::try_from(t)
            .ok()
            .filter(|&i| i < self.alphas_cumprod.len())
            .unwrap_or_else(|| {
                panic!(
                    "{}: timestep {t} is outside the training schedule 0..{}",
                    self.class,
                    self.alphas_cumprod.len()
                )
            });
        self.alphas_cumprod[i]
    }

    /// `sqrt(ᾱ_t)·original + sqrt(1 − ᾱ_t)·noise` (DDPM-family `add_noise`), in float32.
    pub fn add_noise_vp<L: Latent>(&self, class: &str, original: L, noise: L, t: f64) -> L {
        check_same(class, &noise, &original);
        let a = self.alpha_prod(integral(class, t));
        let (s, r) = (a.sqrt(), (1.0 - a).sqrt());
        original.times(s).plus(noise.times(r))
    }

    /// The training sigmas `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`, in float32.
    pub fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }
}

/// Reads a config's fields for one scheduler class, with that class's defaults.
pub(crate) struct ConfigReader<'a> {
    pub config: &'a SchedulerConfig,
    pub class: &'static str,
}

impl ConfigReader<'_> {
    fn path(&self) -> PathBuf {
        self.config.path.clone()
    }

    pub fn unsupported(
        &self,
        field: &'static str,
        value: impl std::fmt::Display,
        hint: impl Into<String>,
    ) -> SchedulerError {
        SchedulerError::Unsupported {
            path: self.path(),
            class: self.class,
            field,
            value: value.to_string(),
            hint: hint.into(),
        }
    }

    pub fn bool(&self, field: &'static str, default: bool) -> Result<bool, SchedulerError> {
        Ok(self.config.get(field, "true or false")?.unwrap_or(default))
    }

    /// Errors unless `field` (or its default) is `want`.
    pub fn require_bool(
        &self,
        field: &'static str,
        default: bool,
        want: bool,
    ) -> Result<(), SchedulerError> {
        let v = self.bool(field, default)?;
        if v != want {
            let origin = if self.config.raw(field).is_some_and(|v| !v.is_null()) {
                String::new()
            } else {
                format!(" (the {} default)", self.class)
            };
            return Err(self.unsupported(
                field,
                format!("{v}{origin}"),
                format!(
                    "rewire supports `{field}: {want}` for {}; set it in the config",
                    self.class
                ),
            ));
        }
        Ok(())
    }

    pub fn usize(&self, field: &'static str, default: usize) -> Result<usize, SchedulerError> {
        Ok(self
            .config
            .get(field, "a non-negative integer")?
            .unwrap_or(default))
    }

    pub fn i64(&self, field: &'static str, default: i64) -> Result<i64, SchedulerError> {
        Ok(self.config.get(field, "an integer")?.unwrap_or(default))
    }

    /// A number; also accepts Python's `Infinity`, `-Infinity` and `NaN`.
    pub fn float(&self, field: &'static str, default: f64) -> Result<f64, SchedulerError> {
        match self.config.raw(field) {
            Some(Value::String(s)) => match s.as_str() {
                "Infinity" | "inf" => Ok(f64::INFINITY),
                "-Infinity" | "-inf" => Ok(f64::NEG_INFINITY),
                "NaN" | "nan" => Ok(f64::NAN),
                _ => Err(SchedulerError::Type {
                    path: self.path(),
                    field: field.into(),
                    expected: "a number",
                    found: format!("{s:?}"),
                }),
            },
            _ => Ok(self.config.get(field, "a number")?.unwrap_or(default)),
        }
    }

    pub fn string(&self, field: &'static str, default: &str) -> Result<String, SchedulerError> {
        let v: Option<String> = self.config.get(field, "a string")?;
        Ok(v.unwrap_or_else(|| default.to_string()))
    }

    /// A string that must be one of `allowed` (or, absent, `default`).
    pub fn choice(
        &self,
        field: &'static str,
        default: &'static str,
        allowed: &[&'static str],
    ) -> Result<&'static str, SchedulerError> {
        let v = self.string(field, default)?;
        allowed.iter().copied().find(|a| *a == v).ok_or_else(|| {
            let list = allowed
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ");
            self.unsupported(
                field,
                format!("\"{v}\""),
                format!("rewire supports {list} for {}", self.class),
            )
        })
    }

    /// The shared fields, resolved; `default_spacing` is the class's `timestep_spacing` default.
    pub fn common(&self, default_spacing: Spacing) -> Result<Common, SchedulerError> {
        let num_train_timesteps = self.usize("num_train_timesteps", 1000)?;
        if num_train_timesteps == 0 {
            return Err(SchedulerError::Invalid {
                path: self.path(),
                field: "num_train_timesteps",
                message: "must be at least 1".into(),
            });
        }
        let steps_offset = self.i64("steps_offset", 0)?;
        if !(0..num_train_timesteps as i64).contains(&steps_offset) {
            return Err(SchedulerError::Invalid {
                path: self.path(),
                field: "steps_offset",
                message: format!(
                    "{steps_offset} is outside the training schedule 0..{num_train_timesteps}\n  hint: diffusers' SD configs use steps_offset 0 or 1"
                ),
            });
        }
        crate::limits::at_most(
            num_train_timesteps,
            crate::limits::MAX_TRAIN_TIMESTEPS,
            "MAX_TRAIN_TIMESTEPS",
        )
        .map_err(|e| SchedulerError::Invalid {
            path: self.path(),
            field: "num_train_timesteps",
            message: format!("{e}\n  hint: SD schedulers are trained with 1000 timesteps"),
        })?;
        let betas = self.betas(num_train_timesteps)?;
        if let Some((i, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(b.is_finite() && **b >= 0.0 && **b < 1.0))
        {
            return Err(SchedulerError::Invalid {
                path: self.path(),
                field: if self
                    .config
                    .raw("trained_betas")
                    .is_some_and(|v| !v.is_null())
                {
                    "trained_betas"
                } else {
                    "beta_end"
                },
                message: format!(
                    "beta {b} (timestep {i}) is outside [0, 1)\n  hint: betas are noise variances per step; SD uses beta_start 0.00085, beta_end 0.012"
                ),
            });
        }
        if self.bool("rescale_betas_zero_snr", false)? {
            return Err(self.unsupported(
                "rescale_betas_zero_snr",
                "true",
                "rewire supports `rescale_betas_zero_snr: false`",
            ));
        }
        let spacing = match self.choice(
            "timestep_spacing",
            match default_spacing {
                Spacing::Leading => "leading",
                Spacing::Trailing => "trailing",
                Spacing::Linspace => "linspace",
            },
            &["leading", "trailing", "linspace"],
        )? {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            _ => Spacing::Linspace,
        };
        let prediction =
            match self.choice("prediction_type", "epsilon", &["epsilon", "v_prediction"])? {
                "epsilon" => Prediction::Epsilon,
                _ => Prediction::V,
            };
        Ok(Common {
            path: self.path(),
            class: self.class,
            num_train_timesteps,
            alphas_cumprod: alphas_cumprod(&betas),
            steps_offset,
            spacing,
            prediction,
        })
    }

    /// `trained_betas`, or the `beta_schedule` between `beta_start` and `beta_end`, in float32.
    fn betas(&self, n: usize) -> Result<Vec<f32>, SchedulerError> {
        if let Some(trained) = self
            .config
            .get::<Vec<f64>>("trained_betas", "a list of numbers")?
        {
            if trained.len() != n {
                return Err(SchedulerError::Invalid {
                    path: self.path(),
                    field: "trained_betas",
                    message: format!(
                        "{} entries, expected num_train_timesteps ({n})",
                        trained.len()
                    ),
                });
            }
            return Ok(trained.iter().map(|&b| b as f32).collect());
        }
        let start = self.float("beta_start", 0.0001)?;
        let end = self.float("beta_end", 0.02)?;
        match self.choice("beta_schedule", "linear", &["linear", "scaled_linear"])? {
            "linear" => Ok(torch_linspace_f32(start, end, n)),
            _ => Ok(torch_linspace_f32(start.sqrt(), end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect()),
        }
    }
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` as torch's CPU kernel computes it:
/// a float32 step, the first half counted from `start`, the second half back from `end`.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    match steps {
        0 => Vec::new(),
        1 => vec![s],
        _ => {
            let step = (e - s) / (steps - 1) as f32;
            let half = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < half {
                        s + step * i as f32
                    } else {
                        e - step * (steps - i - 1) as f32
                    }
                })
                .collect()
        }
    }
}

/// `torch.cumprod(1.0 - betas)` for float32 on CPU: each alpha in float32, the running product
/// accumulated in float64 and stored as float32.
pub(crate) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= f64::from(1.0f32 - b);
            acc as f32
        })
        .collect()
}

/// `numpy.linspace(start, stop, num)` (float64, endpoint included).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            v[num - 1] = stop;
            v
        }
    }
}

/// `numpy.arange(start, stop, step)` for a float step: numpy's length, then `start + i * delta`
/// with `delta = (start + step) - start`.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| {
            if i == 0 {
                start
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// `numpy.interp(x, arange(len(fp)), fp)` in float64.
pub(crate) fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last as f64 {
        return f64::from(fp[last]);
    }
    let j = x.floor() as usize;
    let (y0, y1) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    if x == j as f64 {
        return y0;
    }
    let slope = y1 - y0;
    slope * (x - j as f64) + y0
}

/// The position of `t` in `timesteps` as diffusers' `index_for_timestep` picks it: the second
/// match when `t` occurs twice (so a restarted img2img schedule does not skip a sigma), else the
/// first; `None` when absent.
pub(crate) fn index_for_timestep(timesteps: &[f64], t: f64) -> Option<usize> {
    let mut hits = timesteps
        .iter()
        .enumerate()
        .filter(|(_, v)| **v == t)
        .map(|(i, _)| i);
    let first = hits.next()?;
    Some(hits.next().unwrap_or(first))
}

/// An integral timestep as an index type; panics on a fractional one.
pub(crate) fn integral(class: &str, t: f64) -> i64 {
    assert!(
        t.fract() == 0.0 && t.is_finite(),
        "{class}: timestep {t} is not an integer; pass a value from timesteps()"
    );
    t as i64
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn config(class: &str, prediction: &str, extra: &str) -> SchedulerConfig {
        let json = format!(
            r#"{{"_class_name": "{class}", "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
               "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
               "clip_sample": false, "prediction_type": "{prediction}"{extra}}}"#
        );
        SchedulerConfig::from_json(&json, Path::new("test.json")).expect("a valid config")
    }

    fn host(t: Tensor<4>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 data")
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Every scheduler stepped on device tensors gives the host step's latents, step after step
    /// (PNDM's four past outputs and DPM-Solver++'s previous data prediction kept on the device),
    /// for both prediction types; so does image-to-image's `add_noise` and Euler's input scaling.
    #[test]
    fn tensor_steps_match_host_steps() {
        let device = crate::backend::default_device().expect("a compiled backend");
        let shape = [2usize, 4, 5, 3];
        let n: usize = shape.iter().product();
        let up = |v: &[f32]| {
            Tensor::<4>::from_data(TensorData::new(v.to_vec(), shape.to_vec()), &device)
        };
        let cases = [
            ("DDIMScheduler", ""),
            ("PNDMScheduler", ""),
            ("EulerDiscreteScheduler", ""),
            (
                "EulerDiscreteScheduler",
                r#", "timestep_spacing": "leading""#,
            ),
            ("DPMSolverMultistepScheduler", ""),
            ("DPMSolverMultistepScheduler", r#", "solver_type": "heun""#),
            (
                "DPMSolverMultistepScheduler",
                r#", "lower_order_final": false, "final_sigmas_type": "sigma_min""#,
            ),
        ];
        let mut worst = 0f32;
        for (class, extra) in cases {
            for prediction in ["epsilon", "v_prediction"] {
                let what = format!("{class}{extra} {prediction}");
                let mut on_host = Scheduler::from_config(&config(class, prediction, extra))
                    .expect("a supported config");
                on_host.set_timesteps(6).expect("6 steps");
                let mut on_device = on_host.clone();
                let ts = on_host.timesteps().to_vec();
                assert!(ts.len() >= 6, "{what}");

                let noise = crate::pipeline::gaussian(1, n);
                let image = crate::pipeline::gaussian(2, n);
                let mut x = on_host.add_noise(&image, &noise, ts[0]);
                let mut xt = on_device.add_noise_tensor(up(&image), up(&noise), ts[0]);
                let e = max_diff(&x, &host(xt.clone()));
                assert!(e <= 1e-6, "{what}: add_noise differs by {e}");

                for (i, &t) in ts.iter().enumerate() {
                    let xin = on_host.scale_model_input(&x, t);
                    let xin_t = on_device.scale_model_input_tensor(xt.clone(), t);
                    let e = max_diff(&xin, &host(xin_t));
                    assert!(
                        e <= 1e-6,
                        "{what} step {i}: scale_model_input differs by {e}"
                    );

                    let eps = crate::pipeline::gaussian(10 + i as u64, n);
                    x = on_host.step(&eps, t, &x);
                    xt = on_device.step_tensor(up(&eps), t, xt);
                    let e = max_diff(&x, &host(xt.clone()));
                    worst = worst.max(e);
                    assert!(e <= 1e-6, "{what} step {i} (t = {t}): differs by {e}");
                }
                assert!(x.iter().all(|v| v.is_finite()), "{what}");
            }
        }

        println!("device vs host steps: largest difference {worst:e}");

        // DDIM inversion, rising through the schedule.
        for prediction in ["epsilon", "v_prediction"] {
            let mut inv = DdimInverse::from_config(&config("DDIMScheduler", prediction, ""))
                .expect("a supported config");
            inv.set_timesteps(6).expect("6 steps");
            let mut x = crate::pipeline::gaussian(3, n);
            let mut xt = up(&x);
            for (i, &t) in inv.timesteps().to_vec().iter().enumerate() {
                let eps = crate::pipeline::gaussian(20 + i as u64, n);
                x = inv.step(&eps, t, &x);
                xt = inv.step_tensor(up(&eps), t, xt);
                let e = max_diff(&x, &host(xt.clone()));
                assert!(
                    e <= 1e-6,
                    "DDIM inverse {prediction} step {i}: differs by {e}"
                );
            }
        }
    }

    /// History made on the host is read by a device step (and the other way round), so a loop
    /// may switch between the two.
    #[test]
    fn history_moves_between_host_and_device() {
        let device = crate::backend::default_device().expect("a compiled backend");
        let shape = [1usize, 4, 2, 2];
        let n: usize = shape.iter().product();
        let up = |v: &[f32]| {
            Tensor::<4>::from_data(TensorData::new(v.to_vec(), shape.to_vec()), &device)
        };
        for class in ["PNDMScheduler", "DPMSolverMultistepScheduler"] {
            let mut a = Scheduler::from_config(&config(class, "epsilon", "")).expect("config");
            a.set_timesteps(8).expect("8 steps");
            let mut b = a.clone();
            let ts = a.timesteps().to_vec();
            let mut x = crate::pipeline::gaussian(4, n);
            let mut y = x.clone();
            for (i, &t) in ts.iter().enumerate() {
                let eps = crate::pipeline::gaussian(30 + i as u64, n);
                x = a.step(&eps, t, &x);
                y = if i % 2 == 0 {
                    host(b.step_tensor(up(&eps), t, up(&y)))
                } else {
                    b.step(&eps, t, &y)
                };
                let e = max_diff(&x, &y);
                assert!(e <= 1e-6, "{class} step {i}: differs by {e}");
            }
        }
    }
}

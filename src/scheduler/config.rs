//! A diffusers scheduler config ([`SchedulerConfig`]) and the typed reading of its fields for
//! one scheduler class ([`ConfigReader`]), down to the fields every scheduler shares
//! ([`Common`]: the training betas, spacing, prediction type).
//!
//! Try it: `cargo test --release --lib scheduler::tests`.

use super::SchedulerError;
use super::latent::{Latent, check_same};
use super::numerics::{alphas_cumprod, integral, torch_linspace_f32};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// A scheduler config as diffusers writes it: the JSON object and the file it came from (named in
/// every error). Fields are read, typed, by the scheduler that uses them; the rest is ignored.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub(super) path: PathBuf,
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

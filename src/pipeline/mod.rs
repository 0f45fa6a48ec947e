//! The text-to-image job: tokenizer → text encoder → denoising loop with classifier-free
//! guidance (the UNet compiled with a recipe's rewrites, switching step-segment plans by step)
//! → VAE decode. Several prompts run as one batch, in diffusers' order
//! `[uncond_0..uncond_P, cond_0..cond_P]`. The latents stay on the device through the loop
//! (guidance and the scheduler's steps run on device tensors, the UNet's output stays there); the
//! host gets each step's latents only when [`RunOptions::keep_latents_per_step`] asks.
//!
//! An SDXL pipeline (model_index.json names `text_encoder_2`/`tokenizer_2`) conditions on both
//! encoders: each encoder's `hidden_states[-2]` concatenated on the feature axis, the second
//! encoder's pooled, projected embedding as `text_embeds`, and `time_ids` (original size, crop
//! corner, target size) for the UNet's `text_time` embedding; see [`SdxlOptions`].
//!
//! The pieces: `options` (what to generate, what came out), `conditioning` (the prompts as
//! the UNet's text states, SDXL's second encoder and size conditioning), `setup` (a run's
//! latent size, UNet spec, schedule and compiled recipe), `run` (the denoising loop and the
//! plan helpers other jobs share), `latents` (seeded noise, the init image as VAE input) and
//! `aggregate` (the cross-attention maps averaged per prompt).
//!
//! Try it: `rewire run models/tiny-sd --prompt "a photo of a cat" --steps 5 -o cat.png`.

mod aggregate;
mod conditioning;
mod latents;
mod options;
mod run;
mod setup;

pub use conditioning::{Conditioning, SecondEncoder};
pub use latents::gaussian;
pub use options::{RunOptions, RunOutput, SdxlOptions};
pub(crate) use run::{UNET_OUT, timestep_input, unet_out};
pub use run::{each_stores, read_stored};

use crate::clip::text_encoder::TextEncoder;
use crate::clip::tokenizer::Tokenizer;
use crate::graph::InputSpec;
use crate::scheduler::SchedulerConfig;
use crate::unet::UNet;
use crate::vae::Vae;
use burn::tensor::Device;
use std::path::{Path, PathBuf};

/// Errors raised by the text-to-image job.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(
        "{path}: no {component}/ folder\n  hint: rewire run needs a diffusers pipeline folder with unet/, text_encoder/, tokenizer/, vae/ and scheduler/"
    )]
    MissingComponent {
        path: PathBuf,
        component: &'static str,
    },
    #[error("no picture to invert\n  hint: give a PNG (or a folder of PNGs)")]
    NoPicture,
    #[error(transparent)]
    Window(#[from] crate::video::window::WindowError),
    #[error(
        "{what} needs about {need_mib} MiB ({detail}), more than the {available_mib} MiB this machine has available\n  hint: {hint}"
    )]
    Memory {
        what: String,
        need_mib: u64,
        available_mib: u64,
        detail: String,
        hint: String,
    },
    #[error(
        "picture {index} is {found:?} (H, W, channels), expected {expected:?}\n  hint: pictures inverted together must share one size, a multiple of the VAE factor"
    )]
    PictureSizes {
        index: usize,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{count} pictures: {reason}\n  hint: invert fewer pictures at once")]
    PictureCount { count: usize, reason: String },
    #[error("{component}: {message}")]
    Component {
        component: &'static str,
        message: String,
    },
    #[error("size {width}×{height} is not divisible by the VAE factor {factor}\n  hint: use positive multiples of {factor}, e.g. {}×{}", (width / factor).max(1) * factor, (height / factor).max(1) * factor)]
    Size {
        width: usize,
        height: usize,
        factor: usize,
    },
    #[error(
        "latents {found:?} do not fit the run: expected [{batch} or 1, {channels}, {height}, {width}]"
    )]
    Latents {
        found: Vec<usize>,
        batch: usize,
        channels: usize,
        height: usize,
        width: usize,
    },
    #[error(
        "the plan was compiled for UNet inputs {compiled:?}, this run needs {run:?}\n  hint: compile it for the run: `rewire compile RECIPE --model MODEL --batch B --size HxW --steps N` with B = 2 × prompts (1 × without guidance) and the latent size"
    )]
    Spec { compiled: InputSpec, run: InputSpec },
    #[error(
        "the plan was compiled for a {compiled}-step run, this run has {run} steps\n  hint: run with --steps {compiled}, or compile again with --steps {run}"
    )]
    Steps { compiled: usize, run: usize },
    #[error(
        "the init image is {}×{}, the run asks for {}×{}\n  hint: leave out --size (the image's size is used) or resize the image", image.0, image.1, size.0, size.1
    )]
    ImageSize {
        image: (usize, usize),
        size: (usize, usize),
    },
    #[error("the init image has shape {shape:?}, expected [H, W, 3] in [0, 1]")]
    Image { shape: Vec<usize> },
    #[error(
        "--strength {strength} is outside (0, 1]\n  hint: 1 starts from (almost) pure noise, small values stay close to the image"
    )]
    Strength { strength: f32 },
    #[error(
        "--strength {strength} of {steps} steps runs no step\n  hint: raise --strength or --steps so that strength × steps ≥ 1"
    )]
    NoSteps { strength: f32, steps: usize },
    #[error("give at least one --prompt")]
    NoPrompt,
    #[error(
        "{count} second prompts for {prompts} prompts\n  hint: give --prompt-2 once (it applies to every prompt) or once per --prompt"
    )]
    Prompts2 { count: usize, prompts: usize },
    #[error(
        "{path}: the UNet takes SDXL's text_time conditioning (addition_embed_type \"text_time\") but the pipeline has no text_encoder_2/ and tokenizer_2/\n  hint: pass a StableDiffusionXLPipeline folder with both text encoders"
    )]
    NoSecondEncoder { path: PathBuf },
    #[error(
        "{what}: the UNet expects {expected} features, the text encoders give {found}\n  hint: the text encoders do not belong to this UNet (check `cross_attention_dim` and `projection_class_embeddings_input_dim` in unet/config.json)"
    )]
    Conditioning {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error(
        "{option} is for SDXL pipelines (with text_encoder_2/); {path} has one text encoder\n  hint: leave out --prompt-2, --negative-2, --original-size, --crop-top-left and --target-size"
    )]
    NotSdxl { option: &'static str, path: PathBuf },
    #[error(transparent)]
    Compile(#[from] crate::compile::CompileError),
    #[error(transparent)]
    Exec(#[from] crate::exec::ExecError),
    #[error(transparent)]
    Stored(#[from] crate::compile::store::StoredError),
    #[error(transparent)]
    Model(#[from] crate::unet::ModelError),
}

fn component<E: std::fmt::Display>(component: &'static str) -> impl Fn(E) -> PipelineError {
    move |e| PipelineError::Component {
        component,
        message: e.to_string(),
    }
}

/// An opened diffusers pipeline.
pub struct Pipeline {
    pub dir: PathBuf,
    pub unet: UNet,
    pub tokenizer: Tokenizer,
    pub text: TextEncoder,
    /// SDXL's second tokenizer and text encoder (`tokenizer_2/`, `text_encoder_2/`).
    pub second: Option<SecondEncoder>,
    pub vae: Vae,
    pub scheduler: SchedulerConfig,
    pub device: Device,
}

impl Pipeline {
    /// Opens every component of a pipeline folder on `device` (with `text_encoder_2/` and
    /// `tokenizer_2/` when the folder has them: an SDXL pipeline).
    pub fn open(dir: &Path, device: &Device) -> Result<Pipeline, PipelineError> {
        for c in ["unet", "text_encoder", "tokenizer", "vae", "scheduler"] {
            if !dir.join(c).is_dir() {
                return Err(PipelineError::MissingComponent {
                    path: dir.to_path_buf(),
                    component: c,
                });
            }
        }
        let index = model_index(dir)?;
        let named = |c: &str| {
            index
                .as_ref()
                .and_then(|i| i.get(c))
                .is_some_and(|v| v.as_array().is_some_and(|a| a.iter().any(|x| !x.is_null())))
        };
        let has_second =
            named("text_encoder_2") || dir.join("text_encoder_2").join("config.json").is_file();
        let unet = UNet::open(&dir.join("unet"))?;
        let text_time = unet.resolved.text_time.is_some();
        let second = if has_second {
            for c in ["text_encoder_2", "tokenizer_2"] {
                if !dir.join(c).is_dir() {
                    return Err(PipelineError::MissingComponent {
                        path: dir.to_path_buf(),
                        component: c,
                    });
                }
            }
            Some(SecondEncoder {
                tokenizer: Tokenizer::open(&dir.join("tokenizer_2"))
                    .map_err(component("tokenizer_2"))?,
                text: TextEncoder::open(&dir.join("text_encoder_2"), device)
                    .map_err(component("text_encoder_2"))?,
                force_zeros_for_empty_prompt: index
                    .as_ref()
                    .and_then(|i| i.get("force_zeros_for_empty_prompt"))
                    .and_then(|v| v.as_bool())
                    .unwrap_or(true),
            })
        } else if text_time {
            return Err(PipelineError::NoSecondEncoder {
                path: dir.to_path_buf(),
            });
        } else {
            None
        };
        let pipe = Pipeline {
            dir: dir.to_path_buf(),
            unet,
            tokenizer: Tokenizer::open(&dir.join("tokenizer")).map_err(component("tokenizer"))?,
            text: TextEncoder::open(&dir.join("text_encoder"), device)
                .map_err(component("text_encoder"))?,
            second,
            vae: Vae::open(&dir.join("vae"), device).map_err(component("vae"))?,
            scheduler: SchedulerConfig::open(&dir.join("scheduler"))
                .map_err(component("scheduler"))?,
            device: device.clone(),
        };
        pipe.check_text()?;
        Ok(pipe)
    }

    /// Checks that the tokenizers fit their text encoders and the encoders the UNet: token
    /// counts within `max_position_embeddings`, equal text lengths, feature widths.
    fn check_text(&self) -> Result<(), PipelineError> {
        let mut pairs = vec![("tokenizer", &self.tokenizer, &self.text)];
        if let Some(s) = &self.second {
            pairs.push(("tokenizer_2", &s.tokenizer, &s.text));
        }
        for (name, tok, text) in &pairs {
            let max = text.config.max_position_embeddings;
            if tok.max_length() > max {
                return Err(PipelineError::Component {
                    component: name,
                    message: format!(
                        "{}: `model_max_length` = {} is more than the text encoder's max_position_embeddings = {max}\n  hint: set model_max_length to {max} in tokenizer_config.json",
                        tok.dir().join("tokenizer_config.json").display(),
                        tok.max_length()
                    ),
                });
            }
        }
        if let Some(s) = &self.second {
            if s.tokenizer.max_length() != self.tokenizer.max_length() {
                return Err(PipelineError::Component {
                    component: "tokenizer_2",
                    message: format!(
                        "pads to {} tokens, tokenizer/ to {}: the two encoders' states are concatenated token by token\n  hint: give both tokenizers the same model_max_length",
                        s.tokenizer.max_length(),
                        self.tokenizer.max_length()
                    ),
                });
            }
            if !s.text.has_projection() {
                return Err(PipelineError::Component {
                    component: "text_encoder_2",
                    message: "no text_projection: SDXL's second encoder is a CLIPTextModelWithProjection (its pooled, projected output conditions the UNet)\n  hint: use the pipeline's own text_encoder_2".into(),
                });
            }
        }
        let found = self.text.config.hidden_size
            + self
                .second
                .as_ref()
                .map_or(0, |s| s.text.config.hidden_size);
        let expected = self.unet.resolved.context_dim;
        if expected != found {
            return Err(PipelineError::Conditioning {
                what: "encoder_hidden_states",
                expected,
                found,
            });
        }
        Ok(())
    }
}

/// Reads a pipeline's `model_index.json`, if it has one.
fn model_index(dir: &Path) -> Result<Option<serde_json::Value>, PipelineError> {
    let path = dir.join("model_index.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| PipelineError::Component {
        component: "model_index.json",
        message: format!("{}: {e}", path.display()),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| PipelineError::Component {
            component: "model_index.json",
            message: format!(
                "{}: invalid JSON at line {}, column {}: {e}",
                path.display(),
                e.line(),
                e.column()
            ),
        })
}

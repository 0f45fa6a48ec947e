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
//! Try it: `rewire run models/tiny-sd --prompt "a photo of a cat" --steps 5 -o cat.png`.

use crate::clip::text_encoder::{TextEncoder, TextOutput};
use crate::clip::tokenizer::Tokenizer;
use crate::compile::store::{StoreAccumulator, Stored};
use crate::compile::{CompileOptions, Compiled};
use crate::exec::{HostTensor, KernelCache, LowerOptions, Plan, State, Value};
use crate::graph::{AttnKind, InputSpec};
use crate::recipe::Source;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::unet::UNet;
use crate::vae::Vae;
use burn::tensor::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
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

/// SDXL's second text encoder (`CLIPTextModelWithProjection`) with its tokenizer.
pub struct SecondEncoder {
    pub tokenizer: Tokenizer,
    pub text: TextEncoder,
    /// model_index.json's `force_zeros_for_empty_prompt` (diffusers' default: true): with no
    /// negative prompt, the unconditional embeddings are zeros instead of the encoded "".
    pub force_zeros_for_empty_prompt: bool,
}

/// SDXL's conditioning options (diffusers' `StableDiffusionXLPipeline.__call__` arguments);
/// ignored by a pipeline with one text encoder only when left at their defaults.
#[derive(Debug, Clone, Default)]
pub struct SdxlOptions {
    /// `prompt_2` for the second encoder: none (each prompt), one (for every prompt) or one per
    /// prompt.
    pub prompts_2: Vec<String>,
    /// `negative_prompt_2` (default: the negative prompt).
    pub negative_2: Option<String>,
    /// `original_size` as (width, height) (default: the output size).
    pub original_size: Option<(usize, usize)>,
    /// `crops_coords_top_left` as (top, left), in pixels.
    pub crop_top_left: (usize, usize),
    /// `target_size` as (width, height) (default: the output size).
    pub target_size: Option<(usize, usize)>,
}

impl SdxlOptions {
    /// The first option set away from its default, by its flag.
    fn first_set(&self) -> Option<&'static str> {
        if !self.prompts_2.is_empty() {
            Some("--prompt-2")
        } else if self.negative_2.is_some() {
            Some("--negative-2")
        } else if self.original_size.is_some() {
            Some("--original-size")
        } else if self.crop_top_left != (0, 0) {
            Some("--crop-top-left")
        } else if self.target_size.is_some() {
            Some("--target-size")
        } else {
            None
        }
    }
}

/// The UNet's text conditioning for a run, batch `[negatives, prompts]`.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `encoder_hidden_states` `[batch, text_len, cross_attention_dim]`.
    pub encoder_hidden_states: HostTensor,
    /// SDXL: `text_embeds` `[batch, pooled]` and `time_ids` `[batch, 6]`.
    pub text_time: Option<(HostTensor, HostTensor)>,
}

impl Conditioning {
    /// The run's constants as UNet inputs: `encoder_hidden_states` (and SDXL's `text_embeds`,
    /// `time_ids`).
    pub fn constants(&self) -> HashMap<String, HostTensor> {
        let mut inputs = HashMap::new();
        inputs.insert(
            "encoder_hidden_states".to_string(),
            self.encoder_hidden_states.clone(),
        );
        if let Some((text_embeds, time_ids)) = &self.text_time {
            inputs.insert("text_embeds".to_string(), text_embeds.clone());
            inputs.insert("time_ids".to_string(), time_ids.clone());
        }
        inputs
    }

    /// One UNet call's inputs: the constants, `sample` and `timestep` `t`.
    pub fn unet_inputs(&self, sample: HostTensor, t: f64) -> HashMap<String, HostTensor> {
        let mut inputs = self.constants();
        inputs.insert("sample".to_string(), sample);
        inputs.insert(
            "timestep".to_string(),
            HostTensor::new(vec![1], vec![t as f32]),
        );
        inputs
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub prompts: Vec<String>,
    /// The negative prompt (diffusers' `negative_prompt`); `None` encodes "", except on an SDXL
    /// pipeline with `force_zeros_for_empty_prompt`, where the unconditional embeddings are
    /// zeros.
    pub negative: Option<String>,
    /// SDXL's second prompts and size conditioning.
    pub sdxl: SdxlOptions,
    pub steps: usize,
    pub guidance: f32,
    /// A scheduler other than the pipeline's (`ddim`, `pndm`, `euler`, `dpmpp2m`).
    pub scheduler: Option<String>,
    pub seed: u64,
    /// Initial latents `[P or 1, C, h, w]` (before scaling by init_noise_sigma).
    pub latents: Option<HostTensor>,
    /// Image width and height (default: the UNet's sample_size × the VAE factor).
    pub size: Option<(usize, usize)>,
    pub fuse: bool,
    /// How the UNet's linear and conv weights are held (computation is f32 either way).
    pub weights: crate::exec::WeightDtype,
    /// Image to image: the start image `[H, W, 3]` in [0, 1] (its VAE latents, noised to the
    /// first timestep that runs, replace the initial noise; `latents`/`seed` give the noise).
    pub init_image: Option<HostTensor>,
    /// How much of the schedule an init image goes through, in (0, 1] (diffusers' `strength`).
    pub strength: f32,
    /// Compute every value at every step instead of hoisting the run constants (the text
    /// states' K/V projections) out of the loop: for checking that hoisting changes nothing.
    pub no_hoist: bool,
    /// Frames per group for a recipe's `ReplaceKv(source: Frames(...))`: a video job's prompts
    /// are its frames (the batch is `[uncond f0..fN-1, cond f0..fN-1]`).
    pub frames: Option<usize>,
    /// The pass of a multi-pass job this run is (see `CompileOptions::pass`).
    pub pass: Option<String>,
    /// The job's passes in order (see `CompileOptions::passes`).
    pub passes: Vec<String>,
    /// Bring the latents back to the host after every step ([`RunOutput::latents_per_step`]):
    /// one download per step. Off, the latents stay on the device from the first step to the
    /// VAE and only the final ones come back ([`RunOutput::latents`]). Default: on.
    pub keep_latents_per_step: bool,
}

impl Default for RunOptions {
    /// diffusers' defaults: 20 steps (rewire's), guidance 7.5, the pipeline's scheduler,
    /// seed 0, the model's size, fused rewrites, strength 0.8 for an init image.
    fn default() -> Self {
        RunOptions {
            prompts: vec![],
            negative: None,
            sdxl: SdxlOptions::default(),
            steps: 20,
            guidance: 7.5,
            scheduler: None,
            seed: 0,
            latents: None,
            size: None,
            fuse: true,
            weights: crate::exec::WeightDtype::F32,
            init_image: None,
            strength: 0.8,
            no_hoist: false,
            frames: None,
            pass: None,
            passes: Vec::new(),
            keep_latents_per_step: true,
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// One `[H, W, 3]` image in [0, 1] per prompt.
    pub images: Vec<HostTensor>,
    /// Latents after each step, `[P, C, h, w]` (empty unless
    /// [`RunOptions::keep_latents_per_step`]).
    pub latents_per_step: Vec<HostTensor>,
    /// The final latents `[P, C, h, w]` (what the VAE decoded).
    pub latents: HostTensor,
    /// Store outputs reduced over the steps (`probs.<layer>`), plus `aggregate_cross_resR`.
    pub stores: BTreeMap<String, HostTensor>,
    /// Each prompt's tokens as text (bos and eos included), for heat-map labels.
    pub tokens: Vec<Vec<String>>,
    /// The maps of the recipe's `reduce: Each` stores (every step's, on the device) and its
    /// reduced stores, for a later pass to read.
    pub stored: Stored,
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

    /// Prompts longer than their text encoder reads, as warnings to print: which prompt, its
    /// token count, the limit and the words cut off (diffusers truncates them the same way).
    pub fn truncations(&self, opts: &RunOptions) -> Vec<String> {
        let mut texts: Vec<(&str, &Tokenizer, &str)> = Vec::new();
        for p in &opts.prompts {
            texts.push(("prompt", &self.tokenizer, p));
        }
        if let Some(n) = &opts.negative {
            texts.push(("negative prompt", &self.tokenizer, n));
        }
        if let Some(second) = &self.second {
            for p in &opts.sdxl.prompts_2 {
                texts.push(("second prompt", &second.tokenizer, p));
            }
            if let Some(n) = &opts.sdxl.negative_2 {
                texts.push(("second negative prompt", &second.tokenizer, n));
            }
        }
        texts
            .into_iter()
            .filter_map(|(what, tok, text)| {
                let (n, cut) = tok.truncation(text)?;
                let mut shown: String = cut.chars().take(60).collect();
                if shown.len() < cut.len() {
                    shown.push('…');
                }
                Some(format!(
                    "the {what} has {n} tokens, the text encoder reads {}: cut off: {shown:?}",
                    tok.max_length()
                ))
            })
            .collect()
    }

    /// The prompts for the second encoder, one per prompt (diffusers: `prompt_2 or prompt`).
    fn prompts_2(&self, opts: &RunOptions) -> Result<Vec<String>, PipelineError> {
        let p2 = &opts.sdxl.prompts_2;
        match p2.len() {
            0 => Ok(opts.prompts.clone()),
            1 => Ok(vec![p2[0].clone(); opts.prompts.len()]),
            n if n == opts.prompts.len() => Ok(p2.clone()),
            n => Err(PipelineError::Prompts2 {
                count: n,
                prompts: opts.prompts.len(),
            }),
        }
    }

    /// Encodes the run's text as the UNet's conditioning, batch `[negative × P, prompts]`
    /// (only the prompts without guidance). SD 1.x/2.x: the encoder's `last_hidden_state`.
    /// SDXL (as diffusers' `encode_prompt`): both encoders' `hidden_states[-2]` concatenated,
    /// the second's pooled `text_embeds`, and the size conditioning as `time_ids`; with no
    /// negative prompt and `force_zeros_for_empty_prompt`, zeros for the negatives.
    pub fn conditioning(
        &self,
        opts: &RunOptions,
        size: (usize, usize),
    ) -> Result<Conditioning, PipelineError> {
        let p = opts.prompts.len();
        if p == 0 {
            return Err(PipelineError::NoPrompt);
        }
        let cfg = opts.guidance > 1.0;
        let Some(second) = &self.second else {
            if let Some(option) = opts.sdxl.first_set() {
                return Err(PipelineError::NotSdxl {
                    option,
                    path: self.dir.clone(),
                });
            }
            let mut ids: Vec<Vec<u32>> = Vec::new();
            if cfg {
                let neg = self
                    .tokenizer
                    .encode(opts.negative.as_deref().unwrap_or(""));
                ids.extend(std::iter::repeat_n(neg, p));
            }
            for prompt in &opts.prompts {
                ids.push(self.tokenizer.encode(prompt));
            }
            let out = self
                .text
                .try_encode(&ids)
                .map_err(component("text_encoder"))?;
            return Ok(Conditioning {
                encoder_hidden_states: Value::R3(out).to_host(),
                text_time: None,
            });
        };
        let prompts_2 = self.prompts_2(opts)?;
        let encode = |first: &[&str], second_p: &[&str]| -> Result<_, PipelineError> {
            let ids1: Vec<Vec<u32>> = first.iter().map(|t| self.tokenizer.encode(t)).collect();
            let ids2: Vec<Vec<u32>> = second_p
                .iter()
                .map(|t| second.tokenizer.encode(t))
                .collect();
            let a: TextOutput = self
                .text
                .encode_all(&ids1)
                .map_err(component("text_encoder"))?;
            let b: TextOutput = second
                .text
                .encode_all(&ids2)
                .map_err(component("text_encoder_2"))?;
            let states = burn::tensor::Tensor::cat(vec![a.penultimate, b.penultimate], 2);
            let pooled = b
                .pooled
                .expect("checked at open: text_encoder_2 has a projection");
            Ok((Value::R3(states).to_host(), Value::R2(pooled).to_host()))
        };
        let prompts: Vec<&str> = opts.prompts.iter().map(String::as_str).collect();
        let prompts_2: Vec<&str> = prompts_2.iter().map(String::as_str).collect();
        let (mut states, mut pooled) = encode(&prompts, &prompts_2)?;
        if cfg {
            let (neg_states, neg_pooled) =
                if opts.negative.is_none() && second.force_zeros_for_empty_prompt {
                    (
                        HostTensor::new(states.shape.clone(), vec![0.0; states.data.len()]),
                        HostTensor::new(pooled.shape.clone(), vec![0.0; pooled.data.len()]),
                    )
                } else {
                    // diffusers: negative_prompt or "", negative_prompt_2 or negative_prompt.
                    let neg = opts.negative.as_deref().unwrap_or("");
                    let neg_2 = match opts.sdxl.negative_2.as_deref() {
                        Some(n) if !n.is_empty() => n,
                        _ => neg,
                    };
                    encode(&vec![neg; p], &vec![neg_2; p])?
                };
            states = concat0(&neg_states, &states);
            pooled = concat0(&neg_pooled, &pooled);
        }
        let (w, h) = size;
        let (ow, oh) = opts.sdxl.original_size.unwrap_or((w, h));
        let (tw, th) = opts.sdxl.target_size.unwrap_or((w, h));
        let (top, left) = opts.sdxl.crop_top_left;
        let row = [oh, ow, top, left, th, tw].map(|v| v as f32);
        let batch = pooled.shape[0];
        let time_ids = HostTensor::new(vec![batch, 6], row.repeat(batch));
        let expected = self.unet.resolved.text_time.as_ref().map(|tt| {
            tt.input_dim
                .saturating_sub(time_ids.shape[1] * tt.time_embed_dim)
        });
        if let Some(expected) = expected
            && expected != pooled.shape[1]
        {
            return Err(PipelineError::Conditioning {
                what: "text_embeds (text_encoder_2's projection_dim)",
                expected,
                found: pooled.shape[1],
            });
        }
        Ok(Conditioning {
            encoder_hidden_states: states,
            text_time: Some((pooled, time_ids)),
        })
    }

    /// The latent size of a run (`--size`, else the init image's size, else the UNet's
    /// sample_size × the VAE factor), checked against the VAE factor.
    pub fn latent_size(&self, opts: &RunOptions) -> Result<(usize, usize), PipelineError> {
        let f = self.vae.downsample_factor();
        let image = match &opts.init_image {
            Some(i) if i.shape.len() == 3 && i.shape[2] == 3 => Some((i.shape[1], i.shape[0])),
            Some(i) => {
                return Err(PipelineError::Image {
                    shape: i.shape.clone(),
                });
            }
            None => None,
        };
        let (w, h) = match (opts.size, image) {
            (Some(size), Some(image)) if size != image => {
                return Err(PipelineError::ImageSize { image, size });
            }
            (Some(s), _) => s,
            (None, Some(s)) => s,
            (None, None) => {
                let n = match &self.unet.config.sample_size {
                    Some(serde_json::Value::Number(n)) => n.as_u64().unwrap_or(64) as usize,
                    _ => 64,
                };
                (n * f, n * f)
            }
        };
        if w == 0 || h == 0 || w % f != 0 || h % f != 0 {
            return Err(PipelineError::Size {
                width: w,
                height: h,
                factor: f,
            });
        }
        Ok((h / f, w / f))
    }

    /// The UNet's input spec for a run: batch (2 per prompt with guidance), latent size and text
    /// length. A plan must have been compiled for exactly this spec.
    pub fn unet_spec(&self, opts: &RunOptions) -> Result<InputSpec, PipelineError> {
        let p = opts.prompts.len();
        if p == 0 {
            return Err(PipelineError::NoPrompt);
        }
        let (lh, lw) = self.latent_size(opts)?;
        let batch = if opts.guidance > 1.0 { 2 * p } else { p };
        let mut spec = InputSpec::new(batch, lh, lw);
        spec.text_len = self.tokenizer.max_length();
        Ok(spec)
    }

    /// The scheduler set up for a run, and the timesteps its loop runs the UNet at: one per step
    /// (PNDM with skip_prk_steps: one more, as in diffusers), or with an init image only the last
    /// `strength × steps` of them (diffusers' img2img `get_timesteps`). A recipe's step indices
    /// count these UNet calls from 0.
    pub fn schedule(&self, opts: &RunOptions) -> Result<(Scheduler, Vec<f64>), PipelineError> {
        let mut sched = match &opts.scheduler {
            Some(name) => {
                // Switching to PNDM from another class's config: Stable Diffusion runs PNDM
                // with skip_prk_steps (its own configs say so); other classes do not set it.
                let mut config = self.scheduler.clone();
                let pndm = matches!(
                    name.to_lowercase().as_str(),
                    "pndm" | "plms" | "pndmscheduler"
                );
                if pndm && config.raw("skip_prk_steps").is_none() {
                    config.set("skip_prk_steps", serde_json::Value::Bool(true));
                }
                Scheduler::from_name(name, &config)
            }
            None => Scheduler::from_config(&self.scheduler),
        }
        .map_err(component("scheduler"))?;
        sched
            .set_timesteps(opts.steps)
            .and_then(|()| sched.check_schedule())
            .map_err(component("scheduler"))?;
        let mut timesteps = sched.timesteps().to_vec();
        if opts.init_image.is_some() {
            if !(opts.strength > 0.0 && opts.strength <= 1.0) {
                return Err(PipelineError::Strength {
                    strength: opts.strength,
                });
            }
            let init = ((opts.steps as f64 * opts.strength as f64) as usize).min(opts.steps);
            let start = (opts.steps - init) * sched.order();
            if start >= timesteps.len() || init == 0 {
                return Err(PipelineError::NoSteps {
                    strength: opts.strength,
                    steps: opts.steps,
                });
            }
            timesteps.drain(..start);
        }
        Ok((sched, timesteps))
    }

    /// Compiles a recipe for a run: its shapes and step count, words bound to the last prompt.
    pub fn compile(&self, opts: &RunOptions, src: &Source) -> Result<Compiled, PipelineError> {
        let base = self.unet.graph(self.unet_spec(opts)?)?;
        let last = opts.prompts.last().ok_or(PipelineError::NoPrompt)?;
        let words = self.tokenizer.word_positions(last);
        if let Some(second) = &self.second {
            let last_2 = self.prompts_2(opts)?.pop().unwrap_or_default();
            check_words_2(src, &words, &second.tokenizer.word_positions(&last_2))?;
        }
        let copts = CompileOptions {
            fuse: opts.fuse,
            steps: Some(self.schedule(opts)?.1.len()),
            words: Some(words),
            require_bound_words: true,
            frames: opts.frames,
            references: Some(vec![]),
            pass: opts.pass.clone(),
            passes: opts.passes.clone(),
        };
        Ok(crate::compile::compile_graph(src, &base, &copts)?)
    }

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
        let mut cache = KernelCache::default();
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
            None => vec![(None, lower(&self.unet.graph(spec)?, &mut cache)?, None)],
            Some(c) => c
                .segments
                .iter()
                .map(|s| {
                    let cached = match &s.cached {
                        Some(g) => Some(lower(g, &mut cache)?),
                        None => None,
                    };
                    Ok((s.steps, lower(&s.graph, &mut cache)?, cached))
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

/// SDXL: a recipe's words bind to the first tokenizer's tokens of the last prompt; the UNet's
/// text states at those positions also hold the second encoder's states of the last
/// `prompt_2`, so a word must sit at the same positions there (it does when both prompts are
/// the same and the tokenizers share a vocabulary, as SDXL's do).
fn check_words_2(
    src: &Source,
    first: &HashMap<String, Vec<usize>>,
    second: &HashMap<String, Vec<usize>>,
) -> Result<(), PipelineError> {
    use crate::recipe::spans::Seg;
    use crate::recipe::{RewriteOp, at};
    for (i, r) in src.recipe.rewrites.iter().enumerate() {
        let RewriteOp::Reweight { words, .. } = &r.op else {
            continue;
        };
        for word in words.keys() {
            let (Some(a), b) = (first.get(word), second.get(word)) else {
                continue; // not in the prompt: the compiler says so
            };
            if b != Some(a) {
                let path = at(
                    i,
                    &[
                        Seg::Field("op"),
                        Seg::Field("words"),
                        Seg::Key(word.clone()),
                    ],
                );
                let found = match b {
                    Some(b) => format!("at token positions {b:?}"),
                    None => "nowhere".into(),
                };
                return Err(crate::compile::CompileError::from(src.error(
                    &path,
                    "word-tokenizers",
                    format!(
                        "word \"{word}\" is at token positions {a:?} for the first tokenizer and {found} in the second prompt (tokenizer_2)"
                    ),
                    "words bind to the first tokenizer's tokens, and the UNet's text states at those positions also hold text_encoder_2's states: give --prompt-2 the word at the same place (or leave --prompt-2 out), or reweight by tokens: {POSITION: WEIGHT}",
                ))
                .into());
            }
        }
    }
    Ok(())
}

/// Two host tensors joined on the first axis.
fn concat0(a: &HostTensor, b: &HostTensor) -> HostTensor {
    let mut shape = a.shape.clone();
    shape[0] += b.shape[0];
    let mut data = a.data.clone();
    data.extend_from_slice(&b.data);
    HostTensor::new(shape, data)
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

/// An `[H, W, 3]` image in [0, 1] as the VAE's `[1, 3, H, W]` input in [-1, 1].
fn image_tensor(img: &HostTensor, device: &Device) -> burn::tensor::Tensor<4> {
    let (h, w) = (img.shape[0], img.shape[1]);
    let mut chw = vec![0f32; h * w * 3];
    for (i, v) in img.data.iter().enumerate() {
        chw[(i % 3) * h * w + i / 3] = v * 2.0 - 1.0;
    }
    crate::exec::upload::<4>(&[1, 3, h, w], chw, device)
}

/// prompt-to-prompt's aggregate_attention for cross-attention: the mean over heads and over the
/// stored up/down cross-attention layers of one query resolution (the one most layers have,
/// the smaller on a tie), as `[r, r, keys]` per prompt (`aggregate_cross_res{r}`, with `.{p}`
/// for prompts after the first).
fn aggregate_cross(c: &Compiled, stores: &mut BTreeMap<String, HostTensor>, prompts: usize) {
    let layers = c.base.attention_layers();
    let mut by_res: BTreeMap<(usize, usize), Vec<&HostTensor>> = BTreeMap::new();
    for (_, path, a) in &layers {
        if a.kind != AttnKind::Cross || a.place == crate::graph::Place::Mid {
            continue;
        }
        // The layer's maps from a store of any name (`probs.<layer>`, `stored.<name>.<layer>`).
        let found = stores.iter().find(|(k, _)| {
            crate::graph::keys::Key::parse(k)
                .store_parts()
                .is_some_and(|(_, l)| l == *path)
        });
        if let Some((_, t)) = found {
            by_res.entry(a.grid).or_default().push(t);
        }
    }
    let Some((&(h, w), maps)) = by_res
        .iter()
        .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)))
    else {
        return;
    };
    let nq = h * w;
    let keys = maps[0].shape.last().copied().unwrap_or(0);
    // Each map: [(items,) (heads,) nq, keys]; items = prompts when several.
    let mut agg = vec![vec![0f32; nq * keys]; prompts];
    for m in maps {
        let per_item = m.data.len() / prompts.max(1);
        let heads = per_item / (nq * keys);
        for (p, acc) in agg.iter_mut().enumerate() {
            let item = &m.data[p * per_item..(p + 1) * per_item];
            for hd in 0..heads {
                for (a, v) in acc
                    .iter_mut()
                    .zip(&item[hd * nq * keys..(hd + 1) * nq * keys])
                {
                    *a += v / (heads * maps.len()) as f32;
                }
            }
        }
    }
    for (p, a) in agg.into_iter().enumerate() {
        let name = crate::graph::keys::Key::AggregateCross { res: h, prompt: p }.to_string();
        stores.insert(name, HostTensor::new(vec![h, w, keys], a));
    }
}

/// Deterministic standard normal samples (Box–Muller on splitmix64): the same seed gives the
/// same latents on every machine.
pub fn gaussian(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed ^ 0x5DEE_CE66_D1CE_4E5B;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (next(), next());
        let r = (-2.0 * u1.ln()).sqrt();
        let th = std::f64::consts::TAU * u2;
        out.push((r * th.cos()) as f32);
        out.push((r * th.sin()) as f32);
    }
    out.truncate(n);
    out
}

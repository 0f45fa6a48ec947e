//! What a text-to-image run is asked for and what it gives back: [`RunOptions`] (prompts,
//! steps, guidance, scheduler, seed, size, init image, passes; diffusers' defaults),
//! [`SdxlOptions`] (SDXL's second prompts and size conditioning) and [`RunOutput`] (images,
//! latents, reduced stores, tokens, the maps kept for a later pass).
//!
//! Try it: `cargo run --release -- run --help` (the flags that fill these options).

use crate::compile::store::Stored;
use crate::exec::HostTensor;
use std::collections::BTreeMap;

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
    pub(super) fn first_set(&self) -> Option<&'static str> {
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

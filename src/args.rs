//! The binary's arguments (part of `rewire`'s command line, not of the library): the flags of
//! `run`, `forward`, `invert`, `profile`, the video commands and the recipe commands' shapes.
//! `main.rs` (the command line) and `commands.rs` (the commands that run models) hold the
//! commands and what each prints.
//!
//! Try it: `cargo run --release -- run --help`.

use clap::ValueEnum;
use rewire::shape::Shape;
use std::path::PathBuf;

/// The flags `video generate` and `video edit` share (flattened into both, so the flag names,
/// defaults and help stay one).
#[derive(clap::Args)]
pub struct VideoCommonArgs {
    /// A diffusers pipeline folder.
    pub model: PathBuf,
    /// The negative prompt (default "").
    #[arg(long)]
    pub negative: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f32,
    /// Milliseconds per frame in the GIF.
    #[arg(long, default_value_t = 125)]
    pub delay: u32,
    #[arg(long, default_value = "flex")]
    pub device: String,
}

#[derive(clap::Args)]
pub struct VideoEditArgs {
    #[command(flatten)]
    pub common: VideoCommonArgs,
    /// The clip: a folder of PNGs (sorted by name) or an animated GIF.
    pub frames: PathBuf,
    /// The prompt describing the clip (the inversion's).
    #[arg(long)]
    pub source_prompt: String,
    /// The prompt of the edit.
    #[arg(long)]
    pub prompt: String,
    /// A recipe with passes "invert" and "edit" instead of the built-in FateZero.
    #[arg(long, conflicts_with = "no_recipe")]
    pub recipe: Option<PathBuf>,
    /// Plain per-frame attention in both passes (no recipe): the baseline.
    #[arg(long)]
    pub no_recipe: bool,
    /// Frames per window: windows run in order and carry the first and previous frame's K/V,
    /// so a long clip edits in the memory of one window (0: the whole clip as one batch).
    /// Default 8, or the whole clip when the recipe reads frames a window cannot carry.
    #[arg(long)]
    pub window: Option<usize>,
    /// Hold linear and conv weights as f32 (default), f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub weights: rewire::exec::WeightDtype,
    /// The edited clip: OUT.gif (with OUT_000.png, … and OUT_strip.png beside it).
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(clap::Args)]
pub struct VideoGenerateArgs {
    #[command(flatten)]
    pub common: VideoCommonArgs,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    /// Motion per frame, X,Y, in diffusers' units (pixels of a 512×512 grid: 64 on a 16×16
    /// latent is 2 latent pixels).
    #[arg(long, default_value = "12,12")]
    pub motion: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The initial latent `[1, C, h, w]`: the tensor `latents`, else `x_T` (instead of --seed).
    #[arg(long, conflicts_with = "seed")]
    pub latents: Option<PathBuf>,
    /// Frames per window: windows run in order and carry the first frame's K/V, so a long
    /// clip runs in the memory of one window (0: the whole clip as one batch). Default 8, or
    /// the whole clip when the recipe reads frames a window cannot carry.
    #[arg(long)]
    pub window: Option<usize>,
    /// A recipe instead of the built-in cross-frame attention.
    #[arg(long, conflicts_with = "no_recipe")]
    pub recipe: Option<PathBuf>,
    /// Plain per-frame attention (no recipe): the baseline.
    #[arg(long)]
    pub no_recipe: bool,
    /// The clip: OUT.gif (with OUT_000.png, … and OUT_strip.png beside it).
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(clap::Args)]
pub struct InvertArgs {
    /// A diffusers pipeline folder.
    pub model: PathBuf,
    /// A PNG (or any picture the `image` crate reads), or a clip inverted as one batch: a folder
    /// of PNGs (sorted by name) or an animated GIF.
    pub picture: PathBuf,
    /// The prompt the picture is inverted under (the source prompt of an edit).
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value = "flex")]
    pub device: String,
    /// Hold linear and conv weights as f32 (default), f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub weights: rewire::exec::WeightDtype,
    /// The latents file (safetensors).
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(clap::Args)]
pub struct ProfileArgs {
    /// A pipeline folder, a unet/ folder, or a UNet config.json (run with deterministic random
    /// weights, e.g. benches/configs/sd15-unet.json).
    pub model: PathBuf,
    /// Profile the graph a recipe makes (its first step segment).
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Latent size HxW (default: the config's sample_size).
    #[arg(long)]
    pub size: Option<String>,
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Timed forwards to average (after one untimed warm-up).
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    #[arg(long, default_value = "flex")]
    pub device: String,
    /// How linear and conv weights are held: f32, f16, bf16.
    #[arg(long, default_value = "f32")]
    pub weights: rewire::exec::WeightDtype,
    /// The attention kernel: fused (rewire's own on the CPU, Burn's elsewhere), burn, naive.
    #[arg(long, value_enum, default_value = "fused")]
    pub attention: AttentionArg,
    /// How many of the slowest nodes to list.
    #[arg(long, default_value_t = 15)]
    pub top: usize,
    /// Print JSON (totals, per op kind, every node) instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum AttentionArg {
    Fused,
    Burn,
    Naive,
}

/// The input spec a recipe is compiled for.
#[derive(clap::Args, Clone)]
pub struct ShapeArgs {
    /// Latent size HxW (default: the config's sample_size).
    #[arg(long)]
    pub size: Option<String>,
    /// Batch size (default 2 = one prompt with classifier-free guidance; with --prompt, twice
    /// the prompts).
    #[arg(long)]
    pub batch: Option<usize>,
    /// The prompts of the run this is for (repeatable, as for `run`): they size the batch
    /// (twice their number, with guidance) and the recipe's words bind to the last one (needs
    /// the pipeline's tokenizer/).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// Text length (keys of cross-attention).
    #[arg(long, default_value_t = 77)]
    pub text_len: usize,
    /// Number of denoising steps (needed when a rewrite has a step range).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Frames per group, for ReplaceKv(source: Frames(...)).
    #[arg(long)]
    pub frames: Option<usize>,
    /// For a recipe whose rewrites name passes (`pass: "invert"`): the pass to compile
    /// (default: the last the recipe names).
    #[arg(long)]
    pub pass: Option<String>,
}

#[derive(clap::Args)]
pub struct ForwardArgs {
    pub model: PathBuf,
    /// Safetensors with `sample`, `timestep`, `encoder_hidden_states` (+ `text_embeds`, `time_ids` for SDXL).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write the output (tensor `out`).
    #[arg(long)]
    pub out: PathBuf,
    /// Backend: flex (CPU), wgpu, cuda.
    #[arg(long, default_value = "flex")]
    pub device: String,
    /// Apply a recipe (compiled for the inputs' shapes).
    #[arg(long, conflicts_with = "plan")]
    pub recipe: Option<PathBuf>,
    /// Run a plan made by `rewire compile`.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Where Store rewrites write `probs.<layer>` (default: OUT with .store.safetensors).
    #[arg(long)]
    pub store_out: Option<PathBuf>,
    /// The denoising step this forward is (for recipes with step ranges).
    #[arg(long, requires = "steps")]
    pub step: Option<usize>,
    /// The number of denoising steps of the run.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Hold linear and conv weights as f32 (default), f16 or bf16; computation stays f32
    /// (f16 halves the weight memory and is exact for an f16 checkpoint).
    #[arg(long, default_value = "f32")]
    pub weights: rewire::exec::WeightDtype,
    /// Do not fuse rewrites: every rewrite runs on materialised probabilities.
    #[arg(long)]
    pub no_fuse: bool,
    /// Frames per group for ReplaceKv(source: Frames(...)): the batch is [uncond f0..fN-1, cond f0..fN-1].
    #[arg(long)]
    pub frames: Option<usize>,
    /// Inputs of the reference pass (its `sample`, or `reference_sample`); defaults to the
    /// inputs file's `reference_sample`. The pass is named "reference".
    #[arg(long)]
    pub reference: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// A diffusers pipeline folder (unet/, text_encoder/, tokenizer/, vae/, scheduler/).
    pub model: PathBuf,
    /// A prompt; repeat for several (they run as one batch).
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// The negative prompt (default: none; an SDXL pipeline with force_zeros_for_empty_prompt
    /// then uses zero embeddings, others encode "").
    #[arg(long)]
    pub negative: Option<String>,
    /// SDXL: the prompt for the second text encoder (default: --prompt); once for every
    /// prompt, or once per --prompt.
    #[arg(long = "prompt-2")]
    pub prompt_2: Vec<String>,
    /// SDXL: the negative prompt for the second text encoder (default: --negative).
    #[arg(long = "negative-2")]
    pub negative_2: Option<String>,
    /// SDXL size conditioning: the original image size WxH (default: the output size).
    #[arg(long = "original-size")]
    pub original_size: Option<String>,
    /// SDXL size conditioning: the crop's top-left corner TOP,LEFT in pixels (default: 0,0).
    #[arg(long = "crop-top-left")]
    pub crop_top_left: Option<String>,
    /// SDXL size conditioning: the target size WxH (default: the output size).
    #[arg(long = "target-size")]
    pub target_size: Option<String>,
    /// Apply a recipe (compiled for this run's shapes, steps and last prompt).
    #[arg(long, conflicts_with = "plan")]
    pub recipe: Option<PathBuf>,
    /// Run a plan made by `rewire compile` for this run's shapes and steps.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f32,
    /// ddim, pndm, euler or dpmpp2m (default: the pipeline's scheduler).
    #[arg(long)]
    pub scheduler: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Initial latents: the tensor `latents`, else `latents_in`, else the file's only tensor.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Image size WxH (default: the init image's size, else the UNet's sample_size × the VAE
    /// factor).
    #[arg(long)]
    pub size: Option<String>,
    /// Image to image: start from this picture (PNG, JPEG, ...), encoded by the VAE and noised
    /// to the first step that runs.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// With --image: the share of the schedule to run, in (0, 1]; low values stay close to the
    /// picture.
    #[arg(long, default_value_t = 0.8, requires = "image")]
    pub strength: f32,
    #[arg(long, default_value = "flex")]
    pub device: String,
    /// Hold linear and conv weights as f32 (default), f16 or bf16; computation stays f32
    /// (f16 halves the weight memory and is exact for an f16 checkpoint).
    #[arg(long, default_value = "f32")]
    pub weights: rewire::exec::WeightDtype,
    #[arg(long)]
    pub no_fuse: bool,
    /// Recompute the run constants (the text states' K/V projections) at every step instead
    /// of once per job (hoisting is lossless; this is for checking that).
    #[arg(long)]
    pub no_hoist: bool,
    /// The image (several prompts: NAME_0.png, NAME_1.png, ...).
    #[arg(short, long)]
    pub output: PathBuf,
}

impl From<&ShapeArgs> for Shape {
    fn from(a: &ShapeArgs) -> Shape {
        Shape {
            size: a.size.clone(),
            batch: a.batch,
            prompt: a.prompt.clone(),
            text_len: a.text_len,
            steps: a.steps,
            frames: a.frames,
            pass: a.pass.clone(),
        }
    }
}

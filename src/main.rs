//! The `rewire` command line: inspect a UNet's attention layers, dump its graph, run one forward.
//!
//! Try it: `cargo run --release -- inspect models/tiny-sd`.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use rewire::compile::plan_file::PlanFile;
use rewire::compile::{self, CompileOptions, diff};
use rewire::exec::{HostTensor, LowerOptions, Plan};
use rewire::graph::keys::Key;
use rewire::graph::{Graph, InputSpec, dump};
use rewire::recipe::Source;
use rewire::unet::UNet;
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "rewire",
    version,
    about = "Typed-graph attention rewrites for Stable Diffusion UNets"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Check every node's output for NaN and ±Inf (default: the inputs, each block's last node
    /// and the outputs, rerun node by node when one fails); the error names the first node.
    #[arg(long, global = true)]
    check_finite: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Dot,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the attention layers (named like diffusers' attn_processors keys) and totals.
    Inspect {
        /// A diffusers pipeline folder or its unet/ folder.
        model: PathBuf,
        /// Latent size HxW (default: the config's sample_size).
        #[arg(long)]
        size: Option<String>,
        /// Batch size (2 = one prompt with classifier-free guidance).
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the whole op graph.
    Graph {
        model: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Latent size HxW (default: the config's sample_size).
        #[arg(long)]
        size: Option<String>,
        #[arg(long, default_value_t = 2)]
        batch: usize,
    },
    /// One UNet forward on the tensors of a safetensors file; writes `out`.
    Forward(ForwardArgs),
    /// Text to image: prompts → text encoder → denoising loop with CFG (and a recipe's
    /// rewrites) → VAE → PNG; Store rewrites also write their maps and heat-map PNGs.
    Run(RunArgs),
    /// DDIM inversion: a picture (or a folder of PNGs, one batch) → latents that DDIM with the
    /// same prompt turns back into it; writes `latents`, `latents_per_step`, `latents_0`.
    Invert(InvertArgs),
    /// Video jobs: clips in and out.
    Video {
        #[command(subcommand)]
        cmd: VideoCmd,
    },
    /// Time each node of one UNet forward on random inputs: per op kind (seconds, share of
    /// the forward, GFLOP/s) and the slowest nodes.
    Profile(ProfileArgs),
    /// Validate a recipe against a model.
    Check {
        recipe: PathBuf,
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        shape: ShapeArgs,
    },
    /// Per layer: which rewrites landed, which fusion fired or why it could not.
    Explain {
        recipe: PathBuf,
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        shape: ShapeArgs,
        #[arg(long)]
        no_fuse: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The graph before and after a recipe, per layer: nodes added, removed, fused.
    Diff {
        recipe: PathBuf,
        #[arg(long)]
        model: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        #[command(flatten)]
        shape: ShapeArgs,
        #[arg(long)]
        no_fuse: bool,
    },
    /// Compile a recipe ahead of time into a plan file.
    Compile {
        recipe: PathBuf,
        #[arg(long)]
        model: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        shape: ShapeArgs,
        #[arg(long)]
        no_fuse: bool,
    },
}

#[derive(Subcommand)]
enum VideoCmd {
    /// Text2Video-Zero without its re-noising: one initial latent warped per frame
    /// (`--motion X,Y`, diffusers' motion_field_strength), cross-frame attention to the first
    /// frame (rewrites/t2v_zero.ron, built in), classifier-free guidance; writes OUT.gif,
    /// OUT_000.png, … and OUT_strip.png.
    Generate(VideoGenerateArgs),
    /// FateZero: invert the frames as one batch under --source-prompt while the recipe's
    /// stores record (pass "invert"), then edit them under --prompt with guidance while its
    /// rewrites read the stored maps (pass "edit"); rewrites/fatezero.ron is built in. Writes
    /// OUT.gif, OUT_000.png, … and OUT_strip.png (input above output).
    Edit(VideoEditArgs),
}

#[derive(clap::Args)]
struct VideoEditArgs {
    /// A diffusers pipeline folder.
    model: PathBuf,
    /// The clip: a folder of PNGs (sorted by name) or an animated GIF.
    frames: PathBuf,
    /// The prompt describing the clip (the inversion's).
    #[arg(long)]
    source_prompt: String,
    /// The prompt of the edit.
    #[arg(long)]
    prompt: String,
    /// The negative prompt (default "").
    #[arg(long)]
    negative: Option<String>,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f32,
    /// A recipe with passes "invert" and "edit" instead of the built-in FateZero.
    #[arg(long, conflicts_with = "no_recipe")]
    recipe: Option<PathBuf>,
    /// Plain per-frame attention in both passes (no recipe): the baseline.
    #[arg(long)]
    no_recipe: bool,
    /// Milliseconds per frame in the GIF.
    #[arg(long, default_value_t = 125)]
    delay: u32,
    #[arg(long, default_value = "flex")]
    device: String,
    /// Hold linear and conv weights as f32 (default), f16 or bf16.
    #[arg(long, default_value = "f32")]
    weights: rewire::exec::WeightDtype,
    /// The edited clip: OUT.gif (with OUT_000.png, … and OUT_strip.png beside it).
    #[arg(short, long)]
    output: PathBuf,
}

fn gif_output(out: &Path) -> Result<()> {
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    if ext.as_deref() != Some("gif") {
        bail!(
            "-o {}: a clip is written as an animated GIF\n  hint: name the output *.gif (the frames go beside it as NAME_000.png, …)",
            out.display()
        );
    }
    Ok(())
}

fn video_edit(a: VideoEditArgs) -> Result<()> {
    gif_output(&a.output)?;
    check_run_numbers(a.guidance, 0.8, &None, 1)?;
    let frames = rewire::video::read_frames(&a.frames, 2)?;
    rewire::limits::at_most(2 * frames.len(), rewire::limits::MAX_BATCH, "MAX_BATCH").map_err(
        |e| {
            anyhow::anyhow!(
                "{}: {} frames: the edit's batch of 2 × frames: {e}",
                a.frames.display(),
                frames.len()
            )
        },
    )?;
    for p in rewire::video::clip_paths(&a.output, frames.len()) {
        rewire::weights::check_output(&p).map_err(|e| rewire::weights::write_error(&p, e))?;
    }
    let device = rewire::backend::device(&a.device)?;
    let pipe = rewire::pipeline::Pipeline::open(&a.model, &device)?;
    let src = match (&a.recipe, a.no_recipe) {
        (_, true) => None,
        (Some(r), false) => Some(Source::load(r)?),
        (None, false) => Some(Source::parse(
            rewire::video::FATEZERO,
            Path::new("rewrites/fatezero.ron"),
        )?),
    };
    let opts = rewire::video::EditOptions {
        source_prompt: a.source_prompt.clone(),
        prompt: a.prompt.clone(),
        negative: a.negative.clone(),
        steps: a.steps,
        guidance: a.guidance,
        weights: a.weights,
    };
    let bar = indicatif::ProgressBar::new(a.steps as u64).with_style(
        indicatif::ProgressStyle::with_template("{msg:>6} {bar:40} {pos}/{len} steps")
            .expect("a valid template"),
    );
    let t0 = std::time::Instant::now();
    let out = rewire::video::edit(&pipe, &opts, src.as_ref(), &frames, |pass, i, n| {
        bar.set_message(pass.to_string());
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let paths = rewire::video::write_clip(&a.output, &out.frames, Some(&frames), a.delay)?;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "wrote {} and {} more files ({} frames) in {:.1}s; stored maps: {:.1} MiB in memory, {:.1} MiB on disk; peak RSS {}",
        a.output.display(),
        paths.len() - 1,
        frames.len(),
        t0.elapsed().as_secs_f64(),
        mib(out.inversion.stored.bytes() as u64),
        mib(out.inversion.stored.spilled_bytes()),
        rewire::limits::peak_rss().map_or("unknown".into(), |b| format!("{:.1} MiB", mib(b)))
    );
    Ok(())
}

#[derive(clap::Args)]
struct VideoGenerateArgs {
    /// A diffusers pipeline folder.
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// The negative prompt (default "").
    #[arg(long)]
    negative: Option<String>,
    #[arg(long, default_value_t = 8)]
    frames: usize,
    /// Motion per frame, X,Y, in diffusers' units (pixels of a 512×512 grid: 64 on a 16×16
    /// latent is 2 latent pixels).
    #[arg(long, default_value = "12,12")]
    motion: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The initial latent `[1, C, h, w]`: the tensor `latents`, else `x_T` (instead of --seed).
    #[arg(long, conflicts_with = "seed")]
    latents: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f32,
    /// A recipe instead of the built-in cross-frame attention.
    #[arg(long, conflicts_with = "no_recipe")]
    recipe: Option<PathBuf>,
    /// Plain per-frame attention (no recipe): the baseline.
    #[arg(long)]
    no_recipe: bool,
    /// Milliseconds per frame in the GIF.
    #[arg(long, default_value_t = 125)]
    delay: u32,
    #[arg(long, default_value = "flex")]
    device: String,
    /// The clip: OUT.gif (with OUT_000.png, … and OUT_strip.png beside it).
    #[arg(short, long)]
    output: PathBuf,
}

fn video_generate(a: VideoGenerateArgs) -> Result<()> {
    gif_output(&a.output)?;
    if a.frames == 0 {
        bail!("--frames 0: a clip needs at least one frame");
    }
    rewire::limits::at_most(2 * a.frames, rewire::limits::MAX_BATCH, "MAX_BATCH")
        .map_err(|e| anyhow::anyhow!("--frames {}: the batch of 2 × frames: {e}", a.frames))?;
    let motion = a
        .motion
        .split_once(',')
        .and_then(|(x, y)| Some((x.trim().parse::<f64>().ok()?, y.trim().parse::<f64>().ok()?)))
        .filter(|(x, y)| x.is_finite() && y.is_finite() && x.abs() <= 1e6 && y.abs() <= 1e6)
        .with_context(|| format!("--motion {}: expected X,Y (numbers, e.g. 64,0)", a.motion))?;
    check_run_numbers(a.guidance, 0.8, &None, a.frames)?;
    for p in rewire::video::clip_paths(&a.output, a.frames) {
        rewire::weights::check_output(&p).map_err(|e| rewire::weights::write_error(&p, e))?;
    }
    let device = rewire::backend::device(&a.device)?;
    let pipe = rewire::pipeline::Pipeline::open(&a.model, &device)?;
    let src = match (&a.recipe, a.no_recipe) {
        (_, true) => None,
        (Some(r), false) => Some(Source::load(r)?),
        (None, false) => Some(Source::parse(
            rewire::video::T2V_ZERO,
            Path::new("rewrites/t2v_zero.ron"),
        )?),
    };
    let latent = match &a.latents {
        Some(p) => {
            let f = rewire::weights::TensorFiles::open(p)?;
            let name = ["latents", "x_T"]
                .into_iter()
                .find(|n| f.contains(n))
                .with_context(|| format!("{}: no `latents` or `x_T` tensor", p.display()))?;
            let (shape, data) = f.read_f32(name)?;
            Some(HostTensor::new(shape, data))
        }
        None => None,
    };
    let opts = rewire::video::GenerateOptions {
        prompt: a.prompt.clone(),
        negative: a.negative.clone(),
        frames: a.frames,
        motion,
        seed: a.seed,
        latent,
        steps: a.steps,
        guidance: a.guidance,
    };
    let bar = indicatif::ProgressBar::new(a.steps as u64);
    let t0 = std::time::Instant::now();
    let frames = rewire::video::generate(&pipe, &opts, src.as_ref(), |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let paths = rewire::video::write_clip(&a.output, &frames, None, a.delay)?;
    eprintln!(
        "wrote {} and {} more files ({} frames) in {:.1}s",
        a.output.display(),
        paths.len() - 1,
        a.frames,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(clap::Args)]
struct InvertArgs {
    /// A diffusers pipeline folder.
    model: PathBuf,
    /// A PNG (or any picture the `image` crate reads), or a clip inverted as one batch: a folder
    /// of PNGs (sorted by name) or an animated GIF.
    picture: PathBuf,
    /// The prompt the picture is inverted under (the source prompt of an edit).
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value = "flex")]
    device: String,
    /// Hold linear and conv weights as f32 (default), f16 or bf16.
    #[arg(long, default_value = "f32")]
    weights: rewire::exec::WeightDtype,
    /// The latents file (safetensors).
    #[arg(short, long)]
    output: PathBuf,
}

/// The pictures of `path`: one picture, or the frames of a clip (a folder of PNGs sorted by
/// name, or an animated GIF).
fn read_pictures(path: &Path) -> Result<Vec<HostTensor>> {
    let gif = path
        .extension()
        .is_some_and(|e| e.to_string_lossy().eq_ignore_ascii_case("gif"));
    if path.is_dir() || gif {
        return Ok(rewire::video::read_frames(path, 1)?);
    }
    Ok(vec![read_image(path)?])
}

fn invert(a: InvertArgs) -> Result<()> {
    let ext = a
        .output
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    if ext.as_deref() != Some("safetensors") {
        bail!(
            "-o {}: rewire invert writes a safetensors file\n  hint: name the output *.safetensors",
            a.output.display()
        );
    }
    rewire::weights::check_output(&a.output)
        .map_err(|e| rewire::weights::write_error(&a.output, e))?;
    let pictures = read_pictures(&a.picture)?;
    let device = rewire::backend::device(&a.device)?;
    let pipe = rewire::pipeline::Pipeline::open(&a.model, &device)?;
    let t0 = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(a.steps as u64);
    let opts = rewire::invert::InvertOptions {
        prompt: a.prompt.clone(),
        steps: a.steps,
        weights: a.weights,
    };
    let inv = rewire::invert::invert(&pipe, &opts, &pictures, |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let last = inv.latents();
    let mut per_step_shape = vec![inv.latents_per_step.len()];
    per_step_shape.extend(&last.shape);
    let tensors = vec![
        ("latents".to_string(), last.shape.clone(), last.data.clone()),
        (
            "latents_per_step".to_string(),
            per_step_shape,
            inv.latents_per_step
                .iter()
                .flat_map(|t| t.data.iter().copied())
                .collect(),
        ),
        (
            "latents_0".to_string(),
            inv.latents_0.shape.clone(),
            inv.latents_0.data.clone(),
        ),
    ];
    let bytes = rewire::weights::encode_f32(&a.output, &tensors)?;
    rewire::weights::write_atomic(&a.output, &bytes)
        .map_err(|e| rewire::weights::write_error(&a.output, e))?;
    eprintln!(
        "wrote {} (latents {:?}, {} steps) in {:.1}s",
        a.output.display(),
        last.shape,
        inv.latents_per_step.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(clap::Args)]
struct ProfileArgs {
    /// A pipeline folder, a unet/ folder, or a UNet config.json (run with deterministic random
    /// weights, e.g. benches/configs/sd15-unet.json).
    model: PathBuf,
    /// Profile the graph a recipe makes (its first step segment).
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// Latent size HxW (default: the config's sample_size).
    #[arg(long)]
    size: Option<String>,
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Timed forwards to average (after one untimed warm-up).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    #[arg(long, default_value = "flex")]
    device: String,
    /// How linear and conv weights are held: f32, f16, bf16.
    #[arg(long, default_value = "f32")]
    weights: rewire::exec::WeightDtype,
    /// The attention kernel: fused (rewire's own on the CPU, Burn's elsewhere), burn, naive.
    #[arg(long, value_enum, default_value = "fused")]
    attention: AttentionArg,
    /// How many of the slowest nodes to list.
    #[arg(long, default_value_t = 15)]
    top: usize,
    /// Print JSON (totals, per op kind, every node) instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum AttentionArg {
    Fused,
    Burn,
    Naive,
}

fn profile(a: ProfileArgs) -> Result<()> {
    use rewire::exec::AttentionImpl;
    let device = rewire::backend::device(&a.device)?;
    let size = a.size.as_deref().map(parse_size).transpose()?;
    let recipe = a.recipe.as_deref().map(Source::load).transpose()?;
    let opts = rewire::profile::ProfileOptions {
        size,
        batch: a.batch,
        runs: a.runs,
        lower: LowerOptions {
            attention: match a.attention {
                AttentionArg::Fused => AttentionImpl::Fused,
                AttentionArg::Burn => AttentionImpl::Burn,
                AttentionArg::Naive => AttentionImpl::Naive,
            },
            weights: a.weights,
        },
    };
    eprintln!("profiling {} ...", a.model.display());
    let p = rewire::profile::profile_model(&a.model, recipe.as_ref(), &opts, &device)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p.to_json())?);
    } else {
        print!("{}", p.table(a.top));
    }
    Ok(())
}

/// The input spec a recipe is compiled for.
#[derive(clap::Args, Clone)]
struct ShapeArgs {
    /// Latent size HxW (default: the config's sample_size).
    #[arg(long)]
    size: Option<String>,
    /// Batch size (default 2 = one prompt with classifier-free guidance; with --prompt, twice
    /// the prompts).
    #[arg(long)]
    batch: Option<usize>,
    /// The prompts of the run this is for (repeatable, as for `run`): they size the batch
    /// (twice their number, with guidance) and the recipe's words bind to the last one (needs
    /// the pipeline's tokenizer/).
    #[arg(long)]
    prompt: Vec<String>,
    /// Text length (keys of cross-attention).
    #[arg(long, default_value_t = 77)]
    text_len: usize,
    /// Number of denoising steps (needed when a rewrite has a step range).
    #[arg(long)]
    steps: Option<usize>,
    /// Frames per group, for ReplaceKv(source: Frames(...)).
    #[arg(long)]
    frames: Option<usize>,
    /// For a recipe whose rewrites name passes (`pass: "invert"`): the pass to compile
    /// (default: the last the recipe names).
    #[arg(long)]
    pass: Option<String>,
}

fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (h, w) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("--size {s}: expected HxW, e.g. 64x64"))?;
    let h: usize = h
        .trim()
        .parse()
        .with_context(|| format!("--size {s}: bad height"))?;
    let w: usize = w
        .trim()
        .parse()
        .with_context(|| format!("--size {s}: bad width"))?;
    if h == 0 || w == 0 {
        bail!("--size {s}: sizes must be positive");
    }
    Ok((h, w))
}

fn default_size(unet: &UNet) -> (usize, usize) {
    match &unet.config.sample_size {
        Some(serde_json::Value::Number(n)) => {
            let n = n.as_u64().unwrap_or(64) as usize;
            (n, n)
        }
        Some(serde_json::Value::Array(a)) if a.len() == 2 => (
            a[0].as_u64().unwrap_or(64) as usize,
            a[1].as_u64().unwrap_or(64) as usize,
        ),
        _ => (64, 64),
    }
}

fn spec_for(unet: &UNet, size: &Option<String>, batch: usize) -> Result<InputSpec> {
    let (h, w) = match size {
        Some(s) => parse_size(s)?,
        None => default_size(unet),
    };
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let spec = InputSpec::new(batch, h, w);
    spec.check()
        .map_err(|e| anyhow::anyhow!("--batch {batch} --size {h}x{w}: {e}"))?;
    Ok(spec)
}

fn open_graph(model: &Path, size: &Option<String>, batch: usize) -> Result<(UNet, Graph)> {
    let unet = UNet::open(model)?;
    let spec = spec_for(&unet, size, batch)?;
    let graph = unet.graph(spec)?;
    Ok((unet, graph))
}

fn inspect(model: &Path, size: &Option<String>, batch: usize, as_json: bool) -> Result<()> {
    let (unet, graph) = open_graph(model, size, batch)?;
    let layers = graph.attention_layers();
    let (ops, params, flops) = graph.totals();
    if as_json {
        let attention: Vec<_> = layers
            .iter()
            .map(|(_, path, a)| {
                json!({
                    "path": path, "kind": a.kind, "place": a.place, "heads": a.heads,
                    "head_dim": a.head_dim, "queries": a.queries, "keys": a.keys,
                    "grid": [a.grid.0, a.grid.1], "downsample": a.downsample,
                })
            })
            .collect();
        let v = json!({
            "model": unet.dir, "spec": graph.spec, "attention": attention,
            "totals": {"ops": ops, "parameters": params, "flops": flops, "attention_layers": layers.len()},
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s = graph.spec;
    println!(
        "{} — batch {}, latent {}×{}, text {}",
        unet.dir.display(),
        s.batch,
        s.height,
        s.width,
        s.text_len
    );
    println!(
        "{:<58} {:<5} {:<4} {:>5} {:>14}",
        "attention layer", "kind", "place", "heads", "queries×keys"
    );
    for (_, path, a) in &layers {
        println!(
            "{:<58} {:<5} {:<4} {:>5} {:>14}",
            path,
            a.kind.to_string(),
            a.place.to_string(),
            a.heads,
            format!("{}×{}", a.queries, a.keys)
        );
    }
    println!(
        "{} attention layers, {ops} ops, {params} parameters ({:.1} M), {:.3} GFLOP per forward",
        layers.len(),
        params as f64 / 1e6,
        flops as f64 / 1e9
    );
    Ok(())
}

#[derive(clap::Args)]
struct ForwardArgs {
    model: PathBuf,
    /// Safetensors with `sample`, `timestep`, `encoder_hidden_states` (+ `text_embeds`, `time_ids` for SDXL).
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write the output (tensor `out`).
    #[arg(long)]
    out: PathBuf,
    /// Backend: flex (CPU), wgpu, cuda.
    #[arg(long, default_value = "flex")]
    device: String,
    /// Apply a recipe (compiled for the inputs' shapes).
    #[arg(long, conflicts_with = "plan")]
    recipe: Option<PathBuf>,
    /// Run a plan made by `rewire compile`.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Where Store rewrites write `probs.<layer>` (default: OUT with .store.safetensors).
    #[arg(long)]
    store_out: Option<PathBuf>,
    /// The denoising step this forward is (for recipes with step ranges).
    #[arg(long, requires = "steps")]
    step: Option<usize>,
    /// The number of denoising steps of the run.
    #[arg(long)]
    steps: Option<usize>,
    /// Hold linear and conv weights as f32 (default), f16 or bf16; computation stays f32
    /// (f16 halves the weight memory and is exact for an f16 checkpoint).
    #[arg(long, default_value = "f32")]
    weights: rewire::exec::WeightDtype,
    /// Do not fuse rewrites: every rewrite runs on materialised probabilities.
    #[arg(long)]
    no_fuse: bool,
    /// Frames per group for ReplaceKv(source: Frames(...)): the batch is [uncond f0..fN-1, cond f0..fN-1].
    #[arg(long)]
    frames: Option<usize>,
    /// Inputs of the reference pass (its `sample`, or `reference_sample`); defaults to the
    /// inputs file's `reference_sample`. The pass is named "reference".
    #[arg(long)]
    reference: Option<PathBuf>,
}

/// The reference pass's inputs: `--reference FILE` (its `sample`, else `reference_sample`), or
/// the inputs file's `reference_sample`; timestep and encoder states from the main inputs
/// unless the reference file has its own.
fn reference_inputs(
    a: &ForwardArgs,
    main: &std::collections::HashMap<String, HostTensor>,
) -> Result<Option<std::collections::HashMap<String, HostTensor>>> {
    let (file, path) = match &a.reference {
        Some(p) => (rewire::weights::TensorFiles::open(p)?, p.clone()),
        None => {
            let f = rewire::weights::TensorFiles::open(&a.inputs)?;
            if !f.contains("reference_sample") {
                return Ok(None);
            }
            (f, a.inputs.clone())
        }
    };
    let name = if a.reference.is_some() && file.contains("sample") {
        "sample"
    } else {
        "reference_sample"
    };
    let (shape, data) = file.read_f32(name).with_context(|| {
        format!(
            "{}: no `sample` or `reference_sample` tensor",
            path.display()
        )
    })?;
    let mut m = main.clone();
    m.retain(|k, _| rewire::io::INPUT_NAMES.contains(&k.as_str()));
    m.insert("sample".into(), HostTensor::new(shape, data));
    for k in [
        "timestep",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
    ] {
        if a.reference.is_some() && file.contains(k) {
            let (s, d) = file.read_f32(k)?;
            m.insert(k.into(), HostTensor::new(s, d));
        }
    }
    Ok(Some(m))
}

fn forward(a: ForwardArgs) -> Result<()> {
    let device = rewire::backend::device(&a.device)?;
    let lower = LowerOptions {
        weights: a.weights,
        ..Default::default()
    };
    let unet = UNet::open(&a.model)?;
    // A plan is checked against the model before anything else is read.
    let plan_file = match &a.plan {
        Some(p) => Some(PlanFile::load(p, &unet.fingerprint())?),
        None => None,
    };
    let mut given = rewire::io::read_forward_inputs(&a.inputs)?;
    let base = unet.graph(given.spec)?;
    let reference = reference_inputs(&a, &given.tensors)?;
    let compiled = if let Some(r) = &a.recipe {
        let src = Source::load(r)?;
        let opts = CompileOptions {
            fuse: !a.no_fuse,
            steps: a.steps,
            words: None,
            require_bound_words: true,
            frames: a.frames,
            references: Some(if reference.is_some() {
                vec!["reference".into()]
            } else {
                vec![]
            }),
            pass: None,
            passes: Vec::new(),
        };
        Some(compile::compile_graph(&src, &base, &opts)?)
    } else if let (Some(p), Some(plan)) = (&a.plan, &plan_file) {
        plan.check_run(p, given.spec, a.steps, None)?;
        Some(plan.compiled(p, &base)?)
    } else {
        None
    };
    if let (Some(c), Some(d)) = (&compiled, compiled.as_ref().and_then(|c| c.cache.as_ref()))
        && let Some(i) = a.step
        && !d.full(i)
    {
        bail!(
            "recipe \"{}\": step {i} is a cached step (Cache, rewrite {}: a full step every {} steps); a single forward has no cached features\n  hint: run the job (`rewire run --recipe ...`), or forward a full step (--step {})",
            c.recipe,
            d.rewrite,
            d.interval,
            i - i % d.interval
        );
    }
    let graph = match &compiled {
        None => base.clone(),
        Some(c) => {
            let ranged = c.segments.iter().any(|s| s.steps.is_some());
            let seg = match (ranged, a.step) {
                (false, _) => c
                    .segments
                    .first()
                    .context("the compiled recipe has no graph")?,
                (true, None) => bail!(
                    "recipe \"{}\" has step ranges: say which step this forward is (--step I --steps N)",
                    c.recipe
                ),
                (true, Some(i)) => c.segment_for(i).with_context(|| {
                    format!("--step {i} is outside the run of {:?} steps", c.steps)
                })?,
            };
            seg.graph.clone()
        }
    };
    let t0 = std::time::Instant::now();
    if let Some(c) = &compiled
        && !c.records.is_empty()
    {
        let Some(reference) = &reference else {
            bail!(
                "the plan reads a reference pass: give --reference FILE or `reference_sample` in the inputs"
            );
        };
        // The reference pass records only the layers a rewrite reads.
        let recorder = c.recorder("reference")?;
        let rp = Plan::lower(&recorder, &unet.weights, &device, lower)?;
        let recorded = rp.run_host(reference)?;
        for (k, v) in recorded {
            if matches!(Key::parse(&k), Key::Reference { .. }) {
                given.tensors.insert(k, v);
            }
        }
    }
    let plan = Plan::lower(&graph, &unet.weights, &device, lower)?;
    let result = plan.run_host(&given.tensors)?;
    let y = result.get("out").context("the graph has no `out` output")?;
    // `out` and the stores are written together or not at all.
    let mut staged = rewire::weights::Staged::new();
    let out_bytes =
        rewire::weights::encode_f32(&a.out, &[("out".into(), y.shape.clone(), y.data.clone())])?;
    staged
        .stage(&a.out, &out_bytes)
        .map_err(|e| rewire::weights::write_error(&a.out, e))?;
    let mut stored: Vec<(String, Vec<usize>, Vec<f32>)> = result
        .iter()
        .filter(|(k, _)| Key::parse(k).store_parts().is_some())
        .map(|(k, v)| (k.clone(), v.shape.clone(), v.data.clone()))
        .collect();
    if !stored.is_empty() {
        stored.sort_by(|x, y| x.0.cmp(&y.0));
        let path = a
            .store_out
            .clone()
            .unwrap_or_else(|| a.out.with_extension("store.safetensors"));
        let bytes = rewire::weights::encode_f32(&path, &stored)?;
        staged
            .stage(&path, &bytes)
            .map_err(|e| rewire::weights::write_error(&path, e))?;
        staged
            .commit()
            .map_err(|e| rewire::weights::write_error(&path, e))?;
        eprintln!(
            "wrote {} ({:?}) in {:.3}s",
            a.out.display(),
            y.shape,
            t0.elapsed().as_secs_f64()
        );
        eprintln!("wrote {} stored maps to {}", stored.len(), path.display());
    } else if let Some(p) = &a.store_out {
        bail!(
            "--store-out {}: the recipe stores nothing (it has no Store rewrite)",
            p.display()
        );
    } else {
        staged
            .commit()
            .map_err(|e| rewire::weights::write_error(&a.out, e))?;
        eprintln!(
            "wrote {} ({:?}) in {:.3}s",
            a.out.display(),
            y.shape,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[derive(clap::Args)]
struct RunArgs {
    /// A diffusers pipeline folder (unet/, text_encoder/, tokenizer/, vae/, scheduler/).
    model: PathBuf,
    /// A prompt; repeat for several (they run as one batch).
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// The negative prompt (default: none; an SDXL pipeline with force_zeros_for_empty_prompt
    /// then uses zero embeddings, others encode "").
    #[arg(long)]
    negative: Option<String>,
    /// SDXL: the prompt for the second text encoder (default: --prompt); once for every
    /// prompt, or once per --prompt.
    #[arg(long = "prompt-2")]
    prompt_2: Vec<String>,
    /// SDXL: the negative prompt for the second text encoder (default: --negative).
    #[arg(long = "negative-2")]
    negative_2: Option<String>,
    /// SDXL size conditioning: the original image size WxH (default: the output size).
    #[arg(long = "original-size")]
    original_size: Option<String>,
    /// SDXL size conditioning: the crop's top-left corner TOP,LEFT in pixels (default: 0,0).
    #[arg(long = "crop-top-left")]
    crop_top_left: Option<String>,
    /// SDXL size conditioning: the target size WxH (default: the output size).
    #[arg(long = "target-size")]
    target_size: Option<String>,
    /// Apply a recipe (compiled for this run's shapes, steps and last prompt).
    #[arg(long, conflicts_with = "plan")]
    recipe: Option<PathBuf>,
    /// Run a plan made by `rewire compile` for this run's shapes and steps.
    #[arg(long)]
    plan: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f32,
    /// ddim, pndm, euler or dpmpp2m (default: the pipeline's scheduler).
    #[arg(long)]
    scheduler: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Initial latents: the tensor `latents`, else `latents_in`, else the file's only tensor.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Image size WxH (default: the init image's size, else the UNet's sample_size × the VAE
    /// factor).
    #[arg(long)]
    size: Option<String>,
    /// Image to image: start from this picture (PNG, JPEG, ...), encoded by the VAE and noised
    /// to the first step that runs.
    #[arg(long)]
    image: Option<PathBuf>,
    /// With --image: the share of the schedule to run, in (0, 1]; low values stay close to the
    /// picture.
    #[arg(long, default_value_t = 0.8, requires = "image")]
    strength: f32,
    #[arg(long, default_value = "flex")]
    device: String,
    /// Hold linear and conv weights as f32 (default), f16 or bf16; computation stays f32
    /// (f16 halves the weight memory and is exact for an f16 checkpoint).
    #[arg(long, default_value = "f32")]
    weights: rewire::exec::WeightDtype,
    #[arg(long)]
    no_fuse: bool,
    /// Recompute the run constants (the text states' K/V projections) at every step instead
    /// of once per job (hoisting is lossless; this is for checking that).
    #[arg(long)]
    no_hoist: bool,
    /// The image (several prompts: NAME_0.png, NAME_1.png, ...).
    #[arg(short, long)]
    output: PathBuf,
}

/// A picture as `[H, W, 3]` in [0, 1].
fn read_image(path: &Path) -> Result<HostTensor> {
    let img = image::open(path)
        .with_context(|| format!("--image {}: cannot read the picture", path.display()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let data = img.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Ok(HostTensor::new(vec![h as usize, w as usize, 3], data))
}

fn read_latents(path: &Path) -> Result<HostTensor> {
    let f = rewire::weights::TensorFiles::open(path)?;
    let names: Vec<&str> = f.names().collect();
    let name = ["latents", "latents_in"]
        .into_iter()
        .find(|n| f.contains(n))
        .or(if names.len() == 1 {
            Some(names[0])
        } else {
            None
        })
        .with_context(|| {
            format!(
                "{}: no `latents` or `latents_in` tensor, and more than one tensor ({})",
                path.display(),
                names.join(", ")
            )
        })?
        .to_string();
    let (shape, data) = f.read_f32(&name)?;
    Ok(HostTensor::new(shape, data))
}

/// A `WxH` argument as (width, height).
fn parse_wxh(flag: &str, s: &str) -> Result<(usize, usize)> {
    parse_pair(flag, s, 'x', "WxH, e.g. 512x512")
}

/// Two whole numbers separated by `sep` (`x` also accepts `X`).
fn parse_pair(flag: &str, s: &str, sep: char, expected: &str) -> Result<(usize, usize)> {
    let (a, b) = s
        .split_once(|c: char| c == sep || (sep == 'x' && c == 'X'))
        .with_context(|| format!("{flag} {s}: expected {expected}"))?;
    let num = |v: &str| {
        v.trim().parse::<usize>().with_context(|| {
            format!("{flag} {s}: {v:?} is not a whole number (expected {expected})")
        })
    };
    Ok((num(a)?, num(b)?))
}

fn sibling(out: &Path, suffix: &str, ext: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    out.with_file_name(format!("{stem}{suffix}.{ext}"))
}

fn run_job(a: RunArgs) -> Result<()> {
    use rewire::pipeline::{Pipeline, RunOptions};
    let device = rewire::backend::device(&a.device)?;
    if let Some(dir) = a.output.parent()
        && !dir.as_os_str().is_empty()
        && !dir.is_dir()
    {
        bail!(
            "cannot write {}: {} is not a folder",
            a.output.display(),
            dir.display()
        );
    }
    check_run_outputs(&a.output, a.prompt.len())?;
    check_run_numbers(a.guidance, a.strength, &a.size, a.prompt.len())?;
    let pipe = Pipeline::open(&a.model, &device)?;
    let size = a
        .size
        .as_deref()
        .map(|s| parse_wxh("--size", s))
        .transpose()?;
    let opts = RunOptions {
        prompts: a.prompt.clone(),
        negative: a.negative.clone(),
        sdxl: rewire::pipeline::SdxlOptions {
            prompts_2: a.prompt_2.clone(),
            negative_2: a.negative_2.clone(),
            original_size: a
                .original_size
                .as_deref()
                .map(|s| parse_wxh("--original-size", s))
                .transpose()?,
            crop_top_left: match a.crop_top_left.as_deref() {
                Some(s) => parse_pair("--crop-top-left", s, ',', "TOP,LEFT, e.g. 0,0")?,
                None => (0, 0),
            },
            target_size: a
                .target_size
                .as_deref()
                .map(|s| parse_wxh("--target-size", s))
                .transpose()?,
        },
        steps: a.steps,
        guidance: a.guidance,
        no_hoist: a.no_hoist,
        frames: None,
        pass: None,
        passes: Vec::new(),
        scheduler: a.scheduler.clone(),
        seed: a.seed,
        latents: a.latents.as_deref().map(read_latents).transpose()?,
        size,
        fuse: !a.no_fuse,
        weights: a.weights,
        init_image: a.image.as_deref().map(read_image).transpose()?,
        strength: a.strength,
        // The CLI writes images: the latents stay on the device until the VAE.
        keep_latents_per_step: false,
    };
    for w in pipe.truncations(&opts) {
        eprintln!("warning: {w}");
    }
    let bar = indicatif::ProgressBar::new(a.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} denoising [{bar:30}] {pos}/{len} steps {elapsed_precise}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let compiled = match (&a.recipe, &a.plan) {
        (Some(r), _) => Some(pipe.compile(&opts, &Source::load(r)?)?),
        (None, Some(p)) => {
            let plan = PlanFile::load(p, &pipe.unet.fingerprint())?;
            let spec = pipe.unet_spec(&opts)?;
            // Steps here are UNet calls: PNDM makes one more, image to image fewer.
            let calls = pipe.schedule(&opts)?.1.len();
            plan.check_run(
                p,
                spec,
                Some(calls),
                opts.prompts.last().map(|s| s.as_str()),
            )?;
            Some(plan.compiled(p, &pipe.unet.graph(spec)?)?)
        }
        (None, None) => None,
    };
    let out = pipe.run_compiled(&opts, compiled.as_ref(), |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64)
    })?;
    bar.finish_and_clear();
    // Every output is staged under a temporary name and renamed into place only when all of
    // them are written: a run leaves all its files or none.
    let mut staged = rewire::weights::Staged::new();
    let stage = |staged: &mut rewire::weights::Staged, path: &Path, bytes: &[u8]| {
        staged
            .stage(path, bytes)
            .map_err(|e| rewire::weights::write_error(path, e))
    };
    let several = out.images.len() > 1;
    let mut rgb = Vec::new();
    for (i, img) in out.images.iter().enumerate() {
        let path = if several {
            sibling(&a.output, &format!("_{i}"), "png")
        } else {
            a.output.clone()
        };
        let im = rewire::picture::to_rgb(img)?;
        stage(&mut staged, &path, &rewire::picture::png_bytes(&im, &path)?)?;
        rgb.push(im);
    }
    let mut stored = 0;
    if !out.stores.is_empty() {
        let path = sibling(&a.output, ".store", "safetensors");
        let t: Vec<(String, Vec<usize>, Vec<f32>)> = out
            .stores
            .iter()
            .map(|(k, v)| (k.clone(), v.shape.clone(), v.data.clone()))
            .collect();
        stage(&mut staged, &path, &rewire::weights::encode_f32(&path, &t)?)?;
        stored = t.len();
        for (i, im) in rgb.iter().enumerate() {
            let key = out.stores.keys().find(
                |k| matches!(Key::parse(k), Key::AggregateCross { prompt, .. } if prompt == i),
            );
            if let Some(key) = key {
                let tiles = rewire::picture::heat_maps(&out.stores[key], &out.tokens[i], im, 128)?;
                let path = sibling(
                    &a.output,
                    &if several {
                        format!("_{i}_heat")
                    } else {
                        "_heat".into()
                    },
                    "png",
                );
                stage(
                    &mut staged,
                    &path,
                    &rewire::picture::png_bytes(&tiles, &path)?,
                )?;
            }
        }
    }
    let paths: Vec<PathBuf> = staged.paths().map(Path::to_path_buf).collect();
    staged
        .commit()
        .map_err(|e| rewire::weights::write_error(&a.output, e))?;
    for p in paths {
        if p.extension().is_some_and(|e| e == "safetensors") {
            eprintln!("wrote {stored} stored maps to {}", p.display());
        } else {
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(())
}

/// `-o` of a run: a `.png` name that is a new path or a regular file (the other outputs are its
/// siblings, checked when staged).
fn check_run_outputs(output: &Path, prompts: usize) -> Result<()> {
    let ext = output
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    if ext.as_deref() != Some("png") {
        bail!(
            "-o {}: rewire run writes PNG pictures (extension {:?})\n  hint: name the output *.png{}",
            output.display(),
            ext.unwrap_or_default(),
            if prompts > 1 {
                " (several prompts write NAME_0.png, NAME_1.png, ...)"
            } else {
                ""
            }
        );
    }
    rewire::weights::check_output(output).map_err(|e| rewire::weights::write_error(output, e))?;
    Ok(())
}

/// The numbers of a run checked before anything is loaded: guidance and strength finite, the
/// batch and the image size within [`rewire::limits`].
fn check_run_numbers(
    guidance: f32,
    strength: f32,
    size: &Option<String>,
    prompts: usize,
) -> Result<()> {
    use rewire::limits::{MAX_BATCH, MAX_LATENT_AREA, MAX_LATENT_SIDE, at_most};
    if !guidance.is_finite() {
        bail!("--guidance {guidance} is not a finite number\n  hint: SD uses about 7.5");
    }
    if !strength.is_finite() {
        bail!("--strength {strength} is not a finite number\n  hint: use a value in (0, 1]");
    }
    if guidance.abs() > 1000.0 {
        eprintln!("warning: --guidance {guidance} is far outside the usual 1 to 20");
    }
    at_most(prompts.saturating_mul(2), MAX_BATCH, "MAX_BATCH").map_err(|e| {
        anyhow::anyhow!(
            "{prompts} prompts make a batch of {}: {e}\n  hint: run fewer prompts at once",
            prompts.saturating_mul(2)
        )
    })?;
    if let Some(s) = size
        && let Some((w, h)) = s.split_once(['x', 'X'])
        && let (Ok(w), Ok(h)) = (w.trim().parse::<usize>(), h.trim().parse::<usize>())
    {
        // The latent is the image / 8 for every SD VAE.
        let side = MAX_LATENT_SIDE * 8;
        let area = (w / 8).saturating_mul(h / 8);
        if w > side || h > side {
            bail!(
                "--size {s}: a side is above {side} pixels (src/limits.rs: MAX_LATENT_SIDE × 8)\n  hint: SD 1.x makes 512x512, SDXL 1024x1024"
            );
        }
        at_most(area, MAX_LATENT_AREA, "MAX_LATENT_AREA").map_err(|e| {
            anyhow::anyhow!(
                "--size {s}: the latent has {area} positions: {e}\n  hint: SD 1.x makes 512x512, SDXL 1024x1024"
            )
        })?;
    }
    Ok(())
}

/// The batch a recipe is compiled for: `--batch`, else twice the prompts (CFG), else 2.
fn shape_batch(shape: &ShapeArgs) -> Result<usize> {
    let p = shape.prompt.len();
    match (shape.batch, p) {
        (Some(b), 0) => Ok(b),
        (None, 0) => Ok(2),
        (None, p) => Ok(2 * p),
        (Some(b), p) if b == 2 * p => Ok(b),
        (Some(b), p) => bail!(
            "--batch {b} and {p} --prompt{} disagree\n  hint: with guidance a run's batch is twice its prompts ({}); give one of them",
            if p == 1 { "" } else { "s" },
            2 * p
        ),
    }
}

/// The recipe's words bound to the last `--prompt` (with the pipeline's tokenizer).
fn shape_words(
    model: &Path,
    shape: &ShapeArgs,
) -> Result<Option<std::collections::HashMap<String, Vec<usize>>>> {
    let Some(last) = shape.prompt.last() else {
        return Ok(None);
    };
    let dir = model.join("tokenizer");
    let tok = rewire::clip::tokenizer::Tokenizer::open(&dir).with_context(|| {
        format!(
            "--prompt binds words with the pipeline's tokenizer, and {} has none",
            model.display()
        )
    })?;
    Ok(Some(tok.word_positions(last)))
}

fn compile_for(
    recipe: &Path,
    model: &Path,
    shape: &ShapeArgs,
    fuse: bool,
    require_bound_words: bool,
) -> Result<(UNet, Source, compile::Compiled)> {
    let words = shape_words(model, shape)?;
    let unet = UNet::open(model)?;
    let mut spec = spec_for(&unet, &shape.size, shape_batch(shape)?)?;
    spec.text_len = shape.text_len;
    let src = Source::load(recipe)?;
    let opts = CompileOptions {
        fuse,
        steps: shape.steps,
        require_bound_words,
        words,
        frames: shape.frames,
        references: None,
        pass: shape.pass.clone(),
        passes: Vec::new(),
    };
    let c = compile::compile(&src, &unet, spec, &opts)?;
    Ok((unet, src, c))
}

fn explain(c: &compile::Compiled) {
    let total = c.base.attention_layers().len();
    println!("recipe \"{}\"", c.recipe);
    for seg in &c.segments {
        let steps = match seg.steps {
            None => "all steps".to_string(),
            Some((a, b)) => format!("steps {a}..{b}"),
        };
        println!(
            "\n== {steps}: {} of {total} attention layers rewritten",
            seg.layers.len()
        );
        for l in &seg.layers {
            let landed: Vec<String> = l
                .rewrites
                .iter()
                .zip(&l.ops)
                .map(|(i, op)| format!("{op} (rewrite {i})"))
                .collect();
            println!("{}\n  landed: {}", l.path, landed.join(" → "));
            for n in &l.notes {
                println!("  {n}");
            }
            println!("  {}", l.fusion);
            if !l.materialised.is_empty() {
                println!(
                    "  probabilities materialised for batch items {:?}",
                    l.materialised
                );
            }
        }
    }
    if !c.unbound_words.is_empty() {
        println!(
            "\nrewrites {:?} reweight words: they bind to token positions when a prompt is given",
            c.unbound_words
        );
    }
    if let Some(d) = &c.cache {
        let full: Vec<String> = match c.steps {
            Some(n) => (0..n)
                .filter(|&i| d.full(i))
                .map(|i| i.to_string())
                .collect(),
            None => vec![format!("0, {}, {}, …", d.interval, 2 * d.interval)],
        };
        println!(
            "\ncache (rewrite {}): DeepCache, branch {}, a full step every {} steps (steps {})",
            d.rewrite,
            d.branch,
            d.interval,
            full.join(", ")
        );
        println!(
            "  full steps record the features entering {} (the output of {}, {:?})",
            d.resume, d.feature, d.shape
        );
        for seg in &c.segments {
            if let Some(g) = &seg.cached {
                let (fnodes, _, fflops) = seg.graph.totals();
                let (cnodes, _, cflops) = g.totals();
                println!(
                    "  cached steps{} run {cnodes} of {fnodes} nodes, {:.2} of {:.2} GFLOP ({:.0}%)",
                    match seg.steps {
                        None => String::new(),
                        Some((a, b)) => format!(" in {a}..{b}"),
                    },
                    cflops as f64 / 1e9,
                    fflops as f64 / 1e9,
                    100.0 * cflops as f64 / fflops.max(1) as f64
                );
            }
        }
    }
    // Hoisting: what each graph of the run computes once per job instead of at every step.
    let graphs = run_graphs(c);
    for (when, g) in graphs {
        match compile::hoist::split(g) {
            Ok(Some(h)) => {
                println!(
                    "\nhoisted ({when}): {} nodes computed once per job instead of at every step ({:.1} MFLOP per step), {} values held ({}):",
                    h.nodes,
                    h.flops as f64 / 1e6,
                    h.values.len(),
                    bytes(h.bytes())
                );
                for v in &h.values {
                    println!("  {} [{}] {:?}", v.path, v.op, v.shape);
                }
            }
            Ok(None) => println!(
                "\nhoisted ({when}): nothing (no value depends only on the run's constants)"
            ),
            Err(e) => println!("\nhoisted ({when}): not computed ({e})"),
        }
    }
    let slots = compile::state::slots(c);
    if !slots.is_empty() {
        println!("\nstate kept across steps and passes:");
        let mut total = 0;
        for s in &slots {
            total += s.bytes;
            if let compile::state::SlotKind::Read { store, steps } = &s.kind {
                let at: Vec<String> = steps
                    .iter()
                    .map(|r| match r {
                        Some((a, b)) => format!("{a}..{b}"),
                        None => "every step".into(),
                    })
                    .collect();
                println!(
                    "  {} {:?}: reads store \"{store}\" at steps {} ({} per step); {}",
                    s.name,
                    s.shape,
                    at.join(", "),
                    bytes(s.bytes_per_step),
                    s.freed()
                );
                continue;
            }
            let writes = match s.writes {
                Some(0) => "recorded once, before the first step".to_string(),
                Some(w) => format!(
                    "written at {w} steps ({} per step)",
                    bytes(s.bytes_per_step)
                ),
                None => "written at each step it is active in".to_string(),
            };
            println!(
                "  {} {:?}: {}; {writes}; {}",
                s.name,
                s.shape,
                bytes(s.bytes),
                s.freed()
            );
        }
        // Per store: what a step and a frame (batch item) cost, and the whole.
        let mut per: std::collections::BTreeMap<String, (usize, usize, usize)> = Default::default();
        for s in &slots {
            if let Some((name, rows)) = s.store() {
                let e = per.entry(name).or_default();
                e.0 += s.bytes_per_step;
                e.1 += s.bytes_per_step / rows.max(1);
                e.2 += s.bytes;
            }
        }
        for (name, (step, frame, all)) in per {
            println!(
                "  store \"{name}\": {} per step ({} per frame and step), {} in all",
                bytes(step),
                bytes(frame),
                bytes(all)
            );
        }
        println!("  total held: {}", bytes(total));
    }
}

/// The graphs a run of `c` lowers, each with when it runs.
fn run_graphs(c: &compile::Compiled) -> Vec<(String, &Graph)> {
    let mut graphs: Vec<(String, &Graph)> = Vec::new();
    for seg in &c.segments {
        let when = match seg.steps {
            None => "all steps".to_string(),
            Some((a, b)) => format!("steps {a}..{b}"),
        };
        match &seg.cached {
            None => graphs.push((when, &seg.graph)),
            Some(g) => {
                graphs.push((format!("{when}, full steps"), &seg.graph));
                graphs.push((format!("{when}, cached steps"), g));
            }
        }
    }
    graphs
}

/// `explain` for programs: the same facts as the text, typed.
fn explain_json(c: &compile::Compiled) -> serde_json::Value {
    let segments: Vec<serde_json::Value> = c
        .segments
        .iter()
        .map(|s| {
            let cached = s.cached.as_ref().map(|g| {
                let (fnodes, _, fflops) = s.graph.totals();
                let (cnodes, _, cflops) = g.totals();
                json!({"nodes": cnodes, "flops": cflops, "full_nodes": fnodes, "full_flops": fflops})
            });
            let layers: Vec<serde_json::Value> = s
                .layers
                .iter()
                .map(|l| {
                    let mut v = serde_json::to_value(l).unwrap_or_default();
                    v["fusion_text"] = l.fusion.to_string().into();
                    v
                })
                .collect();
            json!({"steps": s.steps, "layers": layers, "cached_steps": cached})
        })
        .collect();
    let hoisted: Vec<serde_json::Value> = run_graphs(c)
        .into_iter()
        .map(|(when, g)| match compile::hoist::split(g) {
            Ok(Some(h)) => json!({
                "graph": when,
                "nodes": h.nodes,
                "flops_per_step": h.flops,
                "bytes": h.bytes(),
                "values": h.values,
            }),
            Ok(None) => json!({"graph": when, "nodes": 0, "values": []}),
            Err(e) => json!({"graph": when, "error": e.to_string()}),
        })
        .collect();
    let full_steps: Option<Vec<usize>> = match (&c.cache, c.steps) {
        (Some(d), Some(n)) => Some((0..n).filter(|&i| d.full(i)).collect()),
        _ => None,
    };
    json!({
        "recipe": c.recipe,
        "spec": c.spec,
        "steps": c.steps,
        "segments": segments,
        "unbound_words": c.unbound_words,
        "cache": c.cache,
        "cache_full_steps": full_steps,
        "hoisted": hoisted,
        "state": compile::state::slots(c),
    })
}

fn bytes(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

fn main() {
    let cli = Cli::parse();
    if cli.check_finite {
        rewire::exec::set_default_finite_check(rewire::exec::FiniteCheck::EveryNode);
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect {
            model,
            size,
            batch,
            json,
        } => inspect(&model, &size, batch, json),
        Cmd::Profile(a) => profile(a),
        Cmd::Invert(a) => invert(a),
        Cmd::Video { cmd } => match cmd {
            VideoCmd::Generate(a) => video_generate(a),
            VideoCmd::Edit(a) => video_edit(a),
        },
        Cmd::Graph {
            model,
            format,
            size,
            batch,
        } => {
            let (_, graph) = open_graph(&model, &size, batch)?;
            match format {
                Format::Text => print!("{}", dump::text(&graph)),
                Format::Dot => print!("{}", dump::dot(&graph)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&dump::json(&graph))?),
            }
            Ok(())
        }
        Cmd::Forward(a) => forward(a),
        Cmd::Run(a) => run_job(a),
        Cmd::Check {
            recipe,
            model,
            shape,
        } => {
            let (_, src, c) = compile_for(&recipe, &model, &shape, true, false)?;
            let layers: std::collections::BTreeSet<&str> = c
                .segments
                .iter()
                .flat_map(|s| s.layers.iter().map(|l| l.path.as_str()))
                .collect();
            println!(
                "{}: ok — {} rewrites on {} attention layers, {} step segment{}",
                recipe.display(),
                src.recipe.rewrites.len(),
                layers.len(),
                c.segments.len(),
                if c.segments.len() == 1 { "" } else { "s" }
            );
            Ok(())
        }
        Cmd::Explain {
            recipe,
            model,
            shape,
            no_fuse,
            json,
        } => {
            let (_, src, c) = compile_for(&recipe, &model, &shape, !no_fuse, false)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&explain_json(&c))?);
            } else {
                // A recipe with passes: which one this is.
                let mut passes: Vec<&str> = Vec::new();
                for p in src.recipe.rewrites.iter().filter_map(|r| r.pass.as_deref()) {
                    if !passes.contains(&p) {
                        passes.push(p);
                    }
                }
                if let Some(last) = passes.last() {
                    println!(
                        "pass \"{}\" of {} (--pass NAME for another)",
                        shape.pass.as_deref().unwrap_or(last),
                        passes.join(" → ")
                    );
                }
                explain(&c);
            }
            Ok(())
        }
        Cmd::Diff {
            recipe,
            model,
            format,
            shape,
            no_fuse,
        } => {
            let (_, _, c) = compile_for(&recipe, &model, &shape, !no_fuse, false)?;
            match format {
                Format::Text => print!("{}", diff::text(&c)),
                Format::Dot => print!("{}", diff::dot(&c)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&diff::json(&c))?),
            }
            Ok(())
        }
        Cmd::Compile {
            recipe,
            model,
            output,
            shape,
            no_fuse,
        } => {
            let t0 = std::time::Instant::now();
            let (unet, src, c) = compile_for(&recipe, &model, &shape, !no_fuse, true)?;
            let plan = PlanFile::new(&c, unet.fingerprint(), src.fingerprint())
                .with_prompt(shape.prompt.last().cloned());
            plan.save(&output)?;
            eprintln!(
                "compiled {} → {} ({} segment{}) in {:.3}s",
                recipe.display(),
                output.display(),
                c.segments.len(),
                if c.segments.len() == 1 { "" } else { "s" },
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

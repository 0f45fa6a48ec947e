//! The `rewire` command line: inspect a UNet's attention layers, dump its graph, run one forward.
//!
//! Try it: `cargo run --release -- inspect models/tiny-sd`.

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
mod args;

use args::*;
use rewire::compile::diff;
use rewire::compile::plan_file::PlanFile;
use rewire::exec::LowerOptions;
use rewire::graph::dump;
use rewire::recipe::Source;
use rewire::shape::{compile_for, open_graph};
use rewire::size::{self, Order};
use rewire::{io, preflight, report};
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

/// Prints a warning the library hands back.
fn warn(w: String) {
    eprintln!("warning: {w}");
}

/// The recipe of a video command: --no-recipe, --recipe FILE, else the built-in one.
fn video_recipe(
    recipe: &Option<PathBuf>,
    none: bool,
    text: &str,
    name: &str,
) -> Result<Option<Source>> {
    Ok(match (recipe, none) {
        (_, true) => None,
        (Some(r), false) => Some(Source::load(r)?),
        (None, false) => Some(Source::parse(text, Path::new(name))?),
    })
}

fn video_edit(a: VideoEditArgs) -> Result<()> {
    preflight::gif_output(&a.output)?;
    preflight::run_numbers(a.guidance, 0.8, None, 1, warn)?;
    let frames = rewire::video::read_frames(&a.frames, 2)?;
    preflight::edit_frames(&a.frames, frames.len())?;
    preflight::clip_outputs(&a.output, frames.len())?;
    let device = rewire::backend::device(&a.device)?;
    let pipe = rewire::pipeline::Pipeline::open(&a.model, &device)?;
    let src = video_recipe(
        &a.recipe,
        a.no_recipe,
        rewire::video::FATEZERO,
        "rewrites/fatezero.ron",
    )?;
    let opts = rewire::video::EditOptions {
        source_prompt: a.source_prompt.clone(),
        prompt: a.prompt.clone(),
        negative: a.negative.clone(),
        steps: a.steps,
        guidance: a.guidance,
        weights: a.weights,
        window: Some(a.window),
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
        "wrote {} and {} more files ({} frames, windows of {}) in {:.1}s; stored maps per window: {:.1} MiB in memory, {:.1} MiB on disk; peak RSS {}",
        a.output.display(),
        paths.len() - 1,
        frames.len(),
        out.window,
        t0.elapsed().as_secs_f64(),
        mib(out.inversion.stored.bytes() as u64),
        mib(out.inversion.stored.spilled_bytes()),
        rewire::limits::peak_rss().map_or("unknown".into(), |b| format!("{:.1} MiB", mib(b)))
    );
    Ok(())
}

fn video_generate(a: VideoGenerateArgs) -> Result<()> {
    preflight::gif_output(&a.output)?;
    preflight::clip_frames(a.frames)?;
    let motion = preflight::motion(&a.motion)?;
    preflight::run_numbers(a.guidance, 0.8, None, a.frames, warn)?;
    preflight::clip_outputs(&a.output, a.frames)?;
    let device = rewire::backend::device(&a.device)?;
    let pipe = rewire::pipeline::Pipeline::open(&a.model, &device)?;
    let src = video_recipe(
        &a.recipe,
        a.no_recipe,
        rewire::video::T2V_ZERO,
        "rewrites/t2v_zero.ron",
    )?;
    let latent = a
        .latents
        .as_deref()
        .map(|p| io::read_latents(p, &io::CLIP_LATENTS, false))
        .transpose()?;
    let opts = rewire::video::GenerateOptions {
        prompt: a.prompt.clone(),
        negative: a.negative.clone(),
        frames: a.frames,
        motion,
        seed: a.seed,
        latent,
        steps: a.steps,
        guidance: a.guidance,
        window: Some(a.window),
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

fn invert(a: InvertArgs) -> Result<()> {
    preflight::latents_output(&a.output)?;
    let pictures = io::read_pictures(&a.picture)?;
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
    io::write_inversion(&a.output, &inv)?;
    eprintln!(
        "wrote {} (latents {:?}, {} steps) in {:.1}s",
        a.output.display(),
        inv.latents().shape,
        inv.latents_per_step.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn profile(a: ProfileArgs) -> Result<()> {
    use rewire::exec::AttentionImpl;
    let device = rewire::backend::device(&a.device)?;
    let size = a
        .size
        .as_deref()
        .map(|s| size::parse("--size", s, Order::HxW))
        .transpose()?;
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

fn forward(a: ForwardArgs) -> Result<()> {
    let device = rewire::backend::device(&a.device)?;
    let opts = rewire::forward::ForwardOptions {
        model: a.model,
        inputs: a.inputs,
        out: a.out,
        recipe: a.recipe,
        plan: a.plan,
        store_out: a.store_out,
        step: a.step,
        steps: a.steps,
        weights: a.weights,
        no_fuse: a.no_fuse,
        frames: a.frames,
        reference: a.reference,
    };
    let done = rewire::forward::forward(&opts, &device)?;
    eprintln!(
        "wrote {} ({:?}) in {:.3}s",
        opts.out.display(),
        done.shape,
        done.seconds
    );
    if let Some((n, path)) = &done.stores {
        eprintln!("wrote {n} stored maps to {}", path.display());
    }
    Ok(())
}

fn run_job(a: RunArgs) -> Result<()> {
    use rewire::pipeline::{Pipeline, RunOptions};
    let device = rewire::backend::device(&a.device)?;
    preflight::run_output(&a.output, a.prompt.len())?;
    preflight::run_numbers(
        a.guidance,
        a.strength,
        a.size.as_deref(),
        a.prompt.len(),
        warn,
    )?;
    let pipe = Pipeline::open(&a.model, &device)?;
    let wxh = |flag: &str, s: &Option<String>| {
        s.as_deref()
            .map(|s| size::parse(flag, s, Order::WxH))
            .transpose()
    };
    let size = wxh("--size", &a.size)?;
    let opts = RunOptions {
        prompts: a.prompt.clone(),
        negative: a.negative.clone(),
        sdxl: rewire::pipeline::SdxlOptions {
            prompts_2: a.prompt_2.clone(),
            negative_2: a.negative_2.clone(),
            original_size: wxh("--original-size", &a.original_size)?,
            crop_top_left: match a.crop_top_left.as_deref() {
                Some(s) => size::corner("--crop-top-left", s)?,
                None => (0, 0),
            },
            target_size: wxh("--target-size", &a.target_size)?,
        },
        steps: a.steps,
        guidance: a.guidance,
        no_hoist: a.no_hoist,
        frames: None,
        pass: None,
        passes: Vec::new(),
        scheduler: a.scheduler.clone(),
        seed: a.seed,
        latents: (a.latents.as_deref())
            .map(|p| io::read_latents(p, &io::RUN_LATENTS, true))
            .transpose()?,
        size,
        fuse: !a.no_fuse,
        weights: a.weights,
        init_image: a.image.as_deref().map(io::read_image).transpose()?,
        strength: a.strength,
        // The CLI writes images: the latents stay on the device until the VAE.
        keep_latents_per_step: false,
    };
    for w in pipe.truncations(&opts) {
        warn(w);
    }
    let bar = indicatif::ProgressBar::new(a.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} denoising [{bar:30}] {pos}/{len} steps {elapsed_precise}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let compiled = rewire::run::compiled(&pipe, &opts, a.recipe.as_deref(), a.plan.as_deref())?;
    let out = pipe.run_compiled(&opts, compiled.as_ref(), |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64)
    })?;
    bar.finish_and_clear();
    let written = rewire::run::write(&a.output, &out)?;
    for p in written.paths {
        if preflight::has_extension(&p, "safetensors") {
            eprintln!("wrote {} stored maps to {}", written.stored, p.display());
        } else {
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(())
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
        } => {
            let (unet, graph) = open_graph(&model, size.as_deref(), batch)?;
            if json {
                let v = report::inspect_json(&unet, &graph);
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", report::inspect_text(&unet, &graph));
            }
        }
        Cmd::Profile(a) => profile(a)?,
        Cmd::Invert(a) => invert(a)?,
        Cmd::Video { cmd } => match cmd {
            VideoCmd::Generate(a) => video_generate(a)?,
            VideoCmd::Edit(a) => video_edit(a)?,
        },
        Cmd::Graph {
            model,
            format,
            size,
            batch,
        } => {
            let (_, graph) = open_graph(&model, size.as_deref(), batch)?;
            match format {
                Format::Text => print!("{}", dump::text(&graph)),
                Format::Dot => print!("{}", dump::dot(&graph)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&dump::json(&graph))?),
            }
        }
        Cmd::Forward(a) => forward(a)?,
        Cmd::Run(a) => run_job(a)?,
        Cmd::Check {
            recipe,
            model,
            shape,
        } => {
            let (_, src, c) = compile_for(&recipe, &model, &(&shape).into(), true, false)?;
            println!("{}", report::check_line(&recipe, &src, &c));
        }
        Cmd::Explain {
            recipe,
            model,
            shape,
            no_fuse,
            json,
        } => {
            let (_, src, c) = compile_for(&recipe, &model, &(&shape).into(), !no_fuse, false)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report::explain_json(&c))?
                );
            } else {
                // A recipe with passes: which one this is.
                if let Some(line) = report::pass_line(&src, shape.pass.as_deref()) {
                    println!("{line}");
                }
                print!("{}", report::explain(&c));
            }
        }
        Cmd::Diff {
            recipe,
            model,
            format,
            shape,
            no_fuse,
        } => {
            let (_, _, c) = compile_for(&recipe, &model, &(&shape).into(), !no_fuse, false)?;
            match format {
                Format::Text => print!("{}", diff::text(&c)),
                Format::Dot => print!("{}", diff::dot(&c)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&diff::json(&c))?),
            }
        }
        Cmd::Compile {
            recipe,
            model,
            output,
            shape,
            no_fuse,
        } => {
            let t0 = std::time::Instant::now();
            let (unet, src, c) = compile_for(&recipe, &model, &(&shape).into(), !no_fuse, true)?;
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
        }
    }
    Ok(())
}

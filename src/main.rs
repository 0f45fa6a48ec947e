//! The `rewire` command line: inspect a UNet's attention layers, dump its graph, run one forward.
//!
//! Try it: `cargo run --release -- inspect models/tiny-sd`.

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
mod args;
mod commands;

use args::*;
use commands::*;
use rewire::compile::diff;
use rewire::compile::plan_file::PlanFile;
use rewire::graph::dump;
use rewire::report;
use rewire::shape::{compile_for, open_graph};
use std::path::PathBuf;

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

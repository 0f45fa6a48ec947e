//! The `rewire` command line: inspect a UNet's attention layers, dump its graph, run one forward.
//!
//! Try it: `cargo run --release -- inspect models/tiny-sd`.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use rewire::exec::{LowerOptions, Plan};
use rewire::graph::{Graph, InputSpec, dump};
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
    Forward {
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
    },
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
    Ok(InputSpec::new(batch, h, w))
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

fn forward(model: &Path, inputs: &Path, out: &Path, device: &str) -> Result<()> {
    let device = rewire::backend::device(device)?;
    let unet = UNet::open(model)?;
    let given = rewire::io::read_forward_inputs(inputs)?;
    let graph = unet.graph(given.spec)?;
    let plan = Plan::lower(&graph, &unet.weights, &device, LowerOptions::default())?;
    let t0 = std::time::Instant::now();
    let result = plan.run_host(&given.tensors)?;
    let y = &result["out"];
    rewire::weights::write_f32(out, &[("out".into(), y.shape.clone(), y.data.clone())])?;
    eprintln!(
        "wrote {} ({:?}) in {:.3}s",
        out.display(),
        y.shape,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Inspect {
            model,
            size,
            batch,
            json,
        } => inspect(&model, &size, batch, json),
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
        Cmd::Forward {
            model,
            inputs,
            out,
            device,
        } => forward(&model, &inputs, &out, &device),
    }
}

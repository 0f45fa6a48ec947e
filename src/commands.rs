//! What the binary's commands that run models do (`video generate`, `video edit`, `invert`,
//! `profile`, `forward`, `run`): check the arguments, call the library, print what came out.
//! `main.rs` holds the command line and the commands that only compile or print.
//!
//! Try it: `cargo run --release -- run models/tiny-sd --prompt "a cat" --steps 2 -o /tmp/cat.png`.

use crate::args::*;
use anyhow::Result;
use rewire::exec::LowerOptions;
use rewire::pipeline::PipelineError;
use rewire::recipe::Source;
use rewire::size::{self, Order};
use rewire::{io, preflight};
use std::path::{Path, PathBuf};

/// Frames per window of the video commands when `--window` is not given.
const DEFAULT_WINDOW: usize = 8;

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

pub fn video_edit(a: VideoEditArgs) -> Result<()> {
    preflight::gif_output(&a.output)?;
    preflight::run_numbers(a.common.guidance, 0.8, None, 1, warn)?;
    let frames = rewire::video::read_frames(&a.frames, 2)?;
    preflight::edit_frames(&a.frames, frames.len())?;
    preflight::clip_outputs(&a.output, frames.len())?;
    let device = rewire::backend::device(&a.common.device)?;
    let pipe = rewire::pipeline::Pipeline::open(&a.common.model, &device)?;
    let src = video_recipe(
        &a.recipe,
        a.no_recipe,
        rewire::video::FATEZERO,
        "rewrites/fatezero.ron",
    )?;
    let opts = rewire::video::EditOptions {
        source_prompt: a.source_prompt.clone(),
        prompt: a.prompt.clone(),
        negative: a.common.negative.clone(),
        steps: a.common.steps,
        guidance: a.common.guidance,
        weights: a.weights,
        window: Some(a.window.unwrap_or(DEFAULT_WINDOW)),
        keep_latents_per_step: false,
    };
    let bar = indicatif::ProgressBar::new(a.common.steps as u64).with_style(
        indicatif::ProgressStyle::with_template("{msg:>6} {bar:40} {pos}/{len} steps")
            .expect("a valid template"),
    );
    let t0 = std::time::Instant::now();
    let progress = |pass: &str, i: usize, n: usize| {
        bar.set_message(pass.to_string());
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    };
    let out = match rewire::video::edit(&pipe, &opts, src.as_ref(), &frames, progress) {
        // The default windows, refused before anything ran: the whole clip at once.
        Err(PipelineError::Window(e)) if a.window.is_none() => {
            warn(format!("{e}\n  the whole clip runs as one batch"));
            let whole = rewire::video::EditOptions {
                window: None,
                ..opts
            };
            rewire::video::edit(&pipe, &whole, src.as_ref(), &frames, progress)?
        }
        r => r?,
    };
    bar.finish_and_clear();
    let paths = rewire::video::write_clip(&a.output, &out.frames, Some(&frames), a.common.delay)?;
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

pub fn video_generate(a: VideoGenerateArgs) -> Result<()> {
    preflight::gif_output(&a.output)?;
    preflight::clip_frames(a.frames)?;
    let motion = preflight::motion(&a.motion)?;
    preflight::run_numbers(a.common.guidance, 0.8, None, a.frames, warn)?;
    preflight::clip_outputs(&a.output, a.frames)?;
    let device = rewire::backend::device(&a.common.device)?;
    let pipe = rewire::pipeline::Pipeline::open(&a.common.model, &device)?;
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
        negative: a.common.negative.clone(),
        frames: a.frames,
        motion,
        seed: a.seed,
        latent,
        steps: a.common.steps,
        guidance: a.common.guidance,
        window: Some(a.window.unwrap_or(DEFAULT_WINDOW)),
    };
    let bar = indicatif::ProgressBar::new(a.common.steps as u64);
    let t0 = std::time::Instant::now();
    let progress = |i: usize, n: usize| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    };
    let frames = match rewire::video::generate(&pipe, &opts, src.as_ref(), progress) {
        // The default windows, refused before anything ran: the whole clip at once.
        Err(PipelineError::Window(e)) if a.window.is_none() => {
            warn(format!("{e}\n  the whole clip runs as one batch"));
            let whole = rewire::video::GenerateOptions {
                window: None,
                ..opts
            };
            rewire::video::generate(&pipe, &whole, src.as_ref(), progress)?
        }
        r => r?,
    };
    bar.finish_and_clear();
    let paths = rewire::video::write_clip(&a.output, &frames, None, a.common.delay)?;
    eprintln!(
        "wrote {} and {} more files ({} frames) in {:.1}s",
        a.output.display(),
        paths.len() - 1,
        a.frames,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn invert(a: InvertArgs) -> Result<()> {
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

pub fn profile(a: ProfileArgs) -> Result<()> {
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

pub fn forward(a: ForwardArgs) -> Result<()> {
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

pub fn run_job(a: RunArgs) -> Result<()> {
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

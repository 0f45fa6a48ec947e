//! Checks a command makes before it loads anything: output names (the extension a command
//! writes, and a path that can be written), and the numbers of a run or a clip (guidance,
//! strength, batch, image size, frames, motion) within [`crate::limits`].
//!
//! Try it: `cargo run --release -- run models/tiny-sd --prompt a -o out.jpg` (refused: a run
//! writes PNG pictures).

use crate::limits::{Exceeded, MAX_BATCH, MAX_LATENT_AREA, MAX_LATENT_SIDE, at_most};
use crate::size::{self, Order};
use std::path::{Path, PathBuf};

/// A name or a number refused before any work.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "-o {path}: a clip is written as an animated GIF\n  hint: name the output *.gif (the frames go beside it as NAME_000.png, …)"
    )]
    Gif { path: PathBuf },
    #[error(
        "-o {path}: rewire invert writes a safetensors file\n  hint: name the output *.safetensors"
    )]
    Safetensors { path: PathBuf },
    #[error(
        "-o {path}: rewire run writes PNG pictures (extension {ext:?})\n  hint: name the output *.png{}",
        if *.several { " (several prompts write NAME_0.png, NAME_1.png, ...)" } else { "" }
    )]
    Png {
        path: PathBuf,
        ext: String,
        several: bool,
    },
    #[error("cannot write {path}: {dir} is not a folder")]
    NoFolder { path: PathBuf, dir: PathBuf },
    #[error(transparent)]
    Write(#[from] crate::weights::WeightError),
    #[error("--guidance {0} is not a finite number\n  hint: SD uses about 7.5")]
    Guidance(f32),
    #[error("--strength {0} is not a finite number\n  hint: use a value in (0, 1]")]
    Strength(f32),
    #[error(
        "{prompts} prompts make a batch of {batch}: {exceeded}\n  hint: run fewer prompts at once"
    )]
    Prompts {
        prompts: usize,
        batch: usize,
        exceeded: Exceeded,
    },
    #[error(
        "--size {text}: a side is above {side} pixels (src/limits.rs: MAX_LATENT_SIDE × 8)\n  hint: SD 1.x makes 512x512, SDXL 1024x1024"
    )]
    Side { text: String, side: usize },
    #[error(
        "--size {text}: the latent has {area} positions: {exceeded}\n  hint: SD 1.x makes 512x512, SDXL 1024x1024"
    )]
    Area {
        text: String,
        area: usize,
        exceeded: Exceeded,
    },
    #[error("--frames 0: a clip needs at least one frame")]
    NoFrames,
    #[error("--frames {frames}: the batch of 2 × frames: {exceeded}")]
    Frames { frames: usize, exceeded: Exceeded },
    #[error("{path}: {frames} frames: the edit's batch of 2 × frames: {exceeded}")]
    EditFrames {
        path: PathBuf,
        frames: usize,
        exceeded: Exceeded,
    },
    #[error("--motion {0}: expected X,Y (numbers, e.g. 64,0)")]
    Motion(String),
}

/// Whether `path` ends in `.ext` (any case).
pub fn has_extension(path: &Path, ext: &str) -> bool {
    path.extension()
        .is_some_and(|e| e.to_string_lossy().eq_ignore_ascii_case(ext))
}

/// `path` is a new path or a regular file that can be replaced.
fn writable(path: &Path) -> Result<(), PreflightError> {
    crate::weights::check_output(path).map_err(|e| crate::weights::write_error(path, e).into())
}

/// `-o` of a clip: `*.gif`.
pub fn gif_output(out: &Path) -> Result<(), PreflightError> {
    if !has_extension(out, "gif") {
        return Err(PreflightError::Gif { path: out.into() });
    }
    Ok(())
}

/// Every file a clip of `frames` frames writes can be written.
pub fn clip_outputs(out: &Path, frames: usize) -> Result<(), PreflightError> {
    for p in crate::video::clip_paths(out, frames) {
        writable(&p)?;
    }
    Ok(())
}

/// `-o` of an inversion: a writable `*.safetensors`.
pub fn latents_output(out: &Path) -> Result<(), PreflightError> {
    if !has_extension(out, "safetensors") {
        return Err(PreflightError::Safetensors { path: out.into() });
    }
    writable(out)
}

/// `-o` of a run: in an existing folder, a `.png` name that is a new path or a regular file (the
/// other outputs are its siblings, checked when staged).
pub fn run_output(output: &Path, prompts: usize) -> Result<(), PreflightError> {
    if let Some(dir) = output.parent()
        && !dir.as_os_str().is_empty()
        && !dir.is_dir()
    {
        return Err(PreflightError::NoFolder {
            path: output.into(),
            dir: dir.into(),
        });
    }
    if !has_extension(output, "png") {
        let ext = output
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        return Err(PreflightError::Png {
            path: output.into(),
            ext: ext.unwrap_or_default(),
            several: prompts > 1,
        });
    }
    writable(output)
}

/// The numbers of a run checked before anything is loaded: guidance and strength finite, the
/// batch and the image size (`--size`, WxH) within [`crate::limits`]. A guidance far outside
/// the usual range goes to `warn`.
pub fn run_numbers(
    guidance: f32,
    strength: f32,
    size: Option<&str>,
    prompts: usize,
    mut warn: impl FnMut(String),
) -> Result<(), PreflightError> {
    if !guidance.is_finite() {
        return Err(PreflightError::Guidance(guidance));
    }
    if !strength.is_finite() {
        return Err(PreflightError::Strength(strength));
    }
    if guidance.abs() > 1000.0 {
        warn(format!(
            "--guidance {guidance} is far outside the usual 1 to 20"
        ));
    }
    let batch = prompts.saturating_mul(2);
    at_most(batch, MAX_BATCH, "MAX_BATCH").map_err(|exceeded| PreflightError::Prompts {
        prompts,
        batch,
        exceeded,
    })?;
    // A size that does not parse is refused later, with the parser's message.
    if let Some(s) = size
        && let Ok((w, h)) = size::parse("--size", s, Order::WxH)
    {
        // The latent is the image / 8 for every SD VAE.
        let side = MAX_LATENT_SIDE * 8;
        let area = (w / 8).saturating_mul(h / 8);
        if w > side || h > side {
            return Err(PreflightError::Side {
                text: s.into(),
                side,
            });
        }
        at_most(area, MAX_LATENT_AREA, "MAX_LATENT_AREA").map_err(|exceeded| {
            PreflightError::Area {
                text: s.into(),
                area,
                exceeded,
            }
        })?;
    }
    Ok(())
}

/// `--frames` of a generated clip: at least one, and a batch of 2 × frames within the limit.
pub fn clip_frames(frames: usize) -> Result<(), PreflightError> {
    if frames == 0 {
        return Err(PreflightError::NoFrames);
    }
    at_most(2 * frames, MAX_BATCH, "MAX_BATCH")
        .map_err(|exceeded| PreflightError::Frames { frames, exceeded })
}

/// The frames read from `path` for an edit: a batch of 2 × frames within the limit.
pub fn edit_frames(path: &Path, frames: usize) -> Result<(), PreflightError> {
    at_most(2 * frames, MAX_BATCH, "MAX_BATCH").map_err(|exceeded| PreflightError::EditFrames {
        path: path.into(),
        frames,
        exceeded,
    })
}

/// `--motion X,Y`: two finite numbers of at most 1e6.
pub fn motion(text: &str) -> Result<(f64, f64), PreflightError> {
    text.split_once(',')
        .and_then(|(x, y)| Some((x.trim().parse::<f64>().ok()?, y.trim().parse::<f64>().ok()?)))
        .filter(|(x, y)| x.is_finite() && y.is_finite() && x.abs() <= 1e6 && y.abs() <= 1e6)
        .ok_or_else(|| PreflightError::Motion(text.into()))
}

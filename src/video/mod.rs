//! Video jobs' pieces: frames in (a folder of PNGs sorted by name, or an animated GIF), clips
//! out (an animated GIF, every frame as `OUT_000.png`, … and a strip `OUT_strip.png`, written
//! all or nothing), and Text2Video-Zero's motion: one initial latent warped per frame as
//! diffusers' `create_motion_field_and_warp_latents` does. FateZero's edit is in [`edit`].
//!
//! Try it: `rewire video generate models/shapes-sd --prompt "a green square" --frames 4 --motion 64,0 -o clip.gif`.

use crate::exec::HostTensor;
use crate::pipeline::{Pipeline, PipelineError, RunOptions};
use crate::recipe::Source;
use std::path::{Path, PathBuf};

mod edit;
pub mod window;
pub use edit::{EDIT_PASSES, EditMemory, EditOptions, Edited, FATEZERO, edit, edit_latents};

/// Text2Video-Zero's built-in recipe: cross-frame attention to the first frame.
pub const T2V_ZERO: &str = include_str!("../../rewrites/t2v_zero.ron");

/// A Text2Video-Zero clip to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub prompt: String,
    pub negative: Option<String>,
    pub frames: usize,
    /// diffusers' motion_field_strength (x, y).
    pub motion: (f64, f64),
    pub seed: u64,
    /// The initial latent `[1, C, h, w]` (else drawn from `seed`).
    pub latent: Option<HostTensor>,
    pub steps: usize,
    pub guidance: f32,
    /// Frames per window (`None` or 0: the clip as one batch). Windows run in order and carry
    /// the first frame's K/V ([`window`]): the same clip in the memory of one window.
    pub window: Option<usize>,
}

/// Text2Video-Zero without its re-noising: one initial latent warped per frame
/// ([`warp_latents`]), the frames run as one batch (or in windows) with classifier-free
/// guidance and `recipe`
/// (the built-in [`T2V_ZERO`] for cross-frame attention; `None` for plain per-frame attention).
/// Returns the frames `[H, W, 3]`.
pub fn generate(
    pipe: &Pipeline,
    opts: &GenerateOptions,
    recipe: Option<&Source>,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<HostTensor>, PipelineError> {
    let mut run = RunOptions {
        prompts: vec![opts.prompt.clone(); opts.frames],
        negative: opts.negative.clone(),
        steps: opts.steps,
        guidance: opts.guidance,
        seed: opts.seed,
        frames: Some(opts.frames),
        ..Default::default()
    };
    let (lh, lw) = pipe.latent_size(&run)?;
    let c = pipe.unet.resolved.in_channels;
    let x_t = match &opts.latent {
        Some(l) if l.shape == [1, c, lh, lw] => l.clone(),
        Some(l) => {
            return Err(PipelineError::Component {
                component: "video",
                message: format!(
                    "the initial latent is {:?}; a clip starts from one latent [1, {c}, {lh}, {lw}]",
                    l.shape
                ),
            });
        }
        None => HostTensor::new(
            vec![1, c, lh, lw],
            crate::pipeline::gaussian(opts.seed, c * lh * lw),
        ),
    };
    let latents = warp_latents(&x_t, opts.frames, opts.motion);
    let size = match opts.window {
        Some(w) if w > 0 && w < opts.frames => w,
        _ => opts.frames,
    };
    let ranges = window::windows(opts.frames, size);
    if ranges.len() <= 1 {
        run.latents = Some(latents);
        return Ok(pipe.run(&run, recipe, progress)?.images);
    }
    // Windows: each compiled for its frame count, with the first frame's K/V carried.
    let (mut progress, windows) = (progress, ranges.len());
    let mut carry = crate::compile::store::Stored::default();
    let mut kernels = crate::exec::KernelCache::default();
    let mut frames = Vec::with_capacity(opts.frames);
    for (k, r) in ranges.iter().enumerate() {
        let run = RunOptions {
            prompts: vec![opts.prompt.clone(); r.len()],
            frames: Some(r.len()),
            latents: Some(frames_of(&latents, r.clone())),
            ..run.clone()
        };
        let compiled = match recipe {
            None => None,
            Some(src) => {
                let c = pipe.compile(&run, src)?;
                Some(window::carry(&c, src, None, r.len(), k > 0)?.unwrap_or(c))
            }
        };
        let mut out =
            pipe.run_with_kernels(&run, compiled.as_ref(), &carry, &mut kernels, |i, n| {
                progress(k * n + i, windows * n)
            })?;
        carry = out.stored.take(&window::carry_name(None));
        frames.extend(out.images);
    }
    Ok(frames)
}

/// Items `r` of a batch `[F, ...]`.
pub(crate) fn frames_of(t: &HostTensor, r: std::ops::Range<usize>) -> HostTensor {
    let per: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = r.len();
    HostTensor::new(shape, t.data[r.start * per..r.end * per].to_vec())
}

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("{path}: {message}\n  hint: {hint}")]
    Frames {
        path: PathBuf,
        message: String,
        hint: &'static str,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn frames_error(path: &Path, message: impl Into<String>, hint: &'static str) -> VideoError {
    VideoError::Frames {
        path: path.to_path_buf(),
        message: message.into(),
        hint,
    }
}

/// An RGB picture as `[H, W, 3]` in [0, 1].
fn to_tensor(img: &image::RgbImage) -> HostTensor {
    let (w, h) = img.dimensions();
    let data = img.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    HostTensor::new(vec![h as usize, w as usize, 3], data)
}

fn to_image(t: &HostTensor) -> image::RgbImage {
    let (h, w) = (t.shape[0], t.shape[1]);
    let bytes = t
        .data
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    image::RgbImage::from_raw(w as u32, h as u32, bytes).expect("an [H, W, 3] tensor")
}

/// Reads a clip: every PNG of a folder (sorted by name) or the frames of an animated GIF; at
/// least `min` frames, all of one size.
pub fn read_frames(path: &Path, min: usize) -> Result<Vec<HostTensor>, VideoError> {
    use image::AnimationDecoder;
    // The files of a folder, to name a bad frame.
    let mut names: Vec<PathBuf> = Vec::new();
    let frames: Vec<HostTensor> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| {
                frames_error(
                    path,
                    format!("cannot list the folder: {e}"),
                    "give a folder of PNGs or a GIF",
                )
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e.to_string_lossy().eq_ignore_ascii_case("png"))
            })
            .collect();
        files.sort();
        names = files.clone();
        crate::limits::at_most(files.len(), crate::limits::MAX_BATCH, "MAX_BATCH").map_err(
            |e| {
                frames_error(
                    path,
                    format!("{} frames: {e}", files.len()),
                    "use fewer frames",
                )
            },
        )?;
        files
            .iter()
            .map(|f| {
                image::open(f)
                    .map(|i| to_tensor(&i.to_rgb8()))
                    .map_err(|e| {
                        frames_error(
                            f,
                            format!("cannot read the frame: {e}"),
                            "frames are PNG pictures",
                        )
                    })
            })
            .collect::<Result<_, _>>()?
    } else {
        let file = std::fs::File::open(path).map_err(|e| {
            frames_error(
                path,
                format!("cannot open: {e}"),
                "give a folder of PNGs or an animated GIF",
            )
        })?;
        let decoder =
            image::codecs::gif::GifDecoder::new(std::io::BufReader::new(file)).map_err(|e| {
                frames_error(
                    path,
                    format!("not a GIF: {e}"),
                    "give a folder of PNGs or an animated GIF",
                )
            })?;
        let mut out = Vec::new();
        for f in decoder.into_frames() {
            let f = f.map_err(|e| {
                frames_error(path, format!("bad GIF frame: {e}"), "re-export the GIF")
            })?;
            if out.len() >= crate::limits::MAX_BATCH {
                return Err(frames_error(
                    path,
                    format!("more than {} frames", crate::limits::MAX_BATCH),
                    "use fewer frames (src/limits.rs: MAX_BATCH)",
                ));
            }
            out.push(to_tensor(
                &image::DynamicImage::ImageRgba8(f.into_buffer()).to_rgb8(),
            ));
        }
        out
    };
    if frames.len() < min.max(1) {
        return Err(frames_error(
            path,
            if frames.is_empty() {
                "no frames (the folder holds no PNG)".to_string()
            } else {
                format!(
                    "{} frame{}, a clip needs at least {min}",
                    frames.len(),
                    if frames.len() == 1 { "" } else { "s" }
                )
            },
            "give a folder of frames named so that they sort in order (frame_000.png, …) or an animated GIF",
        ));
    }
    if let Some((i, f)) = frames
        .iter()
        .enumerate()
        .find(|(_, f)| f.shape != frames[0].shape)
    {
        return Err(frames_error(
            names.get(i).map_or(path, |p| p.as_path()),
            format!(
                "frame {i} is {}×{}, frame 0 is {}×{}",
                f.shape[1], f.shape[0], frames[0].shape[1], frames[0].shape[0]
            ),
            "every frame of a clip must have one size",
        ));
    }
    Ok(frames)
}

/// The files a clip `OUT.gif` writes: the GIF, `OUT_000.png`, … and `OUT_strip.png`.
pub fn clip_paths(out: &Path, frames: usize) -> Vec<PathBuf> {
    let stem = out.with_extension("");
    let stem = stem.to_string_lossy();
    let mut v = vec![out.to_path_buf()];
    v.extend((0..frames).map(|i| PathBuf::from(format!("{stem}_{i:03}.png"))));
    v.push(PathBuf::from(format!("{stem}_strip.png")));
    v
}

/// Writes a clip, all or nothing: the animated GIF (`delay_ms` per frame, looping), each frame
/// as a PNG and a strip (the input frames above the output frames when `input` is given).
pub fn write_clip(
    out: &Path,
    frames: &[HostTensor],
    input: Option<&[HostTensor]>,
    delay_ms: u32,
) -> Result<Vec<PathBuf>, VideoError> {
    use image::ImageEncoder;
    let werr = |p: &Path, e: std::io::Error| VideoError::Write {
        path: p.to_path_buf(),
        source: e,
    };
    let paths = clip_paths(out, frames.len());
    for p in &paths {
        crate::weights::check_output(p).map_err(|e| werr(p, e))?;
    }
    let images: Vec<image::RgbImage> = frames.iter().map(to_image).collect();
    let mut staged = crate::weights::Staged::new();
    // The GIF.
    let mut gif = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new_with_speed(&mut gif, 10);
        enc.set_repeat(image::codecs::gif::Repeat::Infinite)
            .map_err(|e| werr(out, std::io::Error::other(e)))?;
        for img in &images {
            let rgba = image::DynamicImage::ImageRgb8(img.clone()).to_rgba8();
            let frame = image::Frame::from_parts(
                rgba,
                0,
                0,
                image::Delay::from_numer_denom_ms(delay_ms, 1),
            );
            enc.encode_frame(frame)
                .map_err(|e| werr(out, std::io::Error::other(e)))?;
        }
    }
    staged.stage(out, &gif).map_err(|e| werr(out, e))?;
    let png = |img: &image::RgbImage, p: &Path| -> Result<Vec<u8>, VideoError> {
        let mut bytes = Vec::new();
        image::codecs::png::PngEncoder::new(&mut bytes)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| werr(p, std::io::Error::other(e)))?;
        Ok(bytes)
    };
    for (img, p) in images.iter().zip(&paths[1..]) {
        let bytes = png(img, p)?;
        staged.stage(p, &bytes).map_err(|e| werr(p, e))?;
    }
    // The strip: input frames (when given) above the output frames.
    let (h, w) = (frames[0].shape[0] as u32, frames[0].shape[1] as u32);
    let rows = if input.is_some() { 2 } else { 1 };
    let mut strip = image::RgbImage::new(w * frames.len() as u32, h * rows);
    let mut row = 0;
    if let Some(inp) = input {
        for (i, f) in inp.iter().enumerate() {
            let img = to_image(f);
            if img.dimensions() == (w, h) {
                image::imageops::replace(&mut strip, &img, (i as u32 * w) as i64, 0);
            }
        }
        row = 1;
    }
    for (i, img) in images.iter().enumerate() {
        image::imageops::replace(&mut strip, img, (i as u32 * w) as i64, (row * h) as i64);
    }
    let strip_path = paths.last().expect("a strip path");
    let bytes = png(&strip, strip_path)?;
    staged
        .stage(strip_path, &bytes)
        .map_err(|e| werr(strip_path, e))?;
    staged.commit().map_err(|e| werr(out, e))?;
    Ok(paths)
}

/// grid_sample's reflection of a coordinate (align_corners false: about -0.5 and size - 0.5),
/// then clipped into the picture.
fn reflect(x: f64, size: usize) -> f64 {
    let (min, span) = (-0.5, size as f64);
    let x = (x - min).abs();
    let extra = x % span;
    let flips = (x / span).floor();
    let r = if flips as i64 % 2 == 0 {
        extra + min
    } else {
        span - extra + min
    };
    r.clamp(0.0, size as f64 - 1.0)
}

/// Text2Video-Zero's motion (diffusers' `create_motion_field_and_warp_latents` on frame ids
/// `0..frames`): frame `k` is the latent `x` `[1, C, h, w]` warped by a flow of
/// `k·(strength_x, strength_y)` pixels of diffusers' fixed 512×512 grid — the coordinates
/// resized bilinearly to `h×w`, then `grid_sample` nearest with reflection padding
/// (align_corners false). Strength 64 moves a 16×16 latent by 2 latent pixels per frame;
/// content moves toward negative x.
pub fn warp_latents(x: &HostTensor, frames: usize, strength: (f64, f64)) -> HostTensor {
    let [_, c, h, w] = x.shape[..] else {
        panic!("warp_latents takes [1, C, h, w]")
    };
    let grid = 512.0;
    let mut out = Vec::with_capacity(frames * c * h * w);
    for k in 0..frames {
        let (fx, fy) = (strength.0 * k as f64, strength.1 * k as f64);
        // The affine coordinate field resampled at output pixel (j, i) (bilinear resize of an
        // affine field is the field at the source position), then unnormalised for h×w.
        let src = |j: usize, n: usize| (j as f64 + 0.5) * grid / n as f64 - 0.5;
        let ix = |j: usize| reflect((src(j, w) + fx) / grid * w as f64 - 0.5, w);
        let iy = |i: usize| reflect((src(i, h) + fy) / grid * h as f64 - 0.5, h);
        for ch in 0..c {
            for i in 0..h {
                let y = iy(i).round_ties_even() as usize;
                for j in 0..w {
                    let xx = ix(j).round_ties_even() as usize;
                    out.push(x.data[(ch * h + y) * w + xx]);
                }
            }
        }
    }
    HostTensor::new(vec![frames, c, h, w], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifest's integer form of the t2v_zero case: strength 64 on 16×16 latents is
    /// `x[.., m(j + 2k)]` with `m(q) = q` below 16 and `31 − q` from 16 (reflection).
    #[test]
    fn warp_is_diffusers_gather() {
        let x = HostTensor::new(vec![1, 2, 16, 16], (0..512).map(|v| v as f32).collect());
        let y = warp_latents(&x, 4, (64.0, 0.0));
        for k in 0..4 {
            for ch in 0..2 {
                for i in 0..16 {
                    for j in 0..16 {
                        let q = j + 2 * k;
                        let m = if q < 16 { q } else { 31 - q };
                        assert_eq!(
                            y.data[((k * 2 + ch) * 16 + i) * 16 + j],
                            x.data[(ch * 16 + i) * 16 + m],
                            "frame {k} ({ch}, {i}, {j})"
                        );
                    }
                }
            }
        }
        // Frame 0 is the latent itself.
        assert_eq!(&y.data[..512], &x.data[..]);
    }
}

//! Pictures people look at: the generated image as a PNG, and cross-attention heat maps like
//! prompt-to-prompt's show_cross_attention — one tile per prompt token, the token's map
//! upsampled over the image on a black-red-yellow scale, the token's text underneath. Files are written under a
//! temporary name and renamed, so a failed run leaves no half-written PNG.
//!
//! Try it: `rewire run models/shapes-sd --recipe rewrites/p2p_store.ron --prompt "a red circle on the left" -o store.png`.

use crate::exec::HostTensor;
use image::{Rgb, RgbImage};
use std::path::{Path, PathBuf};

/// Errors raised while writing pictures.
#[derive(Debug, thiserror::Error)]
pub enum PictureError {
    #[error("cannot write {path}: {reason}\n  hint: check that the folder exists and is writable")]
    Write { path: PathBuf, reason: String },
    #[error(
        "cannot write {path}: rewire writes PNG pictures, and the extension is {ext:?}\n  hint: name the output *.png"
    )]
    Extension { path: PathBuf, ext: String },
    #[error(
        "the decoded image holds {value} at flat index {index}\n  hint: the latents diverged (an extreme --guidance, a recipe weight, or a broken VAE); rerun with --check-finite to find the node"
    )]
    NonFinite { value: f32, index: usize },
    #[error("{what} has shape {shape:?}, expected {expected}")]
    Shape {
        what: String,
        shape: Vec<usize>,
        expected: &'static str,
    },
}

/// An `[H, W, 3]` image in [0, 1] as 8-bit RGB (rounded like diffusers' numpy_to_pil).
pub fn to_rgb(img: &HostTensor) -> Result<RgbImage, PictureError> {
    if img.shape.len() != 3 || img.shape[2] != 3 {
        return Err(PictureError::Shape {
            what: "image".into(),
            shape: img.shape.clone(),
            expected: "[H, W, 3]",
        });
    }
    if let Some(i) = img.data.iter().position(|v| !v.is_finite()) {
        return Err(PictureError::NonFinite {
            value: img.data[i],
            index: i,
        });
    }
    let (h, w) = (img.shape[0], img.shape[1]);
    let px: Vec<u8> = img
        .data
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    Ok(RgbImage::from_raw(w as u32, h as u32, px).expect("buffer matches the shape"))
}

/// PNG bytes of a picture to be written at `path`: the extension must be `.png` (any case);
/// another extension, or none, is an error rather than PNG bytes under a misleading name.
pub fn png_bytes(img: &RgbImage, path: &Path) -> Result<Vec<u8>, PictureError> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    if ext.as_deref() != Some("png") {
        return Err(PictureError::Extension {
            path: path.to_path_buf(),
            ext: ext.unwrap_or_default(),
        });
    }
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| PictureError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(bytes)
}

/// Saves a PNG through a temporary name (the path must end in `.png`).
pub fn save_png(img: &RgbImage, path: &Path) -> Result<(), PictureError> {
    let bytes = png_bytes(img, path)?;
    crate::weights::write_atomic(path, &bytes).map_err(|e| PictureError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn draw_text(img: &mut RgbImage, text: &str, x0: u32, y0: u32, scale: u32) {
    use font8x8::UnicodeFonts;
    let mut x = x0;
    for ch in text.chars() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::LATIN_FONTS.get(ch))
            .unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8u32 {
                if bits & (1 << col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let (px, py) = (x + col * scale + dx, y0 + row as u32 * scale + dy);
                            if px < img.width() && py < img.height() {
                                img.put_pixel(px, py, Rgb([255, 255, 255]));
                            }
                        }
                    }
                }
            }
        }
        x += 8 * scale;
    }
}

/// A black → red → yellow scale for `a` in [0, 1].
fn heat_colour(a: f32) -> [f32; 3] {
    let r = (a * 2.0).min(1.0) * 255.0;
    let g = (a * 2.0 - 1.0).clamp(0.0, 1.0) * 230.0;
    let b = (a * 4.0 - 3.0).clamp(0.0, 1.0) * 120.0;
    [r, g, b]
}

/// Heat-map tiles for one prompt: `maps` is `[r, r, keys]` (an aggregate of cross-attention
/// probabilities), `tokens` the prompt's tokens as text (bos first), `image` the generated
/// image. Each tile is the image in grey with the token's map over it, bilinearly upsampled and
/// stretched from its own minimum (transparent) to its maximum (bright yellow) through a
/// black-red-yellow colour scale (cross-attention maps sit near 1/keys everywhere, so only a
/// stretch shows where a token attends), and the token's text below.
pub fn heat_maps(
    maps: &HostTensor,
    tokens: &[String],
    image: &RgbImage,
    tile: u32,
) -> Result<RgbImage, PictureError> {
    if maps.shape.len() != 3 {
        return Err(PictureError::Shape {
            what: "attention maps".into(),
            shape: maps.shape.clone(),
            expected: "[r, r, keys]",
        });
    }
    let (rh, rw, keys) = (maps.shape[0], maps.shape[1], maps.shape[2]);
    let n = tokens.len().min(keys).max(1);
    let label_h = 20u32;
    let bg = image::imageops::resize(image, tile, tile, image::imageops::FilterType::Triangle);
    let mut out = RgbImage::from_pixel(n as u32 * (tile + 4), tile + label_h, Rgb([0, 0, 0]));
    for (k, token) in tokens.iter().take(n).enumerate() {
        let at = |y: usize, x: usize| maps.data[(y * rw + x) * keys + k];
        let (min, max) = (0..rh * rw)
            .map(|i| at(i / rw, i % rw))
            .fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let span = (max - min).max(f32::MIN_POSITIVE);
        let x0 = k as u32 * (tile + 4);
        for y in 0..tile {
            for x in 0..tile {
                // bilinear sample of the map at the pixel centre
                let fy =
                    ((y as f32 + 0.5) / tile as f32 * rh as f32 - 0.5).clamp(0.0, (rh - 1) as f32);
                let fx =
                    ((x as f32 + 0.5) / tile as f32 * rw as f32 - 0.5).clamp(0.0, (rw - 1) as f32);
                let (y0, x0i) = (fy.floor() as usize, fx.floor() as usize);
                let (y1, x1) = ((y0 + 1).min(rh - 1), (x0i + 1).min(rw - 1));
                let (ty, tx) = (fy - y0 as f32, fx - x0i as f32);
                let v = at(y0, x0i) * (1.0 - ty) * (1.0 - tx)
                    + at(y0, x1) * (1.0 - ty) * tx
                    + at(y1, x0i) * ty * (1.0 - tx)
                    + at(y1, x1) * ty * tx;
                let a = ((v - min) / span).clamp(0.0, 1.0);
                let p = bg.get_pixel(x, y).0;
                let grey = (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32) * 0.5;
                let heat = heat_colour(a);
                let w = 0.75 * a.sqrt();
                let mix = |c: f32| (grey * (1.0 - w) + c * w) as u8;
                out.put_pixel(x0 + x, y, Rgb([mix(heat[0]), mix(heat[1]), mix(heat[2])]));
            }
        }
        let label: String = token.chars().take((tile / 8) as usize).collect();
        let tw = label.chars().count() as u32 * 8;
        draw_text(
            &mut out,
            &label,
            x0 + tile.saturating_sub(tw) / 2,
            tile + 6,
            1,
        );
    }
    Ok(out)
}

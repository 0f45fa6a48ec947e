//! DDIM inversion against diffusers' `DDIMInverseScheduler` on shapes-sd
//! (`tests/fixtures/video_cases/ddim_inversion.safetensors`, manifest
//! `video_cases.ddim_inversion`), through the library and through `rewire invert` + `rewire run`:
//! - from diffusers' encoded latents, the latents after every inversion step within 1e-4
//!   (measured ≤ 1.7e-5): the inversion itself;
//! - the VAE encoding within 1e-4 (measured 8.9e-5 on latents up to 8.55: 1e-5 relative, the
//!   f32 noise of a deep convolutional encoder);
//! - end to end from the picture: the first inversion steps run the UNet at t ≈ 1, where ε̂
//!   moves by about 1/sqrt(1 − ᾱ) per unit of x, so the encoder's float noise grows 17× over the
//!   20 steps (1.5e-3 at the last step). Per step the bound is 20× the encoding's own error; the
//!   reconstruction (DDIM forward from the inverted latents, no guidance) lands within 1e-3
//!   (measured 1.9e-5).

mod common;
use common::*;
use rewire::exec::HostTensor;
use rewire::invert::{InvertOptions, invert, invert_latents};
use rewire::pipeline::{Pipeline, RunOptions};
use std::path::PathBuf;

fn case() -> PathBuf {
    root().join("tests/fixtures/video_cases/ddim_inversion.safetensors")
}

fn shapes_sd() -> PathBuf {
    root().join("models/shapes-sd")
}

const PROMPT: &str = "a red circle on the left";

#[test]
fn inversion_matches_diffusers() {
    let pipe = Pipeline::open(&shapes_sd(), &device()).unwrap();
    let picture = expected(&case(), "image_in");
    let opts = InvertOptions {
        prompt: PROMPT.into(),
        steps: 20,
        weights: Default::default(),
    };
    let inv = invert(&pipe, &opts, std::slice::from_ref(&picture), |_, _| {}).unwrap();
    let e0 = inv.latents_0.max_abs_diff(&expected(&case(), "latents_0"));
    println!("latents_0: {e0:e}");
    assert!(e0 <= 1e-4, "encoded latents differ by {e0}");
    // The encoder's float noise, amplified by the inversion (see the module doc).
    let bound = 20.0 * e0.max(1e-6);
    assert_eq!(inv.timesteps[0], 1.0);
    assert_eq!(inv.timesteps[19], 951.0);
    let want = expected(&case(), "inverted_latents_per_step");
    let per = inv.latents_0.data.len();
    assert_eq!(inv.latents_per_step.len() * per, want.data.len());
    for (i, got) in inv.latents_per_step.iter().enumerate() {
        let w = HostTensor::new(
            got.shape.clone(),
            want.data[i * per..(i + 1) * per].to_vec(),
        );
        let e = got.max_abs_diff(&w);
        println!("inversion step {i}: {e:e}");
        assert!(
            e <= bound,
            "inversion step {i} differs by {e} (bound {bound})"
        );
    }
    // The inversion moved the latents (a no-op must fail).
    assert!(inv.latents().max_abs_diff(&inv.latents_0) > 0.5);

    // Reconstruction: DDIM forward from the inverted latents, the same prompt, no guidance.
    let run = RunOptions {
        prompts: vec![PROMPT.into()],
        steps: 20,
        guidance: 1.0,
        latents: Some(inv.latents().clone()),
        ..Default::default()
    };
    let out = pipe.run(&run, None, |_, _| {}).unwrap();
    let start = inv
        .latents()
        .max_abs_diff(&expected(&case(), "inverted_latents"));
    let want = expected(&case(), "recon_latents_per_step");
    for (i, got) in out.latents_per_step.iter().enumerate() {
        let w = HostTensor::new(
            got.shape.clone(),
            want.data[i * per..(i + 1) * per].to_vec(),
        );
        let e = got.max_abs_diff(&w);
        println!("reconstruction step {i}: {e:e}");
        // Denoising starts from the inverted latents' error and shrinks it.
        assert!(
            e <= 1.1 * start + 1e-5,
            "reconstruction step {i} differs by {e} (the inverted latents by {start})"
        );
    }
    let e = out.images[0].max_abs_diff(&expected(&case(), "image_recon"));
    println!("reconstruction image: {e:e}");
    assert!(e <= 1e-3, "reconstruction differs by {e}");
}

/// From diffusers' own encoded latents, the inversion steps alone.
#[test]
fn inversion_steps_match_diffusers() {
    let pipe = Pipeline::open(&shapes_sd(), &device()).unwrap();
    let opts = InvertOptions {
        prompt: PROMPT.into(),
        steps: 20,
        weights: Default::default(),
    };
    let inv = invert_latents(&pipe, &opts, expected(&case(), "latents_0"), |_, _| {}).unwrap();
    let want = expected(&case(), "inverted_latents_per_step");
    let per = inv.latents_0.data.len();
    for (i, got) in inv.latents_per_step.iter().enumerate() {
        let w = HostTensor::new(
            got.shape.clone(),
            want.data[i * per..(i + 1) * per].to_vec(),
        );
        let e = got.max_abs_diff(&w);
        println!("inversion step {i} (from diffusers' latents): {e:e}");
        assert!(e <= 1e-4, "inversion step {i} differs by {e}");
    }
    assert!(
        inv.latents().max_abs_diff(&inv.latents_0) > 0.5,
        "the inversion moved nothing"
    );
}

#[test]
fn invert_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let picture = expected(&case(), "image_in");
    let bytes: Vec<u8> = picture
        .data
        .iter()
        .map(|v| (v * 255.0).round() as u8)
        .collect();
    image::RgbImage::from_raw(64, 64, bytes)
        .unwrap()
        .save(p("in.png"))
        .unwrap();
    let model = shapes_sd();
    let model = model.to_str().unwrap();
    rewire_ok(&[
        "invert",
        model,
        &p("in.png"),
        "--prompt",
        PROMPT,
        "--steps",
        "20",
        "-o",
        &p("inv.safetensors"),
    ]);
    let got = expected(std::path::Path::new(&p("inv.safetensors")), "latents");
    let e = got.max_abs_diff(&expected(&case(), "inverted_latents"));
    println!("CLI inverted latents: {e:e}");
    // 20× the encoder's 1e-4 (see the module doc).
    assert!(e <= 2e-3, "inverted latents differ by {e}");
    let steps = expected(
        std::path::Path::new(&p("inv.safetensors")),
        "latents_per_step",
    );
    assert_eq!(steps.shape, vec![20, 1, 4, 16, 16]);
    rewire_ok(&[
        "run",
        model,
        "--prompt",
        PROMPT,
        "--guidance",
        "1",
        "--steps",
        "20",
        "--latents",
        &p("inv.safetensors"),
        "-o",
        &p("recon.png"),
    ]);
    let img = image::open(p("recon.png")).unwrap().to_rgb8();
    let want = expected(&case(), "image_recon");
    let worst = img
        .pixels()
        .enumerate()
        .flat_map(|(i, px)| (0..3).map(move |c| (i, c, px[c])))
        .map(|(i, c, v)| (v as f32 / 255.0 - want.data[i * 3 + c]).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 1.0 / 255.0 + 1e-3,
        "reconstruction PNG differs by {worst}"
    );

    // Bad input: an empty folder, pictures of two sizes, a picture the VAE cannot take.
    std::fs::create_dir(p("empty")).unwrap();
    let (ok, _, err) = rewire(&[
        "invert",
        model,
        &p("empty"),
        "--prompt",
        "x",
        "-o",
        &p("a.safetensors"),
    ]);
    assert!(!ok && err.contains("no PNG"), "{err}");
    std::fs::create_dir(p("mixed")).unwrap();
    image::RgbImage::new(64, 64).save(p("mixed/a.png")).unwrap();
    image::RgbImage::new(32, 64).save(p("mixed/b.png")).unwrap();
    let (ok, _, err) = rewire(&[
        "invert",
        model,
        &p("mixed"),
        "--prompt",
        "x",
        "-o",
        &p("a.safetensors"),
    ]);
    assert!(
        !ok && err.contains("frame 1 is 32×64, frame 0 is 64×64"),
        "{err}"
    );
    image::RgbImage::new(62, 62).save(p("odd.png")).unwrap();
    let (ok, _, err) = rewire(&[
        "invert",
        model,
        &p("odd.png"),
        "--prompt",
        "x",
        "-o",
        &p("a.safetensors"),
    ]);
    assert!(
        !ok && err.contains("not divisible by the VAE factor"),
        "{err}"
    );
    assert!(!dir.path().join("a.safetensors").exists());
}

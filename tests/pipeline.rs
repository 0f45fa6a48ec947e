//! The text-to-image job against diffusers' StableDiffusionPipeline on tiny-sd: latents after
//! every step within 1e-4, the decoded image within 1e-3, a step-ranged reweight through its
//! recipe, and the same seed giving the same PNG twice.

mod common;
use common::*;
use rewire::exec::HostTensor;
use rewire::pipeline::{Pipeline, RunOptions};
use rewire::scheduler::SchedulerConfig;
use std::path::PathBuf;

fn pcase(name: &str) -> PathBuf {
    root()
        .join("tests/fixtures/pipeline_cases")
        .join(format!("{name}.safetensors"))
}

fn opts(scheduler: &str, latents: Option<HostTensor>) -> RunOptions {
    RunOptions {
        prompts: vec!["a photo of a cat".into()],
        negative: None,
        steps: 5,
        guidance: 7.5,
        scheduler: Some(scheduler.into()),
        seed: 0,
        latents,
        ..Default::default()
    }
}

/// The scheduler each case was made with: SD 1.5's betas and the class's own defaults (for DDIM,
/// exactly the shipped config).
fn case_scheduler(scheduler: &str) -> Option<SchedulerConfig> {
    let sd15 = r#""num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1"#;
    let json = match scheduler {
        "ddim" => return None,
        "euler" => format!(r#"{{"_class_name": "EulerDiscreteScheduler", {sd15}}}"#),
        "pndm" => format!(
            r#"{{"_class_name": "PNDMScheduler", {sd15}, "skip_prk_steps": true, "set_alpha_to_one": false}}"#
        ),
        other => panic!("no case for {other}"),
    };
    Some(SchedulerConfig::from_json(&json, std::path::Path::new("case.json")).unwrap())
}

fn txt2img(scheduler: &str) {
    let path = pcase(&format!("txt2img_{scheduler}"));
    let mut pipe = Pipeline::open(&tiny_sd(), &device()).unwrap();
    let mut o = opts(scheduler, Some(expected(&path, "latents_in")));
    if let Some(config) = case_scheduler(scheduler) {
        pipe.scheduler = config;
        o.scheduler = None;
    }
    let out = pipe.run(&o, None, |_, _| {}).unwrap();
    let want = expected(&path, "latents_per_step");
    let per = out.latents_per_step[0].data.len();
    // PNDM (skip_prk_steps) runs one step more than asked, as in diffusers.
    assert_eq!(
        want.data.len() / per,
        out.latents_per_step.len(),
        "{scheduler}: step count"
    );
    for (i, got) in out.latents_per_step.iter().enumerate() {
        let w = HostTensor::new(
            got.shape.clone(),
            want.data[i * per..(i + 1) * per].to_vec(),
        );
        let e = got.max_abs_diff(&w);
        println!("{scheduler} step {i}: {e:e}");
        // Euler's latents stay near σ_max·|noise| (~52 here) and its first step multiplies the
        // UNet's float rounding by guidance × Δσ ≈ 80. 1e-4 absolute is below torch's own f32
        // rounding: the whole UNet, text encoder and VAE run in f64 still land 1.10e-4 from
        // diffusers' step-0 latents (torch's eps is 1.04e-5 max from the f64 result, ours
        // 1.46e-5). So Euler is held to 4 f32 ulps per unit of the latents (≈2.1e-4 here; we
        // measure 1.80e-4); the other schedulers meet 1e-4 absolute.
        let scale = w.data.iter().fold(0f32, |m, x| m.max(x.abs()));
        let bound = if scheduler == "euler" {
            4e-6 * scale
        } else {
            1e-4
        };
        assert!(
            e <= bound,
            "{scheduler}: step {i} latents differ by {e} (bound {bound})"
        );
    }
    let e = out.images[0].max_abs_diff(&expected(&path, "image"));
    println!("{scheduler} image: {e:e}");
    assert!(e <= 1e-3, "{scheduler}: image differs by {e}");
}

#[test]
fn txt2img_ddim() {
    txt2img("ddim");
}

#[test]
fn txt2img_euler() {
    txt2img("euler");
}

#[test]
fn txt2img_pndm() {
    txt2img("pndm");
}

#[test]
fn reweight_steps_0_2_ddim() {
    let path = pcase("reweight_steps_0_2_ddim");
    let pipe = Pipeline::open(&tiny_sd(), &device()).unwrap();
    let src =
        rewire::recipe::Source::load(&root().join("rewrites/reweight_steps_0_2_ddim.ron")).unwrap();
    let o = opts("ddim", Some(expected(&path, "latents_in")));
    let out = pipe.run(&o, Some(&src), |_, _| {}).unwrap();
    let got = out.latents_per_step.last().unwrap();
    let want = expected(&path, "latents_out");
    let e = got.max_abs_diff(&want);
    println!("reweight_steps_0_2_ddim: {e:e}");
    assert!(e <= 1e-4, "latents differ by {e}");
    let plain = pipe.run(&o, None, |_, _| {}).unwrap();
    assert!(
        plain.latents_per_step.last().unwrap().max_abs_diff(got) > 1e-4,
        "the reweight changed nothing"
    );
}

#[test]
fn same_seed_same_png() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let out = dir.path().join(name);
        rewire_ok(&[
            "run",
            "models/tiny-sd",
            "--prompt",
            "a red circle",
            "--steps",
            "3",
            "--seed",
            "7",
            "-o",
            out.to_str().unwrap(),
        ]);
        std::fs::read(out).unwrap()
    };
    let (a, b) = (run("a.png"), run("b.png"));
    assert!(a.starts_with(b"\x89PNG"));
    assert_eq!(a, b, "the same seed gave two different PNGs");
}

#[test]
fn bad_runs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let o = out.to_str().unwrap();
    let (ok, _, err) = rewire(&[
        "run",
        "models/tiny-sd",
        "--prompt",
        "x",
        "--size",
        "100x100",
        "-o",
        o,
    ]);
    assert!(
        !ok && err.contains("not divisible by the VAE factor 8"),
        "{err}"
    );
    let (ok, _, err) = rewire(&[
        "run",
        "models/tiny-sd",
        "--prompt",
        "x",
        "--scheduler",
        "lms",
        "-o",
        o,
    ]);
    assert!(!ok && err.contains("lms"), "{err}");
    let (ok, _, err) = rewire(&["run", "models/tiny-sd/unet", "--prompt", "x", "-o", o]);
    assert!(
        !ok && err.contains("models/tiny-sd/unet: no unet/ folder") && err.contains("hint:"),
        "{err}"
    );
    // --scheduler pndm on a DDIM pipeline runs (PNDM with skip_prk_steps, as SD uses it).
    let (ok, _, err) = rewire(&[
        "run",
        "models/tiny-sd",
        "--prompt",
        "x",
        "--steps",
        "2",
        "--scheduler",
        "pndm",
        "-o",
        o,
    ]);
    assert!(ok, "{err}");
    std::fs::remove_file(&out).unwrap();
    let (ok, _, err) = rewire(&[
        "run",
        "models/tiny-sd",
        "--prompt",
        "x",
        "--steps",
        "2",
        "-o",
        "/nonexistent-dir/x.png",
    ]);
    assert!(!ok && err.contains("cannot write"), "{err}");
    assert!(!out.exists());
}

/// The loop keeps its latents on the device: asked for the final latents only, a run gives the
/// same image and final latents as one bringing every step's back (for the schedulers with a
/// history on the device too), and downloads none per step.
#[test]
fn latents_stay_on_the_device_unless_asked() {
    let pipe = Pipeline::open(&tiny_sd(), &device()).unwrap();
    for scheduler in ["ddim", "pndm", "euler", "dpmpp2m"] {
        let every = pipe.run(&opts(scheduler, None), None, |_, _| {}).unwrap();
        let quiet = RunOptions {
            keep_latents_per_step: false,
            ..opts(scheduler, None)
        };
        let mut steps = 0;
        let last = pipe.run(&quiet, None, |_, _| steps += 1).unwrap();
        assert!(last.latents_per_step.is_empty(), "{scheduler}");
        assert_eq!(steps, every.latents_per_step.len(), "{scheduler}");
        assert_eq!(
            &every.latents,
            every.latents_per_step.last().unwrap(),
            "{scheduler}"
        );
        assert_eq!(last.latents, every.latents, "{scheduler}: final latents");
        assert_eq!(last.images, every.images, "{scheduler}: image");
    }
}

/// Hoisting is lossless: the run constants' values (every cross-attention K/V) computed once per
/// job give the latents and stores of computing them at every step, within 1e-6.
#[test]
fn hoisting_changes_nothing() {
    let pipe = Pipeline::open(&root().join("models/shapes-sd"), &device()).unwrap();
    let src = rewire::recipe::Source::load(&root().join("rewrites/p2p_word_swap.ron")).unwrap();
    let o = RunOptions {
        prompts: vec![
            "a red circle on the left".into(),
            "a blue circle on the left".into(),
        ],
        steps: 10,
        seed: 3,
        ..Default::default()
    };
    let hoisted = pipe.run(&o, Some(&src), |_, _| {}).unwrap();
    let plain = pipe
        .run(
            &RunOptions {
                no_hoist: true,
                ..o.clone()
            },
            Some(&src),
            |_, _| {},
        )
        .unwrap();
    for (i, (a, b)) in hoisted
        .latents_per_step
        .iter()
        .zip(&plain.latents_per_step)
        .enumerate()
    {
        let e = a.max_abs_diff(b);
        assert!(e <= 1e-6, "step {i}: hoisting moved the latents by {e}");
    }
    assert!(!hoisted.stores.is_empty());
    for (k, v) in &hoisted.stores {
        let e = v.max_abs_diff(&plain.stores[k]);
        assert!(e <= 1e-6, "{k}: hoisting moved the store by {e}");
    }
    // What was hoisted: every cross-attention's to_k and to_v, nothing that reads the sample.
    let unet = rewire::unet::UNet::open(&root().join("models/shapes-sd")).unwrap();
    let g = unet
        .graph(rewire::graph::InputSpec::new(2, 16, 16))
        .unwrap();
    let h = rewire::compile::hoist::split(&g).unwrap().unwrap();
    let cross = g
        .attention_layers()
        .iter()
        .filter(|(_, _, a)| a.kind == rewire::graph::AttnKind::Cross)
        .count();
    assert_eq!(h.values.len(), 2 * cross);
    assert!(
        h.values
            .iter()
            .all(|v| v.path.ends_with(".attn2.to_k") || v.path.ends_with(".attn2.to_v"))
    );
    assert!(
        h.step
            .inputs()
            .iter()
            .all(|(n, _)| n != "encoder_hidden_states")
    );
}

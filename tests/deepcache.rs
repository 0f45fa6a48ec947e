//! DeepCache as a recipe op (`Cache(interval, branch)`) against the `DeepCache` package on
//! shapes-sd (`tests/fixtures/video_cases/deepcache.safetensors`, manifest
//! `video_cases.deepcache`): latents after every step within 1e-4, the image within 1e-3 and
//! different from the uncached run's; what a cached step computes; the compiler's errors.

mod common;
use common::*;
use rewire::compile::{CompileOptions, cache};
use rewire::exec::HostTensor;
use rewire::graph::InputSpec;
use rewire::pipeline::{Pipeline, RunOptions};
use rewire::recipe::Source;
use rewire::unet::UNet;
use std::path::{Path, PathBuf};

fn case() -> PathBuf {
    root().join("tests/fixtures/video_cases/deepcache.safetensors")
}

fn shapes_sd() -> PathBuf {
    root().join("models/shapes-sd")
}

fn opts() -> RunOptions {
    RunOptions {
        prompts: vec!["a red circle on the left".into()],
        steps: 20,
        guidance: 7.5,
        latents: Some(expected(&case(), "latents_in")),
        ..Default::default()
    }
}

fn per_step(want: &HostTensor, got: &[HostTensor], what: &str) -> f32 {
    let per = got[0].data.len();
    assert_eq!(want.data.len(), per * got.len(), "{what}: step count");
    let mut worst = 0f32;
    for (i, g) in got.iter().enumerate() {
        let w = HostTensor::new(g.shape.clone(), want.data[i * per..(i + 1) * per].to_vec());
        let e = g.max_abs_diff(&w);
        println!("{what} step {i}: {e:e}");
        worst = worst.max(e);
    }
    worst
}

#[test]
fn deepcache_matches_the_deepcache_package() {
    let pipe = Pipeline::open(&shapes_sd(), &device()).unwrap();
    let src = Source::load(&root().join("rewrites/deepcache.ron")).unwrap();
    let cached = pipe.run(&opts(), Some(&src), |_, _| {}).unwrap();
    let e = per_step(
        &expected(&case(), "latents_per_step"),
        &cached.latents_per_step,
        "cached",
    );
    assert!(e <= 1e-4, "DeepCache latents differ by {e}");
    let ei = cached.images[0].max_abs_diff(&expected(&case(), "image"));
    println!("cached image: {ei:e}");
    assert!(ei <= 1e-3, "DeepCache image differs by {ei}");

    // The uncached run matches the case's own full run, and the cache changed the picture.
    let full = pipe.run(&opts(), None, |_, _| {}).unwrap();
    let ef = per_step(
        &expected(&case(), "latents_per_step_full"),
        &full.latents_per_step,
        "full",
    );
    assert!(ef <= 1e-4, "uncached latents differ by {ef}");
    let d = cached.images[0].max_abs_diff(&full.images[0]);
    println!("cached vs uncached image: {d}");
    assert!(d > 0.1, "the cache changed nothing ({d})");
    // Full steps are exact: step 0 is the same in both runs.
    assert_eq!(cached.latents_per_step[0], full.latents_per_step[0]);
}

fn compile(text: &str, batch: usize) -> Result<rewire::compile::Compiled, String> {
    let unet = UNet::open(&shapes_sd()).unwrap();
    let src = Source::parse(text, Path::new("t.ron")).map_err(|e| e.to_string())?;
    let opts = CompileOptions {
        steps: Some(20),
        ..CompileOptions::fused()
    };
    rewire::compile::compile(&src, &unet, InputSpec::new(batch, 16, 16), &opts)
        .map_err(|e| e.to_string())
}

#[test]
fn cached_steps_run_only_the_shallow_branch() {
    let c = compile(
        "Recipe(name: \"c\", rewrites: [Rewrite(op: Cache(interval: 3, branch: 0))])",
        2,
    )
    .unwrap();
    let d = c.cache.as_ref().unwrap();
    assert_eq!(d.resume, "up_blocks.2.resnets.1");
    assert_eq!(d.shape, vec![2, 64, 16, 16]);
    assert_eq!(
        (0..20).filter(|&i| d.full(i)).collect::<Vec<_>>(),
        vec![0, 3, 6, 9, 12, 15, 18]
    );
    let seg = &c.segments[0];
    let full = &seg.graph;
    assert!(full.outputs().iter().any(|(n, _)| n == cache::FEATURES));
    let g = seg.cached.as_ref().unwrap();
    let paths: Vec<&str> = g.nodes().map(|n| g.node(n).path.as_str()).collect();
    // The manifest's rule: time embedding, conv_in, up_blocks.2.resnets.1,
    // up_blocks.2.attentions.1, conv_norm_out, conv_out; nothing else.
    for p in &paths {
        let ok = p.is_empty()
            || p.starts_with("time_")
            || p.starts_with("conv_in")
            || p.starts_with("up_blocks.2.resnets.1")
            || p.starts_with("up_blocks.2.attentions.1")
            || p.starts_with("conv_norm_out")
            || p.starts_with("conv_out")
            || p.starts_with("conv_act");
        assert!(ok, "a cached step runs {p}");
    }
    assert!(
        paths
            .iter()
            .any(|p| p.starts_with("up_blocks.2.attentions.1"))
    );
    assert!(g.totals().2 * 4 < full.totals().2, "cached steps are cheap");

    // Branch 1: the whole last up block, on the features after up_blocks.1, with down block
    // 0's first layer for its skip.
    let c = compile(
        "Recipe(name: \"c\", rewrites: [Rewrite(op: Cache(interval: 2, branch: 1))])",
        2,
    )
    .unwrap();
    let d = c.cache.as_ref().unwrap();
    assert_eq!(d.resume, "up_blocks.2.resnets.0");
    assert_eq!(d.shape, vec![2, 128, 16, 16]);
    let g = c.segments[0].cached.as_ref().unwrap();
    let paths: Vec<&str> = g.nodes().map(|n| g.node(n).path.as_str()).collect();
    assert!(
        paths
            .iter()
            .any(|p| p.starts_with("down_blocks.0.attentions.0"))
    );
    assert!(
        !paths
            .iter()
            .any(|p| p.starts_with("down_blocks.0.downsamplers"))
    );
    assert!(!paths.iter().any(|p| p.starts_with("mid_block")));
}

#[test]
fn cache_errors_are_located() {
    let cases = [
        (
            "Recipe(name: \"c\", rewrites: [Rewrite(op: Cache(interval: 1))])",
            "t.ron:1:",
            "caches nothing",
        ),
        (
            "Recipe(name: \"c\", rewrites: [Rewrite(op: Cache(interval: 3, branch: 9))])",
            "t.ron:1:",
            "not a shallow branch",
        ),
        (
            "Recipe(name: \"c\", rewrites: [Rewrite(select: Select(kind: Some(Cross)), op: Cache(interval: 3))])",
            "t.ron:1:",
            "whole UNet",
        ),
        (
            "Recipe(name: \"c\", rewrites: [Rewrite(steps: Some(Indices(0, 4)), op: Cache(interval: 3))])",
            "t.ron:1:",
            "whole run",
        ),
        (
            "Recipe(name: \"c\", rewrites: [Rewrite(branch: Cond, op: Cache(interval: 3))])",
            "t.ron:1:",
            "both CFG halves",
        ),
        (
            "Recipe(name: \"c\", rewrites: [\n Rewrite(op: Cache(interval: 3)),\n Rewrite(op: Cache(interval: 4)),\n])",
            "t.ron:3:",
            "one Cache per recipe",
        ),
        // A Store on a layer that cached steps skip (the mid block's cross-attention).
        (
            "Recipe(name: \"c\", rewrites: [\n Rewrite(op: Cache(interval: 3)),\n Rewrite(select: Select(paths: [\"mid_block.*.attn2\"]), op: Store()),\n])",
            "t.ron:3:",
            "skips at cached steps",
        ),
    ];
    for (text, at, says) in cases {
        let Err(e) = compile(text, 2) else {
            panic!("compiled: {text}");
        };
        assert!(e.starts_with(at), "{text}\n→ {e}\n(expected at {at})");
        assert!(e.contains(says), "{text}\n→ {e}\n(expected {says:?})");
        assert!(e.contains("hint:"), "{e}");
    }
    // A Store on the shallow branch is fine, and is recorded at every step.
    let c = compile(
        "Recipe(name: \"c\", rewrites: [\n Rewrite(op: Cache(interval: 3)),\n Rewrite(select: Select(paths: [\"up_blocks.2.attentions.1.*.attn2\"]), op: Store()),\n])",
        2,
    )
    .unwrap();
    let g = c.segments[0].cached.as_ref().unwrap();
    assert!(g.outputs().iter().any(|(n, _)| n.starts_with("probs.")));
}

#[test]
fn deepcache_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let case = case();
    rewire_ok(&[
        "run",
        shapes_sd().to_str().unwrap(),
        "--recipe",
        root().join("rewrites/deepcache.ron").to_str().unwrap(),
        "--prompt",
        "a red circle on the left",
        "--steps",
        "20",
        "--guidance",
        "7.5",
        "--latents",
        case.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let img = image::open(&out).unwrap().to_rgb8();
    let want = expected(&case, "image");
    let mut worst = 0f32;
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            let w = want.data[i * 3 + c];
            worst = worst.max((p[c] as f32 / 255.0 - w).abs());
        }
    }
    println!("PNG vs DeepCache image: {worst}");
    assert!(worst <= 1.0 / 255.0 + 1e-3, "the PNG differs by {worst}");
    let (ok, stdout, _) = rewire(&[
        "explain",
        root().join("rewrites/deepcache.ron").to_str().unwrap(),
        "--model",
        shapes_sd().to_str().unwrap(),
        "--steps",
        "20",
    ]);
    assert!(ok);
    assert!(stdout.contains("steps 0, 3, 6, 9, 12, 15, 18"), "{stdout}");
    assert!(
        stdout.contains("cache.features [2, 64, 16, 16]: 128.0 KiB"),
        "{stdout}"
    );
    // The same facts for programs.
    let (ok, stdout, err) = rewire(&[
        "explain",
        root().join("rewrites/deepcache.ron").to_str().unwrap(),
        "--model",
        shapes_sd().to_str().unwrap(),
        "--steps",
        "20",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        v["cache_full_steps"],
        serde_json::json!([0, 3, 6, 9, 12, 15, 18])
    );
    assert_eq!(v["cache"]["resume"], "up_blocks.2.resnets.1");
    assert_eq!(v["state"][0]["name"], "cache.features");
    assert_eq!(v["state"][0]["bytes"], 2 * 64 * 16 * 16 * 4);
    assert!(v["segments"][0]["cached_steps"]["nodes"].as_u64().unwrap() < 60);
    // Hoisted: the full graph's 7 cross-attention layers' K and V, the cached graph's 1 layer's.
    assert_eq!(v["hoisted"][0]["values"].as_array().unwrap().len(), 14);
    assert_eq!(v["hoisted"][1]["values"].as_array().unwrap().len(), 2);
}

/// A Cache survives a plan file; a single forward refuses a cached step.
#[test]
fn deepcache_plan_and_forward() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let model = shapes_sd();
    let model = model.to_str().unwrap();
    let recipe = root().join("rewrites/deepcache.ron");
    let recipe = recipe.to_str().unwrap();
    rewire_ok(&[
        "compile",
        recipe,
        "--model",
        model,
        "--steps",
        "20",
        "-o",
        &p("dc.plan"),
    ]);
    let case = case();
    let run = |how: &[&str], out: &str| {
        let mut args = vec![
            "run",
            model,
            "--prompt",
            "a red circle on the left",
            "--steps",
            "20",
            "--latents",
            case.to_str().unwrap(),
        ];
        args.extend(how);
        args.extend(["-o", out]);
        rewire_ok(&args);
    };
    run(&["--plan", &p("dc.plan")], &p("plan.png"));
    run(&["--recipe", recipe], &p("recipe.png"));
    run(&[], &p("full.png"));
    let read = |f: &str| std::fs::read(p(f)).unwrap();
    assert_eq!(
        read("plan.png"),
        read("recipe.png"),
        "the plan runs the recipe"
    );
    assert_ne!(read("plan.png"), read("full.png"), "the plan caches");

    // A plan whose cache was edited is refused (the checksum covers it).
    let text = std::fs::read_to_string(p("dc.plan")).unwrap();
    assert!(text.contains("\"interval\": 3"));
    std::fs::write(
        p("edited.plan"),
        text.replace("\"interval\": 3", "\"interval\": 2"),
    )
    .unwrap();
    let (ok, _, err) = rewire(&[
        "run",
        model,
        "--prompt",
        "x",
        "--steps",
        "20",
        "--plan",
        &p("edited.plan"),
        "-o",
        &p("no.png"),
    ]);
    assert!(!ok && err.contains("edited.plan"), "{err}");
    assert!(!dir.path().join("no.png").exists());
}

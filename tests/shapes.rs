//! shapes-sd, the trained model rewire ships: each reference run of diffusers in
//! tests/fixtures/shapes_cases reproduced (images within 1e-3 as floats and within one level in
//! the PNG `rewire run` writes, `aggregate_cross_res8` within 1e-4), each rewrite changing the
//! picture, the README's main job drawing the colour it was asked for, and the word swap keeping
//! the layout.

mod common;
use common::*;
use rewire::exec::HostTensor;
use rewire::pipeline::{Pipeline, RunOptions, RunOutput};
use rewire::recipe::Source;
use std::path::{Path, PathBuf};

fn shapes_sd() -> PathBuf {
    root().join("models/shapes-sd")
}

fn scase(name: &str) -> PathBuf {
    root()
        .join("tests/fixtures/shapes_cases")
        .join(format!("{name}.safetensors"))
}

/// The settings every case was made with (manifest.json): DDIM, 20 steps, guidance 5.
fn case_opts(prompts: &[&str], latents: HostTensor) -> RunOptions {
    RunOptions {
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        negative: None,
        steps: 20,
        guidance: 5.0,
        scheduler: None,
        seed: 0,
        latents: Some(latents),
        ..Default::default()
    }
}

/// One `[H, W, 3]` image of a `[N, H, W, 3]` tensor.
fn item(t: &HostTensor, i: usize) -> HostTensor {
    let per: usize = t.shape[1..].iter().product();
    HostTensor::new(
        t.shape[1..].to_vec(),
        t.data[i * per..(i + 1) * per].to_vec(),
    )
}

/// Runs a case through the library; checks every image within 1e-3 of diffusers'.
fn library_case(name: &str, prompts: &[&str], recipe: Option<&str>) -> (RunOutput, RunOptions) {
    let path = scase(name);
    let pipe = Pipeline::open(&shapes_sd(), &device()).unwrap();
    let o = case_opts(prompts, expected(&path, "latents_in"));
    let src = recipe.map(|r| Source::load(&root().join("rewrites").join(r)).unwrap());
    let out = pipe.run(&o, src.as_ref(), |_, _| {}).unwrap();
    let want = expected(&path, "images");
    assert_eq!(out.images.len(), want.shape[0], "{name}: image count");
    for (i, got) in out.images.iter().enumerate() {
        let e = got.max_abs_diff(&item(&want, i));
        println!("{name} image {i}: {e:e}");
        assert!(e <= 1e-3, "{name}: image {i} differs by {e}");
    }
    (out, o)
}

/// The largest difference between two runs' images.
fn image_change(a: &RunOutput, b: &RunOutput) -> f32 {
    a.images
        .iter()
        .zip(&b.images)
        .map(|(x, y)| x.max_abs_diff(y))
        .fold(0.0, f32::max)
}

#[test]
fn txt2img_cases() {
    for (i, prompt) in [
        "a red circle on the left",
        "a blue square on the right",
        "a green triangle at the top",
    ]
    .iter()
    .enumerate()
    {
        library_case(&format!("txt2img_{i}"), &[prompt], None);
    }
}

#[test]
fn word_swap_red_blue() {
    let prompts = ["a red circle on the left", "a blue circle on the left"];
    let (swap, o) = library_case("word_swap_red_blue", &prompts, Some("p2p_word_swap.ron"));
    // Without the rewrite the target prompt draws something else.
    let pipe = Pipeline::open(&shapes_sd(), &device()).unwrap();
    let plain = pipe.run(&o, None, |_, _| {}).unwrap();
    let change = swap.images[1].max_abs_diff(&plain.images[1]);
    assert!(
        change > 0.05,
        "the word swap changed the target by only {change}"
    );
    // The source's own image is untouched by the replacement (it only reads the source's maps).
    assert!(swap.images[0].max_abs_diff(&plain.images[0]) <= 1e-5);
}

#[test]
fn reweight_red_x3() {
    let (rw, o) = library_case(
        "reweight_red_x3",
        &["a red circle"],
        Some("p2p_reweight_red.ron"),
    );
    let pipe = Pipeline::open(&shapes_sd(), &device()).unwrap();
    let plain = pipe.run(&o, None, |_, _| {}).unwrap();
    let change = image_change(&rw, &plain);
    assert!(
        change > 0.05,
        "the reweight changed the image by only {change}"
    );
}

#[test]
fn store_cross_res8() {
    let (out, _) = library_case(
        "store_cross_res8",
        &["a red circle on the left"],
        Some("p2p_store.ron"),
    );
    let got = &out.stores["aggregate_cross_res8"];
    let want = expected(&scase("store_cross_res8"), "aggregate_cross_res8");
    assert_eq!(got.shape, want.shape);
    let e = got.max_abs_diff(&want);
    println!("store_cross_res8 aggregate: {e:e}");
    assert!(e <= 1e-4, "aggregate_cross_res8 differs by {e}");
    // Not a constant map: the maps differ across the 8×8 positions.
    let spread = want.data.iter().fold(0f32, |m, x| m.max(*x))
        - want.data.iter().fold(1f32, |m, x| m.min(*x));
    assert!(spread > 1e-2);
}

fn read_png(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

#[test]
fn cli_reproduces_every_case() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str], Option<&str>); 6] = [
        ("txt2img_0", &["a red circle on the left"], None),
        ("txt2img_1", &["a blue square on the right"], None),
        ("txt2img_2", &["a green triangle at the top"], None),
        (
            "word_swap_red_blue",
            &["a red circle on the left", "a blue circle on the left"],
            Some("rewrites/p2p_word_swap.ron"),
        ),
        (
            "reweight_red_x3",
            &["a red circle"],
            Some("rewrites/p2p_reweight_red.ron"),
        ),
        (
            "store_cross_res8",
            &["a red circle on the left"],
            Some("rewrites/p2p_store.ron"),
        ),
    ];
    for (name, prompts, recipe) in cases {
        let case = scase(name);
        let out = dir.path().join(format!("{name}.png"));
        let mut args: Vec<&str> = vec!["run", "models/shapes-sd", "--steps", "20"];
        args.extend(["--guidance", "5", "--latents", case.to_str().unwrap()]);
        for p in prompts {
            args.extend(["--prompt", p]);
        }
        if let Some(r) = recipe {
            args.extend(["--recipe", r]);
        }
        args.extend(["-o", out.to_str().unwrap()]);
        rewire_ok(&args);
        let want = expected(&case, "images");
        for i in 0..prompts.len() {
            let png = if prompts.len() == 1 {
                out.clone()
            } else {
                dir.path().join(format!("{name}_{i}.png"))
            };
            let got = read_png(&png);
            let want = item(&want, i);
            let worst = got
                .as_raw()
                .iter()
                .zip(&want.data)
                .map(|(&g, &w)| (g as f32 - (w.clamp(0.0, 1.0) * 255.0).round()).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1.0, "{name}: PNG {i} is {worst} levels off");
        }
        if name == "store_cross_res8" {
            let store = dir.path().join("store_cross_res8.store.safetensors");
            let got = expected(&store, "aggregate_cross_res8");
            let e = got.max_abs_diff(&expected(&case, "aggregate_cross_res8"));
            assert!(e <= 1e-4, "store file: aggregate_cross_res8 differs by {e}");
            assert!(dir.path().join("store_cross_res8_heat.png").is_file());
        }
    }
}

/// Foreground: saturated pixels (the background is near-white, the shapes strongly coloured).
fn foreground(img: &image::RgbImage) -> Vec<bool> {
    img.pixels()
        .map(|p| {
            let (hi, lo) = (p.0.iter().max().unwrap(), p.0.iter().min().unwrap());
            hi - lo > 80
        })
        .collect()
}

/// Mean colour of the foreground in [0, 1], and the foreground's share of the image.
fn foreground_colour(img: &image::RgbImage) -> ([f32; 3], f32) {
    let fg = foreground(img);
    let n = fg.iter().filter(|&&f| f).count();
    let mut sum = [0f32; 3];
    for (p, _) in img.pixels().zip(&fg).filter(|(_, f)| **f) {
        for (s, v) in sum.iter_mut().zip(p.0) {
            *s += v as f32 / 255.0;
        }
    }
    let n1 = n.max(1) as f32;
    (
        [sum[0] / n1, sum[1] / n1, sum[2] / n1],
        n as f32 / fg.len() as f32,
    )
}

/// The README's main job (default steps, guidance and scheduler) for three seeds.
fn main_job_colour(prompt: &str, channel: usize) {
    let dir = tempfile::tempdir().unwrap();
    for seed in ["0", "1", "2"] {
        let out = dir.path().join(format!("out_{seed}.png"));
        let o = out.to_str().unwrap();
        rewire_ok(&[
            "run",
            "models/shapes-sd",
            "--prompt",
            prompt,
            "--seed",
            seed,
            "-o",
            o,
        ]);
        let (rgb, share) = foreground_colour(&read_png(&out));
        println!("{prompt:?} seed {seed}: foreground {share:.3}, mean colour {rgb:.2?}");
        assert!(share > 0.02, "{prompt:?} seed {seed}: no shape drawn");
        for c in (0..3).filter(|&c| c != channel) {
            assert!(
                rgb[channel] > rgb[c] + 0.3,
                "{prompt:?} seed {seed}: foreground colour {rgb:?} is not {}",
                ["red", "green", "blue"][channel]
            );
        }
    }
}

#[test]
fn main_job_draws_red() {
    main_job_colour("a red circle", 0);
}

#[test]
fn blue_square_is_blue() {
    main_job_colour("a blue square", 2);
}

#[test]
fn word_swap_keeps_the_layout() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("swap.png");
    rewire_ok(&[
        "run",
        "models/shapes-sd",
        "--recipe",
        "rewrites/p2p_word_swap.ron",
        "--prompt",
        "a red circle on the left",
        "--prompt",
        "a blue circle on the left",
        "--guidance",
        "5",
        "--latents",
        scase("word_swap_red_blue").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let a = read_png(&dir.path().join("swap_0.png"));
    let b = read_png(&dir.path().join("swap_1.png"));
    let (fa, fb) = (foreground(&a), foreground(&b));
    let inter = fa.iter().zip(&fb).filter(|(x, y)| **x && **y).count();
    let union = fa.iter().zip(&fb).filter(|(x, y)| **x || **y).count();
    let iou = inter as f32 / union.max(1) as f32;
    println!("word swap foreground IoU: {iou:.3}");
    assert!(iou >= 0.7, "the word swap moved the shapes: IoU {iou}");
    let (ca, _) = foreground_colour(&a);
    let (cb, _) = foreground_colour(&b);
    assert!(ca[0] > ca[2] + 0.3, "source is not red: {ca:?}");
    assert!(cb[2] > cb[0] + 0.3, "target is not blue: {cb:?}");
    for f in [
        "swap_0_heat.png",
        "swap_1_heat.png",
        "swap.store.safetensors",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
}

#[test]
fn run_with_a_plan_matches_the_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (swap_plan, red_plan) = (p("swap.plan"), p("red.plan"));
    rewire_ok(&[
        "compile",
        "rewrites/p2p_word_swap.ron",
        "--model",
        "models/shapes-sd",
        "--batch",
        "4",
        "--steps",
        "20",
        "-o",
        &swap_plan,
    ]);
    let two = [
        "--prompt",
        "a red circle on the left",
        "--prompt",
        "a blue circle on the left",
    ];
    let run = |how: &[&str], out: &str| {
        let mut args = vec!["run", "models/shapes-sd", "--seed", "3"];
        args.extend(how);
        args.extend(two);
        args.extend(["-o", out]);
        rewire_ok(&args);
    };
    run(&["--plan", &swap_plan], &p("plan.png"));
    run(
        &["--recipe", "rewrites/p2p_word_swap.ron"],
        &p("recipe.png"),
    );
    for f in ["_0.png", "_1.png", ".store.safetensors"] {
        let a = std::fs::read(p(&format!("plan{f}"))).unwrap();
        let b = std::fs::read(p(&format!("recipe{f}"))).unwrap();
        assert!(a == b, "plan{f} differs from recipe{f}");
    }
    // A plan for another batch or step count is refused, saying what to compile.
    let (ok, _, err) = rewire(&[
        "run",
        "models/shapes-sd",
        "--plan",
        &swap_plan,
        "--prompt",
        "a red circle",
        "-o",
        &p("x.png"),
    ]);
    assert!(
        !ok && err.contains("batch: 4") && err.contains("--batch 2"),
        "{err}"
    );
    let (ok, _, err) = rewire(&[
        "run",
        "models/shapes-sd",
        "--plan",
        &swap_plan,
        "--steps",
        "10",
        "--prompt",
        "a",
        "--prompt",
        "b",
        "-o",
        &p("x.png"),
    ]);
    assert!(
        !ok && err.contains("20 steps") && err.contains("--steps 10"),
        "{err}"
    );
    // Words are bound when compiling (--prompt); the run must end with that prompt.
    let (ok, _, err) = rewire(&[
        "compile",
        "rewrites/p2p_reweight_red.ron",
        "--model",
        "models/shapes-sd",
        "-o",
        &red_plan,
    ]);
    assert!(!ok && err.contains("p2p_reweight_red.ron:") && err.contains("compile --prompt"));
    rewire_ok(&[
        "compile",
        "rewrites/p2p_reweight_red.ron",
        "--model",
        "models/shapes-sd",
        "--prompt",
        "a red circle",
        "-o",
        &red_plan,
    ]);
    let (ok, _, err) = rewire(&[
        "run",
        "models/shapes-sd",
        "--plan",
        &red_plan,
        "--prompt",
        "a red square",
        "-o",
        &p("x.png"),
    ]);
    assert!(
        !ok && err.contains("bound to the prompt \"a red circle\""),
        "{err}"
    );
    assert!(
        !dir.path().join("x.png").exists(),
        "a refused run wrote its output"
    );
}

/// Image to image from a red circle drawn by the model: a little strength keeps the picture,
/// more strength with another colour repaints the shape where it was.
#[test]
fn image_to_image() {
    let pipe = Pipeline::open(&shapes_sd(), &device()).unwrap();
    let red = RunOptions {
        prompts: vec!["a red circle".into()],
        ..Default::default()
    };
    let init = pipe.run(&red, None, |_, _| {}).unwrap().images.remove(0);
    let img2img = |prompt: &str, strength: f32| {
        let o = RunOptions {
            prompts: vec![prompt.into()],
            init_image: Some(init.clone()),
            strength,
            seed: 5,
            ..Default::default()
        };
        let mut calls = 0;
        let out = pipe.run(&o, None, |_, _| calls += 1).unwrap();
        (out.images[0].clone(), calls)
    };
    let mean_abs = |a: &HostTensor, b: &HostTensor| {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .sum::<f32>()
            / a.data.len() as f32
    };
    let (near, calls) = img2img("a red circle", 0.15);
    assert_eq!(calls, 3, "strength 0.15 of 20 steps runs the last 3");
    let d = mean_abs(&near, &init);
    println!("strength 0.15: mean abs change {d:.4}");
    assert!(d < 0.03, "a light img2img moved the picture by {d}");
    assert!(d > 0.0, "img2img returned its input unchanged");

    let (blue, calls) = img2img("a blue circle", 0.6);
    assert_eq!(calls, 12);
    let to_rgb = |t: &HostTensor| rewire::picture::to_rgb(t).unwrap();
    let (a, b) = (to_rgb(&init), to_rgb(&blue));
    let (fa, fb) = (foreground(&a), foreground(&b));
    let inter = fa.iter().zip(&fb).filter(|(x, y)| **x && **y).count();
    let union = fa.iter().zip(&fb).filter(|(x, y)| **x || **y).count();
    let iou = inter as f32 / union.max(1) as f32;
    let (colour, _) = foreground_colour(&b);
    println!("strength 0.6, blue: IoU with the red input {iou:.3}, colour {colour:.2?}");
    assert!(
        colour[2] > colour[0] + 0.3,
        "not repainted blue: {colour:?}"
    );
    assert!(iou >= 0.5, "the shape moved: IoU {iou}");
}

#[test]
fn image_to_image_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let o = out.to_str().unwrap();
    let img = "docs/shapes/out.png";
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "models/shapes-sd", "--prompt", "x", "-o", o];
        args.extend(extra);
        rewire(&args)
    };
    let (ok, _, err) = run(&["--image", img, "--strength", "0.01"]);
    assert!(
        !ok && err.contains("runs no step") && err.contains("hint:"),
        "{err}"
    );
    let (ok, _, err) = run(&["--image", img, "--strength", "1.5"]);
    assert!(!ok && err.contains("outside (0, 1]"), "{err}");
    let (ok, _, err) = run(&["--image", img, "--size", "128x128"]);
    assert!(!ok && err.contains("the init image is 64×64"), "{err}");
    let (ok, _, err) = run(&["--image", "README.md"]);
    assert!(
        !ok && err.contains("README.md: cannot read the picture"),
        "{err}"
    );
    assert!(!out.exists());
}

/// PNDM runs one UNet call more than its steps; a recipe's step segments cover it.
#[test]
fn recipe_with_pndm_covers_every_unet_call() {
    let pipe = Pipeline::open(&shapes_sd(), &device()).unwrap();
    let o = RunOptions {
        prompts: vec!["a red circle".into(), "a blue circle".into()],
        steps: 6,
        scheduler: Some("pndm".into()),
        ..Default::default()
    };
    let src = Source::load(&root().join("rewrites/p2p_word_swap.ron")).unwrap();
    let c = pipe.compile(&o, &src).unwrap();
    assert_eq!(c.steps, Some(7));
    let out = pipe.run_compiled(&o, Some(&c), |_, _| {}).unwrap();
    assert_eq!(out.latents_per_step.len(), 7);
}

//! SDXL text-to-image on `models/tiny-sdxl` (random weights) against diffusers'
//! StableDiffusionXLPipeline (`tests/fixtures/sdxl_cases`, see the manifest's `sdxl_cases`):
//! tokenizer ids, both encoders' embeddings, pooled embeddings, time ids, the step-0 UNet call,
//! latents after every step and the image, through the library and through `rewire run`.

mod common;
use common::*;
use rewire::exec::{HostTensor, LowerOptions, Plan};
use rewire::pipeline::{Pipeline, RunOptions, SdxlOptions};
use std::path::{Path, PathBuf};

fn tiny_sdxl() -> PathBuf {
    root().join("models/tiny-sdxl")
}

fn scase(name: &str) -> PathBuf {
    root()
        .join("tests/fixtures/sdxl_cases")
        .join(format!("{name}.safetensors"))
}

/// Each case's pipeline call (manifest.json `sdxl_cases`), as rewire options.
struct Case {
    name: &'static str,
    opts: RunOptions,
    size: (usize, usize),
    cli: Vec<&'static str>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "sdxl_euler",
            opts: RunOptions {
                prompts: vec!["a photo of a cat".into()],
                steps: 5,
                guidance: 5.0,
                ..Default::default()
            },
            size: (128, 128),
            cli: vec![
                "--prompt",
                "a photo of a cat",
                "--steps",
                "5",
                "--guidance",
                "5",
                "--size",
                "128x128",
            ],
        },
        Case {
            name: "sdxl_prompt2_ddim",
            opts: RunOptions {
                prompts: vec!["a photo of a cat".into()],
                negative: Some("blurry".into()),
                sdxl: SdxlOptions {
                    prompts_2: vec!["an oil painting".into()],
                    negative_2: None,
                    // diffusers' original_size=(96, 160) is (height, width).
                    original_size: Some((160, 96)),
                    crop_top_left: (8, 16),
                    target_size: Some((128, 128)),
                },
                steps: 5,
                guidance: 7.0,
                scheduler: Some("ddim".into()),
                ..Default::default()
            },
            size: (128, 128),
            cli: vec![
                "--prompt",
                "a photo of a cat",
                "--prompt-2",
                "an oil painting",
                "--negative",
                "blurry",
                "--original-size",
                "160x96",
                "--crop-top-left",
                "8,16",
                "--target-size",
                "128x128",
                "--steps",
                "5",
                "--guidance",
                "7",
                "--scheduler",
                "ddim",
            ],
        },
        Case {
            name: "sdxl_nonsquare",
            opts: RunOptions {
                prompts: vec!["a red circle".into()],
                steps: 4,
                guidance: 5.0,
                size: Some((160, 96)),
                ..Default::default()
            },
            size: (160, 96),
            cli: vec![
                "--prompt",
                "a red circle",
                "--steps",
                "4",
                "--guidance",
                "5",
                "--size",
                "160x96",
            ],
        },
    ]
}

fn ids(path: &Path, name: &str) -> Vec<u32> {
    expected(path, name)
        .data
        .iter()
        .map(|&v| v as u32)
        .collect()
}

/// Tokenizer ids of both tokenizers (the second pads with "!", id 0).
#[test]
fn sdxl_tokenizers_match_diffusers() {
    let pipe = Pipeline::open(&tiny_sdxl(), &device()).unwrap();
    let second = pipe.second.as_ref().expect("tiny-sdxl has text_encoder_2");
    for c in cases() {
        let path = scase(c.name);
        let p = &c.opts.prompts[0];
        let p2 = c.opts.sdxl.prompts_2.first().unwrap_or(p);
        assert_eq!(
            pipe.tokenizer.encode(p),
            ids(&path, "input_ids"),
            "{}",
            c.name
        );
        assert_eq!(
            second.tokenizer.encode(p2),
            ids(&path, "input_ids_2"),
            "{}",
            c.name
        );
        if let Some(neg) = &c.opts.negative {
            assert_eq!(pipe.tokenizer.encode(neg), ids(&path, "negative_input_ids"));
            assert_eq!(
                second.tokenizer.encode(neg),
                ids(&path, "negative_input_ids_2")
            );
        }
    }
}

/// `encode_prompt`'s outputs and `add_time_ids`, then the step-0 UNet call on diffusers'
/// input, for every case.
#[test]
fn sdxl_conditioning_and_unet_match_diffusers() {
    let pipe = Pipeline::open(&tiny_sdxl(), &device()).unwrap();
    for c in cases() {
        let path = scase(c.name);
        let cond = pipe.conditioning(&c.opts, c.size).unwrap();
        let ehs = &cond.encoder_hidden_states;
        let (pooled, time_ids) = cond.text_time.as_ref().expect("SDXL conditioning");
        let half = |t: &HostTensor, i: usize| {
            let per = t.data.len() / 2;
            let mut shape = t.shape.clone();
            shape[0] = 1;
            HostTensor::new(shape, t.data[i * per..(i + 1) * per].to_vec())
        };
        for (got, name) in [
            (half(ehs, 0), "negative_prompt_embeds"),
            (half(ehs, 1), "prompt_embeds"),
            (half(pooled, 0), "negative_pooled_prompt_embeds"),
            (half(pooled, 1), "pooled_prompt_embeds"),
            (time_ids.clone(), "add_time_ids"),
        ] {
            let want = expected(&path, name);
            let e = got.max_abs_diff(&want);
            println!("{} {name}: {e:e}", c.name);
            assert!(e <= 1e-5, "{}: {name} differs by {e}", c.name);
        }
        if c.opts.negative.is_none() {
            assert!(
                half(ehs, 0).data.iter().all(|&v| v == 0.0),
                "force_zeros_for_empty_prompt: zero negatives"
            );
        }

        // The step-0 UNet call on diffusers' own input.
        let spec = pipe.unet_spec(&c.opts).unwrap();
        let graph = pipe.unet.graph(spec).unwrap();
        let plan = Plan::lower(
            &graph,
            &pipe.unet.weights,
            &device(),
            LowerOptions::default(),
        )
        .unwrap();
        let t0 = expected(&path, "timesteps").data[0];
        let mut inputs = std::collections::HashMap::new();
        inputs.insert("sample".into(), expected(&path, "step0_unet_sample"));
        inputs.insert("timestep".into(), HostTensor::new(vec![1], vec![t0]));
        inputs.insert("encoder_hidden_states".into(), ehs.clone());
        inputs.insert("text_embeds".into(), pooled.clone());
        inputs.insert("time_ids".into(), time_ids.clone());
        let out = plan.run_host(&inputs).unwrap().remove("out").unwrap();
        let e = out.max_abs_diff(&expected(&path, "step0_unet_out"));
        println!("{} step-0 UNet: {e:e}", c.name);
        assert!(e <= 1e-4, "{}: step-0 UNet output differs by {e}", c.name);
    }
}

/// The whole loop: latents after every step and the decoded image.
#[test]
fn sdxl_runs_match_diffusers() {
    let pipe = Pipeline::open(&tiny_sdxl(), &device()).unwrap();
    for c in cases() {
        let path = scase(c.name);
        let mut o = c.opts.clone();
        o.latents = Some(expected(&path, "latents_in"));
        let out = pipe.run(&o, None, |_, _| {}).unwrap();
        let want = expected(&path, "latents_per_step");
        let per = out.latents_per_step[0].data.len();
        assert_eq!(
            want.data.len() / per,
            out.latents_per_step.len(),
            "{}",
            c.name
        );
        for (i, got) in out.latents_per_step.iter().enumerate() {
            let w = HostTensor::new(
                got.shape.clone(),
                want.data[i * per..(i + 1) * per].to_vec(),
            );
            let e = got.max_abs_diff(&w);
            let scale = w.data.iter().fold(0f32, |m, x| m.max(x.abs()));
            println!("{} step {i}: {e:e} (max |latent| {scale})", c.name);
            assert!(e <= 1e-4, "{}: step {i} latents differ by {e}", c.name);
        }
        let e = out.images[0].max_abs_diff(&expected(&path, "image"));
        println!("{} image: {e:e}", c.name);
        assert!(e <= 1e-3, "{}: image differs by {e}", c.name);
    }
}

/// The same cases through `rewire run --latents CASE`: the PNG within one level of diffusers'
/// image.
#[test]
fn sdxl_cli_runs_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    for c in cases() {
        let path = scase(c.name);
        let out = dir.path().join(format!("{}.png", c.name));
        let mut args = vec!["run", "models/tiny-sdxl"];
        args.extend(c.cli.iter().copied());
        let (p, o) = (path.to_str().unwrap(), out.to_str().unwrap());
        args.extend(["--latents", p, "-o", o]);
        rewire_ok(&args);
        let png = image::open(&out).unwrap().to_rgb8();
        let want = expected(&path, "image");
        assert_eq!(
            [png.height() as usize, png.width() as usize, 3],
            want.shape[..]
        );
        let worst = png
            .as_raw()
            .iter()
            .zip(&want.data)
            .map(|(&g, &w)| (g as f32 - (w * 255.0).round()).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1.0, "{}: PNG differs by {worst} levels", c.name);
    }
}

/// prompt-to-prompt and tomesd recipes run on SDXL unchanged and change the picture.
#[test]
fn sdxl_recipes_run_and_change_the_picture() {
    let pipe = Pipeline::open(&tiny_sdxl(), &device()).unwrap();
    let path = scase("sdxl_euler");
    let base = RunOptions {
        prompts: vec!["a red circle on the left".into()],
        steps: 4,
        guidance: 5.0,
        latents: Some(expected(&path, "latents_in")),
        ..Default::default()
    };
    let swap = RunOptions {
        prompts: vec![
            "a red circle on the left".into(),
            "a blue circle on the left".into(),
        ],
        ..base.clone()
    };
    let plain = pipe.run(&swap, None, |_, _| {}).unwrap();
    let src = rewire::recipe::Source::load(&root().join("rewrites/p2p_word_swap.ron")).unwrap();
    let swapped = pipe.run(&swap, Some(&src), |_, _| {}).unwrap();
    let d = swapped.images[1].max_abs_diff(&plain.images[1]);
    println!("p2p_word_swap on tiny-sdxl: {d:e}");
    assert!(d > 1e-3, "the word swap changed nothing ({d})");
    // The source prompt's image is not rewritten.
    assert!(swapped.images[0].max_abs_diff(&plain.images[0]) <= 1e-5);
    assert!(
        swapped
            .stores
            .keys()
            .any(|k| k.starts_with("aggregate_cross_res")),
        "the recipe's store aggregated: {:?}",
        swapped.stores.keys().collect::<Vec<_>>()
    );

    // tomesd's default max_downsample=1 selects no SDXL layer (its first level has no
    // attention): tomesd would patch nothing; rewire says so at the recipe's line.
    let src = rewire::recipe::Source::load(&root().join("rewrites/tomesd_r05.ron")).unwrap();
    let err = pipe
        .run(&base, Some(&src), |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tomesd_r05.ron:10:") && err.contains("max_downsample"),
        "{err}"
    );
    let plain = pipe.run(&base, None, |_, _| {}).unwrap();
    let src = rewire::recipe::Source::load(&root().join("rewrites/tomesd_sdxl_r05.ron")).unwrap();
    let merged = pipe.run(&base, Some(&src), |_, _| {}).unwrap();
    let d = merged.images[0].max_abs_diff(&plain.images[0]);
    println!("tomesd_r05 on tiny-sdxl: {d:e}");
    assert!(d > 1e-3, "token merging changed nothing ({d})");
}

/// Words bind to the first tokenizer; a word the second prompt does not hold at the same
/// positions is refused at its recipe line.
#[test]
fn sdxl_words_must_agree_between_the_tokenizers() {
    let pipe = Pipeline::open(&tiny_sdxl(), &device()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("r.ron");
    std::fs::write(
        &recipe,
        "Recipe(\n  name: \"red\",\n  rewrites: [\n    Rewrite(\n      select: Select(kind: Some(Cross)),\n      op: Reweight(words: {\"red\": 2.0}),\n    ),\n  ],\n)\n",
    )
    .unwrap();
    let src = rewire::recipe::Source::load(&recipe).unwrap();
    let mut o = RunOptions {
        prompts: vec!["a red circle".into()],
        steps: 2,
        guidance: 5.0,
        ..Default::default()
    };
    pipe.compile(&o, &src).expect("the same prompt for both");
    o.sdxl.prompts_2 = vec!["a big red circle".into()];
    let Err(err) = pipe.compile(&o, &src) else {
        panic!("a word at other positions in the second prompt was accepted")
    };
    let err = err.to_string();
    assert!(
        err.contains("r.ron:6:") && err.contains("\"red\"") && err.contains("tokenizer_2"),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");
}

#[test]
fn sdxl_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let o = out.to_str().unwrap();
    // SDXL options on a pipeline with one text encoder.
    let (ok, _, err) = rewire(&[
        "run",
        "models/tiny-sd",
        "--prompt",
        "x",
        "--prompt-2",
        "y",
        "-o",
        o,
    ]);
    assert!(
        !ok && err.contains("--prompt-2 is for SDXL pipelines"),
        "{err}"
    );
    let (ok, _, err) = rewire(&[
        "run",
        "models/tiny-sdxl",
        "--prompt",
        "x",
        "--crop-top-left",
        "8x16",
        "-o",
        o,
    ]);
    assert!(
        !ok && err.contains("--crop-top-left 8x16: expected TOP,LEFT"),
        "{err}"
    );
    let (ok, _, err) = rewire(&[
        "run",
        "models/tiny-sdxl",
        "--prompt",
        "x",
        "--prompt",
        "y",
        "--prompt-2",
        "a",
        "--prompt-2",
        "b",
        "--prompt-2",
        "c",
        "-o",
        o,
    ]);
    assert!(
        !ok && err.contains("3 second prompts for 2 prompts"),
        "{err}"
    );
    assert!(!out.exists(), "a refused run wrote {o}");
}

/// `rewire inspect` on the SDXL pipeline folder lists the manifest's layers; the published
/// SDXL architecture has 140 attention layers.
#[test]
fn sdxl_inspect_lists_its_layers() {
    let (ok, out, err) = rewire(&["inspect", "models/tiny-sdxl", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let got: Vec<&str> = v["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap())
        .collect();
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/manifest.json")).unwrap(),
    )
    .unwrap();
    let want: Vec<&str> = manifest["tiny-sdxl"]["attention_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(got, want);

    use rewire::config::UNetConfig;
    let cfg_path = root().join("benches/configs/sdxl-unet.json");
    let resolved = UNetConfig::from_file(&cfg_path)
        .unwrap()
        .resolve(&cfg_path)
        .unwrap();
    let graph = rewire::unet::build(&resolved, rewire::graph::InputSpec::new(2, 128, 128)).unwrap();
    let layers = graph.attention_layers();
    assert_eq!(layers.len(), 140, "SDXL base has 140 attention layers");
    assert_eq!(
        layers[0].1, "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "the first attention layer"
    );
    let deep = layers
        .iter()
        .filter(|(_, p, _)| p.starts_with("down_blocks.2.attentions.0."))
        .count();
    assert_eq!(deep, 20, "10 transformer blocks × (attn1, attn2)");
}

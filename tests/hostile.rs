//! Hostile input (issue 14): forged configs, plans and weights, endless files, bad output paths,
//! NaN and Inf. One test per class of input; each asserts a clean error that names the file, the
//! field (or tensor, node, line:col) and the limit, never a panic (the CLI runner fails the test
//! on "panicked").

mod common;
use common::*;
use rewire::compile::plan_file::PlanFile;
use rewire::compile::{CompileOptions, compile_graph};
use rewire::graph::InputSpec;
use rewire::recipe::Source;
use rewire::unet::UNet;
use std::path::{Path, PathBuf};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A copy of tiny-sd in `dir`: JSON files copied (to be edited), everything else linked.
fn copy_model(dir: &Path) -> PathBuf {
    let src = tiny_sd();
    let dst = dir.join("model");
    for entry in walk(&src) {
        let rel = entry.strip_prefix(&src).unwrap();
        let to = dst.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        if entry.extension().is_some_and(|e| e == "json") {
            std::fs::copy(&entry, &to).unwrap();
        } else {
            std::os::unix::fs::symlink(&entry, &to).unwrap();
        }
    }
    dst
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Sets `field` of a JSON file to a raw JSON value.
fn set_json(path: &Path, field: &str, raw: &str) {
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v.insert(field.into(), serde_json::from_str(raw).unwrap());
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn forged_unet_configs_are_errors_naming_field_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    let cfg = model.join("unet/config.json");
    let original = std::fs::read_to_string(&cfg).unwrap();
    for (field, raw, want) in [
        ("layers_per_block", "1000000000", "MAX_LAYERS_PER_BLOCK"),
        (
            "transformer_layers_per_block",
            "1000000000",
            "MAX_TRANSFORMER_LAYERS",
        ),
        ("block_out_channels", "[32, 64, 64000000]", "MAX_CHANNELS"),
        ("norm_eps", "-1e-5", "finite number > 0"),
        ("layers_per_block", "0", "at least one resnet"),
        ("conv_in_kernel", "1001", "MAX_KERNEL"),
        // Fewer layers than the weights hold.
        ("layers_per_block", "1", "does not build"),
    ] {
        std::fs::write(&cfg, &original).unwrap();
        set_json(&cfg, field, raw);
        let (ok, _, err) = rewire(&["inspect", s(&model)]);
        assert!(!ok, "{field}: {raw} accepted");
        assert!(
            err.contains("config.json") && err.contains(field) && err.contains(want),
            "{field}: {raw}: {err}"
        );
    }
}

#[test]
fn forged_vae_configs_are_errors_naming_field_and_limit() {
    use rewire::vae::VaeConfig;
    let path = tiny_sd().join("vae/config.json");
    let original: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (field, raw, want) in [
        ("layers_per_block", "1000000000", "MAX_LAYERS_PER_BLOCK"),
        ("block_out_channels", "[32, 64000000]", "MAX_CHANNELS"),
    ] {
        let mut v = original.clone();
        v.insert(field.into(), serde_json::from_str(raw).unwrap());
        if field == "block_out_channels" {
            for t in ["down_block_types", "up_block_types"] {
                let first = v[t][0].clone();
                v.insert(t.into(), serde_json::json!([first.clone(), first]));
            }
        }
        let text = serde_json::to_string(&v).unwrap();
        let e = VaeConfig::from_json(&text, &path)
            .and_then(|c| c.validate(&path))
            .expect_err("accepted")
            .to_string();
        assert!(
            e.contains("vae/config.json") && e.contains(field) && e.contains(want),
            "{field}: {e}"
        );
    }
}

#[test]
fn forged_scheduler_configs_are_errors() {
    use rewire::scheduler::{Scheduler, SchedulerConfig};
    let path = tiny_sd().join("scheduler/scheduler_config.json");
    let original = std::fs::read_to_string(&path).unwrap();
    let with = |field: &str, raw: &str| {
        let mut v: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&original).unwrap();
        v.insert(field.into(), serde_json::from_str(raw).unwrap());
        serde_json::to_string(&v).unwrap()
    };
    let err = |text: String, steps: usize| -> String {
        let r = SchedulerConfig::from_json(&text, &path)
            .and_then(|c| Scheduler::from_config(&c))
            .and_then(|mut s| s.set_timesteps(steps).and_then(|()| s.check_schedule()));
        r.expect_err("accepted").to_string()
    };
    let e = err(with("steps_offset", "1000000000"), 2);
    assert!(
        e.contains("scheduler_config.json") && e.contains("steps_offset") && e.contains("0..1000"),
        "{e}"
    );
    let e = err(with("num_train_timesteps", "1000000000000"), 2);
    assert!(
        e.contains("num_train_timesteps") && e.contains("MAX_TRAIN_TIMESTEPS"),
        "{e}"
    );
    let e = err(with("beta_end", "1.5"), 2);
    assert!(e.contains("beta_end") && e.contains("[0, 1)"), "{e}");
    // steps_offset 1 with as many steps as training timesteps runs past the schedule's end.
    let e = err(original.clone(), 1000);
    assert!(e.contains("steps_offset"), "{e}");

    // The same through `rewire run`.
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    set_json(
        &model.join("scheduler/scheduler_config.json"),
        "steps_offset",
        "1000000000",
    );
    let out = dir.path().join("x.png");
    let (ok, _, err) = rewire(&[
        "run",
        s(&model),
        "--prompt",
        "x",
        "--steps",
        "2",
        "-o",
        s(&out),
    ]);
    assert!(
        !ok && err.contains("steps_offset") && err.contains("hint:"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn sizes_and_batches_above_the_limits_are_errors_before_allocating() {
    let (ok, _, err) = rewire(&[
        "check",
        "rewrites/reweight.ron",
        "--model",
        "models/tiny-sd",
        "--batch",
        "1000000000",
    ]);
    assert!(
        !ok && err.contains("batch") && err.contains("MAX_BATCH"),
        "{err}"
    );
    let (ok, _, err) = rewire(&["inspect", "models/tiny-sd", "--size", "100000x100000"]);
    assert!(!ok && err.contains("MAX_LATENT_SIDE"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let (ok, _, err) = rewire(&[
        "run",
        "models/tiny-sd",
        "--prompt",
        "x",
        "--size",
        "100000x100000",
        "-o",
        s(&out),
    ]);
    assert!(
        !ok && err.contains("--size") && err.contains("MAX_LATENT"),
        "{err}"
    );
    for g in ["NaN", "inf"] {
        let (ok, _, err) = rewire(&[
            "run",
            "models/tiny-sd",
            "--prompt",
            "x",
            "--guidance",
            g,
            "-o",
            s(&out),
        ]);
        assert!(!ok && err.contains("--guidance"), "{g}: {err}");
    }
}

#[test]
fn endless_and_non_utf8_recipes_are_located_errors() {
    let (ok, _, err) = rewire(&["check", "/dev/zero", "--model", "models/tiny-sd"]);
    assert!(
        !ok && err.contains("/dev/zero") && err.contains("MAX_RECIPE_BYTES"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("bad.ron");
    std::fs::write(&r, b"Recipe(\n  name: \"a\xffb\",\n)\n").unwrap();
    let (ok, _, err) = rewire(&["check", s(&r), "--model", "models/tiny-sd"]);
    assert!(
        !ok && err.contains("bad.ron:2:11") && err.contains("UTF-8"),
        "{err}"
    );
    let (ok, _, err) = rewire(&[
        "forward",
        "models/tiny-sd",
        "--plan",
        "/dev/zero",
        "--inputs",
        s(&case("baseline")),
        "--out",
        s(&dir.path().join("o.safetensors")),
    ]);
    assert!(!ok && err.contains("MAX_PLAN_BYTES"), "{err}");
}

#[test]
fn recipe_limits_and_weights() {
    let unet = UNet::open(&tiny_sd()).unwrap();
    let base = unet.graph(InputSpec::new(2, 16, 16)).unwrap();
    let err = |text: &str| -> String {
        match Source::parse(text, Path::new("r.ron")) {
            Err(e) => e.to_string(),
            Ok(src) => match compile_graph(&src, &base, &CompileOptions::default()) {
                Ok(_) => panic!("accepted: {text}"),
                Err(e) => e.to_string(),
            },
        }
    };
    let one = |op: &str| {
        format!(
            "Recipe(name: \"t\", rewrites: [Rewrite(select: Select(kind: Some(Cross)), op: {op})])"
        )
    };
    let e = err(&one("Reweight(words: {\"\": 2.0})"));
    assert!(e.starts_with("r.ron:1:") && e.contains("empty"), "{e}");
    let e = err(&one("Reweight(tokens: {2: 3.4e38})"));
    assert!(
        e.starts_with("r.ron:1:") && e.contains("MAX_REWEIGHT"),
        "{e}"
    );
    let many = vec!["Rewrite(op: Store())"; rewire::limits::MAX_REWRITES + 1].join(",");
    let e = err(&format!("Recipe(name: \"t\", rewrites: [{many}])"));
    assert!(e.contains("MAX_REWRITES") && e.contains("hint:"), "{e}");
}

/// A plan compiled for tiny-sd, as JSON.
fn plan_json(unet: &UNet, base: &rewire::graph::Graph) -> serde_json::Value {
    let src = Source::load(&root().join("rewrites/reweight.ron")).unwrap();
    let c = compile_graph(&src, base, &CompileOptions::default()).unwrap();
    let p = PlanFile::new(&c, unet.fingerprint(), src.fingerprint());
    serde_json::to_value(&p).unwrap()
}

/// Recomputes a plan's checksum as anyone can (SHA-256 of its JSON with an empty checksum).
fn reseal(mut v: serde_json::Value) -> Vec<u8> {
    use sha2::Digest;
    v["checksum"] = "".into();
    let typed: PlanFile = serde_json::from_value(v.clone()).unwrap();
    let sum = format!(
        "{:x}",
        sha2::Sha256::digest(serde_json::to_vec(&typed).unwrap())
    );
    v["checksum"] = sum.into();
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn forged_resealed_plans_are_refused_with_the_node_and_field() {
    let unet = UNet::open(&tiny_sd()).unwrap();
    let base = unet.graph(InputSpec::new(2, 16, 16)).unwrap();
    let fp = unet.fingerprint();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.plan");
    let load = |v: serde_json::Value| -> Result<(), String> {
        std::fs::write(&path, reseal(v)).unwrap();
        let p = PlanFile::load(&path, &fp).map_err(|e| e.to_string())?;
        p.compiled(&path, &base)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let good = plan_json(&unet, &base);
    load(good.clone()).expect("the resealed original loads");
    // Edits to the first node carrying `op.<kind>.<field>`.
    let forge = |kind: &str, field: &str, value: serde_json::Value| {
        let mut v = good.clone();
        let nodes = v["segments"][0]["nodes"].as_array_mut().unwrap();
        let n = nodes
            .iter_mut()
            .find(|n| n["op"].get(kind).is_some())
            .unwrap_or_else(|| panic!("no {kind} node"));
        n["op"][kind][field] = value;
        v
    };
    for (kind, field, value, want) in [
        ("Conv2d", "stride", 0.into(), "stride = 0"),
        ("GroupNorm", "groups", 0.into(), "groups"),
        ("Resnet", "groups", 0.into(), "groups"),
        ("GroupNorm", "eps", (-1.0).into(), "eps = -1"),
        ("Attention", "heads", 2.into(), "heads"),
        (
            "Upsample",
            "height",
            1_000_000_000.into(),
            "MAX_TENSOR_ELEMENTS",
        ),
    ] {
        let e = load(forge(kind, field, value)).expect_err(&format!("{kind}.{field} accepted"));
        assert!(
            e.contains("x.plan") && e.contains(want),
            "{kind}.{field}: {e}"
        );
    }
    let mut v = good.clone();
    v["format"] = 99.into();
    let e = load(v).unwrap_err();
    assert!(e.contains("`format` is 99"), "{e}");
    let mut v = good.clone();
    v["spec"]["batch"] = 1_000_000_000.into();
    let e = load(v).unwrap_err();
    assert!(e.contains("MAX_BATCH"), "{e}");
}

/// A safetensors file with `header` as its JSON header and `data` after it.
fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

#[test]
fn shards_stay_inside_the_folder_and_headers_have_unique_keys() {
    use rewire::weights::TensorFiles;
    let dir = tempfile::tempdir().unwrap();
    let unet = dir.path().join("unet");
    std::fs::create_dir_all(&unet).unwrap();
    let outside = dir.path().join("outside.safetensors");
    rewire::weights::write_f32(&outside, &[("a".into(), vec![1], vec![1.0])]).unwrap();
    let index = unet.join("diffusion_pytorch_model.safetensors.index.json");
    for file in [
        "../outside.safetensors".to_string(),
        s(&outside).to_string(),
        "".to_string(),
    ] {
        std::fs::write(
            &index,
            serde_json::json!({"weight_map": {"a": file}}).to_string(),
        )
        .unwrap();
        let e = TensorFiles::open_index(&index).unwrap_err().to_string();
        assert!(
            e.contains("outside the model folder") && e.contains("index.json"),
            "{file}: {e}"
        );
    }
    // A link inside the folder pointing out of it.
    std::os::unix::fs::symlink(&outside, unet.join("link.safetensors")).unwrap();
    std::fs::write(
        &index,
        serde_json::json!({"weight_map": {"a": "link.safetensors"}}).to_string(),
    )
    .unwrap();
    let e = TensorFiles::open_index(&index).unwrap_err().to_string();
    assert!(e.contains("outside the model folder"), "{e}");

    let dup = dir.path().join("dup.safetensors");
    std::fs::write(
        &dup,
        raw_safetensors(
            r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            &[0; 8],
        ),
    )
    .unwrap();
    let e = TensorFiles::open(&dup).unwrap_err().to_string();
    assert!(
        e.contains("dup.safetensors") && e.contains("`x` twice"),
        "{e}"
    );
}

#[test]
fn non_finite_tensors_are_errors_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    // Inputs: a NaN in `sample`.
    let f = rewire::weights::TensorFiles::open(&case("baseline")).unwrap();
    let mut tensors = Vec::new();
    for name in ["sample", "timestep", "encoder_hidden_states"] {
        let (shape, mut data) = f.read_f32(name).unwrap();
        if name == "sample" {
            data[5] = f32::NAN;
        }
        tensors.push((name.to_string(), shape, data));
    }
    let inputs = dir.path().join("in.safetensors");
    rewire::weights::write_f32(&inputs, &tensors).unwrap();
    let (ok, _, err) = rewire(&[
        "forward",
        "models/tiny-sd",
        "--inputs",
        s(&inputs),
        "--out",
        s(&dir.path().join("o.safetensors")),
    ]);
    assert!(
        !ok && err.contains("`sample`") && err.contains("in.safetensors") && err.contains("NaN"),
        "{err}"
    );
    // --latents with an Inf.
    let lat = dir.path().join("lat.safetensors");
    rewire::weights::write_f32(
        &lat,
        &[("latents".into(), vec![1, 4, 2, 2], {
            let mut v = vec![0.0; 16];
            v[3] = f32::INFINITY;
            v
        })],
    )
    .unwrap();
    let (ok, _, err) = rewire(&[
        "run",
        "models/tiny-sd",
        "--prompt",
        "x",
        "--latents",
        s(&lat),
        "-o",
        s(&dir.path().join("x.png")),
    ]);
    assert!(
        !ok && err.contains("`latents`") && err.contains("inf"),
        "{err}"
    );
}

/// Weights with NaN in one tensor (what a diverged checkpoint has), read through the trait so
/// that the file-level check does not see them: the executor must name the node.
struct Poisoned<'a> {
    inner: &'a dyn rewire::weights::WeightSource,
    tensor: &'a str,
}

impl rewire::weights::WeightSource for Poisoned<'_> {
    fn origin(&self) -> &Path {
        self.inner.origin()
    }
    fn check(&self, name: &str, shape: &[usize]) -> Result<(), rewire::weights::WeightError> {
        self.inner.check(name, shape)
    }
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, rewire::weights::WeightError> {
        let mut v = self.inner.read(name, shape)?;
        if name == self.tensor {
            v.iter_mut().for_each(|x| *x = f32::NAN);
        }
        Ok(v)
    }
}

#[test]
fn a_nan_inside_the_unet_names_the_first_node_that_made_it() {
    use rewire::exec::{ExecError, FiniteCheck, LowerOptions, Plan};
    let unet = UNet::open(&tiny_sd()).unwrap();
    let inputs = rewire::io::read_forward_inputs(&case("baseline")).unwrap();
    let graph = unet.graph(inputs.spec).unwrap();
    let layer = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q";
    let w = Poisoned {
        inner: &unet.weights,
        tensor: &format!("{layer}.weight"),
    };
    for check in [FiniteCheck::Boundaries, FiniteCheck::EveryNode] {
        let mut plan = Plan::lower(&graph, &w, &device(), LowerOptions::default()).unwrap();
        plan.set_finite_check(check);
        match plan.run_host(&inputs.tensors) {
            Err(e @ ExecError::NonFinite { .. }) => {
                let m = e.to_string();
                assert!(
                    m.contains(layer) && m.contains("(linear)"),
                    "{check:?}: {m}"
                );
            }
            other => panic!("{check:?}: {other:?}"),
        }
    }
    // Unchecked, the NaN still reaches the output: attention does not turn it into numbers.
    let mut plan = Plan::lower(&graph, &w, &device(), LowerOptions::default()).unwrap();
    plan.set_finite_check(FiniteCheck::Off);
    let out = plan
        .run_host(&inputs.tensors)
        .unwrap()
        .remove("out")
        .unwrap();
    assert!(
        out.data.iter().all(|x| x.is_nan()),
        "a NaN query came out finite"
    );
}

#[test]
fn outputs_refuse_devices_directories_links_and_other_extensions() {
    let dir = tempfile::tempdir().unwrap();
    let compile_to = |o: &Path| {
        rewire(&[
            "compile",
            "rewrites/reweight.ron",
            "--model",
            "models/tiny-sd",
            "-o",
            s(o),
        ])
    };
    // A directory.
    let (ok, _, err) = compile_to(dir.path());
    assert!(
        !ok && err.contains("a directory, not a regular file"),
        "{err}"
    );
    // A symbolic link: refused, and left a link.
    let target = dir.path().join("target.plan");
    std::fs::write(&target, "keep").unwrap();
    let link = dir.path().join("link.plan");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let (ok, _, err) = compile_to(&link);
    assert!(!ok && err.contains("symbolic link"), "{err}");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    // A FIFO (made by mkfifo, where there is one).
    let fifo = dir.path().join("fifo.plan");
    if std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success())
    {
        let (ok, _, err) = compile_to(&fifo);
        assert!(!ok && err.contains("device, FIFO or socket"), "{err}");
        assert!(!std::fs::metadata(&fifo).unwrap().is_file());
    }
    // A device.
    let (ok, _, err) = compile_to(Path::new("/dev/null"));
    assert!(!ok && err.contains("device, FIFO or socket"), "{err}");
    // `run -o out.jpg`: an error before the run, nothing written.
    let jpg = dir.path().join("out.jpg");
    let (ok, _, err) = rewire(&["run", "models/tiny-sd", "--prompt", "x", "-o", s(&jpg)]);
    assert!(!ok && err.contains("PNG") && err.contains("hint:"), "{err}");
    assert!(!jpg.exists());
}

#[test]
fn a_run_writes_all_its_outputs_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("swap.png");
    // The second image's name is taken by a directory: the run fails, and the first image is
    // not left behind (nor any temporary file).
    std::fs::create_dir(dir.path().join("swap_1.png")).unwrap();
    let (ok, _, err) = rewire(&[
        "run",
        "models/tiny-sd",
        "--prompt",
        "a red circle",
        "--prompt",
        "a blue circle",
        "--steps",
        "2",
        "-o",
        s(&out),
    ]);
    assert!(!ok && err.contains("swap_1.png"), "{err}");
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        vec!["swap_1.png".to_string()],
        "left behind: {left:?}"
    );
    // Without the obstacle, both images are written.
    std::fs::remove_dir(dir.path().join("swap_1.png")).unwrap();
    rewire_ok(&[
        "run",
        "models/tiny-sd",
        "--prompt",
        "a red circle",
        "--prompt",
        "a blue circle",
        "--steps",
        "2",
        "-o",
        s(&out),
    ]);
    assert!(dir.path().join("swap_0.png").is_file() && dir.path().join("swap_1.png").is_file());
}

#[test]
fn check_finite_flag_and_suspicious_values_warn() {
    let dir = tempfile::tempdir().unwrap();
    // --check-finite on sound inputs: every node checked, the output as without it.
    let out = dir.path().join("o.safetensors");
    let (ok, _, err) = rewire(&[
        "forward",
        "models/tiny-sd",
        "--check-finite",
        "--inputs",
        s(&case("baseline")),
        "--out",
        s(&out),
    ]);
    assert!(ok, "{err}");
    assert!(expected(&out, "out").max_abs_diff(&expected(&case("baseline"), "out")) <= 1e-4);
    // A legal but suspicious guidance runs, with a warning.
    let png = dir.path().join("g.png");
    let (ok, _, err) = rewire(&[
        "run",
        "models/tiny-sd",
        "--prompt",
        "x",
        "--steps",
        "1",
        "--guidance",
        "5000",
        "-o",
        s(&png),
    ]);
    assert!(err.contains("warning: --guidance 5000"), "{err}");
    // Either it ran, or an overflow was caught and named; never a silent NaN picture.
    assert!(
        ok || err.contains("non-finite") || err.contains("holds"),
        "{err}"
    );
}

/// Tokenizer and text encoder configs that disagree with each other or with their weights, and
/// prompts longer than the encoder reads.
#[test]
fn forged_text_configs_and_long_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let run = |model: &Path, prompt: &str| {
        rewire(&[
            "run",
            s(model),
            "--prompt",
            prompt,
            "--steps",
            "1",
            "-o",
            s(&out),
        ])
    };
    // Each forged field, in a copy of tiny-sd: the error names these words (and a hint).
    let cases: [(&str, &str, &str, &[&str]); 3] = [
        // model_max_length above max_position_embeddings: refused when the pipeline opens.
        (
            "tokenizer/tokenizer_config.json",
            "model_max_length",
            "1000000",
            &[
                "tokenizer_config.json",
                "model_max_length",
                "max_position_embeddings = 77",
                "hint:",
            ],
        ),
        // num_hidden_layers below the layers the weights hold.
        (
            "text_encoder/config.json",
            "num_hidden_layers",
            "0",
            &["num_hidden_layers", "encoder.layers.0", "hint:"],
        ),
        // An end token outside the vocabulary.
        (
            "text_encoder/config.json",
            "eos_token_id",
            "1000000",
            &["eos_token_id", "vocab_size", "hint:"],
        ),
    ];
    for (i, (file, field, value, words)) in cases.into_iter().enumerate() {
        let m = copy_model(&dir.path().join(format!("m{i}")));
        set_json(&m.join(file), field, value);
        let (ok, _, err) = run(&m, "a cat");
        assert!(!ok, "{field} = {value} was accepted");
        for w in words {
            assert!(err.contains(w), "{field} = {value}: no {w:?} in {err}");
        }
    }
    assert!(!out.exists());
    // A prompt past 77 tokens runs, with a warning that names what was cut.
    let long = format!("{} the end", "word ".repeat(10_000));
    let (ok, _, err) = run(&tiny_sd(), &long);
    assert!(ok, "{err}");
    assert!(
        err.contains("warning: the prompt has 10004 tokens, the text encoder reads 77")
            && err.contains("cut off: \"word word"),
        "{err}"
    );
}

//! The `rewire` binary: inspect, graph, forward, and its errors on bad input.

mod common;
use common::*;

#[test]
fn inspect_json_lists_exactly_the_manifest_layers() {
    let (ok, out, err) = rewire(&["inspect", "models/tiny-sd", "--json"]);
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
    let want: Vec<&str> = manifest["attention_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(got, want, "same layers in diffusers' attn_processors order");
    let first = &v["attention"][0];
    assert_eq!(first["kind"], "self");
    assert_eq!(first["place"], "down");
    assert_eq!(first["heads"], 8);
    assert_eq!(first["queries"], 256);
    assert_eq!(first["keys"], 256);
    assert_eq!(v["attention"][1]["keys"], 77);
}

#[test]
fn inspect_table_and_graph_formats() {
    let (ok, out, err) = rewire(&[
        "inspect",
        "models/tiny-sd",
        "--size",
        "32x16",
        "--batch",
        "1",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("down_blocks.0.attentions.0.transformer_blocks.0.attn1"));
    assert!(
        out.contains("512×512"),
        "32×16 latent: 512 queries at full resolution\n{out}"
    );
    for fmt in ["text", "dot", "json"] {
        let (ok, out, err) = rewire(&["graph", "models/tiny-sd", "--format", fmt]);
        assert!(ok, "{fmt}: {err}");
        assert!(
            out.contains("mid_block.attentions.0.transformer_blocks.0.attn2"),
            "{fmt}"
        );
    }
}

#[test]
fn forward_matches_the_fixtures() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["baseline", "baseline_nonsquare_t37"] {
        let out = dir.path().join(format!("{name}.safetensors"));
        let case_path = case(name);
        let (ok, _, err) = rewire(&[
            "forward",
            "models/tiny-sd",
            "--inputs",
            case_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        let got = expected(&out, "out");
        let want = expected(&case_path, "out");
        let e = got.max_abs_diff(&want);
        assert!(e <= 1e-4, "{name}: {e}");
    }
}

#[test]
fn bad_inputs_give_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let o = out.to_str().unwrap();
    let base = case("baseline");
    let b = base.to_str().unwrap();
    let (ok, _, err) = rewire(&["forward", "models/nothing-here", "--inputs", b, "--out", o]);
    assert!(
        !ok && err.contains("is not a diffusers UNet folder"),
        "{err}"
    );
    let (ok, _, err) = rewire(&[
        "forward",
        "models/tiny-sd",
        "--inputs",
        "Cargo.toml",
        "--out",
        o,
    ]);
    assert!(
        !ok && err.contains("Cargo.toml is not a valid safetensors file"),
        "{err}"
    );
    let (ok, _, err) = rewire(&["inspect", "models/tiny-sd", "--size", "16by16"]);
    assert!(!ok && err.contains("expected HxW"), "{err}");
    let (ok, _, err) = rewire(&[
        "forward",
        "models/tiny-sd",
        "--inputs",
        b,
        "--out",
        o,
        "--device",
        "tpu",
    ]);
    assert!(!ok && err.contains("unknown device `tpu`"), "{err}");
    if !cfg!(feature = "cuda") {
        let (ok, _, err) = rewire(&[
            "forward",
            "models/tiny-sd",
            "--inputs",
            b,
            "--out",
            o,
            "--device",
            "cuda",
        ]);
        assert!(!ok && err.contains("--features cuda"), "{err}");
    }
    let (ok, _, err) = rewire(&["inspect", "models/tiny-sd", "--size", "0x16"]);
    assert!(!ok && err.contains("sizes must be positive"), "{err}");
    assert!(!out.exists(), "no output written on failure");
}

#[test]
fn profile_times_every_node_as_table_and_json() {
    let (ok, out, err) = rewire(&["profile", "models/tiny-sd", "--json", "--runs", "2"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["runs"], 2);
    let nodes = v["nodes"].as_array().unwrap();
    let graph: serde_json::Value = {
        let (ok, out, err) = rewire(&["graph", "models/tiny-sd", "--format", "json"]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    // Every computed node is timed: the graph's nodes (all of which an output needs) but its
    // inputs.
    let computed = graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["op"] != "input")
        .count();
    assert_eq!(nodes.len(), computed);
    let ops: Vec<&str> = v["by_op"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["op"].as_str().unwrap())
        .collect();
    for op in ["attention", "resnet", "conv2d", "linear"] {
        assert!(ops.contains(&op), "{op} missing from {ops:?}");
    }
    let total = v["seconds"].as_f64().unwrap();
    let summed: f64 = nodes.iter().map(|n| n["seconds"].as_f64().unwrap()).sum();
    assert!(
        total > 0.0 && summed <= total * 1.001,
        "{summed} of {total}"
    );
    let attn = &v["by_op"].as_array().unwrap()[ops.iter().position(|o| *o == "attention").unwrap()];
    assert!(attn["flops"].as_u64().unwrap() > 0);

    // A config file runs with random weights; the table names ops and the slowest nodes.
    let (ok, out, err) = rewire(&[
        "profile",
        "models/tiny-sd/unet/config.json",
        "--size",
        "8x8",
        "--batch",
        "1",
        "--top",
        "3",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("GFLOP/s") && out.contains("slowest nodes:"),
        "{out}"
    );
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("  ") && l.contains(" s  "))
            .count(),
        3
    );
    let (ok, _, err) = rewire(&["profile", "models/tiny-sd", "--runs", "0"]);
    assert!(!ok && err.contains("--runs must be at least 1"), "{err}");
}

/// `check`/`explain`/`diff`/`compile` size the batch from `--prompt` as `run` does, and a
/// recipe that needs a larger batch says which `--batch` or how many prompts.
#[test]
fn prompts_size_the_batch_of_check_explain_diff_compile() {
    let recipe = "rewrites/p2p_word_swap.ron";
    let (ok, _, err) = rewire(&[
        "explain",
        recipe,
        "--model",
        "models/shapes-sd",
        "--steps",
        "20",
    ]);
    assert!(!ok);
    assert!(
        err.contains("BatchItem(2) is outside the batch of 2")
            && err.contains("give 2 prompts")
            && err.contains("--batch 4"),
        "{err}"
    );
    let two = [
        "--prompt",
        "a red circle on the left",
        "--prompt",
        "a blue circle on the left",
    ];
    for cmd in ["check", "explain", "diff"] {
        let mut args = vec![cmd, recipe, "--model", "models/shapes-sd", "--steps", "20"];
        args.extend(two);
        let (ok, out, err) = rewire(&args);
        assert!(ok, "{cmd}: {err}");
        assert!(!out.is_empty(), "{cmd} printed nothing");
    }
    let (ok, _, err) = rewire(&[
        "check",
        recipe,
        "--model",
        "models/shapes-sd",
        "--steps",
        "20",
        "--batch",
        "2",
        "--prompt",
        "a red circle",
        "--prompt",
        "a blue circle",
    ]);
    assert!(
        !ok && err.contains("--batch 2 and 2 --prompts disagree"),
        "{err}"
    );
    // Words bind to the last prompt: a word it lacks is a located error.
    let (ok, _, err) = rewire(&[
        "check",
        "rewrites/p2p_reweight_red.ron",
        "--model",
        "models/shapes-sd",
        "--prompt",
        "a blue square",
    ]);
    assert!(
        !ok && err.contains("p2p_reweight_red.ron:") && err.contains("not in the prompt"),
        "{err}"
    );
}

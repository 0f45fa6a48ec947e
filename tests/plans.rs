//! Recipes and plans through the `rewire` binary: forward --recipe/--plan, stores, step
//! segments, plans refusing another model or a modified file, and the diff snapshot.

mod common;
use common::*;

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn diff_of_the_p2p_reweight_recipe() {
    let (ok, out, err) = rewire(&[
        "diff",
        "rewrites/p2p_reweight_tokens.ron",
        "--model",
        "models/tiny-sd",
        "--steps",
        "5",
    ]);
    assert!(ok, "{err}");
    insta::assert_snapshot!("diff_p2p_reweight_tokens", out);
    let (ok, out, err) = rewire(&[
        "diff",
        "rewrites/p2p_reweight.ron",
        "--model",
        "models/tiny-sd",
        "--steps",
        "5",
    ]);
    assert!(ok, "{err}");
    insta::assert_snapshot!("diff_p2p_reweight_words", out);
    let (ok, out, err) = rewire(&[
        "diff",
        "rewrites/reweight_renorm.ron",
        "--model",
        "models/tiny-sd",
        "--format",
        "json",
        "--no-fuse",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let l = &v["segments"][0]["layers"][0];
    assert_eq!(
        l["added"],
        serde_json::json!(["attn_mix", "attn_probs", "probs_reweight"])
    );
    assert_eq!(l["removed"], serde_json::json!(["attention"]));
    let (ok, out, _) = rewire(&[
        "diff",
        "rewrites/store.ron",
        "--model",
        "models/tiny-sd",
        "--format",
        "dot",
    ]);
    assert!(ok && out.starts_with("digraph") && out.contains("probs_store"));
}

#[test]
fn forward_with_recipe_and_with_compiled_plan() {
    let dir = tempfile::tempdir().unwrap();
    let case_path = case("reweight");
    let out1 = dir.path().join("a.safetensors");
    let (ok, _, err) = rewire(&[
        "forward",
        "models/tiny-sd",
        "--recipe",
        "rewrites/reweight.ron",
        "--inputs",
        s(&case_path),
        "--out",
        s(&out1),
    ]);
    assert!(ok, "{err}");
    let want = expected(&case_path, "out");
    assert!(expected(&out1, "out").max_abs_diff(&want) <= 1e-4);

    let plan = dir.path().join("reweight.plan");
    let (ok, _, err) = rewire(&[
        "compile",
        "rewrites/reweight.ron",
        "--model",
        "models/tiny-sd",
        "-o",
        s(&plan),
    ]);
    assert!(ok, "{err}");
    let out2 = dir.path().join("b.safetensors");
    let (ok, _, err) = rewire(&[
        "forward",
        "models/tiny-sd",
        "--plan",
        s(&plan),
        "--inputs",
        s(&case_path),
        "--out",
        s(&out2),
    ]);
    assert!(ok, "{err}");
    assert!(expected(&out2, "out").max_abs_diff(&want) <= 1e-4);

    // Tampered: one weight of the plan changed.
    let text = std::fs::read_to_string(&plan).unwrap();
    let tampered = dir.path().join("tampered.plan");
    std::fs::write(&tampered, text.replacen("2.5", "9.5", 1)).unwrap();
    let (ok, _, err) = rewire(&[
        "forward",
        "models/tiny-sd",
        "--plan",
        s(&tampered),
        "--inputs",
        s(&case_path),
        "--out",
        s(&out2),
    ]);
    assert!(
        !ok && err.contains("tampered.plan was modified after it was compiled"),
        "{err}"
    );

    // Another model: tiny-sd's unet with one tensor changed.
    let other = dir.path().join("other/unet");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(
        tiny_sd().join("unet/config.json"),
        other.join("config.json"),
    )
    .unwrap();
    let f = rewire::weights::TensorFiles::open(
        &tiny_sd().join("unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let t: Vec<_> = f
        .names()
        .map(|n| {
            let (sh, mut d) = f.read_f32(n).unwrap();
            if n == "conv_in.bias" {
                d[0] += 1.0;
            }
            (n.to_string(), sh, d)
        })
        .collect();
    rewire::weights::write_f32(&other.join("diffusion_pytorch_model.safetensors"), &t).unwrap();
    let (ok, _, err) = rewire(&[
        "forward",
        s(&other),
        "--plan",
        s(&plan),
        "--inputs",
        s(&case_path),
        "--out",
        s(&out2),
    ]);
    assert!(
        !ok && err.contains("reweight.plan was compiled for another model"),
        "{err}"
    );

    // A plan for other shapes.
    let (ok, _, err) = rewire(&[
        "forward",
        "models/tiny-sd",
        "--plan",
        s(&plan),
        "--inputs",
        s(&case("baseline_nonsquare_t37")),
        "--out",
        s(&out2),
    ]);
    assert!(!ok && err.contains("the plan was compiled for"), "{err}");
}

#[test]
fn store_writes_maps_and_store_out_needs_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let case_path = case("store");
    let out = dir.path().join("o.safetensors");
    let st = dir.path().join("maps.safetensors");
    let (ok, _, err) = rewire(&[
        "forward",
        "models/tiny-sd",
        "--recipe",
        "rewrites/store.ron",
        "--inputs",
        s(&case_path),
        "--out",
        s(&out),
        "--store-out",
        s(&st),
    ]);
    assert!(ok, "{err}");
    let name = "probs.down_blocks.0.attentions.0.transformer_blocks.0.attn1";
    assert!(expected(&st, name).max_abs_diff(&expected(&case_path, name)) <= 1e-4);
    let (ok, _, err) = rewire(&[
        "forward",
        "models/tiny-sd",
        "--recipe",
        "rewrites/reweight.ron",
        "--inputs",
        s(&case_path),
        "--out",
        s(&out),
        "--store-out",
        s(&st),
    ]);
    assert!(!ok && err.contains("the recipe stores nothing"), "{err}");
}

#[test]
fn step_segments_pick_the_plan_by_step() {
    let dir = tempfile::tempdir().unwrap();
    let case_path = case("reweight");
    let run = |step: &str| {
        let out = dir.path().join(format!("s{step}.safetensors"));
        let (ok, _, err) = rewire(&[
            "forward",
            "models/tiny-sd",
            "--recipe",
            "rewrites/p2p_reweight_tokens.ron",
            "--inputs",
            s(&case_path),
            "--out",
            s(&out),
            "--step",
            step,
            "--steps",
            "5",
        ]);
        assert!(ok, "{err}");
        expected(&out, "out")
    };
    let base = forward_case(&tiny_sd(), &case_path, Default::default());
    let (early, late) = (run("1"), run("2"));
    assert!(early.max_abs_diff(&base) > 1e-3, "steps 0..2 are rewritten");
    assert!(
        late.max_abs_diff(&base) <= 1e-6,
        "step 2 of 5 is past Fraction(0.0, 0.4)"
    );
    let out = dir.path().join("x.safetensors");
    let (ok, _, err) = rewire(&[
        "forward",
        "models/tiny-sd",
        "--recipe",
        "rewrites/p2p_reweight_tokens.ron",
        "--inputs",
        s(&case_path),
        "--out",
        s(&out),
    ]);
    assert!(!ok && err.contains("step ranges"), "{err}");
}

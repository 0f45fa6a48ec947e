//! K/V rewrites through their recipes and `rewire forward`: cross-frame and sparse-causal
//! attention, reference K/V, merge-KV and tomesd, each within 1e-4 of diffusers and different
//! from the baseline; and one test per validation error.

mod common;
use common::*;
use rewire::compile::{CompileOptions, compile_graph};
use rewire::exec::LowerOptions;
use rewire::graph::InputSpec;
use rewire::recipe::Source;
use rewire::unet::UNet;
use std::path::Path;
use std::process::Command;

fn forward(case_name: &str, extra: &[&str]) -> rewire::exec::HostTensor {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let case_path = case(case_name);
    let recipe = format!("rewrites/{case_name}.ron");
    let mut args = vec![
        "forward",
        "models/tiny-sd",
        "--recipe",
        &recipe,
        "--inputs",
        case_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = Command::new(env!("CARGO_BIN_EXE_rewire"))
        .args(&args)
        .current_dir(root())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{case_name}: {err}");
    expected(&out, "out")
}

fn parity(case_name: &str, extra: &[&str]) {
    let got = forward(case_name, extra);
    let want = expected(&case(case_name), "out");
    let err = got.max_abs_diff(&want);
    println!("{case_name}: max abs error {err:e}");
    assert!(err <= 1e-4, "{case_name}: max abs error {err}");
    let base = forward_case(&tiny_sd(), &case(case_name), LowerOptions::default());
    let moved = got.max_abs_diff(&base);
    assert!(
        moved > 1e-3,
        "{case_name}: no change from the baseline ({moved})"
    );
}

#[test]
fn cross_frame_first() {
    parity("cross_frame_first", &["--frames", "3"]);
}

#[test]
fn sparse_causal_first_prev() {
    parity("sparse_causal_first_prev", &["--frames", "3"]);
}

#[test]
fn replace_kv_ref_concat() {
    parity("replace_kv_ref_concat", &[]);
}

#[test]
fn replace_kv_ref_only() {
    parity("replace_kv_ref_only", &[]);
}

#[test]
fn merge_kv_r05() {
    parity("merge_kv_r05", &[]);
}

#[test]
fn tomesd_r05() {
    parity("tomesd_r05", &[]);
}

#[test]
fn tomesd_r03_md2_cross() {
    parity("tomesd_r03_md2_cross", &[]);
}

#[test]
fn diff_places_the_merge_before_the_kv_projections() {
    let o = Command::new(env!("CARGO_BIN_EXE_rewire"))
        .args([
            "diff",
            "rewrites/merge_kv_r05.ron",
            "--model",
            "models/tiny-sd",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("tome_merge → to_k, to_v"), "{out}");
    assert!(out.contains("tome_match → tome_merge"), "{out}");
    assert!(
        out.contains("128 of 256 K/V tokens merged before to_k/to_v"),
        "{out}"
    );
}

// ---- validation ----

fn pos_of(text: &str, needle: &str) -> (usize, usize) {
    let off = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle} not in recipe"));
    let before = &text[..off];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap().chars().count() + 1;
    (line, col)
}

fn one(rewrite: &str) -> String {
    format!("Recipe(\n    name: \"t\",\n    rewrites: [\n        {rewrite},\n    ],\n)\n")
}

fn error(
    recipe: &str,
    batch: usize,
    frames: Option<usize>,
    references: Option<Vec<String>>,
) -> String {
    let unet = UNet::open(&tiny_sd()).unwrap();
    let base = unet.graph(InputSpec::new(batch, 16, 16)).unwrap();
    let src = Source::parse(recipe, Path::new("recipe.ron")).unwrap();
    let opts = CompileOptions {
        fuse: true,
        frames,
        references,
        ..Default::default()
    };
    let e = compile_graph(&src, &base, &opts)
        .err()
        .unwrap_or_else(|| panic!("accepted:\n{recipe}"))
        .to_string();
    println!("{e}");
    e
}

fn assert_at(err: &str, recipe: &str, needle: &str, message: &str) {
    let (l, c) = pos_of(recipe, needle);
    let head = format!("recipe.ron:{l}:{c}: ");
    assert!(err.starts_with(&head), "expected {head}…, got: {err}");
    assert!(err.contains(message), "expected «{message}» in: {err}");
}

#[test]
fn merge_kv_on_cross_attention() {
    let r =
        one("Rewrite(select: Select(kind: Some(Cross)), branch: Both, op: MergeKv(ratio: 0.5))");
    let e = error(&r, 2, None, None);
    assert_at(&e, &r, "Some(Cross)", "its keys are the prompt's 77 tokens");
}

#[test]
fn merge_ratio_out_of_range() {
    let r = one("Rewrite(select: Select(kind: Some(Self)), branch: Both, op: MergeKv(ratio: 0.8))");
    let e = error(&r, 2, None, None);
    assert_at(
        &e,
        &r,
        "0.8",
        "ratio 0.8 is outside [0, 0.75] for 2×2 cells",
    );
    let r = one("Rewrite(select: Select(), branch: Both, op: MergeTokens(ratio: -0.1))");
    let e = error(&r, 2, None, None);
    assert_at(&e, &r, "-0.1", "ratio -0.1 is outside");
}

#[test]
fn cells_larger_than_the_grid() {
    let r = one(
        "Rewrite(select: Select(kind: Some(Self), max_downsample: Some(1)), branch: Both, op: MergeKv(ratio: 0.1, sx: 32, sy: 1))",
    );
    let e = error(&r, 2, None, None);
    assert_at(
        &e,
        &r,
        "MergeKv(",
        "32×1 cells do not fit the 16×16 token grid of down_blocks.0.attentions.0.transformer_blocks.0.attn1",
    );
}

#[test]
fn replace_kv_on_cross_attention() {
    let r = one(
        "Rewrite(select: Select(paths: [\"*.attn2\"]), branch: Both, op: ReplaceKv(source: Frames([First])))",
    );
    let e = error(&r, 6, Some(3), None);
    assert_at(
        &e,
        &r,
        "ReplaceKv(",
        "ReplaceKv replaces self-attention K/V",
    );
}

#[test]
fn frames_that_do_not_divide_the_batch() {
    let r = one(
        "Rewrite(select: Select(kind: Some(Self)), branch: Both, op: ReplaceKv(source: Frames([First])))",
    );
    let e = error(&r, 4, Some(3), None);
    assert_at(
        &e,
        &r,
        "Frames(",
        "a batch of 4 does not divide into groups of 3 frames",
    );
    let e = error(&r, 6, None, None);
    assert_at(
        &e,
        &r,
        "Frames(",
        "Frames sources need the number of frames per group",
    );
}

#[test]
fn reference_that_no_pass_records() {
    let r = one(
        "Rewrite(select: Select(kind: Some(Self)), branch: Both, op: ReplaceKv(source: Reference(\"style\")))",
    );
    let e = error(&r, 2, None, Some(vec!["reference".into()]));
    assert_at(&e, &r, "Reference(", "no pass records reference \"style\"");
    assert!(e.contains("the passes of this run are: reference"), "{e}");
}

/// `Stored("name")` is the named-state spelling of the same source: one value, the same
/// located error.
#[test]
fn stored_kv_is_the_reference_source() {
    let a: rewire::recipe::KvSource = ron::from_str("Stored(\"reference\")").unwrap();
    let b: rewire::recipe::KvSource = ron::from_str("Reference(\"reference\")").unwrap();
    assert_eq!(a, b);
    assert_eq!(a, rewire::recipe::KvSource::Stored("reference".into()));
    let r = one(
        "Rewrite(select: Select(kind: Some(Self)), branch: Both, op: ReplaceKv(source: Stored(\"style\")))",
    );
    let e = error(&r, 2, None, Some(vec!["reference".into()]));
    assert_at(&e, &r, "Stored(", "no pass records reference \"style\"");
}

#[test]
fn merge_and_replace_kv_on_one_layer_need_an_order() {
    let r = "Recipe(\n    name: \"t\",\n    rewrites: [\n        Rewrite(select: Select(kind: Some(Self)), branch: Both, op: ReplaceKv(source: Frames([First]))),\n        Rewrite(select: Select(kind: Some(Self), max_downsample: Some(1)), branch: Both, op: MergeKv(ratio: 0.5)),\n    ],\n)\n";
    let e = error(r, 6, Some(3), None);
    assert_at(
        &e,
        r,
        "Rewrite(select: Select(kind: Some(Self), max",
        "rewrites 0 (ReplaceKv) and 1 (MergeKv) both act on",
    );
    // Ordered merge-first, it compiles.
    let ok = r
        .replace("Frames([First])))", "Frames([First])), order: Some(1))")
        .replace(
            "MergeKv(ratio: 0.5))",
            "MergeKv(ratio: 0.5), order: Some(0))",
        );
    let unet = UNet::open(&tiny_sd()).unwrap();
    let base = unet.graph(InputSpec::new(6, 16, 16)).unwrap();
    let src = Source::parse(&ok, Path::new("recipe.ron")).unwrap();
    let opts = CompileOptions {
        fuse: true,
        frames: Some(3),
        ..Default::default()
    };
    compile_graph(&src, &base, &opts).unwrap();
}

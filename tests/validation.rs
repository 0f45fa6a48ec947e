//! One test per recipe validation error: the message and its `recipe.ron:LINE:COL`.

mod common;
use common::*;
use rewire::compile::{CompileOptions, compile_graph};
use rewire::graph::InputSpec;
use rewire::recipe::Source;
use rewire::unet::UNet;
use std::path::Path;

/// Line and column (1-based, in characters) of the first occurrence of `needle`.
fn pos_of(text: &str, needle: &str) -> (usize, usize) {
    let off = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle} not in recipe"));
    let before = &text[..off];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap().chars().count() + 1;
    (line, col)
}

fn error(recipe: &str, batch: usize, steps: Option<usize>) -> String {
    let unet = UNet::open(&tiny_sd()).unwrap();
    let base = unet.graph(InputSpec::new(batch, 16, 16)).unwrap();
    let err = match Source::parse(recipe, Path::new("recipe.ron")) {
        Err(e) => e.to_string(),
        Ok(src) => {
            let opts = CompileOptions {
                fuse: true,
                steps,
                ..Default::default()
            };
            match compile_graph(&src, &base, &opts) {
                Ok(_) => panic!("recipe accepted:\n{recipe}"),
                Err(e) => e.to_string(),
            }
        }
    };
    println!("{err}");
    err
}

fn assert_at(err: &str, recipe: &str, needle: &str, message: &str) {
    let (l, c) = pos_of(recipe, needle);
    let head = format!("recipe.ron:{l}:{c}: ");
    assert!(err.starts_with(&head), "expected {head}…, got: {err}");
    assert!(err.contains(message), "expected «{message}» in: {err}");
    assert!(err.contains("hint: "), "no hint in: {err}");
}

fn one(rewrite: &str) -> String {
    format!("Recipe(\n    name: \"t\",\n    rewrites: [\n        {rewrite},\n    ],\n)\n")
}

#[test]
fn selector_matching_no_layer_shows_nearest_paths() {
    let r = one("Rewrite(select: Select(paths: [\"down_blocks.3.*\"]), op: Store())");
    let e = error(&r, 2, None);
    assert_at(
        &e,
        &r,
        "Select(paths",
        "selector matches no attention layer of this model",
    );
    assert!(e.contains("nearest real paths: down_blocks."), "{e}");
    let r = one("Rewrite(select: Select(kind: Some(Cross), max_queries: Some(10)), op: Store())");
    let e = error(&r, 2, None);
    assert_at(
        &e,
        &r,
        "Select(kind",
        "`max_queries` removed the last 11 candidates",
    );
}

#[test]
fn glob_that_cannot_match_a_diffusers_path() {
    let r = one("Rewrite(select: Select(paths: [\"*.attn2\", \"up_block.*\"]), op: Store())");
    let e = error(&r, 2, None);
    assert_at(
        &e,
        &r,
        "\"up_block.*\"",
        "glob \"up_block.*\" cannot match any diffusers attention path",
    );
}

#[test]
fn reweight_on_self_attention() {
    let r =
        one("Rewrite(select: Select(paths: [\"up_blocks.*\"]), op: Reweight(tokens: {2: 2.0}))");
    let e = error(&r, 2, None);
    assert_at(&e, &r, "Reweight(", "Reweight acts on cross-attention");
    assert!(e.contains("add kind: Some(Cross)"), "{e}");
    let r = one("Rewrite(select: Select(kind: Some(Self)), op: Reweight(tokens: {2: 2.0}))");
    let e = error(&r, 2, None);
    assert_at(&e, &r, "Some(Self)", "includes 11 self-attention layers");
}

#[test]
fn replace_maps_on_self_attention() {
    let r = one("Rewrite(select: Select(), op: ReplaceMaps(from: BatchItem(2), to: BatchItem(3)))");
    let e = error(&r, 4, None);
    assert_at(
        &e,
        &r,
        "ReplaceMaps(",
        "ReplaceMaps would replace self-attention maps on 11 layers",
    );
    assert!(e.contains("self_max_queries"), "{e}");
}

#[test]
fn token_index_past_the_text() {
    let r =
        one("Rewrite(select: Select(kind: Some(Cross)), op: Reweight(tokens: {2: 2.0, 77: 0.5}))");
    let e = error(&r, 2, None);
    assert_at(
        &e,
        &r,
        "77:",
        "token index 77 is outside the text of 77 tokens",
    );
}

#[test]
fn steps_outside_the_run() {
    let r =
        one("Rewrite(select: Select(kind: Some(Cross)), steps: Some(Indices(0, 30)), op: Store())");
    let e = error(&r, 2, Some(20));
    assert_at(
        &e,
        &r,
        "Some(Indices",
        "steps 0..30 are outside the run of 20 steps",
    );
    // A step range with no run length to place it in.
    let e = error(&r, 2, None);
    assert_at(
        &e,
        &r,
        "Some(Indices",
        "this recipe has step ranges, so it needs the length of the run",
    );
}

#[test]
fn batch_item_outside_the_batch() {
    let r = one(
        "Rewrite(select: Select(kind: Some(Cross)), op: ReplaceMaps(from: BatchItem(2), to: BatchItem(5)))",
    );
    let e = error(&r, 4, None);
    assert_at(
        &e,
        &r,
        "BatchItem(5)",
        "BatchItem(5) is outside the batch of 4",
    );
    // The hint says how to get a batch that holds the item.
    assert!(
        e.contains("give 3 prompts") && e.contains("--batch 6"),
        "{e}"
    );
}

/// Ops that change token counts or act on the whole batch default to `branch: Both` (what a
/// tomesd user means); the others to `Cond`; an explicit branch still counts.
#[test]
fn whole_batch_ops_default_to_both() {
    let unet = UNet::open(&tiny_sd()).unwrap();
    let base = unet.graph(InputSpec::new(2, 16, 16)).unwrap();
    let compiled = |rewrite: &str| {
        let src = Source::parse(&one(rewrite), Path::new("recipe.ron")).unwrap();
        compile_graph(&src, &base, &CompileOptions::fused()).map(|c| {
            let s = &c.segments[0];
            (rewire::graph::dump::text(&s.graph), s.layers.clone())
        })
    };
    for op in ["MergeTokens(ratio: 0.5)", "MergeKv(ratio: 0.5)"] {
        let sel = "select: Select(kind: Some(Self), max_downsample: Some(1))";
        let implicit = compiled(&format!("Rewrite({sel}, op: {op})")).unwrap();
        let explicit = compiled(&format!("Rewrite({sel}, branch: Both, op: {op})")).unwrap();
        assert_eq!(implicit.0, explicit.0, "{op}: the default is Both");
        assert!(!implicit.1.is_empty(), "{op} landed");
        let r = one(&format!("Rewrite({sel}, branch: Cond, op: {op})"));
        let e = error(&r, 2, None);
        assert_at(&e, &r, "Cond", "changes the token count");
    }
    // Reweight keeps Cond: only the cond item's probabilities are touched.
    let (_, layers) =
        compiled("Rewrite(select: Select(kind: Some(Cross)), op: Reweight(tokens: {1: 2.0}, renormalize: true))")
            .unwrap();
    let unfused = {
        let src = Source::parse(
            &one("Rewrite(select: Select(kind: Some(Cross)), op: Reweight(tokens: {1: 2.0}))"),
            Path::new("recipe.ron"),
        )
        .unwrap();
        compile_graph(&src, &base, &CompileOptions::default()).unwrap()
    };
    assert!(!layers.is_empty());
    assert!(
        unfused.segments[0]
            .layers
            .iter()
            .all(|l| l.materialised == vec![1]),
        "Reweight defaults to the cond item"
    );
}

#[test]
fn unordered_rewrites_whose_order_matters() {
    let r = "Recipe(\n    name: \"t\",\n    rewrites: [\n        Rewrite(select: Select(kind: Some(Cross)), op: Store()),\n        Rewrite(select: Select(paths: [\"up_blocks.*\"], kind: Some(Cross)), op: Reweight(tokens: {2: 2.0}, renormalize: true)),\n    ],\n)\n";
    let e = error(r, 2, None);
    assert_at(
        &e,
        r,
        "Rewrite(select: Select(paths",
        "rewrites 0 (Store) and 1 (Reweight) both act on up_blocks.1.attentions.0.transformer_blocks.0.attn2 and their order matters",
    );
    // Stated, it compiles; two plain reweights commute and need no order.
    let ok = r
        .replace("op: Store())", "op: Store(), order: Some(0))")
        .replace("renormalize: true))", "renormalize: true), order: Some(1))");
    let unet = UNet::open(&tiny_sd()).unwrap();
    let base = unet.graph(InputSpec::new(2, 16, 16)).unwrap();
    let src = Source::parse(&ok, Path::new("recipe.ron")).unwrap();
    compile_graph(&src, &base, &CompileOptions::fused()).unwrap();
    let commute = r
        .replace("op: Store()", "op: Reweight(tokens: {3: 0.5})")
        .replace(", renormalize: true", "");
    let src = Source::parse(&commute, Path::new("recipe.ron")).unwrap();
    compile_graph(&src, &base, &CompileOptions::fused()).unwrap();
}

#[test]
fn unknown_field_is_located() {
    let r = one("Rewrite(selekt: Select(), op: Store())");
    let e = error(&r, 2, None);
    let (l, _) = pos_of(&r, "selekt");
    assert!(e.starts_with(&format!("recipe.ron:{l}:")), "{e}");
    assert!(e.contains("selekt") && e.contains("hint: "), "{e}");
}

#[test]
fn unknown_op_is_located() {
    let r = one("Rewrite(select: Select(), op: Frobnicate(strength: 2.0))");
    let e = error(&r, 2, None);
    let (l, _) = pos_of(&r, "Frobnicate");
    assert!(e.starts_with(&format!("recipe.ron:{l}:")), "{e}");
    assert!(
        e.contains("Frobnicate")
            && e.contains(
                "Reweight, Store, ReplaceMaps, ReplaceKv, MergeKv, MergeTokens and Cache"
            ),
        "{e}"
    );
}

#[test]
fn uncond_branch_of_a_single_item_batch() {
    let r = one("Rewrite(select: Select(kind: Some(Cross)), branch: Uncond, op: Store())");
    let e = error(&r, 1, None);
    assert_at(&e, &r, "Uncond", "branch Uncond is empty in a batch of 1");
}

//! UNet parity with diffusers on the shipped tiny-sd model (max abs error ≤ 1e-4 in f32).

mod common;
use common::*;
use rewire::exec::{AttentionImpl, LowerOptions};

fn check(name: &str, opts: LowerOptions) {
    let path = case(name);
    let got = forward_case(&tiny_sd(), &path, opts);
    let want = expected(&path, "out");
    let err = got.max_abs_diff(&want);
    println!("{name}: max abs error {err:e}");
    assert!(err <= 1e-4, "{name}: max abs error {err} > 1e-4");
}

#[test]
fn baseline_matches_diffusers() {
    check("baseline", LowerOptions::default());
}

#[test]
fn baseline_nonsquare_t37_matches_diffusers() {
    check("baseline_nonsquare_t37", LowerOptions::default());
}

#[test]
fn naive_attention_matches_diffusers() {
    check(
        "baseline",
        LowerOptions {
            attention: AttentionImpl::Naive,
        },
    );
}

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
            ..Default::default()
        },
    );
}

/// Weights held in half precision and widened where used: on an f16 checkpoint (shapes-sd)
/// exactly the f32 result; on tiny-sd's f32 weights, rounded to f16, still near diffusers.
#[test]
fn half_precision_weights() {
    use rewire::exec::{Plan, WeightDtype};
    use rewire::unet::UNet;
    if std::env::var("REWIRE_DEVICE").is_ok_and(|d| d != "flex" && d != "cpu") {
        // Half-precision storage on a GPU backend needs the device's f16 support (lavapipe,
        // CI's WGPU driver, has none); this test is about the CPU backend.
        eprintln!("half_precision_weights: runs on flex only");
        return;
    }
    let unet = UNet::open(&root().join("models/shapes-sd")).unwrap();
    let spec = rewire::graph::InputSpec::new(2, 8, 8);
    let graph = unet.graph(spec).unwrap();
    let inputs = random_inputs(spec, unet.resolved.context_dim, &[]);
    let run = |weights| {
        let opts = LowerOptions {
            weights,
            ..Default::default()
        };
        let plan = Plan::lower(&graph, &unet.weights, &device(), opts).unwrap();
        plan.run_host(&inputs).unwrap().remove("out").unwrap()
    };
    let full = run(WeightDtype::F32);
    for dtype in [WeightDtype::F16, WeightDtype::Bf16] {
        let half = run(dtype);
        let e = half.max_abs_diff(&full);
        println!("shapes-sd, weights held as {dtype:?}: {e:e} from f32");
        if dtype == WeightDtype::F16 {
            assert!(
                e <= 1e-6,
                "f16 weights of an f16 checkpoint changed the output by {e}"
            );
        } else {
            // bf16 drops 3 mantissa bits of f16: a real change, and a bounded one.
            assert!(e > 0.0 && e < 0.1, "bf16 weights: {e}");
        }
    }
    let got = forward_case(
        &tiny_sd(),
        &case("baseline"),
        LowerOptions {
            weights: WeightDtype::F16,
            ..Default::default()
        },
    );
    let e = got.max_abs_diff(&expected(&case("baseline"), "out"));
    println!("tiny-sd (f32 checkpoint) with f16 weights: {e:e} from diffusers");
    assert!(e > 0.0 && e < 1e-2, "f16 rounding of f32 weights: {e}");
}

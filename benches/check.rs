//! `rewire check` time against the number of rewrites (issue 14: it must grow linearly). The
//! recipe mixes what real recipes hold: per-token reweights on cross-attention (plain ones on the
//! up and mid blocks; one in ten renormalised, on the down blocks, with distinct orders) and a
//! store, cycled to 1,000 / 5,000 /
//! 10,000 rewrites, validated and compiled (with fusion) for tiny-sd at 16×16, batch 2 — what
//! `rewire check` does after reading the model. A plain timing of each size is printed first (the
//! ratio 10k / 1k should be about 10), then criterion times the 10,000-rewrite check.
//!
//! Run: `cargo bench --bench check` (`REWIRE_BENCH_PLAIN=1` for plain reweights only).
//!
//! Measured on the 2-core development machine (release): 10,000 rewrites in 0.46 s (mixed) and
//! 0.27 s (plain); 1,000 in 0.054 s.

use criterion::{Criterion, criterion_group, criterion_main};
use rewire::compile::{CompileOptions, compile_graph};
use rewire::graph::InputSpec;
use rewire::recipe::Source;
use rewire::unet::UNet;
use std::path::Path;
use std::time::{Duration, Instant};

/// A recipe of `n` rewrites.
pub fn recipe(n: usize) -> String {
    let mut out = String::from("Recipe(name: \"many\", rewrites: [\n");
    for i in 0..n {
        let r = match i % 10 {
            0 if i == 0 => "Rewrite(select: Select(kind: Some(Cross), place: [Down]), op: Store(), order: Some(-1))".to_string(),
            5 if std::env::var("REWIRE_BENCH_PLAIN").is_err() => format!(
                "Rewrite(select: Select(kind: Some(Cross), place: [Down]), op: Reweight(tokens: {{{}: 1.01}}, renormalize: true), order: Some({}))",
                1 + i % 70,
                i
            ),
            _ => format!(
                "Rewrite(select: Select(kind: Some(Cross), place: [Up, Mid]), op: Reweight(tokens: {{{}: 1.001}}))",
                1 + i % 70
            ),
        };
        out.push_str("    ");
        out.push_str(&r);
        out.push_str(",\n");
    }
    out.push_str("])\n");
    out
}

fn bench(c: &mut Criterion) {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-sd");
    let unet = UNet::open(&model).unwrap();
    let base = unet.graph(InputSpec::new(2, 16, 16)).unwrap();
    let opts = CompileOptions::fused();
    let check = |text: &str| {
        let src = Source::parse(text, Path::new("many.ron")).unwrap();
        compile_graph(&src, &base, &opts).unwrap();
    };
    let mut times = Vec::new();
    for n in [1_000, 5_000, 10_000] {
        let text = recipe(n);
        let t0 = Instant::now();
        check(&text);
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "check of {n} rewrites ({} KiB): {dt:.3} s",
            text.len() / 1024
        );
        times.push(dt);
    }
    println!(
        "10,000 / 1,000 rewrites: {:.1}× the time (linear: 10×)",
        times[2] / times[0]
    );
    let text = recipe(10_000);
    let mut g = c.benchmark_group("check");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("check_10000_rewrites", |b| b.iter(|| check(&text)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

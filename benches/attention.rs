//! Multi-head attention alone, at the shapes of SD 1.5's attention layers at 512×512 (64×64
//! latents), batch 2 with guidance: self-attention over 4096 tokens (8 heads × 40), over 1024
//! tokens (8 × 80) and cross-attention to 77 text tokens; rewire's CPU kernel
//! (`AttentionImpl::Fused` on flex) against Burn's (`AttentionImpl::Burn`) and the naive
//! formula with materialised probabilities (`AttentionImpl::Naive`).
//!
//! Then whole SD 1.5 forwards at 64×64, batch 2 (random weights) with each kernel, interleaved
//! (rewire, Burn, rewire, Burn, ...: one forward each, so a changing machine load hits both
//! alike), printed as seconds per forward and their ratio.
//!
//! Run: `cargo bench --bench attention` (`REWIRE_BENCH_FORWARDS=N` pairs of forwards, default
//! 3; 0 skips them).

use criterion::{Criterion, criterion_group, criterion_main};
use rewire::exec::{AttentionImpl, attend, upload};
use rewire::weights::RandomWeights;
use std::time::Duration;

fn attention(c: &mut Criterion) {
    let device = rewire::backend::default_device().unwrap();
    let rw = RandomWeights::new(3);
    let mut group = c.benchmark_group("attention");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for (name, queries, keys, heads, d) in [
        ("self_4096x4096_8x40", 4096, 4096, 8, 40),
        ("self_1024x1024_8x80", 1024, 1024, 8, 80),
        ("cross_4096x77_8x40", 4096, 77, 8, 40),
    ] {
        let c = heads * d;
        let t = |n: &str, rows: usize| {
            upload::<3>(&[2, rows, c], rw.values(n, &[2 * rows * c, 1]), &device)
        };
        let (q, k, v) = (t("q", queries), t("k", keys), t("v", keys));
        for (imp_name, imp) in [
            ("rewire", AttentionImpl::Fused),
            ("burn", AttentionImpl::Burn),
            ("naive", AttentionImpl::Naive),
        ] {
            group.bench_function(format!("{name}/{imp_name}"), |b| {
                b.iter(|| {
                    let o = attend(q.clone(), k.clone(), v.clone(), heads, imp);
                    o.into_data()
                })
            });
        }
    }
    group.finish();
}

fn forwards(_: &mut Criterion) {
    use rewire::config::UNetConfig;
    use rewire::exec::{HostTensor, LowerOptions, Plan};
    use rewire::graph::InputSpec;
    let pairs: usize = std::env::var("REWIRE_BENCH_FORWARDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    if pairs == 0 {
        return;
    }
    let device = rewire::backend::default_device().unwrap();
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs/sd15-unet.json");
    let cfg = UNetConfig::from_file(&path)
        .unwrap()
        .resolve(&path)
        .unwrap();
    let spec = InputSpec::new(2, 64, 64);
    let graph = rewire::unet::build(&cfg, spec).unwrap();
    let weights = RandomWeights::new(0);
    let lower = |attention| {
        let opts = LowerOptions {
            attention,
            ..Default::default()
        };
        Plan::lower(&graph, &weights, &device, opts).unwrap()
    };
    let plans = [
        ("rewire", lower(AttentionImpl::Fused)),
        ("burn", lower(AttentionImpl::Burn)),
    ];
    let rw = RandomWeights::new(9);
    let mut inputs = std::collections::HashMap::new();
    inputs.insert(
        "sample".to_string(),
        HostTensor::new(vec![2, 4, 64, 64], rw.values("s", &[2 * 4 * 64 * 64, 1])),
    );
    inputs.insert(
        "timestep".to_string(),
        HostTensor::new(vec![1], vec![500.0]),
    );
    inputs.insert(
        "encoder_hidden_states".to_string(),
        HostTensor::new(vec![2, 77, 768], rw.values("e", &[2 * 77 * 768, 1])),
    );
    let mut times = [Vec::new(), Vec::new()];
    for _ in 0..pairs {
        for (i, (_, plan)) in plans.iter().enumerate() {
            let t = std::time::Instant::now();
            plan.run_host(&inputs).unwrap();
            times[i].push(t.elapsed().as_secs_f64());
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for (i, (name, _)) in plans.iter().enumerate() {
        eprintln!(
            "sd15_64x64_b2 forward, {name} attention: {:.2} s (runs: {:?})",
            mean(&times[i]),
            times[i]
        );
    }
    eprintln!(
        "sd15_64x64_b2 forward: Burn's attention / rewire's = {:.3}",
        mean(&times[1]) / mean(&times[0])
    );
}

criterion_group!(benches, attention, forwards);
criterion_main!(benches);

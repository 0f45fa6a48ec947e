//! Multi-head attention alone, at the shapes of SD 1.5's attention layers at 512×512 (64×64
//! latents), batch 2 with guidance: self-attention over 4096 tokens (8 heads × 40), over 1024
//! tokens (8 × 80) and cross-attention to 77 text tokens; rewire's CPU kernel
//! (`AttentionImpl::Fused` on flex) against Burn's (`AttentionImpl::Burn`) and the naive
//! formula with materialised probabilities (`AttentionImpl::Naive`).
//!
//! Run: `cargo bench --bench attention`.

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

criterion_group!(benches, attention);
criterion_main!(benches);

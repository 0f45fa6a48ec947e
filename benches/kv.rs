//! K/V rewrites on the SD 1.5 architecture (random weights): baseline vs MergeKv and
//! MergeTokens at ratio 0.5 at 64×64 latents, batch 2, and cross-frame attention with 4 frames
//! (batch 8 = 2 CFG groups × 4 frames) vs its own baseline. Batch 8 and 128×128 latents take a
//! minute or more per forward on a small CPU, so those are timed by a plain loop (one forward each)
//! and printed; the 64×64 batch-2 variants run under criterion. Peak resident memory per
//! variant (VmHWM, reset between variants) is printed for all.
//!
//! Run: `cargo bench --bench kv` (`-- kv_64` for the criterion part only).

mod common;
use common::peak_rss_mib;
use criterion::{Criterion, criterion_group, criterion_main};
use rewire::compile::{CompileOptions, compile_graph};
use rewire::config::UNetConfig;
use rewire::exec::{HostTensor, LowerOptions, Plan, Value};
use rewire::graph::{Graph, InputSpec};
use rewire::recipe::Source;
use rewire::weights::RandomWeights;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

const MERGE_KV: &str = "Recipe(name: \"merge_kv\", rewrites: [Rewrite(select: Select(kind: Some(Self), max_downsample: Some(1)), branch: Both, op: MergeKv(ratio: 0.5))])";
const MERGE_TOKENS: &str = "Recipe(name: \"tomesd\", rewrites: [Rewrite(select: Select(), branch: Both, op: MergeTokens(ratio: 0.5, max_downsample: 1))])";
const CROSS_FRAME: &str = "Recipe(name: \"cross_frame\", rewrites: [Rewrite(select: Select(kind: Some(Self)), branch: Both, op: ReplaceKv(source: Frames([First])))])";

fn graph(batch: usize, size: usize) -> Graph {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs/sd15-unet.json");
    let cfg = UNetConfig::from_file(&path)
        .unwrap()
        .resolve(&path)
        .unwrap();
    let g = rewire::unet::build(&cfg, InputSpec::new(batch, size, size)).unwrap();
    g.check(None).unwrap();
    g
}

fn variant(base: &Graph, recipe: Option<&str>, frames: Option<usize>) -> Graph {
    match recipe {
        None => base.clone(),
        Some(text) => {
            let src = Source::parse(text, Path::new("bench.ron")).unwrap();
            let opts = CompileOptions {
                fuse: true,
                frames,
                ..Default::default()
            };
            compile_graph(&src, base, &opts).unwrap().segments[0]
                .graph
                .clone()
        }
    }
}

fn inputs(plan: &Plan) -> HashMap<String, Value> {
    let rw = RandomWeights::new(3);
    plan.input_specs()
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product::<usize>();
            let data = if name == "timestep" {
                vec![500.0; n]
            } else {
                rw.values(name, &[n, 1])
            };
            let t = HostTensor::new(shape.to_vec(), data);
            (name.to_string(), Value::from_host(&t, plan.device()))
        })
        .collect()
}

/// Resets VmHWM (Linux ≥ 4.0) so the next reading is this variant's peak.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn run(plan: &Plan) {
    let out = plan.run(inputs(plan)).unwrap();
    drop(out.into_values().next().unwrap().to_host());
}

fn kv_64(c: &mut Criterion) {
    let device = rewire::backend::default_device().unwrap();
    let weights = RandomWeights::new(0);
    let mut group = c.benchmark_group("kv_64");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    for (batch, name, recipe, frames) in [
        (2, "baseline_b2", None, None),
        (2, "merge_kv_r05_b2", Some(MERGE_KV), None),
        (2, "merge_tokens_r05_b2", Some(MERGE_TOKENS), None),
    ] {
        let g = variant(&graph(batch, 64), recipe, frames);
        reset_peak();
        let plan = Plan::lower(&g, &weights, &device, LowerOptions::default()).unwrap();
        group.bench_function(name, |b| b.iter(|| run(&plan)));
        eprintln!("{name}: peak resident memory {:.0} MiB", peak_rss_mib());
    }
    group.finish();
}

/// One-shot timings: cross-frame at batch 8 (64×64) and the 128×128 variants.
fn kv_long(_: &mut Criterion) {
    let device = rewire::backend::default_device().unwrap();
    let weights = RandomWeights::new(0);
    for (name, batch, size, recipe, frames) in [
        ("kv_64/baseline_b8", 8, 64, None, None),
        (
            "kv_64/cross_frame_4_frames_b8",
            8,
            64,
            Some(CROSS_FRAME),
            Some(4),
        ),
        ("kv_128/baseline_b2", 2, 128, None, None),
        ("kv_128/merge_kv_r05_b2", 2, 128, Some(MERGE_KV), None),
        (
            "kv_128/merge_tokens_r05_b2",
            2,
            128,
            Some(MERGE_TOKENS),
            None,
        ),
    ] {
        let g = variant(&graph(batch, size), recipe, frames);
        reset_peak();
        let plan = Plan::lower(&g, &weights, &device, LowerOptions::default()).unwrap();
        let mut times = Vec::new();
        for _ in 0..1 {
            let t = Instant::now();
            run(&plan);
            times.push(t.elapsed().as_secs_f64());
        }
        eprintln!(
            "{name}: {:.2} s per forward (runs: {:?}), peak resident memory {:.0} MiB",
            times.iter().sum::<f64>() / times.len() as f64,
            times,
            peak_rss_mib()
        );
    }
}

criterion_group!(benches, kv_64, kv_long);
criterion_main!(benches);

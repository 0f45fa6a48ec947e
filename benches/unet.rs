//! UNet forward benchmarks: the shipped tiny-sd, and the SD 1.5 architecture built from its
//! published config with random weights (no download) at 64×64 latents, batch 2. Peak resident
//! memory (VmHWM) is printed after each group.
//!
//! Recipes on the SD 1.5 architecture at 64×64, batch 2: baseline, fused reweight, unfused
//! reweight (`--no-fuse`), store (≤ 32×32 queries), and the compile time of each recipe.
//!
//! Run: `cargo bench --bench unet` (add a filter, e.g. `-- sd15_rewrites`, for one group).

mod common;
use common::peak_rss_mib;
use criterion::{Criterion, criterion_group, criterion_main};
use rewire::config::UNetConfig;
use rewire::exec::{HostTensor, LowerOptions, Plan, Value};
use rewire::graph::InputSpec;
use rewire::unet::UNet;
use rewire::weights::RandomWeights;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

fn inputs(plan: &Plan) -> HashMap<String, Value> {
    let rw = RandomWeights::new(3);
    plan.input_specs()
        .into_iter()
        .map(|(name, shape)| {
            let data = if name == "timestep" {
                vec![500.0; shape.iter().product()]
            } else {
                rw.values(name, &[shape.iter().product::<usize>(), 1])
            };
            let t = HostTensor::new(shape.to_vec(), data);
            (name.to_string(), Value::from_host(&t, plan.device()))
        })
        .collect()
}

fn bench_plan(c: &mut Criterion, name: &str, plan: &Plan) {
    bench_plan_in(c, "unet_forward", name, plan)
}

fn bench_plan_in(c: &mut Criterion, group: &str, name: &str, plan: &Plan) {
    let mut group = c.benchmark_group(group);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function(name, |b| {
        b.iter(|| {
            let out = plan.run(inputs(plan)).unwrap();
            // Wait for the device: read the output back.
            out.into_values().next().unwrap().to_host()
        })
    });
    group.finish();
    eprintln!(
        "{name}: peak resident memory so far {:.0} MiB",
        peak_rss_mib()
    );
}

fn tiny_sd(c: &mut Criterion) {
    let device = rewire::backend::default_device().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unet = UNet::open(&root.join("models/tiny-sd")).unwrap();
    let graph = unet.graph(InputSpec::new(2, 16, 16)).unwrap();
    let plan = Plan::lower(&graph, &unet.weights, &device, LowerOptions::default()).unwrap();
    bench_plan(c, "tiny_sd_16x16_b2", &plan);
}

fn sd15(c: &mut Criterion) {
    let device = rewire::backend::default_device().unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs/sd15-unet.json");
    let cfg = UNetConfig::from_file(&path)
        .unwrap()
        .resolve(&path)
        .unwrap();
    let graph = rewire::unet::build(&cfg, InputSpec::new(2, 64, 64)).unwrap();
    graph.check(None).unwrap();
    let weights = RandomWeights::new(0);
    let plan = Plan::lower(&graph, &weights, &device, LowerOptions::default()).unwrap();
    bench_plan(c, "sd15_64x64_b2", &plan);
}

fn sd15_graph() -> rewire::graph::Graph {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs/sd15-unet.json");
    let cfg = UNetConfig::from_file(&path)
        .unwrap()
        .resolve(&path)
        .unwrap();
    let graph = rewire::unet::build(&cfg, InputSpec::new(2, 64, 64)).unwrap();
    graph.check(None).unwrap();
    graph
}

const RECIPES: [(&str, &str, bool); 4] = [
    ("reweight_fused", "reweight.ron", true),
    ("reweight_unfused", "reweight.ron", false),
    ("reweight_renorm_fused", "reweight_renorm.ron", true),
    ("store_32x32_cap", "p2p_store_32x32.ron", true),
];

fn sd15_rewrites(c: &mut Criterion) {
    use rewire::compile::{CompileOptions, compile_graph};
    let device = rewire::backend::default_device().unwrap();
    let base = sd15_graph();
    let weights = RandomWeights::new(0);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    {
        let mut group = c.benchmark_group("sd15_compile");
        for (name, file, fuse) in RECIPES {
            let src = rewire::recipe::Source::load(&root.join("rewrites").join(file)).unwrap();
            let opts = CompileOptions {
                fuse,
                ..Default::default()
            };
            group.bench_function(name, |b| {
                b.iter(|| compile_graph(&src, &base, &opts).unwrap())
            });
        }
        group.finish();
    }
    // One plan at a time: each holds its own copy of SD 1.5's weights.
    let plan = Plan::lower(&base, &weights, &device, LowerOptions::default()).unwrap();
    bench_plan_in(c, "sd15_rewrites", "baseline", &plan);
    drop(plan);
    for (name, file, fuse) in RECIPES {
        let src = rewire::recipe::Source::load(&root.join("rewrites").join(file)).unwrap();
        let opts = CompileOptions {
            fuse,
            ..Default::default()
        };
        let compiled = compile_graph(&src, &base, &opts).unwrap();
        let plan = Plan::lower(
            &compiled.segments[0].graph,
            &weights,
            &device,
            LowerOptions::default(),
        )
        .unwrap();
        bench_plan_in(c, "sd15_rewrites", name, &plan);
    }
}

criterion_group!(benches, tiny_sd, sd15, sd15_rewrites);
criterion_main!(benches);

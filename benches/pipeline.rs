//! One denoising step of the text-to-image loop on the SD 1.5 architecture (published config,
//! random weights) at 512×512 (64×64 latents) with classifier-free guidance: the batch-2 UNet
//! forward, the guidance combination and a DDIM step, as `rewire run` does them. Prints peak
//! resident memory.
//!
//! Run: `cargo bench --bench pipeline`.

mod common;
use common::peak_rss_mib;
use criterion::{Criterion, criterion_group, criterion_main};
use rewire::config::UNetConfig;
use rewire::exec::{HostTensor, LowerOptions, Plan};
use rewire::graph::InputSpec;
use rewire::scheduler::{Scheduler, SchedulerConfig};
use rewire::weights::RandomWeights;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

const SD15_DDIM: &str = r#"{"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": false, "set_alpha_to_one": false}"#;

fn step(c: &mut Criterion) {
    let device = rewire::backend::default_device().unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs/sd15-unet.json");
    let cfg = UNetConfig::from_file(&path)
        .unwrap()
        .resolve(&path)
        .unwrap();
    let graph = rewire::unet::build(&cfg, InputSpec::new(2, 64, 64)).unwrap();
    graph.check(None).unwrap();
    let plan = Plan::lower(
        &graph,
        &RandomWeights::new(0),
        &device,
        LowerOptions::default(),
    )
    .unwrap();
    let sconf = SchedulerConfig::from_json(SD15_DDIM, Path::new("sd15-ddim.json")).unwrap();
    let mut sched = Scheduler::from_config(&sconf).unwrap();
    sched.set_timesteps(50).unwrap();
    let t = sched.timesteps()[0];
    let rw = RandomWeights::new(5);
    let per = 4 * 64 * 64;
    let latents = rw.values("latents", &[per, 1]);
    let ehs = HostTensor::new(vec![2, 77, 768], rw.values("ehs", &[2 * 77 * 768, 1]));
    let mut group = c.benchmark_group("denoising_step");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("sd15_512x512_cfg_ddim", |b| {
        b.iter(|| {
            let model_in: Vec<f32> = latents.iter().chain(&latents).copied().collect();
            let model_in = sched.scale_model_input(&model_in, t);
            let mut inputs = HashMap::new();
            inputs.insert(
                "sample".to_string(),
                HostTensor::new(vec![2, 4, 64, 64], model_in),
            );
            inputs.insert(
                "timestep".to_string(),
                HostTensor::new(vec![1], vec![t as f32]),
            );
            inputs.insert("encoder_hidden_states".to_string(), ehs.clone());
            let out = plan.run_host(&inputs).unwrap();
            let (u, cnd) = out["out"].data.split_at(per);
            let eps: Vec<f32> = u.iter().zip(cnd).map(|(u, c)| u + 7.5 * (c - u)).collect();
            // A fresh DDIM per step keeps every sample at the same timestep.
            let mut s = Scheduler::from_config(&sconf).unwrap();
            s.set_timesteps(50).unwrap();
            s.step(&eps, t, &latents)
        })
    });
    group.finish();
    eprintln!(
        "sd15_512x512_cfg_ddim: peak resident memory {:.0} MiB",
        peak_rss_mib()
    );
}

criterion_group!(benches, step);
criterion_main!(benches);

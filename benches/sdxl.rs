//! One denoising step of SDXL text-to-image on the published SDXL base UNet architecture
//! (`benches/configs/sdxl-unet.json`, random weights) at 1024×1024 (128×128 latents) with
//! classifier-free guidance: the batch-2 UNet forward with `text_embeds` and `time_ids`, the
//! guidance combination and an Euler step, as `rewire run` does them. A step takes minutes on a
//! small CPU, so it is timed by a plain loop (one step) and printed with the memory of holding
//! the weights (resident memory after lowering) and the peak resident memory, once with the
//! weights held in f32 and once in f16 (computed in f32 either way).
//!
//! Run: `cargo bench --bench sdxl` (about 12 GB of memory); `REWIRE_BENCH_WEIGHTS=f16` (or
//! `f32`) runs one of the two.

mod common;
use common::peak_rss_mib;
use rewire::config::UNetConfig;
use rewire::exec::{HostTensor, LowerOptions, Plan, WeightDtype};
use rewire::graph::InputSpec;
use rewire::scheduler::{Scheduler, SchedulerConfig};
use rewire::weights::RandomWeights;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

const SDXL_EULER: &str = r#"{"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading"}"#;

fn rss_mib() -> f64 {
    common::status_mib("VmRSS")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench` lists benches first; nothing to list here.
    }
    let only: Option<WeightDtype> = std::env::var("REWIRE_BENCH_WEIGHTS")
        .ok()
        .map(|s| s.parse().unwrap());
    for dtype in [WeightDtype::F32, WeightDtype::F16] {
        if only.is_none_or(|o| o == dtype) {
            step(dtype);
        }
    }
}

fn step(dtype: WeightDtype) {
    let _ = std::fs::write("/proc/self/clear_refs", "5"); // reset the peak (VmHWM)
    let device = rewire::backend::default_device().unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs/sdxl-unet.json");
    let cfg = UNetConfig::from_file(&path)
        .unwrap()
        .resolve(&path)
        .unwrap();
    let (lh, lw) = (128, 128);
    let graph = rewire::unet::build(&cfg, InputSpec::new(2, lh, lw)).unwrap();
    graph.check(None).unwrap();
    let params: usize = graph
        .weight_list()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let before = rss_mib();
    let t = Instant::now();
    let plan = Plan::lower(
        &graph,
        &RandomWeights::new(0),
        &device,
        LowerOptions {
            weights: dtype,
            ..Default::default()
        },
    )
    .unwrap();
    eprintln!(
        "sdxl, weights held as {dtype:?}: {:.3} B parameters; weights lowered in {:.1} s, resident memory {:.0} → {:.0} MiB (all parameters in f32: {:.0} MiB)",
        params as f64 / 1e9,
        t.elapsed().as_secs_f64(),
        before,
        rss_mib(),
        params as f64 * 4.0 / (1024.0 * 1024.0)
    );
    let sconf = SchedulerConfig::from_json(SDXL_EULER, Path::new("sdxl-euler.json")).unwrap();
    let mut sched = Scheduler::from_config(&sconf).unwrap();
    sched.set_timesteps(30).unwrap();
    let ts = sched.timesteps()[0];
    let rw = RandomWeights::new(5);
    let per = 4 * lh * lw;
    let latents: Vec<f32> = rw
        .values("latents", &[per, 1])
        .iter()
        .map(|x| x * sched.init_noise_sigma())
        .collect();
    let ehs = HostTensor::new(vec![2, 77, 2048], rw.values("ehs", &[2 * 77 * 2048, 1]));
    let pooled = HostTensor::new(vec![2, 1280], rw.values("pooled", &[2 * 1280, 1]));
    let row = [1024f32, 1024.0, 0.0, 0.0, 1024.0, 1024.0];
    let time_ids = HostTensor::new(vec![2, 6], row.repeat(2));
    let t = Instant::now();
    let model_in: Vec<f32> = latents.iter().chain(&latents).copied().collect();
    let model_in = sched.scale_model_input(&model_in, ts);
    let mut inputs = HashMap::new();
    inputs.insert(
        "sample".to_string(),
        HostTensor::new(vec![2, 4, lh, lw], model_in),
    );
    inputs.insert(
        "timestep".to_string(),
        HostTensor::new(vec![1], vec![ts as f32]),
    );
    inputs.insert("encoder_hidden_states".to_string(), ehs);
    inputs.insert("text_embeds".to_string(), pooled);
    inputs.insert("time_ids".to_string(), time_ids);
    let out = plan.run_host(&inputs).unwrap();
    let (u, c) = out["out"].data.split_at(per);
    let eps: Vec<f32> = u.iter().zip(c).map(|(u, c)| u + 5.0 * (c - u)).collect();
    let next = sched.step(&eps, ts, &latents);
    assert!(next.iter().all(|v| v.is_finite()));
    eprintln!(
        "sdxl_1024x1024_cfg_euler, weights {dtype:?}: {:.1} s per denoising step, peak resident memory {:.0} MiB",
        t.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
}

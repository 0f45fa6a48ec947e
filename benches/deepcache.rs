//! DeepCache on the SD 1.5 architecture (published config, random weights): the denoising loop
//! of a 20-step 512×512 run with classifier-free guidance and DDIM (batch-2 UNet forwards, the
//! guidance combination, the scheduler step), uncached and with `rewrites/deepcache.ron`
//! (`Cache(interval: 3, branch: 0)`), each once, in one process; prints both times and the
//! ratio. The text encoder and the VAE are the same in both runs and are left out.
//!
//! Run: `cargo bench --bench deepcache` (`REWIRE_BENCH_LATENT=32` for a quicker 256×256 run).

mod common;
use common::peak_rss_mib;
use rewire::compile::{CompileOptions, cache, compile_graph};
use rewire::config::UNetConfig;
use rewire::exec::{HostTensor, KernelCache, LowerOptions, Plan, State};
use rewire::graph::InputSpec;
use rewire::recipe::Source;
use rewire::scheduler::{Scheduler, SchedulerConfig};
use rewire::weights::RandomWeights;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

const SD15_DDIM: &str = r#"{"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": false, "set_alpha_to_one": false}"#;
const STEPS: usize = 20;

/// The loop as `Pipeline::run_compiled` runs it: the cached plan at cached steps once features
/// exist, the full plan otherwise.
fn denoise(full: &Plan, cached: Option<(&Plan, &cache::CacheSpec)>, latent: usize) -> f64 {
    let sconf = SchedulerConfig::from_json(SD15_DDIM, Path::new("sd15-ddim.json")).unwrap();
    let mut sched = Scheduler::from_config(&sconf).unwrap();
    sched.set_timesteps(STEPS).unwrap();
    let rw = RandomWeights::new(5);
    let per = 4 * latent * latent;
    let mut latents = rw.values("latents", &[per, 1]);
    let ehs = HostTensor::new(vec![2, 77, 768], rw.values("ehs", &[2 * 77 * 768, 1]));
    let mut features = State::new();
    let t0 = Instant::now();
    for (i, &t) in sched.timesteps().to_vec().iter().enumerate() {
        let model_in: Vec<f32> = latents.iter().chain(&latents).copied().collect();
        let model_in = sched.scale_model_input(&model_in, t);
        let mut inputs = HashMap::new();
        inputs.insert(
            "sample".to_string(),
            HostTensor::new(vec![2, 4, latent, latent], model_in),
        );
        inputs.insert(
            "timestep".to_string(),
            HostTensor::new(vec![1], vec![t as f32]),
        );
        inputs.insert("encoder_hidden_states".to_string(), ehs.clone());
        let plan = match cached {
            Some((p, spec)) if !spec.full(i) && !features.is_empty() => p,
            _ => full,
        };
        let (out, kept) = plan
            .run_with_state(&inputs, features.clone(), &[cache::FEATURES])
            .unwrap();
        if !kept.is_empty() {
            features = kept;
        }
        let (u, c) = out["out"].data.split_at(per);
        let eps: Vec<f32> = u.iter().zip(c).map(|(u, c)| u + 7.5 * (c - u)).collect();
        latents = sched.step(&eps, t, &latents);
        eprintln!("  step {i}: {:.1} s", t0.elapsed().as_secs_f64());
    }
    t0.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let latent: usize = std::env::var("REWIRE_BENCH_LATENT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let device = rewire::backend::default_device().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("benches/configs/sd15-unet.json");
    let cfg = UNetConfig::from_file(&path)
        .unwrap()
        .resolve(&path)
        .unwrap();
    let base = rewire::unet::build(&cfg, InputSpec::new(2, latent, latent)).unwrap();
    let src = Source::load(&root.join("rewrites/deepcache.ron")).unwrap();
    let opts = CompileOptions {
        steps: Some(STEPS),
        ..CompileOptions::fused()
    };
    let c = compile_graph(&src, &base, &opts).unwrap();
    let seg = &c.segments[0];
    let weights = RandomWeights::new(0);
    let mut kernels = KernelCache::default();
    let lower = |g, k: &mut KernelCache| {
        Plan::lower_shared(g, &weights, &device, LowerOptions::default(), k).unwrap()
    };
    let plain = lower(&base, &mut kernels);
    let full = lower(&seg.graph, &mut kernels);
    let cached = lower(seg.cached.as_ref().unwrap(), &mut kernels);
    let spec = c.cache.as_ref().unwrap();
    let (fflops, cflops) = (
        seg.graph.totals().2,
        seg.cached.as_ref().unwrap().totals().2,
    );
    let px = latent * 8;
    eprintln!("SD 1.5, {px}×{px}, {STEPS} DDIM steps, CFG (batch 2):");
    eprintln!("uncached:");
    let a = denoise(&plain, None, latent);
    eprintln!(
        "DeepCache (interval {}, branch {}):",
        spec.interval, spec.branch
    );
    let b = denoise(&full, Some((&cached, spec)), latent);
    println!(
        "deepcache sd15 {px}x{px} {STEPS} steps: uncached {a:.1} s, cached {b:.1} s, speed-up {:.2}× (cached steps run {:.0}% of a full step's FLOPs); peak RSS {:.0} MiB",
        a / b,
        100.0 * cflops as f64 / fflops as f64,
        peak_rss_mib()
    );
}

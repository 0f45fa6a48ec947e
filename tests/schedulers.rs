//! Scheduler parity with diffusers 0.42 (`tests/fixtures/scheduler_cases.json`): timesteps,
//! `init_noise_sigma` and the first three denoising steps of DDIM, PNDM, Euler and DPM-Solver++ 2M,
//! plus the config errors.

use rewire::scheduler::{Scheduler, SchedulerConfig, SchedulerError};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scheduler_cases.json")
}

fn cases() -> Value {
    let text = std::fs::read_to_string(fixture_path()).expect("scheduler fixture");
    serde_json::from_str(&text).expect("fixture JSON")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs one fixture case and returns the largest step error.
fn run_case(name: &str) -> f32 {
    let all = cases();
    let case = &all[name];
    let origin = PathBuf::from(format!("scheduler_cases.json#{name}"));
    let config = SchedulerConfig::from_value(case["config"].clone(), &origin).unwrap();
    let mut s = Scheduler::from_name(name, &config).unwrap();
    let steps = case["num_inference_steps"].as_u64().unwrap() as usize;
    s.set_timesteps(steps).unwrap();

    let want_ts: Vec<f64> = case["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(s.timesteps(), want_ts.as_slice(), "{name}: timesteps");

    let sigma = case["init_noise_sigma"].as_f64().unwrap() as f32;
    assert!(
        (s.init_noise_sigma() - sigma).abs() <= 1e-5,
        "{name}: init_noise_sigma {} vs {sigma}",
        s.init_noise_sigma()
    );

    let n: usize = case["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .product();
    let sample = floats(&case["sample"]);
    let model_output = floats(&case["model_output"]);
    assert_eq!(sample.len(), n);
    assert_eq!(model_output.len(), n);

    let init = s.init_noise_sigma();
    let mut x: Vec<f32> = sample.iter().map(|v| v * init).collect();
    let mut worst = 0.0f32;
    let expected = case["first_three_prev_samples"].as_array().unwrap();
    for (i, want) in expected.iter().enumerate() {
        let t = s.timesteps()[i];
        let xin = s.scale_model_input(&x, t);
        assert_eq!(xin.len(), n);
        // model_output * (1 + 0.1 * t / 1000), in float32 as torch computes it.
        let factor = 1.0f32 + 0.1f32 * t as f32 / 1000.0f32;
        let eps: Vec<f32> = model_output.iter().map(|m| m * factor).collect();
        x = s.step(&eps, t, &x);
        let err = max_abs(&x, &floats(want));
        println!("{name}: step {i} (t = {t}): max abs error {err:.3e}");
        assert!(err <= 1e-5, "{name}: step {i} differs by {err:e}");
        worst = worst.max(err);
    }
    worst
}

#[test]
fn ddim_matches_diffusers() {
    run_case("ddim");
}

#[test]
fn pndm_matches_diffusers() {
    run_case("pndm");
}

#[test]
fn euler_matches_diffusers() {
    run_case("euler");
}

#[test]
fn dpmpp2m_matches_diffusers() {
    run_case("dpmpp2m");
}

#[test]
fn shipped_model_config_builds_ddim() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut s = Scheduler::open(&root.join("models/tiny-sd")).unwrap();
    assert_eq!(s.class_name(), "DDIMScheduler");
    s.set_timesteps(10).unwrap();
    assert_eq!(s.timesteps()[0], 901.0);
    assert_eq!(s.timesteps()[9], 1.0);
}

fn config(value: Value) -> SchedulerConfig {
    SchedulerConfig::from_value(value, Path::new("scheduler/scheduler_config.json")).unwrap()
}

fn sd_fields() -> Value {
    json!({
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": false,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null,
        "some_future_field": [1, 2, 3]
    })
}

fn with(mut base: Value, key: &str, v: Value) -> Value {
    base[key] = v;
    base
}

#[test]
fn every_class_name_builds_from_the_config() {
    for (class, short) in [
        ("DDIMScheduler", "ddim"),
        ("PNDMScheduler", "pndm"),
        ("EulerDiscreteScheduler", "euler"),
        ("DPMSolverMultistepScheduler", "dpmpp2m"),
    ] {
        let c = config(with(sd_fields(), "_class_name", json!(class)));
        let s = Scheduler::from_config(&c).unwrap();
        assert_eq!(s.class_name(), class);
        assert_eq!(Scheduler::from_name(short, &c).unwrap().class_name(), class);
        assert_eq!(
            Scheduler::from_name(&short.to_uppercase(), &c)
                .unwrap()
                .class_name(),
            class
        );
    }
}

#[test]
fn unknown_class_name_is_an_error_naming_the_field() {
    let c = config(with(
        sd_fields(),
        "_class_name",
        json!("LMSDiscreteScheduler"),
    ));
    let err = Scheduler::from_config(&c).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(
        matches!(err, SchedulerError::UnknownClass { .. }),
        "{err:?}"
    );
    assert!(msg.contains("`_class_name`"), "{msg}");
    assert!(msg.contains("LMSDiscreteScheduler"), "{msg}");
    assert!(msg.contains("scheduler/scheduler_config.json"), "{msg}");
    assert!(msg.contains("hint: "), "{msg}");

    let err = Scheduler::from_name("eulr", &c).unwrap_err().to_string();
    println!("{err}");
    assert!(err.contains("did you mean `euler`"), "{err}");

    let err = Scheduler::from_config(&config(sd_fields()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`_class_name`"), "{err}");
}

#[test]
fn clip_sample_true_is_an_error_naming_the_field() {
    let c = config(with(sd_fields(), "clip_sample", json!(true)));
    let err = Scheduler::from_name("ddim", &c).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(
        matches!(
            err,
            SchedulerError::Unsupported {
                field: "clip_sample",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(msg.contains("`clip_sample`"), "{msg}");
    assert!(msg.contains("scheduler/scheduler_config.json"), "{msg}");
    assert!(msg.contains("hint: "), "{msg}");

    // DDIM's default is clip_sample: true, so leaving it out is refused too.
    let mut fields = sd_fields();
    fields.as_object_mut().unwrap().remove("clip_sample");
    let msg = Scheduler::from_name("ddim", &config(fields))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`clip_sample`") && msg.contains("default"),
        "{msg}"
    );
}

#[test]
fn unsupported_values_are_errors_naming_the_field() {
    let cases = [
        ("pndm", "skip_prk_steps", json!(false)),
        ("ddim", "beta_schedule", json!("squaredcos_cap_v2")),
        ("euler", "timestep_spacing", json!("karras")),
        ("euler", "prediction_type", json!("sample")),
        ("euler", "use_karras_sigmas", json!(true)),
        ("dpmpp2m", "algorithm_type", json!("sde-dpmsolver++")),
        ("dpmpp2m", "solver_order", json!(3)),
        ("ddim", "thresholding", json!(true)),
    ];
    for (name, field, value) in cases {
        let c = config(with(sd_fields(), field, value));
        let msg = Scheduler::from_name(name, &c).unwrap_err().to_string();
        println!("{msg}");
        assert!(msg.contains(&format!("`{field}`")), "{name} {field}: {msg}");
        assert!(msg.contains("hint: "), "{name} {field}: {msg}");
    }
    // A wrong type names the field too.
    let c = config(with(sd_fields(), "steps_offset", json!("one")));
    let msg = Scheduler::from_name("ddim", &c).unwrap_err().to_string();
    assert!(msg.contains("`steps_offset`"), "{msg}");
}

#[test]
fn python_infinity_parses() {
    let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "note": "NaN -Infinity"}"#;
    let c = SchedulerConfig::from_json(text, Path::new("scheduler_config.json")).unwrap();
    let mut s = Scheduler::from_config(&c).unwrap();
    s.set_timesteps(10).unwrap();
    assert_eq!(s.timesteps()[0], 999.0);
}

#[test]
fn too_many_steps_is_an_error() {
    let c = config(sd_fields());
    let mut s = Scheduler::from_name("ddim", &c).unwrap();
    assert!(matches!(
        s.set_timesteps(0),
        Err(SchedulerError::Steps { .. })
    ));
    assert!(s.set_timesteps(1001).is_err());
    assert!(s.set_timesteps(1000).is_ok());
}

/// Timestep layouts for the other spacings, as diffusers' formulas give them (numpy by hand).
#[test]
fn timestep_spacings_follow_diffusers() {
    let ts = |name: &str, spacing: &str, n: usize| {
        let c = config(with(sd_fields(), "timestep_spacing", json!(spacing)));
        let mut s = Scheduler::from_name(name, &c).unwrap();
        s.set_timesteps(n).unwrap();
        s.timesteps().to_vec()
    };
    // np.round(np.arange(1000, 0, -100)) - 1
    let trailing: Vec<f64> = (0..10).map(|i| 999.0 - 100.0 * i as f64).collect();
    assert_eq!(ts("ddim", "trailing", 10), trailing);
    assert_eq!(ts("dpmpp2m", "trailing", 10), trailing);
    // np.arange(1000, 0, -1000 / 3).round() - 1
    assert_eq!(ts("euler", "trailing", 3), [999.0, 666.0, 332.0]);
    // (np.arange(0, 11) * (1000 // 11))[::-1][:-1] + steps_offset
    let leading: Vec<f64> = (0..10).map(|i| 901.0 - 90.0 * i as f64).collect();
    assert_eq!(ts("dpmpp2m", "leading", 10), leading);
    // np.linspace(0, 999, 4).round(): 0, 333, 666, 999; PLMS repeats the second to last.
    assert_eq!(ts("pndm", "linspace", 4), [999.0, 666.0, 666.0, 333.0, 0.0]);
    // Euler keeps float timesteps: np.linspace(0, 999, 4, dtype=float32)[::-1].
    assert_eq!(ts("euler", "linspace", 4), [999.0, 666.0, 333.0, 0.0]);
    assert_eq!(
        ts("euler", "linspace", 7)[1],
        f64::from((999.0f64 * 5.0 / 6.0) as f32)
    );
    // Euler with "leading": init_noise_sigma = sqrt(sigma_max² + 1).
    let c = config(with(sd_fields(), "timestep_spacing", json!("leading")));
    let mut s = Scheduler::from_name("euler", &c).unwrap();
    s.set_timesteps(10).unwrap();
    assert_eq!(s.timesteps()[0], 901.0);
    assert!(s.init_noise_sigma() > 1.0);
}

/// `add_noise` (image to image's start) agrees across the four schedulers: DDIM and PNDM noise
/// with `sqrt(ᾱ)·x + sqrt(1 − ᾱ)·n`, DPM-Solver++ with `α_σ·x + σ·α_σ·n`, Euler with `x + σ·n`
/// (which `scale_model_input` divides by `sqrt(σ² + 1)`): the same point for the same timestep.
#[test]
fn add_noise_agrees_across_schedulers() {
    let x: Vec<f32> = (0..64)
        .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
        .collect();
    let n: Vec<f32> = (0..64)
        .map(|i| ((i * 11 % 13) as f32 - 6.0) / 3.0)
        .collect();
    // Trailing spacing gives all four the same integral timesteps (999, 899, ...).
    let make = |name: &str| {
        let trailing = with(sd_fields(), "timestep_spacing", json!("trailing"));
        let mut s = Scheduler::from_name(name, &config(trailing)).unwrap();
        s.set_timesteps(10).unwrap();
        s
    };
    let ddim = make("ddim");
    for &t in ddim.timesteps() {
        let want = ddim.add_noise(&x, &n, t);
        assert!(max_abs(&want, &x) > 1e-3, "t={t}: no noise added");
        for name in ["pndm", "dpmpp2m", "euler"] {
            let s = make(name);
            assert!(
                s.timesteps().contains(&t),
                "{name}: {t} not in its schedule"
            );
            let noised = s.add_noise(&x, &n, t);
            // Euler's sample lives at scale sqrt(σ² + 1); its model input is the same point.
            let noised = s.scale_model_input(&noised, t);
            let e = max_abs(&noised, &want);
            assert!(e < 1e-5, "{name} t={t}: {e}");
        }
    }
}

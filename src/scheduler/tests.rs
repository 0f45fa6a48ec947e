//! The schedulers' host and device steps against each other.
//!
//! Try it: `cargo test --release --lib scheduler::tests`.

use super::*;
use burn::tensor::TensorData;

fn config(class: &str, prediction: &str, extra: &str) -> SchedulerConfig {
    let json = format!(
        r#"{{"_class_name": "{class}", "beta_start": 0.00085, "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
           "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
           "clip_sample": false, "prediction_type": "{prediction}"{extra}}}"#
    );
    SchedulerConfig::from_json(&json, Path::new("test.json")).expect("a valid config")
}

fn host(t: Tensor<4>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every scheduler stepped on device tensors gives the host step's latents, step after step
/// (PNDM's four past outputs and DPM-Solver++'s previous data prediction kept on the device),
/// for both prediction types; so does image-to-image's `add_noise` and Euler's input scaling.
#[test]
fn tensor_steps_match_host_steps() {
    let device = crate::backend::default_device().expect("a compiled backend");
    let shape = [2usize, 4, 5, 3];
    let n: usize = shape.iter().product();
    let up =
        |v: &[f32]| Tensor::<4>::from_data(TensorData::new(v.to_vec(), shape.to_vec()), &device);
    let cases = [
        ("DDIMScheduler", ""),
        ("PNDMScheduler", ""),
        ("EulerDiscreteScheduler", ""),
        (
            "EulerDiscreteScheduler",
            r#", "timestep_spacing": "leading""#,
        ),
        ("DPMSolverMultistepScheduler", ""),
        ("DPMSolverMultistepScheduler", r#", "solver_type": "heun""#),
        (
            "DPMSolverMultistepScheduler",
            r#", "lower_order_final": false, "final_sigmas_type": "sigma_min""#,
        ),
    ];
    let mut worst = 0f32;
    for (class, extra) in cases {
        for prediction in ["epsilon", "v_prediction"] {
            let what = format!("{class}{extra} {prediction}");
            let mut on_host = Scheduler::from_config(&config(class, prediction, extra))
                .expect("a supported config");
            on_host.set_timesteps(6).expect("6 steps");
            let mut on_device = on_host.clone();
            let ts = on_host.timesteps().to_vec();
            assert!(ts.len() >= 6, "{what}");

            let noise = crate::pipeline::gaussian(1, n);
            let image = crate::pipeline::gaussian(2, n);
            let mut x = on_host.add_noise(&image, &noise, ts[0]);
            let mut xt = on_device.add_noise_tensor(up(&image), up(&noise), ts[0]);
            let e = max_diff(&x, &host(xt.clone()));
            assert!(e <= 1e-6, "{what}: add_noise differs by {e}");

            for (i, &t) in ts.iter().enumerate() {
                let xin = on_host.scale_model_input(&x, t);
                let xin_t = on_device.scale_model_input_tensor(xt.clone(), t);
                let e = max_diff(&xin, &host(xin_t));
                assert!(
                    e <= 1e-6,
                    "{what} step {i}: scale_model_input differs by {e}"
                );

                let eps = crate::pipeline::gaussian(10 + i as u64, n);
                x = on_host.step(&eps, t, &x);
                xt = on_device.step_tensor(up(&eps), t, xt);
                let e = max_diff(&x, &host(xt.clone()));
                worst = worst.max(e);
                assert!(e <= 1e-6, "{what} step {i} (t = {t}): differs by {e}");
            }
            assert!(x.iter().all(|v| v.is_finite()), "{what}");
        }
    }

    println!("device vs host steps: largest difference {worst:e}");

    // DDIM inversion, rising through the schedule.
    for prediction in ["epsilon", "v_prediction"] {
        let mut inv = DdimInverse::from_config(&config("DDIMScheduler", prediction, ""))
            .expect("a supported config");
        inv.set_timesteps(6).expect("6 steps");
        let mut x = crate::pipeline::gaussian(3, n);
        let mut xt = up(&x);
        for (i, &t) in inv.timesteps().to_vec().iter().enumerate() {
            let eps = crate::pipeline::gaussian(20 + i as u64, n);
            x = inv.step(&eps, t, &x);
            xt = inv.step_tensor(up(&eps), t, xt);
            let e = max_diff(&x, &host(xt.clone()));
            assert!(
                e <= 1e-6,
                "DDIM inverse {prediction} step {i}: differs by {e}"
            );
        }
    }
}

/// History made on the host is read by a device step (and the other way round), so a loop
/// may switch between the two.
#[test]
fn history_moves_between_host_and_device() {
    let device = crate::backend::default_device().expect("a compiled backend");
    let shape = [1usize, 4, 2, 2];
    let n: usize = shape.iter().product();
    let up =
        |v: &[f32]| Tensor::<4>::from_data(TensorData::new(v.to_vec(), shape.to_vec()), &device);
    for class in ["PNDMScheduler", "DPMSolverMultistepScheduler"] {
        let mut a = Scheduler::from_config(&config(class, "epsilon", "")).expect("config");
        a.set_timesteps(8).expect("8 steps");
        let mut b = a.clone();
        let ts = a.timesteps().to_vec();
        let mut x = crate::pipeline::gaussian(4, n);
        let mut y = x.clone();
        for (i, &t) in ts.iter().enumerate() {
            let eps = crate::pipeline::gaussian(30 + i as u64, n);
            x = a.step(&eps, t, &x);
            y = if i % 2 == 0 {
                host(b.step_tensor(up(&eps), t, up(&y)))
            } else {
                b.step(&eps, t, &y)
            };
            let e = max_diff(&x, &y);
            assert!(e <= 1e-6, "{class} step {i}: differs by {e}");
        }
    }
}

//! The VAE (diffusers `AutoencoderKL`): decoding the tiny-sd DDIM pipeline case's final latents
//! reproduces diffusers' image; on shapes-sd's trained VAE, encode then decode reconstructs a
//! picture; bad folders are named errors.

use burn::tensor::{Device, Tensor, TensorData};
use rewire::vae::{Vae, VaeError};
use rewire::weights::{TensorFiles, WeightError};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny_sd() -> PathBuf {
    root().join("models/tiny-sd")
}

fn device() -> Device {
    rewire::backend::default_device().expect("a backend is compiled in")
}

fn ddim_case() -> TensorFiles {
    TensorFiles::open(&root().join("tests/fixtures/pipeline_cases/txt2img_ddim.safetensors"))
        .unwrap()
}

/// The latents after the last DDIM step, `[1, 4, 16, 16]`.
fn final_latents(dev: &Device) -> Tensor<4> {
    let (shape, data) = ddim_case().read_f32("latents_per_step").unwrap();
    assert_eq!(shape, [5, 1, 4, 16, 16]);
    let per: usize = shape[1..].iter().product();
    let last = data[(shape[0] - 1) * per..].to_vec();
    Tensor::<4>::from_data(TensorData::new(last, [1, 4, 16, 16]), dev)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data after convert")
}

#[test]
fn decode_matches_diffusers() {
    let dev = device();
    let vae = Vae::open(&tiny_sd(), &dev).unwrap();
    let image = vae.decode(final_latents(&dev));
    assert_eq!(image.dims(), [1, 3, 128, 128]);
    // diffusers' postprocess: (x / 2 + 0.5).clamp(0, 1), then NCHW -> NHWC.
    let hwc = (image / 2.0 + 0.5).clamp(0.0, 1.0).permute([0, 2, 3, 1]);
    let got = host(hwc);
    let (shape, want) = ddim_case().read_f32("image").unwrap();
    assert_eq!(shape, [128, 128, 3]);
    assert_eq!(got.len(), want.len());
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let inside = want.iter().filter(|v| **v > 0.01 && **v < 0.99).count();
    println!(
        "txt2img_ddim image: max abs error {err:e} ({inside} of {} values not clamped)",
        want.len()
    );
    assert!(
        inside > want.len() / 4,
        "the reference is mostly clamped: the comparison would prove little"
    );
    assert!(err <= 1e-3, "max abs error {err} > 1e-3");
}

#[test]
fn opens_pipeline_or_vae_folder() {
    let dev = device();
    for path in [tiny_sd(), tiny_sd().join("vae")] {
        let vae = Vae::open(&path, &dev).unwrap();
        assert_eq!(vae.scaling_factor(), 0.18215);
        assert_eq!(vae.shift_factor(), None);
        assert_eq!(vae.downsample_factor(), 8);
        assert_eq!(vae.latent_channels(), 4);
        assert_eq!(vae.dir(), tiny_sd().join("vae"));
    }
    let err = Vae::open(&root().join("rewrites"), &dev).unwrap_err();
    assert!(matches!(err, VaeError::NotFound { .. }), "{err}");
}

#[test]
fn encode_of_decode_has_latent_shape() {
    let dev = device();
    let vae = Vae::open(&tiny_sd(), &dev).unwrap();
    let z = vae.encode(vae.decode(final_latents(&dev)));
    assert_eq!(z.dims(), [1, 4, 16, 16]);
    assert!(host(z).iter().all(|v| v.is_finite()));
}

/// A copy of tiny-sd's `vae/` in `dir` with `config` as config.json and the weights passed
/// through `edit` (name, shape, values).
fn vae_copy(
    dir: &Path,
    config: &str,
    edit: impl Fn(Vec<(String, Vec<usize>, Vec<f32>)>) -> Vec<(String, Vec<usize>, Vec<f32>)>,
) -> PathBuf {
    let vae = dir.join("vae");
    std::fs::create_dir_all(&vae).unwrap();
    std::fs::write(vae.join("config.json"), config).unwrap();
    let src = TensorFiles::open_dir(&tiny_sd().join("vae")).unwrap();
    let mut names: Vec<String> = src.names().map(String::from).collect();
    names.sort();
    let all = names
        .into_iter()
        .map(|n| {
            let (s, v) = src.read_f32(&n).unwrap();
            (n, s, v)
        })
        .collect();
    rewire::weights::write_f32(&vae.join("diffusion_pytorch_model.safetensors"), &edit(all))
        .unwrap();
    dir.to_path_buf()
}

fn tiny_config() -> String {
    std::fs::read_to_string(tiny_sd().join("vae/config.json")).unwrap()
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let gone = "decoder.mid_block.attentions.0.to_k.weight";
    let path = vae_copy(tmp.path(), &tiny_config(), |all| {
        all.into_iter().filter(|(n, _, _)| n != gone).collect()
    });
    let err = Vae::open(&path, &device()).unwrap_err();
    match &err {
        VaeError::Weight(WeightError::Missing { name, .. }) => assert_eq!(name, gone),
        other => panic!("expected a missing-tensor error, got {other}"),
    }
    assert!(err.to_string().contains(gone), "{err}");
}

#[test]
fn misshaped_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = "post_quant_conv.weight";
    let path = vae_copy(tmp.path(), &tiny_config(), |all| {
        all.into_iter()
            .map(|(n, s, v)| {
                if n == bad {
                    (n, vec![4, 4], v)
                } else {
                    (n, s, v)
                }
            })
            .collect()
    });
    let err = Vae::open(&path, &device()).unwrap_err();
    match &err {
        VaeError::Weight(WeightError::Shape {
            name,
            expected,
            found,
            ..
        }) => {
            assert_eq!(name, bad);
            assert_eq!(expected, &[4, 4, 1, 1]);
            assert_eq!(found, &[4, 4]);
        }
        other => panic!("expected a shape error, got {other}"),
    }
}

#[test]
fn unsupported_up_block_type_names_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&tiny_config()).unwrap();
    cfg["up_block_types"][1] = "AttnUpDecoderBlock2D".into();
    let path = vae_copy(tmp.path(), &cfg.to_string(), |all| all);
    let err = Vae::open(&path, &device()).unwrap_err();
    match &err {
        VaeError::Unsupported { field, value, .. } => {
            assert_eq!(field, "up_block_types[1]");
            assert!(value.contains("AttnUpDecoderBlock2D"), "{value}");
        }
        other => panic!("expected an unsupported-field error, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("up_block_types") && msg.contains("config.json"),
        "{msg}"
    );
}

/// The encoder on a trained VAE (shapes-sd's): diffusers' image of a red circle, encoded to the
/// posterior mean and decoded again, comes back close to itself. A wrong encoder (a layer
/// misplaced, the scaling factor missing or applied twice) would not reconstruct the picture.
#[test]
fn trained_vae_round_trip_reconstructs_the_image() {
    let dev = device();
    let vae = Vae::open(&root().join("models/shapes-sd"), &dev).unwrap();
    let case = TensorFiles::open(&root().join("tests/fixtures/shapes_cases/txt2img_0.safetensors"))
        .unwrap();
    let (shape, hwc) = case.read_f32("images").unwrap();
    assert_eq!(shape, [1, 64, 64, 3]);
    let mut chw = vec![0f32; hwc.len()];
    for (i, v) in hwc.iter().enumerate() {
        let (p, c) = (i / 3, i % 3);
        chw[c * 64 * 64 + p] = v * 2.0 - 1.0;
    }
    let x = Tensor::<4>::from_data(TensorData::new(chw.clone(), [1, 3, 64, 64]), &dev);
    let z = vae.encode(x);
    assert_eq!(z.dims(), [1, 4, 16, 16]);
    let zs = host(z.clone());
    // scaling_factor brings the latents to about unit variance.
    let var = zs.iter().map(|v| v * v).sum::<f32>() / zs.len() as f32;
    assert!((0.2..5.0).contains(&var), "latent variance {var}");
    let back = host(vae.decode(z));
    let mae = back
        .iter()
        .zip(&chw)
        .map(|(a, b)| (a.clamp(-1.0, 1.0) - b).abs())
        .sum::<f32>()
        / chw.len() as f32
        / 2.0;
    println!("round trip: mean abs error {mae:.4} (in [0, 1] units), latent variance {var:.3}");
    assert!(
        mae < 0.03,
        "the round trip lost the picture: mean abs error {mae}"
    );
}

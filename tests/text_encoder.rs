//! CLIP text encoder: parity with transformers' `CLIPTextModel` on the shipped tiny model, and
//! errors for bad folders.
//!
//! Try it: `cargo test --release --test text_encoder`.

use rewire::clip::text_encoder::{TextEncoder, hidden_states_to_host};
use rewire::exec::HostTensor;
use rewire::weights::{TensorFiles, write_f32};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn encoder_dir() -> PathBuf {
    root().join("models/tiny-sd/text_encoder")
}

fn cases() -> TensorFiles {
    TensorFiles::open(&root().join("tests/fixtures/text_encoder_cases.safetensors")).unwrap()
}

/// The device tests run on: `REWIRE_DEVICE` (flex, wgpu, cuda) or the default backend.
fn device() -> burn::tensor::Device {
    match std::env::var("REWIRE_DEVICE") {
        Ok(name) => rewire::backend::device(&name).expect("REWIRE_DEVICE names a compiled backend"),
        Err(_) => rewire::backend::default_device().expect("a backend is compiled in"),
    }
}

/// `input_ids_{i}` (stored as int64 `[1, 77]`) as one token sequence.
fn input_ids(cases: &TensorFiles, i: usize) -> Vec<u32> {
    let (shape, ids) = cases.read_f32(&format!("input_ids_{i}")).unwrap();
    assert_eq!(shape, [1, 77]);
    ids.iter().map(|&x| x as u32).collect()
}

fn expected(cases: &TensorFiles, i: usize) -> HostTensor {
    let (shape, data) = cases.read_f32(&format!("last_hidden_state_{i}")).unwrap();
    HostTensor::new(shape, data)
}

/// All tensors of the shipped encoder, as (name, shape, f32 data).
fn shipped_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let files = TensorFiles::open_dir(&encoder_dir()).unwrap();
    let mut names: Vec<String> = files.names().map(str::to_string).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let (shape, data) = files.read_f32(&n).unwrap();
            (n, shape, data)
        })
        .collect()
}

/// Writes a pipeline folder with `text_encoder/{config.json, model.safetensors}`.
fn write_pipeline(dir: &Path, config: &str, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> PathBuf {
    let te = dir.join("text_encoder");
    std::fs::create_dir_all(&te).unwrap();
    std::fs::write(te.join("config.json"), config).unwrap();
    write_f32(&te.join("model.safetensors"), tensors).unwrap();
    dir.to_path_buf()
}

fn shipped_config() -> String {
    std::fs::read_to_string(encoder_dir().join("config.json")).unwrap()
}

#[test]
fn matches_transformers_per_prompt() {
    let enc = TextEncoder::open(&encoder_dir(), &device()).unwrap();
    let cases = cases();
    for i in 0..4 {
        let got = hidden_states_to_host(enc.encode(&[input_ids(&cases, i)]));
        let want = expected(&cases, i);
        assert_eq!(got.shape, want.shape, "case {i}");
        let err = got.max_abs_diff(&want);
        println!("case {i}: max abs error {err:e}");
        assert!(err <= 1e-4, "case {i}: max abs error {err}");
    }
}

#[test]
fn batch_matches_transformers_and_pipeline_folder_opens() {
    // The pipeline folder (with text_encoder/) opens too.
    let enc = TextEncoder::open(&root().join("models/tiny-sd"), &device()).unwrap();
    let cases = cases();
    let ids: Vec<Vec<u32>> = (0..4).map(|i| input_ids(&cases, i)).collect();
    let got = hidden_states_to_host(enc.encode(&ids));
    assert_eq!(got.shape, [4, 77, 32]);
    let per = 77 * 32;
    for i in 0..4 {
        let want = expected(&cases, i);
        let row = HostTensor::new(vec![1, 77, 32], got.data[i * per..(i + 1) * per].to_vec());
        let err = row.max_abs_diff(&want);
        println!("batched case {i}: max abs error {err:e}");
        assert!(err <= 1e-4, "batched case {i}: max abs error {err}");
    }
}

#[test]
fn text_model_prefixed_names_load() {
    // transformers 4 writes `text_model.…` names; the shipped file has none.
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<_> = shipped_tensors()
        .into_iter()
        .map(|(n, s, d)| (format!("text_model.{n}"), s, d))
        .collect();
    let path = write_pipeline(dir.path(), &shipped_config(), &tensors);
    let enc = TextEncoder::open(&path, &device()).unwrap();
    let cases = cases();
    let got = hidden_states_to_host(enc.encode(&[input_ids(&cases, 1)]));
    let err = got.max_abs_diff(&expected(&cases, 1));
    assert!(err <= 1e-4, "max abs error {err}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let gone = "encoder.layers.1.mlp.fc2.weight";
    let tensors: Vec<_> = shipped_tensors()
        .into_iter()
        .filter(|(n, _, _)| n != gone)
        .collect();
    let path = write_pipeline(dir.path(), &shipped_config(), &tensors);
    let err = TextEncoder::open(&path, &device()).unwrap_err().to_string();
    assert!(err.contains(gone) && err.contains("missing"), "{err}");
}

#[test]
fn misshaped_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = "encoder.layers.0.self_attn.k_proj.bias";
    let tensors: Vec<_> = shipped_tensors()
        .into_iter()
        .map(|(n, s, d)| {
            if n == bad {
                (n, vec![16], d[..16].to_vec())
            } else {
                (n, s, d)
            }
        })
        .collect();
    let path = write_pipeline(dir.path(), &shipped_config(), &tensors);
    let err = TextEncoder::open(&path, &device()).unwrap_err().to_string();
    assert!(err.contains(bad) && err.contains("[32]"), "{err}");
}

#[test]
fn unsupported_hidden_act_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = shipped_config().replace("\"quick_gelu\"", "\"relu\"");
    assert!(config.contains("\"relu\""));
    let path = write_pipeline(dir.path(), &config, &shipped_tensors());
    let err = TextEncoder::open(&path, &device()).unwrap_err().to_string();
    assert!(
        err.contains("hidden_act") && err.contains("relu") && err.contains("quick_gelu"),
        "{err}"
    );
}

#[test]
fn bad_token_ids_are_errors() {
    let enc = TextEncoder::open(&encoder_dir(), &device()).unwrap();
    let err = enc
        .try_encode(&[vec![49406, 49408]])
        .unwrap_err()
        .to_string();
    assert!(err.contains("49408") && err.contains("vocab_size"), "{err}");
    let err = enc.try_encode(&[vec![49406; 78]]).unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings"), "{err}");
    let err = enc
        .try_encode(&[vec![49406, 49407], vec![49406]])
        .unwrap_err()
        .to_string();
    assert!(err.contains("prompt 1 has 1 tokens"), "{err}");
    assert!(enc.try_encode(&[]).is_err());
}

#[test]
fn gelu_config_runs() {
    // No transformers reference for "gelu" on this model: check it loads and gives finite values
    // that differ from quick_gelu's.
    let dir = tempfile::tempdir().unwrap();
    let config = shipped_config().replace("\"quick_gelu\"", "\"gelu\"");
    let path = write_pipeline(dir.path(), &config, &shipped_tensors());
    let enc = TextEncoder::open(&path, &device()).unwrap();
    let cases = cases();
    let got = hidden_states_to_host(enc.encode(&[input_ids(&cases, 1)]));
    assert_eq!(got.shape, [1, 77, 32]);
    assert!(got.data.iter().all(|x| x.is_finite()));
    assert!(got.max_abs_diff(&expected(&cases, 1)) > 1e-6);
}

//! Models other than the shipped one: SD 2.x-style and SDXL-style configs built with random
//! weights, and broken models that must give clear errors (never a panic).

mod common;
use common::*;
use rewire::exec::{LowerOptions, Plan};
use rewire::graph::{AttnKind, InputSpec};
use rewire::unet::UNet;
use rewire::weights::TensorFiles;
use safetensors::Dtype;
use std::path::Path;

const SD2_STYLE: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "block_out_channels": [32, 64],
  "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
  "layers_per_block": 1,
  "attention_head_dim": [2, 4],
  "cross_attention_dim": 24,
  "use_linear_projection": true,
  "upcast_attention": true,
  "norm_num_groups": 8,
  "sample_size": 16
}"#;

const SDXL_STYLE: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "block_out_channels": [32, 64],
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
  "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
  "layers_per_block": 2,
  "attention_head_dim": [2, 4],
  "transformer_layers_per_block": [1, 2],
  "cross_attention_dim": 40,
  "use_linear_projection": true,
  "addition_embed_type": "text_time",
  "addition_time_embed_dim": 8,
  "projection_class_embeddings_input_dim": 64,
  "norm_num_groups": 8,
  "sample_size": 16
}"#;

fn run(
    model: &Path,
    inputs: &std::collections::HashMap<String, rewire::exec::HostTensor>,
    spec: InputSpec,
) -> rewire::exec::HostTensor {
    let unet = UNet::open(model).unwrap();
    let graph = unet.graph(spec).unwrap();
    let plan = Plan::lower(&graph, &unet.weights, &device(), LowerOptions::default()).unwrap();
    plan.run_host(inputs).unwrap().remove("out").unwrap()
}

#[test]
fn sd2_style_config_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path(), SD2_STYLE, Dtype::F32, 1);
    let unet = UNet::open(&model).unwrap();
    let spec = InputSpec::new(2, 16, 8);
    let graph = unet.graph(spec).unwrap();
    let layers = graph.attention_layers();
    // per-block head counts from attention_head_dim (diffusers' quirk), linear projections
    let heads: Vec<usize> = layers.iter().map(|(_, _, a)| a.heads).collect();
    assert_eq!(layers.len(), 2 + 4 + 2, "down 1×2, up 2×2, mid 2");
    assert_eq!(heads[0], 2, "first block has 2 heads");
    assert!(layers.iter().all(|(_, _, a)| a.upcast));
    assert_eq!(layers[1].2.keys, 77);
    assert_eq!(layers[1].2.kind, AttnKind::Cross);
    let out = run(&model, &random_inputs(spec, 24, &[]), spec);
    assert_eq!(out.shape, vec![2, 4, 16, 8]);
    assert!(out.data.iter().all(|x| x.is_finite()));
}

/// proj_in/proj_out as 1×1 convolutions and as linear layers must compute the same thing.
#[test]
fn linear_and_conv_projections_agree() {
    let dir = tempfile::tempdir().unwrap();
    let lin = make_model(&dir.path().join("lin"), SD2_STYLE, Dtype::F32, 1);
    let conv_cfg = SD2_STYLE.replace(
        "\"use_linear_projection\": true",
        "\"use_linear_projection\": false",
    );
    let conv = dir.path().join("conv/unet");
    std::fs::create_dir_all(&conv).unwrap();
    std::fs::write(conv.join("config.json"), &conv_cfg).unwrap();
    let files = TensorFiles::open(&lin.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let tensors: Vec<_> = files
        .names()
        .map(|n| {
            let (mut shape, data) = files.read_f32(n).unwrap();
            if (n.contains("proj_in.weight") || n.contains("proj_out.weight")) && shape.len() == 2 {
                shape.extend([1, 1]);
            }
            (n.to_string(), shape, data)
        })
        .collect();
    rewire::weights::write_f32(&conv.join("diffusion_pytorch_model.safetensors"), &tensors)
        .unwrap();
    let spec = InputSpec::new(1, 8, 8);
    let inputs = random_inputs(spec, 24, &[]);
    let a = run(&lin, &inputs, spec);
    let b = run(&dir.path().join("conv"), &inputs, spec);
    assert!(a.max_abs_diff(&b) < 1e-5, "{}", a.max_abs_diff(&b));
}

#[test]
fn sdxl_style_config_loads_and_runs_from_f16_shards() {
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path(), SDXL_STYLE, Dtype::F16, 3);
    assert!(
        model
            .join("unet/diffusion_pytorch_model.safetensors.index.json")
            .is_file()
    );
    let unet = UNet::open(&model).unwrap();
    let spec = InputSpec::new(2, 16, 16);
    let graph = unet.graph(spec).unwrap();
    let paths: Vec<&str> = graph
        .attention_layers()
        .iter()
        .map(|(_, p, _)| *p)
        .collect();
    assert!(
        paths.contains(&"down_blocks.1.attentions.1.transformer_blocks.1.attn2"),
        "{paths:?}"
    );
    assert!(paths.contains(&"mid_block.attentions.0.transformer_blocks.1.attn1"));
    assert_eq!(paths.len(), 2 * 2 * 2 + 3 * 2 * 2 + 2 * 2);
    let extra = [("text_embeds", vec![2, 16]), ("time_ids", vec![2, 6])];
    let mut inputs = random_inputs(spec, 40, &extra);
    let a = run(&model, &inputs, spec);
    assert_eq!(a.shape, vec![2, 4, 16, 16]);
    assert!(a.data.iter().all(|x| x.is_finite()));
    // The text_time embedding is wired: other time ids give another output.
    inputs
        .get_mut("time_ids")
        .unwrap()
        .data
        .iter_mut()
        .for_each(|x| *x += 64.0);
    let b = run(&model, &inputs, spec);
    assert!(a.max_abs_diff(&b) > 1e-4);
    // A missing SDXL input is a clear error.
    inputs.remove("text_embeds");
    let unet = UNet::open(&model).unwrap();
    let plan = Plan::lower(
        &unet.graph(spec).unwrap(),
        &unet.weights,
        &device(),
        LowerOptions::default(),
    )
    .unwrap();
    let e = plan.run_host(&inputs).unwrap_err().to_string();
    assert!(e.contains("missing input `text_embeds`"), "{e}");
}

/// A copy of tiny-sd's unet/ whose tensors pass through `edit` first.
fn tampered(
    dir: &Path,
    edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> std::path::PathBuf {
    let src = tiny_sd().join("unet");
    let dst = dir.join("unet");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let files = TensorFiles::open(&src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let mut tensors: Vec<_> = files
        .names()
        .map(|n| {
            let (s, d) = files.read_f32(n).unwrap();
            (n.to_string(), s, d)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    rewire::weights::write_f32(&dst.join("diffusion_pytorch_model.safetensors"), &tensors).unwrap();
    dir.to_path_buf()
}

fn open_err(model: &Path) -> String {
    match UNet::open(model).and_then(|u| u.graph(InputSpec::new(2, 16, 16))) {
        Ok(_) => panic!("a broken model was accepted"),
        Err(e) => e.to_string(),
    }
}

const SOME: &str = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight";

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = tampered(dir.path(), |t| t.retain(|(n, _, _)| n != SOME));
    let e = open_err(&m);
    assert!(e.contains(&format!("missing tensor `{SOME}`")), "{e}");
    assert!(
        e.contains("diffusion_pytorch_model.safetensors") && e.contains("hint:"),
        "{e}"
    );
}

#[test]
fn misshaped_tensor_names_expected_and_found() {
    let dir = tempfile::tempdir().unwrap();
    let m = tampered(dir.path(), |t| {
        let e = t.iter_mut().find(|(n, _, _)| n == SOME).unwrap();
        e.1 = vec![e.1[1], e.1[0]];
    });
    let e = open_err(&m);
    assert!(e.contains(&format!("tensor `{SOME}`")), "{e}");
    assert!(e.contains("has shape [32, 64], expected [64, 32]"), "{e}");
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let m = tampered(dir.path(), |_| {});
    let f = m.join("unet/diffusion_pytorch_model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len / 2).unwrap();
    let e = open_err(&m);
    assert!(e.contains("is not a valid safetensors file"), "{e}");
    assert!(
        e.contains("diffusion_pytorch_model.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn header_lying_about_offsets_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let m = tampered(dir.path(), |_| {});
    let f = m.join("unet/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    // Move the first tensor's end past the start of the next one: offsets overlap.
    let first = header
        .as_object_mut()
        .unwrap()
        .values_mut()
        .find(|v| v.get("data_offsets").is_some())
        .unwrap();
    let end = first["data_offsets"][1].as_u64().unwrap();
    first["data_offsets"][1] = serde_json::json!(end + 4);
    let mut text = serde_json::to_vec(&header).unwrap();
    assert!(text.len() <= n, "header grew");
    text.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&text);
    std::fs::write(&f, bytes).unwrap();
    let e = open_err(&m);
    assert!(e.contains("is not a valid safetensors file"), "{e}");
    assert!(e.to_lowercase().contains("offset"), "{e}");
}

#[test]
fn unknown_block_type_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let m = tampered(dir.path(), |_| {});
    let cfg = m.join("unet/config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"DownBlock2D\"", "\"KDownBlock2D\"");
    std::fs::write(&cfg, text).unwrap();
    let e = open_err(&m);
    assert!(
        e.contains("unsupported value for `down_block_types`: \"KDownBlock2D\" (block 2)"),
        "{e}"
    );
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn not_a_model_folder_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("is not a diffusers UNet folder"), "{e}");
}

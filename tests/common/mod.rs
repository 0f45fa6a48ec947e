//! Helpers shared by the integration tests: open the shipped model, run a fixture case.
#![allow(dead_code)]

use rewire::exec::{HostTensor, LowerOptions, Plan};
use rewire::unet::UNet;
use rewire::weights::TensorFiles;
use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn tiny_sd() -> PathBuf {
    root().join("models/tiny-sd")
}

pub fn case(name: &str) -> PathBuf {
    root()
        .join("tests/fixtures/unet_cases")
        .join(format!("{name}.safetensors"))
}

/// The device tests run on: `REWIRE_DEVICE` (flex, wgpu, cuda) or the default backend.
pub fn device() -> burn::tensor::Device {
    match std::env::var("REWIRE_DEVICE") {
        Ok(name) => rewire::backend::device(&name).expect("REWIRE_DEVICE names a compiled backend"),
        Err(_) => rewire::backend::default_device().expect("a backend is compiled in"),
    }
}

pub fn expected(path: &Path, name: &str) -> HostTensor {
    let f = TensorFiles::open(path).unwrap();
    let (shape, data) = f.read_f32(name).unwrap();
    HostTensor::new(shape, data)
}

/// Runs one plain UNet forward of a case's inputs and returns `out`.
pub fn forward_case(model: &Path, case_path: &Path, opts: LowerOptions) -> HostTensor {
    let unet = UNet::open(model).unwrap();
    let inputs = rewire::io::read_forward_inputs(case_path).unwrap();
    let graph = unet.graph(inputs.spec).unwrap();
    let plan = Plan::lower(&graph, &unet.weights, &device(), opts).unwrap();
    plan.run_host(&inputs.tensors)
        .unwrap()
        .remove("out")
        .unwrap()
}

/// Writes a diffusers-style UNet folder for `config` with deterministic random weights (as
/// `dtype`, in `shards` files with an index when more than one), and returns its path.
pub fn make_model(dir: &Path, config: &str, dtype: safetensors::Dtype, shards: usize) -> PathBuf {
    use rewire::config::UNetConfig;
    use rewire::weights::RandomWeights;
    let unet = dir.join("unet");
    std::fs::create_dir_all(&unet).unwrap();
    std::fs::write(unet.join("config.json"), config).unwrap();
    let cfg_path = unet.join("config.json");
    let resolved = UNetConfig::from_file(&cfg_path)
        .unwrap()
        .resolve(&cfg_path)
        .unwrap();
    let graph = rewire::unet::build(&resolved, rewire::graph::InputSpec::new(1, 16, 16)).unwrap();
    let rw = RandomWeights::new(7);
    let all: Vec<(String, Vec<usize>, Vec<f32>)> = graph
        .weight_list()
        .into_iter()
        .map(|(n, s)| {
            let v = rw.values(&n, &s);
            (n, s, v)
        })
        .collect();
    if shards <= 1 {
        rewire::weights::write_as(
            &unet.join("diffusion_pytorch_model.safetensors"),
            &all,
            dtype,
        )
        .unwrap();
    } else {
        let per = all.len().div_ceil(shards);
        let mut map = serde_json::Map::new();
        for (i, chunk) in all.chunks(per).enumerate() {
            let file = format!(
                "diffusion_pytorch_model-{:05}-of-{:05}.safetensors",
                i + 1,
                shards
            );
            rewire::weights::write_as(&unet.join(&file), chunk, dtype).unwrap();
            for (n, _, _) in chunk {
                map.insert(n.clone(), serde_json::Value::String(file.clone()));
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(
            unet.join("diffusion_pytorch_model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).unwrap(),
        )
        .unwrap();
    }
    dir.to_path_buf()
}

/// Random host inputs for a spec.
pub fn random_inputs(
    spec: rewire::graph::InputSpec,
    context_dim: usize,
    extra: &[(&str, Vec<usize>)],
) -> std::collections::HashMap<String, HostTensor> {
    let rw = rewire::weights::RandomWeights::new(99);
    let mut m = std::collections::HashMap::new();
    let mut put = |name: &str, shape: Vec<usize>, scale: f32| {
        let v = rw.values(name, &[shape.iter().product::<usize>(), 1]);
        m.insert(
            name.to_string(),
            HostTensor::new(shape, v.iter().map(|x| x * scale).collect()),
        );
    };
    put("sample", vec![spec.batch, 4, spec.height, spec.width], 1.0);
    put(
        "encoder_hidden_states",
        vec![spec.batch, spec.text_len, context_dim],
        1.0,
    );
    for (name, shape) in extra {
        put(name, shape.clone(), 1.0);
    }
    m.insert("timestep".into(), HostTensor::new(vec![1], vec![321.0]));
    m
}

/// Runs a case through a recipe; returns every output (`out` and any `probs.*`).
pub fn recipe_case(
    recipe: &str,
    case_name: &str,
    fuse: bool,
) -> std::collections::HashMap<String, HostTensor> {
    use rewire::compile::{CompileOptions, compile_graph};
    let unet = UNet::open(&tiny_sd()).unwrap();
    let inputs = rewire::io::read_forward_inputs(&case(case_name)).unwrap();
    let base = unet.graph(inputs.spec).unwrap();
    let src = rewire::recipe::Source::load(&root().join("rewrites").join(recipe)).unwrap();
    let opts = CompileOptions {
        fuse,
        ..Default::default()
    };
    let c = compile_graph(&src, &base, &opts).unwrap();
    assert_eq!(c.segments.len(), 1);
    let plan = Plan::lower(
        &c.segments[0].graph,
        &unet.weights,
        &device(),
        LowerOptions::default(),
    )
    .unwrap();
    plan.run_host(&inputs.tensors).unwrap()
}

/// Runs the `rewire` binary in the repository root: (success, stdout, stderr). Fails the test
/// if it panicked, whatever the exit status.
pub fn rewire(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rewire"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(!se.contains("panicked"), "rewire panicked: {se}");
    (out.status.success(), so, se)
}

/// [`rewire`] that must succeed.
pub fn rewire_ok(args: &[&str]) {
    let (ok, _, err) = rewire(args);
    assert!(ok, "rewire {args:?}: {err}");
}

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

pub fn device() -> burn::tensor::Device {
    rewire::backend::default_device().expect("a backend is compiled in")
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

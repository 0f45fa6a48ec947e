//! Reading the tensors of one UNet forward from a safetensors file and deriving the
//! [`InputSpec`] they imply.
//!
//! Try it: `rewire forward models/tiny-sd --inputs tests/fixtures/unet_cases/baseline.safetensors --out /tmp/out.safetensors`.

use crate::exec::HostTensor;
use crate::graph::InputSpec;
use crate::weights::{TensorFiles, WeightError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Errors raised while reading forward inputs.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error(transparent)]
    Weight(#[from] WeightError),
    #[error("{path}: tensor `{name}` has shape {found:?}; {expected}")]
    Shape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: String,
    },
}

/// The UNet inputs found in a file, with the spec they imply.
#[derive(Debug)]
pub struct ForwardInputs {
    pub spec: InputSpec,
    pub tensors: HashMap<String, HostTensor>,
}

/// Names the UNet forward reads.
pub const INPUT_NAMES: [&str; 5] = [
    "sample",
    "timestep",
    "encoder_hidden_states",
    "text_embeds",
    "time_ids",
];

/// Reads `sample`, `timestep`, `encoder_hidden_states` (and `text_embeds`, `time_ids` when present).
pub fn read_forward_inputs(path: &Path) -> Result<ForwardInputs, InputError> {
    let files = TensorFiles::open(path)?;
    read_from(&files, path)
}

/// As [`read_forward_inputs`], from opened files.
pub fn read_from(files: &TensorFiles, path: &Path) -> Result<ForwardInputs, InputError> {
    let mut tensors = HashMap::new();
    for name in INPUT_NAMES {
        if files.contains(name) || matches!(name, "sample" | "timestep" | "encoder_hidden_states") {
            let (mut shape, data) = files.read_f32(name)?;
            if name == "timestep" && shape.is_empty() {
                shape = vec![1];
            }
            tensors.insert(name.to_string(), HostTensor::new(shape, data));
        }
    }
    let bad = |name: &str, expected: &str| InputError::Shape {
        path: path.to_path_buf(),
        name: name.into(),
        found: tensors[name].shape.clone(),
        expected: expected.into(),
    };
    let s = &tensors["sample"].shape;
    if s.len() != 4 || s.contains(&0) {
        return Err(bad("sample", "expected [batch, channels, height, width]"));
    }
    let e = &tensors["encoder_hidden_states"].shape;
    if e.len() != 3 || e[0] != s[0] || e.contains(&0) {
        return Err(bad(
            "encoder_hidden_states",
            "expected [batch, text length, features] with the sample's batch",
        ));
    }
    let t = &tensors["timestep"].shape;
    if t.len() != 1 || (t[0] != 1 && t[0] != s[0]) {
        return Err(bad("timestep", "expected [1] or [batch]"));
    }
    let mut spec = InputSpec::new(s[0], s[2], s[3]);
    spec.text_len = e[1];
    spec.timesteps = t[0];
    if let Some(ids) = tensors.get("time_ids") {
        if ids.shape.len() != 2 || ids.shape[0] != s[0] {
            return Err(bad("time_ids", "expected [batch, n]"));
        }
        spec.time_ids = ids.shape[1];
    }
    Ok(ForwardInputs { spec, tensors })
}

//! Reading the tensors of one UNet forward from a safetensors file and deriving the
//! [`InputSpec`] they imply; the other files commands read and write: pictures (one, or a clip's
//! frames), initial latents, an inversion's latents.
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
    #[error("--image {path}: cannot read the picture")]
    Picture {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error(transparent)]
    Video(#[from] crate::video::VideoError),
    #[error("{path}: no {wanted} tensor{}", .others.as_ref().map_or(String::new(), |o| format!(", and more than one tensor ({o})")))]
    Latents {
        path: PathBuf,
        /// The names looked for, as "`a` or `b`".
        wanted: String,
        /// The file's tensors, when one alone would have been taken.
        others: Option<String>,
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

/// The names `rewire run --latents` looks for, in order (else the file's only tensor).
pub const RUN_LATENTS: [&str; 2] = ["latents", "latents_in"];
/// The names `rewire video generate --latents` looks for, in order.
pub const CLIP_LATENTS: [&str; 2] = ["latents", "x_T"];

/// Initial latents: the first of `names` the file holds, else (with `only_tensor`) the file's
/// only tensor.
pub fn read_latents(
    path: &Path,
    names: &[&str],
    only_tensor: bool,
) -> Result<HostTensor, InputError> {
    let f = TensorFiles::open(path)?;
    let all: Vec<&str> = f.names().collect();
    let name = names
        .iter()
        .copied()
        .find(|n| f.contains(n))
        .or(if only_tensor && all.len() == 1 {
            Some(all[0])
        } else {
            None
        })
        .ok_or_else(|| InputError::Latents {
            path: path.into(),
            wanted: names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(" or "),
            others: only_tensor.then(|| all.join(", ")),
        })?
        .to_string();
    let (shape, data) = f.read_f32(&name)?;
    Ok(HostTensor::new(shape, data))
}

/// A picture as `[H, W, 3]` in [0, 1].
pub fn read_image(path: &Path) -> Result<HostTensor, InputError> {
    let img = image::open(path)
        .map_err(|source| InputError::Picture {
            path: path.into(),
            source,
        })?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let data = img.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Ok(HostTensor::new(vec![h as usize, w as usize, 3], data))
}

/// The pictures of `path`: one picture, or the frames of a clip (a folder of PNGs sorted by
/// name, or an animated GIF).
pub fn read_pictures(path: &Path) -> Result<Vec<HostTensor>, InputError> {
    if path.is_dir() || crate::preflight::has_extension(path, "gif") {
        return Ok(crate::video::read_frames(path, 1)?);
    }
    Ok(vec![read_image(path)?])
}

/// Writes an inversion's `latents`, `latents_per_step` (`[steps, F, C, h, w]`) and
/// `latents_0` to `path` (whole or not at all).
pub fn write_inversion(path: &Path, inv: &crate::invert::Inversion) -> Result<(), InputError> {
    let last = inv.latents();
    let mut per_step_shape = vec![inv.latents_per_step.len()];
    per_step_shape.extend(&last.shape);
    let tensors = vec![
        ("latents".to_string(), last.shape.clone(), last.data.clone()),
        (
            "latents_per_step".to_string(),
            per_step_shape,
            inv.latents_per_step
                .iter()
                .flat_map(|t| t.data.iter().copied())
                .collect(),
        ),
        (
            "latents_0".to_string(),
            inv.latents_0.shape.clone(),
            inv.latents_0.data.clone(),
        ),
    ];
    let bytes = crate::weights::encode_f32(path, &tensors)?;
    crate::weights::write_atomic(path, &bytes).map_err(|e| crate::weights::write_error(path, e))?;
    Ok(())
}

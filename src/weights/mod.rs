//! Safetensors reading and writing: memory-mapped single files or shards listed by a
//! `*.safetensors.index.json`, with f32, f16 and bf16 tensors all read as f32. Every error names
//! the file and, where there is one, the tensor, and says what to do.
//!
//! Try it: `rewire forward models/tiny-sd --inputs tests/fixtures/unet_cases/baseline.safetensors --out /tmp/out.safetensors`.

mod files;
mod source;
mod write;

pub use files::TensorFiles;
pub use source::{RandomWeights, WeightSource};
pub use write::{Staged, check_output, encode_f32, write_as, write_atomic, write_error, write_f32};

use std::path::{Path, PathBuf};

/// The folder of one pipeline component: `path/<name>/` when `path` is a pipeline folder, else
/// `path` itself when it holds a `config.json` (a component folder); `None` when neither.
pub fn component_dir(path: &Path, name: &str) -> Option<PathBuf> {
    if path.join(name).join("config.json").is_file() {
        Some(path.join(name))
    } else if path.join("config.json").is_file() {
        Some(path.to_path_buf())
    } else {
        None
    }
}

/// Errors raised while reading or writing tensors.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a valid safetensors file: {reason}\n  hint: the file may be truncated or corrupted; download or export it again"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: cannot read shard index: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error(
        "no weights found in {dir}: expected {expected}\n  hint: point rewire at a diffusers-format folder (a pipeline folder or its unet/)"
    )]
    NoWeights { dir: PathBuf, expected: String },
    #[error(
        "missing tensor `{name}` in {path}\n  hint: the checkpoint does not match its config.json (or is not in diffusers format)"
    )]
    Missing { name: String, path: PathBuf },
    #[error("tensor `{name}` in {path} has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "tensor `{name}` in {path} has dtype {dtype}; rewire reads F32, F16 and BF16 (and integer inputs)"
    )]
    Dtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error(
        "tensor `{name}` in {path} holds {value} at flat index {index}\n  hint: the file is corrupted or was saved from a diverged model; rewire refuses non-finite numbers"
    )]
    NonFinite {
        name: String,
        path: PathBuf,
        index: usize,
        value: f32,
    },
    #[error(
        "{index}: shard `{file}` is outside the model folder {dir}\n  hint: an index may only name files in its own folder"
    )]
    OutsideFolder {
        index: PathBuf,
        file: String,
        dir: PathBuf,
    },
    #[error("cannot write {path}: {reason}\n  hint: give a new path or a regular file to replace")]
    NotAFile { path: PathBuf, reason: String },
}

//! UNet configuration: the real diffusers `unet/config.json`, deserialised and resolved into
//! per-block facts (channels, heads, transformer depth, cross-attention width) the graph builder
//! needs. Covers the fields `UNet2DConditionModel` uses for SD 1.x, SD 2.x and SDXL; a value this
//! crate does not implement is a [`ConfigError::Unsupported`] naming the field, never a silent
//! default.
//!
//! Try it: `rewire inspect models/tiny-sd` (reads `models/tiny-sd/unet/config.json`).

mod resolve;
mod resolved;
#[cfg(test)]
mod tests;
mod unet;

pub use resolved::{BlockKind, BlockSpec, MidSpec, Resolved, TextTimeSpec};
pub use unet::{PerBlock, PerBlockBool, UNetConfig};

use std::path::PathBuf;

/// Errors raised while reading or resolving a UNet config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read {path}: {source}\n  hint: point rewire at a diffusers pipeline folder or its unet/ folder"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON at line {line}, column {column}: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error(
        "{path}: unsupported value for `{field}`: {value}\n  hint: rewire supports {supported}"
    )]
    Unsupported {
        path: PathBuf,
        field: &'static str,
        value: String,
        supported: &'static str,
    },
    #[error("{path}: field `{field}` has {found} entries, expected {expected} (one per block)")]
    Length {
        path: PathBuf,
        field: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "{path}: `{field}` = {source}\n  hint: no published Stable Diffusion UNet comes near this; check the config"
    )]
    Limit {
        path: PathBuf,
        field: String,
        source: crate::limits::Exceeded,
    },
}

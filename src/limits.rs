//! Limits on untrusted input, declared in one place. Every file rewire reads (configs, weights
//! headers, recipes, plans, tokenizer files) and every command-line size is checked against these
//! before anything is allocated from it, so a forged number is an error naming the file, the
//! field and the limit instead of an allocation abort or an hour-long loop.
//!
//! The limits are far above any published Stable Diffusion model (SD 1.x/2.x/SDXL use at most 4
//! blocks, 3 layers per block, 10 transformer layers, 1280 channels, 20 heads, 1000 training
//! timesteps) and far below what would exhaust memory on a workstation.
//!
//! Try it: `rewire check --batch 5000 rewrites/reweight.ron --model models/tiny-sd` (an error
//! naming `--batch` and [`MAX_BATCH`]).

use std::io::Read;
use std::path::Path;

/// Down (and up) blocks in a UNet config (`block_out_channels` entries).
pub const MAX_BLOCKS: usize = 8;
/// `layers_per_block` (resnets per down block; up blocks have one more).
pub const MAX_LAYERS_PER_BLOCK: usize = 16;
/// `transformer_layers_per_block` (SDXL: 10).
pub const MAX_TRANSFORMER_LAYERS: usize = 64;
/// Channels of any block, and `cross_attention_dim` (SDXL: 1280 and 2048).
pub const MAX_CHANNELS: usize = 16_384;
/// Attention heads of a block.
pub const MAX_HEADS: usize = 1024;
/// Convolution kernel side (`conv_in_kernel`, `conv_out_kernel`; a plan's Conv2d).
pub const MAX_KERNEL: usize = 15;
/// Batch of one UNet call (prompts × 2 for classifier-free guidance).
pub const MAX_BATCH: usize = 256;
/// Latent height or width (an image 8× that: 16384 pixels).
pub const MAX_LATENT_SIDE: usize = 2048;
/// Latent height × width (SDXL at 1024² is 128×128 = 16,384).
pub const MAX_LATENT_AREA: usize = 256 * 256;
/// Text length (keys of cross-attention).
pub const MAX_TEXT_LEN: usize = 4096;
/// Elements of any one tensor in a graph (a plan's node, an input).
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 32;
/// `num_train_timesteps` of a scheduler config.
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;
/// Bytes of a recipe file.
pub const MAX_RECIPE_BYTES: u64 = 4 << 20;
/// Rewrites in one recipe.
pub const MAX_REWRITES: usize = 10_000;
/// Step segments of a compiled recipe (each one is a graph of its own).
pub const MAX_SEGMENTS: usize = 1000;
/// Bytes of a plan file.
pub const MAX_PLAN_BYTES: u64 = 256 << 20;
/// Nodes in one segment of a plan.
pub const MAX_PLAN_NODES: usize = 200_000;
/// Bytes of a JSON config (`config.json`, `scheduler_config.json`, a shard index).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Bytes of a safetensors header (the safetensors crate's own limit is 100 MB).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// A Reweight weight (prompt-to-prompt uses 0 to about 10).
pub const MAX_REWEIGHT: f32 = 1e4;

/// A value above its limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value} is above the limit of {limit} (src/limits.rs: {name})")]
pub struct Exceeded {
    pub value: u64,
    pub limit: u64,
    /// The constant's name in this module.
    pub name: &'static str,
}

/// `Ok` when `value <= limit`.
pub fn at_most(value: usize, limit: usize, name: &'static str) -> Result<(), Exceeded> {
    if value <= limit {
        Ok(())
    } else {
        Err(Exceeded {
            value: value as u64,
            limit: limit as u64,
            name,
        })
    }
}

/// The element count of a shape, or `None` when it overflows or passes [`MAX_TENSOR_ELEMENTS`].
pub fn elements(shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
}

/// Why a capped text file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the file is larger than {cap} bytes (src/limits.rs: {name})\n  hint: is this the right file? (a device such as /dev/zero is read as an endless file)"
    )]
    TooBig { cap: u64, name: &'static str },
    #[error(
        "not valid UTF-8 at line {line}, column {col} (byte {byte})\n  hint: save the file as UTF-8 text"
    )]
    Utf8 {
        line: usize,
        col: usize,
        byte: usize,
    },
}

/// Reads at most `cap` bytes of `path` (more is [`ReadError::TooBig`]; `name` is the limit's
/// constant, for the message).
pub fn read_capped(path: &Path, cap: u64, name: &'static str) -> Result<Vec<u8>, ReadError> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(ReadError::TooBig { cap, name });
    }
    Ok(bytes)
}

/// As [`read_capped`], as UTF-8 text; invalid UTF-8 is located by line and column.
pub fn read_text_capped(path: &Path, cap: u64, name: &'static str) -> Result<String, ReadError> {
    utf8(read_capped(path, cap, name)?)
}

/// Bytes as UTF-8 text; invalid UTF-8 is located by line and column (1-based, in characters).
pub fn utf8(bytes: Vec<u8>) -> Result<String, ReadError> {
    String::from_utf8(bytes).map_err(|e| {
        let byte = e.utf8_error().valid_up_to();
        let good = &e.as_bytes()[..byte];
        let text = std::str::from_utf8(good).unwrap_or_default();
        let line = text.matches('\n').count() + 1;
        let col = text.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        ReadError::Utf8 { line, col, byte }
    })
}

/// A `kB` field of a `/proc` status file, in bytes (Linux; `None` elsewhere).
fn proc_kb(file: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The memory a job may use: what the system can still give (MemAvailable), capped by
/// `REWIRE_MAX_MEMORY_MIB` when set; `None` when neither says.
pub fn available_memory() -> Option<u64> {
    let cap = std::env::var("REWIRE_MAX_MEMORY_MIB")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|m| m.saturating_mul(1 << 20));
    match (proc_kb("/proc/meminfo", "MemAvailable:"), cap) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// This process's peak resident memory so far (VmHWM), if the system says.
pub fn peak_rss() -> Option<u64> {
    proc_kb("/proc/self/status", "VmHWM:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_errors_are_located() {
        let e = utf8(b"ab\ncd\xffe".to_vec()).unwrap_err();
        assert!(
            matches!(
                e,
                ReadError::Utf8 {
                    line: 2,
                    col: 3,
                    byte: 5
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn elements_overflow_is_none() {
        assert_eq!(elements(&[2, 3]), Some(6));
        assert_eq!(elements(&[usize::MAX, 2]), None);
        assert_eq!(elements(&[1 << 20, 1 << 20]), None);
    }
}

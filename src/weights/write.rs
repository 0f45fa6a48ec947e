//! Writing safetensors and other outputs safely: temporary files renamed into place
//! ([`Staged`], [`write_atomic`]) after checking the target is a regular file ([`check_output`]).
//!
//! Try it: `rewire forward models/tiny-sd --inputs tests/fixtures/unet_cases/baseline.safetensors --out /tmp/out.safetensors`.

use super::WeightError;
use safetensors::Dtype;
use std::path::{Path, PathBuf};

/// Writes f32 tensors to a safetensors file, through a temporary name renamed into place so
/// that a failed write leaves no half-written file.
pub fn write_f32(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<(), WeightError> {
    write_as(path, tensors, Dtype::F32)
}

/// Writes tensors stored as `dtype` (F32, F16 or BF16), atomically.
pub fn write_as(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: Dtype,
) -> Result<(), WeightError> {
    let err = |reason: String| WeightError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| match dtype {
            Dtype::F16 => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            Dtype::BF16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
        .collect();
    let dtype = match dtype {
        Dtype::F16 | Dtype::BF16 => dtype,
        _ => Dtype::F32,
    };
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            safetensors::tensor::TensorView::new(dtype, shape.clone(), b)
                .map(|v| (name.clone(), v))
                .map_err(|e| err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let data = safetensors::serialize(views, None).map_err(|e| err(e.to_string()))?;
    write_atomic(path, &data).map_err(|e| write_error(path, e))
}

/// Safetensors bytes of f32 tensors (for [`Staged`] writes).
pub fn encode_f32(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<Vec<u8>, WeightError> {
    let err = |reason: String| WeightError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (name.clone(), v))
                .map_err(|e| err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| err(e.to_string()))
}

/// A write error: [`WeightError::NotAFile`] for a path that is not a regular file.
pub fn write_error(path: &Path, e: std::io::Error) -> WeightError {
    if e.kind() == std::io::ErrorKind::InvalidInput {
        WeightError::NotAFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    } else {
        WeightError::Write {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

/// Checks that `path` may be written by a temporary-then-rename write: a new path, or an
/// existing regular file. A directory, a device (`/dev/full`), a FIFO or a symbolic link is an
/// [`std::io::ErrorKind::InvalidInput`] error (the rename would replace the node or the link
/// itself, not write through it).
pub fn check_output(path: &Path) -> std::io::Result<()> {
    let bad = |what: &str| {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is {what}, not a regular file", path.display()),
        ))
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) => {
            let t = m.file_type();
            if t.is_file() {
                Ok(())
            } else if t.is_dir() {
                bad("a directory")
            } else if t.is_symlink() {
                bad("a symbolic link")
            } else {
                bad("a device, FIFO or socket")
            }
        }
    }
}

/// Files written under temporary names and renamed into place together by [`Staged::commit`]:
/// a run writes all its outputs or none. Dropped uncommitted, it removes what it staged.
#[derive(Debug, Default)]
pub struct Staged {
    /// (temporary, final) paths.
    files: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    pub fn new() -> Self {
        Staged::default()
    }

    /// Writes `data` to a sibling temporary of `path` (after [`check_output`]).
    pub fn stage(&mut self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        check_output(path)?;
        if self.files.iter().any(|(_, p)| p == path) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is written twice by one run", path.display()),
            ));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        self.files.push((tmp.clone(), path.to_path_buf()));
        std::fs::write(&tmp, data)
    }

    /// The final paths, in staging order.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(_, p)| p.as_path())
    }

    /// Renames every staged file into place (each path checked again first).
    pub fn commit(mut self) -> std::io::Result<()> {
        for (_, path) in &self.files {
            check_output(path)?;
        }
        let files = std::mem::take(&mut self.files);
        for (i, (tmp, path)) in files.iter().enumerate() {
            if let Err(e) = std::fs::rename(tmp, path) {
                for (t, _) in &files[i..] {
                    let _ = std::fs::remove_file(t);
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Writes bytes through a sibling temporary file and a rename; refuses a path that is not a new
/// path or a regular file ([`check_output`]).
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut s = Staged::new();
    s.stage(path, data)?;
    s.commit()
}

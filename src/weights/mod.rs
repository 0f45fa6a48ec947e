//! Safetensors reading and writing: memory-mapped single files or shards listed by a
//! `*.safetensors.index.json`, with f32, f16 and bf16 tensors all read as f32. Every error names
//! the file and, where there is one, the tensor, and says what to do.
//!
//! Try it: `rewire forward models/tiny-sd --inputs tests/fixtures/unet_cases/baseline.safetensors --out /tmp/out.safetensors`.

use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

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

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// One or more memory-mapped safetensors files seen as one name → tensor map.
pub struct TensorFiles {
    maps: Vec<(PathBuf, memmap2::Mmap)>,
    entries: HashMap<String, Entry>,
    /// What to name in messages (the single file, or the index).
    origin: PathBuf,
}

impl std::fmt::Debug for TensorFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TensorFiles({}, {} tensors)",
            self.origin.display(),
            self.entries.len()
        )
    }
}

fn map_file(path: &Path) -> Result<memmap2::Mmap, WeightError> {
    let file = std::fs::File::open(path).map_err(|source| WeightError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the map is read-only; a file changed underneath by another process is outside
    // what any safetensors reader can guard against.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|source| WeightError::Open {
        path: path.to_path_buf(),
        source,
    })
}

impl TensorFiles {
    /// Opens one safetensors file.
    pub fn open(path: &Path) -> Result<Self, WeightError> {
        let mut files = TensorFiles {
            maps: Vec::new(),
            entries: HashMap::new(),
            origin: path.to_path_buf(),
        };
        files.add(path, None)?;
        Ok(files)
    }

    /// Opens the shards listed by a `*.safetensors.index.json`.
    pub fn open_index(index: &Path) -> Result<Self, WeightError> {
        use crate::limits::{MAX_CONFIG_BYTES, ReadError, read_text_capped};
        let text =
            read_text_capped(index, MAX_CONFIG_BYTES, "MAX_CONFIG_BYTES").map_err(|e| match e {
                ReadError::Io(source) => WeightError::Open {
                    path: index.to_path_buf(),
                    source,
                },
                other => WeightError::Index {
                    path: index.to_path_buf(),
                    reason: other.to_string(),
                },
            })?;
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let idx: Index = serde_json::from_str(&text).map_err(|e| WeightError::Index {
            path: index.to_path_buf(),
            reason: e.to_string(),
        })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, file) in &idx.weight_map {
            shards.entry(file.as_str()).or_default().push(name.as_str());
        }
        let mut files = TensorFiles {
            maps: Vec::new(),
            entries: HashMap::new(),
            origin: index.to_path_buf(),
        };
        for (file, names) in shards {
            files.add(&shard_path(index, dir, file)?, Some(&names))?;
        }
        Ok(files)
    }

    fn add(&mut self, path: &Path, expect: Option<&[&str]>) -> Result<(), WeightError> {
        let map = map_file(path)?;
        let corrupt = |reason: String| WeightError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        check_header(&map).map_err(corrupt)?;
        let st = SafeTensors::deserialize(&map).map_err(|e| corrupt(e.to_string()))?;
        let base = map.as_ptr() as usize;
        let file = self.maps.len();
        for (name, view) in st.tensors() {
            let data = view.data();
            let start = data.as_ptr() as usize - base;
            self.entries.insert(
                name,
                Entry {
                    file,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + data.len(),
                },
            );
        }
        if let Some(names) = expect {
            for n in names {
                if !self.entries.contains_key(*n) {
                    return Err(WeightError::Missing {
                        name: n.to_string(),
                        path: path.to_path_buf(),
                    });
                }
            }
        }
        drop(st);
        self.maps.push((path.to_path_buf(), map));
        Ok(())
    }

    /// Finds the weights of a diffusers component folder: `diffusion_pytorch_model.safetensors`,
    /// `model.safetensors`, their sharded `.index.json` forms, or the `.fp16` variants.
    pub fn open_dir(dir: &Path) -> Result<Self, WeightError> {
        let stems = ["diffusion_pytorch_model", "model"];
        for variant in ["", ".fp16"] {
            for stem in stems {
                let single = dir.join(format!("{stem}{variant}.safetensors"));
                if single.is_file() {
                    return Self::open(&single);
                }
                let index = dir.join(format!("{stem}{variant}.safetensors.index.json"));
                if index.is_file() {
                    return Self::open_index(&index);
                }
            }
        }
        Err(WeightError::NoWeights {
            dir: dir.to_path_buf(),
            expected: "diffusion_pytorch_model.safetensors (or model.safetensors, sharded *.safetensors.index.json, or .fp16 variants)".into(),
        })
    }

    /// The file (or index) these tensors came from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    fn entry(&self, name: &str) -> Result<&Entry, WeightError> {
        self.entries.get(name).ok_or_else(|| WeightError::Missing {
            name: name.to_string(),
            path: self.origin.clone(),
        })
    }

    fn path_of(&self, e: &Entry) -> PathBuf {
        self.maps[e.file].0.clone()
    }

    /// A fingerprint of the tensors: names, dtypes, shapes, and each tensor's first and last
    /// 64 bytes of data (cheap on multi-GB checkpoints, and different for different weights).
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let mut names: Vec<&String> = self.entries.keys().collect();
        names.sort();
        for n in names {
            let e = &self.entries[n];
            h.update(n.as_bytes());
            h.update(format!("{:?}{:?}", e.dtype, e.shape).as_bytes());
            let bytes = &self.maps[e.file].1[e.start..e.end];
            h.update(&bytes[..bytes.len().min(64)]);
            h.update(&bytes[bytes.len().saturating_sub(64)..]);
        }
        format!("{:x}", h.finalize())
    }

    /// Reads a tensor as f32 with its shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), WeightError> {
        let e = self.entry(name)?;
        let bytes = &self.maps[e.file].1[e.start..e.end];
        let values = match e.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as f32)
                .collect(),
            other => {
                return Err(WeightError::Dtype {
                    name: name.to_string(),
                    path: self.path_of(e),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let values: Vec<f32> = values;
        if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(WeightError::NonFinite {
                name: name.to_string(),
                path: self.path_of(e),
                index,
                value,
            });
        }
        Ok((e.shape.clone(), values))
    }

    /// Reads a tensor as f32, checking its shape.
    pub fn read_f32_shaped(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, WeightError> {
        let e = self.entry(name)?;
        if e.shape != expected {
            return Err(WeightError::Shape {
                name: name.to_string(),
                path: self.path_of(e),
                expected: expected.to_vec(),
                found: e.shape.clone(),
            });
        }
        Ok(self.read_f32(name)?.1)
    }

    /// Checks that a tensor exists with the given shape, without reading it.
    pub fn check(&self, name: &str, expected: &[usize]) -> Result<(), WeightError> {
        let e = self.entry(name)?;
        if e.shape != expected {
            return Err(WeightError::Shape {
                name: name.to_string(),
                path: self.path_of(e),
                expected: expected.to_vec(),
                found: e.shape.clone(),
            });
        }
        Ok(())
    }
}

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

/// A shard named by an index, resolved inside the index's folder: a plain relative file name
/// (no absolute path, no `..`), and after following links still inside the folder.
fn shard_path(index: &Path, dir: &Path, file: &str) -> Result<PathBuf, WeightError> {
    use std::path::Component;
    let outside = || WeightError::OutsideFolder {
        index: index.to_path_buf(),
        file: file.to_string(),
        dir: dir.to_path_buf(),
    };
    let rel = Path::new(file);
    if file.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(outside());
    }
    let path = dir.join(rel);
    // Links are followed only when both sides resolve; a missing shard is reported on open.
    if let (Ok(real_dir), Ok(real)) = (dir.canonicalize(), path.canonicalize())
        && !real.starts_with(&real_dir)
    {
        return Err(outside());
    }
    Ok(path)
}

/// Checks a safetensors header before the safetensors crate reads it: its length against
/// [`crate::limits::MAX_HEADER_BYTES`], and no tensor name twice (the crate keeps the last one
/// silently).
fn check_header(bytes: &[u8]) -> Result<(), String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    let Some(len) = bytes.get(..8) else {
        return Ok(()); // the crate reports the truncation
    };
    let n = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    if n > crate::limits::MAX_HEADER_BYTES {
        return Err(format!(
            "header of {n} bytes is above the limit of {} (src/limits.rs: MAX_HEADER_BYTES)",
            crate::limits::MAX_HEADER_BYTES
        ));
    }
    let Some(header) = bytes.get(8..8 + n as usize) else {
        return Ok(());
    };
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = None;
            while let Some(k) = m.next_key::<String>()? {
                m.next_value::<IgnoredAny>()?;
                if !seen.insert(k.clone()) && dup.is_none() {
                    dup = Some(k);
                }
            }
            Ok(dup)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(header);
    match de.deserialize_map(Keys) {
        Ok(Some(dup)) => Err(format!(
            "the header names tensor `{dup}` twice (which one is meant is ambiguous)"
        )),
        // Anything else malformed is the crate's to report, with its own message.
        _ => Ok(()),
    }
}

/// Where a model's weights come from: checkpoint files, or generated random weights.
pub trait WeightSource {
    /// What to name in messages.
    fn origin(&self) -> &Path;
    /// Checks a tensor exists with this shape.
    fn check(&self, name: &str, shape: &[usize]) -> Result<(), WeightError>;
    /// Reads a tensor as f32, checking its shape.
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightError>;
}

impl WeightSource for TensorFiles {
    fn origin(&self) -> &Path {
        &self.origin
    }
    fn check(&self, name: &str, shape: &[usize]) -> Result<(), WeightError> {
        TensorFiles::check(self, name, shape)
    }
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightError> {
        self.read_f32_shaped(name, shape)
    }
}

/// Deterministic random weights for any name and shape (benchmarks of published
/// architectures without downloading them, and tests of configs with no checkpoint).
/// Matrices and kernels are uniform in ±1/√fan_in like PyTorch's default init; norm scales are
/// 1; biases are small.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    pub seed: u64,
    origin: PathBuf,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        RandomWeights {
            seed,
            origin: PathBuf::from(format!("<random weights, seed {seed}>")),
        }
    }

    /// The values for one tensor.
    pub fn values(&self, name: &str, shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let is_norm = shape.len() == 1 && name.contains("norm");
        if is_norm && name.ends_with(".weight") {
            return vec![1.0; n];
        }
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let bound = if shape.len() >= 2 {
            1.0 / (fan_in as f32).sqrt()
        } else {
            0.02
        };
        let mut state = self.seed ^ fnv1a(name.as_bytes());
        (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                let u = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                (2.0 * u - 1.0) * bound
            })
            .collect()
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl WeightSource for RandomWeights {
    fn origin(&self) -> &Path {
        &self.origin
    }
    fn check(&self, _: &str, _: &[usize]) -> Result<(), WeightError> {
        Ok(())
    }
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightError> {
        Ok(self.values(name, shape))
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

//! Reading safetensors ([`TensorFiles`]): memory-mapped single files or the shards a
//! `*.safetensors.index.json` lists, every tensor read as f32.
//!
//! Try it: `rewire inspect models/tiny-sd`.

use super::{WeightError, WeightSource};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

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

//! Reading a `tokenizer/` folder: finding it, its special tokens and length
//! (`tokenizer_config.json`, `special_tokens_map.json`), `merges.txt`, and CLIP's BPE pipeline
//! built from `vocab.json` + `merges.txt` when there is no `tokenizer.json`.
//!
//! Try it: `cargo test --release --test tokenizer`.

use super::{
    CLIP_PATTERN, DEFAULT_BOS, DEFAULT_EOS, DEFAULT_MAX_LENGTH, END_OF_WORD, TokenizerError,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormSeq};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};

pub(super) const TOKENIZER_JSON: &str = "tokenizer.json";
pub(super) const VOCAB_JSON: &str = "vocab.json";
pub(super) const MERGES_TXT: &str = "merges.txt";
pub(super) const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";

fn has_vocab(dir: &Path) -> bool {
    [TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT]
        .iter()
        .any(|f| dir.join(f).is_file())
}

/// Resolves a `tokenizer/` folder, a pipeline folder holding one, or a file inside one.
pub(super) fn resolve_dir(path: &Path) -> Result<PathBuf, TokenizerError> {
    if !path.exists() {
        return Err(TokenizerError::NotFound {
            path: path.to_path_buf(),
        });
    }
    if path.is_file() {
        return Ok(path.parent().unwrap_or(Path::new(".")).to_path_buf());
    }
    if !has_vocab(path) && path.join("tokenizer").is_dir() {
        return Ok(path.join("tokenizer"));
    }
    Ok(path.to_path_buf())
}

fn read(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn hint_for(path: &Path) -> &'static str {
    match path.file_name().and_then(|f| f.to_str()) {
        Some(TOKENIZER_JSON) => {
            "the file may be truncated: copy it again, or delete it to build the tokenizer from vocab.json and merges.txt"
        }
        Some(VOCAB_JSON) => {
            "vocab.json maps each token to its id ({\"token\": id, ...}); the file may be truncated: copy it again"
        }
        _ => "the file may be truncated or hand-edited: copy it again from the pipeline",
    }
}

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TokenizerError> {
    let text = read(path)?;
    serde_json::from_str(&text).map_err(|e| TokenizerError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
        hint: hint_for(path),
    })
}

/// A special token as configs write it: a string, or an `AddedToken` object with `content`.
fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(m) => m.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// What `tokenizer_config.json` and `special_tokens_map.json` say.
pub(super) struct Specials {
    pub(super) bos: (String, PathBuf),
    pub(super) eos: (String, PathBuf),
    pub(super) pad: (String, PathBuf),
    pub(super) unk: String,
    pub(super) max_length: usize,
}

pub(super) fn read_specials(dir: &Path) -> Result<Specials, TokenizerError> {
    let mut found: HashMap<&'static str, (String, PathBuf)> = HashMap::new();
    let mut max_length = DEFAULT_MAX_LENGTH;
    // transformers lets special_tokens_map.json override tokenizer_config.json.
    for file in [SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG] {
        let path = dir.join(file);
        if !path.is_file() {
            continue;
        }
        let v: serde_json::Value = parse_json(&path)?;
        for role in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(t) = v.get(role).and_then(token_text) {
                found.entry(role).or_insert((t, path.clone()));
            }
        }
        if file == TOKENIZER_CONFIG
            && let Some(n) = v.get("model_max_length").and_then(|n| n.as_f64())
        {
            // transformers writes ~1e30 for "no limit"; CLIP has 77 positions.
            if n < 2.0 || n.fract() != 0.0 {
                return Err(TokenizerError::Invalid {
                    path,
                    message: format!(
                        "model_max_length = {n} is not a whole number of at least 2 (bos and eos)"
                    ),
                });
            }
            if n < 1e9 {
                max_length = n as usize;
            }
        }
    }
    let default = |t: &str| (t.to_string(), dir.join(TOKENIZER_CONFIG));
    let eos = found
        .remove("eos_token")
        .unwrap_or_else(|| default(DEFAULT_EOS));
    Ok(Specials {
        bos: found
            .remove("bos_token")
            .unwrap_or_else(|| default(DEFAULT_BOS)),
        pad: found.remove("pad_token").unwrap_or_else(|| eos.clone()),
        unk: found
            .remove("unk_token")
            .map(|(t, _)| t)
            .unwrap_or_else(|| eos.0.clone()),
        eos,
        max_length,
    })
}

pub(super) fn read_merges(path: &Path) -> Result<Vec<(String, String)>, TokenizerError> {
    let text = read(path)?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()))
            }
            _ => {
                return Err(TokenizerError::Merges {
                    path: path.to_path_buf(),
                    line: i + 1,
                    content: line.to_string(),
                });
            }
        }
    }
    Ok(merges)
}

/// CLIP's pipeline around a BPE model, as transformers' `CLIPConverter` builds it.
pub(super) fn build_clip(dir: &Path, unk: &str) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let vocab_path = dir.join(VOCAB_JSON);
    let merges_path = dir.join(MERGES_TXT);
    let vocab: HashMap<String, u32> = parse_json(&vocab_path)?;
    let vocab: Vocab = vocab.into_iter().collect();
    let merges = read_merges(&merges_path)?;
    let invalid =
        |path: &Path, e: Box<dyn std::error::Error + Send + Sync>| TokenizerError::Invalid {
            path: path.to_path_buf(),
            message: format!("cannot build the CLIP tokenizer: {e}"),
        };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk.to_string())
        .end_of_word_suffix(END_OF_WORD.to_string())
        .build()
        .map_err(|e| invalid(&merges_path, e))?;
    let replace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
        .map_err(|e| invalid(&vocab_path, e))?;
    let normalizer = NormSeq::new(vec![NFC.into(), replace.into(), Lowercase.into()]);
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| invalid(&vocab_path, e))?;
    let pre = PreSeq::new(vec![split.into(), ByteLevel::new(false, true, true).into()]);
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_normalizer(Some(normalizer))
        .with_pre_tokenizer(Some(pre))
        .with_decoder(Some(ByteLevel::new(true, true, true)));
    Ok(tk)
}

//! CLIP BPE tokenizer: a pipeline's `tokenizer/` folder read the way transformers'
//! `CLIPTokenizer(Fast)` reads it, on Hugging Face's `tokenizers` crate. From `tokenizer.json`
//! when present, else built from `vocab.json` + `merges.txt` (NFC, whitespace collapsed to one
//! space, lowercase; CLIP's pre-tokenizer regex; byte-level BPE with the `</w>` end-of-word
//! suffix). Special tokens, the pad token and `model_max_length` come from
//! `tokenizer_config.json` / `special_tokens_map.json`. Also maps a prompt's words to their token
//! positions, for prompt-to-prompt reweighting by word.
//!
//! Try it: `cargo test --release --test tokenizer` (encodes `tests/fixtures/tokenizer_cases.json`
//! with `models/tiny-sd/tokenizer`, from `tokenizer.json` and from `vocab.json` + `merges.txt`).

mod files;

use files::{
    MERGES_TXT, TOKENIZER_CONFIG, TOKENIZER_JSON, VOCAB_JSON, build_clip, parse_json,
    read_specials, resolve_dir,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Decoder, NormalizedString, Normalizer, PostProcessorWrapper};

/// CLIP's pre-tokenizer pattern (`CLIPTokenizer.pat`, as transformers' converter writes it).
pub const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The suffix CLIP's BPE puts on the last token of each word.
pub const END_OF_WORD: &str = "</w>";
/// Start token when the config names none.
pub const DEFAULT_BOS: &str = "<|startoftext|>";
/// End token (and unknown and pad token) when the config names none.
pub const DEFAULT_EOS: &str = "<|endoftext|>";
/// `model_max_length` when the config gives none (CLIP's 77 positions).
pub const DEFAULT_MAX_LENGTH: usize = 77;

/// Errors raised while opening a tokenizer folder.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "tokenizer folder {path} does not exist\n  hint: point rewire at a diffusers pipeline folder or its tokenizer/ folder"
    )]
    NotFound { path: PathBuf },
    #[error(
        "no tokenizer vocabulary in {dir}: {missing}\n  hint: a CLIP tokenizer folder holds tokenizer.json, or vocab.json and merges.txt (as diffusers saves them); copy the pipeline's tokenizer/ folder whole"
    )]
    NoVocab { dir: PathBuf, missing: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON at line {line}, column {column}: {message}\n  hint: {hint}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
        hint: &'static str,
    },
    #[error(
        "{path}:{line}: malformed merge rule {content:?}, expected two tokens separated by a space\n  hint: merges.txt holds one `left right` pair per line after its `#version` header; the file may be truncated"
    )]
    Merges {
        path: PathBuf,
        line: usize,
        content: String,
    },
    #[error(
        "{path}: {role} token {token:?} is not in the vocabulary\n  hint: the tokenizer config does not match its vocabulary; copy the tokenizer/ folder whole"
    )]
    UnknownToken {
        path: PathBuf,
        role: &'static str,
        token: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A CLIP tokenizer with its special tokens and length.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    source: PathBuf,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
}

impl Tokenizer {
    /// Opens a pipeline's `tokenizer/` folder (or the pipeline folder holding it).
    pub fn open(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let dir = resolve_dir(path)?;
        let specials = read_specials(&dir)?;
        let json = dir.join(TOKENIZER_JSON);
        let from_json = json.is_file();
        let (mut inner, source) = if from_json {
            let tk: tokenizers::Tokenizer = parse_json(&json)?;
            (tk, json)
        } else {
            let (v, m) = (
                dir.join(VOCAB_JSON).is_file(),
                dir.join(MERGES_TXT).is_file(),
            );
            if !(v && m) {
                let missing = match (v, m) {
                    (true, _) => format!("{MERGES_TXT} is missing (found {VOCAB_JSON})"),
                    (_, true) => format!("{VOCAB_JSON} is missing (found {MERGES_TXT})"),
                    _ if dir.join(TOKENIZER_CONFIG).is_file() => format!(
                        "found {TOKENIZER_CONFIG} but no {TOKENIZER_JSON}, {VOCAB_JSON} or {MERGES_TXT}"
                    ),
                    _ => format!("no {TOKENIZER_JSON}, {VOCAB_JSON} or {MERGES_TXT}"),
                };
                return Err(TokenizerError::NoVocab {
                    dir: dir.clone(),
                    missing,
                });
            }
            (build_clip(&dir, &specials.unk)?, dir.join(VOCAB_JSON))
        };
        // Length and specials are handled here, not by the file's own post-processing.
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError::Invalid {
                path: source.clone(),
                message: e.to_string(),
            })?
            .with_padding(None)
            .with_post_processor(None::<PostProcessorWrapper>);
        let id = |(token, path): &(String, PathBuf), role: &'static str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::UnknownToken {
                    path: path.clone(),
                    role,
                    token: token.clone(),
                })
        };
        let (bos, eos, pad) = (
            id(&specials.bos, "bos")?,
            id(&specials.eos, "eos")?,
            id(&specials.pad, "pad")?,
        );
        if !from_json {
            // As tokenizer.json's `added_tokens`: typed in a prompt, they stay whole. The pad
            // token is not one (SDXL's second tokenizer pads with "!").
            inner.add_special_tokens(&[
                AddedToken::from(specials.bos.0.clone(), true),
                AddedToken::from(specials.eos.0.clone(), true),
            ]);
        }
        Ok(Tokenizer {
            inner,
            dir,
            source,
            bos,
            eos,
            pad,
            max_length: specials.max_length,
        })
    }

    /// The `tokenizer/` folder this was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file the vocabulary came from: `tokenizer.json` or `vocab.json`.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// `model_max_length`: the length of [`Tokenizer::encode`]'s output.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Vocabulary size, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The prompt's tokens, without bos and eos, with byte offsets into the prompt.
    fn content(&self, prompt: &str) -> tokenizers::Encoding {
        // CLIP's pipeline cannot fail: every byte has a token and the regexes run on
        // whitespace-free pieces.
        self.inner
            .encode(prompt, false)
            .unwrap_or_else(|e| panic!("tokenizer {}: {e}", self.source.display()))
    }

    /// bos + the prompt's tokens + eos, truncated to `max_length` (eos kept last) and padded
    /// with the pad token to `max_length`: the text encoder's input.
    pub fn encode(&self, prompt: &str) -> Vec<u32> {
        let content = self.content(prompt);
        let body = content.get_ids();
        let keep = body.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        ids
    }

    /// When the prompt has more tokens than the text encoder reads (bos and eos included):
    /// its token count and the text that truncation cuts off.
    pub fn truncation<'p>(&self, prompt: &'p str) -> Option<(usize, &'p str)> {
        let content = self.content(prompt);
        let keep = self.max_length.saturating_sub(2);
        let n = content.len();
        if n <= keep {
            return None;
        }
        let start = content
            .get_offsets()
            .get(keep)
            .map_or(prompt.len(), |o| o.0);
        Some((n + 2, prompt.get(start..).unwrap_or("")))
    }

    /// bos + the prompt's tokens + eos, neither truncated nor padded.
    pub fn encode_unpadded(&self, prompt: &str) -> Vec<u32> {
        let content = self.content(prompt);
        let mut ids = Vec::with_capacity(content.len() + 2);
        ids.push(self.bos);
        ids.extend_from_slice(content.get_ids());
        ids.push(self.eos);
        ids
    }

    /// A token's text: byte-level decoded, without the `</w>` end-of-word suffix (a token that
    /// holds part of a character decodes to U+FFFD). An id outside the vocabulary gives "".
    pub fn decode_token(&self, id: u32) -> String {
        let Some(token) = self.inner.id_to_token(id) else {
            return String::new();
        };
        let token = token
            .strip_suffix(END_OF_WORD)
            .unwrap_or(&token)
            .to_string();
        ByteLevel::default()
            .decode(vec![token.clone()])
            .unwrap_or(token)
    }

    /// The tokenizer's normalisation (NFC, whitespace collapsed, lowercase) of `text`.
    fn normalize(&self, text: &str) -> String {
        let mut n = NormalizedString::from(text);
        if let Some(norm) = self.inner.get_normalizer()
            && norm.normalize(&mut n).is_err()
        {
            return text.to_lowercase();
        }
        n.get().to_lowercase()
    }

    /// Each whitespace-separated word of `prompt` → the positions, in [`Tokenizer::encode`]'s
    /// ids (the first word token is at 1), of the tokens it was split into. Words are
    /// normalised (lowercased) and lose the punctuation CLIP splits off their start and end:
    /// in `"a cat, oil painting!"`, `"cat"` is the `cat` token alone and the `,` belongs to no
    /// word (`"x-ray's"` keeps its inner `-`). A word of punctuation only keeps its tokens. A
    /// word said twice lists the positions of both; positions cut by truncation are left out,
    /// and so are words left with none.
    pub fn word_positions(&self, prompt: &str) -> HashMap<String, Vec<usize>> {
        let content = self.content(prompt);
        let offsets = content.get_offsets();
        let last = self.max_length - 2; // positions 1..=last hold prompt tokens
        let words = whitespace_words(prompt);
        // Tokens never straddle whitespace, so each belongs to the word its start lies in.
        let mut per_word: Vec<Vec<(usize, (usize, usize))>> = vec![Vec::new(); words.len()];
        let mut w = 0;
        for (i, &(s, e)) in offsets.iter().enumerate() {
            while w + 1 < words.len() && words[w].1 <= s {
                w += 1;
            }
            if let Some(slot) = per_word.get_mut(w) {
                slot.push((i + 1, (s, e)));
            }
        }
        let is_word_token = |(s, e): (usize, usize)| {
            prompt
                .get(s..e)
                .is_none_or(|t| t.chars().any(char::is_alphanumeric))
        };
        let mut map: HashMap<String, Vec<usize>> = HashMap::new();
        for tokens in per_word {
            let first = tokens.iter().position(|t| is_word_token(t.1));
            let end = tokens.iter().rposition(|t| is_word_token(t.1));
            let kept = match (first, end) {
                (Some(a), Some(b)) => &tokens[a..=b],
                _ => &tokens[..],
            };
            let (Some(a), Some(b)) = (kept.first(), kept.last()) else {
                continue;
            };
            let Some(text) = prompt.get(a.1.0..b.1.1) else {
                continue;
            };
            let positions: Vec<usize> = kept.iter().map(|t| t.0).filter(|&p| p <= last).collect();
            if positions.is_empty() {
                continue;
            }
            map.entry(self.normalize(text))
                .or_default()
                .extend(positions);
        }
        map
    }
}

/// Byte spans of the whitespace-separated words of `text`.
fn whitespace_words(text: &str) -> Vec<(usize, usize)> {
    let mut words = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                words.push((s, i));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        words.push((s, text.len()));
    }
    words
}

#[cfg(test)]
mod tests {
    use super::files::read_merges;
    use super::*;

    #[test]
    fn whitespace_words_spans() {
        assert_eq!(
            whitespace_words("  a bc\t d "),
            vec![(2, 3), (4, 6), (8, 9)]
        );
        assert!(whitespace_words(" \n ").is_empty());
    }

    #[test]
    fn merges_reject_a_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(MERGES_TXT);
        std::fs::write(&p, "#version: 0.2\ni n\nthree parts here\n").unwrap();
        let e = read_merges(&p).unwrap_err();
        assert!(matches!(e, TokenizerError::Merges { line: 3, .. }), "{e}");
    }
}

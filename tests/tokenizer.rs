//! The CLIP tokenizer against transformers' `CLIPTokenizer` on `models/tiny-sd/tokenizer`
//! (`tests/fixtures/tokenizer_cases.json`), read from `tokenizer.json` and from `vocab.json` +
//! `merges.txt` alone; word positions for prompt-to-prompt; errors for broken folders.
//!
//! Try it: `cargo test --release --test tokenizer`.

use rewire::clip::tokenizer::{Tokenizer, TokenizerError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(serde::Deserialize)]
struct Cases {
    pad_token_id: u32,
    bos_token_id: u32,
    eos_token_id: u32,
    max_length: usize,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    unpadded_ids: Vec<u32>,
    decoded_tokens: Vec<String>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny_tokenizer() -> PathBuf {
    root().join("models/tiny-sd/tokenizer")
}

fn cases() -> Cases {
    let path = root().join("tests/fixtures/tokenizer_cases.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A tokenizer folder holding only `vocab.json`, `merges.txt` and `tokenizer_config.json`.
fn vocab_only() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(tiny_tokenizer().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn check_cases(tk: &Tokenizer) {
    let fx = cases();
    assert_eq!(tk.bos_id(), fx.bos_token_id);
    assert_eq!(tk.eos_id(), fx.eos_token_id);
    assert_eq!(tk.pad_id(), fx.pad_token_id);
    assert_eq!(tk.max_length(), fx.max_length);
    assert!(!fx.cases.is_empty());
    for c in &fx.cases {
        assert_eq!(tk.encode(&c.prompt), c.input_ids, "encode({:?})", c.prompt);
        assert_eq!(
            tk.encode_unpadded(&c.prompt),
            c.unpadded_ids,
            "encode_unpadded({:?})",
            c.prompt
        );
        let inner = &c.unpadded_ids[1..c.unpadded_ids.len() - 1];
        let decoded: Vec<String> = inner.iter().map(|&id| tk.decode_token(id)).collect();
        assert_eq!(decoded, c.decoded_tokens, "decode_token for {:?}", c.prompt);
    }
}

#[test]
fn fixture_cases_from_tokenizer_json() {
    let tk = Tokenizer::open(&tiny_tokenizer()).unwrap();
    assert!(tk.source().ends_with("tokenizer.json"), "{:?}", tk.source());
    check_cases(&tk);
}

#[test]
fn fixture_cases_from_vocab_and_merges() {
    let dir = vocab_only();
    let tk = Tokenizer::open(dir.path()).unwrap();
    assert!(tk.source().ends_with("vocab.json"), "{:?}", tk.source());
    assert_eq!(
        tk.vocab_size(),
        Tokenizer::open(&tiny_tokenizer()).unwrap().vocab_size()
    );
    check_cases(&tk);
}

#[test]
fn pipeline_folder_is_accepted() {
    let tk = Tokenizer::open(&root().join("models/tiny-sd")).unwrap();
    assert!(tk.dir().ends_with("tokenizer"), "{:?}", tk.dir());
    assert_eq!(tk.encode("a photo of a cat")[..3], [49406, 320, 1125]);
}

#[test]
fn special_tokens_and_length_come_from_the_config() {
    let dir = vocab_only();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"model_max_length": 8, "pad_token": {"content": "!", "__type": "AddedToken"}}"#,
    )
    .unwrap();
    let tk = Tokenizer::open(dir.path()).unwrap();
    assert_eq!(tk.max_length(), 8);
    let bang = tk.pad_id();
    assert_eq!(tk.decode_token(bang), "!");
    let ids = tk.encode("a cat");
    assert_eq!(ids, [49406, 320, 2368, 49407, bang, bang, bang, bang]);
    // The pad token is not a special token: "!" in a prompt is tokenized as usual.
    assert_eq!(tk.encode_unpadded("cat!")[..2], [49406, 2368]);
    assert_ne!(tk.encode_unpadded("cat!")[2], bang);
    // Truncation keeps eos last.
    let long = tk.encode("one two three four five six seven eight");
    assert_eq!(long.len(), 8);
    assert_eq!(long[7], 49407);
}

fn positions(pairs: &[(&str, &[usize])]) -> HashMap<String, Vec<usize>> {
    pairs
        .iter()
        .map(|(w, p)| (w.to_string(), p.to_vec()))
        .collect()
}

#[test]
fn word_positions_of_a_simple_prompt() {
    let tk = Tokenizer::open(&tiny_tokenizer()).unwrap();
    assert_eq!(
        tk.word_positions("a photo of a cat"),
        positions(&[("a", &[1, 4]), ("photo", &[2]), ("of", &[3]), ("cat", &[5])])
    );
}

#[test]
fn word_positions_are_lowercased_without_punctuation() {
    let tk = Tokenizer::open(&tiny_tokenizer()).unwrap();
    let prompt = "A photo of a CAT riding a bicycle, oil painting!";
    // Tokens: a photo of a cat riding a bicycle , oil painting !
    assert_eq!(
        tk.word_positions(prompt),
        positions(&[
            ("a", &[1, 4, 7]),
            ("photo", &[2]),
            ("of", &[3]),
            ("cat", &[5]),
            ("riding", &[6]),
            ("bicycle", &[8]),
            ("oil", &[10]),
            ("painting", &[11]),
        ])
    );
    // The same with vocab.json + merges.txt.
    let dir = vocab_only();
    let tk2 = Tokenizer::open(dir.path()).unwrap();
    assert_eq!(tk2.word_positions(prompt), tk.word_positions(prompt));
}

#[test]
fn word_positions_agree_with_the_ids() {
    let tk = Tokenizer::open(&tiny_tokenizer()).unwrap();
    for c in cases().cases {
        let ids = tk.encode(&c.prompt);
        let map = tk.word_positions(&c.prompt);
        let mut seen = Vec::new();
        for (word, pos) in &map {
            assert!(!pos.is_empty(), "{word:?} in {:?}", c.prompt);
            for &p in pos {
                assert!(
                    (1..tk.max_length() - 1).contains(&p),
                    "{word:?} at {p} in {:?}",
                    c.prompt
                );
                assert!(!seen.contains(&p), "position {p} twice in {:?}", c.prompt);
                seen.push(p);
            }
            // Where every token is whole characters, a word's tokens spell it (per occurrence).
            let text: String = pos.iter().map(|&p| tk.decode_token(ids[p])).collect();
            let truncated = c.unpadded_ids.len() > tk.max_length();
            if !text.contains('\u{FFFD}') && !truncated {
                let n = text.chars().count() / word.chars().count().max(1);
                assert_eq!(text, word.repeat(n), "{word:?} in {:?}", c.prompt);
            }
        }
    }
    // Truncated: "word0" is whole, "word99" is cut away.
    let long = cases()
        .cases
        .into_iter()
        .find(|c| c.prompt.starts_with("word0 "))
        .unwrap();
    let map = tk.word_positions(&long.prompt);
    assert_eq!(map["word0"], [1, 2]);
    assert!(!map.contains_key("word99"));
    // Inner punctuation and contractions stay with their word.
    let map = tk.word_positions("don't stop: x-ray's");
    assert_eq!(map["don't"], [1, 2]);
    assert_eq!(map["stop"], [3]);
    assert_eq!(map["x-ray's"], [5, 6, 7, 8]);
    assert!(tk.word_positions("  ").is_empty());
}

#[test]
fn decode_token_strips_the_end_of_word_suffix() {
    let tk = Tokenizer::open(&tiny_tokenizer()).unwrap();
    assert_eq!(tk.decode_token(2368), "cat");
    assert_eq!(tk.decode_token(49406), "<|startoftext|>");
    assert_eq!(tk.decode_token(u32::MAX), "");
}

fn open_err(dir: &Path) -> TokenizerError {
    Tokenizer::open(dir).expect_err("opening must fail")
}

#[test]
fn missing_folder_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("nope");
    let e = open_err(&gone);
    assert!(matches!(e, TokenizerError::NotFound { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&gone.display().to_string()), "{msg}");
    assert!(msg.contains("hint:"), "{msg}");
}

#[test]
fn folder_without_vocab_names_folder_and_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_tokenizer().join("tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let e = open_err(dir.path());
    let msg = e.to_string();
    assert!(
        matches!(&e, TokenizerError::NoVocab { dir: d, .. } if d == dir.path()),
        "{msg}"
    );
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    for f in ["tokenizer.json", "vocab.json", "merges.txt"] {
        assert!(msg.contains(f), "{msg}");
    }
    assert!(msg.contains("hint:"), "{msg}");

    // vocab.json alone: merges.txt is named as missing.
    std::fs::copy(
        tiny_tokenizer().join("vocab.json"),
        dir.path().join("vocab.json"),
    )
    .unwrap();
    let msg = open_err(dir.path()).to_string();
    assert!(msg.contains("merges.txt is missing"), "{msg}");
}

#[test]
fn malformed_json_names_the_file() {
    let dir = vocab_only();
    std::fs::write(dir.path().join("vocab.json"), "{\"a\": 1,\n  \"b\": }").unwrap();
    let e = open_err(dir.path());
    let msg = e.to_string();
    assert!(
        matches!(&e, TokenizerError::Json { path, line: 2, .. } if path.ends_with("vocab.json")),
        "{msg}"
    );
    assert!(msg.contains("hint:"), "{msg}");

    let dir = vocab_only();
    std::fs::write(dir.path().join("tokenizer.json"), "{\"version\": \"1.0\"").unwrap();
    let e = open_err(dir.path());
    assert!(
        matches!(&e, TokenizerError::Json { path, .. } if path.ends_with("tokenizer.json")),
        "{e}"
    );

    let dir = vocab_only();
    std::fs::write(dir.path().join("tokenizer_config.json"), "not json").unwrap();
    let e = open_err(dir.path());
    assert!(
        matches!(&e, TokenizerError::Json { path, .. } if path.ends_with("tokenizer_config.json")),
        "{e}"
    );
}

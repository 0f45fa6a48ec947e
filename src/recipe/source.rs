//! A recipe as read: its file, its text, the parsed [`Recipe`] and the position tree that
//! locates every error (`recipe.ron:LINE:COL`, what is wrong, a hint).
//!
//! Try it: `rewire check rewrites/reweight.ron --model models/tiny-sd`.

use super::spans::{Node, Pos, Seg};
use super::*;
use std::path::{Path, PathBuf};

/// A parsed recipe with its source, for locating errors.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: PathBuf,
    pub text: String,
    pub recipe: Recipe,
    tree: Option<Node>,
}

impl Source {
    /// Reads and parses a recipe file.
    pub fn load(path: &Path) -> Result<Source, RecipeError> {
        use crate::limits::{MAX_RECIPE_BYTES, ReadError, read_text_capped};
        let text =
            read_text_capped(path, MAX_RECIPE_BYTES, "MAX_RECIPE_BYTES").map_err(|e| match e {
                ReadError::Io(source) => RecipeError::Read {
                    path: path.to_path_buf(),
                    source,
                },
                ReadError::Utf8 { line, col, byte } => RecipeError::At {
                    file: path.to_path_buf(),
                    line,
                    col,
                    code: "utf8",
                    message: format!("not valid UTF-8 (byte {byte})"),
                    hint: "save the recipe as UTF-8 text".into(),
                },
                too_big @ ReadError::TooBig { .. } => RecipeError::At {
                    file: path.to_path_buf(),
                    line: 1,
                    col: 1,
                    code: "too-big",
                    message: "the recipe file is too large".into(),
                    hint: too_big.to_string(),
                },
            })?;
        Source::parse(&text, path)
    }

    /// Parses recipe text; `file` names it in messages.
    pub fn parse(text: &str, file: &Path) -> Result<Source, RecipeError> {
        let recipe: Recipe = ron::from_str(text).map_err(|e| {
            let hint = match &e.code {
                ron::Error::NoSuchStructField { .. } | ron::Error::MissingStructField { .. } => {
                    "see docs/recipes.md for the fields of each part of a recipe".to_string()
                }
                ron::Error::NoSuchEnumVariant { .. } => {
                    "ops are Reweight, Store, ReplaceMaps, ReplaceKv, MergeKv, MergeTokens and Cache; see docs/recipes.md".to_string()
                }
                _ => "see docs/recipes.md for the recipe grammar".to_string(),
            };
            RecipeError::At {
                file: file.to_path_buf(),
                line: e.position.line,
                col: e.position.col,
                code: "syntax",
                message: e.code.to_string(),
                hint,
            }
        })?;
        let src = Source {
            file: file.to_path_buf(),
            text: text.to_string(),
            recipe,
            tree: spans::parse(text),
        };
        if let Err(e) = crate::limits::at_most(
            src.recipe.rewrites.len(),
            crate::limits::MAX_REWRITES,
            "MAX_REWRITES",
        ) {
            return Err(src.error(
                &[
                    Seg::Field("rewrites"),
                    Seg::Index(crate::limits::MAX_REWRITES),
                ],
                "too-many",
                format!("the recipe has too many rewrites: {e}"),
                "split the recipe, or select several layers with one rewrite (globs, kind, place)",
            ));
        }
        Ok(src)
    }

    /// The source position of the value at `path` (or the closest enclosing one).
    pub fn pos(&self, path: &[Seg]) -> Pos {
        self.tree
            .as_ref()
            .map(|t| t.locate(path))
            .unwrap_or(Pos { line: 1, col: 1 })
    }

    /// Whether a value is written out at `path` (not defaulted).
    pub fn written(&self, path: &[Seg]) -> bool {
        self.tree.as_ref().is_some_and(|t| t.find(path).is_some())
    }

    /// A located error at `path`.
    pub fn error(
        &self,
        path: &[Seg],
        code: &'static str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> RecipeError {
        let p = self.pos(path);
        RecipeError::At {
            file: self.file.clone(),
            line: p.line,
            col: p.col,
            code,
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// A fingerprint of the recipe text.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(self.text.as_bytes()))
    }
}

/// The path of rewrite `i`'s field, for locating errors.
pub fn at(i: usize, rest: &[Seg]) -> Vec<Seg> {
    let mut v = vec![Seg::Field("rewrites"), Seg::Index(i)];
    v.extend_from_slice(rest);
    v
}

//! Layer selection: path globs (with `exclude`), kind, place, query-count and resolution bounds,
//! evaluated against a model's attention layers. A selector that matches nothing says which
//! criterion removed the last candidates and shows the nearest real paths.

use super::{Kind, PlaceSel, Select};
use crate::graph::{AttnInfo, AttnKind, Place};

/// A compiled path glob (`*` matches any run of characters, dots included; `?` one character).
#[derive(Debug, Clone)]
pub struct Glob(glob::Pattern);

impl Glob {
    pub fn new(p: &str) -> Result<Glob, String> {
        glob::Pattern::new(p)
            .map(Glob)
            .map_err(|e| e.msg.to_string())
    }

    pub fn matches(&self, path: &str) -> bool {
        self.0.matches(path)
    }
}

/// Whether a glob can match any attention path of any diffusers UNet (block, attention and
/// transformer-block indices up to generous bounds): a glob that cannot is a typo.
pub fn plausible(g: &Glob) -> bool {
    for part in ["down_blocks", "up_blocks"] {
        for b in 0..8 {
            for a in 0..4 {
                for t in 0..12 {
                    for n in 1..=2 {
                        let p = format!("{part}.{b}.attentions.{a}.transformer_blocks.{t}.attn{n}");
                        if g.matches(&p) {
                            return true;
                        }
                    }
                }
            }
        }
    }
    for a in 0..2 {
        for t in 0..12 {
            for n in 1..=2 {
                if g.matches(&format!(
                    "mid_block.attentions.{a}.transformer_blocks.{t}.attn{n}"
                )) {
                    return true;
                }
            }
        }
    }
    false
}

/// One attention layer as selection sees it.
#[derive(Debug, Clone)]
pub struct Layer<'a> {
    pub path: &'a str,
    pub info: &'a AttnInfo,
}

/// Why a selection is empty: the criterion that removed the last candidates and how many it
/// removed.
#[derive(Debug, Clone)]
pub struct Empty {
    pub criterion: &'static str,
    pub removed: usize,
}

/// Evaluates a selector; globs must already have been checked with [`Glob::new`].
pub fn select(sel: &Select, layers: &[Layer]) -> Result<Vec<usize>, Empty> {
    let globs: Vec<Glob> = sel.paths.iter().filter_map(|p| Glob::new(p).ok()).collect();
    let excl: Vec<Glob> = sel
        .exclude
        .iter()
        .filter_map(|p| Glob::new(p).ok())
        .collect();
    type Crit<'c> = (&'static str, Box<dyn Fn(&Layer) -> bool + 'c>);
    let crits: Vec<Crit> = vec![
        (
            "paths",
            Box::new(|l: &Layer| globs.is_empty() || globs.iter().any(|g| g.matches(l.path))),
        ),
        (
            "exclude",
            Box::new(|l: &Layer| !excl.iter().any(|g| g.matches(l.path))),
        ),
        (
            "kind",
            Box::new(|l: &Layer| match sel.kind {
                None => true,
                Some(Kind::SelfAttn) => l.info.kind == AttnKind::SelfAttn,
                Some(Kind::Cross) => l.info.kind == AttnKind::Cross,
            }),
        ),
        (
            "place",
            Box::new(|l: &Layer| {
                sel.place.is_empty()
                    || sel.place.iter().any(|p| {
                        matches!(
                            (p, l.info.place),
                            (PlaceSel::Down, Place::Down)
                                | (PlaceSel::Mid, Place::Mid)
                                | (PlaceSel::Up, Place::Up)
                        )
                    })
            }),
        ),
        (
            "max_queries",
            Box::new(|l: &Layer| sel.max_queries.is_none_or(|m| l.info.queries <= m)),
        ),
        (
            "min_queries",
            Box::new(|l: &Layer| sel.min_queries.is_none_or(|m| l.info.queries >= m)),
        ),
        (
            "max_downsample",
            Box::new(|l: &Layer| sel.max_downsample.is_none_or(|m| l.info.downsample <= m)),
        ),
    ];
    let mut alive: Vec<usize> = (0..layers.len()).collect();
    for (name, f) in &crits {
        let before = alive.len();
        alive.retain(|&i| f(&layers[i]));
        if alive.is_empty() {
            return Err(Empty {
                criterion: name,
                removed: before,
            });
        }
    }
    Ok(alive)
}

/// The real paths closest to a glob (by edit distance to the glob with `*` removed).
pub fn nearest<'a>(pattern: &str, paths: &[&'a str], n: usize) -> Vec<&'a str> {
    let p = pattern.replace('*', "");
    let mut scored: Vec<(f64, &str)> = paths
        .iter()
        .map(|q| {
            // Compare against the same-length prefix of the path, so short globs are fair.
            let prefix: String = q.chars().take(p.chars().count().max(1)).collect();
            (strsim::normalized_levenshtein(&p, &prefix), *q)
        })
        .collect();
    scored.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
    let mut out: Vec<&str> = Vec::new();
    for (_, q) in scored {
        if !out.contains(&q) {
            out.push(q);
        }
        if out.len() == n {
            break;
        }
    }
    out
}

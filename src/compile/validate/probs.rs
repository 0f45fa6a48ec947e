//! Validating the probability rewrites (Reweight, Store, ReplaceMaps): each field that cannot
//! work on the selected layers is a located error.
//!
//! Try it: `cargo test --release --test validation`.

use super::Check;
use crate::compile::{CompileError, reweight_product};
use crate::graph::AttnKind;
use crate::recipe::spans::Seg;
use crate::recipe::{RewriteOp, at};

/// Reweight: cross-attention only, token and word weights (resolved into `weights`, or noted unbound).
pub(super) fn reweight(
    c: &Check,
    op: &RewriteOp,
    chosen: &[usize],
    weights: &mut [Option<Vec<f32>>],
    unbound_words: &mut Vec<usize>,
) -> Result<(), CompileError> {
    let Check {
        src,
        layers,
        opts,
        i,
        text_len,
        ref op_path,
        ref kind_path,
        ..
    } = *c;
    let RewriteOp::Reweight { tokens, words, .. } = op else {
        unreachable!("dispatched on the op")
    };
    if let Some(&j) = chosen
        .iter()
        .find(|&&j| layers[j].2.kind == AttnKind::SelfAttn)
    {
        let n = chosen
            .iter()
            .filter(|&&j| layers[j].2.kind == AttnKind::SelfAttn)
            .count();
        return Err(src
                    .error(
                        kind_path,
                        "self-attention",
                        format!(
                            "Reweight acts on cross-attention (one weight per prompt token) but the selection includes {n} self-attention layer{} (e.g. {})",
                            if n == 1 { "" } else { "s" },
                            layers[j].1
                        ),
                        "add kind: Some(Cross) to the select",
                    )
                    .into());
    }
    if tokens.is_empty() && words.is_empty() {
        return Err(src
            .error(
                op_path,
                "empty",
                "Reweight names no token and no word",
                "write Reweight(tokens: {2: 2.5}) or Reweight(words: {\"cat\": 2.0})",
            )
            .into());
    }
    let mut w = vec![1.0f32; text_len];
    for (&t, &x) in tokens {
        let p = at(
            i,
            &[
                Seg::Field("op"),
                Seg::Field("tokens"),
                Seg::Key(t.to_string()),
            ],
        );
        if t >= text_len {
            return Err(src
                        .error(&p, "token-range", format!("token index {t} is outside the text of {text_len} tokens"), format!("token positions run 0..{text_len}; position 0 is the start token, the prompt's words start at 1"))
                        .into());
        }
        if !(x.is_finite() && (0.0..=crate::limits::MAX_REWEIGHT).contains(&x)) {
            return Err(src
                        .error(
                            &p,
                            "weight",
                            format!(
                                "weight {x} for token {t} is not a number in [0, {}] (src/limits.rs: MAX_REWEIGHT)",
                                crate::limits::MAX_REWEIGHT
                            ),
                            "attention weights scale probabilities: prompt-to-prompt uses 0 to about 10",
                        )
                        .into());
        }
        w[t] *= x;
        reweight_product(src, &p, w[t])?;
    }
    for (word, &x) in words {
        let p = at(
            i,
            &[
                Seg::Field("op"),
                Seg::Field("words"),
                Seg::Key(word.clone()),
            ],
        );
        if word.trim().is_empty() {
            return Err(src
                .error(
                    &p,
                    "word",
                    format!("word {word:?} is empty"),
                    "name a word of the prompt, e.g. Reweight(words: {\"cat\": 2.0})",
                )
                .into());
        }
        if !(x.is_finite() && (0.0..=crate::limits::MAX_REWEIGHT).contains(&x)) {
            return Err(src
                        .error(
                            &p,
                            "weight",
                            format!(
                                "weight {x} for \"{word}\" is not a number in [0, {}] (src/limits.rs: MAX_REWEIGHT)",
                                crate::limits::MAX_REWEIGHT
                            ),
                            "attention weights scale probabilities: prompt-to-prompt uses 0 to about 10",
                        )
                        .into());
        }
        match &opts.words {
            Some(map) => match map.get(word) {
                Some(pos) if !pos.is_empty() => {
                    for &t in pos {
                        if t < text_len {
                            w[t] *= x;
                            reweight_product(src, &p, w[t])?;
                        }
                    }
                }
                _ => {
                    return Err(src
                        .error(
                            &p,
                            "word",
                            format!("word \"{word}\" is not in the prompt"),
                            format!("the prompt's words are: {}", {
                                let mut k: Vec<&String> = map.keys().collect();
                                k.sort();
                                k.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                            }),
                        )
                        .into());
                }
            },
            None if opts.require_bound_words => {
                return Err(src
                            .error(&p, "unbound-words", format!("Reweight by word (\"{word}\") needs a prompt to find the word's tokens"), "give a prompt (rewire run --prompt ..., or rewire compile --prompt ...) or use tokens: {POSITION: WEIGHT}")
                            .into());
            }
            None => {
                // Rewrites are visited in order: checking the last suffices.
                if unbound_words.last() != Some(&i) {
                    unbound_words.push(i);
                }
            }
        }
    }
    weights[i] = Some(w);
    Ok(())
}

/// Store: a plain name, `on: Disk` only with `reduce: Each`, `max_queries` narrowing the layers.
pub(super) fn store(
    c: &Check,
    op: &RewriteOp,
    chosen: &mut Vec<usize>,
) -> Result<(), CompileError> {
    let Check { src, layers, i, .. } = *c;
    let RewriteOp::Store {
        max_queries,
        on,
        reduce,
        name,
        ..
    } = op
    else {
        unreachable!("dispatched on the op")
    };
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        return Err(src
            .error(
                &at(i, &[Seg::Field("op"), Seg::Field("name")]),
                "store",
                format!("store name \"{name}\" is not a plain name"),
                "name a store with letters, digits, _ and - (at most 64), e.g. \"inv\"",
            )
            .into());
    }
    if *on == crate::recipe::StoreOn::Disk && *reduce != crate::recipe::Reduce::Each {
        return Err(src
                    .error(
                        &at(i, &[Seg::Field("op"), Seg::Field("on")]),
                        "store",
                        format!("on: Disk spills every step's maps of a `reduce: Each` store; this store reduces the steps to one tensor ({reduce:?})"),
                        "write reduce: Each with on: Disk, or drop on: Disk",
                    )
                    .into());
    }
    if let Some(m) = max_queries {
        chosen.retain(|&j| layers[j].2.queries <= *m);
        if chosen.is_empty() {
            return Err(src
                .error(
                    &at(i, &[Seg::Field("op"), Seg::Field("max_queries")]),
                    "no-match",
                    format!("Store's max_queries: {m} leaves none of the selected layers"),
                    "raise max_queries or select layers with fewer queries",
                )
                .into());
        }
    }
    Ok(())
}

/// ReplaceMaps: the batch items (from, to) or the branch for stored maps, self-attention only under `self_max_queries`.
pub(super) fn replace_maps(
    c: &Check,
    op: &RewriteOp,
    chosen: &mut Vec<usize>,
    items: &mut Vec<usize>,
) -> Result<(), CompileError> {
    let Check {
        src,
        layers,
        i,
        spec,
        branch,
        ref branch_items,
        ref op_path,
        ref kind_path,
        ..
    } = *c;
    let RewriteOp::ReplaceMaps {
        from,
        to,
        self_max_queries,
    } = op
    else {
        unreachable!("dispatched on the op")
    };
    let pair = match (from, to) {
        (crate::recipe::MapSource::BatchItem(f), Some(t)) => Some((*f, t.0)),
        (crate::recipe::MapSource::BatchItem(_), None) => {
            return Err(src
                .error(
                    op_path,
                    "batch-item",
                    "ReplaceMaps from a batch item needs `to`, the item that takes its maps",
                    "e.g. ReplaceMaps(from: BatchItem(2), to: BatchItem(3))",
                )
                .into());
        }
        (crate::recipe::MapSource::Stored(_), Some(_)) => {
            return Err(src
                        .error(
                            &at(i, &[Seg::Field("op"), Seg::Field("to")]),
                            "batch-item",
                            "ReplaceMaps from Stored(...) replaces the maps of the rewrite's branch: `to` does not apply",
                            "drop `to`; set branch: (Cond, Uncond or Both) to choose the items (item k of the branch takes stored row k)",
                        )
                        .into());
        }
        (crate::recipe::MapSource::Stored(_), None) => None,
    };
    for (name, item) in pair.iter().flat_map(|&(f, t)| [("from", f), ("to", t)]) {
        if item >= spec.batch {
            return Err(src
                        .error(
                            &at(i, &[Seg::Field("op"), Seg::Field(name)]),
                            "batch-item",
                            format!(
                                "BatchItem({}) is outside the batch of {}",
                                item, spec.batch
                            ),
                            {
                                // With guidance the batch is [uncond × P, cond × P].
                                let need = (item + 1).next_multiple_of(2);
                                format!(
                                    "batch items run 0..{} in diffusers order [uncond..., cond...]; BatchItem({}) needs a batch of at least {need}: give {} prompts (--prompt, repeated) or --batch {need}",
                                    spec.batch,
                                    item,
                                    need / 2
                                )
                            },
                        )
                        .into());
        }
        if !branch_items.contains(&item) {
            return Err(src
                .error(
                    &at(i, &[Seg::Field("op"), Seg::Field(name)]),
                    "batch-item",
                    format!(
                        "BatchItem({}) is not in the {:?} branch (items {:?})",
                        item, branch, branch_items
                    ),
                    "set branch: Both to reach any item, or pick an item of the branch",
                )
                .into());
        }
    }
    if pair.is_some_and(|(f, t)| f == t) {
        return Err(src
            .error(
                op_path,
                "batch-item",
                "ReplaceMaps from and to are the same item",
                "replace one prompt's maps with another's",
            )
            .into());
    }
    let selfs: Vec<usize> = chosen
        .iter()
        .copied()
        .filter(|&j| layers[j].2.kind == AttnKind::SelfAttn)
        .collect();
    match self_max_queries {
        None if !selfs.is_empty() => {
            return Err(src
                        .error(
                            kind_path,
                            "self-attention",
                            format!("ReplaceMaps would replace self-attention maps on {} layer{} (e.g. {}) but self_max_queries is not set", selfs.len(), if selfs.len() == 1 { "" } else { "s" }, layers[selfs[0]].1),
                            "add kind: Some(Cross), or set self_max_queries: Some(N) to replace self-attention maps on layers with at most N queries (prompt-to-prompt: 16×16 = 256 on SD's 64×64 latents)",
                        )
                        .into());
        }
        Some(m) => {
            chosen.retain(|&j| layers[j].2.kind == AttnKind::Cross || layers[j].2.queries <= *m)
        }
        None => {}
    }
    if chosen.is_empty() {
        return Err(src
            .error(
                op_path,
                "no-match",
                "ReplaceMaps' self_max_queries leaves none of the selected layers",
                "raise self_max_queries",
            )
            .into());
    }
    *items = match pair {
        Some((f, t)) => vec![f, t],
        None => branch_items.clone(),
    };
    Ok(())
}

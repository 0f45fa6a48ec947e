//! Where the rewrites land, before anything is built: each rewrite validated on its own (its
//! layers × batch items), the step segments their ranges cut the run into, and the conflicts
//! and order between rewrites on one layer or block. Every problem is a located error.
//!
//! Try it: `rewire check rewrites/p2p_word_swap.ron --model models/tiny-sd`.

use super::{CompileError, CompileOptions, Landing, validate};
use crate::graph::keys::Key;
use crate::graph::{AttnInfo, Graph};
use crate::recipe::spans::Seg;
use crate::recipe::{Recipe, RewriteOp, Source, Steps, at};
use petgraph::stable_graph::NodeIndex;
use std::collections::{BTreeMap, BTreeSet};

/// What validation found: where each rewrite of this pass lands, and what it resolved.
pub(super) struct Landed {
    /// Layer path → the rewrites landing there, in recipe order.
    pub landings: BTreeMap<String, Vec<Landing>>,
    /// Per rewrite: its per-token weights (a Reweight).
    pub weights: Vec<Option<Vec<f32>>>,
    /// Rewrites naming words still to be bound to a prompt.
    pub unbound_words: Vec<usize>,
    /// The recipe's `Cache`, resolved on the graph.
    pub cache: Option<super::cache::CacheSpec>,
    /// Per rewrite (of every pass): the layer indices it lands on, for the state check.
    pub lands: Vec<Option<Vec<usize>>>,
}

/// Validates every rewrite and finds where it lands; rewrites of other passes are validated on
/// this pass's shapes only to find their layers.
pub(super) fn land(
    src: &Source,
    base: &Graph,
    layers: &[(NodeIndex, String, AttnInfo)],
    opts: &CompileOptions,
    pass: Option<&str>,
) -> Result<Landed, CompileError> {
    let recipe = &src.recipe;
    let mut unbound_words = Vec::new();
    let mut cache: Option<super::cache::CacheSpec> = None;
    let here = |i: usize| recipe.rewrites[i].in_pass(pass);
    let mut landings: BTreeMap<String, Vec<Landing>> = BTreeMap::new();
    let mut weights: Vec<Option<Vec<f32>>> = vec![None; recipe.rewrites.len()];
    // Where each rewrite lands (layer indices), for the state check; rewrites of other passes
    // are validated on this pass's shapes only to find their layers.
    let mut lands: Vec<Option<Vec<usize>>> = vec![None; recipe.rewrites.len()];
    for (i, rw) in recipe.rewrites.iter().enumerate() {
        if !here(i) {
            let (mut w, mut u, mut c) = (vec![None; recipe.rewrites.len()], Vec::new(), None);
            lands[i] = validate::rewrite(src, base, layers, opts, i, rw, &mut w, &mut u, &mut c)
                .ok()
                .map(|(chosen, _)| chosen);
            continue;
        }
        let (chosen, items) = validate::rewrite(
            src,
            base,
            layers,
            opts,
            i,
            rw,
            &mut weights,
            &mut unbound_words,
            &mut cache,
        )?;
        lands[i] = Some(chosen.clone());
        for j in chosen {
            landings
                .entry(layers[j].1.clone())
                .or_default()
                .push(Landing {
                    rewrite: i,
                    items: items.clone(),
                });
        }
    }
    Ok(Landed {
        landings,
        weights,
        unbound_words,
        cache,
        lands,
    })
}

/// The step segments: the cuts of the rewrites' step ranges (`None`: one, all steps).
pub(super) fn segments(
    src: &Source,
    opts: &CompileOptions,
    pass: Option<&str>,
) -> Result<Vec<Option<(usize, usize)>>, CompileError> {
    let recipe = &src.recipe;
    let here = |i: usize| recipe.rewrites[i].in_pass(pass);
    let ranged: Vec<usize> = (0..recipe.rewrites.len())
        .filter(|&i| here(i) && recipe.rewrites[i].steps.is_some())
        .collect();
    if ranged.is_empty() {
        return Ok(vec![None]);
    }
    {
        let Some(n) = opts.steps else {
            return Err(src
                .error(
                    &at(ranged[0], &[Seg::Field("steps")]),
                    "steps",
                    "this recipe has step ranges, so it needs the length of the run",
                    "give the number of denoising steps (--steps N, and --step I for one forward)",
                )
                .into());
        };
        let mut cuts: BTreeSet<usize> = [0, n].into();
        for &i in &ranged {
            let (a, b) = recipe.rewrites[i].steps.expect("ranged").range(n);
            cuts.insert(a.min(n));
            cuts.insert(b.min(n));
        }
        let cuts: Vec<usize> = cuts.into_iter().collect();
        if let Err(e) =
            crate::limits::at_most(cuts.len() - 1, crate::limits::MAX_SEGMENTS, "MAX_SEGMENTS")
        {
            return Err(src
                .error(
                    &at(ranged[0], &[Seg::Field("steps")]),
                    "steps",
                    format!("the recipe's step ranges cut the run into too many segments: {e}"),
                    "use fewer distinct step ranges (each segment is a graph of its own)",
                )
                .into());
        }
        let mut segs: Vec<(usize, usize, Vec<bool>)> = Vec::new();
        for w in cuts.windows(2) {
            let active: Vec<bool> = recipe
                .rewrites
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    !here(i)
                        || r.steps.is_none_or(|s| {
                            let (a, b) = s.range(n);
                            a <= w[0] && w[1] <= b
                        })
                })
                .collect();
            match segs.last_mut() {
                Some(last) if last.2 == active => last.1 = w[1],
                _ => segs.push((w[0], w[1], active)),
            }
        }
        Ok(segs.into_iter().map(|(a, b, _)| Some((a, b))).collect())
    }
}

/// The conflicts between rewrites: one MergeTokens per transformer block, and two rewrites on
/// one layer whose order matters must state it.
pub(super) fn conflicts(
    src: &Source,
    opts: &CompileOptions,
    landings: &BTreeMap<String, Vec<Landing>>,
) -> Result<(), CompileError> {
    let recipe = &src.recipe;
    let mut blocks: BTreeMap<String, usize> = BTreeMap::new();
    for (path, ls) in landings {
        let block = path.rsplit_once('.').map(|(b, _)| b).unwrap_or(path);
        for l in ls
            .iter()
            .filter(|l| matches!(recipe.rewrites[l.rewrite].op, RewriteOp::MergeTokens { .. }))
        {
            match blocks.get(block) {
                Some(&other)
                    if other != l.rewrite
                        && overlap_in_time(
                            recipe.rewrites[other].steps,
                            recipe.rewrites[l.rewrite].steps,
                            opts.steps,
                        ) =>
                {
                    return Err(src
                        .error(
                            &at(l.rewrite.max(other), &[]),
                            "conflict",
                            format!("rewrites {} and {} both merge the tokens of block {block}", other.min(l.rewrite), other.max(l.rewrite)),
                            "one MergeTokens per transformer block: keep one, or give them disjoint steps",
                        )
                        .into());
                }
                _ => {
                    blocks.insert(block.to_string(), l.rewrite);
                }
            }
        }
    }

    // ---- order: two rewrites on one layer whose order matters must state it ----
    // Only pairs with at least one rewrite other than a plain (not renormalised) Reweight can
    // clash or depend on order, so the pairs checked are (others × all): linear in the number of
    // rewrites for the common recipe of many reweights.
    let check_pair = |path: &str, a: &Landing, b: &Landing| -> Result<(), CompileError> {
        let (ra, rb) = (&recipe.rewrites[a.rewrite], &recipe.rewrites[b.rewrite]);
        if overlap_in_time(ra.steps, rb.steps, opts.steps) {
            let clash = match (&ra.op, &rb.op) {
                (RewriteOp::Store { .. }, RewriteOp::Store { .. }) => Some(format!(
                    "rewrites {} and {} both Store {path}: one Store per layer (both would write probs.{path})",
                    a.rewrite, b.rewrite
                )),
                (
                    RewriteOp::ReplaceKv {
                        source: crate::recipe::KvSource::Stored(x),
                        ..
                    },
                    RewriteOp::ReplaceKv {
                        source: crate::recipe::KvSource::Stored(y),
                        ..
                    },
                ) if x == y => Some(format!(
                    "rewrites {} and {} both read reference \"{x}\" on {path}",
                    a.rewrite, b.rewrite
                )),
                (RewriteOp::MergeTokens { .. }, RewriteOp::MergeTokens { .. }) => Some(format!(
                    "rewrites {} and {} both merge the tokens of {path}'s block",
                    a.rewrite, b.rewrite
                )),
                _ => None,
            };
            if let Some(message) = clash {
                return Err(src
                    .error(
                        &at(b.rewrite, &[]),
                        "conflict",
                        message,
                        "keep one of them, or give them disjoint steps",
                    )
                    .into());
            }
            let merge_then_ref = |m: &crate::recipe::Rewrite, r: &crate::recipe::Rewrite| {
                m.op.is_kv()
                    && !matches!(m.op, RewriteOp::ReplaceKv { .. })
                    && matches!(
                        r.op,
                        RewriteOp::ReplaceKv {
                            source: crate::recipe::KvSource::Stored(_),
                            ..
                        }
                    )
            };
            if merge_then_ref(ra, rb) || merge_then_ref(rb, ra) {
                return Err(src
                    .error(
                        &at(b.rewrite, &[]),
                        "conflict",
                        format!("rewrites {} and {} merge tokens and read a reference on {path}: the reference pass records the unmerged K/V input", a.rewrite, b.rewrite),
                        "use the reference on other layers than the merge",
                    )
                    .into());
            }
        }
        if !order_matters(&ra.op, &rb.op) || a.items.iter().all(|i| !b.items.contains(i)) {
            return Ok(());
        }
        if !overlap_in_time(ra.steps, rb.steps, opts.steps) {
            return Ok(());
        }
        let (first, second) = if ra.order <= rb.order {
            (ra, rb)
        } else {
            (rb, ra)
        };
        if matches!(first.op, RewriteOp::ReplaceKv { .. })
            && matches!(
                second.op,
                RewriteOp::MergeKv { .. } | RewriteOp::MergeTokens { .. }
            )
            && ra.order.is_some()
            && rb.order.is_some()
        {
            return Err(src
                .error(&at(b.rewrite, &[]), "order", format!("{} must come before ReplaceKv on {path}: merging needs the layer's own token grid", second.op.name()), "give the merge the lower order")
                .into());
        }
        match (ra.order, rb.order) {
            (Some(p), Some(q)) if p != q => {}
            _ => {
                return Err(src
                    .error(
                        &at(b.rewrite, &[]),
                        "order",
                        format!(
                            "rewrites {} ({}) and {} ({}) both act on {path} and their order matters",
                            a.rewrite, ra.op.name(), b.rewrite, rb.op.name()
                        ),
                        "state it: add order: Some(0) to the one that applies first and order: Some(1) to the other",
                    )
                    .into());
            }
        }
        Ok(())
    };
    let plain = |l: &Landing| {
        matches!(
            recipe.rewrites[l.rewrite].op,
            RewriteOp::Reweight {
                renormalize: false,
                ..
            }
        )
    };
    for (path, ls) in landings {
        let others: Vec<usize> = (0..ls.len()).filter(|&x| !plain(&ls[x])).collect();
        // Pairs (x, y), x < y, in order, skipping those of two plain reweights.
        for x in 0..ls.len() {
            if plain(&ls[x]) {
                let from = others.partition_point(|&o| o <= x);
                for &y in &others[from..] {
                    check_pair(path, &ls[x], &ls[y])?;
                }
            } else {
                for y in x + 1..ls.len() {
                    check_pair(path, &ls[x], &ls[y])?;
                }
            }
        }
    }
    Ok(())
}

/// The store outputs (`probs.<layer>`, `stored.<name>.<layer>`) with their reductions, and
/// those kept on disk.
pub(super) fn stores(
    recipe: &Recipe,
    landings: &BTreeMap<String, Vec<Landing>>,
) -> (BTreeMap<String, crate::recipe::Reduce>, BTreeSet<String>) {
    let mut stores: BTreeMap<String, crate::recipe::Reduce> = BTreeMap::new();
    let mut spill: BTreeSet<String> = BTreeSet::new();
    for (path, ls) in landings {
        for l in ls {
            if let RewriteOp::Store {
                reduce, name, on, ..
            } = &recipe.rewrites[l.rewrite].op
            {
                stores.insert(Key::store(name, path).to_string(), *reduce);
                if *on == crate::recipe::StoreOn::Disk {
                    spill.insert(Key::store(name, path).to_string());
                }
            }
        }
    }
    (stores, spill)
}

pub(super) fn order_matters(a: &RewriteOp, b: &RewriteOp) -> bool {
    use RewriteOp::*;
    if a.is_kv() != b.is_kv() {
        return false;
    }
    !matches!(
        (a, b),
        (
            Reweight {
                renormalize: false,
                ..
            },
            Reweight {
                renormalize: false,
                ..
            }
        ) | (Store { .. }, Store { .. })
    )
}

fn overlap_in_time(a: Option<Steps>, b: Option<Steps>, n: Option<usize>) -> bool {
    match (a, b, n) {
        (Some(a), Some(b), Some(n)) => {
            let ((a0, a1), (b0, b1)) = (a.range(n), b.range(n));
            a0 < b1 && b0 < a1
        }
        _ => true,
    }
}

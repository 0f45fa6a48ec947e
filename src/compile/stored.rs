//! Named state in the recipe language: a `Store(name: ...)` writes maps that later steps and
//! later passes of the same job read (`ReplaceMaps(from: Stored("name"))`). This pass finds the
//! job's passes and checks, before anything is built, that every read has an earlier write on
//! every layer it reads — a located error otherwise, saying which rewrite reads what and where
//! the write would have to be.
//!
//! Try it: `rewire check rewrites/fatezero.ron --model models/shapes-sd --frames 4`.

use super::CompileError;
use crate::graph::AttnInfo;
use crate::recipe::spans::Seg;
use crate::recipe::{MapSource, Reduce, RewriteOp, Source, StoreWhat, at};
use petgraph::stable_graph::NodeIndex;

/// The job's passes and the one being compiled: `opts.passes` (else the passes the recipe
/// names, in order of first appearance) and `opts.pass` (else the last of them). Every pass a
/// rewrite names must be one of the job's.
pub(super) fn passes(
    src: &Source,
    opts: &super::CompileOptions,
) -> Result<(Vec<String>, Option<String>), CompileError> {
    let rewrites = &src.recipe.rewrites;
    let named: Vec<(usize, &String)> = rewrites
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.pass.as_ref().map(|p| (i, p)))
        .collect();
    let passes: Vec<String> = if opts.passes.is_empty() {
        let mut v: Vec<String> = Vec::new();
        for (_, p) in &named {
            if !v.contains(p) {
                v.push((*p).clone());
            }
        }
        v
    } else {
        opts.passes.clone()
    };
    if !opts.passes.is_empty()
        && let Some((i, p)) = named.iter().find(|(_, p)| !passes.contains(p))
    {
        return Err(src
            .error(
                &at(*i, &[Seg::Field("pass")]),
                "pass",
                format!("pass \"{p}\" is not a pass of this job"),
                format!("this job runs the passes {}", passes.join(", ")),
            )
            .into());
    }
    // A run of a job without passes cannot run a recipe that names them: it would drop the
    // other passes' rewrites.
    if opts.passes.is_empty()
        && opts.pass.is_none()
        && opts.references.is_some()
        && let Some((i, _)) = named.first()
    {
        return Err(src
            .error(
                &at(*i, &[Seg::Field("pass")]),
                "pass",
                format!(
                    "this recipe's rewrites name passes ({}), and this job runs one pass",
                    passes.join(", ")
                ),
                "run it with the job that runs those passes (`rewire video edit` runs \"invert\" then \"edit\"), or compile one pass with --pass NAME",
            )
            .into());
    }
    let pass = match &opts.pass {
        Some(p) if !passes.contains(p) => {
            let (i, _) = named.first().copied().unwrap_or((0, p));
            return Err(src
                .error(
                    &at(i, &[Seg::Field("pass")]),
                    "pass",
                    format!("no pass \"{p}\" in this job"),
                    if passes.is_empty() {
                        "the recipe's rewrites name no pass: leave --pass out".to_string()
                    } else {
                        format!("the passes are {}", passes.join(", "))
                    },
                )
                .into());
        }
        Some(p) => Some(p.clone()),
        None => passes.last().cloned(),
    };
    // A `reduce: Each` store keeps every step's maps for a later pass: with none after it, it
    // would hold them for nothing.
    for (i, r) in rewrites.iter().enumerate() {
        if let RewriteOp::Store {
            reduce: Reduce::Each,
            ..
        } = r.op
        {
            let last = passes.last().map(String::as_str);
            let useless = match r.pass.as_deref() {
                None => passes.len() < 2,
                Some(p) => Some(p) == last,
            };
            if useless {
                return Err(src
                    .error(
                        &at(i, &[Seg::Field("op"), Seg::Field("reduce")]),
                        "store",
                        "reduce: Each keeps every step's maps for a later pass to read, and no pass runs after this one",
                        "put the store in an earlier pass (pass: \"invert\" for `rewire video edit`), or reduce the steps to maps a run writes out: Last, Mean or Sum",
                    )
                    .into());
            }
        }
    }
    Ok((passes, pass))
}

/// Where a write happens relative to a read.
fn before(
    src: &Source,
    opts: &super::CompileOptions,
    passes: &[String],
    pass: Option<&str>,
    w: usize,
    r: usize,
) -> bool {
    let (wr, rd) = (&src.recipe.rewrites[w], &src.recipe.rewrites[r]);
    let order = |p: &str| passes.iter().position(|x| x == p);
    // A write in an earlier pass of the job.
    let earlier_pass = match (wr.pass.as_deref(), pass.and_then(order)) {
        (None, Some(k)) => k > 0, // a write in every pass: also in the first
        (Some(p), Some(k)) => order(p).is_some_and(|j| j < k),
        _ => false,
    };
    if earlier_pass {
        return true;
    }
    // A write at earlier steps of this pass (a reduced store: Each is read across passes).
    if !wr.in_pass(pass) {
        return false;
    }
    if matches!(
        wr.op,
        RewriteOp::Store {
            reduce: Reduce::Each,
            ..
        }
    ) {
        return false;
    }
    match (wr.steps, rd.steps, opts.steps) {
        (Some(ws), Some(rs), Some(n)) => ws.range(n).1 <= rs.range(n).0,
        _ => false,
    }
}

/// Every `Stored(name)` read of this pass has, on each layer it reads, a `Store(name: ...)` of
/// probabilities written before it (an earlier pass, or earlier steps of this pass).
pub(super) fn check_reads(
    src: &Source,
    layers: &[(NodeIndex, String, AttnInfo)],
    opts: &super::CompileOptions,
    passes: &[String],
    pass: Option<&str>,
    lands: &[Option<Vec<usize>>],
) -> Result<(), CompileError> {
    let rewrites = &src.recipe.rewrites;
    for (r, rw) in rewrites.iter().enumerate() {
        let RewriteOp::ReplaceMaps {
            from: MapSource::Stored(name),
            ..
        } = &rw.op
        else {
            continue;
        };
        if !rw.in_pass(pass) {
            continue;
        }
        let Some(reads) = &lands[r] else { continue };
        let writers: Vec<usize> = (0..rewrites.len())
            .filter(|&w| {
                matches!(&rewrites[w].op, RewriteOp::Store { name: n, .. } if n == name)
                    && before(src, opts, passes, pass, w, r)
            })
            .collect();
        if let Some(&w) = writers.iter().find(|&&w| {
            matches!(
                rewrites[w].op,
                RewriteOp::Store {
                    what: StoreWhat::HeadMean,
                    ..
                }
            ) && lands[w]
                .as_ref()
                .is_some_and(|l| l.iter().any(|j| reads.contains(j)))
        }) {
            return Err(src
                .error(
                    &at(w, &[Seg::Field("op"), Seg::Field("what")]),
                    "stored",
                    format!("rewrite {r} reads Stored(\"{name}\") as attention maps, but this Store records the mean over heads"),
                    "a store that a ReplaceMaps reads records what: Probs",
                )
                .into());
        }
        let missing: Vec<&str> = reads
            .iter()
            .filter(|&&j| {
                !writers.iter().any(|&w| {
                    lands[w].as_ref().is_some_and(|l| l.contains(&j))
                        && store_keeps(&rewrites[w].op, &layers[j].2)
                })
            })
            .map(|&j| layers[j].1.as_str())
            .collect();
        if missing.is_empty() {
            continue;
        }
        let when = match (pass, passes.iter().position(|p| Some(p.as_str()) == pass)) {
            (Some(p), Some(k)) if k > 0 => format!(
                "in an earlier pass ({}) or at earlier steps of pass \"{p}\"",
                passes[..k].join(", ")
            ),
            (Some(p), _) => format!("at earlier steps of pass \"{p}\" (the job's first)"),
            _ => "at earlier steps of the run".to_string(),
        };
        let what = if writers.is_empty() {
            format!("no Store(name: \"{name}\") is written {when}")
        } else {
            format!(
                "the Store(name: \"{name}\") written {when} (rewrite{} {}) does not record {}{}",
                if writers.len() == 1 { "" } else { "s" },
                writers
                    .iter()
                    .map(|w| w.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                missing[0],
                match missing.len() {
                    1 => String::new(),
                    n => format!(" or {} more layer{}", n - 1, if n == 2 { "" } else { "s" }),
                }
            )
        };
        let where_ = match passes.first() {
            Some(first) if Some(first.as_str()) != pass => format!("pass: \"{first}\", "),
            _ => String::new(),
        };
        return Err(src
            .error(
                &at(r, &[Seg::Field("op"), Seg::Field("from")]),
                "read-before-write",
                format!(
                    "rewrite {r} reads Stored(\"{name}\") on {} layer{} (e.g. {}), but {what}",
                    reads.len(),
                    if reads.len() == 1 { "" } else { "s" },
                    missing[0]
                ),
                format!(
                    "write it first: a rewrite selecting {} with {where_}op: Store(name: \"{name}\", reduce: Each) (read at the same timestep by a later pass) or a reduced Store at steps before this rewrite's",
                    missing[0]
                ),
            )
            .into());
    }
    Ok(())
}

/// Whether a Store keeps the maps of a layer (its `max_queries` may leave it out).
fn store_keeps(op: &RewriteOp, info: &AttnInfo) -> bool {
    match op {
        RewriteOp::Store { max_queries, .. } => max_queries.is_none_or(|m| info.queries <= m),
        _ => false,
    }
}

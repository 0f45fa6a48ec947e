//! Windows over long clips: a clip's frames run a window at a time, in order, and the K/V of
//! the frames a window's sparse-causal (or cross-frame) attention reads from earlier windows —
//! the anchor (first) frame and the previous window's last frame — are carried from one window
//! to the next as named state, per layer and timestep. Sparse-causal attention reads only the
//! first and the previous frame, so the windows compute what the whole clip as one batch would
//! (the same numbers up to float rounding) in the memory of one window.
//!
//! The carry is a rewrite of a pass's compiled graphs: at every layer whose K/V a
//! `ReplaceKv(source: Frames([...]))` gathers, the K/V input (before `to_k`/`to_v`) of the
//! carried frames comes in as input `stored.carry:<pass>.<layer>` (`[2·groups, N, C]`: the
//! anchors, then the previous frames when the recipe reads them, one per CFG half), is projected with the window's own
//! frames, and the gathers read it; the same name is an output holding this window's anchor and
//! last frame, kept per timestep (`reduce: Each`) for the next window.
//!
//! Try it: `rewire video edit models/shapes-sd docs/video/frames_in --source-prompt "a red circle" --prompt "a blue circle" --window 2 -o edit.gif`.

use crate::compile::Compiled;
use crate::graph::keys::Key;
use crate::graph::patch::{Patch, Src};
use crate::graph::{Graph, GraphError, Op};
use crate::recipe::{FrameSrc, KvMode, KvSource, RewriteOp, Source};
use petgraph::stable_graph::NodeIndex;
use std::collections::BTreeMap;
use std::ops::Range;

/// Why a pass cannot run in windows.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error(
        "{recipe}: rewrite {rewrite} reads K/V of frame source {frame:?}, which a window cannot carry from earlier windows\n  hint: windows carry the first and the previous frame (First, Prev, Offset(-1)); run the whole clip at once (--window 0)"
    )]
    Source {
        recipe: String,
        rewrite: usize,
        frame: FrameSrc,
    },
    #[error(
        "{recipe}: the K/V frame sources differ between rewrites ({first:?} and {other:?})\n  hint: windows need one frame-source list for every layer; run the whole clip at once (--window 0)"
    )]
    Mixed {
        recipe: String,
        first: Vec<FrameSrc>,
        other: Vec<FrameSrc>,
    },
    #[error(
        "{layer}: its K/V gather is not the recipe's frame sources over the whole batch (a branch other than Both?)\n  hint: windows need ReplaceKv(Frames(...)) with branch: Both; run the whole clip at once (--window 0)"
    )]
    Gather { layer: String },
    #[error(
        "{layer}: K and V of this layer do not come from one input (not a self-attention layer?)\n  hint: windows carry self-attention K/V only; run the whole clip at once (--window 0)"
    )]
    Input { layer: String },
    #[error(
        "the recipe caches features across steps (Cache) and reads other frames' K/V: windows cannot carry both\n  hint: run the whole clip at once (--window 0)"
    )]
    Cache,
    #[error(transparent)]
    Graph(#[from] GraphError),
}

/// The frame ranges of `frames` frames in windows of `size` (the last may be shorter).
pub fn windows(frames: usize, size: usize) -> Vec<Range<usize>> {
    let size = size.max(1);
    (0..frames)
        .step_by(size)
        .map(|a| a..(a + size).min(frames))
        .collect()
}

/// The store name of a pass's carried K/V (`stored.carry:<pass>.<layer>`; a recipe's store
/// names cannot hold `:`, so none can clash with it).
pub fn carry_name(pass: Option<&str>) -> String {
    format!("carry:{}", pass.unwrap_or("run"))
}

/// Whether a store output (`stored.<name>.<layer>`) is a window's carried K/V.
pub fn is_carry(key: &str) -> bool {
    Key::parse(key)
        .store_parts()
        .is_some_and(|(name, _)| name.starts_with("carry:"))
}

/// A frame a window's gather reads, in window terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    First,
    Prev,
    Own,
}

/// What a pass's K/V gathers read: the recipe's `ReplaceKv(Frames(list))` sources of pass
/// `pass` (`None`: a one-pass run, every rewrite) (with the layer's own K/V last for
/// `ConcatWithSelf`), or `None` when no rewrite of
/// the pass gathers other frames (its windows are independent).
fn reads(src: &Source, pass: Option<&str>) -> Result<Option<Vec<Read>>, WindowError> {
    let recipe = src.file.display().to_string();
    let mut found: Option<(Vec<FrameSrc>, Vec<Read>)> = None;
    for (i, rw) in src.recipe.rewrites.iter().enumerate() {
        if !rw.in_pass(pass) {
            continue;
        }
        let RewriteOp::ReplaceKv {
            source: KvSource::Frames(list),
            mode,
            ..
        } = &rw.op
        else {
            continue;
        };
        let mut r = list
            .iter()
            .map(|s| match s {
                FrameSrc::First => Ok(Read::First),
                FrameSrc::Prev | FrameSrc::Offset(-1) => Ok(Read::Prev),
                FrameSrc::Offset(0) => Ok(Read::Own),
                other => Err(WindowError::Source {
                    recipe: recipe.clone(),
                    rewrite: i,
                    frame: *other,
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if *mode == KvMode::ConcatWithSelf {
            r.push(Read::Own);
        }
        match &found {
            Some((first, had)) if *had != r => {
                return Err(WindowError::Mixed {
                    recipe,
                    first: first.clone(),
                    other: list.clone(),
                });
            }
            Some(_) => {}
            None => found = Some((list.clone(), r)),
        }
    }
    Ok(found.map(|(_, r)| r))
}

/// A pass compiled for a window of `frames` frames per group, with the carry wired in: it
/// reads the carried K/V when `reads` (every window but the first), and records its own for the
/// next window. `None` when the pass gathers no other frames' K/V (nothing to carry).
pub fn carry(
    compiled: &Compiled,
    src: &Source,
    pass: Option<&str>,
    frames: usize,
    reads_carry: bool,
) -> Result<Option<Compiled>, WindowError> {
    let Some(list) = reads(src, pass)? else {
        // Nothing gathers other frames: the windows are independent. (A gather the recipe's
        // sources do not explain would be left uncarried: refuse it.)
        if let Some(layer) = compiled.segments.iter().find_map(|s| {
            s.graph
                .nodes()
                .find(|&n| matches!(s.graph.node(n).op, Op::KvGather { .. }))
                .map(|n| s.graph.node(n).path.clone())
        }) {
            return Err(WindowError::Gather { layer });
        }
        return Ok(None);
    };
    if compiled.cache.is_some() {
        return Err(WindowError::Cache);
    }
    let name = carry_name(pass);
    let mut out = compiled.clone();
    for seg in &mut out.segments {
        let (g, keys) = carry_graph(&seg.graph, frames, reads_carry, &list, &name)?;
        seg.graph = g;
        for k in keys {
            out.stores.insert(k, crate::recipe::Reduce::Each);
        }
    }
    Ok(Some(out))
}

/// The gather index of a whole window (`frames` per group, `groups` groups) as the compiler
/// builds it from `list`.
fn whole(list: &[Read], frames: usize, groups: usize) -> Vec<Vec<usize>> {
    list.iter()
        .map(|r| {
            (0..frames * groups)
                .map(|b| {
                    let (grp, i) = (b / frames, b % frames);
                    match r {
                        Read::First => grp * frames,
                        Read::Prev => grp * frames + i.saturating_sub(1),
                        Read::Own => b,
                    }
                })
                .collect()
        })
        .collect()
}

/// How many rows a window carries: an anchor per group, and a previous frame per group when
/// the list reads one.
fn carried_rows(list: &[Read], groups: usize) -> usize {
    groups * (1 + usize::from(list.contains(&Read::Prev)))
}

/// The gather index when the carried rows (`groups` anchors, then `groups` previous frames
/// when read) come first (`carried`), else the first window's.
fn windowed(list: &[Read], frames: usize, groups: usize, carried: bool) -> Vec<Vec<usize>> {
    if !carried {
        return whole(list, frames, groups);
    }
    let off = carried_rows(list, groups);
    list.iter()
        .map(|r| {
            (0..frames * groups)
                .map(|b| {
                    let (grp, i) = (b / frames, b % frames);
                    match r {
                        Read::First => grp,
                        Read::Prev if i == 0 => groups + grp,
                        Read::Prev => off + b - 1,
                        Read::Own => off + b,
                    }
                })
                .collect()
        })
        .collect()
}

/// Wires the carry into one graph; returns it and the carry outputs' names.
fn carry_graph(
    g: &Graph,
    frames: usize,
    carried: bool,
    list: &[Read],
    name: &str,
) -> Result<(Graph, Vec<String>), WindowError> {
    let batch = g.spec.batch;
    let groups = batch / frames.max(1);
    let mut layers: BTreeMap<String, Vec<NodeIndex>> = BTreeMap::new();
    for n in g.nodes() {
        if let Op::KvGather { .. } = g.node(n).op {
            layers.entry(g.node(n).path.clone()).or_default().push(n);
        }
    }
    let expect = whole(list, frames, groups);
    let mut patch = Patch::new(format!("carry K/V across windows ({name})"));
    let mut keys = Vec::new();
    for (layer, gathers) in &layers {
        let mut x: Option<NodeIndex> = None;
        for &gk in gathers {
            let Op::KvGather { index } = &g.node(gk).op else {
                unreachable!("a gather")
            };
            if *index != expect || groups * frames != batch {
                return Err(WindowError::Gather {
                    layer: layer.clone(),
                });
            }
            let proj = g.inputs_of(gk)[0];
            let input = match (&g.node(proj).op, g.inputs_of(proj).first()) {
                (Op::Linear { .. }, Some(&i)) => i,
                _ => {
                    return Err(WindowError::Input {
                        layer: layer.clone(),
                    });
                }
            };
            if x.is_some_and(|x| x != input) {
                return Err(WindowError::Input {
                    layer: layer.clone(),
                });
            }
            x = Some(input);
        }
        let x = x.expect("a layer with gathers");
        let [_, tokens, channels] = g.node(x).shape[..] else {
            return Err(WindowError::Input {
                layer: layer.clone(),
            });
        };
        let key = Key::Stored { name, layer }.to_string();
        let xe = if carried {
            let c = patch.add(
                "",
                Op::Input {
                    name: key.clone(),
                    shape: vec![carried_rows(list, groups), tokens, channels],
                },
                &[],
            );
            patch.add(layer.as_str(), Op::Concat { axis: 0 }, &[c, Src::Old(x)])
        } else {
            Src::Old(x)
        };
        let index = windowed(list, frames, groups, carried);
        for &gk in gathers {
            let proj = g.inputs_of(gk)[0];
            if carried {
                patch.rewire.push((proj, 0, xe));
            }
            let new = patch.add(
                layer.as_str(),
                Op::KvGather {
                    index: index.clone(),
                },
                &[Src::Old(proj)],
            );
            patch.reroute.push((gk, new));
            patch.remove.push(gk);
        }
        // This window's anchors (carried on, or its own first frames) and, when read, last
        // frames.
        let off = if carried {
            carried_rows(list, groups)
        } else {
            0
        };
        let prev = if list.contains(&Read::Prev) {
            groups
        } else {
            0
        };
        let rows: Vec<usize> = (0..groups)
            .map(|grp| if carried { grp } else { grp * frames })
            .chain((0..prev).map(|grp| off + grp * frames + frames - 1))
            .collect();
        let kept = patch.add(layer.as_str(), Op::KvGather { index: vec![rows] }, &[xe]);
        patch.add("", Op::Output { name: key.clone() }, &[kept]);
        keys.push(key);
    }
    let mut out = g.clone();
    out.apply(&patch)?;
    out.check(None)?;
    Ok((out, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_clip_in_order() {
        assert_eq!(windows(5, 2), vec![0..2, 2..4, 4..5]);
        assert_eq!(windows(4, 8), vec![0..4]);
        assert_eq!(windows(0, 3), Vec::<Range<usize>>::new());
    }

    #[test]
    fn a_carried_window_reads_the_anchor_and_the_previous_frame() {
        let list = [Read::First, Read::Prev];
        // Two groups (uncond, cond) of 3 frames: rows 0–1 anchors, 2–3 previous frames, then
        // the window's own 6 items.
        let ix = windowed(&list, 3, 2, true);
        assert_eq!(ix[0], vec![0, 0, 0, 1, 1, 1]);
        assert_eq!(ix[1], vec![2, 4, 5, 3, 7, 8]);
        // The first window is the whole-batch gather.
        assert_eq!(windowed(&list, 3, 2, false), whole(&list, 3, 2));
        assert_eq!(whole(&list, 3, 2)[1], vec![0, 0, 1, 3, 3, 4]);
        // Cross-frame attention to the first frame carries the anchors only.
        let first = [Read::First];
        assert_eq!(carried_rows(&first, 2), 2);
        assert_eq!(windowed(&first, 2, 2, true), vec![vec![0, 0, 1, 1]]);
    }
}

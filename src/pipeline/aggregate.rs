//! prompt-to-prompt's `aggregate_attention` on a run's stored cross-attention maps: the
//! `aggregate_cross_res{r}` stores a heat map draws.
//!
//! Try it: `cargo test --release --test shapes` (compares `aggregate_cross_res8` with
//! diffusers').

use crate::compile::Compiled;
use crate::exec::HostTensor;
use crate::graph::AttnKind;
use std::collections::BTreeMap;

/// prompt-to-prompt's aggregate_attention for cross-attention: the mean over heads and over the
/// stored up/down cross-attention layers of one query resolution (the one most layers have,
/// the smaller on a tie), as `[r, r, keys]` per prompt (`aggregate_cross_res{r}`, with `.{p}`
/// for prompts after the first).
pub(super) fn aggregate_cross(
    c: &Compiled,
    stores: &mut BTreeMap<String, HostTensor>,
    prompts: usize,
) {
    let layers = c.base.attention_layers();
    let mut by_res: BTreeMap<(usize, usize), Vec<&HostTensor>> = BTreeMap::new();
    for (_, path, a) in &layers {
        if a.kind != AttnKind::Cross || a.place == crate::graph::Place::Mid {
            continue;
        }
        // The layer's maps from a store of any name (`probs.<layer>`, `stored.<name>.<layer>`).
        let found = stores.iter().find(|(k, _)| {
            crate::graph::keys::Key::parse(k)
                .store_parts()
                .is_some_and(|(_, l)| l == *path)
        });
        if let Some((_, t)) = found {
            by_res.entry(a.grid).or_default().push(t);
        }
    }
    let Some((&(h, w), maps)) = by_res
        .iter()
        .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)))
    else {
        return;
    };
    let nq = h * w;
    let keys = maps[0].shape.last().copied().unwrap_or(0);
    // Each map: [(items,) (heads,) nq, keys]; items = prompts when several.
    let mut agg = vec![vec![0f32; nq * keys]; prompts];
    for m in maps {
        let per_item = m.data.len() / prompts.max(1);
        let heads = per_item / (nq * keys);
        for (p, acc) in agg.iter_mut().enumerate() {
            let item = &m.data[p * per_item..(p + 1) * per_item];
            for hd in 0..heads {
                for (a, v) in acc
                    .iter_mut()
                    .zip(&item[hd * nq * keys..(hd + 1) * nq * keys])
                {
                    *a += v / (heads * maps.len()) as f32;
                }
            }
        }
    }
    for (p, a) in agg.into_iter().enumerate() {
        let name = crate::graph::keys::Key::AggregateCross { res: h, prompt: p }.to_string();
        stores.insert(name, HostTensor::new(vec![h, w, keys], a));
    }
}

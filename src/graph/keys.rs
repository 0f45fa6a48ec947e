//! The names of the values a compiled graph and a run exchange beyond the UNet's own inputs
//! (`sample`, `timestep`, `encoder_hidden_states`, …): the one place that makes them and reads
//! them back, as a typed [`Key`]. Other code builds names with [`Key::to_string`] and matches
//! on [`Key::parse`], never on prefixes.
//!
//! Try it: `cargo test --release --lib keys`.

use std::fmt;

/// A named value of a compiled graph or a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    /// The UNet's output: `out`.
    Out,
    /// A Store's probabilities of one attention layer: `probs.<layer>`.
    Probs { layer: &'a str },
    /// The K/V input of one layer recorded by a reference pass: `ref.<pass>.<layer>`.
    Reference { pass: &'a str, layer: &'a str },
    /// A named Store's maps of one layer (`stored.<name>.<layer>`): the output of a
    /// `Store(name: ...)` other than the default `"probs"`, and the input of a rewrite reading
    /// `Stored(name)`.
    Stored { name: &'a str, layer: &'a str },
    /// A Cache's features, kept from a full step to the cached ones: `cache.features`.
    CacheFeatures,
    /// A value hoisted out of the denoising loop: `hoist.<n>`.
    Hoisted(usize),
    /// prompt-to-prompt's aggregate cross-attention map at `res`×`res` queries for prompt
    /// `prompt`: `aggregate_cross_res<res>` for the first prompt, `….<prompt>` for the others.
    AggregateCross { res: usize, prompt: usize },
    /// Anything else (the UNet's own inputs).
    Other(&'a str),
}

/// Where a layer path starts inside `ref.<pass>.<layer>` (diffusers' top-level block names).
const BLOCKS: [&str; 3] = ["down_blocks.", "mid_block.", "up_blocks."];

/// `<name>.<layer>` split where the layer starts (the first `.down_blocks.`/`.mid_block.`/
/// `.up_blocks.` part).
fn split_layer(rest: &str) -> Option<(&str, &str)> {
    let at = BLOCKS
        .iter()
        .filter_map(|b| rest.find(&format!(".{b}")))
        .min()?;
    Some((&rest[..at], &rest[at + 1..]))
}

impl<'a> Key<'a> {
    /// A Store's output: `probs.<layer>` for the default name, `stored.<name>.<layer>` else.
    pub fn store(name: &'a str, layer: &'a str) -> Key<'a> {
        if name == "probs" {
            Key::Probs { layer }
        } else {
            Key::Stored { name, layer }
        }
    }

    /// The store name and layer of a Store's output, if `self` is one.
    pub fn store_parts(&self) -> Option<(&'a str, &'a str)> {
        match *self {
            Key::Probs { layer } => Some(("probs", layer)),
            Key::Stored { name, layer } => Some((name, layer)),
            _ => None,
        }
    }

    /// Reads a name back.
    pub fn parse(name: &'a str) -> Key<'a> {
        if name == "out" {
            return Key::Out;
        }
        if name == "cache.features" {
            return Key::CacheFeatures;
        }
        if let Some(layer) = name.strip_prefix("probs.") {
            return Key::Probs { layer };
        }
        if let Some((pass, layer)) = name.strip_prefix("ref.").and_then(split_layer) {
            return Key::Reference { pass, layer };
        }
        if let Some((name, layer)) = name.strip_prefix("stored.").and_then(split_layer) {
            return Key::Stored { name, layer };
        }
        if let Some(n) = name.strip_prefix("hoist.").and_then(|n| n.parse().ok()) {
            return Key::Hoisted(n);
        }
        if let Some(rest) = name.strip_prefix("aggregate_cross_res") {
            let (res, prompt) = match rest.split_once('.') {
                Some((r, p)) => (r.parse().ok(), p.parse().ok()),
                None => (rest.parse().ok(), Some(0)),
            };
            if let (Some(res), Some(prompt)) = (res, prompt) {
                return Key::AggregateCross { res, prompt };
            }
        }
        Key::Other(name)
    }
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Out => write!(f, "out"),
            Key::Probs { layer } => write!(f, "probs.{layer}"),
            Key::Reference { pass, layer } => write!(f, "ref.{pass}.{layer}"),
            Key::Stored { name, layer } => write!(f, "stored.{name}.{layer}"),
            Key::CacheFeatures => write!(f, "cache.features"),
            Key::Hoisted(n) => write!(f, "hoist.{n}"),
            Key::AggregateCross { res, prompt: 0 } => write!(f, "aggregate_cross_res{res}"),
            Key::AggregateCross { res, prompt } => write!(f, "aggregate_cross_res{res}.{prompt}"),
            Key::Other(name) => write!(f, "{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn1";
        for k in [
            Key::Out,
            Key::Probs { layer },
            Key::Reference {
                pass: "reference",
                layer,
            },
            Key::Reference {
                pass: "style.v2",
                layer: "mid_block.attentions.0.transformer_blocks.0.attn1",
            },
            Key::Stored { name: "inv", layer },
            Key::CacheFeatures,
            Key::Hoisted(12),
            Key::AggregateCross { res: 8, prompt: 0 },
            Key::AggregateCross { res: 16, prompt: 3 },
            Key::Other("encoder_hidden_states"),
        ] {
            let name = k.to_string();
            assert_eq!(Key::parse(&name), k, "{name}");
        }
        assert_eq!(Key::parse("hoist.x"), Key::Other("hoist.x"));
        assert_eq!(Key::parse("ref.nolayer"), Key::Other("ref.nolayer"));
    }
}

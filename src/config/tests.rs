//! UNet config parsing and resolution.
//!
//! Try it: `cargo test --release --lib config::tests`.

use super::*;
use std::path::Path;

fn parse(json: &str) -> Result<Resolved, ConfigError> {
    let p = Path::new("config.json");
    UNetConfig::from_json(json, p)?.resolve(p)
}

#[test]
fn sd15_defaults_resolve() {
    let r = parse(r#"{"attention_head_dim": 8, "cross_attention_dim": 768}"#).unwrap();
    assert_eq!(r.down.len(), 4);
    assert_eq!(r.down[0].heads, 8);
    assert_eq!(r.up[0].layers, 3);
    assert_eq!(r.up[1].in_channels, 1280);
    assert_eq!(r.context_dim, 768);
    assert_eq!(r.time_embed_dim, 1280);
}

#[test]
fn per_block_lists_must_match_block_count() {
    let e = parse(r#"{"attention_head_dim": [5, 10]}"#).unwrap_err();
    assert!(
        e.to_string()
            .contains("`attention_head_dim` has 2 entries, expected 4"),
        "{e}"
    );
}

#[test]
fn unknown_block_type_is_named() {
    let e = parse(
        r#"{"down_block_types": ["AttnDownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D"]}"#,
    )
    .unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("down_block_types") && s.contains("AttnDownBlock2D"),
        "{s}"
    );
}

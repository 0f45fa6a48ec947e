//! [`UNetConfig::resolve`]: checks every field of a UNet config that changes the computation
//! (a value rewire does not implement is a [`ConfigError::Unsupported`] naming the field) and
//! resolves the per-block values into a [`Resolved`].
//!
//! Try it: `rewire inspect models/tiny-sd`.

use super::{
    BlockKind, BlockSpec, ConfigError, MidSpec, PerBlock, PerBlockBool, Resolved, TextTimeSpec,
    UNetConfig,
};
use std::path::Path;

impl UNetConfig {
    /// Checks every field that changes the computation and resolves per-block values.
    pub fn resolve(&self, path: &Path) -> Result<Resolved, ConfigError> {
        let p = || path.to_path_buf();
        let unsupported = |field: &'static str, value: String, supported: &'static str| {
            Err(ConfigError::Unsupported {
                path: p(),
                field,
                value,
                supported,
            })
        };
        if let Some(c) = &self._class_name
            && c != "UNet2DConditionModel"
        {
            return unsupported("_class_name", c.clone(), "UNet2DConditionModel");
        }
        if self.act_fn != "silu" {
            return unsupported("act_fn", self.act_fn.clone(), "\"silu\"");
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported(
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift.clone(),
                "\"default\"",
            );
        }
        if self.time_embedding_type != "positional" {
            return unsupported(
                "time_embedding_type",
                self.time_embedding_type.clone(),
                "\"positional\"",
            );
        }
        if self.attention_type != "default" {
            return unsupported("attention_type", self.attention_type.clone(), "\"default\"");
        }
        macro_rules! must_be_none {
            ($($field:ident),*) => {$(
                if let Some(v) = &self.$field {
                    return unsupported(stringify!($field), format!("{v:?}"), "null (not set)");
                }
            )*};
        }
        must_be_none!(
            class_embed_type,
            num_class_embeds,
            encoder_hid_dim,
            encoder_hid_dim_type,
            time_embedding_dim,
            time_embedding_act_fn,
            timestep_post_act,
            time_cond_proj_dim,
            cross_attention_norm
        );
        if self.center_input_sample {
            return unsupported("center_input_sample", "true".into(), "false");
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention", "true".into(), "false");
        }
        if self.resnet_skip_time_act {
            return unsupported("resnet_skip_time_act", "true".into(), "false");
        }
        if self.class_embeddings_concat {
            return unsupported("class_embeddings_concat", "true".into(), "false");
        }
        if self.reverse_transformer_layers_per_block.is_some() {
            return unsupported(
                "reverse_transformer_layers_per_block",
                "a value".into(),
                "null (up blocks mirror transformer_layers_per_block)",
            );
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return unsupported(
                "conv_in_kernel",
                format!("{}/{}", self.conv_in_kernel, self.conv_out_kernel),
                "odd kernel sizes",
            );
        }

        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(ConfigError::Invalid {
                path: p(),
                message: "block_out_channels is empty".into(),
            });
        }
        for (field, len) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ] {
            if len != n {
                return Err(ConfigError::Length {
                    path: p(),
                    field,
                    found: len,
                    expected: n,
                });
            }
        }
        let per = |field: &'static str, v: &PerBlock| -> Result<Vec<usize>, ConfigError> {
            match v {
                PerBlock::One(x) => Ok(vec![*x; n]),
                PerBlock::Each(xs) if xs.len() == n => Ok(xs.clone()),
                PerBlock::Each(xs) => Err(ConfigError::Length {
                    path: p(),
                    field,
                    found: xs.len(),
                    expected: n,
                }),
            }
        };
        let layers = per("layers_per_block", &self.layers_per_block)?;
        let cross = per("cross_attention_dim", &self.cross_attention_dim)?;
        let tlayers = per(
            "transformer_layers_per_block",
            &self.transformer_layers_per_block,
        )?;
        // diffusers' quirk: `num_attention_heads = num_attention_heads or attention_head_dim`;
        // SD 1.x configs name the head *count* attention_head_dim.
        let heads_src = match (&self.num_attention_heads, &self.attention_head_dim) {
            (Some(h), _) => ("num_attention_heads", h),
            (None, Some(h)) => ("attention_head_dim", h),
            (None, None) => {
                return Err(ConfigError::Invalid {
                    path: p(),
                    message: "neither num_attention_heads nor attention_head_dim is set".into(),
                });
            }
        };
        let heads = per(heads_src.0, heads_src.1)?;
        {
            use crate::limits::*;
            let limit = |field: &str, v: &[usize], max: usize, name: &'static str| {
                for (i, &x) in v.iter().enumerate() {
                    at_most(x, max, name).map_err(|source| ConfigError::Limit {
                        path: p(),
                        field: if v.len() == 1 {
                            field.to_string()
                        } else {
                            format!("{field}[{i}]")
                        },
                        source,
                    })?;
                }
                Ok::<(), ConfigError>(())
            };
            limit("block_out_channels", &[n], MAX_BLOCKS, "MAX_BLOCKS")?;
            limit(
                "layers_per_block",
                &layers,
                MAX_LAYERS_PER_BLOCK,
                "MAX_LAYERS_PER_BLOCK",
            )?;
            limit(
                "transformer_layers_per_block",
                &tlayers,
                MAX_TRANSFORMER_LAYERS,
                "MAX_TRANSFORMER_LAYERS",
            )?;
            limit("cross_attention_dim", &cross, MAX_CHANNELS, "MAX_CHANNELS")?;
            limit(
                "block_out_channels",
                &self.block_out_channels,
                MAX_CHANNELS,
                "MAX_CHANNELS",
            )?;
            limit(heads_src.0, &heads, MAX_HEADS, "MAX_HEADS")?;
            for (field, v) in [
                ("in_channels", self.in_channels),
                ("out_channels", self.out_channels),
                (
                    "addition_time_embed_dim",
                    self.addition_time_embed_dim.unwrap_or(0),
                ),
                (
                    "projection_class_embeddings_input_dim",
                    self.projection_class_embeddings_input_dim.unwrap_or(0),
                ),
            ] {
                limit(field, &[v], MAX_CHANNELS, "MAX_CHANNELS")?;
            }
            for (field, v) in [
                ("conv_in_kernel", self.conv_in_kernel),
                ("conv_out_kernel", self.conv_out_kernel),
                ("downsample_padding", self.downsample_padding),
            ] {
                limit(field, &[v], MAX_KERNEL, "MAX_KERNEL")?;
            }
            if let Some(i) = layers.iter().position(|&l| l == 0) {
                return Err(ConfigError::Invalid {
                    path: p(),
                    message: format!(
                        "`layers_per_block` is 0 for block {i}\n  hint: every block has at least one resnet (SD: 2)"
                    ),
                });
            }
            for (field, v) in [
                ("in_channels", self.in_channels),
                ("out_channels", self.out_channels),
            ] {
                if v == 0 {
                    return Err(ConfigError::Invalid {
                        path: p(),
                        message: format!("`{field}` is 0\n  hint: SD UNets have 4 latent channels"),
                    });
                }
            }
            for (field, v) in [
                ("norm_eps", self.norm_eps),
                ("freq_shift", self.freq_shift),
                ("mid_block_scale_factor", self.mid_block_scale_factor),
                ("resnet_out_scale_factor", self.resnet_out_scale_factor),
            ] {
                if !v.is_finite() || (field == "norm_eps" && v <= 0.0) {
                    return Err(ConfigError::Invalid {
                        path: p(),
                        message: format!(
                            "`{field}` = {v} is not {}\n  hint: diffusers' default is {}",
                            if field == "norm_eps" {
                                "a finite number > 0"
                            } else {
                                "a finite number"
                            },
                            match field {
                                "norm_eps" => "1e-5",
                                "freq_shift" => "0",
                                _ => "1.0",
                            }
                        ),
                    });
                }
            }
            if self.norm_eps > 1e6 {
                return Err(ConfigError::Invalid {
                    path: p(),
                    message: format!(
                        "`norm_eps` = {} is above 1e6: the normalisation would erase the signal\n  hint: diffusers' default is 1e-5",
                        self.norm_eps
                    ),
                });
            }
            if self.norm_eps > 1.0 {
                eprintln!(
                    "warning: {}: `norm_eps` = {} is unusually large (diffusers' default is 1e-5)",
                    path.display(),
                    self.norm_eps
                );
            }
        }
        let only_cross = match &self.only_cross_attention {
            None => vec![false; n],
            Some(PerBlockBool::One(b)) => vec![*b; n],
            Some(PerBlockBool::Each(v)) if v.len() == n => v.clone(),
            Some(PerBlockBool::Each(v)) => {
                return Err(ConfigError::Length {
                    path: p(),
                    field: "only_cross_attention",
                    found: v.len(),
                    expected: n,
                });
            }
        };
        let groups = match self.norm_num_groups {
            Some(g) if g > 0 => g,
            other => {
                return unsupported(
                    "norm_num_groups",
                    format!("{other:?}"),
                    "a positive group count",
                );
            }
        };
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 {
                return Err(ConfigError::Invalid {
                    path: p(),
                    message: format!("block_out_channels[{i}] is 0"),
                });
            }
            if c % groups != 0 {
                return Err(ConfigError::Invalid {
                    path: p(),
                    message: format!(
                        "block_out_channels[{i}] = {c} is not divisible by norm_num_groups = {groups}"
                    ),
                });
            }
            if heads[i] == 0 || c % heads[i] != 0 {
                return Err(ConfigError::Invalid {
                    path: p(),
                    message: format!(
                        "block_out_channels[{i}] = {c} is not divisible by the head count {} (from {})",
                        heads[i], heads_src.0
                    ),
                });
            }
        }

        let mut down = Vec::with_capacity(n);
        let mut out_ch = self.block_out_channels[0];
        for (i, t) in self.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = self.block_out_channels[i];
            let kind = match t.as_str() {
                "DownBlock2D" => BlockKind::Plain,
                "CrossAttnDownBlock2D" => BlockKind::CrossAttn,
                other => {
                    return unsupported(
                        "down_block_types",
                        format!("\"{other}\" (block {i})"),
                        "\"DownBlock2D\" and \"CrossAttnDownBlock2D\"",
                    );
                }
            };
            down.push(BlockSpec {
                kind,
                layers: layers[i],
                out_channels: out_ch,
                in_channels: in_ch,
                heads: heads[i],
                transformer_layers: vec![tlayers[i]; layers[i]],
                cross_attention_dim: cross[i],
                only_cross_attention: only_cross[i],
                resample: i + 1 != n,
            });
        }

        let mid = match self.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => Some(MidSpec {
                with_attention: true,
                channels: self.block_out_channels[n - 1],
                heads: heads[n - 1],
                transformer_layers: tlayers[n - 1],
                cross_attention_dim: cross[n - 1],
            }),
            Some("UNetMidBlock2D") => Some(MidSpec {
                with_attention: false,
                channels: self.block_out_channels[n - 1],
                heads: heads[n - 1],
                transformer_layers: 0,
                cross_attention_dim: cross[n - 1],
            }),
            Some(other) => {
                return unsupported(
                    "mid_block_type",
                    format!("\"{other}\""),
                    "\"UNetMidBlock2DCrossAttn\", \"UNetMidBlock2D\" and null",
                );
            }
        };

        let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
        let (r_ch, r_heads, r_layers, r_t, r_cross) = (
            rev(&self.block_out_channels),
            rev(&heads),
            rev(&layers),
            rev(&tlayers),
            rev(&cross),
        );
        let r_only: Vec<bool> = only_cross.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut out_ch = r_ch[0];
        for (i, t) in self.up_block_types.iter().enumerate() {
            let prev = out_ch;
            out_ch = r_ch[i];
            let kind = match t.as_str() {
                "UpBlock2D" => BlockKind::Plain,
                "CrossAttnUpBlock2D" => BlockKind::CrossAttn,
                other => {
                    return unsupported(
                        "up_block_types",
                        format!("\"{other}\" (block {i})"),
                        "\"UpBlock2D\" and \"CrossAttnUpBlock2D\"",
                    );
                }
            };
            up.push(BlockSpec {
                kind,
                layers: r_layers[i] + 1,
                out_channels: out_ch,
                in_channels: prev,
                heads: r_heads[i],
                transformer_layers: vec![r_t[i]; r_layers[i] + 1],
                cross_attention_dim: r_cross[i],
                only_cross_attention: r_only[i],
                resample: i + 1 != n,
            });
        }

        let time_embed_dim = self.block_out_channels[0] * 4;
        let text_time = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let t = self
                    .addition_time_embed_dim
                    .ok_or_else(|| ConfigError::Invalid {
                        path: p(),
                        message: "addition_embed_type \"text_time\" needs addition_time_embed_dim"
                            .into(),
                    })?;
                let i = self.projection_class_embeddings_input_dim.ok_or_else(|| {
                    ConfigError::Invalid {
                        path: p(),
                        message: "addition_embed_type \"text_time\" needs projection_class_embeddings_input_dim".into(),
                    }
                })?;
                Some(TextTimeSpec {
                    time_embed_dim: t,
                    input_dim: i,
                })
            }
            Some(other) => {
                return unsupported(
                    "addition_embed_type",
                    format!("\"{other}\""),
                    "\"text_time\" (SDXL) and null",
                );
            }
        };
        let context_dim = down
            .iter()
            .find(|b| b.kind == BlockKind::CrossAttn)
            .map(|b| b.cross_attention_dim)
            .unwrap_or(cross[0]);

        Ok(Resolved {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            block_out_channels: self.block_out_channels.clone(),
            down,
            mid,
            up,
            norm_groups: groups,
            norm_eps: self.norm_eps,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            time_embed_dim,
            downsample_padding: self.downsample_padding,
            conv_in_kernel: self.conv_in_kernel,
            conv_out_kernel: self.conv_out_kernel,
            use_linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention,
            mid_block_scale_factor: self.mid_block_scale_factor,
            resnet_out_scale_factor: self.resnet_out_scale_factor,
            text_time,
            context_dim,
        })
    }
}

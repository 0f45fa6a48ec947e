//! The layers of diffusers' `Encoder` and `Decoder` (`models/autoencoders/vae.py`), holding
//! their weights on the device: convolutions, group norms, `ResnetBlock2D` without a time
//! embedding, the mid block's single-head `Attention`, `DownEncoderBlock2D` and
//! `UpDecoderBlock2D`. Weight names are diffusers' module paths under `encoder.` / `decoder.`.
//!
//! Try it: `cargo test --release --test vae` (decodes the DDIM pipeline case's latents).

use crate::exec::kernels::{ConvW, GroupNormW, LinearW};
use crate::weights::{WeightError, WeightSource};
use burn::tensor::activation::silu;
use burn::tensor::module::{attention, interpolate};
use burn::tensor::ops::{AttentionModuleOptions, InterpolateMode, InterpolateOptions, PadMode};
use burn::tensor::{Device, Tensor};

/// Group-norm epsilon of every norm in diffusers' VAE (`resnet_eps=1e-6`, `conv_norm_out`).
pub const EPS: f64 = 1e-6;

/// What every layer needs to load: the weights and the device.
pub(crate) struct Loader<'a> {
    pub files: &'a dyn WeightSource,
    pub device: &'a Device,
    pub groups: usize,
}

/// A 2-D convolution with bias (the executor's kernel), padded `pad` on every side.
#[derive(Debug, Clone)]
pub(crate) struct Conv(ConvW);

impl Conv {
    /// Loads `{path}.weight` `[cout, cin, k, k]` and `{path}.bias`; `pad` on every side.
    pub fn load(
        l: &Loader,
        path: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self, WeightError> {
        ConvW::load(l.files, path, cin, cout, k, stride, [pad; 4], l.device).map(Conv)
    }

    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        self.0.apply(x)
    }
}

/// Group norm over the loader's group count with the VAE's epsilon (the executor's kernel).
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm(GroupNormW);

impl GroupNorm {
    pub fn load(l: &Loader, path: &str, c: usize) -> Result<Self, WeightError> {
        GroupNormW::load(l.files, path, l.groups, c, EPS, l.device).map(GroupNorm)
    }

    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        self.0.apply(x)
    }
}

/// A linear layer with bias (the executor's kernel).
#[derive(Debug, Clone)]
struct Linear(LinearW);

impl Linear {
    fn load(l: &Loader, path: &str, i: usize, o: usize) -> Result<Self, WeightError> {
        LinearW::load(l.files, path, i, o, true, l.device).map(Linear)
    }

    fn apply(&self, x: Tensor<3>) -> Tensor<3> {
        self.0.apply(x)
    }
}

/// `ResnetBlock2D` with `temb=None`: norm1, SiLU, conv1, norm2, SiLU, conv2, plus the input
/// (through a 1×1 `conv_shortcut` when the channel count changes); output scale 1.
#[derive(Debug, Clone)]
pub(crate) struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    pub fn load(l: &Loader, path: &str, cin: usize, cout: usize) -> Result<Self, WeightError> {
        Ok(Resnet {
            norm1: GroupNorm::load(l, &format!("{path}.norm1"), cin)?,
            conv1: Conv::load(l, &format!("{path}.conv1"), cin, cout, 3, 1, 1)?,
            norm2: GroupNorm::load(l, &format!("{path}.norm2"), cout)?,
            conv2: Conv::load(l, &format!("{path}.conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout {
                Some(Conv::load(
                    l,
                    &format!("{path}.conv_shortcut"),
                    cin,
                    cout,
                    1,
                    1,
                    0,
                )?)
            } else {
                None
            },
        })
    }

    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.conv1.apply(silu(self.norm1.apply(x.clone())));
        let h = self.conv2.apply(silu(self.norm2.apply(h)));
        let x = match &self.shortcut {
            Some(s) => s.apply(x),
            None => x,
        };
        x + h
    }
}

/// The mid block's `Attention` (`_from_deprecated_attn_block`): group norm, `to_q`/`to_k`/`to_v`
/// on the `h·w` tokens, one head of all channels, `to_out.0`, plus the residual.
#[derive(Debug, Clone)]
struct Attention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl Attention {
    fn load(l: &Loader, path: &str, c: usize) -> Result<Self, WeightError> {
        Ok(Attention {
            norm: GroupNorm::load(l, &format!("{path}.group_norm"), c)?,
            q: Linear::load(l, &format!("{path}.to_q"), c, c)?,
            k: Linear::load(l, &format!("{path}.to_k"), c, c)?,
            v: Linear::load(l, &format!("{path}.to_v"), c, c)?,
            out: Linear::load(l, &format!("{path}.to_out.0"), c, c)?,
        })
    }

    fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let n = h * w;
        let t = self
            .norm
            .apply(x.clone())
            .reshape([b, c, n])
            .swap_dims(1, 2);
        let heads = |y: Tensor<3>| y.reshape([b, 1, n, c]);
        let (q, k, v) = (
            heads(self.q.apply(t.clone())),
            heads(self.k.apply(t.clone())),
            heads(self.v.apply(t)),
        );
        let o = attention(q, k, v, None, None, AttentionModuleOptions::default());
        let o = self.out.apply(o.reshape([b, n, c]));
        o.swap_dims(1, 2).reshape([b, c, h, w]) + x
    }
}

/// `UNetMidBlock2D` with one layer: resnet, attention (unless `mid_block_add_attention` is
/// false), resnet.
#[derive(Debug, Clone)]
pub(crate) struct MidBlock {
    first: Resnet,
    attn: Option<Attention>,
    second: Resnet,
}

impl MidBlock {
    pub fn load(
        l: &Loader,
        path: &str,
        c: usize,
        add_attention: bool,
    ) -> Result<Self, WeightError> {
        Ok(MidBlock {
            first: Resnet::load(l, &format!("{path}.resnets.0"), c, c)?,
            attn: if add_attention {
                Some(Attention::load(l, &format!("{path}.attentions.0"), c)?)
            } else {
                None
            },
            second: Resnet::load(l, &format!("{path}.resnets.1"), c, c)?,
        })
    }

    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.first.apply(x);
        let x = match &self.attn {
            Some(a) => a.apply(x),
            None => x,
        };
        self.second.apply(x)
    }
}

/// `DownEncoderBlock2D`: resnets, then (except in the last block) `Downsample2D` with
/// `padding=0`: zero-pad right and bottom by one, 3×3 conv with stride 2.
#[derive(Debug, Clone)]
pub(crate) struct DownBlock {
    resnets: Vec<Resnet>,
    down: Option<Conv>,
}

impl DownBlock {
    pub fn load(
        l: &Loader,
        path: &str,
        cin: usize,
        cout: usize,
        layers: usize,
        downsample: bool,
    ) -> Result<Self, WeightError> {
        let resnets = (0..layers)
            .map(|j| {
                let i = if j == 0 { cin } else { cout };
                Resnet::load(l, &format!("{path}.resnets.{j}"), i, cout)
            })
            .collect::<Result<_, _>>()?;
        let down = if downsample {
            Some(Conv::load(
                l,
                &format!("{path}.downsamplers.0.conv"),
                cout,
                cout,
                3,
                2,
                0,
            )?)
        } else {
            None
        };
        Ok(DownBlock { resnets, down })
    }

    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.resnets.iter().fold(x, |x, r| r.apply(x));
        match &self.down {
            Some(d) => d.apply(x.pad([(0, 1), (0, 1)], PadMode::Constant(0.0))),
            None => x,
        }
    }
}

/// `UpDecoderBlock2D`: `layers_per_block + 1` resnets, then (except in the last block)
/// `Upsample2D`: nearest ×2 and a 3×3 conv.
#[derive(Debug, Clone)]
pub(crate) struct UpBlock {
    resnets: Vec<Resnet>,
    up: Option<Conv>,
}

impl UpBlock {
    pub fn load(
        l: &Loader,
        path: &str,
        cin: usize,
        cout: usize,
        layers: usize,
        upsample: bool,
    ) -> Result<Self, WeightError> {
        let resnets = (0..layers)
            .map(|j| {
                let i = if j == 0 { cin } else { cout };
                Resnet::load(l, &format!("{path}.resnets.{j}"), i, cout)
            })
            .collect::<Result<_, _>>()?;
        let up = if upsample {
            Some(Conv::load(
                l,
                &format!("{path}.upsamplers.0.conv"),
                cout,
                cout,
                3,
                1,
                1,
            )?)
        } else {
            None
        };
        Ok(UpBlock { resnets, up })
    }

    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.resnets.iter().fold(x, |x, r| r.apply(x));
        match &self.up {
            Some(c) => {
                let [_, _, h, w] = x.dims();
                c.apply(interpolate(
                    x,
                    InterpolateOptions::new(InterpolateMode::Nearest)
                        .with_output_size([2 * h, 2 * w]),
                ))
            }
            None => x,
        }
    }
}

/// diffusers' `Encoder` with `double_z=True`: conv_in, down blocks, mid block, norm, SiLU,
/// conv_out to `2 · latent_channels` (mean and log-variance).
#[derive(Debug, Clone)]
pub(crate) struct Encoder {
    pub conv_in: Conv,
    pub down: Vec<DownBlock>,
    pub mid: MidBlock,
    pub norm_out: GroupNorm,
    pub conv_out: Conv,
}

impl Encoder {
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.conv_in.apply(x);
        let x = self.down.iter().fold(x, |x, b| b.apply(x));
        let x = self.mid.apply(x);
        self.conv_out.apply(silu(self.norm_out.apply(x)))
    }
}

/// diffusers' `Decoder`: conv_in, mid block, up blocks, norm, SiLU, conv_out.
#[derive(Debug, Clone)]
pub(crate) struct Decoder {
    pub conv_in: Conv,
    pub mid: MidBlock,
    pub up: Vec<UpBlock>,
    pub norm_out: GroupNorm,
    pub conv_out: Conv,
}

impl Decoder {
    pub fn apply(&self, z: Tensor<4>) -> Tensor<4> {
        let x = self.conv_in.apply(z);
        let x = self.mid.apply(x);
        let x = self.up.iter().fold(x, |x, b| b.apply(x));
        self.conv_out.apply(silu(self.norm_out.apply(x)))
    }
}

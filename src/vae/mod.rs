//! The Stable Diffusion VAE (diffusers `AutoencoderKL`), built from a pipeline's `vae/`
//! `config.json` and safetensors weights, run on a Burn [`Device`]. [`Vae::decode`] turns
//! denoised latents into an image in [-1, 1] (it divides by `scaling_factor` itself, as a
//! pipeline does before `vae.decode`); [`Vae::encode`] turns an image in [-1, 1] into scaled
//! latents (the posterior mean, for image-to-image). Only `DownEncoderBlock2D` /
//! `UpDecoderBlock2D` blocks and SiLU are implemented; any other value of a field that changes
//! the computation is a [`VaeError::Unsupported`] naming the file and the field.
//!
//! ```no_run
//! # use rewire::vae::Vae;
//! let device = rewire::backend::default_device()?;
//! let vae = Vae::open("models/tiny-sd".as_ref(), &device)?;
//! let latents = burn::tensor::Tensor::<4>::zeros([1, 4, 16, 16], &device);
//! let image = vae.decode(latents); // [1, 3, 128, 128], in [-1, 1]
//! let back = vae.encode(image); // [1, 4, 16, 16]
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Try it: `cargo test --release --test vae` (decodes the DDIM pipeline case's final latents
//! with `models/tiny-sd/vae` and compares with diffusers' image).

mod blocks;
mod config;

pub use config::VaeConfig;

use crate::weights::{TensorFiles, WeightError, WeightSource};
use blocks::{Conv, Decoder, DownBlock, Encoder, GroupNorm, Loader, MidBlock, UpBlock};
use burn::tensor::{Device, Tensor};
use std::path::{Path, PathBuf};

/// Errors raised while opening a VAE.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    #[error(
        "{path} is not a diffusers VAE folder: no config.json in it or in its vae/\n  hint: pass a pipeline folder (with vae/) or the vae/ folder itself"
    )]
    NotFound { path: PathBuf },
    #[error("cannot read {path}: {source}\n  hint: check the file exists and is readable")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: invalid JSON at line {line}, column {column}: {message}\n  hint: the VAE config must be diffusers' AutoencoderKL config.json"
    )]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error(
        "{path}: unsupported value for `{field}`: {value}\n  hint: rewire's VAE supports {supported}"
    )]
    Unsupported {
        path: PathBuf,
        field: String,
        value: String,
        supported: &'static str,
    },
    #[error(
        "{path}: field `{field}` has {found} entries, expected {expected} (one per entry of `block_out_channels`)\n  hint: the config is inconsistent; re-export it with diffusers"
    )]
    Length {
        path: PathBuf,
        field: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("{path}: {message}\n  hint: {hint}")]
    Invalid {
        path: PathBuf,
        message: String,
        hint: &'static str,
    },
    #[error(transparent)]
    Weight(#[from] WeightError),
}

/// An opened `AutoencoderKL` with its weights on a device.
#[derive(Debug, Clone)]
pub struct Vae {
    dir: PathBuf,
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv>,
    post_quant_conv: Option<Conv>,
}

impl Vae {
    /// Opens a pipeline folder (reads its `vae/`) or a VAE folder, loading the weights onto
    /// `device`.
    pub fn open(path: &Path, device: &Device) -> Result<Self, VaeError> {
        let dir = crate::weights::component_dir(path, "vae").ok_or_else(|| VaeError::NotFound {
            path: path.to_path_buf(),
        })?;
        let cfg_path = dir.join("config.json");
        let config = VaeConfig::from_file(&cfg_path)?;
        config.validate(&cfg_path)?;
        let weights = TensorFiles::open_dir(&dir)?;
        let mut vae = Self::load(config, &cfg_path, &weights, device)?;
        vae.dir = dir;
        Ok(vae)
    }

    /// Builds a VAE from a config (validated against `config_path`, used in messages) and any
    /// weight source, e.g. [`crate::weights::RandomWeights`] for a benchmark.
    pub fn load(
        config: VaeConfig,
        config_path: &Path,
        weights: &dyn WeightSource,
        device: &Device,
    ) -> Result<Self, VaeError> {
        config.validate(config_path)?;
        let l = Loader {
            files: weights,
            device,
            groups: config.norm_num_groups,
        };
        let ch = &config.block_out_channels;
        let n = ch.len();
        let last = ch[n - 1];
        let lat = config.latent_channels;
        let layers = config.layers_per_block;
        let attn = config.mid_block_add_attention;

        let mut down = Vec::with_capacity(n);
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            down.push(DownBlock::load(&l, &p, cin, cout, layers, i + 1 < n)?);
            cin = cout;
        }
        let encoder = Encoder {
            conv_in: Conv::load(&l, "encoder.conv_in", config.in_channels, ch[0], 3, 1, 1)?,
            down,
            mid: MidBlock::load(&l, "encoder.mid_block", last, attn)?,
            norm_out: GroupNorm::load(&l, "encoder.conv_norm_out", last)?,
            conv_out: Conv::load(&l, "encoder.conv_out", last, 2 * lat, 3, 1, 1)?,
        };

        let mut up = Vec::with_capacity(n);
        let mut cin = last;
        for (i, &cout) in ch.iter().rev().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            up.push(UpBlock::load(&l, &p, cin, cout, layers + 1, i + 1 < n)?);
            cin = cout;
        }
        let decoder = Decoder {
            conv_in: Conv::load(&l, "decoder.conv_in", lat, last, 3, 1, 1)?,
            mid: MidBlock::load(&l, "decoder.mid_block", last, attn)?,
            up,
            norm_out: GroupNorm::load(&l, "decoder.conv_norm_out", ch[0])?,
            conv_out: Conv::load(&l, "decoder.conv_out", ch[0], config.out_channels, 3, 1, 1)?,
        };

        let quant_conv = if config.use_quant_conv {
            Some(Conv::load(&l, "quant_conv", 2 * lat, 2 * lat, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv::load(&l, "post_quant_conv", lat, lat, 1, 1, 0)?)
        } else {
            None
        };
        let dir = config_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Ok(Vae {
            dir,
            config,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
        })
    }

    /// The folder the VAE was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// `scaling_factor` from the config (0.18215 for SD 1.x/2.x).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// `shift_factor` from the config, if set.
    pub fn shift_factor(&self) -> Option<f64> {
        self.config.shift_factor
    }

    /// Channels of the latents `decode` takes and `encode` returns.
    pub fn latent_channels(&self) -> usize {
        self.config.latent_channels
    }

    /// How much smaller the latents are than the image: `2^(len(block_out_channels) - 1)`.
    pub fn downsample_factor(&self) -> usize {
        self.config.downsample_factor()
    }

    /// Decodes denoised latents `[B, latent_channels, h, w]` into an image
    /// `[B, out_channels, h·f, w·f]` in [-1, 1] (not clamped): `latents / scaling_factor`
    /// (`+ shift_factor` when set), `post_quant_conv`, then the decoder. Pass the scheduler's
    /// latents as they are; do not divide by the scaling factor first.
    ///
    /// # Panics
    /// If `latents` does not have `latent_channels` channels.
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let c = latents.dims()[1];
        assert_eq!(
            c, self.config.latent_channels,
            "Vae::decode: latents have {c} channels, the VAE takes {}",
            self.config.latent_channels
        );
        let z = latents / self.config.scaling_factor;
        let z = match self.config.shift_factor {
            Some(s) => z + s,
            None => z,
        };
        let z = match &self.post_quant_conv {
            Some(p) => p.apply(z),
            None => z,
        };
        self.decoder.apply(z)
    }

    /// Encodes an image `[B, in_channels, H, W]` in [-1, 1] into latents
    /// `[B, latent_channels, H/f, W/f]`: the posterior mean (no sampling), minus
    /// `shift_factor` when set, times `scaling_factor` — what an image-to-image pipeline
    /// starts from.
    ///
    /// # Panics
    /// If `image` does not have `in_channels` channels.
    pub fn encode(&self, image: Tensor<4>) -> Tensor<4> {
        let c = image.dims()[1];
        assert_eq!(
            c, self.config.in_channels,
            "Vae::encode: image has {c} channels, the VAE takes {}",
            self.config.in_channels
        );
        let h = self.encoder.apply(image);
        let moments = match &self.quant_conv {
            Some(q) => q.apply(h),
            None => h,
        };
        let mean = moments.narrow(1, 0, self.config.latent_channels);
        let mean = match self.config.shift_factor {
            Some(s) => mean - s,
            None => mean,
        };
        mean * self.config.scaling_factor
    }
}

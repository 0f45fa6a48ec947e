//! Where a run's latents start: deterministic seeded noise ([`gaussian`], the same on every
//! machine) and an init image as the VAE encoder's input (img2img).
//!
//! Try it: `cargo test --release --test pipeline same_seed_same_png`.

use crate::exec::HostTensor;
use burn::tensor::Device;

/// An `[H, W, 3]` image in [0, 1] as the VAE's `[1, 3, H, W]` input in [-1, 1].
pub(super) fn image_tensor(img: &HostTensor, device: &Device) -> burn::tensor::Tensor<4> {
    let (h, w) = (img.shape[0], img.shape[1]);
    let mut chw = vec![0f32; h * w * 3];
    for (i, v) in img.data.iter().enumerate() {
        chw[(i % 3) * h * w + i / 3] = v * 2.0 - 1.0;
    }
    crate::exec::upload::<4>(&[1, 3, h, w], chw, device)
}

/// Deterministic standard normal samples (Box–Muller on splitmix64): the same seed gives the
/// same latents on every machine.
pub fn gaussian(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed ^ 0x5DEE_CE66_D1CE_4E5B;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (next(), next());
        let r = (-2.0 * u1.ln()).sqrt();
        let th = std::f64::consts::TAU * u2;
        out.push((r * th.cos()) as f32);
        out.push((r * th.sin()) as f32);
    }
    out.truncate(n);
    out
}

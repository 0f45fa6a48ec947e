//! Vectorised elementwise math for the CPU kernels: `exp` (Cephes' polynomial, `2ⁿ` from the
//! exponent bits) and SiLU, as AVX2+FMA intrinsics on 8 lanes with scalar twins for other
//! processors and for the tails.
//! NaN stays NaN through every function.
//!
//! Try it: `cargo test --release --lib simd`.

/// Cephes' `exp` constants.
const LOG2E: f32 = std::f32::consts::LOG2_E;
const C1: f32 = 0.693_359_4;
const C2: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
/// `eˣ`: within 2 ulp of libm's over [-87, 88]; below -87 gives 0, NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding and subtracting rounds to an integer
    if x.is_nan() {
        return x;
    }
    if x < -87.0 {
        return 0.0;
    }
    let xc = x.min(88.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * C1 - n * C2;
    let z = r * r;
    let p = ((((P[0] * r + P[1]) * r + P[2]) * r + P[3]) * r + P[4]) * r + P[5];
    let y = p * z + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// SiLU: `x · sigmoid(x) = x / (1 + e⁻ˣ)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    //! The same functions on `__m256` (call only where AVX2 and FMA are available).
    use std::arch::x86_64::*;

    /// `eˣ` on 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp8(x: __m256) -> __m256 {
        let lo = _mm256_set1_ps(-87.0);
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
        // max/min return their second operand when one is NaN: NaN stays NaN.
        let xc = _mm256_min_ps(_mm256_set1_ps(88.0), _mm256_max_ps(lo, x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, _mm256_set1_ps(super::LOG2E)),
        );
        let r = _mm256_fnmadd_ps(
            n,
            _mm256_set1_ps(super::C2),
            _mm256_fnmadd_ps(n, _mm256_set1_ps(super::C1), xc),
        );
        let z = _mm256_mul_ps(r, r);
        let p = super::P;
        let mut y = _mm256_fmadd_ps(_mm256_set1_ps(p[0]), r, _mm256_set1_ps(p[1]));
        for &c in &p[2..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        y = _mm256_add_ps(_mm256_fmadd_ps(y, z, r), _mm256_set1_ps(1.0));
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_andnot_ps(under, _mm256_mul_ps(y, pow2))
    }

    /// SiLU on 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn silu8(x: __m256) -> __m256 {
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e))
    }
}

/// Whether the AVX2 paths can run here.
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Deterministic test values in `[lo, hi)` (xorshift), for the CPU kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u32, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            lo + (s as f32 / u32::MAX as f32) * (hi - lo)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_functions_are_accurate() {
        let mut worst = (0f64, 0f64, 0f64);
        let mut x = -6.0f32;
        while x <= 6.0 {
            let s = silu(x) as f64;
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            worst.1 = worst.1.max((s - want).abs());
            let e = exp(x) as f64;
            worst.2 = worst
                .2
                .max(((e - (x as f64).exp()) / (x as f64).exp()).abs());
            x += 0.000_7;
        }
        assert!(worst.1 < 1e-6, "silu {}", worst.1);
        assert!(worst.2 < 3e-7, "exp {}", worst.2);
        assert!(silu(f32::NAN).is_nan() && exp(f32::NAN).is_nan());
        assert_eq!(exp(-100.0), 0.0);
        assert!(silu(-100.0).abs() < 1e-30 && (silu(100.0) - 100.0).abs() < 1e-4);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_functions_match_the_scalar_ones() {
        use std::arch::x86_64::*;
        if !has_avx2() {
            return;
        }
        let xs: Vec<f32> = (0..4096).map(|i| (i as f32 - 2048.0) * 0.004_7).collect();
        for (f8, f1, name) in [
            (
                avx2::silu8 as unsafe fn(__m256) -> __m256,
                silu as fn(f32) -> f32,
                "silu",
            ),
            (avx2::exp8, exp, "exp"),
        ] {
            for c in xs.chunks_exact(8) {
                let mut out = [0f32; 8];
                // SAFETY: AVX2 and FMA are available (checked above); 8 floats in and out.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), f8(_mm256_loadu_ps(c.as_ptr()))) };
                for (o, &x) in out.iter().zip(c) {
                    let want = f1(x);
                    assert!(
                        (o - want).abs() <= 1e-6 * want.abs().max(1.0),
                        "{name}({x}) = {o}, scalar {want}"
                    );
                }
            }
            let mut out = [0f32; 8];
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), f8(_mm256_set1_ps(f32::NAN))) };
            assert!(out.iter().all(|v| v.is_nan()), "{name}(NaN)");
        }
    }
}

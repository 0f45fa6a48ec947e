//! rewire's own multi-head attention for the CPU backend (flex): `softmax(q·kᵀ·scale)·v` on
//! tiles of up to [`TILE`] queries, one task per (batch item, head, query tile), run in parallel
//! with rayon. Each tile's two products go through `gemm` (the matrix kernel Burn's CPU backend
//! uses too) reading the heads in place by strides (no head split or transpose copies); the
//! softmax runs over whole score rows with a polynomial `exp` over SIMD lanes (AVX2+FMA when
//! the processor has them), no libm call per score. A tile's scores (`TILE × keys` floats) stay
//! in the task's own buffer, so memory is `tasks in flight × TILE × keys`, never `queries × keys`.
//!
//! Rewrites need no special case here: their folded forms arrive as plain inputs (an extra
//! Q/K dimension per head for a score bias, scaled V rows for a reweight), with `q` and `k`
//! wider than `v` per head.
//!
//! Try it: `cargo test --release --lib cpu_attention` (against the naive formula), or any parity
//! test (`cargo test --release --test parity`), which runs every attention through it.

use super::simd::exp;
use rayon::prelude::*;

/// Queries per task.
pub const TILE: usize = 64;

/// Shapes of one attention call: `q` `[batch, queries, heads·dqk]`, `k` `[batch, keys,
/// heads·dqk]`, `v` `[batch, keys, heads·dv]`, output `[batch, queries, heads·dv]`, all
/// row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub queries: usize,
    pub keys: usize,
    pub heads: usize,
    pub dqk: usize,
    pub dv: usize,
}

/// A raw pointer the tasks write disjoint tiles through.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes its own (batch, head, query tile) block of the output, which no
// other task reads or writes.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `softmax(q·kᵀ·scale)·v` per head; see [`Dims`] for the layouts.
///
/// # Panics
/// When a slice's length does not match `dims` (a caller bug: the executor checks shapes).
pub fn attention(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32) -> Vec<f32> {
    let Dims {
        batch,
        queries,
        keys,
        heads,
        dqk,
        dv,
    } = dims;
    assert_eq!(q.len(), batch * queries * heads * dqk, "q shape");
    assert_eq!(k.len(), batch * keys * heads * dqk, "k shape");
    assert_eq!(v.len(), batch * keys * heads * dv, "v shape");
    let mut out = vec![0f32; batch * queries * heads * dv];
    if keys == 0 || queries == 0 {
        return out;
    }
    let tiles = queries.div_ceil(TILE);
    let optr = OutPtr(out.as_mut_ptr());
    let (qrow, vrow) = ((heads * dqk) as isize, (heads * dv) as isize);
    (0..batch * heads * tiles).into_par_iter().for_each_init(
        || vec![0f32; TILE * keys],
        |scores, task| {
            let (bh, tile) = (task / tiles, task % tiles);
            let (b, h) = (bh / heads, bh % heads);
            let q0 = tile * TILE;
            let m = TILE.min(queries - q0);
            let qp = q[(b * queries + q0) * heads * dqk + h * dqk..].as_ptr();
            let kp = k[b * keys * heads * dqk + h * dqk..].as_ptr();
            let vp = v[b * keys * heads * dv + h * dv..].as_ptr();
            let s = &mut scores[..m * keys];
            // SAFETY: the pointers and strides address q's rows q0..q0+m of head h, k's and v's
            // rows 0..keys of head h (in bounds by the length checks above), and the task's own
            // scores buffer of m × keys floats.
            unsafe {
                gemm::gemm(
                    m,
                    keys,
                    dqk,
                    s.as_mut_ptr(),
                    1,
                    keys as isize,
                    false,
                    qp,
                    1,
                    qrow,
                    kp,
                    qrow,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for row in s.chunks_exact_mut(keys) {
                softmax_row(row);
            }
            // SAFETY: the output block (rows q0..q0+m of item b, columns h·dv..(h+1)·dv) is
            // this task's alone; v's rows are read with stride heads·dv.
            unsafe {
                let op = optr.get().add((b * queries + q0) * heads * dv + h * dv);
                gemm::gemm(
                    m,
                    dv,
                    keys,
                    op,
                    1,
                    vrow,
                    false,
                    s.as_ptr(),
                    1,
                    keys as isize,
                    vp,
                    1,
                    vrow,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    out
}

/// A row of scores to probabilities, in place: `exp(x − max) / Σ`.
fn softmax_row(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::has_avx2() {
            // SAFETY: the processor has AVX2 and FMA (checked just above).
            unsafe { softmax_row_avx2(row) };
            return;
        }
    }
    softmax_row_generic(row);
}

/// [`softmax_row_generic`] in AVX2+FMA intrinsics: 8 scores per instruction, [`exp`]'s
/// polynomial on whole registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = row.len();
    let full = n - n % 8;
    let p = row.as_mut_ptr();
    // SAFETY (whole block): loads and stores stay within row[..full] in steps of 8.
    unsafe {
        let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < full {
            mx = _mm256_max_ps(mx, _mm256_loadu_ps(p.add(i)));
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), mx);
        let mut m = f32::NEG_INFINITY;
        for &x in lanes.iter().chain(&row[full..]) {
            if x > m {
                m = x;
            }
        }
        if m == f32::NEG_INFINITY {
            row.iter_mut().for_each(|x| *x = f32::NAN);
            return;
        }
        let mv = _mm256_set1_ps(m);
        let mut sum = _mm256_setzero_ps();
        let mut i = 0;
        while i < full {
            let e = super::simd::avx2::exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
            _mm256_storeu_ps(p.add(i), e);
            sum = _mm256_add_ps(sum, e);
            i += 8;
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        let mut total: f32 = lanes.iter().sum();
        for x in &mut row[full..] {
            *x = exp(*x - m);
            total += *x;
        }
        let inv = _mm256_set1_ps(1.0 / total);
        let mut i = 0;
        while i < full {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
            i += 8;
        }
        for x in &mut row[full..] {
            *x *= 1.0 / total;
        }
    }
}

/// Lanes the loops below are written for (LLVM maps them to SIMD registers).
const LANES: usize = 8;

#[inline(always)]
fn softmax_row_generic(row: &mut [f32]) {
    // Max over the row (a NaN score needs no care here: exp(NaN − m) is NaN, so the row's
    // sum and every probability in it become NaN, as the naive formula gives).
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            mx[l] = if c[l] > mx[l] { c[l] } else { mx[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in mx.iter().chain(chunks.remainder()) {
        if x > m {
            m = x;
        }
    }
    if m == f32::NEG_INFINITY {
        // Every score is -inf or NaN: NaN, as softmax gives for (-inf) − (-inf).
        row.iter_mut().for_each(|x| *x = f32::NAN);
        return;
    }
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let e = exp(c[l] - m);
            c[l] = e;
            sums[l] += e;
        }
    }
    let mut sum: f32 = 0.0;
    for x in chunks.into_remainder() {
        *x = exp(*x - m);
        sum += *x;
    }
    sum += sums.iter().sum::<f32>();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(q: &[f32], k: &[f32], v: &[f32], d: Dims, scale: f32) -> Vec<f32> {
        let mut out = vec![0f32; d.batch * d.queries * d.heads * d.dv];
        for b in 0..d.batch {
            for h in 0..d.heads {
                for i in 0..d.queries {
                    let qi = &q[(b * d.queries + i) * d.heads * d.dqk + h * d.dqk..][..d.dqk];
                    let s: Vec<f64> = (0..d.keys)
                        .map(|j| {
                            let kj = &k[(b * d.keys + j) * d.heads * d.dqk + h * d.dqk..][..d.dqk];
                            qi.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d.dv {
                        let o: f64 = (0..d.keys)
                            .map(|j| {
                                e[j] / z
                                    * v[(b * d.keys + j) * d.heads * d.dv + h * d.dv + c] as f64
                            })
                            .sum();
                        out[(b * d.queries + i) * d.heads * d.dv + h * d.dv + c] = o as f32;
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        crate::exec::simd::test_values(n, seed, -2.0, 2.0)
    }

    #[test]
    fn matches_the_formula() {
        // Odd sizes: a partial last tile, keys not a multiple of the lanes, dqk ≠ dv (the
        // folded score bias adds one Q/K dimension per head).
        for d in [
            Dims {
                batch: 2,
                queries: 70,
                keys: 77,
                heads: 3,
                dqk: 9,
                dv: 8,
            },
            Dims {
                batch: 1,
                queries: 5,
                keys: 3,
                heads: 1,
                dqk: 4,
                dv: 4,
            },
            Dims {
                batch: 1,
                queries: 130,
                keys: 130,
                heads: 2,
                dqk: 16,
                dv: 16,
            },
        ] {
            let q = values(d.batch * d.queries * d.heads * d.dqk, 1);
            let k = values(d.batch * d.keys * d.heads * d.dqk, 2);
            let v = values(d.batch * d.keys * d.heads * d.dv, 3);
            let scale = 1.0 / (d.dqk as f32).sqrt();
            let got = attention(&q, &k, &v, d, scale);
            let want = naive(&q, &k, &v, d, scale);
            let e = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(e < 2e-6, "{d:?}: {e}");
        }
    }

    #[test]
    fn exp_is_close_to_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.001_3;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn simd_softmax_matches_the_scalar_one() {
        for n in [1usize, 7, 8, 77, 4096] {
            let mut a: Vec<f32> = values(n, n as u32).iter().map(|x| x * 20.0).collect();
            if n > 3 {
                a[2] = -200.0; // below exp's range
            }
            let mut b = a.clone();
            softmax_row(&mut a);
            softmax_row_generic(&mut b);
            let e = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(e < 1e-6, "{n}: {e}");
            let total: f32 = a.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "{n}: sums to {total}");
        }
    }

    #[test]
    fn nan_stays_nan() {
        let d = Dims {
            batch: 1,
            queries: 2,
            keys: 20,
            heads: 1,
            dqk: 2,
            dv: 2,
        };
        let mut q = values(4, 1);
        q[0] = f32::NAN;
        let out = attention(&q, &values(40, 2), &values(40, 3), d, 1.0);
        assert!(out[0].is_nan() && out[1].is_nan(), "query 0 read a NaN");
        assert!(out[2].is_finite() && out[3].is_finite(), "query 1 did not");
    }
}

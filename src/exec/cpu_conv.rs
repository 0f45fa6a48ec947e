//! Convolutions, linears and the GEGLU gate for the CPU backend (flex), on host slices with
//! weights laid out once at load (see `ConvW` and `LinearW` in [`super::kernels`]):
//!
//! - [`conv2d`]: NCHW input, weights `[cout, k·k·cin]` (permuted from the checkpoint's
//!   `[cout, cin, k, k]` once at load, [`pack_conv_weight`]). A 1×1 stride-1 unpadded
//!   convolution is one GEMM per batch item straight on the input; any other is im2col (rows
//!   `(ky, kx, cin)`, one row per rayon task, zero where the padding is, any stride, asymmetric
//!   padding) then one GEMM per item. The reduction runs in the order Burn's flex conv2d uses
//!   (kernel position outer, input channel inner), so the float rounding stays close to what it
//!   was before this kernel, which matters to the parity cases nearest their bounds.
//! - [`linear`]: `x · W` with `W` held as `[in, out]`.
//! - [`geglu`]: `hidden · gelu(gate)` with the exact erf (libm's, as Burn's flex backend and
//!   torch use), the same expression as Burn's, so it matches it bit for bit.
//!
//! The GEMMs go through `gemm` (f32 accumulation, rayon over the available threads); the bias is
//! added to each output row after its product (as Burn does), in one parallel pass.
//!
//! Try it: `cargo test --release --lib cpu_conv` (against Burn's conv2d, linear and gelu), or
//! `rewire profile benches/configs/sd15-unet.json --size 64x64` to see the time per op kind.

use rayon::prelude::*;

/// Shapes of one convolution: input `[batch, cin, h, w]`, weights `[cout, cin, k, k]`,
/// padding `[top, bottom, left, right]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvDims {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: [usize; 4],
}

impl ConvDims {
    /// Output height and width (0 when the padded input is smaller than the kernel).
    pub fn out_hw(&self) -> (usize, usize) {
        let s = self.stride.max(1);
        let side =
            |n: usize, a: usize, b: usize| (n + a + b).checked_sub(self.k).map_or(0, |v| v / s + 1);
        (
            side(self.h, self.pad[0], self.pad[1]),
            side(self.w, self.pad[2], self.pad[3]),
        )
    }
}

/// `dst[m×n] (+)= a[m×k] · b[k×n]`, all row-major with the given row strides; accumulates onto
/// `dst` when `acc`.
///
/// # Safety
/// The pointers must address `m` rows of `n` (`dst`), `m` rows of `k` (`a`) and `k` rows of
/// `n` (`b`) floats at the given row strides.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    acc: bool,
    a: *const f32,
    a_rs: usize,
    b: *const f32,
    b_rs: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            acc,
            a,
            1,
            a_rs as isize,
            b,
            1,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// `[cout, cin, k, k]` weights as the `[cout, k·k·cin]` matrix [`conv2d`] multiplies by.
pub fn pack_conv_weight(w: &[f32], cout: usize, cin: usize, k: usize) -> Vec<f32> {
    assert_eq!(w.len(), cout * cin * k * k, "conv weight shape");
    let ks = k * k;
    let mut out = vec![0f32; w.len()];
    for co in 0..cout {
        for ci in 0..cin {
            for p in 0..ks {
                out[co * cin * ks + p * cin + ci] = w[(co * cin + ci) * ks + p];
            }
        }
    }
    out
}

/// A 2-D convolution of `x` `[batch, cin, h, w]` by `weight` `[cout, k·k·cin]` (see
/// [`pack_conv_weight`]) plus `bias`
/// `[cout]`; returns `[batch, cout, ho, wo]` (see [`ConvDims::out_hw`]).
///
/// # Panics
/// When a slice's length does not match `dims` (a caller bug: the graph checks shapes).
pub fn conv2d(x: &[f32], dims: ConvDims, weight: &[f32], bias: &[f32]) -> Vec<f32> {
    let ConvDims {
        batch,
        cin,
        h,
        w,
        cout,
        k,
        stride,
        pad,
    } = dims;
    assert_eq!(x.len(), batch * cin * h * w, "conv input shape");
    assert_eq!(weight.len(), cout * cin * k * k, "conv weight shape");
    assert_eq!(bias.len(), cout, "conv bias shape");
    let (ho, wo) = dims.out_hw();
    let p = ho * wo;
    let kk = cin * k * k;
    let mut out = vec![0f32; batch * cout * p];
    if p == 0 || cout == 0 {
        return out;
    }
    let direct = k == 1 && stride == 1 && pad == [0; 4];
    let mut col = if direct {
        Vec::new()
    } else {
        vec![0f32; kk * p]
    };
    for b in 0..batch {
        let xb = &x[b * cin * h * w..(b + 1) * cin * h * w];
        let ob = &mut out[b * cout * p..(b + 1) * cout * p];
        let rhs: &[f32] = if direct {
            xb
        } else {
            im2col(xb, &dims, ho, wo, &mut col);
            &col
        };
        // SAFETY: ob is cout × p, weight cout × kk, rhs kk × p, all row-major and in bounds
        // by the length checks above.
        unsafe {
            matmul(
                cout,
                p,
                kk,
                ob.as_mut_ptr(),
                p,
                false,
                weight.as_ptr(),
                kk,
                rhs.as_ptr(),
                p,
            );
        }
    }
    add_bias(&mut out, bias, p);
    out
}

/// Adds `bias[c]` to every row of `len` values of channel `c` (rows cycle through the channels).
fn add_bias(out: &mut [f32], bias: &[f32], len: usize) {
    if len == 0 || bias.is_empty() {
        return;
    }
    out.par_chunks_mut(len).enumerate().for_each(|(r, row)| {
        let v = bias[r % bias.len()];
        row.iter_mut().for_each(|e| *e += v);
    });
}

/// Fills `col` `[k·k·cin, ho·wo]` with the input patches of one batch item.
fn im2col(x: &[f32], d: &ConvDims, ho: usize, wo: usize, col: &mut [f32]) {
    let (h, w, k, s) = (d.h, d.w, d.k, d.stride.max(1));
    let (pt, pl) = (d.pad[0], d.pad[2]);
    let p = ho * wo;
    col.par_chunks_mut(p).enumerate().for_each(|(r, row)| {
        let (ky, kx, ci) = (r / (k * d.cin), (r / d.cin) % k, r % d.cin);
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        // Output columns whose input column ox·s + kx − pl lies in 0..w.
        let lo = pl.saturating_sub(kx).div_ceil(s).min(wo);
        let hi = if w + pl > kx {
            ((w + pl - kx - 1) / s + 1).min(wo)
        } else {
            0
        }
        .max(lo);
        for (oy, orow) in row.chunks_exact_mut(wo).enumerate() {
            let iy = oy * s + ky;
            if iy < pt || iy - pt >= h {
                orow.fill(0.0);
                continue;
            }
            let src = &plane[(iy - pt) * w..(iy - pt + 1) * w];
            orow[..lo].fill(0.0);
            orow[hi..].fill(0.0);
            if s == 1 {
                let start = lo + kx - pl;
                orow[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
            } else {
                for (ox, o) in orow[lo..hi].iter_mut().enumerate() {
                    *o = src[(lo + ox) * s + kx - pl];
                }
            }
        }
    });
}

/// `x` `[rows, i]` times `weight` `[i, o]` plus `bias` `[o]`; returns `[rows, o]`.
///
/// # Panics
/// When a slice's length does not match the shapes (a caller bug).
pub fn linear(
    x: &[f32],
    rows: usize,
    i: usize,
    weight: &[f32],
    o: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(x.len(), rows * i, "linear input shape");
    assert_eq!(weight.len(), i * o, "linear weight shape");
    let mut out = vec![0f32; rows * o];
    if o == 0 {
        return out;
    }
    // SAFETY: out is rows × o, x rows × i, weight i × o, row-major, checked above.
    unsafe {
        matmul(
            rows,
            o,
            i,
            out.as_mut_ptr(),
            o,
            false,
            x.as_ptr(),
            i,
            weight.as_ptr(),
            o,
        );
    }
    if let Some(bias) = bias {
        assert_eq!(bias.len(), o, "linear bias shape");
        out.par_chunks_mut(o).for_each(|row| {
            row.iter_mut().zip(bias).for_each(|(e, &v)| *e += v);
        });
    }
    out
}

/// GEGLU's gate on `h` `[rows, 2·inner]` (hidden then gate halves of each row): returns
/// `hidden · gelu(gate)` `[rows, inner]`, with Burn's flex expression for GELU.
pub fn geglu(h: &[f32], rows: usize, inner: usize) -> Vec<f32> {
    assert_eq!(h.len(), rows * 2 * inner, "geglu input shape");
    let mut out = vec![0f32; rows * inner];
    if inner == 0 {
        return out;
    }
    out.par_chunks_mut(inner)
        .zip(h.par_chunks(2 * inner))
        .for_each(|(o, row)| {
            let (hidden, gate) = row.split_at(inner);
            for ((o, &a), &g) in o.iter_mut().zip(hidden).zip(gate) {
                *o = a * (0.5 * g * (1.0 + libm::erff(g / std::f32::consts::SQRT_2)));
            }
        });
    out
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::module::{conv2d as burn_conv2d, linear as burn_linear};
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{Device, Tensor, TensorData};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        crate::exec::simd::test_values(n, seed, -1.0, 1.0)
    }

    fn tensor<const D: usize>(data: Vec<f32>, shape: &[usize]) -> Tensor<D> {
        Tensor::<D>::from_data(TensorData::new(data, shape.to_vec()), &Device::flex())
    }

    fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 2e-5 * (1.0 + w.abs()),
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn conv2d_matches_burn() {
        let case = |batch, cin, h, w, cout, k, stride, pad: [usize; 4]| ConvDims {
            batch,
            cin,
            h,
            w,
            cout,
            k,
            stride,
            pad,
        };
        let cases = [
            case(2, 3, 5, 7, 4, 3, 1, [1; 4]),
            case(1, 4, 8, 6, 5, 3, 2, [1; 4]),
            case(2, 3, 9, 7, 2, 3, 2, [0, 1, 0, 1]),
            case(1, 2, 6, 5, 3, 3, 1, [2, 0, 1, 3]),
            case(2, 6, 4, 5, 7, 1, 1, [0; 4]),
            case(1, 6, 7, 4, 3, 1, 2, [0; 4]),
            case(3, 5, 3, 3, 4, 3, 1, [0; 4]),
            case(1, 16, 12, 10, 24, 3, 1, [1; 4]),
        ];
        for (n, d) in cases.into_iter().enumerate() {
            let x = values(d.batch * d.cin * d.h * d.w, 10 + n as u32);
            let wt = values(d.cout * d.cin * d.k * d.k, 20 + n as u32);
            let b = values(d.cout, 30 + n as u32);
            let got = conv2d(&x, d, &pack_conv_weight(&wt, d.cout, d.cin, d.k), &b);
            let want = burn_conv2d(
                tensor::<4>(x, &[d.batch, d.cin, d.h, d.w]),
                tensor::<4>(wt, &[d.cout, d.cin, d.k, d.k]),
                Some(tensor::<1>(b, &[d.cout])),
                ConvOptions::new_with_padding(
                    [d.stride, d.stride],
                    [(d.pad[0], d.pad[1]), (d.pad[2], d.pad[3])],
                    [1, 1],
                    1,
                ),
            );
            let (ho, wo) = d.out_hw();
            assert_eq!(want.dims(), [d.batch, d.cout, ho, wo], "case {n}: shape");
            close(&got, &host(want), &format!("case {n}: {d:?}"));
        }
    }

    #[test]
    fn conv2d_smaller_than_its_kernel_is_empty() {
        let d = ConvDims {
            batch: 1,
            cin: 1,
            h: 1,
            w: 1,
            cout: 2,
            k: 3,
            stride: 1,
            pad: [0; 4],
        };
        assert_eq!(d.out_hw(), (0, 0));
        assert!(conv2d(&[1.0], d, &[0.5; 18], &[0.0; 2]).is_empty());
    }

    #[test]
    fn packed_weights_put_the_channel_innermost() {
        // [cout 1, cin 2, 2×2] → [cout 1, (ky, kx, cin)].
        let w = [1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0];
        assert_eq!(
            pack_conv_weight(&w, 1, 2, 2),
            [1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0]
        );
    }

    #[test]
    fn linear_matches_burn() {
        for (n, (rows, i, o, bias)) in [(7, 5, 3, true), (1, 16, 9, false), (33, 40, 24, true)]
            .into_iter()
            .enumerate()
        {
            let x = values(rows * i, 40 + n as u32);
            let w = values(i * o, 50 + n as u32);
            let b = values(o, 60 + n as u32);
            let got = linear(&x, rows, i, &w, o, bias.then_some(&b[..]));
            let want = burn_linear(
                tensor::<2>(x, &[rows, i]),
                tensor::<2>(w, &[i, o]),
                bias.then(|| tensor::<1>(b, &[o])),
            );
            close(&got, &host(want), &format!("linear case {n}"));
        }
    }

    #[test]
    fn geglu_matches_burn_exactly() {
        let (rows, inner) = (5, 12);
        let h = crate::exec::simd::test_values(rows * 2 * inner, 7, -6.0, 6.0);
        let got = geglu(&h, rows, inner);
        let t = tensor::<2>(h, &[rows, 2 * inner]);
        let mut parts = t.chunk(2, 1);
        let gate = parts.pop().unwrap();
        let hidden = parts.pop().unwrap();
        let want = host(hidden * burn::tensor::activation::gelu(gate));
        assert_eq!(got, want);
    }
}

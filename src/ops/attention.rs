//! Attention ops: scaled dot-product attention over heads (fused), the fused reweights that
//! fold into it (scaling V's rows per key, widening Q and K by a score bias) and the K/V gather
//! of cross-frame attention; plus [`attend`], the attention every kernel shares.
//!
//! Try it: `cargo bench --bench attention` compares rewire's fused CPU kernel with Burn's.

use super::{Args, Family, Weights, count, want};
use crate::exec::{Kernel, LowerOptions, Value, upload};
use crate::graph::{Op, Shape};
use crate::limits::{MAX_CHANNELS, MAX_HEADS};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor};

/// The attention family.
pub struct Attention;

/// Which attention implementation a plan uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttentionImpl {
    /// A fused kernel: rewire's own on the CPU backend (flex; see
    /// [`crate::exec::cpu_attention`]), `burn::tensor::module::attention` on the others.
    #[default]
    Fused,
    /// `burn::tensor::module::attention` on every backend.
    Burn,
    /// Explicit `softmax(q kᵀ · scale) v` with materialised probabilities.
    Naive,
}

/// A lowered attention op.
#[derive(Debug, Clone)]
pub enum AttentionKernel {
    Attention {
        heads: usize,
        imp: AttentionImpl,
    },
    /// `[B, Nk, 1]` row factors.
    ScaleKeys(Tensor<3>),
    AugmentQ {
        heads: usize,
    },
    /// `[B, Nk, 1, 1]` raw biases (√(d+1) is applied at run time, when d is known).
    AugmentK {
        heads: usize,
        bias: Tensor<4>,
    },
    KvGather {
        index: Vec<Vec<usize>>,
    },
}

impl Family for Attention {
    fn name(&self, op: &Op) -> &'static str {
        match op {
            Op::Attention(_) => "attention",
            Op::ScaleKeys { .. } => "scale_keys",
            Op::AugmentQ { .. } => "augment_q",
            Op::AugmentK { .. } => "augment_k",
            Op::KvGather { .. } => "kv_gather",
            op => unreachable!("{op:?} is not an attention op"),
        }
    }

    fn arity(&self, op: &Op) -> usize {
        match op {
            Op::ScaleKeys { .. }
            | Op::AugmentQ { .. }
            | Op::AugmentK { .. }
            | Op::KvGather { .. } => 1,
            Op::Attention(_) => 3,
            op => unreachable!("{} is not an attention op", op.name()),
        }
    }

    fn check_params(&self, op: &Op) -> Result<(), String> {
        match op {
            Op::Attention(a) => {
                count("heads", a.heads, MAX_HEADS, "MAX_HEADS")?;
                count("head_dim", a.head_dim, MAX_CHANNELS, "MAX_CHANNELS")
            }
            Op::AugmentQ { heads } => count("heads", *heads, MAX_HEADS, "MAX_HEADS"),
            Op::AugmentK { heads, bias, .. } => {
                count("heads", *heads, MAX_HEADS, "MAX_HEADS")?;
                want(
                    bias.iter().all(|b| b.is_finite()),
                    "a score bias is not finite".into(),
                )
            }
            Op::ScaleKeys { weights, .. } => finite_weights(weights),
            Op::KvGather { .. } => Ok(()),
            op => unreachable!("{} is not an attention op", op.name()),
        }
    }

    fn infer(&self, op: &Op, inputs: &[&[usize]]) -> Result<Shape, String> {
        match op {
            Op::Attention(a) => {
                let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
                attn_qkv(a.heads, q, k, v)?;
                // A renormalised reweight widens Q and K by one per head (AugmentQ/AugmentK).
                want(
                    q[2] == a.heads * a.head_dim || q[2] == a.heads * (a.head_dim + 1),
                    format!(
                        "query width {} is not {} heads × head_dim {}",
                        q[2], a.heads, a.head_dim
                    ),
                )?;
                Ok(vec![q[0], q[1], v[2]])
            }
            Op::ScaleKeys { keys, weights } => {
                let v = inputs[0];
                want(
                    v.len() == 3 && v[1] == *keys && weights.len() == v[0] * keys,
                    format!(
                        "values {v:?} do not fit {} weights over {keys} keys",
                        weights.len()
                    ),
                )?;
                Ok(v.to_vec())
            }
            Op::AugmentQ { heads } => {
                let q = inputs[0];
                want(
                    q.len() == 3 && q[2].is_multiple_of(*heads),
                    format!("queries {q:?} do not split into {heads} heads"),
                )?;
                Ok(vec![q[0], q[1], q[2] + heads])
            }
            Op::AugmentK { heads, keys, bias } => {
                let k = inputs[0];
                want(
                    k.len() == 3
                        && k[2].is_multiple_of(*heads)
                        && k[1] == *keys
                        && bias.len() == k[0] * keys,
                    format!(
                        "keys {k:?} do not fit {heads} heads and {} biases over {keys} keys",
                        bias.len()
                    ),
                )?;
                Ok(vec![k[0], k[1], k[2] + heads])
            }
            Op::KvGather { index } => {
                let x = inputs[0];
                // Every source lists one input item per output item (the output may have
                // fewer or more items than the input: a window's carried frames).
                want(
                    x.len() == 3
                        && !index.is_empty()
                        && !index[0].is_empty()
                        && index
                            .iter()
                            .all(|ix| ix.len() == index[0].len() && ix.iter().all(|&i| i < x[0])),
                    format!(
                        "input {x:?} does not fit a gather over {} sources",
                        index.len()
                    ),
                )?;
                Ok(vec![index[0].len(), x[1] * index.len(), x[2]])
            }
            op => unreachable!("{} is not an attention op", op.name()),
        }
    }

    fn flops(&self, op: &Op, inputs: &[&[usize]], out: &[usize]) -> u64 {
        match op {
            Op::Attention(a) => {
                let b = inputs[0][0] as u64;
                4 * b * (a.heads * a.queries * a.keys * a.head_dim) as u64
            }
            _ => super::elements(out),
        }
    }

    fn lower(&self, op: &Op, _w: &mut Weights, dev: &Device, opts: LowerOptions) -> Kernel {
        Kernel::Attention(match op {
            Op::Attention(a) => AttentionKernel::Attention {
                heads: a.heads,
                imp: opts.attention,
            },
            Op::ScaleKeys { keys, weights } => {
                let b = weights.len() / keys;
                AttentionKernel::ScaleKeys(upload(&[b, *keys, 1], weights.clone(), dev))
            }
            Op::AugmentQ { heads } => AttentionKernel::AugmentQ { heads: *heads },
            Op::AugmentK { heads, keys, bias } => {
                let b = bias.len() / keys;
                // The head dim is only known from the input; the factor √(d+1) is applied at
                // run time, so store the raw bias here.
                AttentionKernel::AugmentK {
                    heads: *heads,
                    bias: upload(&[b, *keys, 1, 1], bias.clone(), dev),
                }
            }
            Op::KvGather { index } => AttentionKernel::KvGather {
                index: index.clone(),
            },
            op => unreachable!("{} is not an attention op", op.name()),
        })
    }
}

impl AttentionKernel {
    pub fn run(&self, mut args: Args) -> Value {
        match self {
            AttentionKernel::Attention { heads, imp } => {
                let (q, k, v) = (args.take().r3(), args.take().r3(), args.take().r3());
                Value::R3(attend_nan_safe(q, k, v, *heads, *imp))
            }
            AttentionKernel::ScaleKeys(w) => Value::R3(args.take().r3() * w.clone()),
            AttentionKernel::AugmentQ { heads } => {
                let q = args.take().r3();
                let [b, n, c] = q.dims();
                let d = c / heads;
                let q = q.reshape([b, n, *heads, d]) * (((d + 1) as f64) / d as f64).sqrt();
                let one = Tensor::<4>::ones([b, n, *heads, 1], &q.device());
                Value::R3(Tensor::cat(vec![q, one], 3).reshape([b, n, heads * (d + 1)]))
            }
            AttentionKernel::AugmentK { heads, bias } => {
                let k = args.take().r3();
                let [b, n, c] = k.dims();
                let d = c / heads;
                let k = k.reshape([b, n, *heads, d]);
                let extra = (bias.clone() * ((d + 1) as f64).sqrt()).repeat_dim(2, *heads);
                Value::R3(Tensor::cat(vec![k, extra], 3).reshape([b, n, heads * (d + 1)]))
            }
            AttentionKernel::KvGather { index } => {
                let x = args.take().r3();
                let dev = x.device();
                let parts: Vec<Tensor<3>> =
                    index.iter().map(|ix| pick(x.clone(), ix, &dev)).collect();
                Value::R3(Tensor::cat(parts, 1))
            }
        }
    }
}

/// Checks reweighting factors: every one finite and ≥ 0.
pub(crate) fn finite_weights(weights: &[f32]) -> Result<(), String> {
    want(
        weights.iter().all(|w| w.is_finite() && *w >= 0.0),
        "a weight is not a finite number ≥ 0".into(),
    )
}

/// Checks the q, k, v shapes of one attention: `[B, Nq, h·dq]`, `[B, Nk, h·dq]`, `[B, Nk, h·dv]`.
pub(crate) fn attn_qkv(heads: usize, q: &[usize], k: &[usize], v: &[usize]) -> Result<(), String> {
    let ok = q.len() == 3
        && k.len() == 3
        && v.len() == 3
        && q[2].is_multiple_of(heads)
        && v[2].is_multiple_of(heads)
        && k[2] == q[2]
        && k[0] == q[0]
        && v[0] == q[0]
        && v[1] == k[1];
    want(
        ok,
        format!(
            "query {q:?}, key {k:?}, value {v:?} are not [B, Nq, {heads}·dq], [B, Nk, {heads}·dq], [B, Nk, {heads}·dv]"
        ),
    )
}

/// [`attend`] that never turns NaN into numbers: fused kernels keep a running maximum that
/// skips NaN, so a NaN query, key or value could come out finite. Adds 0 to every output, or
/// NaN when any input holds NaN or ±Inf (`x · 0` is NaN exactly for those).
pub fn attend_nan_safe(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    imp: AttentionImpl,
) -> Tensor<3> {
    if uses_cpu_kernel(&q, imp) {
        // rewire's CPU kernel carries a NaN score through the softmax (cpu_attention's
        // `nan_stays_nan` test): no poison pass needed.
        return attend(q, k, v, heads, imp);
    }
    let poison = nan_or_zero(q.clone()) + nan_or_zero(k.clone()) + nan_or_zero(v.clone());
    attend(q, k, v, heads, imp) + poison.reshape([1, 1, 1])
}

/// Whether [`attend`] runs rewire's CPU kernel for these inputs.
fn uses_cpu_kernel(q: &Tensor<3>, imp: AttentionImpl) -> bool {
    #[cfg(feature = "flex")]
    {
        imp == AttentionImpl::Fused && q.device() == Device::flex()
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (q, imp);
        false
    }
}

/// A one-element tensor: 0 when `t` is finite, NaN otherwise.
fn nan_or_zero(t: Tensor<3>) -> Tensor<1> {
    (t * 0.0).sum()
}

/// Rows `idx` of a batch (axis 0).
pub(crate) fn pick<const D: usize>(t: Tensor<D>, idx: &[usize], dev: &Device) -> Tensor<D> {
    if idx.len() == t.dims()[0] && idx.iter().enumerate().all(|(i, &j)| i == j) {
        return t;
    }
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    let index = Tensor::<1, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(v, [idx.len()]),
        dev,
    );
    t.select(0, index)
}

/// `[B, N, h·d]` → `[B, h, N, d]`.
pub(crate) fn split_heads(t: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, n, c] = t.dims();
    t.reshape([b, n, heads, c / heads]).swap_dims(1, 2)
}

/// Multi-head attention on `[B, N, h·d]` tensors.
pub fn attend(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    imp: AttentionImpl,
) -> Tensor<3> {
    let [b, n, c] = q.dims();
    let cv = v.dims()[2];
    #[cfg(feature = "flex")]
    if uses_cpu_kernel(&q, imp) {
        return cpu_attend(q, k, v, heads);
    }
    let (q, k, v) = (
        split_heads(q, heads),
        split_heads(k, heads),
        split_heads(v, heads),
    );
    let o = match imp {
        AttentionImpl::Fused | AttentionImpl::Burn => {
            attention(q, k, v, None, None, AttentionModuleOptions::default())
        }
        AttentionImpl::Naive => {
            let d = c / heads;
            let s = q.matmul(k.swap_dims(2, 3)) * (1.0 / (d as f64).sqrt());
            burn::tensor::activation::softmax(s, 3).matmul(v)
        }
    };
    o.swap_dims(1, 2).reshape([b, n, cv])
}

/// [`attend`] through rewire's CPU kernel: the tensors' data in, one upload out.
#[cfg(feature = "flex")]
fn cpu_attend(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
    use crate::exec::cpu_attention::{Dims, attention};
    let [batch, queries, c] = q.dims();
    let keys = k.dims()[1];
    let cv = v.dims()[2];
    let dev = q.device();
    let dims = Dims {
        batch,
        queries,
        keys,
        heads,
        dqk: c / heads,
        dv: cv / heads,
    };
    let scale = 1.0 / ((c / heads) as f32).sqrt();
    use crate::exec::kernels::host;
    let out = attention(&host(q), &host(k), &host(v), dims, scale);
    Tensor::<3>::from_data(
        burn::tensor::TensorData::new(out, [batch, queries, cv]),
        &dev,
    )
}

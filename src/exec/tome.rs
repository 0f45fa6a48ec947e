//! Token merging: tomesd 0.1.3's `bipartite_soft_matching_random2d`, computed on the host from
//! the metric and turned into a merge plan (each token's slot among the merged tokens). Merging
//! is a scatter-mean into the slots, unmerging a gather from them — both on the device.
//!
//! The order of merged tokens differs from tomesd's (`[unmerged src..., dst...]`), which no
//! consumer can see: attention is permutation-invariant over keys, and unmerge restores positions.

use burn::tensor::{Device, Int, Tensor, TensorData};

/// A merge plan for a batch: every token's slot, and 1/size of every slot.
#[derive(Debug, Clone)]
pub struct MergePlan {
    pub batch: usize,
    pub tokens: usize,
    pub merged: usize,
    /// `[B, N, 1]` slot of each token.
    pub slot: Tensor<3, Int>,
    /// `[B, M, 1]` 1 / (tokens in the slot).
    pub inv_count: Tensor<3>,
}

/// The destination tokens of an `h × w` grid: one per `sy × sx` cell (top-left unless random,
/// one pattern for the whole batch, like tomesd's rand_idx). Returns (dst, src) token indices.
pub fn split_tokens(
    n: usize,
    (h, w): (usize, usize),
    sx: usize,
    sy: usize,
    seed: Option<u64>,
) -> (Vec<usize>, Vec<usize>) {
    let (hsy, wsx) = (h / sy, w / sx);
    let mut is_dst = vec![false; n];
    let mut rng = seed;
    for cy in 0..hsy {
        for cx in 0..wsx {
            let k = match rng.as_mut() {
                None => 0,
                Some(state) => {
                    *state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((*state >> 33) % (sx * sy) as u64) as usize
                }
            };
            let (oy, ox) = (k / sx, k % sx);
            is_dst[(cy * sy + oy) * w + cx * sx + ox] = true;
        }
    }
    let dst = (0..n).filter(|&i| is_dst[i]).collect();
    let src = (0..n).filter(|&i| !is_dst[i]).collect();
    (dst, src)
}

/// The slots of one item from each src token's best dst (`best[a] = (similarity, dst index)`):
/// the `r` most similar src tokens join their dst (stable on ties, like torch's CPU sort).
/// Returns (slot per token, number of slots).
pub fn assign(
    n: usize,
    dst: &[usize],
    src: &[usize],
    best: &[(f32, usize)],
    r: usize,
) -> (Vec<usize>, usize) {
    let r = r.min(src.len());
    let mut order: Vec<usize> = (0..src.len()).collect();
    order.sort_by(|&x, &y| {
        best[y]
            .0
            .partial_cmp(&best[x].0)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let unmerged = src.len() - r;
    let mut slot = vec![0usize; n];
    for (pos, &a) in order[r..].iter().enumerate() {
        slot[src[a]] = pos;
    }
    for (b, &j) in dst.iter().enumerate() {
        slot[j] = unmerged + b;
    }
    for &a in &order[..r] {
        slot[src[a]] = unmerged + best[a].1;
    }
    (slot, unmerged + dst.len())
}

fn index(idx: &[usize], dev: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::<1, Int>::from_data(TensorData::new(v, [idx.len()]), dev)
}

/// Builds the plan for a batch from the metric `[B, N, C]`: cosine similarities of src to dst
/// tokens by a device matmul; only each src token's best dst comes back to the host.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    metric: Tensor<3>,
    grid: (usize, usize),
    sx: usize,
    sy: usize,
    r: usize,
    seed: Option<u64>,
) -> MergePlan {
    let device = metric.device();
    let [b, n, _] = metric.dims();
    let (dst, src) = split_tokens(n, grid, sx, sy, seed);
    let norm = metric.clone().square().sum_dim(2).sqrt();
    let unit = metric / norm;
    let a = unit.clone().select(1, index(&src, &device));
    let d = unit.select(1, index(&dst, &device));
    let (max, arg) = a.matmul(d.swap_dims(1, 2)).max_dim_with_indices(2);
    let max: Vec<f32> = max
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data after convert");
    let arg: Vec<i64> = arg
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("i64 data after convert");
    let ns = src.len();
    let mut slots = Vec::with_capacity(b * n);
    let mut inv = Vec::new();
    let mut merged = 0;
    for item in 0..b {
        let best: Vec<(f32, usize)> = (0..ns)
            .map(|a| (max[item * ns + a], arg[item * ns + a] as usize))
            .collect();
        let (slot, m) = assign(n, &dst, &src, &best, r);
        let mut count = vec![0f32; m];
        for &s in &slot {
            count[s] += 1.0;
        }
        inv.extend(count.iter().map(|k| 1.0 / k));
        slots.extend(slot.iter().map(|&s| s as i64));
        merged = m;
    }
    MergePlan {
        batch: b,
        tokens: n,
        merged,
        slot: Tensor::<3, Int>::from_data(TensorData::new(slots, [b, n, 1]), &device),
        inv_count: Tensor::<3>::from_data(TensorData::new(inv, [b, merged, 1]), &device),
    }
}

impl MergePlan {
    /// Mean of the tokens of each slot: `[B, N, C]` → `[B, M, C]`.
    pub fn merge(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let idx = self.slot.clone().expand([b, n, c]);
        let zeros = Tensor::<3>::zeros([b, self.merged, c], &x.device());
        zeros.scatter(1, idx, x, burn::tensor::IndexingUpdateOp::Add) * self.inv_count.clone()
    }

    /// Every token takes its slot's value: `[B, M, C]` → `[B, N, C]`.
    pub fn unmerge(&self, y: Tensor<3>) -> Tensor<3> {
        let [b, _, c] = y.dims();
        y.gather(1, self.slot.clone().expand([b, self.tokens, c]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_left_destinations_and_most_similar_sources() {
        let (dst, src) = split_tokens(16, (4, 4), 2, 2, None);
        assert_eq!(dst, vec![0, 2, 8, 10]);
        assert_eq!(src.len(), 12);
        // src 1 is most like dst 0, src 3 like dst 1; merge the single most similar.
        let mut best = vec![(0.1f32, 0usize); 12];
        best[0] = (0.9, 0);
        best[1] = (0.5, 1);
        let (slot, m) = assign(16, &dst, &src, &best, 1);
        assert_eq!(m, 15);
        assert_eq!(slot[src[0]], slot[0], "the most similar src joins its dst");
        assert_ne!(slot[src[1]], slot[2]);
    }
}

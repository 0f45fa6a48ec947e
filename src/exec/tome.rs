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

/// The slots of one item: tomesd's matching on `metric` (`n × c`, row-major tokens of an
/// `h × w` grid). Returns (slot per token, number of slots).
#[allow(clippy::too_many_arguments)]
pub fn match_item(
    metric: &[f32],
    n: usize,
    c: usize,
    (h, w): (usize, usize),
    sx: usize,
    sy: usize,
    r: usize,
    seed: Option<u64>,
    item: usize,
) -> (Vec<usize>, usize) {
    let (hsy, wsx) = (h / sy, w / sx);
    // Destination tokens: one per sy × sx cell (top-left unless random).
    let mut is_dst = vec![false; n];
    // One pattern for the whole batch, like tomesd's rand_idx (cond and uncond merge alike).
    let _ = item;
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
    let dst: Vec<usize> = (0..n).filter(|&i| is_dst[i]).collect();
    let src: Vec<usize> = (0..n).filter(|&i| !is_dst[i]).collect();
    let r = r.min(src.len());
    // Cosine similarity of every src token to every dst token.
    let norm: Vec<f32> = (0..n)
        .map(|i| {
            let row = &metric[i * c..(i + 1) * c];
            row.iter().map(|x| x * x).sum::<f32>().sqrt()
        })
        .collect();
    let mut best: Vec<(f32, usize, usize)> = src
        .iter()
        .enumerate()
        .map(|(a, &i)| {
            let ri = &metric[i * c..(i + 1) * c];
            let mut max = f32::NEG_INFINITY;
            let mut arg = 0;
            for (b, &j) in dst.iter().enumerate() {
                let rj = &metric[j * c..(j + 1) * c];
                let mut dot = 0f32;
                for k in 0..c {
                    dot += (ri[k] / norm[i]) * (rj[k] / norm[j]);
                }
                if dot > max {
                    max = dot;
                    arg = b;
                }
            }
            (max, a, arg)
        })
        .collect();
    // The r most similar src tokens merge into their best dst (stable on ties).
    best.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap_or(std::cmp::Ordering::Equal));
    let unmerged = src.len() - r;
    let mut slot = vec![0usize; n];
    for (pos, &(_, a, _)) in best[r..].iter().enumerate() {
        slot[src[a]] = pos;
    }
    for (b, &j) in dst.iter().enumerate() {
        slot[j] = unmerged + b;
    }
    for &(_, a, b) in &best[..r] {
        slot[src[a]] = unmerged + b;
    }
    (slot, unmerged + dst.len())
}

/// Builds the plan for a batch from the metric `[B, N, C]` on the host.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    metric: &[f32],
    b: usize,
    n: usize,
    c: usize,
    grid: (usize, usize),
    sx: usize,
    sy: usize,
    r: usize,
    seed: Option<u64>,
    device: &Device,
) -> MergePlan {
    let mut slots = Vec::with_capacity(b * n);
    let mut inv = Vec::new();
    let mut merged = 0;
    for item in 0..b {
        let (slot, m) = match_item(
            &metric[item * n * c..(item + 1) * n * c],
            n,
            c,
            grid,
            sx,
            sy,
            r,
            seed,
            item,
        );
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
        slot: Tensor::<3, Int>::from_data(TensorData::new(slots, [b, n, 1]), device),
        inv_count: Tensor::<3>::from_data(TensorData::new(inv, [b, merged, 1]), device),
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
        // 2×2 grid, one cell: token 0 is dst; tokens 1..3 src; merge the most similar one.
        let metric = [1.0, 0.0, 0.0, 1.0, 0.9, 0.1, -1.0, 0.0];
        let (slot, m) = match_item(&metric, 4, 2, (2, 2), 2, 2, 1, None, 0);
        assert_eq!(m, 3);
        assert_eq!(slot[2], slot[0], "token 2 is closest to the dst token 0");
        assert_ne!(slot[1], slot[3]);
        assert_ne!(slot[1], slot[0]);
    }
}

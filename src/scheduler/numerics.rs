//! The numerics the schedulers share, written to match torch and numpy bit for bit:
//! `torch.linspace` and `cumprod` in float32, numpy's `linspace`, `arange` and `interp`, and the
//! timestep lookups diffusers does.
//!
//! Try it: `cargo test --release --lib scheduler::tests`.

/// `torch.linspace(start, end, steps, dtype=torch.float32)` as torch's CPU kernel computes it:
/// a float32 step, the first half counted from `start`, the second half back from `end`.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    match steps {
        0 => Vec::new(),
        1 => vec![s],
        _ => {
            let step = (e - s) / (steps - 1) as f32;
            let half = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < half {
                        s + step * i as f32
                    } else {
                        e - step * (steps - i - 1) as f32
                    }
                })
                .collect()
        }
    }
}

/// `torch.cumprod(1.0 - betas)` for float32 on CPU: each alpha in float32, the running product
/// accumulated in float64 and stored as float32.
pub(crate) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= f64::from(1.0f32 - b);
            acc as f32
        })
        .collect()
}

/// `numpy.linspace(start, stop, num)` (float64, endpoint included).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            v[num - 1] = stop;
            v
        }
    }
}

/// `numpy.arange(start, stop, step)` for a float step: numpy's length, then `start + i * delta`
/// with `delta = (start + step) - start`.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| {
            if i == 0 {
                start
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// `numpy.interp(x, arange(len(fp)), fp)` in float64.
pub(crate) fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last as f64 {
        return f64::from(fp[last]);
    }
    let j = x.floor() as usize;
    let (y0, y1) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    if x == j as f64 {
        return y0;
    }
    let slope = y1 - y0;
    slope * (x - j as f64) + y0
}

/// The position of `t` in `timesteps` as diffusers' `index_for_timestep` picks it: the second
/// match when `t` occurs twice (so a restarted img2img schedule does not skip a sigma), else the
/// first; `None` when absent.
pub(crate) fn index_for_timestep(timesteps: &[f64], t: f64) -> Option<usize> {
    let mut hits = timesteps
        .iter()
        .enumerate()
        .filter(|(_, v)| **v == t)
        .map(|(i, _)| i);
    let first = hits.next()?;
    Some(hits.next().unwrap_or(first))
}

/// An integral timestep as an index type; panics on a fractional one.
pub(crate) fn integral(class: &str, t: f64) -> i64 {
    assert!(
        t.fract() == 0.0 && t.is_finite(),
        "{class}: timestep {t} is not an integer; pass a value from timesteps()"
    );
    t as i64
}

//! sd-mecha's `ties.py`: TIES sums (top-k filter, sign election, disjoint mean), model stock,
//! the geometric median (Weiszfeld), DARE/DELLA dropout before TIES, and `dropout`
//! ("n-supermario", with its overlapping-subset sampling).
//!
//! Inputs are equal-shaped F32 or F64 tensors; results have the first one's shape and dtype.
//! Sums, dot products and norms accumulate in f64 (in fixed blocks, so results do not depend on
//! the thread count). Model stock's cosine is taken per row of the last dimension, as sd-mecha's
//! `CosineSimilarity(dim=-1)` does; a 0-D tensor is one row of one element.
//!
//! Randomness comes from a caller's [`KeyRng`] only: it seeds one stream per fixed block of
//! [`CHUNK`] elements (per model where masks are per model), drawn in flat index order, so a
//! result depends on (seed, key) and nothing else.

use candle_core::{bail, DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::avx2_fma;
use super::{prepare, simd_variant, Elem, CHUNK};
use crate::methods::seam::KeyRng;

/// How `ties_sum_extended` combines the elected deltas.
#[derive(Clone, Copy, Debug)]
pub enum Combine {
    /// Σ kept / count (`ties_sum`, or `ties_sum_extended` with `apply_stock=True`).
    Mean,
    /// Σ kept · t / count with model stock's `t` per row (`apply_stock=False`, sd-mecha's
    /// inverted flag), from the cosine with this eps.
    Stock { cos_eps: f64 },
    /// The geometric median of the elected deltas (`apply_median=True`).
    Median(MedianOptions),
}

#[derive(Clone, Copy, Debug)]
pub struct MedianOptions {
    pub eps: f64,
    pub maxiter: i64,
    pub ftol: f64,
}

/// sd-mecha's `ties_sum_extended` (and `ties_sum` with [`Combine::Mean`]): each model keeps its
/// values with `|x| ≥` its `max(int((1−k)·numel), 1)`-th smallest magnitude (as f32, like
/// torch's `.float().kthvalue`); the elected sign per element is `sign(Σ sign(x))`, or
/// `sign(Σ x)` with `vote_sgn`; values whose sign equals it (a zero counts where the election
/// is 0) are combined; non-finite results become 0. `k` must be finite and ≥ 0 (the caller
/// checks); `k > 1` keeps everything, as in sd-mecha.
pub fn ties(models: &[Tensor], k: f64, vote_sgn: bool, combine: Combine) -> Result<Tensor> {
    apply_n("ties_sum", models, &Ties { k, vote_sgn, combine })
}

struct Ties {
    k: f64,
    vote_sgn: bool,
    combine: Combine,
}

impl KernelN for Ties {
    fn run<T: Elem>(&self, xs: &[&[T]], dims: &[usize]) -> Result<Vec<T>> {
        Ok(ties_data(xs, dims, self.k, self.vote_sgn, self.combine))
    }
}

/// sd-mecha's `model_stock`: `nan_to_num(t · mean(δ))`, with `t = n·c / (1 + (n−1)·c)` per row
/// and `c` the mean cosine of consecutive deltas along the row. One delta gives `t = 1`
/// (sd-mecha raises there: it stacks an empty list of cosines).
pub fn model_stock(deltas: &[Tensor], cos_eps: f64) -> Result<Tensor> {
    apply_n("model_stock", deltas, &ModelStock { cos_eps })
}

struct ModelStock {
    cos_eps: f64,
}

impl KernelN for ModelStock {
    fn run<T: Elem>(&self, xs: &[&[T]], dims: &[usize]) -> Result<Vec<T>> {
        let n = xs.len();
        let gather = |i: usize, g: &mut [T]| {
            let mut sum = 0.0;
            for (g, x) in g.iter_mut().zip(xs) {
                *g = x[i];
                sum += x[i].widen();
            }
            (sum, n as f64)
        };
        // torch's default nan_to_num: NaN → 0, ±inf → ±max
        let finish = |sum: f64, count: f64, t: f64| nan_to_max(T::narrow(t * (sum / count)));
        Ok(stock_combine(n, xs[0].len(), row_len(dims), Some(self.cos_eps), gather, finish))
    }
}

/// sd-mecha's `geometric_median` (Weiszfeld): start at the mean; each step weighs every point
/// by `1 / max(‖p − median‖, eps)`; stop after `maxiter` steps or when the mean distance
/// changes by at most `ftol` times itself.
pub fn geometric_median(models: &[Tensor], options: MedianOptions) -> Result<Tensor> {
    apply_n("geometric_median", models, &Median(options))
}

struct Median(MedianOptions);

impl KernelN for Median {
    fn run<T: Elem>(&self, xs: &[&[T]], _: &[usize]) -> Result<Vec<T>> {
        Ok(weiszfeld(xs, self.0))
    }
}

/// DARE/DELLA's drop step: how likely each delta element is to be kept.
#[derive(Clone, Copy, Debug)]
pub struct Dare {
    pub probability: f64,
    pub della_eps: f64,
    pub rescale: bool,
}

/// sd-mecha's `ties_sum_with_dropout`: every delta element is kept with probability
/// `clamp(1 − p + Δ, 0, 1)`, where `Δ = 0` or, with `della_eps ≠ 0`, DELLA's
/// `(rank/n − (n+1)/(2n))·della_eps` for the element's ordinal rank (1…n, ties in index order)
/// by magnitude in its tensor (`Δ = 0` everywhere when the tensor holds NaN, as
/// `scipy.stats.rankdata` then ranks NaN); then [`ties`], divided by `1 − p` with `rescale`.
pub fn ties_with_dropout(
    deltas: &[Tensor],
    dare: Dare,
    k: f64,
    vote_sgn: bool,
    combine: Combine,
    rng: &mut KeyRng,
) -> Result<Tensor> {
    let blocks = deltas.first().map_or(0, Tensor::elem_count).div_ceil(CHUNK);
    let seeds = stream_seeds(rng, deltas.len() * blocks);
    apply_n("ties_sum_with_dropout", deltas, &DareTies { dare, ties: Ties { k, vote_sgn, combine }, seeds, blocks })
}

struct DareTies {
    dare: Dare,
    ties: Ties,
    seeds: Vec<u64>,
    blocks: usize,
}

impl KernelN for DareTies {
    fn run<T: Elem>(&self, xs: &[&[T]], dims: &[usize]) -> Result<Vec<T>> {
        let b = self.blocks;
        let masked: Vec<Vec<T>> =
            xs.iter().enumerate().map(|(m, x)| dare_keep(x, self.dare, &self.seeds[m * b..(m + 1) * b])).collect();
        let views: Vec<&[T]> = masked.iter().map(Vec::as_slice).collect();
        let mut out = self.ties.run(&views, dims)?;
        let p = self.dare.probability;
        if self.dare.rescale && !is_close(p, 1.0) {
            let r = 1.0 - p;
            out.par_iter_mut().for_each(|v| *v = T::narrow(v.widen() / r));
        }
        Ok(out)
    }
}

/// sd-mecha's `dropout` (n-supermario): each element takes the deltas of a random subset of the
/// models, averages them (`Σ kept / max(count, 1)`) and divides by `(1 − p)^rescale` (1 when
/// `p = 1` or that is not finite). With no `pmf` (sd-mecha's `overlap % 2 == 1`) every delta is
/// kept independently with probability `1 − p`; otherwise each element's subset is drawn from
/// `pmf` (see [`overlapping_sets_pmf`]; index bit m set ⇔ model m kept).
pub fn dropout(
    deltas: &[Tensor],
    probability: f64,
    rescale: f64,
    pmf: Option<&[f64]>,
    rng: &mut KeyRng,
) -> Result<Tensor> {
    let blocks = deltas.first().map_or(0, Tensor::elem_count).div_ceil(CHUNK);
    let seeds = stream_seeds(rng, if pmf.is_some() { blocks } else { deltas.len() * blocks });
    let rescalar = match (1.0 - probability).powf(rescale) {
        _ if probability == 1.0 => 1.0,
        r if r.is_finite() => r,
        _ => 1.0,
    };
    // numpy's choice: the cumulative sums divided by the last one, searched with side="right"
    let cdf = pmf.map(|p| {
        let mut acc = 0.0;
        let cdf: Vec<f64> = p
            .iter()
            .map(|v| {
                acc += v;
                acc
            })
            .collect();
        cdf.iter().map(|c| c / acc).collect::<Vec<f64>>()
    });
    apply_n("dropout", deltas, &Dropout { keep: 1.0 - probability, rescalar, cdf, seeds, blocks })
}

struct Dropout {
    keep: f64,
    rescalar: f64,
    cdf: Option<Vec<f64>>,
    seeds: Vec<u64>,
    blocks: usize,
}

impl KernelN for Dropout {
    fn run<T: Elem>(&self, xs: &[&[T]], _: &[usize]) -> Result<Vec<T>> {
        let mut out = vec![T::ZERO; xs[0].len()];
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(b, o)| {
            let start = b * CHUNK;
            let (mut sum, mut count) = (vec![0f64; o.len()], vec![0u32; o.len()]);
            match &self.cdf {
                Some(cdf) => {
                    let mut r = KeyRng::new(self.seeds[b], "");
                    for j in 0..o.len() {
                        let u = r.next_f64();
                        let subset = cdf.partition_point(|&c| c <= u).min(cdf.len() - 1);
                        for (m, x) in xs.iter().enumerate() {
                            if subset >> m & 1 == 1 {
                                sum[j] += x[start + j].widen();
                                count[j] += 1;
                            }
                        }
                    }
                }
                None => {
                    for (m, x) in xs.iter().enumerate() {
                        let mut r = KeyRng::new(self.seeds[m * self.blocks + b], "");
                        for j in 0..o.len() {
                            if r.next_f64() < self.keep {
                                sum[j] += x[start + j].widen();
                                count[j] += 1;
                            }
                        }
                    }
                }
            }
            for ((o, s), c) in o.iter_mut().zip(&sum).zip(&count) {
                *o = T::narrow(s / (*c).max(1) as f64 / self.rescalar);
            }
        });
        Ok(out)
    }
}

/// sd-mecha's `overlapping_sets_pmf(n, p, overlap, overlap_emphasis)`: the probability of each
/// subset of the `n` models (index bit m ⇔ model m), the empty one having `p`.
///
/// A near-integer overlap gives singletons only (even) or the full set (odd); otherwise a
/// softmax over subset sizes with slope `tan(π·(overlap − ½))` (overlap negated when its floor
/// is odd). `overlap_emphasis` then blends toward the binomial weights `p^k·(1−p)^(n−k)` of a
/// size-k subset by `1 − |2·overlap − 1|`. sd-mecha's `torch.lerp` on NumPy arrays crashes
/// there; this is the NumPy lerp it means, and the softmax is taken stably.
pub fn overlapping_sets_pmf(n: usize, p: f64, overlap: f64, emphasis: f64) -> std::result::Result<Vec<f64>, String> {
    if n > 24 {
        return Err(format!("subset sampling over {n} models (2^{n} subsets) is not supported; at most 24"));
    }
    if !overlap.is_finite() || !emphasis.is_finite() {
        return Err("overlap and overlap_emphasis must be finite".into());
    }
    let subsets = 1usize << n;
    let size = |i: usize| i.count_ones() as f64;
    let rounded = round_half_even(overlap);
    let mut overlap = overlap;
    // numpy's isclose: |a − b| ≤ 1e-8 + 1e-5·|b|
    let mut pmf: Vec<f64> = if (overlap - rounded).abs() <= 1e-8 + 1e-5 * rounded.abs() {
        if rounded.rem_euclid(2.0) == 0.0 {
            (1..subsets).map(|i| if i.count_ones() == 1 { 1.0 / n as f64 } else { 0.0 }).collect()
        } else {
            (1..subsets).map(|i| if i == subsets - 1 { 1.0 } else { 0.0 }).collect()
        }
    } else {
        if overlap.floor().rem_euclid(2.0) == 1.0 {
            overlap = -overlap;
        }
        let slope = (std::f64::consts::PI * (overlap - 0.5)).tan();
        let logits: Vec<f64> = (1..subsets).map(|i| slope * (size(i) - n as f64 / 2.0)).collect();
        let top = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
        let total: f64 = e.iter().sum();
        e.iter().map(|v| v / total).collect()
    };
    if emphasis != 0.0 {
        let mut binomial: Vec<f64> = (1..subsets)
            .map(|i| p.powi(i.count_ones() as i32) * (1.0 - p).powi(n as i32 - i.count_ones() as i32))
            .collect();
        let total: f64 = binomial.iter().sum();
        if total.is_nan() || total <= 0.0 {
            return Err(format!(
                "overlap_emphasis needs a binomial subset weight, which probability {p} does not give"
            ));
        }
        binomial.iter_mut().for_each(|b| *b /= total);
        let w = 1.0 - (2.0 * overlap - 1.0).abs();
        for (v, b) in pmf.iter_mut().zip(&binomial) {
            let inner = *v + w * (b - *v);
            *v += emphasis * (inner - *v);
        }
    }
    let mut out = Vec::with_capacity(subsets);
    out.push(p);
    out.extend(pmf.iter().map(|v| v * (1.0 - p)));
    if out.iter().any(|v| v.is_nan() || *v < 0.0) {
        return Err(format!(
            "the subset probabilities are not all non-negative (overlap {overlap}, overlap_emphasis {emphasis})"
        ));
    }
    Ok(out)
}

/// Python's `round()` of a float: half to even.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// Python's `math.isclose` with its defaults (relative 1e-9, no absolute tolerance).
pub fn is_close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// `count` seeds for per-block streams, drawn in order from the key's stream.
fn stream_seeds(rng: &mut KeyRng, count: usize) -> Vec<u64> {
    (0..count).map(|_| rng.next_u64()).collect()
}

/// The elements of `x` kept by DARE/DELLA (the others times 0, as sd-mecha multiplies by the mask).
fn dare_keep<T: Elem>(x: &[T], dare: Dare, seeds: &[u64]) -> Vec<T> {
    let n = x.len();
    let base = 1.0 - dare.probability;
    // math.isclose(della_eps, 0.0) is true only for 0 itself
    let ranks = (dare.della_eps != 0.0 && !x.iter().any(|v| v.is_nan())).then(|| ordinal_ranks(x));
    let (nf, eps) = (n as f64, dare.della_eps);
    let mut out = vec![T::ZERO; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(b, o)| {
        let mut r = KeyRng::new(seeds[b], "");
        let start = b * CHUNK;
        for (j, o) in o.iter_mut().enumerate() {
            let i = start + j;
            let shift = match &ranks {
                Some(ranks) => {
                    let d = (ranks[i] as f64 / nf - (nf + 1.0) / (2.0 * nf)) * eps;
                    if d.is_finite() {
                        d
                    } else {
                        0.0
                    }
                }
                None => 0.0,
            };
            let p = (base + shift).clamp(0.0, 1.0);
            let kept = if r.next_f64() < p { T::ONE } else { T::ZERO };
            *o = x[i] * kept;
        }
    });
    out
}

/// `scipy.stats.rankdata(|x|, method="ordinal")`: ranks 1…n by magnitude, ties in index order.
fn ordinal_ranks<T: Elem>(x: &[T]) -> Vec<u32> {
    let mut order: Vec<(T::Key, u32)> = x.iter().enumerate().map(|(i, v)| (v.abs().tie_key(), i as u32)).collect();
    order.par_sort_unstable();
    let mut ranks = vec![0u32; x.len()];
    for (rank, &(_, i)) in order.iter().enumerate() {
        ranks[i as usize] = rank as u32 + 1;
    }
    ranks
}

/// The magnitude at or above which sd-mecha's `filter_top_k(x, k)` keeps values.
fn top_k_threshold<T: Elem>(x: &[T], k: f64) -> T {
    let n = x.len();
    // int() truncates toward zero, so k > 1 gives the smallest magnitude (keep everything)
    let kth = (((1.0 - k) * n as f64).trunc().max(1.0) as usize).min(n);
    let value = super::kth_smallest_key(x, kth, |v| v.abs().order_key());
    // kthvalue runs on `.float()` values: the threshold is an f32 whatever the dtype
    T::narrow(T::from_order_key(value).widen() as f32 as f64)
}

/// torch's `sign` as f64 (NaN → 0).
#[inline(always)]
fn sign<T: Elem>(x: T) -> f64 {
    if x > T::ZERO {
        1.0
    } else if x < T::ZERO {
        -1.0
    } else {
        0.0
    }
}

/// TIES on flat data: the elected values per model at each element, then [`Combine`].
fn ties_data<T: Elem>(xs: &[&[T]], dims: &[usize], k: f64, vote_sgn: bool, combine: Combine) -> Vec<T> {
    let n = xs.len();
    let numel = xs[0].len();
    let thresholds: Vec<T> = xs.iter().map(|x| top_k_threshold(x, k)).collect();
    // g[m] = the elected value of model m at i (0 where it lost); returns (Σ g, count)
    let elect = |i: usize, g: &mut [T]| {
        let mut vote = 0.0;
        for ((g, x), &t) in g.iter_mut().zip(xs).zip(&thresholds) {
            let v = x[i];
            // times 0 rather than 0, so that NaN and ±inf turn into NaN as in sd-mecha
            *g = v * if v.abs() >= t { T::ONE } else { T::ZERO };
            vote += if vote_sgn { g.widen() } else { sign(*g) };
        }
        let elected = if vote > 0.0 {
            1.0
        } else if vote < 0.0 {
            -1.0
        } else {
            0.0
        };
        let (mut sum, mut count) = (0.0, 0.0);
        for g in g.iter_mut() {
            let keep = sign(*g) == elected;
            *g = if keep { *g } else { *g * T::ZERO };
            sum += g.widen();
            count += keep as u8 as f64;
        }
        (sum, count)
    };
    let zero_non_finite = |v: T| if v.is_finite() { v } else { T::ZERO };
    match combine {
        Combine::Mean => {
            // The common case, in blocks the compiler vectorises (same operations, same order).
            let mut out = vec![T::ZERO; numel];
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
                ties_mean_chunk(xs, &thresholds, vote_sgn, c * CHUNK, chunk);
            });
            out
        }
        Combine::Stock { cos_eps } => stock_combine(n, numel, row_len(dims), Some(cos_eps), elect, |s, c, t| {
            zero_non_finite(T::narrow(s * t / c))
        }),
        Combine::Median(options) => {
            let mut elected = vec![vec![T::ZERO; numel]; n];
            let mut g = vec![T::ZERO; n];
            for i in 0..numel {
                elect(i, &mut g);
                for (e, v) in elected.iter_mut().zip(&g) {
                    e[i] = *v;
                }
            }
            let views: Vec<&[T]> = elected.iter().map(Vec::as_slice).collect();
            let mut out = weiszfeld(&views, options);
            out.iter_mut().for_each(|v| *v = zero_non_finite(*v));
            out
        }
    }
}

/// Elements per block of [`ties_mean_chunk`]: its per-element sums stay in L1.
const MEAN_BLOCK: usize = 512;

/// `elect` followed by the plain mean of [`ties_data`] for `out.len()` elements from flat
/// index `start`, model by model over blocks of [`MEAN_BLOCK`] (structure of arrays instead of
/// a loop over the models per element): the same operations in the same order, so the same bits.
#[inline(always)]
fn ties_mean_chunk_scalar<T: Elem>(xs: &[&[T]], thresholds: &[T], vote_sgn: bool, start: usize, out: &mut [T]) {
    let (mut vote, mut sum, mut count) = ([0f64; MEAN_BLOCK], [0f64; MEAN_BLOCK], [0f64; MEAN_BLOCK]);
    for (b, out) in out.chunks_mut(MEAN_BLOCK).enumerate() {
        let (from, len) = (start + b * MEAN_BLOCK, out.len());
        // times 0 rather than 0, so that NaN and ±inf turn into NaN as in sd-mecha
        fn kept<T: Elem>(x: &[T], t: T) -> impl Iterator<Item = T> + '_ {
            x.iter().map(move |&v| v * if v.abs() >= t { T::ONE } else { T::ZERO })
        }
        vote[..len].fill(0.0);
        for (x, &t) in xs.iter().zip(thresholds) {
            for (vote, g) in vote.iter_mut().zip(kept(&x[from..from + len], t)) {
                *vote += if vote_sgn { g.widen() } else { sign(g) };
            }
        }
        sum[..len].fill(0.0);
        count[..len].fill(0.0);
        for (x, &t) in xs.iter().zip(thresholds) {
            for (((sum, count), vote), g) in
                sum.iter_mut().zip(count.iter_mut()).zip(&vote).zip(kept(&x[from..from + len], t))
            {
                let keep = sign(g) == sign(*vote);
                *sum += if keep { g } else { g * T::ZERO }.widen();
                *count += keep as u8 as f64;
            }
        }
        for ((o, &s), &c) in out.iter_mut().zip(&sum).zip(&count) {
            let v = T::narrow(s / c);
            *o = if v.is_finite() { v } else { T::ZERO };
        }
    }
}
simd_variant!(fn ties_mean_chunk<T: Elem>(xs: &[&[T]], thresholds: &[T], vote_sgn: bool, start: usize, out: &mut [T]) = ties_mean_chunk_scalar);

/// The length of the last dimension (1 for a 0-D tensor): model stock's rows.
fn row_len(dims: &[usize]) -> usize {
    dims.last().copied().unwrap_or(1).max(1)
}

/// Per row of `row_len` elements: `gather(i, g)` puts the n models' values at flat index `i`
/// in `g` and returns (their sum, their count); `finish(sum, count, t)` gives the result, with
/// `t` model stock's factor of the row from the values in `g` (1 when `cos_eps` is `None`).
fn stock_combine<T: Elem>(
    n: usize,
    numel: usize,
    row_len: usize,
    cos_eps: Option<f64>,
    gather: impl Fn(usize, &mut [T]) -> (f64, f64) + Sync,
    finish: impl Fn(f64, f64, f64) -> T + Sync,
) -> Vec<T> {
    let mut out = vec![T::ZERO; numel];
    let rows_per_block = CHUNK.div_ceil(row_len).max(1);
    out.par_chunks_mut(rows_per_block * row_len).enumerate().for_each(|(b, block)| {
        let mut g = vec![T::ZERO; n];
        let (mut sums, mut counts) = (vec![0f64; row_len], vec![0f64; row_len]);
        let (mut dots, mut squares) = (vec![0f64; n.saturating_sub(1)], vec![0f64; n]);
        for (r, row) in block.chunks_mut(row_len).enumerate() {
            let start = (b * rows_per_block + r) * row_len;
            dots.iter_mut().for_each(|d| *d = 0.0);
            squares.iter_mut().for_each(|s| *s = 0.0);
            for j in 0..row.len() {
                (sums[j], counts[j]) = gather(start + j, &mut g);
                if cos_eps.is_some() {
                    for m in 0..n {
                        let v = g[m].widen();
                        squares[m] += v * v;
                        if m + 1 < n {
                            dots[m] += v * g[m + 1].widen();
                        }
                    }
                }
            }
            let t = match cos_eps {
                Some(eps) if n > 1 => {
                    // torch's cosine_similarity: Σ (x / max(‖x‖, eps)) · (y / max(‖y‖, eps))
                    let norm = |s: f64| s.sqrt().max(eps);
                    let c = (0..n - 1).map(|m| dots[m] / (norm(squares[m]) * norm(squares[m + 1]))).sum::<f64>()
                        / (n - 1) as f64;
                    n as f64 * c / (1.0 + (n - 1) as f64 * c)
                }
                _ => 1.0,
            };
            for (j, o) in row.iter_mut().enumerate() {
                *o = finish(sums[j], counts[j], t);
            }
        }
    });
    out
}

/// Weiszfeld's iteration as sd-mecha runs it (see [`geometric_median`]). Distances, weights and
/// the objective are rounded to the dtype as torch holds them: the loop usually ends when the
/// objective stops changing *in the dtype* (with the default ftol), so the stopping step is
/// sd-mecha's only if the objective is rounded the same way.
fn weiszfeld<T: Elem>(ps: &[&[T]], options: MedianOptions) -> Vec<T> {
    let n = ps.len();
    let numel = ps[0].len();
    let objective = |d: &[T]| d.iter().fold(T::ZERO, |s, &v| s + v) / T::narrow(n as f64);
    let (eps, ftol) = (T::narrow(options.eps), T::narrow(options.ftol));
    let mut weights = vec![1.0; n];
    let mut median = weighted_average(ps, &weights, numel);
    let mut dists = distances(ps, &median);
    let mut obj = objective(&dists);
    for _ in 0..options.maxiter.max(0) {
        let previous = obj;
        for (w, &d) in weights.iter_mut().zip(&dists) {
            // torch.clamp(d, min=eps) keeps NaN
            *w = (T::ONE / if d < eps { eps } else { d }).widen();
        }
        median = weighted_average(ps, &weights, numel);
        dists = distances(ps, &median);
        obj = objective(&dists);
        if (previous - obj).abs() <= ftol * obj {
            break;
        }
    }
    median
}

/// Σ pᵢ·wᵢ / Σ wᵢ per element.
fn weighted_average<T: Elem>(ps: &[&[T]], weights: &[f64], numel: usize) -> Vec<T> {
    let total: f64 = weights.iter().sum();
    let mut out = vec![T::ZERO; numel];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(b, o)| {
        let start = b * CHUNK;
        for (j, o) in o.iter_mut().enumerate() {
            let s: f64 = ps.iter().zip(weights).map(|(p, w)| p[start + j].widen() * w).sum();
            *o = T::narrow(s / total);
        }
    });
    out
}

/// ‖pᵢ − median‖ for every point (in f64, summed per fixed chunk in chunk order, then rounded).
fn distances<T: Elem>(ps: &[&[T]], median: &[T]) -> Vec<T> {
    ps.iter()
        .map(|p| {
            let parts: Vec<f64> = p
                .par_chunks(CHUNK)
                .zip(median.par_chunks(CHUNK))
                .map(|(p, m)| {
                    p.iter()
                        .zip(m)
                        .map(|(&x, &y)| {
                            let d = x.widen() - y.widen();
                            d * d
                        })
                        .sum::<f64>()
                })
                .collect();
            T::narrow(parts.iter().sum::<f64>().sqrt())
        })
        .collect()
}

/// torch's default `nan_to_num`: NaN → 0, ±inf → the dtype's largest finite value of that sign.
fn nan_to_max<T: Elem>(v: T) -> T {
    let max = if std::mem::size_of::<T>() == 4 { f32::MAX as f64 } else { f64::MAX };
    if v.is_nan() {
        T::ZERO
    } else if v.is_finite() {
        v
    } else if v > T::ZERO {
        T::narrow(max)
    } else {
        T::narrow(-max)
    }
}

/// A computation over the data of equal-shaped tensors, in their dtype.
trait KernelN {
    fn run<T: Elem>(&self, xs: &[&[T]], dims: &[usize]) -> Result<Vec<T>>;
}

/// Runs `k` on the data of equal-shaped tensors in the first one's dtype (F32 or F64) and wraps
/// the result in a tensor of that shape, dtype and device.
fn apply_n(name: &str, xs: &[Tensor], k: &impl KernelN) -> Result<Tensor> {
    let Some(first) = xs.first() else { bail!("{name}: needs at least one tensor") };
    if let Some(other) = xs.iter().find(|x| x.dims() != first.dims()) {
        bail!("{name}: tensors have shapes {:?} and {:?}", first.dims(), other.dims());
    }
    let dtype = first.dtype();
    let prepared = xs.iter().map(|x| prepare(x, dtype)).collect::<Result<Vec<_>>>()?;
    let dims = first.dims().to_vec();
    let out = match dtype {
        DType::F32 => Tensor::from_vec(with_slices::<f32, _>(&prepared, |s| k.run(s, &dims))?, dims, &Device::Cpu)?,
        DType::F64 => Tensor::from_vec(with_slices::<f64, _>(&prepared, |s| k.run(s, &dims))?, dims, &Device::Cpu)?,
        other => bail!("{name}: expects f32 or f64 tensors, got {other:?}"),
    };
    if first.device().is_cpu() {
        Ok(out)
    } else {
        out.to_device(first.device())
    }
}

/// The element slices of contiguous CPU tensors.
fn with_slices<T: Elem, R>(ts: &[Tensor], f: impl FnOnce(&[&[T]]) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for ((storage, layout), t) in guards.iter().zip(ts) {
        let Storage::Cpu(cpu) = &**storage else { bail!("whole-tensor math expects a CPU tensor") };
        let start = layout.start_offset();
        slices.push(&cpu.as_slice::<T>()?[start..start + t.elem_count()]);
    }
    f(&slices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], dims: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), dims, &Device::Cpu).unwrap()
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= tol * w.abs().max(1.0), "got {got:?}, want {want:?}");
        }
    }

    const MEDIAN: MedianOptions = MedianOptions { eps: 1e-6, maxiter: 100, ftol: 1e-20 };

    #[test]
    fn ties_elects_signs_and_averages_the_winners() {
        let m = [t(&[1., -2., 3., 0.], &[4]), t(&[2., 1., -1., 0.], &[4]), t(&[-1., -1., 2., 0.], &[4])];
        // k = 1 keeps everything; the all-zero column elects 0 and averages three zeros
        close(&vals(&ties(&m, 1.0, false, Combine::Mean).unwrap()), &[1.5, -1.5, 2.5, 0.0], 1e-6);
        // counting votes elects −, summing elects + (3 − 1 − 1 > 0)
        let m = [t(&[3.], &[1]), t(&[-1.], &[1]), t(&[-1.], &[1])];
        assert_eq!(vals(&ties(&m, 1.0, false, Combine::Mean).unwrap()), [-1.0]);
        assert_eq!(vals(&ties(&m, 1.0, true, Combine::Mean).unwrap()), [3.0]);
    }

    #[test]
    fn top_k_keeps_magnitudes_from_the_kth_smallest() {
        let x = [t(&[0.1, -0.5, 0.3, 0.2], &[4])];
        // max(int(0.5·4), 1) = 2: the 2nd smallest magnitude, 0.2, and above are kept
        close(&vals(&ties(&x, 0.5, false, Combine::Mean).unwrap()), &[0.0, -0.5, 0.3, 0.2], 1e-7);
        // k = 0 keeps only the largest; k > 1 keeps all
        close(&vals(&ties(&x, 0.0, false, Combine::Mean).unwrap()), &[0.0, -0.5, 0.0, 0.0], 1e-7);
        close(&vals(&ties(&x, 3.0, false, Combine::Mean).unwrap()), &[0.1, -0.5, 0.3, 0.2], 1e-7);
    }

    #[test]
    fn non_finite_ties_results_become_zero() {
        let m = [t(&[f32::NAN, 1.0], &[2]), t(&[1.0, f32::INFINITY], &[2])];
        assert_eq!(vals(&ties(&m, 1.0, false, Combine::Mean).unwrap()), [0.0, 0.0]);
    }

    #[test]
    fn model_stock_scales_each_row_by_its_cosine() {
        // row 0: cos 1/√2, t = 2c/(1 + c); row 1: orthogonal, t = 0
        let d = [t(&[1., 1., 1., 0.], &[2, 2]), t(&[1., 0., 0., 1.], &[2, 2])];
        let c = std::f32::consts::FRAC_1_SQRT_2;
        let f = 2.0 * c / (1.0 + c);
        close(&vals(&model_stock(&d, 1e-6).unwrap()), &[f, 0.5 * f, 0.0, 0.0], 1e-6);
        // ties_sum_extended applies the same factor to the elected mean
        close(&vals(&ties(&d, 1.0, false, Combine::Stock { cos_eps: 1e-6 }).unwrap()), &[f, f, 0.0, 0.0], 1e-6);
        // one delta: t = 1
        assert_eq!(vals(&model_stock(&d[..1], 1e-6).unwrap()), [1., 1., 1., 0.]);
    }

    #[test]
    fn geometric_median_of_points_on_a_line_is_the_middle_one() {
        let p = [t(&[0.0], &[1]), t(&[1.0], &[1]), t(&[10.0], &[1])];
        close(&vals(&geometric_median(&p, MEDIAN).unwrap()), &[1.0], 1e-4);
        // no iteration: the mean
        let mean = geometric_median(&p, MedianOptions { maxiter: 0, ..MEDIAN }).unwrap();
        close(&vals(&mean), &[11.0 / 3.0], 1e-6);
    }

    #[test]
    fn subset_distributions() {
        let pmf = |o, e| overlapping_sets_pmf(2, 0.5, o, e).unwrap();
        close32(&pmf(0.0, 0.0), &[0.5, 0.25, 0.25, 0.0]);
        close32(&pmf(3.0000001, 0.0), &[0.5, 0.0, 0.0, 0.5]);
        close32(&pmf(0.5, 0.0), &[0.5, 0.5 / 3.0, 0.5 / 3.0, 0.5 / 3.0]);
        // full emphasis at overlap ½ is the binomial weights p^k (1 − p)^(n − k), normalised
        let b = overlapping_sets_pmf(2, 0.2, 0.5, 1.0).unwrap();
        close32(&b, &[0.2, 0.8 * 0.16 / 0.36, 0.8 * 0.16 / 0.36, 0.8 * 0.04 / 0.36]);
        assert!(overlapping_sets_pmf(2, 0.5, 0.7, -5.0).is_err(), "negative probabilities");
        assert!(overlapping_sets_pmf(2, 0.0, 0.7, 0.5).is_err(), "no binomial weights at p = 0");
    }

    fn close32(got: &[f64], want: &[f64]) {
        assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-9), "got {got:?}, want {want:?}");
    }

    fn ramp(n: usize) -> Tensor {
        // distinct magnitudes, alternating signs, in scrambled positions
        let v: Vec<f32> =
            (0..n).map(|i| ((i * 7919) % n + 1) as f32 / n as f32 * if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        t(&v, &[n])
    }

    fn dare(x: &Tensor, p: f64, della_eps: f64, seed: u64) -> Vec<f32> {
        let dare = Dare { probability: p, della_eps, rescale: true };
        vals(
            &ties_with_dropout(std::slice::from_ref(x), dare, 1.0, false, Combine::Mean, &mut KeyRng::new(seed, "k"))
                .unwrap(),
        )
    }

    /// |observed − expected| within 5 standard errors of a proportion over n trials.
    fn rate_ok(kept: usize, n: usize, p: f64) {
        let se = (p * (1.0 - p) / n as f64).sqrt();
        let rate = kept as f64 / n as f64;
        assert!((rate - p).abs() <= 5.0 * se, "rate {rate}, expected {p} ± {}", 5.0 * se);
    }

    #[test]
    fn dare_keeps_one_minus_p_and_rescales() {
        let n = 100_000;
        let x = ramp(n);
        let xs = vals(&x);
        let out = dare(&x, 0.7, 0.0, 1);
        assert_eq!(out, dare(&x, 0.7, 0.0, 1), "same seed, same bits");
        assert_ne!(out, dare(&x, 0.7, 0.0, 2), "another seed, another mask");
        let kept = out.iter().filter(|v| **v != 0.0).count();
        rate_ok(kept, n, 0.3);
        for (o, x) in out.iter().zip(&xs) {
            assert!(*o == 0.0 || (o * 0.3 - x).abs() <= 1e-6 * x.abs().max(1e-3), "{o} is not {x} / 0.3");
        }
    }

    #[test]
    fn della_keeps_larger_magnitudes_more_often() {
        let n = 40_000;
        let x = ramp(n);
        let xs = vals(&x);
        let out = dare(&x, 0.5, 0.4, 3);
        // rank r of |x| is its position among 1..n: keep probability 0.5 + (r/n − (n+1)/2n)·0.4
        let mut quarter = [(0usize, 0usize, 0f64); 4];
        for (o, x) in out.iter().zip(&xs) {
            let rank = (x.abs() * n as f32).round() as usize;
            let q = &mut quarter[((rank - 1) * 4 / n).min(3)];
            q.0 += (*o != 0.0) as usize;
            q.1 += 1;
            q.2 += 0.5 + (rank as f64 / n as f64 - (n as f64 + 1.0) / (2.0 * n as f64)) * 0.4;
        }
        for (kept, count, p) in quarter {
            rate_ok(kept, count, p / count as f64);
        }
    }

    #[test]
    fn dropout_samples_subsets() {
        let n = 60_000;
        let d: Vec<Tensor> = [1.0f32, 2.0, 4.0].iter().map(|v| t(&vec![*v; n], &[n])).collect();
        // decode each element's subset from Σ kept / count · (1 − p)
        let subsets = |out: &[f32], p: f32| -> Vec<usize> {
            let value = |s: usize| if s == 0 { 0.0 } else { (s as f32) / s.count_ones() as f32 };
            let mut counts = vec![0usize; 8];
            for o in out {
                let v = o * (1.0 - p);
                counts[(0..8).min_by(|a, b| (value(*a) - v).abs().total_cmp(&(value(*b) - v).abs())).unwrap()] += 1;
            }
            counts
        };
        let run = |pmf: Option<&[f64]>, seed| vals(&dropout(&d, 0.4, 1.0, pmf, &mut KeyRng::new(seed, "k")).unwrap());
        let independent = run(None, 5);
        assert_eq!(independent, run(None, 5));
        assert_ne!(independent, run(None, 6));
        for (s, c) in subsets(&independent, 0.4).iter().enumerate() {
            let k = s.count_ones() as i32;
            rate_ok(*c, n, 0.6f64.powi(k) * 0.4f64.powi(3 - k));
        }
        let pmf = overlapping_sets_pmf(3, 0.4, 0.7, 0.5).unwrap();
        for (c, p) in subsets(&run(Some(&pmf), 7), 0.4).iter().zip(&pmf) {
            rate_ok(*c, n, *p);
        }
    }

    #[test]
    fn random_results_do_not_depend_on_the_thread_count() {
        let n = 3 * CHUNK + 17;
        let d = [ramp(n), ramp(n).affine(0.5, 0.1).unwrap()];
        let pmf = overlapping_sets_pmf(2, 0.3, 0.4, 0.2).unwrap();
        let dare = Dare { probability: 0.6, della_eps: 0.3, rescale: true };
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let r = || KeyRng::new(9, "k");
                [
                    vals(&ties_with_dropout(&d, dare, 0.5, false, Combine::Stock { cos_eps: 1e-6 }, &mut r()).unwrap()),
                    vals(&dropout(&d, 0.3, 1.0, None, &mut r()).unwrap()),
                    vals(&dropout(&d, 0.3, 1.0, Some(&pmf), &mut r()).unwrap()),
                    vals(&geometric_median(&d, MEDIAN).unwrap()),
                ]
                .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
            })
        };
        assert!(run(1) == run(3));
    }
}

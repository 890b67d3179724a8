//! sd-mecha's `slicing.py`: `tensor_sum` (a block of rows of `b` pasted into `a`) and
//! `top_k_tensor_sum` (values of `a` redistributed to the positions `b`'s ranking gives them).

use candle_core::{bail, Result, Tensor};
use rayon::prelude::*;

use super::{apply2, like_a, Elem, Kernel2, SharedMut, CHUNK};

/// `a` with rows `[start, end)` (along dim 0) taken from `b`, where
/// `(start, end) = ratio_to_region(width, offset, rows)`; when the region wraps past the end
/// it is inverted: `b` with those rows taken from `a`.
///
/// `ratio_to_region`: a negative width extends backwards from `offset`; the width is capped
/// at 1; the offset is taken mod 1 (negative offsets from the end); the bounds are
/// `round(offset·n)` and `round((offset + width)·n)` (or `round((offset + width − 1)·n)` and
/// `round(offset·n)` inverted), rounding half to even like Python. A 0-D tensor gives `b` when
/// `width > 0.5`, else `a`. Non-finite width or offset is an error (Python's `round` raises).
/// When the pasted range is empty or everything, the result is `a` or `b` itself, uncopied.
pub fn tensor_sum(a: &Tensor, b: &Tensor, width: f64, offset: f64) -> Result<Tensor> {
    if a.dims() != b.dims() {
        bail!("tensor_sum: a has shape {:?} but b has shape {:?}", a.dims(), b.dims());
    }
    let b = like_a(a, b)?;
    if a.rank() == 0 {
        return Ok(if width > 0.5 { b } else { a.clone() });
    }
    let rows = a.dim(0)?;
    let (start, end, inverted) = ratio_to_region(width, offset, rows)?;
    let (base, pasted) = if inverted { (&b, a) } else { (a, &b) };
    if start >= end {
        return Ok(base.clone());
    }
    if start == 0 && end == rows {
        return Ok(pasted.clone());
    }
    let row = a.elem_count() / rows;
    let (from, to) = (start * row, end * row);
    let paste = Paste { from, to, inverted };
    apply2("tensor_sum", a, &b, &paste)
}

/// `a` with elements `from..to` taken from `b` (the other way round when `inverted`).
struct Paste {
    from: usize,
    to: usize,
    inverted: bool,
}

impl Kernel2 for Paste {
    fn run<T: Elem>(&self, a: &[T], b: &[T], _: &[usize]) -> Result<Vec<T>> {
        let (base, pasted) = if self.inverted { (b, a) } else { (a, b) };
        let mut out = vec![T::ZERO; a.len()];
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
            let (lo, hi) = (c * CHUNK, c * CHUNK + o.len());
            for (range, src) in [
                (lo..self.from.clamp(lo, hi), base),
                (self.from.clamp(lo, hi)..self.to.clamp(lo, hi), pasted),
                (self.to.clamp(lo, hi)..hi, base),
            ] {
                o[range.start - lo..range.end - lo].copy_from_slice(&src[range]);
            }
        });
        Ok(out)
    }
}

/// sd-mecha's `top_k_tensor_sum`: with `sorted` the values of `a` in ascending order and `r(i)`
/// the rank of `b[i]` in `b` (stable: ties in index order), the result at `i` is `sorted[r(i)]`
/// when that value is *selected*, else `a[i]`.
///
/// `sorted[j]` is selected when `lo ≤ |sorted[j]| ≤ hi`, where `lo` and `hi` are the
/// `start`-th and `end`-th smallest `|a|` (as f32; −1 for a 0th) and
/// `(start, end, inverted) = ratio_to_region(width, offset, numel)` (see [`tensor_sum`]); an
/// inverted region selects the complement. So width/offset pick a band of *magnitudes* of `a`
/// (a width of 0 still selects the values whose magnitude is the `start`-th smallest, unless
/// `start` is 0), while the placement follows `b`'s *signed* order. sd-mecha blends with `(1 − m)·a + m·sorted` for a 0/1 mask `m`, so a
/// non-finite value in `a` makes NaN every element it meets in that blend; reproduced. torch's
/// sort is not stable, so which zeros of `sorted` are −0 and which +0 is unspecified there; here
/// −0s come first.
///
/// Sorting is a bucket sort on the top 16 bits of the order keys, refined only where selected
/// values land. Tensors are limited to 2³² elements.
pub fn top_k_tensor_sum(a: &Tensor, b: &Tensor, width: f64, offset: f64) -> Result<Tensor> {
    apply2("top_k_tensor_sum", a, b, &TopK { width, offset })
}

struct TopK {
    width: f64,
    offset: f64,
}

impl Kernel2 for TopK {
    fn run<T: Elem>(&self, a: &[T], b: &[T], _: &[usize]) -> Result<Vec<T>> {
        let n = a.len();
        if n > u32::MAX as usize {
            bail!("top_k_tensor_sum: tensors over 2^32 elements are not supported");
        }
        let (start, end, inverted) = ratio_to_region(self.width, self.offset, n)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let sorted = sorted_values(a);
        let (lo, hi) = (kth_magnitude(&sorted, start), kth_magnitude(&sorted, end));
        let selected = |v: T| {
            let m = v.abs();
            (lo <= m && m <= hi) != inverted
        };
        // sd-mecha's blend differs from a plain pick only around non-finite values
        let blend = a.par_iter().any(|&x| !x.is_finite());
        let ranks = ranking(b, |r: std::ops::Range<usize>| blend || sorted[r].iter().any(|&v| selected(v)));

        let mut out = a.to_vec();
        let dst = SharedMut::new(&mut out);
        sorted.par_chunks(CHUNK).zip(ranks.par_chunks(CHUNK)).for_each(|(values, idx)| {
            for (&v, &i) in values.iter().zip(idx) {
                let i = i as usize;
                let m = selected(v);
                // SAFETY: `ranks` is a permutation of 0..n, so every i is in bounds and written
                // by exactly one task.
                unsafe {
                    let o = dst.ptr().add(i);
                    if blend {
                        let m = if m { T::ONE } else { T::ZERO };
                        *o = (T::ONE - m) * a[i] + m * v;
                    } else if m {
                        *o = v;
                    }
                }
            }
        });
        Ok(out)
    }
}

/// sd-mecha's `ratio_to_region(width, offset, n)`: the `[start, end)` index range a
/// width/offset pair selects out of `n`, and whether the selection wraps around (then the
/// range is what is *not* selected). Rounds half to even like Python's `round`.
fn ratio_to_region(width: f64, offset: f64, n: usize) -> Result<(usize, usize, bool)> {
    let (mut width, mut offset) = (width, offset);
    if width < 0.0 {
        offset += width;
        width = -width;
    }
    // Python's min(width, 1) keeps a NaN width
    if width > 1.0 {
        width = 1.0;
    }
    if offset < 0.0 {
        offset = 1.0 + offset - offset.trunc();
    }
    offset %= 1.0;
    let n_f = n as f64;
    let (start, end, inverted) = if width + offset <= 1.0 {
        (offset * n_f, (width + offset) * n_f, false)
    } else {
        ((width + offset - 1.0) * n_f, offset * n_f, true)
    };
    if !start.is_finite() || !end.is_finite() {
        bail!("width and offset must be finite (got width={width}, offset={offset})");
    }
    let clamp = |x: f64| x.round_ties_even().clamp(0.0, n_f) as usize;
    Ok((clamp(start), clamp(end), inverted))
}

/// sd-mecha's `kth_abs_value`: the `k`-th smallest `|x|` (1-based) of the ascending `sorted`,
/// rounded to f32; −1 for `k == 0`; NaN counts as the largest.
fn kth_magnitude<T: Elem>(sorted: &[T], k: usize) -> T {
    if k == 0 {
        return -T::ONE;
    }
    let finite_end = sorted.partition_point(|x| !x.is_nan());
    if k > finite_end {
        return T::NAN;
    }
    let zero = sorted[..finite_end].partition_point(|&x| x < T::ZERO);
    let (neg, pos) = (&sorted[..zero], &sorted[zero..finite_end]);
    // how many |x| are ≤ m
    let rank = |m: T| pos.partition_point(|&x| x <= m) + (zero - neg.partition_point(|&x| x < -m));
    // the smallest candidate of each side whose rank reaches k
    let first = |len: usize, at: &dyn Fn(usize) -> T| {
        let (mut lo, mut hi) = (0, len);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if rank(at(mid)) >= k {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        (lo < len).then(|| at(lo))
    };
    let from_pos = first(pos.len(), &|t| pos[t]);
    let from_neg = first(neg.len(), &|t| -neg[neg.len() - 1 - t]);
    let m = match (from_pos, from_neg) {
        (Some(p), Some(q)) => {
            if p < q {
                p
            } else {
                q
            }
        }
        (Some(p), None) => p,
        (None, Some(q)) => q,
        (None, None) => unreachable!("k ≤ number of non-NaN values"),
    };
    T::narrow(m.widen() as f32 as f64)
}

/// Buckets at most this long are refined by sorting (key, index) pairs in a scratch buffer;
/// longer ones in place, looking keys up (slower, but without a bucket-sized allocation).
const GATHER_MAX: usize = 1 << 20;

/// Fixed chunking of the input for the histogram/scatter passes (at most 64 chunks).
fn chunk_len(n: usize) -> usize {
    n.div_ceil(64).max(CHUNK)
}

/// First-level bucket sort: the keys of `data` grouped by bucket ([`Elem::bucket`]) in input
/// order within each bucket, the input index of each (when `with_index`) and the bucket
/// boundaries (`T::BUCKETS + 1` of them).
fn scatter<T: Elem>(
    data: &[T],
    key: impl Fn(T) -> T::Key + Sync,
    with_index: bool,
) -> (Vec<T::Key>, Vec<u32>, Vec<usize>) {
    let clen = chunk_len(data.len());
    // counts, then write positions, per chunk and bucket (n < 2³², checked by the caller)
    let mut cursors: Vec<Vec<u32>> = data
        .par_chunks(clen)
        .map(|c| {
            let mut h = vec![0u32; T::BUCKETS];
            for &x in c {
                h[T::bucket(key(x))] += 1;
            }
            h
        })
        .collect();
    let mut bounds = vec![0usize; T::BUCKETS + 1];
    let mut total = 0u32;
    for k in 0..T::BUCKETS {
        bounds[k] = total as usize;
        for h in cursors.iter_mut() {
            let count = h[k];
            h[k] = total; // from now on, this chunk's write position in bucket k
            total += count;
        }
    }
    bounds[T::BUCKETS] = total as usize;
    let mut keys = vec![T::Key::default(); data.len()];
    let mut index = vec![0u32; if with_index { data.len() } else { 0 }];
    let (key_out, index_out) = (SharedMut::new(&mut keys), SharedMut::new(&mut index));
    data.par_chunks(clen).zip(cursors.par_iter_mut()).enumerate().for_each(|(c, (chunk, cursor))| {
        for (i, &x) in chunk.iter().enumerate() {
            let k = key(x);
            let slot = &mut cursor[T::bucket(k)];
            let at = *slot as usize;
            // SAFETY: the cursors of all chunks and buckets partition 0..n, each advancing
            // through its own range only.
            unsafe {
                *key_out.ptr().add(at) = k;
                if with_index {
                    *index_out.ptr().add(at) = (c * clen + i) as u32;
                }
            }
            *slot += 1;
        }
    });
    (keys, index, bounds)
}

/// Splits `v` into its buckets' slices (the non-empty ones), with their start positions.
fn buckets_mut<'a, V>(mut v: &'a mut [V], bounds: &[usize]) -> Vec<(usize, &'a mut [V])> {
    let mut out = Vec::new();
    for w in bounds.windows(2) {
        let (head, tail) = v.split_at_mut(w[1] - w[0]);
        v = tail;
        if !head.is_empty() {
            out.push((w[0], head));
        }
    }
    out
}

/// The values of `data` in ascending order (NaN last), like torch's `msort`.
fn sorted_values<T: Elem>(data: &[T]) -> Vec<T> {
    let (mut keys, _, bounds) = scatter(data, T::order_key, false);
    buckets_mut(&mut keys, &bounds).into_par_iter().for_each(|(_, b)| b.sort_unstable());
    keys.into_iter().map(T::from_order_key).collect()
}

/// `perm` with `data[perm[0]] ≤ data[perm[1]] ≤ …`, ties (−0 and +0 included, NaN last) in
/// index order: torch's stable `argsort`. Only the rank ranges for which `needed` says so are
/// exact; elsewhere `perm` is still a permutation, ordered by bucket only.
fn ranking<T: Elem>(data: &[T], needed: impl Fn(std::ops::Range<usize>) -> bool + Sync) -> Vec<u32> {
    let (mut keys, mut perm, bounds) = scatter(data, T::tie_key, true);
    let key_buckets = buckets_mut(&mut keys, &bounds);
    let perm_buckets = buckets_mut(&mut perm, &bounds);
    key_buckets.into_par_iter().zip(perm_buckets).for_each_init(Vec::new, |pairs, ((start, keys), (_, idx))| {
        if idx.len() < 2 || !needed(start..start + idx.len()) {
            return;
        }
        if idx.len() <= GATHER_MAX {
            pairs.clear();
            pairs.extend(keys.iter().copied().zip(idx.iter().copied()));
            pairs.sort_unstable();
            for (slot, &(_, i)) in idx.iter_mut().zip(pairs.iter()) {
                *slot = i;
            }
        } else {
            idx.sort_unstable_by_key(|&i| (data[i as usize].tie_key(), i));
        }
    });
    perm
}

#[cfg(test)]
mod tests {
    use super::super::testdata::{load, values};
    use super::*;

    #[test]
    fn matches_sd_mecha() {
        let fam = load("slicing");
        let mut checked = 0;
        for c in fam.cases() {
            let (w, o) = (c.params[0], c.params[1]);
            let got = match c.func.as_str() {
                "tensor_sum" => tensor_sum(&c.a, &c.b, w, o),
                "top_k_tensor_sum" => top_k_tensor_sum(&c.a, &c.b, w, o),
                f => panic!("unknown function {f}"),
            }
            .unwrap();
            assert_eq!(got.dims(), c.a.dims());
            assert_eq!(got.dtype(), c.a.dtype());
            let (got, want) = (values(&got), c.expected.unwrap());
            // pure data movement: bit for bit, NaN for NaN; but torch's sort is not stable, so
            // the −0s and +0s of `sorted` come in an unspecified order
            let same =
                got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits() || g == w || (g.is_nan() && w.is_nan()));
            assert!(same, "{} {} {:?}:\n got {got:?}\nwant {want:?}", c.func, c.set, c.params);
            checked += 1;
        }
        assert!(checked > 50);
    }

    #[test]
    fn ratio_to_region_matches_sd_mecha() {
        // (width, offset, n) → sd-mecha 1.1.8's ratio_to_region
        let cases = [
            ((0.5, 0.0, 5), (0, 2, false)),
            ((0.5, 0.0, 7), (0, 4, false)),
            ((0.25, 0.0, 10), (0, 2, false)),
            ((0.3, 0.2, 10), (2, 5, false)),
            ((0.5, 0.7, 10), (2, 7, true)),
            ((-0.3, 0.5, 10), (2, 5, false)),
            ((0.4, -0.3, 10), (1, 7, true)),
            ((1.5, 0.0, 4), (0, 4, false)),
            ((0.25, 1.75, 30), (22, 30, false)),
            ((0.5, -1.0, 6), (0, 3, false)),
            ((1.0, 0.3, 10), (3, 3, true)),
            ((0.0, 0.5, 9), (4, 4, false)),
            ((0.35, 0.0, 10), (0, 4, false)),
            ((0.45, 0.0, 10), (0, 4, false)),
            ((-1.5, 0.2, 8), (6, 6, true)),
            ((0.1, -2.35, 20), (13, 15, false)),
        ];
        for ((w, o, n), want) in cases {
            assert_eq!(ratio_to_region(w, o, n).unwrap(), want, "width {w} offset {o} n {n}");
        }
        assert!(ratio_to_region(f64::NAN, 0.0, 10).is_err());
        assert!(ratio_to_region(0.5, f64::INFINITY, 10).is_err());
    }

    /// Stable argsort the slow way: −0 equals +0, NaN last.
    fn naive_ranking(data: &[f32]) -> Vec<u32> {
        let key = |x: f32| if x.is_nan() { (1, 0.0) } else { (0, x + 0.0) };
        let mut perm: Vec<u32> = (0..data.len() as u32).collect();
        perm.sort_by(|&i, &j| {
            let (ki, kj) = (key(data[i as usize]), key(data[j as usize]));
            ki.0.cmp(&kj.0).then(ki.1.partial_cmp(&kj.1).unwrap()).then(i.cmp(&j))
        });
        perm
    }

    #[test]
    fn ranking_matches_a_naive_stable_argsort() {
        // 1.1M values in one first-level bucket (the in-place path), with many ties, among others
        let noise = super::super::tests::normals(100_000, 4);
        let mut data: Vec<f32> = (0..1_100_000).map(|k| 1.0 + (k % 5000) as f32 * f32::EPSILON).collect();
        data.extend(noise.iter().map(|x| (x * 8.0).round() / 8.0));
        let n = data.len();
        let data: Vec<f32> = (0..n).map(|i| data[(i * 7919) % n]).collect();
        assert_eq!(ranking(&data, |_| true), naive_ranking(&data));
    }

    /// sd-mecha's top_k_tensor_sum the slow way (no NaN).
    fn naive_top_k(a: &[f32], b: &[f32], width: f64, offset: f64) -> Vec<f32> {
        let mut sorted = a.to_vec();
        sorted.sort_by(f32::total_cmp);
        let mut rank = vec![0; a.len()];
        for (r, &i) in naive_ranking(b).iter().enumerate() {
            rank[i as usize] = r;
        }
        let (start, end, inverted) = ratio_to_region(width, offset, a.len()).unwrap();
        let mut magnitudes: Vec<f32> = a.iter().map(|x| x.abs()).collect();
        magnitudes.sort_by(f32::total_cmp);
        let kth = |k: usize| if k == 0 { -1.0 } else { magnitudes[k - 1] };
        let (lo, hi) = (kth(start), kth(end));
        (0..a.len())
            .map(|i| {
                let v = sorted[rank[i]];
                if (lo <= v.abs() && v.abs() <= hi) != inverted {
                    v
                } else {
                    a[i]
                }
            })
            .collect()
    }

    #[test]
    fn top_k_matches_a_naive_implementation() {
        let n = 150_000;
        let a: Vec<f32> = super::super::tests::normals(n, 5).iter().map(|x| (x * 64.0).round() / 64.0).collect();
        let b: Vec<f32> = super::super::tests::normals(n, 6).iter().map(|x| (x * 16.0).round() / 16.0).collect();
        let (ta, tb) = (
            Tensor::from_slice(&a, n, &candle_core::Device::Cpu).unwrap(),
            Tensor::from_slice(&b, n, &candle_core::Device::Cpu).unwrap(),
        );
        for (w, o) in [(1.0, 0.0), (0.3, 0.2), (0.5, 0.7), (0.0, 0.5), (0.05, 0.95)] {
            let got = top_k_tensor_sum(&ta, &tb, w, o).unwrap().to_vec1::<f32>().unwrap();
            let want = naive_top_k(&a, &b, w, o);
            assert!(got.iter().zip(&want).all(|(g, w)| g == w), "width {w} offset {o}");
        }
    }

    #[test]
    fn ranking_is_stable_argsort() {
        let data = [0.5f32, -0.0, 0.0, f32::NAN, -1.0, 0.5, f32::NEG_INFINITY, 0.0, f32::NAN, 2.0];
        let perm = ranking(&data, |_| true);
        assert_eq!(perm, vec![6, 4, 1, 2, 7, 0, 5, 9, 3, 8]);
        let sorted = sorted_values(&data);
        assert_eq!(sorted[0], f32::NEG_INFINITY);
        assert!(sorted[8].is_nan() && sorted[9].is_nan());
        assert_eq!(kth_magnitude(&sorted, 1), 0.0);
        assert_eq!(kth_magnitude(&sorted, 4), 0.5);
        assert_eq!(kth_magnitude(&sorted, 6), 1.0);
        assert_eq!(kth_magnitude(&sorted, 8), f32::INFINITY);
        assert!(kth_magnitude(&sorted, 9).is_nan());
        assert_eq!(kth_magnitude(&sorted, 0), -1.0);
    }
}

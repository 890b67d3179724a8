//! sd-mecha's `cosine.py`: `add_cosine_a` and `add_cosine_b`, lerps whose weight comes from
//! the cosine similarity of `a` and `b` along dim 0.
//!
//! Along dim 0 means per *column*: for a tensor of shape `[d0, rest…]` every index into `rest`
//! gets its own similarity (over the `d0` values there), and so its own lerp weight
//! `k = 1 − clamp(similarity − α, 0, 1)`; the result is `lerp(a, b, k)` elementwise. A 1-D tensor
//! is one column, a 0-D tensor one column of length 1. Column sums are taken in one pass
//! (f64, in fixed row blocks), then one pass writes the lerp.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::avx2_fma;
use super::{apply2, lerp, simd_variant, sums, Elem, Kernel2, CHUNK};

/// torch.nn.functional.normalize's default eps.
const NORMALIZE_EPS: f64 = 1e-12;
/// torch.nn.functional.cosine_similarity's default eps.
const COSINE_EPS: f64 = 1e-8;

/// `lerp(a, b, 1 − clamp(sim − α, 0, 1))` with `sim` the cosine similarity along dim 0 of
/// `normalize(a, dim=0)` and `normalize(b, dim=0)`.
///
/// torch computes `cosine_similarity(x, y) = Σ (x / max(‖x‖, 1e-8)) · (y / max(‖y‖, 1e-8))` and
/// `normalize(x) = x / max(‖x‖, 1e-12)`; both are applied as written (so a column of zeros
/// has similarity 0, and columns of norm under 1e-12 are scaled up rather than to unit length).
pub fn add_cosine_a(a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    apply2("add_cosine_a", a, b, &AddCosine { alpha, variant: Variant::A })
}

/// `lerp(a, b, 1 − clamp(sim − α, 0, 1))` with `sim` the mean of the cosine similarity of `a`
/// and `b` along dim 0 and of the flattened tensors' `Σab / (‖a‖·‖b‖)` (no eps there: a zero
/// input makes every weight, and so every element, NaN, as in sd-mecha).
pub fn add_cosine_b(a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    apply2("add_cosine_b", a, b, &AddCosine { alpha, variant: Variant::B })
}

#[derive(Copy, Clone)]
enum Variant {
    A,
    B,
}

struct AddCosine {
    alpha: f64,
    variant: Variant,
}

/// Per-column Σa², Σb², Σab.
struct ColumnSums {
    aa: Vec<f64>,
    bb: Vec<f64>,
    ab: Vec<f64>,
}

impl Kernel2 for AddCosine {
    fn run<T: Elem>(&self, a: &[T], b: &[T], dims: &[usize]) -> Result<Vec<T>> {
        let rows = dims.first().copied().unwrap_or(1);
        if a.is_empty() {
            return Ok(Vec::new());
        }
        let cols = a.len() / rows;
        let s = column_sums(a, b, rows, cols);
        let alpha = T::narrow(self.alpha);
        let max = |x: T, eps: f64| if x < T::narrow(eps) { T::narrow(eps) } else { x };
        let norms = |sq: &[f64]| sq.iter().map(|&v| T::narrow(v.sqrt())).collect::<Vec<T>>();
        let (na, nb) = (norms(&s.aa), norms(&s.bb));
        let similarity: Vec<T> = match self.variant {
            Variant::A => (0..cols)
                .map(|j| {
                    // x̂ = x / max(‖x‖, 1e-12), whose own norm is then clamped to 1e-8
                    let (ma, mb) = (max(na[j], NORMALIZE_EPS), max(nb[j], NORMALIZE_EPS));
                    let (ra, rb) = (max(na[j] / ma, COSINE_EPS), max(nb[j] / mb, COSINE_EPS));
                    T::narrow(s.ab[j] / (ma.widen() * ra.widen() * mb.widen() * rb.widen()))
                })
                .collect(),
            Variant::B => {
                let (aa, bb, ab) = (s.aa.iter().sum::<f64>(), s.bb.iter().sum::<f64>(), s.ab.iter().sum::<f64>());
                let (norm_a, norm_b) = (T::narrow(aa.sqrt()), T::narrow(bb.sqrt()));
                let magnitude = T::narrow(ab / (norm_a.widen() * norm_b.widen()));
                (0..cols)
                    .map(|j| {
                        let (ma, mb) = (max(na[j], COSINE_EPS), max(nb[j], COSINE_EPS));
                        let cos = T::narrow(s.ab[j] / (ma.widen() * mb.widen()));
                        (cos + magnitude) / T::narrow(2.0)
                    })
                    .collect()
            }
        };
        let weights: Vec<T> = similarity.iter().map(|&s| T::ONE - clamp01(s - alpha)).collect();

        let mut out = vec![T::ZERO; a.len()];
        let rows_per_chunk = CHUNK.div_ceil(cols).max(1);
        let span = rows_per_chunk * cols;
        out.par_chunks_mut(span)
            .zip(a.par_chunks(span).zip(b.par_chunks(span)))
            .for_each(|(o, (a, b))| lerp_rows(o, a, b, &weights));
        Ok(out)
    }
}

/// torch's `clamp(x, 0, 1)`: NaN stays NaN.
fn clamp01<T: Elem>(x: T) -> T {
    if x < T::ZERO {
        T::ZERO
    } else if x > T::ONE {
        T::ONE
    } else {
        x
    }
}

/// Column sums over `rows × cols` data, in row blocks fixed by the shape (at most 64 blocks,
/// at least [`CHUNK`] elements each) summed in block order.
fn column_sums<T: Elem>(a: &[T], b: &[T], rows: usize, cols: usize) -> ColumnSums {
    if cols == 1 {
        let [aa, bb, ab] = sums(a, b);
        return ColumnSums { aa: vec![aa], bb: vec![bb], ab: vec![ab] };
    }
    let block_rows = rows.div_ceil(64).max(CHUNK.div_ceil(cols)).max(1);
    let span = block_rows * cols;
    let parts: Vec<ColumnSums> =
        a.par_chunks(span).zip(b.par_chunks(span)).map(|(a, b)| block_sums(a, b, cols)).collect();
    let mut total = ColumnSums { aa: vec![0.0; cols], bb: vec![0.0; cols], ab: vec![0.0; cols] };
    for p in &parts {
        for j in 0..cols {
            total.aa[j] += p.aa[j];
            total.bb[j] += p.bb[j];
            total.ab[j] += p.ab[j];
        }
    }
    total
}

simd_variant!(fn lerp_rows<T: Elem>(out: &mut [T], a: &[T], b: &[T], weights: &[T]) = lerp_rows_body);

/// `out = lerp(a, b, weights)` row by row (`weights` has one entry per column).
#[inline(always)]
fn lerp_rows_body<T: Elem>(out: &mut [T], a: &[T], b: &[T], weights: &[T]) {
    let cols = weights.len();
    for ((o, a), b) in out.chunks_exact_mut(cols).zip(a.chunks_exact(cols)).zip(b.chunks_exact(cols)) {
        for (((o, &a), &b), &k) in o.iter_mut().zip(a).zip(b).zip(weights) {
            *o = lerp(a, b, k);
        }
    }
}

simd_variant!(fn block_sums<T: Elem>(a: &[T], b: &[T], cols: usize) -> ColumnSums = block_sums_body);

/// Column sums of one block of whole rows.
#[inline(always)]
fn block_sums_body<T: Elem>(a: &[T], b: &[T], cols: usize) -> ColumnSums {
    let mut s = ColumnSums { aa: vec![0.0; cols], bb: vec![0.0; cols], ab: vec![0.0; cols] };
    for (a, b) in a.chunks_exact(cols).zip(b.chunks_exact(cols)) {
        for ((((&x, &y), aa), bb), ab) in a.iter().zip(b).zip(s.aa.iter_mut()).zip(s.bb.iter_mut()).zip(s.ab.iter_mut())
        {
            let (x, y) = (x.widen(), y.widen());
            *aa += x * x;
            *bb += y * y;
            *ab += x * y;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::testdata::{excess, load, values};
    use super::*;

    #[test]
    fn matches_sd_mecha() {
        let fam = load("cosine");
        let mut checked = 0;
        for c in fam.cases() {
            let got = match c.func.as_str() {
                "add_cosine_a" => add_cosine_a(&c.a, &c.b, c.params[0]),
                "add_cosine_b" => add_cosine_b(&c.a, &c.b, c.params[0]),
                f => panic!("unknown function {f}"),
            }
            .unwrap();
            assert_eq!(got.dims(), c.a.dims());
            assert_eq!(got.dtype(), c.a.dtype());
            let (got, want) = (values(&got), c.expected.unwrap());
            let (rel, abs) = if c.set.starts_with("f64") { (1e-12, 1e-15) } else { (1e-5, 1e-6) };
            let e = excess(&got, &want, rel, abs);
            assert!(e <= 1.0, "{} {} {:?}: excess {e}\n got {got:?}\nwant {want:?}", c.func, c.set, c.params);
            checked += 1;
        }
        assert!(checked > 50);
    }
}

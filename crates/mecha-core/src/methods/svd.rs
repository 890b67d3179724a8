//! SVD and orthogonal merges (sd-mecha `svd.py`, `kronecker.py`): `rotate`, `truncate_rank`,
//! `truncate_kronecker`, `get_rank_from_ratio`. The linear algebra is in `wholemath::svd`.
//!
//! Decompositions are kept in the node cache per key, with the parameters and a fingerprint
//! of the input data they were computed from, so a merge of the same recipe with another
//! `alpha`, `alignment` or `rank` reuses them; anything else recomputes. Unlike sd-mecha's
//! float16 cache, entries are exact, so a cached result equals a fresh one.

use std::sync::Arc;

use candle_core::DType;
use candle_core::Tensor;
use faer::traits::RealField;
use faer::{Mat, MatRef};

use super::decl::*;
use super::seam::{Arg, ComputeSpec, Decision, Method, Output, PlanCall, RunCall};
use super::wholemath::svd::{
    self as math, is_close, LeadingBasis, MathResult, OrthogonalEig, StiefelGeodesic, Svd, Transform,
};
use super::wholemath::{lerp, with_data, Elem};
use super::{DefaultValue, MethodSpec, SpaceSpec, ValueType};
use crate::error::Result;
use crate::recipe::Scalar;

/// A tensor's values in f64, row-major.
fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(super::wholemath::to_f64_vec(t)?)
}

/// `data` as a tensor of `like`'s shape, dtype and device.
fn tensor_like(data: Vec<f64>, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, like.dims(), like.device())?.to_dtype(like.dtype())?)
}

/// Identifies the data a cached decomposition was computed from. Eight interleaved streams of
/// two values each (an f32 pair is one u64), so the multiplications do not wait on each other:
/// a cached merge of SD 1.5 hashes 860 M values (0.5 ns each here, against 2 ns one by one).
pub(crate) fn fingerprint<T: Elem>(parts: &[&[T]]) -> u64 {
    const PRIME: u64 = 0x100_0000_01b3;
    let mix = |h: u64, v: u64| (h ^ v).wrapping_mul(PRIME).rotate_left(5);
    let pair = |x: T, y: T| x.raw_bits() ^ y.raw_bits().rotate_left(32);
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        let mut lanes: [u64; 8] = std::array::from_fn(|i| h.rotate_left(8 * i as u32) ^ part.len() as u64);
        let mut blocks = part.chunks_exact(16);
        for b in &mut blocks {
            for (i, lane) in lanes.iter_mut().enumerate() {
                *lane = mix(*lane, pair(b[2 * i], b[2 * i + 1]));
            }
        }
        for (i, &v) in blocks.remainder().iter().enumerate() {
            lanes[i % 8] = mix(lanes[i % 8], v.raw_bits());
        }
        h = lanes.iter().fold(h, |acc, &lane| mix(acc, lane));
    }
    h
}

/// The value cached under `name` for this node and key when it was computed with `params`;
/// otherwise computes, stores and returns it.
fn cached<K, V>(
    call: &RunCall,
    name: &str,
    params: K,
    bytes: impl Fn(&V) -> u64,
    compute: impl FnOnce() -> MathResult<V>,
) -> MathResult<Arc<V>>
where
    K: PartialEq + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    let wanted = params.clone();
    cached_if(call, name, params, move |k: &K, _: &V| *k == wanted, bytes, compute)
}

/// Like `cached`, with the test of whether a stored `(params, value)` serves this call given.
fn cached_if<K, V>(
    call: &RunCall,
    name: &str,
    params: K,
    serves: impl Fn(&K, &V) -> bool,
    bytes: impl Fn(&V) -> u64,
    compute: impl FnOnce() -> MathResult<V>,
) -> MathResult<Arc<V>>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    if let Some(entry) = call.cache.get(call.node, call.key(), name) {
        if let Some((k, v)) = entry.downcast_ref::<(K, Arc<V>)>() {
            if serves(k, v) {
                return Ok(v.clone());
            }
        }
    }
    let value = Arc::new(compute()?);
    let size = bytes(&value);
    call.cache.put(call.node, call.key(), name, Arc::new((params, value.clone())), size);
    Ok(value)
}

/// `(shape[0], prod(shape[1:]))`, a 0-D tensor counting as 1 × 1.
pub(crate) fn flat_2d(shape: &[usize]) -> (usize, usize) {
    (shape.first().copied().unwrap_or(1), shape.iter().skip(1).product())
}

/// Python's `round` (half to even) of a rank, clamped to `[0, max]` as sd-mecha does.
pub(crate) fn clamp_rank(rank: f64, max: usize, method: &str, param: &str) -> std::result::Result<usize, String> {
    if !rank.is_finite() {
        return Err(format!("{method}: {param} must be a finite number, got {rank}"));
    }
    Ok(rank.round_ties_even().clamp(0.0, max as f64) as usize)
}

// ---------------------------------------------------------------------------------------------
// rotate
// ---------------------------------------------------------------------------------------------

struct Rotate;

/// sd-mecha's shape rule: 4-D convolutions with a kernel larger than 1×1 become
/// `(out·in, kh·kw)`; anything else `(shape[0], rest)`.
fn rotate_2d(shape: &[usize]) -> (usize, usize) {
    if shape.len() == 4 && shape[2] * shape[3] != 1 {
        (shape[0] * shape[1], shape[2] * shape[3])
    } else {
        flat_2d(shape)
    }
}

fn check_rotate(alignment: Option<f64>, centralization: Option<f64>) -> std::result::Result<(), String> {
    for (name, v) in [("alignment", alignment), ("centralization", centralization)] {
        if let Some(v) = v.filter(|v| !v.is_finite()) {
            return Err(format!("{name} must be a finite number, got {v}"));
        }
    }
    Ok(())
}

/// The shortcuts sd-mecha takes for a one-element `alpha`: 0/0 gives `a`, 1/1 gives `b`.
fn rotate_shortcut(alignment: f64, alpha: f64) -> Option<usize> {
    if alignment == 0.0 && alpha == 0.0 {
        Some(0)
    } else if is_close(alignment, 1.0) && is_close(alpha, 1.0) {
        Some(1)
    } else {
        None
    }
}

/// `torch.allclose(a.half(), b.half())`: |a − b| ≤ 1e-8 + 1e-5·|b|, each step rounded to
/// float16 (so in practice: equal in float16 up to an ulp or so of large values).
fn allclose_f16(a: &[f64], b: &[f64]) -> bool {
    use half::f16;
    let h = |v: f32| f16::from_f32(v).to_f32();
    a.iter().zip(b).all(|(&x, &y)| {
        let (x, y) = (h(x as f32), h(y as f32));
        if x == y {
            return true;
        }
        let diff = h(x - y).abs();
        let allowed = h(1e-8 + h(1e-5 * y).abs());
        diff.is_finite() && diff <= allowed
    })
}

/// `alpha` broadcast to `shape` (torch's rules: trailing dimensions match or are 1).
fn broadcast(alpha: &Tensor, shape: &[usize]) -> std::result::Result<Vec<f64>, String> {
    let dims = alpha.dims();
    let fail = || format!("alpha of shape {dims:?} does not broadcast to {shape:?}");
    if dims.len() > shape.len() {
        return Err(fail());
    }
    let offset = shape.len() - dims.len();
    for (i, &d) in dims.iter().enumerate() {
        if d != 1 && d != shape[offset + i] {
            return Err(fail());
        }
    }
    let data = values(alpha).map_err(|e| e.message)?;
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    for flat in 0..n {
        let (mut rest, mut src, mut stride) = (flat, 0, 1);
        for axis in (0..shape.len()).rev() {
            let idx = rest % shape[axis];
            rest /= shape[axis];
            if axis >= offset {
                let d = dims[axis - offset];
                if d != 1 {
                    src += idx * stride;
                }
                stride *= d;
            }
        }
        out.push(data[src]);
    }
    Ok(out)
}

/// Alpha as one number or one value per element of `shape`.
enum Alpha {
    Scalar(f64),
    PerElement(Vec<f64>),
}

impl Alpha {
    fn at(&self, i: usize) -> f64 {
        match self {
            Alpha::Scalar(v) => *v,
            Alpha::PerElement(v) => v[i],
        }
    }
}

fn check_finite_alpha(alpha: &Alpha) -> std::result::Result<(), String> {
    let finite = match alpha {
        Alpha::Scalar(v) => v.is_finite(),
        Alpha::PerElement(v) => v.iter().all(|x| x.is_finite()),
    };
    if finite {
        Ok(())
    } else {
        Err("alpha must be finite".into())
    }
}

impl Method for Rotate {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let shape = call.common_shape([0, 1])?;
        check_rotate(call.number(2), call.number(4)).map_err(|e| call.fail(e))?;
        if let (Some(alignment), Some(alpha)) = (call.number(2), call.number(3)) {
            if !alpha.is_finite() {
                return Err(call.fail("alpha must be finite"));
            }
            if let Some(param) = rotate_shortcut(alignment, alpha) {
                return Ok(Decision::Forward { param, index: 0 });
            }
        }
        let bytes = shape.as_ref().map_or(0, |s| rotate_working_bytes(rotate_2d(s)));
        Ok(Decision::Compute(ComputeSpec { shape, dtype: None, kernel: None, extra_bytes: bytes }))
    }

    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let (a, b) = (call.tensor(0, 0)?, call.tensor(1, 0)?);
        let alignment = call.number(2)?;
        let centralization = call.number(4)?;
        check_rotate(Some(alignment), Some(centralization)).map_err(|e| call.fail(e))?;
        let alpha_t = call.tensor(3, 0)?;
        if alpha_t.elem_count() == 1 {
            let alpha = call.number(3)?;
            if let Some(param) = rotate_shortcut(alignment, alpha) {
                return Ok(vec![Arg::Tensor(if param == 0 { a } else { b.to_dtype(a.dtype())? })]);
            }
        }
        let shape = a.dims().to_vec();
        let (av, bv) = (values(&a)?, values(&b)?);

        if shape.len() <= 1 || allclose_f16(&av, &bv) {
            let alpha = if alpha_t.elem_count() == 1 {
                Alpha::Scalar(call.number(3)?)
            } else {
                Alpha::PerElement(broadcast(&alpha_t, &shape).map_err(|e| call.fail(e))?)
            };
            check_finite_alpha(&alpha).map_err(|e| call.fail(e))?;
            let out = av.iter().zip(&bv).enumerate().map(|(i, (&x, &y))| lerp(x, y, alpha.at(i))).collect();
            return Ok(vec![Arg::Tensor(tensor_like(out, &a)?)]);
        }

        let (n, p) = rotate_2d(&shape);
        let alpha = if alpha_t.elem_count() == 1 {
            Alpha::Scalar(call.number(3)?)
        } else {
            Alpha::PerElement(broadcast(&alpha_t, &[n, p]).map_err(|e| call.fail(e))?)
        };
        check_finite_alpha(&alpha).map_err(|e| call.fail(e))?;
        let single = a.dtype() != DType::F64;
        let out = rotate(&call, av, bv, (n, p), alignment, &alpha, centralization, single).map_err(|e| call.fail(e))?;
        Ok(vec![Arg::Tensor(tensor_like(out, &a)?)])
    }
}

/// The memory `rotate` works in on an `n × p` key beyond its inputs, in bytes: at most five f64
/// copies of the data at once (see `rotate`), and the matrices of the decompositions: about eight
/// `p × p` ones (a full transform's eigendecomposition), or ten of the `(n + k)²` Stiefel
/// matrices (a wide key, `k = min(p − n, n)`). What is cached is counted by the cache's limit.
fn rotate_working_bytes((n, p): (usize, usize)) -> u64 {
    let decompositions = if n >= p { 8 * p * p } else { 10 * (n + (p - n).min(n)).pow(2) };
    8 * (5 * n * p + decompositions) as u64
}

/// The general path of `rotate` on `n × p` data (row-major). `single`: the merge is float32 or
/// narrower, so what is cached is kept in float32 (`Factor`). The inputs are dropped once
/// centred and each intermediate once used: at most five copies of the data live at once
/// (`rotate_working_bytes`), which matters for SD 1.5's 14.7 M-value convolutions.
#[allow(clippy::too_many_arguments)]
fn rotate(
    call: &RunCall,
    av: Vec<f64>,
    bv: Vec<f64>,
    (n, p): (usize, usize),
    alignment: f64,
    alpha: &Alpha,
    centralization: f64,
    single: bool,
) -> MathResult<Vec<f64>> {
    if !av.iter().chain(&bv).all(|v| v.is_finite()) {
        return Err("a and b must be finite to be aligned (the SVD of NaN or infinity is undefined)".into());
    }
    let mean = |v: &[f64]| -> Vec<f64> {
        (0..p).map(|j| (0..n).map(|i| v[i * p + j]).sum::<f64>() / n as f64 * centralization).collect()
    };
    let (a_mean, b_mean) = (mean(&av), mean(&bv));
    let centred = |v: &[f64], m: &[f64]| Mat::from_fn(n, p, |i, j| v[i * p + j] - m[j]);
    let (mut a2, b2) = (centred(&av, &a_mean), centred(&bv, &b_mean));
    let data = fingerprint(&[&av, &bv]);
    drop((av, bv));

    let cancel_reflection = !is_close(alignment, alignment.round_ties_even());
    let key = (data, centralization.to_bits(), cancel_reflection, single);
    let transform = cached(call, "rotate.transform", key, Transform::bytes, || {
        Transform::procrustes(a2.as_ref(), b2.as_ref(), cancel_reflection, single)
    })?;
    let mut eig = || {
        cached(call, "rotate.eig", key, OrthogonalEig::bytes, || {
            let q = transform.full().expect("only full transforms have eigenvectors");
            Ok(OrthogonalEig::new(q.as_ref())?.compact(single))
        })
    };
    let (eps, max_iters) = (call.number(5).map_err(|e| e.message)?, call.int(6).map_err(|e| e.message)?);
    let mut geodesic = || {
        if max_iters < 1 {
            return Err(format!("stiefel_max_iters must be at least 1, got {max_iters}"));
        }
        let log_key = (data, centralization.to_bits(), eps.to_bits(), max_iters, single);
        cached(call, "rotate.geodesic", log_key, StiefelGeodesic::bytes, || match &*transform {
            Transform::LowRank { u, v } => {
                let (u, v) = (u.get(), v.get());
                let log = math::log_stiefel(v.as_ref(), u.as_ref(), eps, max_iters as usize)?;
                StiefelGeodesic::new(v.as_ref(), log.as_ref(), single)
            }
            Transform::Full(_) => unreachable!("only low-rank transforms take the Stiefel path"),
        })
    };

    let nonzero_alpha = match alpha {
        Alpha::Scalar(v) => *v != 0.0,
        Alpha::PerElement(_) => true,
    };
    if nonzero_alpha {
        let toward = transform.apply(b2.as_ref(), -1.0, &mut eig, &mut geodesic)?;
        drop(b2);
        for j in 0..p {
            for i in 0..n {
                a2[(i, j)] = lerp(a2[(i, j)], toward[(i, j)], alpha.at(i * p + j));
            }
        }
    } else {
        drop(b2);
    }
    let rotated = transform.apply(a2.as_ref(), alignment, &mut eig, &mut geodesic)?;
    drop(a2);
    let mut out = math::to_rows(rotated.as_ref());
    drop(rotated);
    for (i, v) in out.iter_mut().enumerate() {
        let j = i % p;
        *v += lerp(a_mean[j], b_mean[j], alignment);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// truncate_rank, truncate_kronecker
// ---------------------------------------------------------------------------------------------

/// The Kronecker factor shapes a rearranged matrix was built for (zeros for truncate_rank).
pub(crate) type KronDims = (usize, usize, usize, usize);

/// A rank-limited decomposition of a matrix: the leading basis of the exact route, or the SVD
/// drawn by the randomised range finder.
pub(crate) enum Truncation {
    Exact(LeadingBasis),
    Approximate(Svd),
}

impl Truncation {
    fn bytes(&self) -> u64 {
        match self {
            Truncation::Exact(b) => b.bytes(),
            Truncation::Approximate(d) => d.bytes(),
        }
    }

    /// The rank-`r` factors `(up, down)` of `m`, the matrix this was computed from.
    pub(crate) fn factors(&self, m: MatRef<f64>, r: usize) -> (Mat<f64>, Mat<f64>) {
        match self {
            Truncation::Exact(b) => b.factors(m, r),
            Truncation::Approximate(d) => d.factors(r),
        }
    }

    /// The rank-`r` approximation of `m`, the matrix this was computed from, row-major.
    fn truncate_rows<T: Elem + RealField>(&self, m: MatRef<T>, r: usize) -> Vec<T> {
        match self {
            Truncation::Exact(b) => b.truncate_rows(m, r),
            Truncation::Approximate(d) => d.product_rows(r),
        }
    }
}

/// How a cached decomposition was computed: the exact basis serves every rank up to the one
/// it was computed for; a randomised one only the rank, iterations and seed it was drawn for.
#[derive(PartialEq, Clone, Copy)]
enum SvdKind {
    Full,
    Approximate { rank: usize, iters: usize, seed: i64 },
}

/// The decomposition of the `rows × cols` matrix `m()` for rank `rank` as the method's
/// parameters 2–4 ask (exact, or randomised from the key's seeded stream), from the cache when
/// computed before (then `m` is not called).
pub(crate) fn decompose(
    call: &RunCall,
    name: &str,
    (rows, cols): (usize, usize),
    m: impl FnOnce() -> Mat<f64>,
    data: u64,
    dims: KronDims,
    rank: usize,
) -> Result<Arc<Truncation>> {
    let approximate = call.int(2)? != 0;
    // seed_rng first: it explains a seed that was never chosen
    let mut rng = if approximate { Some(call.seed_rng(4)?) } else { None };
    let kind = if approximate {
        // Python's range() of a negative count is empty
        let iters = call.int(3)?.max(0) as usize;
        SvdKind::Approximate { rank, iters, seed: call.int(4)? }
    } else {
        SvdKind::Full
    };
    let serves = |k: &(u64, KronDims, SvdKind), v: &Truncation| {
        *k == (data, dims, kind) && !matches!(v, Truncation::Exact(b) if b.rank() < rank.min(rows.min(cols)))
    };
    cached_if(call, name, (data, dims, kind), serves, Truncation::bytes, || match kind {
        SvdKind::Full => Ok(Truncation::Exact(LeadingBasis::new(m().as_ref(), rank)?)),
        SvdKind::Approximate { rank, iters, .. } => {
            let rng = rng.as_mut().expect("drawn for the approximate basis");
            Ok(Truncation::Approximate(math::svd_lowrank(m().as_ref(), rank, iters, || rng.next_normal())?))
        }
    })
    .map_err(|e| call.fail(e))
}

struct TruncateRank;

impl Method for TruncateRank {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let Some(shape) = call.arg(0).and_then(|a| a.shape.clone()) else {
            return Err(call.fail("a must be a tensor"));
        };
        if shape.len() < 2 || shape.contains(&0) {
            return Ok(Decision::Forward { param: 0, index: 0 });
        }
        let (m, n) = flat_2d(&shape);
        if let Some(rank) = call.number(1) {
            match clamp_rank(rank, m.min(n), "truncate_rank", "rank").map_err(|e| call.fail(e))? {
                r if r == m.min(n) => return Ok(Decision::Forward { param: 0, index: 0 }),
                0 => return Ok(Decision::Fill { value: 0.0, shape, dtype: None }),
                _ => {}
            }
        }
        // f64 copies of the input and the result, the Gram matrix and its eigenvectors
        let bytes = 8 * (3 * m * n + 3 * m.min(n).pow(2)) as u64;
        Ok(Decision::Compute(ComputeSpec { shape: Some(shape), dtype: None, kernel: None, extra_bytes: bytes }))
    }

    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let a = call.tensor(0, 0)?;
        let (m, n) = flat_2d(a.dims());
        let max = m.min(n);
        let target = clamp_rank(call.number(1)?, max, "truncate_rank", "rank").map_err(|e| call.fail(e))?;
        if a.dims().len() < 2 || target == max {
            return Ok(vec![Arg::Tensor(a)]);
        }
        if target == 0 {
            return Ok(vec![Arg::Tensor(a.zeros_like()?)]);
        }
        let out = match a.dtype() {
            DType::F64 => truncate_rank::<f64>(&call, &a, target)?,
            _ => truncate_rank::<f32>(&call, &a, target)?,
        };
        Ok(vec![Arg::Tensor(out.to_dtype(a.dtype())?)])
    }
}

/// `truncate_rank` of `a` in the element type `T` (f32 unless the merge computes in f64).
fn truncate_rank<T: Elem + RealField>(call: &RunCall, a: &Tensor, target: usize) -> Result<Tensor> {
    let (m, n) = flat_2d(a.dims());
    let out = with_data::<T, _>(a, |data| {
        let mat = MatRef::from_row_major_slice(data, m, n);
        let f64_copy = || Mat::from_fn(m, n, |i, j| data[i * n + j].widen());
        let d = decompose(call, "truncate_rank.svd", (m, n), f64_copy, fingerprint(&[data]), (0, 0, 0, 0), target);
        Ok(d.map(|d| d.truncate_rows(mat, target)))
    })??;
    Ok(Tensor::from_vec(out, a.dims(), &candle_core::Device::Cpu)?.to_device(a.device())?)
}

struct TruncateKronecker;

/// The rearrangement of `data` (of shape `shape`, split as `(m1, m2, n1, n2)` by
/// [`math::kron_dims_from_ratio`]) whose rank-1 truncation `u·vᵀ` gives the nearest Kronecker
/// product `w1 ⊗ w2`: `w1 = u` as `m1 × n1`, `w2 = v` as `m2 × n2 × shape[2..]`. Element
/// `a[i1·m2 + i2, j1·n2 + j2, q]` goes to row `i1·n1 + j1`, column `(i2·n2 + j2)·p2 + q`.
pub(crate) fn kronecker_rearrangement(data: &[f64], shape: &[usize], (m1, m2, n1, n2): KronDims) -> Mat<f64> {
    let p2: usize = shape[2..].iter().product();
    Mat::from_fn(m1 * n1, m2 * n2 * p2, |r, c| {
        let (i1, j1) = (r / n1, r % n1);
        let (i2, rest) = (c / (n2 * p2), c % (n2 * p2));
        let (j2, q) = (rest / p2, rest % p2);
        data[((i1 * m2 + i2) * (n1 * n2) + j1 * n2 + j2) * p2 + q]
    })
}

fn check_ratio(ratio: f64, method: &str, param: &str) -> std::result::Result<(), String> {
    if ratio.is_finite() {
        Ok(())
    } else {
        Err(format!("{method}: {param} must be a finite number, got {ratio}"))
    }
}

impl Method for TruncateKronecker {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let Some(shape) = call.arg(0).and_then(|a| a.shape.clone()) else {
            return Err(call.fail("a must be a tensor"));
        };
        if shape.len() < 2 || shape.contains(&0) {
            return Ok(Decision::Forward { param: 0, index: 0 });
        }
        if let Some(r) = call.number(1) {
            check_ratio(r, "truncate_kronecker", "kronecker_ratio").map_err(|e| call.fail(e))?;
        }
        let numel: usize = shape.iter().product();
        let bytes = 8 * 6 * numel as u64;
        Ok(Decision::Compute(ComputeSpec { shape: Some(shape), dtype: None, kernel: None, extra_bytes: bytes }))
    }

    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let a = call.tensor(0, 0)?;
        let shape = a.dims().to_vec();
        if shape.len() < 2 || shape.contains(&0) {
            return Ok(vec![Arg::Tensor(a)]);
        }
        let ratio = call.number(1)?;
        check_ratio(ratio, "truncate_kronecker", "kronecker_ratio").map_err(|e| call.fail(e))?;
        let (m1, m2, n1, n2) = math::kron_dims_from_ratio(&shape, ratio);
        let p2: usize = shape[2..].iter().product();
        let data = values(&a)?;
        let mat = kronecker_rearrangement(&data, &shape, (m1, m2, n1, n2));
        let cols = mat.ncols();
        let shape_2d = (mat.nrows(), mat.ncols());
        let d = decompose(
            &call,
            "truncate_kronecker.svd",
            shape_2d,
            || mat.clone(),
            fingerprint(&[&data]),
            (m1, m2, n1, n2),
            1,
        )?;
        // the nearest w1 ⊗ w2 is the rank-1 truncation of the rearrangement, put back in place
        let nearest = d.truncate_rows(mat.as_ref(), 1);
        let mut out = vec![0.0; data.len()];
        for r in 0..m1 * n1 {
            let (i1, j1) = (r / n1, r % n1);
            for c in 0..cols {
                let (i2, rest) = (c / (n2 * p2), c % (n2 * p2));
                let (j2, q) = (rest / p2, rest % p2);
                out[((i1 * m2 + i2) * (n1 * n2) + j1 * n2 + j2) * p2 + q] = nearest[r * cols + c];
            }
        }
        Ok(vec![Arg::Tensor(tensor_like(out, &a)?)])
    }
}

// ---------------------------------------------------------------------------------------------
// get_rank_from_ratio
// ---------------------------------------------------------------------------------------------

/// Decided from the shape alone, at plan time.
struct GetRankFromRatio;

impl Method for GetRankFromRatio {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let Some(shape) = call.arg(0).and_then(|a| a.shape.clone()) else {
            return Err(call.fail("a must be a tensor"));
        };
        let Some(ratio) = call.number(1) else {
            return Err(call.fail("ratio must be a number known before the merge"));
        };
        let (m, n) = flat_2d(&shape);
        let max = m.min(n);
        let rank = clamp_rank(max as f64 * ratio, max, "get_rank_from_ratio", "ratio").map_err(|e| call.fail(e))?;
        Ok(Decision::Constant(Scalar::Int(rank as i64)))
    }
}

pub fn methods() -> Vec<MethodSpec> {
    use ValueType::{Bool, Float, Int, Tensor};
    let delta = || SpaceSpec::fixed(&["delta"]);
    let basis_params = |first: crate::methods::ParamSpec| {
        vec![
            input("a", Tensor, delta()),
            first,
            hyper("use_approximate_basis", Bool, DefaultValue::Bool(true)),
            hyper("approximate_basis_iters", Int, DefaultValue::Int(2)),
            hyper("approximate_basis_seed", Int, DefaultValue::Null),
        ]
    };
    vec![
        MethodSpec::new(
            "rotate",
            "Aligns a with b by an orthogonal transform Q^alignment of its centred rows (alpha also moves a's scaling toward b's).",
            vec![
                same_space("a", Tensor).state_dict(),
                same_space("b", Tensor).state_dict(),
                hyper("alignment", Float, DefaultValue::Float(1.0)),
                hyper("alpha", Tensor, DefaultValue::Float(0.0)),
                hyper("centralization", Float, DefaultValue::Float(1.0)),
                hyper("stiefel_eps", Float, DefaultValue::Float(1e-8)),
                hyper("stiefel_max_iters", Int, DefaultValue::Int(100)),
            ],
            returns(Tensor, SpaceSpec::Symbol),
            Rotate,
        ),
        MethodSpec::new(
            "truncate_rank",
            "The best rank-`rank` approximation of a delta (a.flatten(1)), from its SVD or a seeded randomised range finder.",
            basis_params(hyper("rank", Int, DefaultValue::Int(8))),
            returns(Tensor, delta()),
            TruncateRank,
        ),
        MethodSpec::new(
            "get_rank_from_ratio",
            "round(min(shape[0], prod(shape[1:])) · ratio), clamped: a rank for truncate_rank, from the shape alone.",
            vec![input("a", Tensor, SpaceSpec::fixed(&["weight", "delta"])), hyper("ratio", Float, DefaultValue::Float(0.5))],
            returns(Int, SpaceSpec::fixed(&["param"])),
            GetRankFromRatio,
        ),
        MethodSpec::new(
            "truncate_kronecker",
            "The nearest Kronecker product w1 ⊗ w2 to a delta (rank-1 SVD of its rearrangement); kronecker_ratio sets the factor sizes.",
            basis_params(hyper("kronecker_ratio", Float, DefaultValue::Float(0.5))),
            returns(Tensor, delta()),
            TruncateKronecker,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_broadcasts_like_torch() {
        let t = |v: Vec<f64>, dims: &[usize]| Tensor::from_vec(v, dims, &candle_core::Device::Cpu).unwrap();
        let row = t(vec![1.0, 2.0, 3.0], &[3]);
        assert_eq!(broadcast(&row, &[2, 3]).unwrap(), [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        let column = t(vec![1.0, 2.0], &[2, 1]);
        assert_eq!(broadcast(&column, &[2, 3]).unwrap(), [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        assert!(broadcast(&row, &[3, 2]).is_err());
        assert!(broadcast(&t(vec![0.0; 6], &[1, 2, 3]), &[2, 3]).is_err());
    }

    #[test]
    fn allclose_compares_in_float16() {
        assert!(allclose_f16(&[1.0, -2.0], &[1.0 + 1e-4, -2.0]));
        assert!(!allclose_f16(&[1.0], &[1.01]));
        assert!(!allclose_f16(&[f64::NAN], &[f64::NAN]));
        assert!(allclose_f16(&[], &[]));
    }

    #[test]
    fn shapes_become_matrices_as_in_sd_mecha() {
        assert_eq!(rotate_2d(&[4, 3, 3, 3]), (12, 9));
        assert_eq!(rotate_2d(&[4, 3, 1, 1]), (4, 3));
        assert_eq!(rotate_2d(&[4, 6, 2]), (4, 12));
        assert_eq!(flat_2d(&[]), (1, 1));
        assert_eq!(clamp_rank(2.5, 4, "m", "p"), Ok(2), "half to even");
        assert_eq!(clamp_rank(-1.0, 4, "m", "p"), Ok(0));
        assert!(clamp_rank(f64::NAN, 4, "m", "p").unwrap_err().contains("p must be"));
    }
}

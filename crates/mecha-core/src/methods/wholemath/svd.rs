//! The linear algebra behind sd-mecha's `svd.py` and `kronecker.py` (`rotate`, `truncate_rank`,
//! `truncate_kronecker`), on `faer` matrices in f64.
//!
//! Decompositions run sequentially (`Par::Seq`): keys already run in parallel, and a fixed
//! order of operations makes results independent of the thread count. Everything is computed
//! in f64 whatever the merge dtype: the SVD/eig results are then at least as accurate as
//! sd-mecha's float32 ones, and the Stiefel logarithm can reach its tolerance (1e-8), which
//! float32 never does. What rotate caches is stored in the merge's precision (`Factor`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use faer::linalg::matmul::{matmul, triangular};
use faer::traits::RealField;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};

use super::Elem;

/// An error of the math, without the method/key context (the caller adds it).
pub type MathResult<T> = std::result::Result<T, String>;

static DECOMPOSITIONS: AtomicU64 = AtomicU64::new(0);

/// How many SVD / eigen decompositions this process has computed (cache tests read it).
pub fn decompositions() -> u64 {
    DECOMPOSITIONS.load(Ordering::Relaxed)
}

fn counted() {
    DECOMPOSITIONS.fetch_add(1, Ordering::Relaxed);
    sequential();
}

/// faer runs sequentially: keys already run in parallel.
fn sequential() {
    static INIT: Once = Once::new();
    INIT.call_once(|| faer::set_global_parallelism(faer::Par::Seq));
}

/// A row-major `rows × cols` slice as a matrix.
pub fn from_rows(data: &[f64], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| data[i * cols + j])
}

/// The matrix in row-major order.
pub fn to_rows(m: MatRef<f64>) -> Vec<f64> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)]);
        }
    }
    out
}

fn mm<T: RealField>(a: MatRef<T>, b: MatRef<T>) -> Mat<T> {
    a * b
}

fn all_finite(m: MatRef<f64>) -> bool {
    // walk along the contiguous direction
    let m = if m.row_stride().unsigned_abs() > m.col_stride().unsigned_abs() { m.transpose() } else { m };
    (0..m.ncols()).all(|j| (0..m.nrows()).all(|i| m[(i, j)].is_finite()))
}

/// `left·right` in row-major order (the layout of tensors), written in place.
pub(crate) fn product_rows<T: Elem + RealField>(left: MatRef<T>, right: MatRef<T>) -> Vec<T> {
    let (m, n) = (left.nrows(), right.ncols());
    let mut out = vec![T::ZERO; m * n];
    matmul(MatMut::from_row_major_slice_mut(&mut out, m, n), Accum::Replace, left, right, T::ONE, Par::Seq);
    out
}

/// The lower half of `xᵀ·x` (the upper half is zero): the symmetric eigensolvers read no more,
/// and computing half of it halves the flops.
fn gram_lower(x: MatRef<f64>) -> Mat<f64> {
    let mut gram = Mat::<f64>::zeros(x.ncols(), x.ncols());
    triangular::matmul(
        gram.as_mut(),
        triangular::BlockStructure::TriangularLower,
        Accum::Replace,
        x.transpose(),
        triangular::BlockStructure::Rectangular,
        x,
        triangular::BlockStructure::Rectangular,
        1.0,
        Par::Seq,
    );
    gram
}

/// `m` in the element type `T`.
fn cast<T: Elem>(m: MatRef<f64>) -> Mat<T> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| T::narrow(m[(i, j)]))
}

/// A factor kept in a cache, in the precision the merge needs: float32 for merges of 32 bits or
/// less (the factors are then orthonormal to ~1e-7, below what such a result holds) and float64
/// otherwise. It is rounded before its first use, so a result computed from a cached factor is
/// the one computed when it was made: SD 1.5's rotate needs 3.6 GiB this way instead of 8.6.
#[derive(Clone)]
pub enum Factor {
    Single(Mat<f32>),
    Double(Mat<f64>),
}

impl Factor {
    pub fn new(m: Mat<f64>, single: bool) -> Factor {
        if single {
            Factor::Single(Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f32))
        } else {
            Factor::Double(m)
        }
    }

    /// The values in f64 (a copy for a float32 factor).
    pub fn get(&self) -> Loaded<'_> {
        match self {
            Factor::Single(m) => Loaded::Owned(Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f64)),
            Factor::Double(m) => Loaded::Borrowed(m),
        }
    }

    pub fn bytes(&self) -> u64 {
        match self {
            Factor::Single(m) => 4 * (m.nrows() * m.ncols()) as u64,
            Factor::Double(m) => 8 * (m.nrows() * m.ncols()) as u64,
        }
    }
}

/// A factor's values in f64: borrowed when it is stored so, a copy otherwise. (Not a `Cow`, whose
/// `AsRef` would shadow faer's `as_ref`.)
pub enum Loaded<'a> {
    Borrowed(&'a Mat<f64>),
    Owned(Mat<f64>),
}

impl Loaded<'_> {
    pub fn as_ref(&self) -> MatRef<'_, f64> {
        (**self).as_ref()
    }

    pub fn into_owned(self) -> Mat<f64> {
        match self {
            Loaded::Borrowed(m) => m.clone(),
            Loaded::Owned(m) => m,
        }
    }
}

impl std::ops::Deref for Loaded<'_> {
    type Target = Mat<f64>;
    fn deref(&self) -> &Mat<f64> {
        match self {
            Loaded::Borrowed(m) => m,
            Loaded::Owned(m) => m,
        }
    }
}

/// A thin SVD `a = u·diag(s)·vᵀ`, singular values non-increasing.
#[derive(Clone)]
pub struct Svd {
    pub u: Mat<f64>,
    pub s: Vec<f64>,
    pub v: Mat<f64>,
}

impl Svd {
    pub fn bytes(&self) -> u64 {
        8 * (self.u.nrows() * self.u.ncols() + self.s.len() + self.v.nrows() * self.v.ncols()) as u64
    }

    /// The rank-`r` factors `(u_r·√s_r, √s_r·v_rᵀ)` (see [`LeadingBasis::factors`]).
    pub fn factors(&self, r: usize) -> (Mat<f64>, Mat<f64>) {
        let r = r.min(self.s.len());
        let root: Vec<f64> = self.s[..r].iter().map(|s| s.max(0.0).sqrt()).collect();
        let up = Mat::from_fn(self.u.nrows(), r, |i, j| self.u[(i, j)] * root[j]);
        let down = Mat::from_fn(r, self.v.nrows(), |j, c| self.v[(c, j)] * root[j]);
        (up, down)
    }

    /// `u[:, :r]·diag(s[:r])·v[:, :r]ᵀ`, row-major, in `T`.
    pub(crate) fn product_rows<T: Elem + RealField>(&self, r: usize) -> Vec<T> {
        let us = Mat::from_fn(self.u.nrows(), r, |i, j| self.u[(i, j)] * self.s[j]);
        let product = product_rows(us.as_ref(), self.v.subcols(0, r).transpose());
        product.into_iter().map(T::narrow).collect()
    }
}

pub fn svd(a: MatRef<f64>) -> MathResult<Svd> {
    if !all_finite(a) {
        return Err("the matrix to decompose holds NaN or infinity".into());
    }
    counted();
    let d = a.thin_svd().map_err(|e| format!("the SVD did not converge ({e:?})"))?;
    Ok(Svd { u: d.U().to_owned(), s: d.S().column_vector().iter().copied().collect(), v: d.V().to_owned() })
}

/// The leading singular directions of a matrix `a` (`m × n`) on its smaller side, enough for
/// rank-`r` truncations `u_r·s_r·v_rᵀ` with `r ≤ rank()`.
///
/// Found from the symmetric eigendecomposition of the Gram matrix `a·aᵀ` (or `aᵀ·a` when `a`
/// is tall) rather than an SVD: in f64 this is 4–8× faster for the wide SD matrices
/// (1280 × 11520: 1.1 s against the thin SVD's several seconds) and the truncation
/// `u_r·(u_rᵀ·a)` is a projection, so it stays accurate even where small singular values of
/// the Gram route are not (they are never divided by). Only the `rank` leading vectors are
/// kept, so a cached basis costs `min(m, n)·rank` values, not a whole SVD.
#[derive(Clone)]
pub struct LeadingBasis {
    /// Orthonormal columns in order of decreasing singular value: left singular vectors
    /// (`m × rank`) when `m ≤ n`, right ones (`n × rank`) otherwise.
    vectors: Mat<f64>,
    left: bool,
}

impl LeadingBasis {
    pub fn new(a: MatRef<f64>, rank: usize) -> MathResult<LeadingBasis> {
        if !all_finite(a) {
            return Err("the matrix to decompose holds NaN or infinity".into());
        }
        counted();
        let left = a.nrows() <= a.ncols();
        let x = if left { a } else { a.transpose() };
        let gram = gram_lower(x.transpose());
        let e = gram
            .self_adjoint_eigen(Side::Lower)
            .map_err(|e| format!("the eigendecomposition of the Gram matrix did not converge ({e:?})"))?;
        let (d, u) = (gram.nrows(), e.U());
        let rank = rank.min(d);
        // faer's eigenvalues increase: the leading vectors are the last columns
        let vectors = Mat::from_fn(d, rank, |i, j| u[(i, d - 1 - j)]);
        Ok(LeadingBasis { vectors, left })
    }

    pub fn rank(&self) -> usize {
        self.vectors.ncols()
    }

    pub fn bytes(&self) -> u64 {
        8 * (self.vectors.nrows() * self.vectors.ncols()) as u64
    }

    /// The best rank-`r` approximation of `a` (the matrix the basis was computed from),
    /// row-major, computed in `a`'s element type: the basis is exact, and projecting an f32
    /// tensor in f32 needs no f64 copy of it (a cached merge is then mostly I/O).
    pub(crate) fn truncate_rows<T: Elem + RealField>(&self, a: MatRef<T>, r: usize) -> Vec<T> {
        let basis = cast::<T>(self.vectors.subcols(0, r.min(self.rank())));
        let basis = basis.as_ref();
        if self.left {
            product_rows(basis, mm(basis.transpose(), a).as_ref())
        } else {
            product_rows(mm(a, basis).as_ref(), basis.transpose())
        }
    }

    /// The rank-`r` factors `(up, down)` of `a` (the matrix the basis was computed from), with
    /// `up·down` its best rank-`r` approximation and the singular values split evenly:
    /// `up = u_r·√s_r`, `down = √s_r·v_rᵀ` (what a LoRA stores).
    pub fn factors(&self, a: MatRef<f64>, r: usize) -> (Mat<f64>, Mat<f64>) {
        let basis = self.vectors.subcols(0, r.min(self.rank()));
        let k = basis.ncols();
        // the other side's vectors times s: uᵀ·a = s·vᵀ (rows), a·v = u·s (columns)
        let scaled = if self.left { mm(basis.transpose(), a) } else { mm(a, basis) };
        let norm = |j: usize| -> f64 {
            if self.left {
                scaled.row(j).iter().map(|x| x * x).sum::<f64>().sqrt()
            } else {
                scaled.col(j).iter().map(|x| x * x).sum::<f64>().sqrt()
            }
        };
        let root: Vec<f64> = (0..k).map(|j| norm(j).sqrt()).collect();
        let inverse = |j: usize| if root[j] > 0.0 { 1.0 / root[j] } else { 0.0 };
        if self.left {
            let up = Mat::from_fn(a.nrows(), k, |i, j| basis[(i, j)] * root[j]);
            let down = Mat::from_fn(k, a.ncols(), |j, c| scaled[(j, c)] * inverse(j));
            (up, down)
        } else {
            let up = Mat::from_fn(a.nrows(), k, |i, j| scaled[(i, j)] * inverse(j));
            let down = Mat::from_fn(k, a.ncols(), |j, c| basis[(c, j)] * root[j]);
            (up, down)
        }
    }
}

/// The singular vectors `(u, v)` of a square or tall `x` (`x = u·diag(s)·vᵀ`, `s` non-increasing).
///
/// Procrustes needs only these, and for well-conditioned `x` they come faster from the
/// eigendecomposition of `xᵀ·x = v·diag(s²)·vᵀ`, with `u = x·v·diag(1/s)`, than from an SVD
/// (1280 × 1280: ~0.5 s against ~1 s). Dividing by `s` loses `s_max/s_min` digits, so where
/// that ratio passes 10⁴ the SVD decides instead.
fn singular_vectors(x: MatRef<f64>) -> MathResult<(Mat<f64>, Mat<f64>)> {
    if !all_finite(x) {
        return Err("the matrix to decompose holds NaN or infinity".into());
    }
    let k = x.ncols();
    if k == 0 {
        return Ok((Mat::zeros(x.nrows(), 0), Mat::zeros(0, 0)));
    }
    let gram = gram_lower(x);
    counted();
    if let Ok(e) = gram.self_adjoint_eigen(Side::Lower) {
        let values = e.S().column_vector();
        let (smallest, largest) = (values[0], values[k - 1]);
        if smallest > 1e-8 * largest && largest.is_finite() {
            // eigenvalues increase: reverse to the SVD's order
            let v = Mat::from_fn(k, k, |i, j| e.U()[(i, k - 1 - j)]);
            let xv = mm(x, v.as_ref());
            let u = Mat::from_fn(x.nrows(), k, |i, j| xv[(i, j)] / values[k - 1 - j].sqrt());
            // one Newton–Schulz step, u·(3I − uᵀu)/2: the Gram route leaves u orthonormal only
            // to about ε·(s_max/s_min)², which this squares away
            let mut correction = mm(u.transpose(), u.as_ref());
            for i in 0..k {
                for j in 0..k {
                    correction[(i, j)] =
                        if i == j { 1.5 - 0.5 * correction[(i, j)] } else { -0.5 * correction[(i, j)] };
                }
            }
            return Ok((mm(u.as_ref(), correction.as_ref()), v));
        }
    }
    let d = svd(x)?;
    Ok((d.u, d.v))
}

/// Thin QR (Householder, LAPACK's sign convention): `q` is `m × min(m, n)`, `r` is `min(m, n) × n`.
fn qr(a: MatRef<f64>) -> (Mat<f64>, Mat<f64>) {
    let d = a.qr();
    (d.compute_thin_Q(), d.thin_R().to_owned())
}

/// QR with a non-negative diagonal in `r` (sd-mecha's `qr_pos`).
fn qr_pos(a: MatRef<f64>) -> (Mat<f64>, Mat<f64>) {
    let (mut q, mut r) = qr(a);
    for i in 0..r.nrows() {
        if r[(i, i)] < 0.0 {
            for j in 0..q.nrows() {
                q[(j, i)] = -q[(j, i)];
            }
            for j in 0..r.ncols() {
                r[(i, j)] = -r[(i, j)];
            }
        }
    }
    (q, r)
}

/// Functions of an orthogonal `q` (torch's `Re(W·diag(f(λ))·W⁻¹)` from its complex eigenvalues
/// `λ = e^{±iθ}`), computed from the symmetric eigendecomposition of `s = (q + qᵀ)/2` instead.
///
/// `q` is normal, so on each of its invariant planes it is a rotation by some θ ∈ [0, π]: there
/// `s = cos θ·I` and `k = (q − qᵀ)/2 = sin θ·J`, and `f(q) = c(s) + g(s)·k` with
/// `c = Re f(e^{iθ})` and `g = Im f(e^{iθ}) / sin θ`. A symmetric eigensolver is several times
/// faster than a complex non-symmetric one and well conditioned for repeated angles. θ comes
/// from both its cosine (the eigenvalue) and its sine (`‖k·w‖` for the eigenvector `w`), so it
/// is accurate near 0 and π too.
#[derive(Clone)]
pub struct OrthogonalEig {
    /// The rotation angle of each eigenvector's plane, and its sine.
    angles: Vec<(f64, f64)>,
    /// Eigenvectors `W` of `s` (columns).
    vectors: Factor,
    /// `Wᵀ·k`; a cached (compact) decomposition recomputes it from `q` when used.
    vectors_t_skew: Option<Mat<f64>>,
}

impl OrthogonalEig {
    pub fn new(q: MatRef<f64>) -> MathResult<OrthogonalEig> {
        if !all_finite(q) {
            return Err("the matrix to decompose holds NaN or infinity".into());
        }
        counted();
        let n = q.nrows();
        let sym = Mat::from_fn(n, n, |i, j| 0.5 * (q[(i, j)] + q[(j, i)]));
        let skew = skew_part(q);
        let e = sym
            .self_adjoint_eigen(Side::Lower)
            .map_err(|e| format!("the eigendecomposition did not converge ({e:?})"))?;
        let vectors = e.U().to_owned();
        let vectors_t_skew = mm(vectors.transpose(), skew.as_ref());
        let cosines = e.S().column_vector();
        let angles = (0..n)
            .map(|j| {
                // ‖k·w_j‖ is row j of Wᵀ·k (k is skew-symmetric)
                let sine = (0..n).map(|i| vectors_t_skew[(j, i)].powi(2)).sum::<f64>().sqrt().min(1.0);
                (sine.atan2(cosines[j]), sine)
            })
            .collect();
        Ok(OrthogonalEig { angles, vectors: Factor::Double(vectors), vectors_t_skew: Some(vectors_t_skew) })
    }

    /// The decomposition as a cache keeps it: the eigenvectors in the merge's precision
    /// (`Factor`), without `Wᵀ·k` (one product recomputes it, and it would double the entry).
    pub fn compact(self, single: bool) -> OrthogonalEig {
        let vectors = match self.vectors {
            Factor::Double(m) => Factor::new(m, single),
            stored => stored,
        };
        OrthogonalEig { angles: self.angles, vectors, vectors_t_skew: None }
    }

    pub fn bytes(&self) -> u64 {
        let skew = self.vectors_t_skew.as_ref().map_or(0, |m| 8 * (m.nrows() * m.ncols()) as u64);
        16 * self.angles.len() as u64 + self.vectors.bytes() + skew
    }

    /// `c(s) + g(s)·k` with `(c, g) = parts(θ, sin θ)`, for the `q` this decomposes.
    fn apply(&self, q: MatRef<f64>, parts: impl Fn(f64, f64) -> (f64, f64)) -> Mat<f64> {
        let n = self.angles.len();
        let (c, g): (Vec<f64>, Vec<f64>) = self.angles.iter().map(|&(theta, sine)| parts(theta, sine)).unzip();
        let w = self.vectors.get();
        let vts = match &self.vectors_t_skew {
            Some(m) => Loaded::Borrowed(m),
            None => Loaded::Owned(mm(w.transpose(), skew_part(q).as_ref())),
        };
        // W·(diag(c)·Wᵀ + diag(g)·Wᵀ·k)
        let inner = Mat::from_fn(n, n, |i, j| c[i] * w[(j, i)] + g[i] * vts[(i, j)]);
        mm(w.as_ref(), inner.as_ref())
    }

    /// The principal power `q^t` (the real part of torch's complex `λ**t`) of the `q` this
    /// decomposes.
    pub fn power(&self, q: MatRef<f64>, t: f64) -> Mat<f64> {
        self.apply(q, |theta, sine| {
            // sin(tθ)/sin θ → t at θ = 0; at θ = π (a real eigenvalue −1) only the real part counts
            let g = if sine > 0.0 {
                (t * theta).sin() / sine
            } else if theta < 1.0 {
                t
            } else {
                0.0
            };
            ((t * theta).cos(), g)
        })
    }

    /// The principal logarithm (real part), made exactly skew-symmetric as the logarithm of an
    /// orthogonal matrix is: iterations that exponentiate it (the Stiefel logarithm) would
    /// otherwise amplify the rounding away from orthogonality, about threefold per step.
    pub fn log(&self, q: MatRef<f64>) -> Mat<f64> {
        let l = self.apply(q, |theta, sine| {
            (
                0.0,
                if sine > 0.0 {
                    theta / sine
                } else if theta < 1.0 {
                    1.0
                } else {
                    0.0
                },
            )
        });
        skew_part(l.as_ref())
    }
}

/// `(a − aᵀ)/2`.
fn skew_part(a: MatRef<f64>) -> Mat<f64> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| 0.5 * (a[(i, j)] - a[(j, i)]))
}

/// The exponentials `exp(f·g)` of a skew-symmetric `g` (every exponential here is of one:
/// tangents of the orthogonal group and the Stiefel manifold) for any factor `f`, from one
/// decomposition of `g` (made exactly skew first).
///
/// On each invariant plane `g = θ·J`, so `exp(f·g) = cos fθ·I + (sin fθ/θ)·g` there; with the
/// symmetric `−g² = gᵀ·g = W·diag(θ²)·Wᵀ` that is `W·(diag(cos fθ)·Wᵀ + diag(sin fθ/θ)·Wᵀ·g)`:
/// one eigendecomposition and a few products whatever the norm of `g`, where scaling and
/// squaring with a Taylor series took twenty or more products for the large tangents of
/// `rotate`'s wide keys, and every point of a geodesic reuses the decomposition.
struct SkewExp {
    /// Eigenvectors `W` of `gᵀ·g` (columns), the angles `θ`, and `Wᵀ·g`.
    vectors: Factor,
    angles: Vec<f64>,
    vectors_t_g: Factor,
}

impl SkewExp {
    fn new(g: MatRef<f64>) -> MathResult<SkewExp> {
        let g = skew_part(g);
        let square = gram_lower(g.as_ref());
        sequential();
        let e = square
            .self_adjoint_eigen(Side::Lower)
            .map_err(|e| format!("the eigendecomposition in a matrix exponential did not converge ({e:?})"))?;
        let vectors = e.U().to_owned();
        let angles = e.S().column_vector().iter().map(|&squared| squared.max(0.0).sqrt()).collect();
        let vectors_t_g = mm(vectors.transpose(), g.as_ref());
        Ok(SkewExp { vectors: Factor::Double(vectors), angles, vectors_t_g: Factor::Double(vectors_t_g) })
    }

    /// With its factors in the merge's precision, for a cache.
    fn compact(self, single: bool) -> SkewExp {
        let round = |f: Factor| match f {
            Factor::Double(m) => Factor::new(m, single),
            stored => stored,
        };
        SkewExp { vectors: round(self.vectors), angles: self.angles, vectors_t_g: round(self.vectors_t_g) }
    }

    fn bytes(&self) -> u64 {
        8 * self.angles.len() as u64 + self.vectors.bytes() + self.vectors_t_g.bytes()
    }

    /// The first `cols` columns of `exp(f·g)`.
    fn columns(&self, f: f64, cols: usize) -> Mat<f64> {
        let parts: Vec<(f64, f64)> = self
            .angles
            .iter()
            .map(|&theta| {
                let ft = f * theta;
                // sin fθ/θ → f·(1 − (fθ)²/6) near 0
                (ft.cos(), if ft.abs() < 1e-4 { f * (1.0 - ft * ft / 6.0) } else { ft.sin() / theta })
            })
            .collect();
        let (w, wtg) = (self.vectors.get(), self.vectors_t_g.get());
        let inner = Mat::from_fn(w.nrows(), cols, |i, j| parts[i].0 * w[(j, i)] + parts[i].1 * wtg[(i, j)]);
        mm(w.as_ref(), inner.as_ref())
    }
}

/// `exp(g)` for a skew-symmetric `g`.
fn expm(g: MatRef<f64>) -> MathResult<Mat<f64>> {
    Ok(SkewExp::new(g)?.columns(1.0, g.ncols()))
}

/// Solves `s·g + g·s = c` for a symmetric `s` (eigenbasis of `s`).
fn solve_symmetric_sylvester(s: MatRef<f64>, c: MatRef<f64>) -> MathResult<Mat<f64>> {
    counted();
    let e = s.self_adjoint_eigen(Side::Lower).map_err(|e| format!("the Sylvester solve did not converge ({e:?})"))?;
    let (vals, vs) = (e.S().column_vector().iter().copied().collect::<Vec<f64>>(), e.U().to_owned());
    let ct = mm(mm(vs.transpose(), c).as_ref(), vs.as_ref());
    let n = vals.len();
    let mut gt = Mat::<f64>::zeros(n, n);
    for i in 0..n {
        for j in 0..n {
            let d = vals[i] + vals[j];
            if d.abs() < 1e-12 {
                return Err("singular Sylvester operator in the Stiefel logarithm (λ_i + λ_j ≈ 0)".into());
            }
            gt[(i, j)] = ct[(i, j)] / d;
        }
    }
    Ok(mm(mm(vs.as_ref(), gt.as_ref()).as_ref(), vs.transpose()))
}

/// Completes the orthonormal columns of a tall `a` (`m × n`, m > n) to an `m × m` orthogonal
/// matrix (the complement from a QR of `I[:, n:] − a·a[n:, :]ᵀ`).
fn orthogonal_complete(a: MatRef<f64>) -> Mat<f64> {
    let (m, n) = (a.nrows(), a.ncols());
    if m <= n {
        return a.to_owned();
    }
    // one product, not an element-by-element sum (that was most of a wide key's time)
    let mut proj = -mm(a, a.subrows(n, m - n).transpose());
    for j in 0..m - n {
        proj[(n + j, j)] += 1.0;
    }
    let (ext, _) = qr(proj.as_ref());
    Mat::from_fn(m, m, |i, j| if j < n { a[(i, j)] } else { ext[(i, j - n)] })
}

/// The geodesic on the Stiefel manifold (canonical metric) from the tall `u` along the tangent
/// `Δ`: its points `exp_stiefel(u, f·Δ)` for any `f`, all from one skew exponential (rotate
/// takes two points of it per merge, and a cached geodesic serves every later alignment).
/// It does not keep `u`: the caller has it already (rotate's cached transform), and a copy
/// would double the cache for the widest keys.
pub struct StiefelGeodesic {
    /// The orthonormal complement directions `q` (n × k) of `Δ − u·uᵀ·Δ`.
    q: Factor,
    /// Of the skew `[[uᵀΔ, −rᵀ], [r, 0]]` with `q·r = Δ − u·uᵀ·Δ`.
    exp: SkewExp,
}

impl StiefelGeodesic {
    /// With its factors in float32 when `single` (see `Factor`).
    pub fn new(u: MatRef<f64>, delta: MatRef<f64>, single: bool) -> MathResult<StiefelGeodesic> {
        let (n, p) = (u.nrows(), u.ncols());
        let k = (n - p).min(p);
        let a = mm(u.transpose(), delta);
        let (q, r) = qr_pos((delta - u * a.as_ref()).as_ref());
        let w = Mat::from_fn(p + k, p + k, |i, j| match (i < p, j < p) {
            (true, true) => a[(i, j)],
            (true, false) => -r[(j - p, i)],
            (false, true) => r[(i - p, j)],
            (false, false) => 0.0,
        });
        let q = Factor::new(q.subcols(0, k).to_owned(), single);
        Ok(StiefelGeodesic { q, exp: SkewExp::new(w.as_ref())?.compact(single) })
    }

    pub fn bytes(&self) -> u64 {
        self.q.bytes() + self.exp.bytes()
    }

    /// `exp_stiefel(u, f·Δ)`, for the `u` the geodesic was made from.
    pub fn point(&self, u: MatRef<f64>, f: f64) -> Mat<f64> {
        let p = u.ncols();
        let (m, q) = (self.exp.columns(f, p), self.q.get());
        mm(u, m.subrows(0, p)) + mm(q.as_ref(), m.subrows(p, q.ncols()))
    }
}

/// The Stiefel logarithm of tall `b` at tall `a` (Zimmermann's algorithm, as in sd-mecha):
/// the tangent `Δ` at `a` with `exp_stiefel(a, Δ) = b`. Stops when the lower-right block of
/// the matrix logarithm has Frobenius norm ≤ `eps`, or after `max_iters` iterations.
pub fn log_stiefel(a: MatRef<f64>, b: MatRef<f64>, eps: f64, max_iters: usize) -> MathResult<Mat<f64>> {
    let (n, p) = (a.nrows(), a.ncols());
    let k = (n - p).min(p);
    let m = mm(a.transpose(), b);
    let (q, nmat) = qr_pos((b - a * m.as_ref()).as_ref());
    let (q, nmat) = (q.subcols(0, k).to_owned(), nmat.subrows(0, k).to_owned());
    let stacked = Mat::from_fn(p + k, p, |i, j| if i < p { m[(i, j)] } else { nmat[(i - p, j)] });
    let mut v = orthogonal_complete(stacked.as_ref());

    // Rotate the complement so that its lower-right block is diagonal.
    let d = svd(v.submatrix(p, p, k, k))?;
    let q = mm(q.as_ref(), d.u.as_ref());
    let lower_left = mm(d.u.transpose(), nmat.as_ref());
    let upper_right = mm(v.submatrix(0, p, p, k), d.v.as_ref());
    for i in 0..k {
        for j in 0..p {
            v[(p + i, j)] = lower_left[(i, j)];
            v[(j, p + i)] = upper_right[(j, i)];
        }
        for j in 0..k {
            v[(p + i, p + j)] = if i == j { d.s[i] } else { 0.0 };
        }
    }
    if v.determinant() < 0.0 {
        let last = p + k - 1;
        for i in 0..p + k {
            v[(i, last)] = -v[(i, last)];
        }
    }

    let mut l = Mat::<f64>::zeros(p + k, p + k);
    for _ in 0..max_iters.max(1) {
        l = OrthogonalEig::new(v.as_ref())?.log(v.as_ref());
        let c = l.submatrix(p, p, k, k).to_owned();
        if c.norm_l2() <= eps {
            break;
        }
        let l21 = l.submatrix(p, 0, k, p);
        let mut s = mm(l21, l21.transpose());
        for i in 0..k {
            for j in 0..k {
                s[(i, j)] /= 12.0;
            }
            s[(i, i)] -= 0.5;
        }
        let g = skew_part(solve_symmetric_sylvester(s.as_ref(), c.as_ref())?.as_ref());
        let rotated = mm(v.subcols(p, k), expm(g.as_ref())?.as_ref());
        v.subcols_mut(p, k).copy_from(&rotated);
    }
    Ok(mm(a, l.submatrix(0, 0, p, p)) + mm(q.as_ref(), l.submatrix(p, 0, k, p)))
}

/// sd-mecha's orthogonal transform from `a` toward `b` (both `n × p`, rows centred).
#[derive(Clone)]
pub enum Transform {
    /// `n ≥ p`: the orthogonal `q` (p × p) minimising ‖a·q − b‖.
    Full(Factor),
    /// `n < p` (wide): the rank-n map sending the span of `v` to that of `u` (both p × n,
    /// orthonormal columns): `x ↦ x − x·v·vᵀ + x·u·vᵀ`.
    LowRank { u: Factor, v: Factor },
}

impl Transform {
    /// Orthogonal Procrustes; with `cancel_reflection` a full transform is made a rotation
    /// (a fractional power of a reflection is not real). Its factors are float32 when `single`.
    pub fn procrustes(a: MatRef<f64>, b: MatRef<f64>, cancel_reflection: bool, single: bool) -> MathResult<Transform> {
        let (n, p) = (a.nrows(), a.ncols());
        if n < p {
            let (bq, br) = qr(b.transpose());
            let (u, v) = singular_vectors(mm(a.transpose(), br.transpose()).as_ref())?;
            Ok(Transform::LowRank { v: Factor::new(mm(bq.as_ref(), v.as_ref()), single), u: Factor::new(u, single) })
        } else {
            let (mut u, v) = singular_vectors(mm(a.transpose(), b).as_ref())?;
            if cancel_reflection && mm(u.as_ref(), v.transpose()).determinant() < 0.0 {
                let last = u.ncols() - 1;
                for i in 0..u.nrows() {
                    u[(i, last)] = -u[(i, last)];
                }
            }
            Ok(Transform::Full(Factor::new(mm(u.as_ref(), v.transpose()), single)))
        }
    }

    pub fn bytes(&self) -> u64 {
        match self {
            Transform::Full(q) => q.bytes(),
            Transform::LowRank { u, v } => u.bytes() + v.bytes(),
        }
    }

    /// The orthogonal matrix of a full transform.
    pub fn full(&self) -> Option<Loaded<'_>> {
        match self {
            Transform::Full(q) => Some(q.get()),
            Transform::LowRank { .. } => None,
        }
    }

    /// `x` transformed by the transform's power `t`. `eig` gives the eigendecomposition of the
    /// full matrix, `geodesic` the Stiefel geodesic from `v` to `u`; both are asked for only when `t`
    /// needs them (so their cached values can be used).
    pub fn apply(
        &self,
        x: MatRef<f64>,
        t: f64,
        eig: &mut dyn FnMut() -> MathResult<std::sync::Arc<OrthogonalEig>>,
        geodesic: &mut dyn FnMut() -> MathResult<std::sync::Arc<StiefelGeodesic>>,
    ) -> MathResult<Mat<f64>> {
        if t == 0.0 {
            return Ok(x.to_owned());
        }
        match self {
            Transform::Full(q) => {
                let q = q.get();
                if is_close(t, 1.0) {
                    return Ok(mm(x, q.as_ref()));
                } else if is_close(t, -1.0) {
                    return Ok(mm(x, q.transpose()));
                }
                let power = if is_close(t, t.round()) {
                    integer_power(q.as_ref(), t.round() as i64)
                } else {
                    eig()?.power(q.as_ref(), t)
                };
                Ok(mm(x, power.as_ref()))
            }
            Transform::LowRank { u, v } => {
                let (u, v) = (u.get(), v.get());
                // x − (x·r)·rᵀ + (x·l)·rᵀ with (l, r) = (u, v) at t = 1 and (v, u) at t = −1;
                // in between, points of the geodesic from v to u.
                let (l, r) = if is_close(t, 1.0) {
                    (u.into_owned(), v.into_owned())
                } else if is_close(t, -1.0) {
                    (v.into_owned(), u.into_owned())
                } else {
                    let geodesic = geodesic()?;
                    (geodesic.point(v.as_ref(), (t + 1.0) / 2.0), geodesic.point(v.as_ref(), (1.0 - t) / 2.0))
                };
                // x − (x·r)·rᵀ + (x·l)·rᵀ = x + (x·(l − r))·rᵀ: two products instead of four
                let moved = mm(x, (l - &r).as_ref());
                Ok(x + mm(moved.as_ref(), r.transpose()))
            }
        }
    }
}

/// `q^k` for an orthogonal `q` by repeated squaring (`q⁻¹ = qᵀ`).
fn integer_power(q: MatRef<f64>, k: i64) -> Mat<f64> {
    let n = q.nrows();
    let mut base = if k < 0 { q.transpose().to_owned() } else { q.to_owned() };
    let mut e = k.unsigned_abs();
    let mut result = Mat::<f64>::identity(n, n);
    while e > 0 {
        if e & 1 == 1 {
            result = mm(result.as_ref(), base.as_ref());
        }
        base = mm(base.as_ref(), base.as_ref());
        e >>= 1;
    }
    result
}

/// Python's `math.isclose` with its defaults (relative 1e-9, no absolute tolerance).
pub fn is_close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// The thin SVD of `a` from a randomised range finder of rank `rank` (torch's `svd_lowrank`
/// with `iters` power iterations); `normal` draws the Gaussian test matrix in row-major order.
pub fn svd_lowrank(a: MatRef<f64>, rank: usize, iters: usize, mut normal: impl FnMut() -> f64) -> MathResult<Svd> {
    if !all_finite(a) {
        return Err("the matrix to decompose holds NaN or infinity".into());
    }
    let wide = a.nrows() < a.ncols();
    let a = if wide { a.transpose() } else { a };
    let mut r = Mat::<f64>::zeros(a.ncols(), rank);
    for i in 0..a.ncols() {
        for j in 0..rank {
            r[(i, j)] = normal();
        }
    }
    let mut q = qr(mm(a, r.as_ref()).as_ref()).0;
    for _ in 0..iters {
        q = qr(mm(a.transpose(), q.as_ref()).as_ref()).0;
        q = qr(mm(a, q.as_ref()).as_ref()).0;
    }
    let d = svd(mm(q.transpose(), a).as_ref())?;
    let u = mm(q.as_ref(), d.u.as_ref());
    Ok(if wide { Svd { u: d.v, s: d.s, v: u } } else { Svd { u, s: d.s, v: d.v } })
}

/// sd-mecha's `kron_dims_from_ratio`: `(m1, m2, n1, n2)` with `m1·m2 = shape[0]` and
/// `n1·n2 = shape[1]`, the log-size of the first factor aimed at `(2·ratio − 1)` times its
/// range, balanced splits preferred.
pub fn kron_dims_from_ratio(shape: &[usize], ratio: f64) -> (usize, usize, usize, usize) {
    let numel: usize = shape.iter().product();
    let log_sqrt_numel = 0.5 * (numel as f64).ln();
    let mut candidates = Vec::new();
    let (mut s_min, mut s_max) = (f64::INFINITY, f64::NEG_INFINITY);
    for m1 in divisors(shape[0]) {
        let m2 = shape[0] / m1;
        for n1 in divisors(shape[1]) {
            let n2 = shape[1] / n1;
            let s = ((m1 * n1) as f64).ln() - log_sqrt_numel;
            let bal = (m1 as f64 / m2 as f64).ln().abs() + (n1 as f64 / n2 as f64).ln().abs();
            candidates.push((s, bal, (m1, m2, n1, n2)));
            s_min = s_min.min(s);
            s_max = s_max.max(s);
        }
    }
    let s_range = s_min.abs().max(s_max.abs());
    let first_min = |key: &dyn Fn(f64, f64) -> (f64, f64)| {
        let mut best = candidates[0].2;
        let mut best_key = (f64::INFINITY, f64::INFINITY);
        for &(s, bal, dims) in &candidates {
            let k = key(s, bal);
            if k.0 < best_key.0 || (k.0 == best_key.0 && k.1 < best_key.1) {
                best_key = k;
                best = dims;
            }
        }
        best
    };
    if s_range == 0.0 {
        return first_min(&|_, bal| (0.0, bal));
    }
    let target = (2.0 * ratio - 1.0) * s_range;
    first_min(&|s, bal| ((s - target).abs(), bal))
}

fn divisors(n: usize) -> Vec<usize> {
    let mut ds = Vec::new();
    let mut d = 1;
    while d * d <= n {
        if n.is_multiple_of(d) {
            ds.push(d);
            if d != n / d {
                ds.push(n / d);
            }
        }
        d += 1;
    }
    ds.sort_unstable();
    ds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normals(n: usize, seed: u64) -> Vec<f64> {
        super::super::tests::normals(n, seed).into_iter().map(f64::from).collect()
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
    }

    fn max_diff(a: MatRef<f64>, b: MatRef<f64>) -> f64 {
        let d = a - b;
        (0..d.ncols()).flat_map(|j| (0..d.nrows()).map(move |i| (i, j))).fold(0.0, |m, (i, j)| m.max(d[(i, j)].abs()))
    }

    #[test]
    fn fractional_powers_compose() {
        let a = from_rows(&normals(30, 1), 6, 5);
        let b = from_rows(&normals(30, 2), 6, 5);
        let t = Transform::procrustes(a.as_ref(), b.as_ref(), true, false).unwrap();
        let q = t.full().unwrap();
        assert!(q.determinant() > 0.0);
        let e = OrthogonalEig::new(q.as_ref()).unwrap();
        let half = e.power(q.as_ref(), 0.5);
        assert!(max_diff(mm(half.as_ref(), half.as_ref()).as_ref(), q.as_ref()) < 1e-12);
        assert!(max_diff(integer_power(q.as_ref(), -2).as_ref(), e.power(q.as_ref(), -2.0).as_ref()) < 1e-12);
        // exp(log q) = q
        assert!(max_diff(expm(e.log(q.as_ref()).as_ref()).unwrap().as_ref(), q.as_ref()) < 1e-12);
        // the compact (cached) form: the same powers from the recomputed Wᵀ·k, in float64
        // exactly as accurate, in float32 to its precision and with half the bytes
        let (double, single) = (e.clone().compact(false), e.clone().compact(true));
        assert!(max_diff(double.power(q.as_ref(), 0.5).as_ref(), half.as_ref()) < 1e-13);
        assert!(max_diff(single.power(q.as_ref(), 0.5).as_ref(), half.as_ref()) < 1e-6);
        assert!(single.bytes() < double.bytes() && double.bytes() < e.bytes());
        let rounded = Transform::procrustes(a.as_ref(), b.as_ref(), true, true).unwrap();
        assert!(max_diff(rounded.full().unwrap().as_ref(), q.as_ref()) < 1e-7);
        assert_eq!(2 * rounded.bytes(), t.bytes());
    }

    #[test]
    fn skew_exponentials_are_rotations() {
        let theta = 2.5f64;
        let g = from_rows(&[0.0, -theta, theta, 0.0], 2, 2);
        let rotation = from_rows(&[theta.cos(), -theta.sin(), theta.sin(), theta.cos()], 2, 2);
        assert!(max_diff(expm(g.as_ref()).unwrap().as_ref(), rotation.as_ref()) < 1e-15);
        // a large random skew matrix: exp(g)·exp(−g) = I, and exp(g/2)² = exp(g)
        let x = from_rows(&normals(49, 21), 7, 7);
        let g = Mat::from_fn(7, 7, |i, j| 3.0 * (x[(i, j)] - x[(j, i)]));
        let (e, back) = (expm(g.as_ref()).unwrap(), expm((-&g).as_ref()).unwrap());
        assert!(max_diff(mm(e.as_ref(), back.as_ref()).as_ref(), Mat::<f64>::identity(7, 7).as_ref()) < 1e-12);
        let half = expm(Mat::from_fn(7, 7, |i, j| 0.5 * g[(i, j)]).as_ref()).unwrap();
        assert!(max_diff(mm(half.as_ref(), half.as_ref()).as_ref(), e.as_ref()) < 1e-12);
    }

    #[test]
    fn stiefel_log_inverts_exp() {
        let x = from_rows(&normals(21, 3), 7, 3);
        let y = from_rows(&normals(21, 4), 7, 3);
        let (u, _) = qr(x.as_ref());
        let (w, _) = qr(y.as_ref());
        let delta = log_stiefel(u.as_ref(), w.as_ref(), 1e-12, 100).unwrap();
        let geodesic = StiefelGeodesic::new(u.as_ref(), delta.as_ref(), false).unwrap();
        assert!(max_diff(geodesic.point(u.as_ref(), 1.0).as_ref(), w.as_ref()) < 1e-9);
        assert!(max_diff(geodesic.point(u.as_ref(), 0.0).as_ref(), u.as_ref()) < 1e-14);
        // an inner point is on the manifold, and on the same geodesic: its logarithm is f·Δ
        let middle = geodesic.point(u.as_ref(), 0.3);
        let identity = Mat::<f64>::identity(3, 3);
        assert!(max_diff((middle.transpose() * &middle).as_ref(), identity.as_ref()) < 1e-13);
        let partial = log_stiefel(u.as_ref(), middle.as_ref(), 1e-12, 100).unwrap();
        assert!(max_diff(partial.as_ref(), (&delta * faer::Scale(0.3)).as_ref()) < 1e-9);
        // stored in float32 (a cache of a float32 merge): the same points to that precision
        let single = StiefelGeodesic::new(u.as_ref(), delta.as_ref(), true).unwrap();
        assert!(max_diff(single.point(u.as_ref(), 0.3).as_ref(), middle.as_ref()) < 1e-6);
        assert!(2 * single.bytes() < geodesic.bytes() + 64);
    }

    #[test]
    fn the_gram_route_truncates_like_the_svd() {
        for (m, n, seed) in [(7, 19, 11), (19, 7, 12), (9, 9, 13)] {
            let a = from_rows(&normals(m * n, seed), m, n);
            let d = svd(a.as_ref()).unwrap();
            let basis = LeadingBasis::new(a.as_ref(), 4).unwrap();
            for r in [1, 3, 4] {
                let (exact, gram) = (d.product_rows::<f64>(r), basis.truncate_rows(a.as_ref(), r));
                assert!(max_abs_diff(&exact, &gram) < 1e-10, "{m}×{n} rank {r}");
            }
        }
        // an exactly rank-2 matrix: the noise directions of the Gram route add nothing
        let l = from_rows(&normals(24, 14), 12, 2);
        let a = mm(l.as_ref(), from_rows(&normals(20, 15), 2, 10).as_ref());
        let basis = LeadingBasis::new(a.as_ref(), 5).unwrap();
        assert!(max_abs_diff(&basis.truncate_rows(a.as_ref(), 5), &to_rows(a.as_ref())) < 1e-10);
        assert!(max_abs_diff(&basis.truncate_rows(a.as_ref(), 2), &to_rows(a.as_ref())) < 1e-10);
        // a row-major view gives the same numbers as the copied matrix
        let data = to_rows(a.as_ref());
        let view = MatRef::from_row_major_slice(&data, 12, 10);
        assert_eq!(LeadingBasis::new(view, 2).unwrap().truncate_rows(view, 2), basis.truncate_rows(a.as_ref(), 2));
    }

    #[test]
    fn lora_factors_split_the_singular_values_evenly() {
        for (m, n, seed) in [(7, 19, 21), (19, 7, 22)] {
            let a = from_rows(&normals(m * n, seed), m, n);
            let d = svd(a.as_ref()).unwrap();
            let basis = LeadingBasis::new(a.as_ref(), 3).unwrap();
            for (up, down) in [basis.factors(a.as_ref(), 3), d.factors(3)] {
                assert_eq!((up.nrows(), up.ncols(), down.nrows(), down.ncols()), (m, 3, 3, n));
                let product = to_rows(mm(up.as_ref(), down.as_ref()).as_ref());
                assert!(max_abs_diff(&product, &d.product_rows::<f64>(3)) < 1e-10, "{m}×{n}");
                for j in 0..3 {
                    let up_norm = up.col(j).iter().map(|x| x * x).sum::<f64>().sqrt();
                    let down_norm = down.row(j).iter().map(|x| x * x).sum::<f64>().sqrt();
                    assert!((up_norm - d.s[j].sqrt()).abs() < 1e-10 && (down_norm - d.s[j].sqrt()).abs() < 1e-10);
                }
            }
        }
        // a zero difference gives zero factors, never NaN
        let zero = Mat::<f64>::zeros(4, 6);
        let (up, down) = LeadingBasis::new(zero.as_ref(), 2).unwrap().factors(zero.as_ref(), 2);
        assert!(up.col_iter().chain(down.col_iter()).all(|c| c.iter().all(|&x| x == 0.0)));
    }

    #[test]
    fn singular_vectors_from_the_gram_matrix_match_the_svd() {
        // well conditioned (Gram route) and rank-deficient (SVD fallback)
        let x = from_rows(&normals(48, 16), 8, 6);
        let l = from_rows(&normals(16, 17), 8, 2);
        let deficient = mm(l.as_ref(), from_rows(&normals(12, 18), 2, 6).as_ref());
        for x in [x, deficient] {
            let (u, v) = singular_vectors(x.as_ref()).unwrap();
            let d = svd(x.as_ref()).unwrap();
            let us = Mat::from_fn(8, 6, |i, j| u[(i, j)] * d.s[j]);
            assert!(max_diff(mm(us.as_ref(), v.transpose()).as_ref(), x.as_ref()) < 1e-10);
            assert!(max_diff(mm(v.transpose(), v.as_ref()).as_ref(), Mat::<f64>::identity(6, 6).as_ref()) < 1e-10);
        }
    }

    #[test]
    fn kron_dims_follow_the_ratio() {
        assert_eq!(kron_dims_from_ratio(&[4, 4], 0.5), (2, 2, 2, 2));
        let (m1, m2, n1, n2) = kron_dims_from_ratio(&[12, 9], 0.0);
        assert_eq!((m1 * m2, n1 * n2, m1 * n1), (12, 9, 1));
        let (m1, _, n1, _) = kron_dims_from_ratio(&[12, 9], 1.0);
        assert_eq!(m1 * n1, 108);
    }

    #[test]
    fn lowrank_svd_recovers_a_low_rank_matrix() {
        let l = from_rows(&normals(40, 5), 20, 2);
        let r = from_rows(&normals(30, 6), 2, 15);
        let a = mm(l.as_ref(), r.as_ref());
        let mut z = normals(100, 7).into_iter();
        let d = svd_lowrank(a.as_ref(), 2, 2, || z.next().unwrap()).unwrap();
        assert!(max_abs_diff(&d.product_rows::<f64>(2), &to_rows(a.as_ref())) < 1e-10);
        let mut z = normals(100, 8).into_iter();
        let d = svd_lowrank(a.transpose(), 2, 0, || z.next().unwrap()).unwrap();
        assert!(max_abs_diff(&d.product_rows::<f64>(2), &to_rows(a.transpose())) < 1e-10);
    }
}

//! sd-mecha's `crossover.py`: mixes the low frequencies of `a` with the high frequencies of `b`
//! through a filter on their n-dimensional real spectra (`torch.fft.rfftn` over every dim).
//!
//! sd-mecha computes `irfftn((1 − f)·rfftn(a) + f·rfftn(b))`. This module computes the same
//! linear map as `a + irfftn(f·rfftn(b − a))`, which needs one half-spectrum instead of two. The
//! two differ by rounding only: FFT rounding, and for f64 inputs the f32 rounding of sd-mecha's
//! `1 − f` (its filter is float32), ~1e-7 relative where the filter is strictly between 0 and 1.
//!
//! The n-D transform: a real FFT along the last dim of every row, complex FFTs along the dims
//! between the first and the last (gathered a few lines at a time, in parallel), then dim 0
//! is filtered in one go, and the same steps run backwards. Normalisation is torch's
//! "backward": none forward, 1/N on the way back. `realfft` only has real transforms: a complex
//! FFT of `x + iy` is assembled from the real FFTs of `x` and `y` (the same work as one complex
//! FFT), and dim 0 needs none, since the filter is real and symmetric along it (`f[k] = f[n−k]`):
//! filtering a line `x + iy` there is `op(x) + i·op(y)` with `op(x) = c2r(f ⊙ r2c(x))`.

use std::sync::Arc;

use candle_core::{bail, Result, Tensor};
use rayon::prelude::*;
use realfft::num_complex::Complex;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};

use super::{apply2, lerp, like_a, map2, Elem, Kernel2, SharedMut, CHUNK};

/// `crossover(a, b, alpha, tilt)`: `a`'s spectrum where the filter is 0, `b`'s where it is 1.
///
/// sd-mecha's shortcuts, in its order: `alpha == 0` → `a`; `alpha == 1` → `b`; `tilt == 1` →
/// `lerp(a, b, alpha)`; a 0-D tensor, or `allclose(a, b)` (rtol 1e-5, atol 1e-8) →
/// `lerp(a, b, alpha)`. Only past those is the filter built, and an `alpha` outside [0, 1]
/// (or NaN) is an error — sd-mecha's `ValueError("alpha must be between 0 and 1")` — as is a
/// non-finite `tilt` (Python's `math.floor` raises on it).
///
/// The filter is sd-mecha's `create_filter`, evaluated in f32 as torch does (its linspace
/// as torch's AVX2/AVX-512 kernels compute it); torch's f32 `sqrt` is not always correctly
/// rounded, so a frequency lying exactly on a step filter's edge may rarely land on the other
/// side.
pub fn crossover(a: &Tensor, b: &Tensor, alpha: f64, tilt: f64) -> Result<Tensor> {
    if alpha == 0.0 {
        return Ok(a.clone());
    }
    if alpha == 1.0 {
        return like_a(a, b);
    }
    apply2("crossover", a, b, &Crossover { alpha, tilt })
}

struct Crossover {
    alpha: f64,
    tilt: f64,
}

impl Kernel2 for Crossover {
    fn run<T: Elem>(&self, a: &[T], b: &[T], dims: &[usize]) -> Result<Vec<T>> {
        let weight = T::narrow(self.alpha);
        if self.tilt == 1.0 || dims.is_empty() || allclose(a, b) {
            return Ok(map2(a, b, |a, b| lerp(a, b, weight)).0);
        }
        let mut spec_dims = dims.to_vec();
        let last = spec_dims.len() - 1;
        spec_dims[last] = dims[last] / 2 + 1;
        let filter = Filter::new(&spec_dims, self.alpha, self.tilt)?;
        if a.is_empty() {
            return Ok(Vec::new());
        }
        filtered(a, b, dims, &spec_dims, &filter)
    }
}

/// torch's `allclose(a, b)`: every `|a − b| ≤ 1e-8 + |1e-5·b|` in the input dtype, or `a == b`.
fn allclose<T: Elem>(a: &[T], b: &[T]) -> bool {
    let (rtol, atol) = (T::narrow(1e-5), T::narrow(1e-8));
    a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)).all(|(a, b)| {
        a.iter().zip(b).all(|(&x, &y)| {
            let err = (x - y).abs();
            x == y || (err.is_finite() && err <= atol + (rtol * y).abs())
        })
    })
}

/// How the filter maps a mesh value `m` (the normalised frequency radius) to a weight.
#[derive(Copy, Clone, Debug)]
enum Shape {
    /// `m > t`
    Above(f32),
    /// `m < t`
    Below(f32),
    /// `clip(m·cot + α·cot + α − cot, 0, 1)`, every operation rounded to f32
    RampA { cot: f32, alpha_cot: f32, alpha: f32 },
    /// `clip(m·cot − α·cot + α, 0, 1)`, every operation rounded to f32
    RampB { cot: f32, alpha_cot: f32, alpha: f32 },
}

/// sd-mecha's `create_filter(shape, alpha, tilt)` over the spectrum's shape, evaluated a line
/// along dim 0 at a time.
///
/// The cut is tilted by `tilt` (taken mod 4: 0 vertical, 0.5 at 45°, 1 a plain weighted sum;
/// past 2 the roles of low and high frequencies swap) and slid to pass through
/// `(alpha, 1 − alpha)`. The mesh is `sqrt(Σ_d g_d² / D)` (summed in dim order) with `g_d` the
/// per-dim normalised frequency: `linspace(0, 1, n)` for the last (half-spectrum) dim and for
/// dims of size 1, `[0, 1, …, ⌈n/2⌉−1, ⌊n/2⌋, …, 1] / ⌊n/2⌋` (FFT order) for the others. A 1-D
/// mesh is `g_0`.
pub(crate) struct Filter {
    /// `g_d²` per dim (`g_0` itself for 1-D).
    squares: Vec<Vec<f32>>,
    dims: f32,
    shape: Shape,
    inverted: bool,
}

impl Filter {
    pub(crate) fn new(spec_dims: &[usize], alpha: f64, tilt: f64) -> Result<Filter> {
        if !(0.0..=1.0).contains(&alpha) {
            bail!("crossover: alpha must be between 0 and 1 (got {alpha})");
        }
        if !tilt.is_finite() {
            bail!("crossover: tilt must be finite (got {tilt})");
        }
        let tilt = tilt - (tilt / 4.0).floor() * 4.0;
        let (alpha, inverted) = if tilt > 2.0 { (1.0 - alpha, true) } else { (alpha, false) };
        let shape = if tilt < 1e-10 || (tilt - 4.0).abs() < 1e-10 {
            Shape::Above((1.0 - alpha) as f32)
        } else if (tilt - 2.0).abs() < 1e-10 {
            Shape::Below((1.0 - alpha) as f32)
        } else {
            let cot = 1.0 / (std::f64::consts::PI * tilt / 2.0).tan();
            let (c, ac, al) = (cot as f32, (alpha * cot) as f32, alpha as f32);
            if tilt <= 1.0 || (2.0 < tilt && tilt <= 3.0) {
                Shape::RampA { cot: c, alpha_cot: ac, alpha: al }
            } else {
                Shape::RampB { cot: c, alpha_cot: ac, alpha: al }
            }
        };
        let last = spec_dims.len() - 1;
        let squares = spec_dims
            .iter()
            .enumerate()
            .map(|(d, &n)| {
                let g = if d == last || n == 1 { linspace01(n) } else { fft_frequencies(n) };
                if spec_dims.len() == 1 {
                    g
                } else {
                    g.iter().map(|&x| x * x).collect()
                }
            })
            .collect();
        Ok(Filter { squares, dims: spec_dims.len() as f32, shape, inverted })
    }

    /// The weights of `b` at `(k, rest…)` for `k < out.len()`: the start of the line along
    /// dim 0 through `rest` (one index per later dim).
    pub(crate) fn weights(&self, rest: &[usize], out: &mut [f32]) {
        let n = out.len();
        out.copy_from_slice(&self.squares[0][..n]);
        if self.squares.len() > 1 {
            for (sq, &i) in self.squares[1..].iter().zip(rest) {
                let term = sq[i];
                out.iter_mut().for_each(|m| *m += term);
            }
            let dims = self.dims;
            out.iter_mut().for_each(|m| *m = (*m / dims).sqrt());
        }
        match self.shape {
            Shape::Above(t) => out.iter_mut().for_each(|m| *m = if *m > t { 1.0 } else { 0.0 }),
            Shape::Below(t) => out.iter_mut().for_each(|m| *m = if *m < t { 1.0 } else { 0.0 }),
            Shape::RampA { cot, alpha_cot, alpha } => {
                out.iter_mut().for_each(|m| *m = (*m * cot + alpha_cot + alpha - cot).clamp(0.0, 1.0))
            }
            Shape::RampB { cot, alpha_cot, alpha } => {
                out.iter_mut().for_each(|m| *m = (*m * cot - alpha_cot + alpha).clamp(0.0, 1.0))
            }
        }
        if self.inverted {
            out.iter_mut().for_each(|f| *f = 1.0 - *f);
        }
    }
}

/// torch's `linspace(0, 1, n)` in f32, as its vectorised CPU builds compute it: the first half
/// `step·i`, the second half `1 − step·(n−1−i)` with the multiply-add fused.
fn linspace01(n: usize) -> Vec<f32> {
    if n <= 1 {
        return vec![0.0; n];
    }
    let step = 1.0f32 / (n - 1) as f32;
    (0..n).map(|i| if i < n / 2 { step * i as f32 } else { (-step).mul_add((n - 1 - i) as f32, 1.0) }).collect()
}

/// `[0, 1, …, ⌈n/2⌉−1, ⌊n/2⌋, …, 1] / ⌊n/2⌋` in f32 (every step exact but the division).
fn fft_frequencies(n: usize) -> Vec<f32> {
    let half = n / 2;
    (0..n).map(|p| if p < n - half { p } else { n - p }).map(|k| k as f32 / half as f32).collect()
}

/// `a + irfftn(f · rfftn(b − a))` over `dims` (row-major, at least 1-D, non-empty).
fn filtered<T: Elem>(a: &[T], b: &[T], dims: &[usize], spec_dims: &[usize], filter: &Filter) -> Result<Vec<T>> {
    let len = *dims.last().unwrap();
    let half = spec_dims[spec_dims.len() - 1];
    let rows = a.len() / len;
    let mut real = RealFftPlanner::<T>::new();
    let (r2c, c2r) = (real.plan_fft_forward(len), real.plan_fft_inverse(len));
    let scale = T::narrow(1.0 / a.len() as f64);
    let mut out = vec![T::ZERO; a.len()];

    if dims.len() == 1 {
        let mut spec = r2c.make_output_vec();
        let mut diff: Vec<T> = b.iter().zip(a).map(|(&b, &a)| b - a).collect();
        r2c.process(&mut diff, &mut spec).map_err(fft_error)?;
        let mut weights = vec![0f32; half];
        filter.weights(&[], &mut weights);
        for (v, &f) in spec.iter_mut().zip(&weights) {
            *v = scaled(*v, f);
        }
        let mut scratch = c2r.make_scratch_vec();
        inverse_row(&*c2r, &mut spec, &mut out, a, scale, &mut scratch)?;
        return Ok(out);
    }

    // forward along the last dim, one row at a time
    let mut spec = vec![Complex::new(T::ZERO, T::ZERO); rows * half];
    spec.par_chunks_mut(half).zip(a.par_chunks(len).zip(b.par_chunks(len))).try_for_each_init(
        || (vec![T::ZERO; len], r2c.make_scratch_vec()),
        |(diff, scratch), (s, (a, b))| {
            for ((d, &a), &b) in diff.iter_mut().zip(a).zip(b) {
                *d = b - a;
            }
            r2c.process_with_scratch(diff, s, scratch).map_err(fft_error)
        },
    )?;
    // the dims between the first and the last: forward, innermost first
    let inner = spec_dims.len() - 1;
    for d in (1..inner).rev() {
        let fft = ComplexFft::new(&mut real, spec_dims[d], false);
        axis_pass(&mut spec, spec_dims, d, || fft.work(), |lines, _, w| fft.process(lines, w));
    }
    // dim 0: filtered through real transforms of each line's real and imaginary parts
    let dim0 = Dim0Filter::new(&mut real, spec_dims[0]);
    let rest_dims = &spec_dims[1..];
    axis_pass(
        &mut spec,
        spec_dims,
        0,
        || dim0.work(),
        |lines, first, w| dim0.process(lines, first, rest_dims, filter, w),
    );
    for d in 1..inner {
        let fft = ComplexFft::new(&mut real, spec_dims[d], true);
        axis_pass(&mut spec, spec_dims, d, || fft.work(), |lines, _, w| fft.process(lines, w));
    }
    // back along the last dim, straight into the output rows, adding a
    out.par_chunks_mut(len).zip(spec.par_chunks_mut(half).zip(a.par_chunks(len))).try_for_each_init(
        || c2r.make_scratch_vec(),
        |scratch, (o, (s, a))| inverse_row(&*c2r, s, o, a, scale, scratch),
    )?;
    Ok(out)
}

#[inline(always)]
fn scaled<T: Elem>(v: Complex<T>, f: f32) -> Complex<T> {
    let f = T::narrow(f as f64);
    Complex::new(v.re * f, v.im * f)
}

fn fft_error(e: realfft::FftError) -> candle_core::Error {
    candle_core::Error::Msg(format!("crossover: FFT failed: {e}"))
}

/// `out = a + scale · c2r(spec)`. The imaginary parts of the DC bin (and of the Nyquist bin for
/// even lengths) are dropped, as torch's c2r transforms do.
fn inverse_row<T: Elem>(
    c2r: &dyn ComplexToReal<T>,
    spec: &mut [Complex<T>],
    out: &mut [T],
    a: &[T],
    scale: T,
    scratch: &mut [Complex<T>],
) -> Result<()> {
    spec[0].im = T::ZERO;
    if out.len().is_multiple_of(2) {
        spec[spec.len() - 1].im = T::ZERO;
    }
    c2r.process_with_scratch(spec, out, scratch).map_err(fft_error)?;
    for (o, &a) in out.iter_mut().zip(a) {
        *o = *o * scale + a;
    }
    Ok(())
}

/// Row-major multi-index of `flat` within `dims`.
fn unravel(mut flat: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for (i, &n) in idx.iter_mut().zip(dims).rev() {
        *i = flat % n;
        flat /= n;
    }
    idx
}

/// Runs `work` on every line of `spec` along dim `d`, a block of neighbouring lines at a time:
/// the block is gathered into one contiguous buffer (line after line), `work` gets it with the
/// index of its first line within its outer block (the flat index over the dims after `d`) and
/// a per-thread state made by `init`, and the block is scattered back.
fn axis_pass<T: Elem, S>(
    spec: &mut [Complex<T>],
    spec_dims: &[usize],
    d: usize,
    init: impl Fn() -> S + Sync + Send,
    work: impl Fn(&mut [Complex<T>], usize, &mut S) + Sync,
) {
    let n = spec_dims[d];
    let stride: usize = spec_dims[d + 1..].iter().product();
    let outer = spec.len() / (n * stride);
    // enough neighbouring lines that each gathered piece fills two cache lines
    let width = (128 / std::mem::size_of::<Complex<T>>()).clamp(1, stride);
    let blocks_per_outer = stride.div_ceil(width);
    let zero = Complex::new(T::ZERO, T::ZERO);
    let base = SharedMut::new(spec);
    (0..outer * blocks_per_outer).into_par_iter().for_each_init(
        || (vec![zero; width * n], init()),
        |(lines, state), task| {
            let (o, j0) = (task / blocks_per_outer, (task % blocks_per_outer) * width);
            let w = width.min(stride - j0);
            let lines = &mut lines[..w * n];
            let start = o * n * stride + j0;
            // SAFETY: this task owns the elements start + k·stride + l (k < n, l < w): the tasks
            // of one outer block cover disjoint ranges j0..j0+w, and outer blocks do not
            // overlap; every such index is below outer·n·stride = spec.len().
            unsafe {
                for k in 0..n {
                    let src = base.ptr().add(start + k * stride);
                    for l in 0..w {
                        lines[l * n + k] = *src.add(l);
                    }
                }
            }
            work(lines, j0, state);
            // SAFETY: as above.
            unsafe {
                for k in 0..n {
                    let dst = base.ptr().add(start + k * stride);
                    for l in 0..w {
                        *dst.add(l) = lines[l * n + k];
                    }
                }
            }
        },
    );
}

/// Buffers for one thread's real transforms of the parts of complex lines.
struct PartsWork<T> {
    re: Vec<T>,
    im: Vec<T>,
    re_spec: Vec<Complex<T>>,
    im_spec: Vec<Complex<T>>,
    scratch: Vec<Complex<T>>,
    weights: Vec<f32>,
}

fn parts_work<T: Elem>(r2c: &dyn RealToComplex<T>, c2r: Option<&dyn ComplexToReal<T>>) -> PartsWork<T> {
    let scratch = r2c.get_scratch_len().max(c2r.map_or(0, |c| c.get_scratch_len()));
    let zero = Complex::new(T::ZERO, T::ZERO);
    PartsWork {
        re: r2c.make_input_vec(),
        im: r2c.make_input_vec(),
        re_spec: r2c.make_output_vec(),
        im_spec: r2c.make_output_vec(),
        scratch: vec![zero; scratch],
        weights: vec![0.0; r2c.len() / 2 + 1],
    }
}

/// Splits a complex line into its real and imaginary parts (conjugating when asked).
#[inline(always)]
fn split<T: Elem>(line: &[Complex<T>], w: &mut PartsWork<T>, conj: bool) {
    for ((r, i), v) in w.re.iter_mut().zip(w.im.iter_mut()).zip(line) {
        *r = v.re;
        *i = if conj { -v.im } else { v.im };
    }
}

/// An unnormalised complex FFT of length `n` (forward, or inverse: `conj(FFT(conj z))`), made
/// of two real FFTs: with `X`, `Y` the spectra of the real and imaginary parts,
/// `FFT(x + iy)_k = X_k + i·Y_k`, where `X_k = conj(X_{n−k})` past the half.
struct ComplexFft<T: Elem> {
    r2c: Arc<dyn RealToComplex<T>>,
    inverse: bool,
}

impl<T: Elem> ComplexFft<T> {
    fn new(planner: &mut RealFftPlanner<T>, n: usize, inverse: bool) -> Self {
        ComplexFft { r2c: planner.plan_fft_forward(n), inverse }
    }

    fn work(&self) -> PartsWork<T> {
        parts_work(&*self.r2c, None)
    }

    /// Transforms each consecutive line of `lines` in place.
    fn process(&self, lines: &mut [Complex<T>], w: &mut PartsWork<T>) {
        let n = self.r2c.len();
        for line in lines.chunks_exact_mut(n) {
            split(line, w, self.inverse);
            let ok = self.r2c.process_with_scratch(&mut w.re, &mut w.re_spec, &mut w.scratch).is_ok()
                & self.r2c.process_with_scratch(&mut w.im, &mut w.im_spec, &mut w.scratch).is_ok();
            debug_assert!(ok, "buffers are sized by the plan");
            for (k, v) in line.iter_mut().enumerate() {
                let (x, y) = if k <= n / 2 {
                    (w.re_spec[k], w.im_spec[k])
                } else {
                    (w.re_spec[n - k].conj(), w.im_spec[n - k].conj())
                };
                let z = Complex::new(x.re - y.im, x.im + y.re);
                *v = if self.inverse { z.conj() } else { z };
            }
        }
    }
}

/// Forward FFT, filter and inverse FFT of lines along dim 0 (of length `n`), through real
/// transforms of their parts (see the module notes): `n/2 + 1` filter weights per line.
struct Dim0Filter<T: Elem> {
    r2c: Arc<dyn RealToComplex<T>>,
    c2r: Arc<dyn ComplexToReal<T>>,
}

impl<T: Elem> Dim0Filter<T> {
    fn new(planner: &mut RealFftPlanner<T>, n: usize) -> Self {
        Dim0Filter { r2c: planner.plan_fft_forward(n), c2r: planner.plan_fft_inverse(n) }
    }

    fn work(&self) -> PartsWork<T> {
        parts_work(&*self.r2c, Some(&*self.c2r))
    }

    /// Filters the consecutive lines of `lines`, the first of which runs through the index
    /// `first` over `rest_dims` (the dims after 0).
    fn process(
        &self,
        lines: &mut [Complex<T>],
        first: usize,
        rest_dims: &[usize],
        filter: &Filter,
        w: &mut PartsWork<T>,
    ) {
        let n = self.r2c.len();
        for (l, line) in lines.chunks_exact_mut(n).enumerate() {
            filter.weights(&unravel(first + l, rest_dims), &mut w.weights);
            split(line, w, false);
            let mut ok = self.r2c.process_with_scratch(&mut w.re, &mut w.re_spec, &mut w.scratch).is_ok()
                & self.r2c.process_with_scratch(&mut w.im, &mut w.im_spec, &mut w.scratch).is_ok();
            for ((x, y), &f) in w.re_spec.iter_mut().zip(w.im_spec.iter_mut()).zip(&w.weights) {
                *x = scaled(*x, f);
                *y = scaled(*y, f);
            }
            ok &= self.c2r.process_with_scratch(&mut w.re_spec, &mut w.re, &mut w.scratch).is_ok()
                & self.c2r.process_with_scratch(&mut w.im_spec, &mut w.im, &mut w.scratch).is_ok();
            debug_assert!(ok, "buffers are sized by the plan, and real input keeps the edge bins real");
            for ((v, &re), &im) in line.iter_mut().zip(&w.re).zip(&w.im) {
                *v = Complex::new(re, im);
            }
        }
    }
}

/// The filter itself, materialised in torch's layout (for tests).
#[cfg(test)]
pub(crate) fn filter_values(spec_dims: &[usize], alpha: f64, tilt: f64) -> Result<Vec<f32>> {
    let f = Filter::new(spec_dims, alpha, tilt)?;
    let rest: usize = spec_dims[1..].iter().product();
    let mut out = vec![0f32; spec_dims.iter().product()];
    let mut line = vec![0f32; spec_dims[0]];
    for r in 0..rest {
        f.weights(&unravel(r, &spec_dims[1..]), &mut line);
        for (k, &v) in line.iter().enumerate() {
            out[k * rest + r] = v;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::testdata::{excess, load, max_abs, values};
    use super::*;

    #[test]
    fn matches_sd_mecha() {
        let fam = load("crossover");
        let mut checked = 0;
        for c in fam.cases() {
            let got = crossover(&c.a, &c.b, c.params[0], c.params[1]);
            let Some(want) = c.expected else {
                assert!(got.is_err(), "{} {:?}: sd-mecha raised, we did not", c.set, c.params);
                continue;
            };
            let got = got.unwrap();
            assert_eq!(got.dims(), c.a.dims());
            assert_eq!(got.dtype(), c.a.dtype());
            let got = values(&got);
            // FFT round trips: errors are absolute, ~ε·log N times the signal's size. In f64,
            // sd-mecha's (1 − f) is rounded to f32 (the filter is float32): ~1e-7 relative.
            let scale = max_abs(&values(&c.a)).max(max_abs(&values(&c.b)));
            let (rel, abs) = if c.set.starts_with("f64") { (1e-6, 1e-7 * scale) } else { (1e-5, 2e-6 * scale) };
            let e = excess(&got, &want, rel, abs);
            assert!(e <= 1.0, "{} {:?}: excess {e}\n got {got:?}\nwant {want:?}", c.set, c.params);
            checked += 1;
        }
        assert!(checked > 50);
    }

    #[test]
    fn filter_matches_create_filter() {
        let fam = load("crossover");
        let filters = fam.json["filters"].as_array().unwrap();
        assert!(!filters.is_empty());
        for f in filters {
            let f = f.as_array().unwrap();
            let shape: Vec<usize> = f[0].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let (alpha, tilt) = (f[1].as_f64().unwrap(), f[2].as_f64().unwrap());
            let n: usize = shape.iter().product();
            let want = fam.flat(candle_core::DType::F32, f[3].as_u64().unwrap() as usize, n);
            let got = filter_values(&shape, alpha, tilt).unwrap();
            let mut mismatches = 0;
            for (g, w) in got.iter().zip(&want) {
                if (*g as f64 - w).abs() > 4e-7 {
                    mismatches += 1;
                }
            }
            assert_eq!(mismatches, 0, "filter {shape:?} alpha={alpha} tilt={tilt}\n got {got:?}\nwant {want:?}");
        }
    }
}

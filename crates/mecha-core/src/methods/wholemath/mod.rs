//! Whole-tensor merge math: the sd-mecha 1.1.8 methods that need a whole tensor at once (global
//! norms, per-column similarities, an n-dimensional FFT, sorting), as pure functions over CPU
//! `candle_core::Tensor`s. Each family mirrors one sd-mecha module:
//!
//! - [`linear_whole`]: `slerp`, `perpendicular_component` (`linear.py`)
//! - [`cosine`]: `add_cosine_a`, `add_cosine_b` (`cosine.py`)
//! - [`mod@crossover`]: `crossover` and its filter (`crossover.py`)
//! - [`slicing`]: `tensor_sum`, `top_k_tensor_sum` (`slicing.py`)
//! - [`ties`]: TIES sums, model stock, the geometric median, DARE/DELLA and `dropout` (`ties.py`)
//! - [`mod@svd`]: the linear algebra of `rotate`, `truncate_rank`, `truncate_kronecker` (`svd.py`, `kronecker.py`)
//!
//! Inputs are F32 or F64 tensors of any rank; results have the shape and dtype of `a`. The math
//! runs on the contiguous data with plain loops: reductions accumulate in f64 over fixed-size
//! chunks (so results do not depend on the thread count), elementwise passes write one new
//! buffer, and large tensors are split across the rayon pool.

pub mod cosine;
pub mod crossover;
pub mod linear_whole;
pub mod slicing;
pub mod svd;
pub mod ties;

pub use cosine::{add_cosine_a, add_cosine_b};
pub use crossover::crossover;
pub use linear_whole::{perpendicular_component, slerp};
pub use slicing::{tensor_sum, top_k_tensor_sum};

use std::fmt::Debug;

use candle_core::{bail, DType, Device, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// Elements per parallel work item, and per partial sum of a reduction. Fixed, so that sums
/// (and therefore results) are the same whatever the number of threads.
pub(crate) const CHUNK: usize = 1 << 16;

/// The element types the methods compute in: f32 and f64.
/// (`abs` comes from `num_traits::Signed`, through [`realfft::FftNum`].)
pub(crate) trait Elem: WithDType + realfft::FftNum {
    const ZERO: Self;
    const ONE: Self;
    const HALF: Self;
    const NAN: Self;
    /// An unsigned integer whose order is the order of the values (see [`Elem::order_key`]).
    type Key: Copy + Ord + Send + Sync + Default + Debug + 'static;

    fn widen(self) -> f64;
    fn narrow(v: f64) -> Self;
    /// The value's bits (f32: in the low half).
    fn raw_bits(self) -> u64;
    fn sin(self) -> Self;
    fn acos(self) -> Self;
    fn fma(self, a: Self, b: Self) -> Self;
    fn is_nan(self) -> bool;
    fn is_finite(self) -> bool;
    /// Key sorting like torch's `sort`: ascending, every NaN last (and equal to each other).
    /// −0 sorts just before +0; [`Elem::tie_key`] makes them equal.
    fn order_key(self) -> Self::Key;
    /// [`Elem::order_key`] with −0 and +0 made equal, for stable argsorts.
    fn tie_key(self) -> Self::Key;
    fn from_order_key(k: Self::Key) -> Self;
    /// The number of first-level buckets of the sorts in [`slicing`].
    const BUCKETS: usize;
    /// A key's first-level bucket: its top bits.
    fn bucket(k: Self::Key) -> usize;
}

macro_rules! impl_elem {
    ($t:ty, $bits:ty, $bucket_bits:expr) => {
        impl Elem for $t {
            const ZERO: $t = 0.0;
            const ONE: $t = 1.0;
            const HALF: $t = 0.5;
            const NAN: $t = <$t>::NAN;
            type Key = $bits;
            const BUCKETS: usize = 1 << $bucket_bits;

            #[inline(always)]
            fn widen(self) -> f64 {
                self as f64
            }

            #[inline(always)]
            fn raw_bits(self) -> u64 {
                self.to_bits() as u64
            }
            #[inline(always)]
            fn narrow(v: f64) -> $t {
                v as $t
            }
            #[inline(always)]
            fn sin(self) -> $t {
                <$t>::sin(self)
            }
            #[inline(always)]
            fn acos(self) -> $t {
                <$t>::acos(self)
            }
            #[inline(always)]
            fn fma(self, a: $t, b: $t) -> $t {
                <$t>::mul_add(self, a, b)
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline(always)]
            fn order_key(self) -> $bits {
                if self.is_nan() {
                    return <$bits>::MAX;
                }
                let bits = self.to_bits();
                let sign = 1 << (<$bits>::BITS - 1);
                if bits & sign != 0 {
                    !bits
                } else {
                    bits | sign
                }
            }
            #[inline(always)]
            fn tie_key(self) -> $bits {
                if self == 0.0 {
                    (0.0 as $t).order_key()
                } else {
                    self.order_key()
                }
            }
            #[inline(always)]
            fn from_order_key(k: $bits) -> $t {
                let sign = 1 << (<$bits>::BITS - 1);
                if k == <$bits>::MAX {
                    <$t>::NAN
                } else if k & sign != 0 {
                    <$t>::from_bits(k & !sign)
                } else {
                    <$t>::from_bits(!k)
                }
            }
            #[inline(always)]
            fn bucket(k: $bits) -> usize {
                (k >> (<$bits>::BITS - $bucket_bits)) as usize
            }
        }
    };
}
impl_elem!(f32, u32, 16);
impl_elem!(f64, u64, 16);

/// Whether the CPU has AVX2 and FMA (then the hot loops run versions compiled for them: torch's
/// fused lerp is then one instruction, and the loops vectorise wider).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Defines `$name`, which runs the `#[inline(always)]` function `$body` (same signature)
/// compiled for AVX2+FMA when the CPU has them. Modules using it import `avx2_fma` too.
macro_rules! simd_variant {
    ($vis:vis fn $name:ident<$($g:ident: $b:path),*>($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $body:ident) => {
        $vis fn $name<$($g: $b),*>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if avx2_fma() {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn simd<$($g: $b),*>($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                // SAFETY: the CPU supports the enabled features (checked just above).
                return unsafe { simd($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use simd_variant;

/// A pointer into a buffer that parallel tasks write at disjoint indices (every use says why
/// they are disjoint).
#[derive(Copy, Clone)]
pub(crate) struct SharedMut<T>(*mut T);
// SAFETY: tasks only access disjoint elements through it, while the buffer outlives them.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub(crate) fn new(buffer: &mut [T]) -> Self {
        SharedMut(buffer.as_mut_ptr())
    }

    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}

/// torch's `lerp`: `a + w·(b−a)` for |w| < ½, else `b − (1−w)·(b−a)`, fused as in its
/// vectorised CPU kernel.
#[inline(always)]
pub(crate) fn lerp<T: Elem>(a: T, b: T, w: T) -> T {
    let diff = b - a;
    if w.abs() < T::HALF {
        w.fma(diff, a)
    } else {
        (w - T::ONE).fma(diff, b)
    }
}

/// Brings `t` to a contiguous CPU tensor of dtype `dtype`.
fn prepare(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let mut t = t.clone();
    if !t.device().is_cpu() {
        t = t.to_device(&Device::Cpu)?;
    }
    if t.dtype() != dtype {
        t = t.to_dtype(dtype)?;
    }
    if !t.is_contiguous() {
        t = t.contiguous()?;
    }
    Ok(t)
}

/// The element slice of a contiguous CPU tensor.
fn with_slice<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { bail!("whole-tensor math expects a CPU tensor") };
    let start = layout.start_offset();
    let data = cpu.as_slice::<T>()?;
    f(&data[start..start + t.elem_count()])
}

/// The values of `t` in f64, in row-major order (one allocation, filled as it is converted).
pub(crate) fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    match t.dtype() {
        DType::F64 => with_slice::<f64, _>(&prepare(t, DType::F64)?, |x| Ok(x.to_vec())),
        _ => with_slice::<f32, _>(&prepare(t, DType::F32)?, |x| Ok(x.iter().map(|&v| f64::from(v)).collect())),
    }
}

/// `f` of the values of `t` as `T` (converted only when `t` is not already a contiguous CPU
/// tensor of that dtype).
pub(crate) fn with_data<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    with_slice::<T, R>(&prepare(t, T::DTYPE)?, f)
}

/// What a method computes from the data of `a` and `b` (same shape, dtype of `a`).
pub(crate) trait Kernel2 {
    fn run<T: Elem>(&self, a: &[T], b: &[T], dims: &[usize]) -> Result<Vec<T>>;
}

/// Checks and prepares `a` and `b`, runs `k` on their data in `a`'s dtype and wraps the result
/// in a tensor of `a`'s shape, dtype and device.
pub(crate) fn apply2(name: &str, a: &Tensor, b: &Tensor, k: &impl Kernel2) -> Result<Tensor> {
    if a.dims() != b.dims() {
        bail!("{name}: a has shape {:?} but b has shape {:?}", a.dims(), b.dims());
    }
    let dtype = a.dtype();
    let (pa, pb) = (prepare(a, dtype)?, prepare(b, dtype)?);
    let dims = a.dims().to_vec();
    let out = match dtype {
        DType::F32 => {
            let v = with_slice::<f32, _>(&pa, |x| with_slice::<f32, _>(&pb, |y| k.run(x, y, &dims)))?;
            Tensor::from_vec(v, dims, &Device::Cpu)?
        }
        DType::F64 => {
            let v = with_slice::<f64, _>(&pa, |x| with_slice::<f64, _>(&pb, |y| k.run(x, y, &dims)))?;
            Tensor::from_vec(v, dims, &Device::Cpu)?
        }
        other => bail!("{name}: expects f32 or f64 tensors, got {other:?}"),
    };
    if a.device().is_cpu() {
        Ok(out)
    } else {
        out.to_device(a.device())
    }
}

/// `b` as a tensor with `a`'s dtype and device (for the shortcuts that return `b` itself).
pub(crate) fn like_a(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mut b = b.clone();
    if b.dtype() != a.dtype() {
        b = b.to_dtype(a.dtype())?;
    }
    if !b.device().same_device(a.device()) {
        b = b.to_device(a.device())?;
    }
    Ok(b)
}

/// `out[i] = f(a[i], b[i])` into a new buffer, in parallel chunks; also tells whether any
/// result is NaN.
pub(crate) fn map2<T: Elem, F: Fn(T, T) -> T + Sync>(a: &[T], b: &[T], f: F) -> (Vec<T>, bool) {
    let mut out = vec![T::ZERO; a.len()];
    let nan = out
        .par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .map(|(o, (a, b))| map_chunk(o, a, b, &f))
        .reduce(|| false, |x, y| x | y);
    (out, nan)
}

simd_variant!(fn map_chunk<T: Elem, F: Fn(T, T) -> T>(o: &mut [T], a: &[T], b: &[T], f: &F) -> bool = map_chunk_body);

#[inline(always)]
fn map_chunk_body<T: Elem, F: Fn(T, T) -> T>(o: &mut [T], a: &[T], b: &[T], f: &F) -> bool {
    let mut nan = false;
    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
        let r = f(a, b);
        nan |= r.is_nan();
        *o = r;
    }
    nan
}

/// Σa², Σb² and Σab, accumulated in f64 per fixed chunk and summed in chunk order.
pub(crate) fn sums<T: Elem>(a: &[T], b: &[T]) -> [f64; 3] {
    let parts: Vec<[f64; 3]> = a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)).map(|(a, b)| chunk_sums(a, b)).collect();
    parts.iter().fold([0.0; 3], |acc, p| [acc[0] + p[0], acc[1] + p[1], acc[2] + p[2]])
}

simd_variant!(fn chunk_sums<T: Elem>(a: &[T], b: &[T]) -> [f64; 3] = chunk_sums_body);

/// Σa², Σb², Σab of one chunk, in eight independent lanes so the loop vectorises.
#[inline(always)]
fn chunk_sums_body<T: Elem>(a: &[T], b: &[T]) -> [f64; 3] {
    const L: usize = 8;
    let (mut aa, mut bb, mut ab) = ([0f64; L], [0f64; L], [0f64; L]);
    let mut lanes = |x: &[T], y: &[T]| {
        for l in 0..x.len().min(L) {
            let (x, y) = (x[l].widen(), y[l].widen());
            aa[l] += x * x;
            bb[l] += y * y;
            ab[l] += x * y;
        }
    };
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        let (x, y): (&[T; L], &[T; L]) = (x.try_into().unwrap(), y.try_into().unwrap());
        lanes(x, y);
    }
    lanes(ar, br);
    let total = |v: [f64; L]| ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    [total(aa), total(bb), total(ab)]
}

/// The `kth` smallest (1-based) of `key(x)` over `x`, without sorting or copying the data:
/// a histogram of the keys' first-level buckets finds the bucket that holds it, then only that
/// bucket's keys are selected from. Two linear passes, parallel over chunks.
pub(crate) fn kth_smallest_key<T: Elem>(x: &[T], kth: usize, key: impl Fn(T) -> T::Key + Sync) -> T::Key {
    assert!((1..=x.len()).contains(&kth), "kth {kth} of {} values", x.len());
    let chunk = (x.len() / rayon::current_num_threads().max(1)).clamp(1 << 16, 1 << 22);
    let histogram = x
        .par_chunks(chunk)
        .map(|c| {
            let mut h = vec![0usize; T::BUCKETS];
            c.iter().for_each(|&v| h[T::bucket(key(v))] += 1);
            h
        })
        .reduce(
            || vec![0usize; T::BUCKETS],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        );
    let (mut bucket, mut before) = (0, 0);
    while before + histogram[bucket] < kth {
        before += histogram[bucket];
        bucket += 1;
    }
    let mut inside: Vec<T::Key> = x
        .par_chunks(chunk)
        .flat_map_iter(|c| c.iter().map(|&v| key(v)).filter(|&k| T::bucket(k) == bucket).collect::<Vec<_>>())
        .collect();
    *inside.select_nth_unstable(kth - before - 1).1
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    #[test]
    fn kth_smallest_key_is_the_kth_of_a_sort() {
        // duplicates, both zeros, NaN, a wide range: every first-level bucket case
        let mut x: Vec<f32> = (0..300_000).map(|i| ((i * 7919) % 1000) as f32 * 0.37 - 150.0).collect();
        x.extend([0.0, -0.0, f32::NAN, f32::INFINITY, 1e-30, -1e30]);
        let mut sorted: Vec<u32> = x.iter().map(|v| v.abs().order_key()).collect();
        sorted.sort_unstable();
        for kth in [1, 2, 1000, 150_000, 299_999, x.len() - 1, x.len()] {
            assert_eq!(kth_smallest_key(&x, kth, |v| v.abs().order_key()), sorted[kth - 1], "kth {kth}");
        }
    }

    /// Deterministic pseudo-random normals.
    pub(crate) fn normals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut uniform = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n).map(|_| ((-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos()) as f32).collect()
    }

    fn pair(dims: &[usize], seed: u64) -> (Tensor, Tensor) {
        let n = dims.iter().product();
        let a = Tensor::from_vec(normals(n, seed), dims, &Device::Cpu).unwrap();
        let b = Tensor::from_vec(normals(n, seed + 1), dims, &Device::Cpu).unwrap();
        (a, b)
    }

    fn bits(t: &Tensor) -> Vec<u64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    type Method = fn(&Tensor, &Tensor) -> Result<Tensor>;
    const METHODS: [Method; 7] = [
        |a, b| slerp(a, b, 0.3),
        perpendicular_component,
        |a, b| add_cosine_a(a, b, 0.3),
        |a, b| add_cosine_b(a, b, 0.3),
        |a, b| crossover(a, b, 0.3, 0.5),
        |a, b| tensor_sum(a, b, 0.3, 0.2),
        |a, b| top_k_tensor_sum(a, b, 0.3, 0.2),
    ];

    #[test]
    fn inputs_are_made_contiguous_and_of_a_s_dtype() {
        let (a, b) = pair(&[6, 5, 4], 1);
        let (at, bt) = (a.transpose(0, 2).unwrap(), b.transpose(0, 2).unwrap());
        assert!(!at.is_contiguous());
        let (ac, bc) = (at.contiguous().unwrap(), bt.contiguous().unwrap());
        for m in METHODS {
            let got = m(&at, &bt.to_dtype(DType::F64).unwrap()).unwrap();
            assert_eq!((got.dims(), got.dtype()), (ac.dims(), DType::F32));
            assert_eq!(bits(&got), bits(&m(&ac, &bc).unwrap()));
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (a, b) = pair(&[6, 5], 2);
        for m in METHODS {
            assert!(m(&a, &b.reshape((5, 6)).unwrap()).is_err());
            assert!(m(&a.to_dtype(DType::F16).unwrap(), &b.to_dtype(DType::F16).unwrap()).is_err());
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        // several chunks, long FFT lines, many buckets
        let (a, b) = pair(&[700, 300], 3);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| METHODS.map(|m| bits(&m(&a, &b).unwrap())))
        };
        assert!(run(1) == run(3));
    }
}

#[cfg(test)]
pub(crate) mod testdata {
    //! Reference cases produced by sd-mecha 1.1.8 (see `tests/data/wholemath/README.md`).
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use serde_json::Value;

    pub struct Family {
        pub tensors: HashMap<String, Tensor>,
        pub json: Value,
    }

    pub fn load(name: &str) -> Family {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/wholemath");
        let bytes = std::fs::read(dir.join(format!("{name}.safetensors"))).unwrap();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        let json = serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap()).unwrap();
        Family { tensors, json }
    }

    /// One sd-mecha call: its function, inputs, parameters (NaN where JSON has null) and output
    /// (`None` when sd-mecha raised).
    pub struct Case {
        pub func: String,
        pub set: String,
        pub a: Tensor,
        pub b: Tensor,
        pub params: Vec<f64>,
        pub expected: Option<Vec<f64>>,
    }

    impl Family {
        pub fn flat(&self, dtype: DType, offset: usize, len: usize) -> Vec<f64> {
            let name = if dtype == DType::F32 { "out/f32" } else { "out/f64" };
            let t = self.tensors[name].to_dtype(DType::F64).unwrap();
            t.narrow(0, offset, len).unwrap().to_vec1::<f64>().unwrap()
        }

        pub fn cases(&self) -> Vec<Case> {
            let mut out = Vec::new();
            for c in self.json["cases"].as_array().unwrap() {
                let c = c.as_array().unwrap();
                let set = c[1].as_str().unwrap().to_string();
                let a = self.tensors[&format!("in/{set}/a")].clone();
                let b = self.tensors[&format!("in/{set}/b")].clone();
                let n = a.elem_count();
                let params = c[2].as_array().unwrap().iter().map(|p| p.as_f64().unwrap_or(f64::NAN)).collect();
                let expected = c[3].as_u64().map(|o| self.flat(a.dtype(), o as usize, n));
                out.push(Case { func: c[0].as_str().unwrap().to_string(), set, a, b, params, expected });
            }
            out
        }
    }

    pub fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
    }

    /// The largest |got − want| / (rel·|want| + abs), NaN matching NaN and infinities matching
    /// exactly; a result ≤ 1 passes.
    pub fn excess(got: &[f64], want: &[f64], rel: f64, abs: f64) -> f64 {
        assert_eq!(got.len(), want.len());
        let mut worst = 0f64;
        for (&g, &w) in got.iter().zip(want) {
            let e = if g.is_nan() || w.is_nan() {
                if g.is_nan() && w.is_nan() {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else if g.is_infinite() || w.is_infinite() {
                if g == w {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                (g - w).abs() / (rel * w.abs() + abs)
            };
            worst = worst.max(e);
        }
        worst
    }

    pub fn max_abs(v: &[f64]) -> f64 {
        v.iter().filter(|x| x.is_finite()).fold(0f64, |m, x| m.max(x.abs()))
    }
}

//! Numeric building blocks: dtype conversion and chunked elementwise evaluation.

pub mod convert;
pub mod tensor;

use std::fmt::Debug;
use std::ops::{Add, Div, Mul, Neg, Sub};

use crate::dtype::DType;

/// A compute type: f32 (the default) or f64.
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + Debug
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    const HALF: Self;
    /// The largest finite value.
    const MAX: Self;
    const NAN: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn abs(self) -> Self;
    fn is_nan(self) -> bool;
    fn mul_add(self, a: Self, b: Self) -> Self;
    fn powf(self, p: Self) -> Self;
    fn ln(self) -> Self;
    fn cos(self) -> Self;
    fn sqrt(self) -> Self;
    fn decode(dtype: DType, src: &[u8], out: &mut [Self]);
    fn encode(dtype: DType, src: &[Self], out: &mut [u8]);
    /// The values as f32 (borrowed when they already are).
    fn to_f32(values: &[Self]) -> std::borrow::Cow<'_, [f32]>;
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    const HALF: f32 = 0.5;
    const MAX: f32 = f32::MAX;
    const NAN: f32 = f32::NAN;
    #[inline(always)]
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn abs(self) -> f32 {
        f32::abs(self)
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    #[inline(always)]
    fn mul_add(self, a: f32, b: f32) -> f32 {
        f32::mul_add(self, a, b)
    }
    #[inline(always)]
    fn powf(self, p: f32) -> f32 {
        f32::powf(self, p)
    }
    #[inline(always)]
    fn ln(self) -> f32 {
        f32::ln(self)
    }
    #[inline(always)]
    fn cos(self) -> f32 {
        f32::cos(self)
    }
    #[inline(always)]
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
    fn decode(dtype: DType, src: &[u8], out: &mut [f32]) {
        convert::decode_f32(dtype, src, out)
    }
    fn encode(dtype: DType, src: &[f32], out: &mut [u8]) {
        convert::encode_f32(dtype, src, out)
    }
    fn to_f32(values: &[f32]) -> std::borrow::Cow<'_, [f32]> {
        std::borrow::Cow::Borrowed(values)
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    const HALF: f64 = 0.5;
    const MAX: f64 = f64::MAX;
    const NAN: f64 = f64::NAN;
    #[inline(always)]
    fn from_f64(v: f64) -> f64 {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn abs(self) -> f64 {
        f64::abs(self)
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    #[inline(always)]
    fn mul_add(self, a: f64, b: f64) -> f64 {
        f64::mul_add(self, a, b)
    }
    #[inline(always)]
    fn powf(self, p: f64) -> f64 {
        f64::powf(self, p)
    }
    #[inline(always)]
    fn ln(self) -> f64 {
        f64::ln(self)
    }
    #[inline(always)]
    fn cos(self) -> f64 {
        f64::cos(self)
    }
    #[inline(always)]
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
    fn decode(dtype: DType, src: &[u8], out: &mut [f64]) {
        convert::decode_f64(dtype, src, out)
    }
    fn encode(dtype: DType, src: &[f64], out: &mut [u8]) {
        convert::encode_f64(dtype, src, out)
    }
    fn to_f32(values: &[f64]) -> std::borrow::Cow<'_, [f32]> {
        std::borrow::Cow::Owned(values.iter().map(|&v| v as f32).collect())
    }
}

/// One input of an elementwise kernel over a chunk: a broadcast scalar or the chunk's values.
#[derive(Copy, Clone, Debug)]
pub enum Operand<'a, T> {
    Scalar(T),
    Slice(&'a [T]),
}

impl<T: Real> Operand<'_, T> {
    pub fn scalar(&self) -> Option<T> {
        match self {
            Operand::Scalar(v) => Some(*v),
            Operand::Slice(_) => None,
        }
    }
}

/// `out[i] = f(a[i], b[i])`, with scalars broadcast. One loop per scalar/slice combination so
/// each compiles to straight-line vector code.
#[inline(always)]
pub fn map2<T: Real>(out: &mut [T], a: Operand<T>, b: Operand<T>, f: impl Fn(T, T) -> T) {
    use Operand::*;
    match (a, b) {
        (Slice(a), Slice(b)) => {
            for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
                *o = f(*a, *b);
            }
        }
        (Slice(a), Scalar(b)) => {
            for (o, a) in out.iter_mut().zip(a) {
                *o = f(*a, b);
            }
        }
        (Scalar(a), Slice(b)) => {
            for (o, b) in out.iter_mut().zip(b) {
                *o = f(a, *b);
            }
        }
        (Scalar(a), Scalar(b)) => out.fill(f(a, b)),
    }
}

/// `out[i] = f(a[i], b[i], c[i])`, with scalars broadcast.
#[inline(always)]
pub fn map3<T: Real>(out: &mut [T], a: Operand<T>, b: Operand<T>, c: Operand<T>, f: impl Fn(T, T, T) -> T) {
    use Operand::*;
    match c {
        Scalar(c) => map2(out, a, b, |a, b| f(a, b, c)),
        Slice(c) => match (a, b) {
            (Slice(a), Slice(b)) => {
                for (((o, a), b), c) in out.iter_mut().zip(a).zip(b).zip(c) {
                    *o = f(*a, *b, *c);
                }
            }
            (Slice(a), Scalar(b)) => {
                for ((o, a), c) in out.iter_mut().zip(a).zip(c) {
                    *o = f(*a, b, *c);
                }
            }
            (Scalar(a), Slice(b)) => {
                for ((o, b), c) in out.iter_mut().zip(b).zip(c) {
                    *o = f(a, *b, *c);
                }
            }
            (Scalar(a), Scalar(b)) => {
                for (o, c) in out.iter_mut().zip(c) {
                    *o = f(a, b, *c);
                }
            }
        },
    }
}

/// Whether kernels can run their AVX2+FMA versions on this CPU.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("MECHA_NO_SIMD").is_none()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
    })
}

/// torch's `lerp`: `a + w·(b−a)` for |w| < ½, `b − (1−w)·(b−a)` otherwise, fused like its
/// vectorised CPU kernel, so results match torch bit for bit.
#[inline(always)]
pub fn lerp<T: Real>(a: T, b: T, w: T) -> T {
    let diff = b - a;
    if w.abs() < T::HALF {
        w.mul_add(diff, a)
    } else {
        (w - T::ONE).mul_add(diff, b)
    }
}

//! Conversion between stored dtypes and the compute types (f32, f64).
//!
//! f16 uses F16C (with AVX) when the CPU has it, detected at run time; every other path is
//! portable code written so the compiler vectorises it. The scalar f16 routines are the
//! reference the SIMD path is tested against.

use crate::dtype::DType;

// ---------------------------------------------------------------------------------------------
// f16

/// Decodes little-endian f16 bytes into f32. `src.len() == 2 * out.len()`.
pub fn f16_to_f32(src: &[u8], out: &mut [f32]) {
    debug_assert_eq!(src.len(), out.len() * 2);
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: the CPU supports the enabled features (checked above).
        unsafe { x86::f16_to_f32(src, out) };
        return;
    }
    f16_to_f32_scalar(src, out);
}

/// Encodes f32 into little-endian f16 bytes with round-to-nearest-even (IEEE, like torch).
pub fn f32_to_f16(src: &[f32], out: &mut [u8]) {
    debug_assert_eq!(out.len(), src.len() * 2);
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: the CPU supports the enabled features (checked above).
        unsafe { x86::f32_to_f16(src, out) };
        return;
    }
    f32_to_f16_scalar(src, out);
}

pub fn f16_to_f32_scalar(src: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
        *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32_const();
    }
}

pub fn f32_to_f16_scalar(src: &[f32], out: &mut [u8]) {
    for (s, o) in src.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&half::f16::from_f32_const(*s).to_bits().to_le_bytes());
    }
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("MECHA_NO_SIMD").is_none()
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("avx")
    })
}

/// Which f16 conversion path this process uses, for reports and benchmarks.
pub fn f16_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        return "f16c";
    }
    "scalar"
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn f16_to_f32(src: &[u8], out: &mut [f32]) {
        let n = out.len();
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        super::f16_to_f32_scalar(&src[2 * i..], &mut out[i..]);
    }

    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn f32_to_f16(src: &[f32], out: &mut [u8]) {
        let n = src.len();
        let mut i = 0;
        while i + 8 <= n {
            let f = _mm256_loadu_ps(src.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(f);
            _mm_storeu_si128(out.as_mut_ptr().add(2 * i) as *mut __m128i, h);
            i += 8;
        }
        super::f32_to_f16_scalar(&src[i..], &mut out[2 * i..]);
    }
}

// ---------------------------------------------------------------------------------------------
// bf16: plain bit manipulation that the compiler vectorises.

pub fn bf16_to_f32(src: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
        *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
}

/// Round-to-nearest-even, NaN becomes the canonical quiet NaN `0x7FC0` (what torch writes).
#[inline(always)]
pub fn bf16_from_f32_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        0x7FC0
    } else {
        let bias = ((bits >> 16) & 1) + 0x7FFF;
        (bits.wrapping_add(bias) >> 16) as u16
    }
}

pub fn f32_to_bf16(src: &[f32], out: &mut [u8]) {
    for (s, o) in src.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&bf16_from_f32_bits(*s).to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// 8-bit floats: decoded through a table, encoded with a generic small-float rounder.

/// Layout of a small float format.
#[derive(Copy, Clone)]
struct MiniFloat {
    exp_bits: u32,
    man_bits: u32,
    bias: i32,
    /// IEEE-style: the top exponent encodes inf/NaN.
    ieee_special: bool,
    /// "fnuz": no negative zero, 0x80 is the only NaN, no inf.
    fnuz: bool,
    /// Overflow saturates to NaN (e4m3fn, like torch) rather than inf.
    overflow_to_nan: bool,
}

const E4M3FN: MiniFloat =
    MiniFloat { exp_bits: 4, man_bits: 3, bias: 7, ieee_special: false, fnuz: false, overflow_to_nan: true };
const E5M2: MiniFloat =
    MiniFloat { exp_bits: 5, man_bits: 2, bias: 15, ieee_special: true, fnuz: false, overflow_to_nan: false };
const E4M3FNUZ: MiniFloat =
    MiniFloat { exp_bits: 4, man_bits: 3, bias: 8, ieee_special: false, fnuz: true, overflow_to_nan: true };
const E5M2FNUZ: MiniFloat =
    MiniFloat { exp_bits: 5, man_bits: 2, bias: 16, ieee_special: false, fnuz: true, overflow_to_nan: true };

impl MiniFloat {
    fn decode(self, byte: u8) -> f32 {
        let sign = if byte & 0x80 != 0 { -1.0f64 } else { 1.0 };
        let e = ((byte as u32) >> self.man_bits) & ((1 << self.exp_bits) - 1);
        let m = (byte as u32) & ((1 << self.man_bits) - 1);
        let top = (1 << self.exp_bits) - 1;
        if self.fnuz && byte == 0x80 {
            return f32::NAN;
        }
        if self.ieee_special && e == top {
            return if m == 0 { (sign * f64::INFINITY) as f32 } else { f32::NAN };
        }
        if !self.ieee_special && !self.fnuz && e == top && m == (1 << self.man_bits) - 1 {
            return f32::NAN; // e4m3fn: S.1111.111
        }
        let frac = m as f64 / (1u32 << self.man_bits) as f64;
        let v = if e == 0 { frac * 2f64.powi(1 - self.bias) } else { (1.0 + frac) * 2f64.powi(e as i32 - self.bias) };
        (sign * v) as f32
    }

    fn nan_code(self, negative: bool) -> u8 {
        if self.fnuz {
            0x80
        } else {
            let all = (1u8 << (self.exp_bits + self.man_bits)) - 1;
            all | if negative { 0x80 } else { 0 }
        }
    }

    fn max_finite(self) -> f64 {
        let top = (1i32 << self.exp_bits) - 1;
        let (e, m) = if self.ieee_special {
            (top - 1, (1u32 << self.man_bits) - 1)
        } else if self.fnuz {
            (top, (1u32 << self.man_bits) - 1)
        } else {
            (top, (1u32 << self.man_bits) - 2) // all-ones mantissa is NaN
        };
        (1.0 + m as f64 / (1u32 << self.man_bits) as f64) * 2f64.powi(e - self.bias)
    }

    fn encode(self, x: f32) -> u8 {
        let negative = x.is_sign_negative();
        let sign = if negative { 0x80u8 } else { 0 };
        if x.is_nan() {
            return self.nan_code(negative);
        }
        let a = (x as f64).abs();
        let min_normal_exp = 1 - self.bias;
        let exp = if a == 0.0 { min_normal_exp } else { (a.log2().floor() as i32).max(min_normal_exp) };
        // Quantum at this magnitude; a / quantum is exact since quantum is a power of two.
        let quantum = 2f64.powi(exp - self.man_bits as i32);
        let rounded = (a / quantum).round_ties_even() * quantum;
        if rounded > self.max_finite() || x.is_infinite() {
            return if self.overflow_to_nan {
                self.nan_code(negative)
            } else {
                sign | (((1u8 << self.exp_bits) - 1) << self.man_bits) // inf
            };
        }
        if rounded == 0.0 {
            return if self.fnuz { 0 } else { sign };
        }
        let one = 1u32 << self.man_bits;
        let units = (rounded / 2f64.powi(min_normal_exp - self.man_bits as i32)) as u32;
        let code = if units < one {
            units // subnormal
        } else {
            let e = rounded.log2().floor() as i32;
            let m = (rounded / 2f64.powi(e - self.man_bits as i32)) as u32 - one;
            (((e + self.bias) as u32) << self.man_bits) | m
        };
        sign | code as u8
    }
}

fn table(format: MiniFloat) -> [f32; 256] {
    std::array::from_fn(|b| format.decode(b as u8))
}

fn e8m0_decode(byte: u8) -> f32 {
    if byte == 0xFF {
        f32::NAN
    } else {
        2f32.powi(byte as i32 - 127)
    }
}

/// Rounds to the nearest power of two (in linear distance, ties upward); NaN, non-positive
/// values and overflow map to the NaN code 0xFF, as the format has no sign and no zero.
fn e8m0_encode(x: f32) -> u8 {
    if x.is_nan() || x <= 0.0 || x.is_infinite() {
        return 0xFF;
    }
    let e = (x as f64).log2().floor() as i32;
    let lower = 2f64.powi(e);
    let e = if x as f64 >= 1.5 * lower { e + 1 } else { e };
    (e + 127).clamp(0, 254) as u8
}

struct Tables {
    e4m3fn: [f32; 256],
    e5m2: [f32; 256],
    e4m3fnuz: [f32; 256],
    e5m2fnuz: [f32; 256],
    e8m0: [f32; 256],
}

fn tables() -> &'static Tables {
    static TABLES: std::sync::OnceLock<Tables> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| Tables {
        e4m3fn: table(E4M3FN),
        e5m2: table(E5M2),
        e4m3fnuz: table(E4M3FNUZ),
        e5m2fnuz: table(E5M2FNUZ),
        e8m0: std::array::from_fn(|b| e8m0_decode(b as u8)),
    })
}

fn mini_float(dtype: DType) -> Option<MiniFloat> {
    match dtype {
        DType::F8E4M3 => Some(E4M3FN),
        DType::F8E5M2 => Some(E5M2),
        DType::F8E4M3Fnuz => Some(E4M3FNUZ),
        DType::F8E5M2Fnuz => Some(E5M2FNUZ),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch over every numeric dtype.

macro_rules! decode_le {
    ($src:expr, $out:expr, $t:ty, $conv:expr) => {{
        const W: usize = std::mem::size_of::<$t>();
        for (o, b) in $out.iter_mut().zip($src.chunks_exact(W)) {
            let v = <$t>::from_le_bytes(b.try_into().expect("exact chunk"));
            *o = $conv(v);
        }
    }};
}

macro_rules! encode_le {
    ($src:expr, $out:expr, $t:ty, $conv:expr) => {{
        const W: usize = std::mem::size_of::<$t>();
        for (s, o) in $src.iter().zip($out.chunks_exact_mut(W)) {
            let v: $t = $conv(*s);
            o.copy_from_slice(&v.to_le_bytes());
        }
    }};
}

/// Decodes `out.len()` elements of `dtype` from `src` into f32.
/// Panics on dtypes without a numeric decoding; the planner rejects those beforehand.
pub fn decode_f32(dtype: DType, src: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F16 => f16_to_f32(src, out),
        DType::BF16 => bf16_to_f32(src, out),
        DType::F32 => decode_le!(src, out, f32, |v| v),
        DType::F64 => decode_le!(src, out, f64, |v| v as f32),
        DType::F8E4M3 | DType::F8E5M2 | DType::F8E4M3Fnuz | DType::F8E5M2Fnuz | DType::F8E8M0 => {
            let t = tables();
            let lut = match dtype {
                DType::F8E4M3 => &t.e4m3fn,
                DType::F8E5M2 => &t.e5m2,
                DType::F8E4M3Fnuz => &t.e4m3fnuz,
                DType::F8E5M2Fnuz => &t.e5m2fnuz,
                _ => &t.e8m0,
            };
            for (o, b) in out.iter_mut().zip(src) {
                *o = lut[*b as usize];
            }
        }
        DType::Bool => decode_le!(src, out, u8, |v: u8| (v != 0) as u8 as f32),
        DType::U8 => decode_le!(src, out, u8, |v| v as f32),
        DType::I8 => decode_le!(src, out, i8, |v| v as f32),
        DType::I16 => decode_le!(src, out, i16, |v| v as f32),
        DType::U16 => decode_le!(src, out, u16, |v| v as f32),
        DType::I32 => decode_le!(src, out, i32, |v| v as f32),
        DType::U32 => decode_le!(src, out, u32, |v| v as f32),
        DType::I64 => decode_le!(src, out, i64, |v| v as f32),
        DType::U64 => decode_le!(src, out, u64, |v| v as f32),
        DType::C64 | DType::F4 | DType::F6E2M3 | DType::F6E3M2 => {
            panic!("{dtype} has no numeric decoding")
        }
    }
}

/// Decodes into f64. Integers and f64 convert exactly; narrower floats widen exactly.
pub fn decode_f64(dtype: DType, src: &[u8], out: &mut [f64]) {
    match dtype {
        DType::F64 => decode_le!(src, out, f64, |v| v),
        DType::I64 => decode_le!(src, out, i64, |v| v as f64),
        DType::U64 => decode_le!(src, out, u64, |v| v as f64),
        DType::I32 => decode_le!(src, out, i32, |v| v as f64),
        DType::U32 => decode_le!(src, out, u32, |v| v as f64),
        _ => {
            let width = dtype.bits() / 8;
            let mut block = [0f32; 1024];
            for (o, s) in out.chunks_mut(1024).zip(src.chunks(1024 * width)) {
                let b = &mut block[..o.len()];
                decode_f32(dtype, s, b);
                for (x, y) in o.iter_mut().zip(b.iter()) {
                    *x = *y as f64;
                }
            }
        }
    }
}

/// Rounds a real number for an integer dtype: to nearest, ties to even, saturating (NaN → 0).
#[inline(always)]
fn round_int(v: f64) -> f64 {
    v.round_ties_even()
}

/// Encodes f32 values as `dtype`.
pub fn encode_f32(dtype: DType, src: &[f32], out: &mut [u8]) {
    match dtype {
        DType::F16 => f32_to_f16(src, out),
        DType::BF16 => f32_to_bf16(src, out),
        DType::F32 => encode_le!(src, out, f32, |v| v),
        DType::F64 => encode_le!(src, out, f64, |v: f32| v as f64),
        _ => {
            let mut block = [0f64; 1024];
            let width = dtype.bits() / 8;
            for (s, o) in src.chunks(1024).zip(out.chunks_mut(1024 * width)) {
                let b = &mut block[..s.len()];
                for (x, y) in b.iter_mut().zip(s) {
                    *x = *y as f64;
                }
                encode_f64(dtype, b, o);
            }
        }
    }
}

/// Encodes f64 values as `dtype`.
pub fn encode_f64(dtype: DType, src: &[f64], out: &mut [u8]) {
    match dtype {
        DType::F64 => encode_le!(src, out, f64, |v| v),
        DType::F32 => encode_le!(src, out, f32, |v: f64| v as f32),
        DType::F16 => {
            // f64 → f32 first can double-round; go through half's direct f64 conversion.
            for (s, o) in src.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&half::f16::from_f64_const(*s).to_bits().to_le_bytes());
            }
        }
        DType::BF16 => {
            for (s, o) in src.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&half::bf16::from_f64_const(*s).to_bits().to_le_bytes());
            }
        }
        DType::F8E4M3 | DType::F8E5M2 | DType::F8E4M3Fnuz | DType::F8E5M2Fnuz => {
            let format = mini_float(dtype).expect("listed above");
            for (s, o) in src.iter().zip(out.iter_mut()) {
                *o = format.encode(*s as f32);
            }
        }
        DType::F8E8M0 => {
            for (s, o) in src.iter().zip(out.iter_mut()) {
                *o = e8m0_encode(*s as f32);
            }
        }
        DType::Bool => encode_le!(src, out, u8, |v: f64| (v != 0.0) as u8),
        DType::U8 => encode_le!(src, out, u8, |v: f64| round_int(v) as u8),
        DType::I8 => encode_le!(src, out, i8, |v: f64| round_int(v) as i8),
        DType::I16 => encode_le!(src, out, i16, |v: f64| round_int(v) as i16),
        DType::U16 => encode_le!(src, out, u16, |v: f64| round_int(v) as u16),
        DType::I32 => encode_le!(src, out, i32, |v: f64| round_int(v) as i32),
        DType::U32 => encode_le!(src, out, u32, |v: f64| round_int(v) as u32),
        DType::I64 => encode_le!(src, out, i64, |v: f64| round_int(v) as i64),
        DType::U64 => encode_le!(src, out, u64, |v: f64| round_int(v) as u64),
        DType::C64 | DType::F4 | DType::F6E2M3 | DType::F6E3M2 => {
            panic!("{dtype} has no numeric encoding")
        }
    }
}

/// Whether stored values of a float dtype include NaN or an infinity (integers never do). Works
/// on the raw bytes, so copied tensors are checked without decoding them. The scans fold with
/// `|` rather than stopping early so the compiler vectorises them: they run over every input.
pub fn has_non_finite(dtype: DType, bytes: &[u8]) -> bool {
    // An all-ones exponent means NaN or infinity in the IEEE-style formats.
    fn scan<const W: usize>(bytes: &[u8], mask: u64) -> bool {
        bytes.chunks_exact(W).fold(false, |found, c| {
            let mut b = [0u8; 8];
            b[..W].copy_from_slice(c);
            found | (u64::from_le_bytes(b) & mask == mask)
        })
    }
    let bytes_with = |f: fn(u8) -> bool| bytes.iter().fold(false, |found, &b| found | f(b));
    match dtype {
        DType::F16 => scan::<2>(bytes, 0x7C00),
        DType::BF16 => scan::<2>(bytes, 0x7F80),
        DType::F32 => scan::<4>(bytes, 0x7F80_0000),
        DType::F64 => scan::<8>(bytes, 0x7FF0_0000_0000_0000),
        DType::F8E4M3 => bytes_with(|b| b & 0x7F == 0x7F),
        DType::F8E5M2 => bytes_with(|b| b & 0x7C == 0x7C),
        DType::F8E4M3Fnuz | DType::F8E5M2Fnuz => bytes_with(|b| b == 0x80),
        DType::F8E8M0 => bytes_with(|b| b == 0xFF),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same_bits_or_both_nan(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn f16_decode_simd_matches_scalar_for_every_value() {
        let src: Vec<u8> = (0..=u16::MAX).flat_map(|v| v.to_le_bytes()).collect();
        let mut fast = vec![0f32; 65536];
        let mut slow = vec![0f32; 65536];
        f16_to_f32(&src, &mut fast);
        f16_to_f32_scalar(&src, &mut slow);
        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
            assert!(same_bits_or_both_nan(*a, *b), "f16 bits {i:#06x}: {a} vs {b}");
        }
    }

    #[test]
    fn f16_encode_simd_matches_scalar() {
        // Every f16 value, the midpoints between neighbours (ties), and a sweep of f32 bits
        // covering subnormals, overflow, infinities and NaNs.
        let mut values: Vec<f32> = (0..=u16::MAX).map(|v| half::f16::from_bits(v).to_f32_const()).collect();
        for v in 0..u16::MAX {
            let a = half::f16::from_bits(v).to_f32_const();
            let b = half::f16::from_bits(v + 1).to_f32_const();
            values.push((a + b) / 2.0);
        }
        let mut bits = 0u32;
        while let Some(next) = bits.checked_add(0x0001_3579) {
            values.push(f32::from_bits(bits));
            bits = next;
        }
        let mut fast = vec![0u8; values.len() * 2];
        let mut slow = vec![0u8; values.len() * 2];
        f32_to_f16(&values, &mut fast);
        f32_to_f16_scalar(&values, &mut slow);
        for (i, v) in values.iter().enumerate() {
            let a = u16::from_le_bytes([fast[2 * i], fast[2 * i + 1]]);
            let b = u16::from_le_bytes([slow[2 * i], slow[2 * i + 1]]);
            let both_nan = half::f16::from_bits(a).is_nan() && half::f16::from_bits(b).is_nan();
            assert!(a == b || both_nan, "f32 {v} ({:#010x}): {a:#06x} vs {b:#06x}", v.to_bits());
        }
    }

    #[test]
    fn f16_simd_handles_unaligned_tails() {
        for n in 0..40 {
            let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.37 - 3.0).collect();
            let mut bytes = vec![0u8; 2 * n + 1];
            f32_to_f16(&values, &mut bytes[1..]);
            let mut back = vec![0f32; n];
            f16_to_f32(&bytes[1..], &mut back);
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() * 1e-3 + 1e-3);
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even_like_torch() {
        let cases = [
            (1.0f32, 0x3F80u16),
            (f32::from_bits(0x3F80_8000), 0x3F80), // tie, even stays
            (f32::from_bits(0x3F81_8000), 0x3F82), // tie, odd rounds up
            (f32::from_bits(0x3F80_8001), 0x3F81),
            (f32::INFINITY, 0x7F80),
            (f32::NAN, 0x7FC0),
            (-0.0, 0x8000),
        ];
        for (v, want) in cases {
            assert_eq!(bf16_from_f32_bits(v), want, "{v}");
        }
        let mut out = [0u8; 2];
        f32_to_bf16(&[3.0], &mut out);
        let mut back = [0f32];
        bf16_to_f32(&out, &mut back);
        assert_eq!(back[0], 3.0);
    }

    #[test]
    fn fp8_e4m3fn_matches_known_values() {
        let t = tables();
        assert_eq!(t.e4m3fn[0x7E], 448.0);
        assert!(t.e4m3fn[0x7F].is_nan());
        assert_eq!(t.e4m3fn[0x01], 2f32.powi(-9));
        assert_eq!(t.e4m3fn[0x38], 1.0);
        assert_eq!(E4M3FN.encode(1.0), 0x38);
        assert_eq!(E4M3FN.encode(448.0), 0x7E);
        assert_eq!(E4M3FN.encode(464.0), 0x7E); // tie to even mantissa
        assert_eq!(E4M3FN.encode(470.0), 0x7F); // rounds past the max: NaN, as torch does
        assert_eq!(E4M3FN.encode(-1.0), 0xB8);
        assert_eq!(E4M3FN.encode(2f32.powi(-10)), 0x00); // tie between 0 and the least subnormal
        assert_eq!(E4M3FN.encode(3.0 * 2f32.powi(-10)), 0x02);
    }

    #[test]
    fn fp8_round_trips_every_code() {
        for (format, dtype) in [
            (E4M3FN, DType::F8E4M3),
            (E5M2, DType::F8E5M2),
            (E4M3FNUZ, DType::F8E4M3Fnuz),
            (E5M2FNUZ, DType::F8E5M2Fnuz),
        ] {
            for code in 0..=255u8 {
                let v = format.decode(code);
                let back = format.encode(v);
                if v.is_nan() {
                    assert!(format.decode(back).is_nan(), "{dtype} {code:#04x}");
                } else if v == 0.0 {
                    assert_eq!(format.decode(back), 0.0);
                } else {
                    assert_eq!(back, code, "{dtype} {code:#04x} = {v}");
                }
            }
        }
        assert_eq!(E5M2.encode(1e6), 0x7C); // overflow to inf
        assert_eq!(E5M2.decode(0x7C), f32::INFINITY);
    }

    #[test]
    fn non_finite_values_are_found_in_every_float_dtype() {
        for dtype in crate::dtype::ALL_DTYPES.into_iter().filter(|d| d.is_float()) {
            let finite: Vec<f32> = if dtype == DType::F8E8M0 { vec![1.0, 2.0] } else { vec![0.0, -1.5, 2.0] };
            let mut bytes = vec![0u8; finite.len() * dtype.bits() / 8];
            encode_f32(dtype, &finite, &mut bytes);
            assert!(!has_non_finite(dtype, &bytes), "{dtype}");
            let mut nan = vec![0u8; dtype.bits() / 8];
            encode_f32(dtype, &[f32::NAN], &mut nan);
            bytes.extend(nan);
            assert!(has_non_finite(dtype, &bytes), "{dtype}");
        }
        assert!(!has_non_finite(DType::I64, &[0xFF; 8]));
    }

    #[test]
    fn integers_round_to_nearest_and_saturate() {
        let mut out = [0u8; 8 * 4];
        encode_f64(DType::I64, &[2.5, 3.5, -1.4, f64::NAN], &mut out);
        let vals: Vec<i64> = out.chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(vals, vec![2, 4, -1, 0]);
        let mut u = [0u8; 2];
        encode_f32(DType::U8, &[300.0, -5.0], &mut u);
        assert_eq!(u, [255, 0]);
    }

    #[test]
    fn every_numeric_dtype_round_trips_small_integers() {
        for dtype in crate::dtype::ALL_DTYPES.into_iter().filter(|d| d.is_numeric()) {
            let values: Vec<f32> = if dtype == DType::Bool {
                vec![0.0, 1.0]
            } else if dtype == DType::F8E8M0 {
                vec![1.0, 2.0, 0.5]
            } else {
                vec![0.0, 1.0, 2.0, 3.0]
            };
            let mut bytes = vec![0u8; values.len() * dtype.bits() / 8];
            encode_f32(dtype, &values, &mut bytes);
            let mut back = vec![0f32; values.len()];
            decode_f32(dtype, &bytes, &mut back);
            assert_eq!(back, values, "{dtype}");
            let mut back64 = vec![0f64; values.len()];
            decode_f64(dtype, &bytes, &mut back64);
            assert_eq!(back64.iter().map(|v| *v as f32).collect::<Vec<_>>(), values, "{dtype}");
        }
    }
}

//! Element types of safetensors files, with their sd-mecha (torch) names.

use std::fmt;

/// Every dtype the safetensors format defines. The ones without a numeric
/// decoding (`C64`, the sub-byte floats) can still be passed through byte-exact.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    F8E8M0,
    F8E4M3Fnuz,
    F8E5M2Fnuz,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
    F4,
    F6E2M3,
    F6E3M2,
}

pub const ALL_DTYPES: [DType; 22] = [
    DType::Bool,
    DType::U8,
    DType::I8,
    DType::F8E4M3,
    DType::F8E5M2,
    DType::F8E8M0,
    DType::F8E4M3Fnuz,
    DType::F8E5M2Fnuz,
    DType::I16,
    DType::U16,
    DType::F16,
    DType::BF16,
    DType::I32,
    DType::U32,
    DType::F32,
    DType::C64,
    DType::F64,
    DType::I64,
    DType::U64,
    DType::F4,
    DType::F6E2M3,
    DType::F6E3M2,
];

impl DType {
    /// The name used in safetensors headers (`"F16"`, `"F8_E4M3"`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E8M0 => "F8_E8M0",
            DType::F8E4M3Fnuz => "F8_E4M3FNUZ",
            DType::F8E5M2Fnuz => "F8_E5M2FNUZ",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::C64 => "C64",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F4 => "F4",
            DType::F6E2M3 => "F6_E2M3",
            DType::F6E3M2 => "F6_E3M2",
        }
    }

    /// The torch attribute name sd-mecha uses (`cast_dtype_map`): `"float16"`, `"float8_e4m3fn"`, ...
    pub fn torch_name(self) -> Option<&'static str> {
        Some(match self {
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::F8E4M3 => "float8_e4m3fn",
            DType::F8E5M2 => "float8_e5m2",
            DType::F8E8M0 => "float8_e8m0fnu",
            DType::F8E4M3Fnuz => "float8_e4m3fnuz",
            DType::F8E5M2Fnuz => "float8_e5m2fnuz",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I64 => "int64",
            DType::U64 => "uint64",
            DType::C64 | DType::F4 | DType::F6E2M3 | DType::F6E3M2 => return None,
        })
    }

    /// Parses a safetensors name exactly as written in a header.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        ALL_DTYPES.into_iter().find(|d| d.safetensors_name() == name)
    }

    /// Parses what users write: safetensors names in any case (`f16`, `BF16`), torch names
    /// (`float16`, `bfloat16`, `float8_e4m3fn`), with or without a `torch.` prefix, and the
    /// common short forms `fp16`, `fp32`, `fp64`, `half`, `float`, `double`.
    pub fn parse_user(name: &str) -> Option<DType> {
        let lower = name.trim().to_ascii_lowercase();
        let lower = lower.strip_prefix("torch.").unwrap_or(&lower);
        let alias = match lower {
            "fp16" | "half" => Some(DType::F16),
            "fp32" | "float" => Some(DType::F32),
            "fp64" | "double" => Some(DType::F64),
            "bf16" => Some(DType::BF16),
            "fp8_e4m3" | "fp8_e4m3fn" | "f8_e4m3fn" => Some(DType::F8E4M3),
            "fp8_e5m2" => Some(DType::F8E5M2),
            "long" => Some(DType::I64),
            "int" => Some(DType::I32),
            _ => None,
        };
        alias.or_else(|| {
            ALL_DTYPES
                .into_iter()
                .find(|d| d.safetensors_name().eq_ignore_ascii_case(lower) || d.torch_name() == Some(lower))
        })
    }

    /// Size of one element in bits (sub-byte floats are 4 or 6 bits).
    pub fn bits(self) -> usize {
        match self {
            DType::F4 => 4,
            DType::F6E2M3 | DType::F6E3M2 => 6,
            DType::Bool
            | DType::U8
            | DType::I8
            | DType::F8E4M3
            | DType::F8E5M2
            | DType::F8E8M0
            | DType::F8E4M3Fnuz
            | DType::F8E5M2Fnuz => 8,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 16,
            DType::I32 | DType::U32 | DType::F32 => 32,
            DType::C64 | DType::F64 | DType::I64 | DType::U64 => 64,
        }
    }

    /// Byte size of `numel` elements, or `None` when sub-byte elements do not fill whole bytes
    /// or the size overflows.
    pub fn byte_len(self, numel: usize) -> Option<usize> {
        let bits = numel.checked_mul(self.bits())?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// Alignment a writer keeps for this dtype so zero-copy readers can view it in place.
    pub fn alignment(self) -> usize {
        self.bits().div_ceil(8).max(1)
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F8E4M3
                | DType::F8E5M2
                | DType::F8E8M0
                | DType::F8E4M3Fnuz
                | DType::F8E5M2Fnuz
                | DType::F16
                | DType::BF16
                | DType::F32
                | DType::F64
        )
    }

    pub fn is_integer(self) -> bool {
        matches!(
            self,
            DType::Bool
                | DType::U8
                | DType::I8
                | DType::I16
                | DType::U16
                | DType::I32
                | DType::U32
                | DType::I64
                | DType::U64
        )
    }

    /// Whether values of this dtype can be decoded to and encoded from real numbers.
    pub fn is_numeric(self) -> bool {
        self.is_float() || self.is_integer()
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in ALL_DTYPES {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
            assert_eq!(DType::parse_user(d.safetensors_name()), Some(d));
            if let Some(t) = d.torch_name() {
                assert_eq!(DType::parse_user(t), Some(d));
                assert_eq!(DType::parse_user(&format!("torch.{t}")), Some(d));
            }
        }
        assert_eq!(DType::parse_user("f16"), Some(DType::F16));
        assert_eq!(DType::parse_user("bfloat16"), Some(DType::BF16));
        assert_eq!(DType::parse_user("f8_e4m3"), Some(DType::F8E4M3));
        assert_eq!(DType::parse_user("float17"), None);
    }

    #[test]
    fn byte_lengths() {
        assert_eq!(DType::F16.byte_len(3), Some(6));
        assert_eq!(DType::F4.byte_len(3), None);
        assert_eq!(DType::F4.byte_len(4), Some(2));
        assert_eq!(DType::F64.byte_len(usize::MAX), None);
    }
}

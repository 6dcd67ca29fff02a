//! Element types as checkpoints name them.

use std::fmt;

use serde::Serialize;

/// The element type of a stored tensor.
///
/// Names follow the safetensors format (`"BF16"`, `"F8_E4M3"`, …); `.pth` storages are mapped onto the
/// same names (`torch.BFloat16Storage` → [`DType::BF16`]). The `Serialize` form is that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[allow(
    non_camel_case_types,
    reason = "variants are spelled as in the safetensors format"
)]
pub enum DType {
    /// Boolean, one byte per element.
    BOOL,
    /// 4-bit float (MXFP4), two elements per byte.
    F4,
    /// 6-bit float with 2 exponent and 3 mantissa bits (MXFP6).
    F6_E2M3,
    /// 6-bit float with 3 exponent and 2 mantissa bits (MXFP6).
    F6_E3M2,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, 5 exponent bits, 2 mantissa bits.
    F8_E5M2,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits (torch `float8_e4m3fn`; ComfyUI's fp8 files).
    F8_E4M3,
    /// 8-bit float, 8 exponent bits and no mantissa (MX scale factors).
    F8_E8M0,
    /// 8-bit float E4M3, "finite, no negative zero" variant.
    F8_E4M3FNUZ,
    /// 8-bit float E5M2, "finite, no negative zero" variant.
    F8_E5M2FNUZ,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// Complex number of two `F32` parts.
    C64,
    /// IEEE double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl DType {
    /// Every dtype, in the order of the enum.
    pub const ALL: [Self; 22] = [
        Self::BOOL,
        Self::F4,
        Self::F6_E2M3,
        Self::F6_E3M2,
        Self::U8,
        Self::I8,
        Self::F8_E5M2,
        Self::F8_E4M3,
        Self::F8_E8M0,
        Self::F8_E4M3FNUZ,
        Self::F8_E5M2FNUZ,
        Self::I16,
        Self::U16,
        Self::F16,
        Self::BF16,
        Self::I32,
        Self::U32,
        Self::F32,
        Self::C64,
        Self::F64,
        Self::I64,
        Self::U64,
    ];

    /// The safetensors name of this dtype (`"BF16"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::BOOL => "BOOL",
            Self::F4 => "F4",
            Self::F6_E2M3 => "F6_E2M3",
            Self::F6_E3M2 => "F6_E3M2",
            Self::U8 => "U8",
            Self::I8 => "I8",
            Self::F8_E5M2 => "F8_E5M2",
            Self::F8_E4M3 => "F8_E4M3",
            Self::F8_E8M0 => "F8_E8M0",
            Self::F8_E4M3FNUZ => "F8_E4M3FNUZ",
            Self::F8_E5M2FNUZ => "F8_E5M2FNUZ",
            Self::I16 => "I16",
            Self::U16 => "U16",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::I32 => "I32",
            Self::U32 => "U32",
            Self::F32 => "F32",
            Self::C64 => "C64",
            Self::F64 => "F64",
            Self::I64 => "I64",
            Self::U64 => "U64",
        }
    }

    /// Parses a safetensors dtype name. Returns `None` for a name the format does not define.
    pub fn from_safetensors_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Maps a torch storage class name from a `.pth` pickle (`"BFloat16Storage"`) to a dtype.
    ///
    /// These are the names `torch.save` writes as the storage type of each persistent id
    /// (`torch/storage.py`, `_pickle_storage_type`).
    pub fn from_torch_storage(class_name: &str) -> Option<Self> {
        Some(match class_name {
            "BoolStorage" => Self::BOOL,
            "ByteStorage" => Self::U8,
            "CharStorage" => Self::I8,
            "ShortStorage" => Self::I16,
            "IntStorage" => Self::I32,
            "LongStorage" => Self::I64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "ComplexFloatStorage" => Self::C64,
            "Float8_e4m3fnStorage" => Self::F8_E4M3,
            "Float8_e5m2Storage" => Self::F8_E5M2,
            "Float8_e4m3fnuzStorage" => Self::F8_E4M3FNUZ,
            "Float8_e5m2fnuzStorage" => Self::F8_E5M2FNUZ,
            "Float8_e8m0fnuStorage" => Self::F8_E8M0,
            "UInt16Storage" => Self::U16,
            "UInt32Storage" => Self::U32,
            "UInt64Storage" => Self::U64,
            _ => return None,
        })
    }

    /// Size of one element in bits (4 for `F4`, 6 for the `F6` types).
    pub fn bits(self) -> u64 {
        match self {
            Self::F4 => 4,
            Self::F6_E2M3 | Self::F6_E3M2 => 6,
            Self::BOOL
            | Self::U8
            | Self::I8
            | Self::F8_E5M2
            | Self::F8_E4M3
            | Self::F8_E8M0
            | Self::F8_E4M3FNUZ
            | Self::F8_E5M2FNUZ => 8,
            Self::I16 | Self::U16 | Self::F16 | Self::BF16 => 16,
            Self::I32 | Self::U32 | Self::F32 => 32,
            Self::C64 | Self::F64 | Self::I64 | Self::U64 => 64,
        }
    }

    /// Bytes taken by `elements` elements of this dtype, or `None` when the count does not fill
    /// whole bytes (an odd number of `F4` elements) or overflows.
    pub fn bytes_for(self, elements: u64) -> Option<u64> {
        let bits = elements.checked_mul(self.bits())?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// The matching candle dtype, where candle has one.
    pub fn to_candle(self) -> Option<candle_core::DType> {
        use candle_core::DType as C;
        Some(match self {
            Self::U8 => C::U8,
            Self::U32 => C::U32,
            Self::I16 => C::I16,
            Self::I32 => C::I32,
            Self::I64 => C::I64,
            Self::BF16 => C::BF16,
            Self::F16 => C::F16,
            Self::F32 => C::F32,
            Self::F64 => C::F64,
            Self::F8_E4M3 => C::F8E4M3,
            Self::F6_E2M3 => C::F6E2M3,
            Self::F6_E3M2 => C::F6E3M2,
            Self::F4 => C::F4,
            Self::F8_E8M0 => C::F8E8M0,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_safetensors_name(d.name()), Some(d));
            assert_eq!(
                serde_json::to_string(&d).unwrap(),
                format!("\"{}\"", d.name())
            );
        }
        assert_eq!(DType::from_safetensors_name("bf16"), None);
        assert_eq!(DType::from_safetensors_name("F128"), None);
    }

    #[test]
    fn names_match_the_safetensors_crate() {
        // The safetensors crate is the format's reference implementation: every name it knows must
        // parse here with the same bit width.
        for d in DType::ALL {
            let theirs: safetensors::Dtype =
                serde_json::from_value(serde_json::Value::String(d.name().into())).unwrap();
            assert_eq!(theirs.bitsize() as u64, d.bits(), "{d}");
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(DType::BF16.bytes_for(3), Some(6));
        assert_eq!(DType::F4.bytes_for(4), Some(2));
        assert_eq!(DType::F4.bytes_for(3), None);
        assert_eq!(DType::F64.bytes_for(u64::MAX), None);
    }
}

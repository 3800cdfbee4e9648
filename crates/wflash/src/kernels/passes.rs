//! The small passes around the kernels: K/V packing (pack_rows.wgsl) and element-type
//! conversion (convert.wgsl).

use super::wgsl::{CONVERT_WGSL, F32_TO_BF16_WGSL, PACK_ROWS_WGSL, Storage, load_accessor};

/// An element-type conversion pass (convert.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Conversion {
    /// A tensor in this storage to f32.
    ToF32(Storage),
    /// f32 to a tensor in this storage.
    FromF32(Storage),
}

impl Conversion {
    pub fn label(self) -> String {
        match self {
            Conversion::ToF32(s) => format!("convert {} to f32", s.name()),
            Conversion::FromF32(s) => format!("convert f32 to {}", s.name()),
        }
    }

    /// Elements each invocation converts: two for a store into u32 words, else one.
    pub fn elements_per_unit(self) -> u32 {
        match self {
            Conversion::FromF32(Storage::F16Packed | Storage::Bf16Packed) => 2,
            _ => 1,
        }
    }

    /// The pass's WGSL: bindings and `convert_unit` for this conversion, then convert.wgsl.
    pub fn source(self) -> String {
        let mut src = String::new();
        let storage = match self {
            Conversion::ToF32(s) | Conversion::FromF32(s) => s,
        };
        if storage == Storage::F16Native {
            src.push_str("enable f16;\n");
        }
        match self {
            Conversion::ToF32(storage) => {
                src.push_str(&load_accessor(storage, 1, "x"));
                src.push_str(
                    "@group(0) @binding(2) var<storage, read_write> y: array<f32>;\n\
                     fn convert_unit(i: u32) {\n    y[i] = load_x(i);\n}\n",
                );
            }
            Conversion::FromF32(storage) => {
                src.push_str("@group(0) @binding(1) var<storage, read> x: array<f32>;\n");
                let (elem, body) = match storage {
                    Storage::F32 => ("f32", "y[i] = x[i];"),
                    Storage::F16Native => ("f16", "y[i] = f16(x[i]);"),
                    // Word w holds elements 2w (low half) and 2w + 1; a missing last one is 0.
                    Storage::F16Packed => (
                        "u32",
                        "let hi = select(0.0, x[min(2u * i + 1u, conv.len - 1u)], 2u * i + 1u < conv.len);\n    \
                         y[i] = pack2x16float(vec2<f32>(x[2u * i], hi));",
                    ),
                    Storage::Bf16Packed => (
                        "u32",
                        "let hi = select(0.0, x[min(2u * i + 1u, conv.len - 1u)], 2u * i + 1u < conv.len);\n    \
                         y[i] = f32_to_bf16_bits(x[2u * i]) | (f32_to_bf16_bits(hi) << 16u);",
                    ),
                };
                src.push_str(&format!(
                    "@group(0) @binding(2) var<storage, read_write> y: array<{elem}>;\n\
                     fn convert_unit(i: u32) {{\n    {body}\n}}\n"
                ));
                if storage == Storage::Bf16Packed {
                    src.push_str(F32_TO_BF16_WGSL);
                }
            }
        }
        src.push_str(CONVERT_WGSL);
        src
    }
}

impl super::Kernel for Conversion {
    fn label(&self) -> String {
        Conversion::label(*self)
    }
    fn source(&self) -> String {
        Conversion::source(*self)
    }
    fn entry_point(&self) -> &'static str {
        "convert"
    }
}

/// The packing kernel (pack_rows.wgsl) for a tensor in this storage type: rows of it into an
/// rgba32float texture, converted to f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackKernel(pub Storage);

impl super::Kernel for PackKernel {
    fn label(&self) -> String {
        format!("pack_rows {}", self.0.name())
    }
    /// The `load_x` accessor for the storage type, then pack_rows.wgsl.
    fn source(&self) -> String {
        let mut src = String::new();
        if self.0 == Storage::F16Native {
            src.push_str("enable f16;\n");
        }
        src.push_str(&load_accessor(self.0, 1, "x"));
        src.push_str(PACK_ROWS_WGSL);
        src
    }
    fn entry_point(&self) -> &'static str {
        "pack_rows"
    }
}

//! WGSL text: the shader files, the generated storage accessors (one kernel body serves f32,
//! native f16 and u32-packed f16/bf16) and the host-side loop unrolling.

use crate::DType;

/// How a tensor's elements sit in a storage buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Storage {
    /// `array<f32>`.
    F32,
    /// `array<f16>`, needs the adapter's `SHADER_F16`.
    F16Native,
    /// f16 bits, two per `array<u32>` word, unpacked with `unpack2x16float` (works everywhere).
    F16Packed,
    /// bf16 bits, two per `array<u32>` word (WGSL has no bf16 type).
    Bf16Packed,
}

impl Storage {
    pub fn dtype(self) -> DType {
        match self {
            Storage::F32 => DType::F32,
            Storage::F16Native | Storage::F16Packed => DType::F16,
            Storage::Bf16Packed => DType::Bf16,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::F16Native => "f16",
            Storage::F16Packed => "f16packed",
            Storage::Bf16Packed => "bf16packed",
        }
    }
    pub const ALL: [Storage; 4] = [
        Storage::F32,
        Storage::F16Native,
        Storage::F16Packed,
        Storage::Bf16Packed,
    ];
}

/// WGSL source of the workgroup-tiled forward kernel (GPUs).
pub const FLASH_FWD_WGSL: &str = include_str!("../../shaders/flash_fwd.wgsl");
/// WGSL template of the unrolled, texture-fed forward kernel (CPU adapters).
pub const FLASH_FWD_UNROLLED_WGSL: &str = include_str!("../../shaders/flash_fwd_unrolled.wgsl");
/// What both forward kernels share: the uniform block and the variants' weight function.
pub const FLASH_COMMON_WGSL: &str = include_str!("../../shaders/flash_common.wgsl");
/// WGSL source of the K/V packing kernel that feeds the unrolled kernel.
pub const PACK_ROWS_WGSL: &str = include_str!("../../shaders/pack_rows.wgsl");
/// WGSL source of the element-type conversions at the unrolled kernel's edges.
pub const CONVERT_WGSL: &str = include_str!("../../shaders/convert.wgsl");

/// WGSL template of the linear-attention passes (chunked and recurrent).
pub const LINEAR_WGSL: &str = include_str!("../../shaders/linear.wgsl");

/// `fn {func}(row: u32, key0: u32) -> vec4<f32>`: keys `key0..key0 + 4` (key0 a multiple of 4)
/// of packed row `row` of the texture at `binding`, whose geometry is `params.{prefix}_fold`
/// rows per line of `params.{prefix}_width4` texels (pack_rows.wgsl). Without the modifier
/// the function returns zeros and the binding does not exist.
pub(crate) fn texture_accessor(present: bool, binding: u32, func: &str, prefix: &str) -> String {
    if !present {
        return format!(
            "fn {func}(row: u32, key0: u32) -> vec4<f32> {{\n    return vec4<f32>(0.0);\n}}\n"
        );
    }
    format!(
        "@group(0) @binding({binding}) var {prefix}_tex: texture_storage_2d<rgba32float, read>;\n\
         fn {func}(row: u32, key0: u32) -> vec4<f32> {{\n    \
             let texel = vec2<u32>((row % params.{prefix}_fold) * params.{prefix}_width4 + key0 / 4u, row / params.{prefix}_fold);\n    \
             return textureLoad({prefix}_tex, texel);\n\
         }}\n"
    )
}

/// A read-only binding `{name}_buf` and `fn load_{name}(i: u32) -> f32` reading element `i`.
pub(crate) fn load_accessor(storage: Storage, binding: u32, name: &str) -> String {
    let (elem, body) = match storage {
        Storage::F32 => ("f32", format!("return {name}_buf[i];")),
        Storage::F16Native => ("f16", format!("return f32({name}_buf[i]);")),
        Storage::F16Packed => (
            "u32",
            format!("return unpack2x16float({name}_buf[i >> 1u])[i & 1u];"),
        ),
        // bf16 is the top half of an f32: move its 16 bits there.
        Storage::Bf16Packed => (
            "u32",
            format!(
                "let w = {name}_buf[i >> 1u];\n    return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (i & 1u) == 1u));"
            ),
        ),
    };
    format!(
        "@group(0) @binding({binding}) var<storage, read> {name}_buf: array<{elem}>;\n\
         fn load_{name}(i: u32) -> f32 {{\n    {body}\n}}\n"
    )
}

/// A read-write binding `{name}_buf` and `fn store_{name}(i: u32, x: f32)` writing element `i`.
///
/// Packed types share a u32 word between two elements that another invocation (or workgroup)
/// may own when rows have odd length, so they are written with atomics on their half only.
pub(crate) fn store_accessor(storage: Storage, binding: u32, name: &str) -> String {
    let (elem, body) = match storage {
        Storage::F32 => ("f32", format!("{name}_buf[i] = x;")),
        Storage::F16Native => ("f16", format!("{name}_buf[i] = f16(x);")),
        Storage::F16Packed => (
            "atomic<u32>",
            format!("store_half_{name}(i, pack2x16float(vec2<f32>(x, 0.0)) & 0xffffu);"),
        ),
        Storage::Bf16Packed => (
            "atomic<u32>",
            format!("store_half_{name}(i, f32_to_bf16_bits(x));"),
        ),
    };
    let mut out = format!(
        "@group(0) @binding({binding}) var<storage, read_write> {name}_buf: array<{elem}>;\n\
         fn store_{name}(i: u32, x: f32) {{\n    {body}\n}}\n"
    );
    if matches!(storage, Storage::F16Packed | Storage::Bf16Packed) {
        out.push_str(&format!(
            "fn store_half_{name}(i: u32, bits: u32) {{\n    \
                 let shift = (i & 1u) * 16u;\n    \
                 atomicAnd(&{name}_buf[i >> 1u], ~(0xffffu << shift));\n    \
                 atomicOr(&{name}_buf[i >> 1u], bits << shift);\n\
             }}\n"
        ));
    }
    if storage == Storage::Bf16Packed {
        out.push_str(F32_TO_BF16_WGSL);
    }
    out
}

/// f32 to bf16 bits, rounding to nearest even; NaN stays a (quiet) NaN.
pub(crate) const F32_TO_BF16_WGSL: &str = "fn f32_to_bf16_bits(x: f32) -> u32 {\n    \
         let b = bitcast<u32>(x);\n    \
         if (b & 0x7fffffffu) > 0x7f800000u { return (b >> 16u) | 0x40u; }\n    \
         return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;\n\
     }\n";

/// Repeats each line block between `//#unroll NAME COUNT` and its `//#end` COUNT times (COUNT a
/// number or a name in `counts`), replacing `{NAME}` with `0u`, `1u`, ... Blocks nest.
///
/// This is how the unrolled kernel gets straight-line code: CPU drivers neither unroll loops
/// with large bodies nor keep dynamically indexed private arrays in registers.
pub fn expand_unrolls(template: &str, counts: &[(&str, u32)]) -> String {
    let lines: Vec<&str> = template.lines().collect();
    let mut out = String::with_capacity(template.len() * 8);
    expand_block(&lines, counts, &[], &mut out);
    out
}

fn expand_block(lines: &[&str], counts: &[(&str, u32)], bound: &[(String, u32)], out: &mut String) {
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let Some(spec) = line.trim().strip_prefix("//#unroll ") else {
            let mut text = line.to_string();
            for (name, value) in bound {
                text = text.replace(&format!("{{{name}}}"), &format!("{value}u"));
            }
            out.push_str(&text);
            out.push('\n');
            i += 1;
            continue;
        };
        // Find the matching `//#end`.
        let mut depth = 1;
        let mut end = i + 1;
        while end < lines.len() {
            let t = lines[end].trim();
            if t.starts_with("//#unroll ") {
                depth += 1;
            } else if t == "//#end" {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            end += 1;
        }
        let mut words = spec.split_whitespace();
        let (name, count) = (words.next().unwrap_or(""), words.next().unwrap_or("0"));
        let count = count.parse::<u32>().unwrap_or_else(|_| {
            counts
                .iter()
                .find(|(n, _)| *n == count)
                .map_or(0, |&(_, v)| v)
        });
        for value in 0..count {
            let mut inner = bound.to_vec();
            inner.push((name.to_string(), value));
            expand_block(&lines[i + 1..end.min(lines.len())], counts, &inner, out);
        }
        i = end + 1;
    }
}

//! Kernel registry: which WGSL family, specialised how, and the exact source and override
//! constants each specialisation compiles from.
//!
//! A kernel is `prelude + shaders/<family>.wgsl`. The prelude is generated here from the
//! [`KernelKey`]: it declares the storage bindings with their typed accessors (so one WGSL body
//! serves f32, native f16 and u32-packed f16/bf16) and the constants that size private arrays.
//! Everything else is a WGSL `override` constant.

use crate::DType;

/// WGSL source of the forward kernel family.
pub const FLASH_FWD_WGSL: &str = include_str!("../../../shaders/flash_fwd.wgsl");

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

/// Tile sizes of the forward kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TileConfig {
    /// Query rows per workgroup (= invocations per workgroup).
    pub block_m: u32,
    /// Keys per K/V tile staged in workgroup memory.
    pub block_n: u32,
}

/// Everything that selects one compiled pipeline. The pipeline cache is keyed by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelKey {
    pub storage: Storage,
    pub head_dim: u32,
    pub value_dim: u32,
    pub tile: TileConfig,
    pub causal: bool,
}

/// The most floats a private array may hold. llvmpipe (Mesa 22.3) computes wrong results once an
/// invocation's dynamically indexed private arrays grow past about 1 KiB, and GPUs spill them.
pub const PRIVATE_DIM_MAX: u32 = 64;

/// Private arrays are sized in steps so that few distinct capacities exist; loops run to the exact dim.
pub fn dim_capacity(dim: u32) -> u32 {
    dim.next_power_of_two().max(8)
}

impl KernelKey {
    /// Readable key, used as the pipeline's wgpu label: `flash_fwd f16 bm64 bn32 d128 dv128 causal`.
    pub fn label(&self) -> String {
        format!(
            "flash_fwd {} bm{} bn{} d{} dv{}{}",
            self.storage.name(),
            self.tile.block_m,
            self.tile.block_n,
            self.head_dim,
            self.value_dim,
            if self.causal { " causal" } else { "" }
        )
    }

    /// Output columns each workgroup computes.
    pub fn value_slice(&self) -> u32 {
        self.value_dim.min(PRIVATE_DIM_MAX)
    }

    /// Workgroups along x per query tile.
    pub fn value_slices(&self) -> u32 {
        self.value_dim.div_ceil(self.value_slice())
    }

    /// Bytes of workgroup memory the kernel declares.
    pub fn workgroup_bytes(&self) -> u32 {
        workgroup_bytes(
            self.tile.block_m,
            self.tile.block_n,
            self.head_dim,
            self.value_dim,
        )
    }

    /// The full WGSL source: generated prelude, then the family's file.
    pub fn source(&self) -> String {
        let mut src = String::new();
        if self.storage == Storage::F16Native {
            src.push_str("enable f16;\n");
        }
        src.push_str(&format!("const BLOCK_N: u32 = {}u;\n", self.tile.block_n));
        for (binding, name) in [(1, "q"), (2, "k"), (3, "v")] {
            src.push_str(&load_accessor(self.storage, binding, name));
        }
        src.push_str(&store_accessor(self.storage, 4, "o"));
        src.push_str(FLASH_FWD_WGSL);
        src
    }

    /// Values of the WGSL `override` constants.
    pub fn constants(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("BLOCK_M", f64::from(self.tile.block_m)),
            ("HEAD_DIM", f64::from(self.head_dim)),
            ("VALUE_DIM", f64::from(self.value_dim)),
            ("VALUE_SLICE", f64::from(self.value_slice())),
            ("CAUSAL", if self.causal { 1.0 } else { 0.0 }),
        ]
    }
}

/// Bytes of workgroup memory: a K tile and a V-slice tile of `block_n` keys, and the accumulators.
pub fn workgroup_bytes(block_m: u32, block_n: u32, head_dim: u32, value_dim: u32) -> u32 {
    (block_n * (head_dim + value_dim.min(PRIVATE_DIM_MAX))
        + value_dim.min(PRIVATE_DIM_MAX) * block_m)
        * 4
}

/// A read-only binding `{name}_buf` and `fn load_{name}(i: u32) -> f32` reading element `i`.
fn load_accessor(storage: Storage, binding: u32, name: &str) -> String {
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
fn store_accessor(storage: Storage, binding: u32, name: &str) -> String {
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
        // Round to nearest even; NaN stays a (quiet) NaN.
        out.push_str(
            "fn f32_to_bf16_bits(x: f32) -> u32 {\n    \
                 let b = bitcast<u32>(x);\n    \
                 if (b & 0x7fffffffu) > 0x7f800000u { return (b >> 16u) | 0x40u; }\n    \
                 return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;\n\
             }\n",
        );
    }
    out
}

/// Every kernel specialisation the engine can build for these tile configurations:
/// all storage types × the head/value dims given × causal on/off. Used by the naga validation test.
pub fn variants(dims: &[(u32, u32)], tiles: &[TileConfig]) -> Vec<KernelKey> {
    let mut keys = Vec::new();
    for &storage in &Storage::ALL {
        for &(head_dim, value_dim) in dims {
            for &tile in tiles {
                for causal in [false, true] {
                    keys.push(KernelKey {
                        storage,
                        head_dim,
                        value_dim,
                        tile,
                        causal,
                    });
                }
            }
        }
    }
    keys
}

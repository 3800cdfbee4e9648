//! Kernel registry: which WGSL family, specialised how, and the exact source and override
//! constants each specialisation compiles from.
//!
//! A kernel is `prelude + shaders/<family>.wgsl`. The prelude is generated here from the
//! [`KernelKey`]: it declares the storage bindings with their typed accessors (so one WGSL body
//! serves f32, native f16 and u32-packed f16/bf16) and the constants that size private arrays.
//! Everything else is a WGSL `override` constant.

use crate::{DType, Modifier, ModifierSet};

/// WGSL source of the workgroup-tiled forward kernel (GPUs).
pub const FLASH_FWD_WGSL: &str = include_str!("../shaders/flash_fwd.wgsl");
/// WGSL template of the unrolled, texture-fed forward kernel (CPU adapters).
pub const FLASH_FWD_UNROLLED_WGSL: &str = include_str!("../shaders/flash_fwd_unrolled.wgsl");
/// What both forward kernels share: the uniform block and the variants' weight function.
pub const FLASH_COMMON_WGSL: &str = include_str!("../shaders/flash_common.wgsl");
/// WGSL source of the K/V packing kernel that feeds the unrolled kernel.
pub const PACK_ROWS_WGSL: &str = include_str!("../shaders/pack_rows.wgsl");
/// WGSL source of the element-type conversions at the unrolled kernel's edges.
pub const CONVERT_WGSL: &str = include_str!("../shaders/convert.wgsl");

/// WGSL template of the linear-attention passes (chunked and recurrent).
pub const LINEAR_WGSL: &str = include_str!("../shaders/linear.wgsl");

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

/// Invocations per workgroup of the unrolled kernel: the SIMD width of CPU drivers (8 f32 lanes
/// of AVX2 on llvmpipe), so a workgroup is one register's worth of lanes.
pub const UNROLLED_LANES: u32 = 8;

/// Keys per step of the unrolled kernel.
pub const UNROLLED_KEYS: u32 = 4;
/// The unrolled kernel keeps ROWS × max(D4, DV4) vec4s of Q and of O per invocation; this
/// bounds that (and with it the generated code and its compile time). More rows than this spill
/// out of the CPU's L1 cache: 16 rows at D=64 ran 1.6× slower than 8 (docs/PERF.md).
const UNROLLED_ROW_VEC4S: u32 = 128;
const UNROLLED_MAX_ROWS: u32 = 8;

/// The unrolled kernel's tile for these dims: as many rows per invocation as the bound allows.
pub fn unrolled_tile(head_dim: u32, value_dim: u32) -> TileConfig {
    let rows = unrolled_max_rows(head_dim, value_dim);
    TileConfig {
        block_m: UNROLLED_LANES * rows,
        block_n: UNROLLED_KEYS,
    }
}

fn unrolled_max_rows(head_dim: u32, value_dim: u32) -> u32 {
    let widest = head_dim.max(value_dim).div_ceil(4).max(1);
    (UNROLLED_ROW_VEC4S / widest).clamp(1, UNROLLED_MAX_ROWS)
}

/// Every tile the unrolled kernel can run at these dims: 1, 2, 4, ... rows per invocation up to
/// the bound, largest (the default) first.
pub fn unrolled_tiles(head_dim: u32, value_dim: u32) -> Vec<TileConfig> {
    let max_rows = unrolled_max_rows(head_dim, value_dim);
    (0..=max_rows.ilog2())
        .rev()
        .map(|shift| TileConfig {
            block_m: UNROLLED_LANES << shift,
            block_n: UNROLLED_KEYS,
        })
        .filter(|tile| tile.block_m <= UNROLLED_LANES * max_rows)
        .collect()
}

/// What the kernel computes from a score: the part of [`crate::Variant`] that shapes the code
/// (the sigmoid bias is a runtime uniform).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VariantKind {
    Softmax,
    Sigmoid,
}

impl VariantKind {
    pub fn of(variant: &crate::Variant) -> VariantKind {
        match variant {
            crate::Variant::Softmax => VariantKind::Softmax,
            crate::Variant::Sigmoid { .. } => VariantKind::Sigmoid,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            VariantKind::Softmax => "softmax",
            VariantKind::Sigmoid => "sigmoid",
        }
    }
    pub const ALL: [VariantKind; 2] = [VariantKind::Softmax, VariantKind::Sigmoid];
}

/// The two implementations of the forward pass.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `flash_fwd.wgsl`: one invocation per query row, K/V tiles in workgroup memory. For GPUs.
    Tiled,
    /// `flash_fwd_unrolled.wgsl`: several rows per invocation, K/V from packed textures, every
    /// inner loop unrolled by the host. For CPU adapters, where it is ~40x faster (docs/PERF.md).
    Unrolled,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Tiled => "tiled",
            Family::Unrolled => "unrolled",
        }
    }
}

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
    /// Query rows per workgroup (tiled: = invocations; unrolled: lanes × rows per invocation).
    pub block_m: u32,
    /// Keys per K/V tile (tiled: staged in workgroup memory; unrolled: fetched per step).
    pub block_n: u32,
}

/// Everything that selects one compiled pipeline. The pipeline cache is keyed by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelKey {
    pub family: Family,
    pub storage: Storage,
    pub head_dim: u32,
    pub value_dim: u32,
    pub tile: TileConfig,
    pub causal: bool,
    pub variant: VariantKind,
    /// The compiled modifiers ([`Modifier::compiled`]).
    pub mods: ModifierSet,
}

/// The most floats a private array may hold. llvmpipe (Mesa 22.3) computes wrong results once an
/// invocation's dynamically indexed private arrays grow past about 1 KiB, and GPUs spill them.
pub const PRIVATE_DIM_MAX: u32 = 64;

/// Private arrays are sized in steps so that few distinct capacities exist; loops run to the exact dim.
pub fn dim_capacity(dim: u32) -> u32 {
    dim.next_power_of_two().max(8)
}

impl KernelKey {
    /// Readable key, used as the pipeline's wgpu label:
    /// `flash_fwd softmax tiled f16 bm64 bn32 d128 dv128 causal softcap`.
    pub fn label(&self) -> String {
        let mut label = format!(
            "flash_fwd {} {} {} bm{} bn{} d{} dv{}{}",
            self.variant.name(),
            self.family.name(),
            self.storage.name(),
            self.tile.block_m,
            self.tile.block_n,
            self.head_dim,
            self.value_dim,
            if self.causal { " causal" } else { "" }
        );
        for name in self.mods.iter().filter_map(Modifier::compiled) {
            label.push(' ');
            label.push_str(&name.to_lowercase());
        }
        label
    }

    /// Output columns each workgroup computes.
    pub fn value_slice(&self) -> u32 {
        match self.family {
            Family::Tiled => self.value_dim.min(PRIVATE_DIM_MAX),
            Family::Unrolled => self.value_dim,
        }
    }

    /// Workgroups along x per query tile.
    pub fn value_slices(&self) -> u32 {
        self.value_dim.div_ceil(self.value_slice())
    }

    /// Bytes of workgroup memory the kernel declares.
    pub fn workgroup_bytes(&self) -> u32 {
        if self.family == Family::Unrolled {
            return 0;
        }
        workgroup_bytes(
            self.tile.block_m,
            self.tile.block_n,
            self.head_dim,
            self.value_dim,
        )
    }

    /// The full WGSL source: generated prelude, the shared Params block, then the family's file.
    pub fn source(&self) -> String {
        let mut src = String::new();
        if self.storage == Storage::F16Native {
            src.push_str("enable f16;\n");
        }
        src.push_str(&load_accessor(self.storage, 1, "q"));
        src.push_str(&store_accessor(self.storage, 4, "o"));
        src.push_str(&format!(
            "const SIGMOID: bool = {};\n",
            self.variant == VariantKind::Sigmoid
        ));
        for modifier in Modifier::ALL {
            if let Some(name) = modifier.compiled() {
                let on = self.mods.contains(modifier);
                src.push_str(&format!("const {name}: bool = {on};\n"));
            }
        }
        src.push_str(&texture_accessor(
            self.mods.contains(Modifier::Bias),
            8,
            "bias4",
            "bias",
        ));
        src.push_str(&texture_accessor(
            self.mods.contains(Modifier::KeyMask),
            9,
            "key_mask4",
            "mask",
        ));
        src.push_str(FLASH_COMMON_WGSL);
        match self.family {
            Family::Tiled => {
                src.push_str(&format!("const BLOCK_N: u32 = {}u;\n", self.tile.block_n));
                src.push_str(&load_accessor(self.storage, 2, "k"));
                src.push_str(&load_accessor(self.storage, 3, "v"));
                src.push_str(FLASH_FWD_WGSL);
            }
            Family::Unrolled => {
                let counts = self.unrolled_counts();
                for (name, value) in counts {
                    src.push_str(&format!("const {name}: u32 = {value}u;\n"));
                }
                src.push_str(&format!(
                    "const HEAD_DIM: u32 = {}u;\nconst VALUE_DIM: u32 = {}u;\nconst CAUSAL: bool = {};\n",
                    self.head_dim, self.value_dim, self.causal
                ));
                src.push_str(&expand_unrolls(FLASH_FWD_UNROLLED_WGSL, &counts));
            }
        }
        src
    }

    /// The unrolled kernel's loop counts: rows per invocation, keys per step, vec4s per K and V row.
    fn unrolled_counts(&self) -> [(&'static str, u32); 4] {
        [
            ("ROWS", self.tile.block_m / UNROLLED_LANES),
            ("KEYS", self.tile.block_n),
            ("D4", self.head_dim.div_ceil(4)),
            ("DV4", self.value_dim.div_ceil(4)),
        ]
    }

    /// Workgroup size along x.
    pub fn workgroup_size(&self) -> u32 {
        match self.family {
            Family::Tiled => self.tile.block_m,
            Family::Unrolled => UNROLLED_LANES,
        }
    }

    /// Values of the WGSL `override` constants.
    pub fn constants(&self) -> Vec<(&'static str, f64)> {
        if self.family == Family::Unrolled {
            return Vec::new();
        }
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

/// `fn {func}(row: u32, key0: u32) -> vec4<f32>`: keys `key0..key0 + 4` (key0 a multiple of 4)
/// of packed row `row` of the texture at `binding`, whose geometry is `params.{prefix}_fold`
/// rows per line of `params.{prefix}_width4` texels (pack_rows.wgsl). Without the modifier
/// the function returns zeros and the binding does not exist.
fn texture_accessor(present: bool, binding: u32, func: &str, prefix: &str) -> String {
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
        out.push_str(F32_TO_BF16_WGSL);
    }
    out
}

/// f32 to bf16 bits, rounding to nearest even; NaN stays a (quiet) NaN.
const F32_TO_BF16_WGSL: &str = "fn f32_to_bf16_bits(x: f32) -> u32 {\n    \
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

/// The packing kernel for one storage type: `load_x` accessor, then pack_rows.wgsl.
pub fn pack_source(storage: Storage) -> String {
    let mut src = String::new();
    if storage == Storage::F16Native {
        src.push_str("enable f16;\n");
    }
    src.push_str(&load_accessor(storage, 1, "x"));
    src.push_str(PACK_ROWS_WGSL);
    src
}

/// Every kernel specialisation the engine can build for these dims: all storage types (tiled;
/// the unrolled family is f32 only) × causal
/// on/off × variants × `mods` × (tiled) the tile configurations given or (unrolled) the tile
/// the planner picks. Used by the naga validation test.
pub fn variants(
    family: Family,
    dims: &[(u32, u32)],
    tiles: &[TileConfig],
    mods: &[ModifierSet],
) -> Vec<KernelKey> {
    let mut keys = Vec::new();
    // The unrolled family computes in f32 only; other types are converted at its edges.
    let storages: &[Storage] = match family {
        Family::Tiled => &Storage::ALL,
        Family::Unrolled => &[Storage::F32],
    };
    for &storage in storages {
        for &(head_dim, value_dim) in dims {
            let tiles = match family {
                Family::Tiled => tiles.to_vec(),
                Family::Unrolled => vec![unrolled_tile(head_dim, value_dim)],
            };
            for tile in tiles {
                for (causal, variant) in [false, true]
                    .into_iter()
                    .flat_map(|c| VariantKind::ALL.map(|v| (c, v)))
                {
                    for &mods in mods {
                        keys.push(KernelKey {
                            variant,
                            family,
                            storage,
                            head_dim,
                            value_dim,
                            tile,
                            causal,
                            mods,
                        });
                    }
                }
            }
        }
    }
    keys
}

/// One of linear.wgsl's entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearPass {
    /// Each chunk's own decayed state (parallel over chunks).
    ChunkState,
    /// The state before each chunk and the final state (sequential over chunks).
    ChunkPrefix,
    /// The output rows: intra-chunk quadratic part plus the carried state.
    ChunkOutput,
    /// The token-by-token recurrence, for decoding.
    Recurrent,
}

impl LinearPass {
    pub const ALL: [LinearPass; 4] = [
        LinearPass::ChunkState,
        LinearPass::ChunkPrefix,
        LinearPass::ChunkOutput,
        LinearPass::Recurrent,
    ];
    pub fn entry_point(self) -> &'static str {
        match self {
            LinearPass::ChunkState => "linear_chunk_state",
            LinearPass::ChunkPrefix => "linear_chunk_prefix",
            LinearPass::ChunkOutput => "linear_chunk_output",
            LinearPass::Recurrent => "linear_recurrent",
        }
    }
}

/// Rows per invocation of the chunked output pass for these dims and chunk: as many (4, 2 or 1)
/// as divide the chunk, with ROWS × max(D4, DV4) at most 32 vec4s per private array: more rows
/// save texel fetches but llvmpipe compiles their unrolled code slowly (docs/PERF.md).
pub fn linear_rows(key_dim: u32, value_dim: u32, chunk: u32) -> u32 {
    let widest = key_dim.max(value_dim).div_ceil(4).max(1);
    [4, 2, 1]
        .into_iter()
        .find(|&rows| chunk.is_multiple_of(rows) && rows * widest <= 32)
        .unwrap_or(1)
}

/// Everything that selects one compiled linear-attention pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinearKey {
    pub pass: LinearPass,
    pub storage: Storage,
    pub key_dim: u32,
    pub value_dim: u32,
    pub feature_map: crate::FeatureMap,
    pub normalize: bool,
    /// Tokens per invocation of [`LinearPass::ChunkOutput`] (1 for the other passes).
    pub rows: u32,
}

impl LinearKey {
    /// `linear_chunk_output f16 d64 dv64 elu+1 normalize`.
    pub fn label(&self) -> String {
        format!(
            "{} {} d{} dv{} rows{} {}{}",
            self.pass.entry_point(),
            self.storage.name(),
            self.key_dim,
            self.value_dim,
            self.rows,
            self.feature_map.name(),
            if self.normalize { " normalize" } else { "" }
        )
    }

    /// The prelude (accessors for the storage type, dims, feature map), then linear.wgsl with
    /// its dim loops written out.
    pub fn source(&self) -> String {
        let mut src = String::new();
        if self.storage == Storage::F16Native {
            src.push_str("enable f16;\n");
        }
        src.push_str(&load_accessor(self.storage, 1, "q"));
        src.push_str(&load_accessor(self.storage, 12, "k"));
        src.push_str(&load_accessor(self.storage, 13, "v"));
        src.push_str(&store_accessor(self.storage, 4, "o"));
        let counts = [
            ("D4", self.key_dim.div_ceil(4)),
            ("DV4", self.value_dim.div_ceil(4)),
            ("ROWS", self.rows),
        ];
        for (name, value) in counts {
            src.push_str(&format!("const {name}: u32 = {value}u;\n"));
        }
        src.push_str(&format!(
            "const KEY_DIM: u32 = {}u;\nconst VALUE_DIM: u32 = {}u;\nconst FEATURE: u32 = {}u;\nconst NORMALIZE: bool = {};\n",
            self.key_dim,
            self.value_dim,
            self.feature_map.code(),
            self.normalize
        ));
        src.push_str(&expand_unrolls(LINEAR_WGSL, &counts));
        src
    }
}

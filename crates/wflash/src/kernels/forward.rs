//! The forward attention kernels (flash_fwd.wgsl, flash_fwd_unrolled.wgsl): their tiles,
//! variants and specialisation key.

use super::binding;
use super::wgsl::{
    Storage, Wgsl, expand_unrolls, file, load_accessor, store_accessor, texture_accessor,
};
use crate::{Modifier, ModifierSet};

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

impl super::Kernel for KernelKey {
    fn label(&self) -> String {
        KernelKey::label(self)
    }
    fn source(&self) -> String {
        KernelKey::source(self)
    }
    fn entry_point(&self) -> &'static str {
        "flash_fwd"
    }
    fn constants(&self) -> Vec<(&'static str, f64)> {
        KernelKey::constants(self)
    }
}

/// Query rows per workgroup the tiled kernel may run with (a tuning picks among them).
pub const TILED_BLOCK_MS: [u32; 3] = [32, 64, 128];
/// Keys per K/V tile the tiled kernel may run with.
pub const TILED_BLOCK_NS: [u32; 5] = [4, 8, 16, 32, 64];

/// Every tile of the tiled kernel (the engine keeps those that fit the adapter).
pub fn tiled_tiles() -> Vec<TileConfig> {
    TILED_BLOCK_MS
        .into_iter()
        .flat_map(|block_m| TILED_BLOCK_NS.map(|block_n| TileConfig { block_m, block_n }))
        .collect()
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
        let mut src = Wgsl::new();
        if self.storage == Storage::F16Native {
            src.push("enable f16;");
        }
        load_accessor(&mut src, self.storage, binding::Q, "q");
        store_accessor(&mut src, self.storage, binding::O, "o");
        src.push(&format!(
            "const SIGMOID: bool = {};",
            self.variant == VariantKind::Sigmoid
        ));
        modifier_prelude(&mut src, self.mods);
        match self.family {
            Family::Tiled => {
                src.push(&format!("const BLOCK_N: u32 = {}u;", self.tile.block_n));
                load_accessor(&mut src, self.storage, binding::K, "k");
                load_accessor(&mut src, self.storage, binding::V, "v");
                src.file("flash_fwd.wgsl");
            }
            Family::Unrolled => {
                let counts = self.unrolled_counts();
                for (name, value) in counts {
                    src.push(&format!("const {name}: u32 = {value}u;"));
                }
                src.push(&format!(
                    "const HEAD_DIM: u32 = {}u;\nconst VALUE_DIM: u32 = {}u;\nconst CAUSAL: bool = {};",
                    self.head_dim, self.value_dim, self.causal
                ));
                src.push(&expand_unrolls(file("flash_fwd_unrolled.wgsl"), &counts));
            }
        }
        src.finish()
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

/// The compiled modifiers' part of a kernel's prelude (forward and backward): a `const` per
/// compiled modifier, on or off, and the bias and key-mask texture readers (`bias4`,
/// `key_mask4`; zeros, and no binding, when the modifier is off).
pub(super) fn modifier_prelude(src: &mut Wgsl, mods: ModifierSet) {
    for modifier in Modifier::ALL {
        if let Some(name) = modifier.compiled() {
            let on = mods.contains(modifier);
            src.push(&format!("const {name}: bool = {on};"));
        }
    }
    let bias = mods.contains(Modifier::Bias);
    texture_accessor(src, bias, binding::BIAS, "bias4", "bias");
    let key_mask = mods.contains(Modifier::KeyMask);
    texture_accessor(src, key_mask, binding::KEY_MASK, "key_mask4", "mask");
}

/// Bytes of workgroup memory: a K tile and a V-slice tile of `block_n` keys, and the accumulators.
pub fn workgroup_bytes(block_m: u32, block_n: u32, head_dim: u32, value_dim: u32) -> u32 {
    (block_n * (head_dim + value_dim.min(PRIVATE_DIM_MAX))
        + value_dim.min(PRIVATE_DIM_MAX) * block_m)
        * 4
}

/// The forward kernels of `family` at these dims: every storage type it computes in (the
/// unrolled family is f32 only) × `tiles` × causal on/off × variants × `mods`.
pub(super) fn variants(
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
            for &tile in tiles {
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

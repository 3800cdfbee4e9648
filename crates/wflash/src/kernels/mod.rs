//! Kernels: what each pipeline compiles from. A [`Kernel`] is a label, a WGSL source, an entry
//! point and `override` constants; [`KernelId`] names every kernel the engine can build (the
//! pipeline cache's key), and [`all_variants`] enumerates them for naga validation.
//!
//! A kernel's source is a generated prelude (the storage bindings with their typed accessors,
//! so one WGSL body serves f32, native f16 and u32-packed f16/bf16, and the `const`s that size
//! private arrays or switch compiled modifiers) followed by the family's file in `shaders/`.
//! Everything else is a WGSL `override` constant or runtime data.

mod backward;
pub mod binding;
mod decode;
mod forward;
mod linear;
mod passes;
mod wgsl;

pub use backward::{
    BACKWARD_MAX_ROWS, BACKWARD_MAX_ROWS_BROWSER_CPU, BackwardKey, BackwardPass, ReduceKernel,
    backward_rows,
};
pub use decode::{DecodeKey, DecodePass, max_decode_rows};
pub use forward::{
    Family, KernelKey, PRIVATE_DIM_MAX, TILED_BLOCK_MS, TILED_BLOCK_NS, TileConfig, UNROLLED_KEYS,
    UNROLLED_LANES, VariantKind, dim_capacity, tiled_tiles, unrolled_tile, unrolled_tiles,
    workgroup_bytes,
};
pub use linear::{LinearKey, LinearPass, linear_rows};
pub use passes::{Conversion, MergeKernel, PackKernel};
pub use wgsl::{Storage, expand_unrolls};

use crate::{FeatureMap, ModifierSet};

/// The most storage buffers one kernel's entry point binds (the naga test checks every variant
/// against it); an engine refuses a device whose `max_storage_buffers_per_shader_stage` is
/// below it.
pub const STORAGE_BUFFERS_PER_KERNEL: u32 = 9;
/// The most (storage) textures one kernel's entry point binds; an engine refuses a device whose
/// `max_storage_textures_per_shader_stage` is below it. WebGPU's default limit is 4.
pub const TEXTURES_PER_KERNEL: u32 = 4;

/// One compilable kernel: everything `create_compute_pipeline` needs.
pub trait Kernel {
    /// The wgpu label; unique per specialisation (`flash_fwd softmax tiled f16 bm64 ...`).
    fn label(&self) -> String;
    /// The complete WGSL source.
    fn source(&self) -> String;
    fn entry_point(&self) -> &'static str;
    /// Values of the source's `override` constants.
    fn constants(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
}

/// Every kernel the engine can build, by family: the pipeline cache's key. A new operation's
/// kernels are one more variant here, with their own key type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelId {
    Forward(KernelKey),
    Pack(PackKernel),
    Convert(Conversion),
    Linear(LinearKey),
    Backward(BackwardKey),
    Reduce(ReduceKernel),
    Merge(MergeKernel),
    Decode(DecodeKey),
}

impl KernelId {
    fn kernel(&self) -> &dyn Kernel {
        match self {
            KernelId::Forward(k) => k,
            KernelId::Pack(k) => k,
            KernelId::Convert(k) => k,
            KernelId::Linear(k) => k,
            KernelId::Backward(k) => k,
            KernelId::Reduce(k) => k,
            KernelId::Merge(k) => k,
            KernelId::Decode(k) => k,
        }
    }
}

impl Kernel for KernelId {
    fn label(&self) -> String {
        self.kernel().label()
    }
    fn source(&self) -> String {
        self.kernel().source()
    }
    fn entry_point(&self) -> &'static str {
        self.kernel().entry_point()
    }
    fn constants(&self) -> Vec<(&'static str, f64)> {
        self.kernel().constants()
    }
}

/// Every kernel the engine can build at these (head dim, value dim) pairs (dims are the one
/// axis too large to walk; every other axis is walked whole): forward kernels of both families
/// in every storage type the family computes in, every tile the planner or a tuning may choose,
/// causal or not, softmax and sigmoid, every subset of the compiled modifiers; the packing and
/// conversion passes; the linear passes in every storage type, feature map and normaliser
/// setting (key and value dims capped at the linear kernels' limit; output-pass rows 1, 2, 4);
/// the backward passes (see `backward::variants`).
pub fn all_variants(dims: &[(u32, u32)]) -> Vec<KernelId> {
    let mut kernels = Vec::new();
    let mods: Vec<ModifierSet> = ModifierSet::all_compiled().subsets().collect();
    for family in [Family::Tiled, Family::Unrolled] {
        for &(head_dim, value_dim) in dims {
            let tiles = match family {
                Family::Tiled => tiled_tiles(),
                Family::Unrolled => unrolled_tiles(head_dim, value_dim),
            };
            kernels.extend(
                forward::variants(family, &[(head_dim, value_dim)], &tiles, &mods)
                    .into_iter()
                    .map(KernelId::Forward),
            );
        }
    }
    for storage in Storage::ALL {
        kernels.push(KernelId::Pack(PackKernel(storage)));
        kernels.push(KernelId::Convert(Conversion::ToF32(storage)));
        kernels.push(KernelId::Convert(Conversion::FromF32(storage)));
        // The public merge (parts in the output's type) and decode's (f32 partials, softmax
        // or sigmoid's sums).
        for (parts, sum) in [
            (storage, false),
            (Storage::F32, false),
            (Storage::F32, true),
        ] {
            kernels.push(KernelId::Merge(MergeKernel {
                parts,
                output: storage,
                sum,
            }));
        }
    }
    let linear_max = crate::linear::LINEAR_MAX_DIM as u32;
    for &(key_dim, value_dim) in dims {
        let (key_dim, value_dim) = (key_dim.min(linear_max), value_dim.min(linear_max));
        for pass in LinearPass::ALL {
            let rows: &[u32] = if pass.has_rows() { &[1, 2, 4] } else { &[1] };
            for (&storage, feature_map, normalize, &rows) in
                product4(&Storage::ALL, &FeatureMap::ALL, &[false, true], rows)
            {
                kernels.push(KernelId::Linear(LinearKey {
                    pass,
                    storage,
                    key_dim,
                    value_dim,
                    feature_map: *feature_map,
                    normalize: *normalize,
                    rows,
                }));
            }
        }
    }
    kernels.extend(backward::variants(dims));
    kernels.extend(decode::variants(dims).into_iter().map(KernelId::Decode));
    kernels
}

/// The product of four slices, in order.
fn product4<'a, A, B, C, D>(
    a: &'a [A],
    b: &'a [B],
    c: &'a [C],
    d: &'a [D],
) -> impl Iterator<Item = (&'a A, &'a B, &'a C, &'a D)> {
    a.iter().flat_map(move |a| {
        b.iter().flat_map(move |b| {
            c.iter()
                .flat_map(move |c| d.iter().map(move |d| (a, b, c, d)))
        })
    })
}

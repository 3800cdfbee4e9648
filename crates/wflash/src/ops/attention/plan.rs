//! How an attention call runs: validation, kernel, tile, dispatch grid and batch splitting,
//! decided on the host before anything touches the GPU.

use crate::gpu::tensor::buffer_bytes;
use crate::kernels::{Family, KernelKey, PackKernel, Storage, UNROLLED_KEYS, VariantKind};
use crate::ops::passes::PackShape;
use crate::{
    AttentionOptions, Causal, DType, Engine, Error, Layout, ModifierSet, Result, Shape, Variant,
};

/// llvmpipe (Mesa 22.3) ends every loop of an invocation once 65535 loop iterations have run in
/// total (docs/PERF.md). On CPU adapters calls whose loop count could reach that are refused.
/// Unrolled kernel: one iteration per UNROLLED_KEYS keys, plus a few hundred elsewhere.
const CPU_UNROLLED_MAX_KV: usize = 60_000 * UNROLLED_KEYS as usize;
/// Tiled kernel: its staging and chunk loops grow with the head dim; measured correct at
/// kv_len 16384 for D=64 and 2048 for D=256 (wrong at 4096).
const CPU_TILED_MAX_KV_TIMES_CHUNKS: usize = 8192;

/// How one call runs, decided whole before anything touches the GPU: the kernel, the batch
/// elements each dispatch takes, the uniform block, the per-sequence records and the textures
/// packed ahead of the kernel. Dispatch records exactly this, slicing the call's data by
/// batch element.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The whole call's shape (a dispatch takes `batch_per_dispatch` of its batch elements).
    pub shape: Shape,
    pub key: KernelKey,
    /// How Q, K, V and O are stored (the kernel's `key.storage` is f32 for the unrolled
    /// family, which converts Q and O at its edges).
    pub io_storage: Storage,
    /// Batch elements per dispatch; less than the batch when buffers would exceed a limit.
    pub batch_per_dispatch: usize,
    /// Workgroups along x (query tiles × value slices); y is heads, z the dispatch's batch
    /// elements or varlen sequences.
    pub query_tiles: u32,
    /// The uniform block of every dispatch of the call.
    pub params: FlashParams,
    /// One record per batch element of the call, or per varlen sequence.
    pub sequences: Vec<SequenceInfo>,
    /// `row_data`'s per-head part: ALiBi slopes, then sinks (zeros where absent); a
    /// dispatch appends its batch elements' temperatures.
    pub head_data: Vec<f32>,
    /// The textures the kernel reads, in binding order, each packed by a pass before it.
    pub packs: Vec<PackPlan>,
}

/// What a packed texture holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packed {
    K,
    V,
    Bias,
    KeyMask,
}

/// One texture the kernel reads and the pack_rows pass that fills it. `shape.batch` is one
/// dispatch's batch elements (1 for a bias broadcast over the batch).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PackPlan {
    pub what: Packed,
    pub kernel: PackKernel,
    pub shape: PackShape,
}

impl Engine {
    /// Checks a call and decides how it runs, without touching the GPU: the kernel
    /// (`forward_kernel`), the dispatch grid, the batch split and texture geometry
    /// (`batch_split`), the uniform block, the sequences and the packing passes.
    pub fn plan(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        dtype: DType,
    ) -> Result<Plan> {
        self.plan_family(shape, layout, opts, dtype, self.family())
    }

    /// [`Engine::plan`] for the kernel family `family` (the backward plans its K/V packing as
    /// the unrolled family's).
    pub(crate) fn plan_family(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        dtype: DType,
        family: Family,
    ) -> Result<Plan> {
        let (key, storage) = self.forward_kernel(shape, opts, dtype, family)?;
        let query_tiles = self.query_tiles(shape, opts, &key)?;
        let (
            batch_per_dispatch,
            Folds {
                tex_fold,
                bias_fold,
                mask_fold,
            },
        ) = self.batch_split(shape, opts, &key, dtype)?;
        let family = key.family;
        let limits = &self.inner.info.limits;
        let batch_per_dispatch = batch_per_dispatch.min(shape.batch);
        let max_groups = limits.max_compute_workgroups_per_dimension;
        let mut params = flash_params(shape, layout, opts)?;
        let key_width4 = shape.kv_len.div_ceil(4) as u32;
        let mut packs = Vec::new();
        let pack = |what, storage, shape| PackPlan {
            what,
            kernel: PackKernel(storage),
            shape,
        };
        if family == Family::Unrolled {
            let rows_per_head = tex_rows_per_head(shape, opts);
            params.tex_rows_per_head = rows_per_head as u32;
            params.tex_rows_per_batch = if opts.varlen.is_some() {
                0
            } else {
                (shape.kv_heads * rows_per_head) as u32
            };
            params.tex_fold = tex_fold;
            for (what, dim, stride) in [
                (Packed::K, shape.head_dim, params.k_stride),
                (Packed::V, shape.value_dim, params.v_stride),
            ] {
                let pack_shape = PackShape {
                    stride,
                    first_head: 0,
                    heads: shape.kv_heads,
                    batch: batch_per_dispatch,
                    seq_len: shape.kv_len,
                    rows_per_head,
                    dim,
                    fold: tex_fold,
                    max_groups,
                };
                packs.push(pack(what, storage, pack_shape));
            }
        }
        if let Some(bias) = opts.bias {
            params.bias_batch_rows = if bias.batch == 1 {
                0
            } else {
                (bias.heads * shape.q_len) as u32
            };
            params.bias_head_rows = if bias.heads == 1 {
                0
            } else {
                shape.q_len as u32
            };
            params.bias_fold = bias_fold;
            params.bias_width4 = key_width4;
            let pack_shape = PackShape {
                stride: [
                    (bias.heads * shape.q_len * shape.kv_len) as u32,
                    (shape.q_len * shape.kv_len) as u32,
                    shape.kv_len as u32,
                    1,
                ],
                first_head: 0,
                heads: bias.heads,
                batch: if bias.batch == 1 {
                    1
                } else {
                    batch_per_dispatch
                },
                seq_len: shape.q_len,
                rows_per_head: shape.q_len,
                dim: shape.kv_len,
                fold: bias_fold,
                max_groups,
            };
            packs.push(pack(
                Packed::Bias,
                self.storage_for(bias.values.dtype())?,
                pack_shape,
            ));
        }
        if opts.key_mask.is_some() {
            params.mask_fold = mask_fold;
            params.mask_width4 = key_width4;
            let kv_len = shape.kv_len as u32;
            let pack_shape = PackShape {
                stride: [kv_len, kv_len, kv_len, 1],
                first_head: 0,
                heads: 1,
                batch: batch_per_dispatch,
                seq_len: 1,
                rows_per_head: 1,
                dim: shape.kv_len,
                fold: mask_fold,
                max_groups,
            };
            // Packed in its additive form: 0 where a key takes part, -inf where it is hidden.
            packs.push(pack(Packed::KeyMask, Storage::F32, pack_shape));
        }
        Ok(Plan {
            shape: *shape,
            key,
            io_storage: storage,
            batch_per_dispatch,
            query_tiles: query_tiles as u32,
            params,
            sequences: sequence_infos(shape, opts)?,
            head_data: head_data(shape, opts),
            packs,
        })
    }

    /// Validates the call and picks its kernel: family, tile (within llvmpipe's loop limit on
    /// CPU adapters), storage path, compiled modifiers. Returns the key and the storage of Q,
    /// K, V and O (the unrolled family computes in f32 and converts at its edges).
    fn forward_kernel(
        &self,
        shape: &Shape,
        opts: &AttentionOptions<'_>,
        dtype: DType,
        family: Family,
    ) -> Result<(KernelKey, Storage)> {
        shape.validate()?;
        opts.resolved_scale(shape)?;
        opts.validate_modifiers(shape)?;
        opts.resolved_sigmoid_bias(shape.kv_len)?;
        let storage = self.storage_for(dtype)?;
        if let Some(bias) = opts.bias {
            self.storage_for(bias.values.dtype())?;
        }
        let on_cpu = self.inner.info.device_type == wgpu::DeviceType::Cpu;
        let tile = match family {
            Family::Tiled => {
                if on_cpu {
                    let chunks = shape
                        .head_dim
                        .div_ceil(64)
                        .max(shape.value_dim.div_ceil(64));
                    let max_kv = CPU_TILED_MAX_KV_TIMES_CHUNKS / chunks;
                    if shape.kv_len > max_kv {
                        return Err(Error::TooLarge {
                            limit: "CPU driver loop limit (65535 loop iterations per invocation)",
                            needed: shape.kv_len as u64,
                            max: max_kv as u64,
                            hint: " keys for the tiled kernel at this head dim (the unrolled family, the default on CPU adapters, takes more)",
                        });
                    }
                }
                self.tile_for(family, shape.head_dim as u32, shape.value_dim as u32)?
            }
            Family::Unrolled => {
                if on_cpu && shape.kv_len > CPU_UNROLLED_MAX_KV {
                    return Err(Error::TooLarge {
                        limit: "CPU driver loop limit (65535 loop iterations per invocation)",
                        needed: shape.kv_len as u64,
                        max: CPU_UNROLLED_MAX_KV as u64,
                        hint: " keys",
                    });
                }
                self.tile_for(family, shape.head_dim as u32, shape.value_dim as u32)?
            }
        };
        // The unrolled family computes in f32; other types are converted at its edges.
        let kernel_storage = match family {
            Family::Tiled => storage,
            Family::Unrolled => Storage::F32,
        };
        let key = KernelKey {
            family,
            storage: kernel_storage,
            head_dim: shape.head_dim as u32,
            value_dim: shape.value_dim as u32,
            tile,
            causal: opts.causal.is_some(),
            variant: VariantKind::of(&opts.variant),
            mods: ModifierSet::compiled_of(ModifierSet::of(opts)),
        };
        Ok((key, storage))
    }

    /// Workgroups along x (query tiles × value slices), with the grid checked against the
    /// adapter's limit in every dimension.
    fn query_tiles(
        &self,
        shape: &Shape,
        opts: &AttentionOptions<'_>,
        key: &KernelKey,
    ) -> Result<u64> {
        let block_m = key.tile.block_m;
        let limits = &self.inner.info.limits;

        // A dispatch's rows are the longest sequence's (varlen) or q_len.
        let rows = opts.varlen.map_or(shape.q_len, |v| {
            v.spans().map(|(_, q_len, _, _)| q_len).max().unwrap_or(0)
        });
        let max_groups = u64::from(limits.max_compute_workgroups_per_dimension);
        let query_tiles =
            (rows.max(1) as u64).div_ceil(u64::from(block_m)) * u64::from(key.value_slices());
        let sequences = opts.varlen.map_or(1, |v| v.sequences()) as u64;
        for (needed, what) in [
            (query_tiles, " (query tiles × value slices)"),
            (shape.q_heads as u64, " (q_heads)"),
            (sequences, " (varlen sequences)"),
        ] {
            if needed > max_groups {
                return Err(Error::TooLarge {
                    limit: "max_compute_workgroups_per_dimension",
                    needed,
                    max: max_groups,
                    hint: what,
                });
            }
        }

        Ok(query_tiles)
    }

    /// Batch elements per dispatch (every binding within the adapter's limits, every index
    /// within u32, every packed texture within max_texture_dimension_2d) and the packed
    /// textures' rows per line.
    fn batch_split(
        &self,
        shape: &Shape,
        opts: &AttentionOptions<'_>,
        key: &KernelKey,
        dtype: DType,
    ) -> Result<(usize, Folds)> {
        let limits = &self.inner.info.limits;
        let max_groups = u64::from(limits.max_compute_workgroups_per_dimension);
        // Batch is outermost in both layouts, so a dispatch can take any run of batch elements.
        let per_batch_elems = [
            shape.q_elems() / shape.batch,
            shape.k_elems() / shape.batch,
            shape.v_elems() / shape.batch,
            shape.o_elems() / shape.batch,
        ];
        let largest = per_batch_elems
            .into_iter()
            .max()
            .unwrap_or(1)
            .max(shape.q_heads * shape.q_len);
        // A bias with a batch axis is uploaded a run of batch elements at a time too.
        let per_batch_bias = opts.bias.filter(|b| b.batch == shape.batch);
        let bias_elems = per_batch_bias.map_or(0, |b| b.heads * shape.q_len * shape.kv_len);
        let bias_bytes = per_batch_bias.map_or(0, |b| buffer_bytes(b.values.dtype(), bias_elems));
        let index_elems = largest.max(bias_elems);
        let per_batch_bytes = buffer_bytes(key.storage.dtype(), largest)
            .max(buffer_bytes(dtype, largest))
            .max(buffer_bytes(DType::F32, shape.q_heads * shape.q_len))
            .max(bias_bytes);
        let binding_limit = self.inner.info.max_binding_bytes();
        // Kernel index arithmetic is u32: every element index of a dispatch must fit.
        let index_limit = u64::from(u32::MAX);
        let mut batch_per_dispatch = (binding_limit / per_batch_bytes)
            .min(index_limit / index_elems as u64)
            .min(max_groups)
            .min(shape.batch as u64) as usize;
        if batch_per_dispatch == 0 {
            let (limit, needed, max) = if index_elems as u64 > index_limit {
                ("u32 element index", index_elems as u64, index_limit)
            } else {
                (
                    "max_storage_buffer_binding_size",
                    per_batch_bytes,
                    binding_limit,
                )
            };
            return Err(Error::TooLarge {
                limit,
                needed,
                max,
                hint: " (even one batch element is too large)",
            });
        }

        // Packed textures: rows fold into lines of at most max_texture_dimension_2d texels,
        // and a texture has at most that many lines. Each constrains the batch per dispatch.
        let max_dim = u64::from(limits.max_texture_dimension_2d);
        let texture_batches = |width4: u64, rows_per_batch: u64, rows_fixed: u64, what| {
            let too_large = |needed| Error::TooLarge {
                limit: "max_texture_dimension_2d",
                needed,
                max: max_dim,
                hint: what,
            };
            if width4 > max_dim {
                return Err(too_large(width4));
            }
            let fold = max_dim / width4;
            let capacity = max_dim * fold;
            if rows_fixed > capacity
                || (rows_per_batch > 0 && rows_per_batch + rows_fixed > capacity)
            {
                return Err(too_large((rows_per_batch + rows_fixed).div_ceil(fold)));
            }
            // A texture whose rows do not grow with the batch never limits it.
            let fits = (capacity - rows_fixed)
                .checked_div(rows_per_batch)
                .map_or(usize::MAX, |n| n as usize);
            Ok((fold as u32, fits))
        };
        let mut tex_fold = 0;
        if key.family == Family::Unrolled {
            let widest = (shape.head_dim.max(shape.value_dim) as u64).div_ceil(4);
            let rows = (shape.kv_heads * tex_rows_per_head(shape, opts)) as u64;
            let (fold, fits) = texture_batches(
                widest,
                rows,
                0,
                " texture lines for K/V of one batch element",
            )?;
            batch_per_dispatch = batch_per_dispatch.min(fits);
            tex_fold = fold;
        }
        let key_width4 = (shape.kv_len as u64).div_ceil(4);
        let mut bias_fold = 0;
        if let Some(bias) = opts.bias {
            let rows = (bias.heads * shape.q_len) as u64;
            let (per_batch, fixed) = if bias.batch == 1 {
                (0, rows)
            } else {
                (rows, 0)
            };
            let (fold, fits) = texture_batches(
                key_width4,
                per_batch,
                fixed,
                " texels or lines for the bias",
            )?;
            batch_per_dispatch = batch_per_dispatch.min(fits);
            bias_fold = fold;
        }
        let mut mask_fold = 0;
        if opts.key_mask.is_some() {
            let (fold, fits) =
                texture_batches(key_width4, 1, 0, " texels or lines for the key mask")?;
            batch_per_dispatch = batch_per_dispatch.min(fits);
            mask_fold = fold;
        }
        Ok((
            batch_per_dispatch,
            Folds {
                tex_fold,
                bias_fold,
                mask_fold,
            },
        ))
    }
}

/// Packed rows per texture line: K/V (unrolled family), the bias, the key mask (0 when absent).
struct Folds {
    tex_fold: u32,
    bias_fold: u32,
    mask_fold: u32,
}

/// Packed K/V rows per kv head: the keys rounded up to the unrolled kernel's key step (varlen:
/// one step more, since a sequence's last step may start up to 3 rows before the total).
pub(super) fn tex_rows_per_head(shape: &Shape, opts: &AttentionOptions<'_>) -> usize {
    let keys = UNROLLED_KEYS as usize;
    shape.kv_len.next_multiple_of(keys) + if opts.varlen.is_some() { keys } else { 0 }
}

/// The uniform block of the forward kernels (`struct Params` in flash_common.wgsl); a test
/// checks the layout against naga's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FlashParams {
    pub q_heads: u32,
    pub kv_heads: u32,
    /// Unrolled family: packed K/V rows per kv head and per batch element (0 for varlen).
    pub tex_rows_per_head: u32,
    pub tex_rows_per_batch: u32,
    pub q_stride: [u32; 4],
    pub k_stride: [u32; 4],
    pub v_stride: [u32; 4],
    pub o_stride: [u32; 4],
    /// (batch, head) strides of per-row data (LSE, temperature).
    pub row_batch_stride: u32,
    pub row_head_stride: u32,
    /// Unrolled family: packed K/V rows per texture line.
    pub tex_fold: u32,
    /// `HAS_SINKS` (1) | `HAS_TEMPERATURE` (2).
    pub flags: u32,
    /// What Q is multiplied by: `scale · log2 e` (softmax) or `scale` (sigmoid).
    pub q_scale: f32,
    /// `log2 e` (softmax) or 1 (sigmoid).
    pub score_unit: f32,
    /// `softcap · score_unit`.
    pub softcap: f32,
    /// Window bounds left/right of the diagonal; -1 for unbounded.
    pub window_left: i32,
    pub window_right: i32,
    pub bias_batch_rows: u32,
    pub bias_head_rows: u32,
    pub bias_fold: u32,
    pub bias_width4: u32,
    pub mask_fold: u32,
    pub mask_width4: u32,
    /// Prefix-LM: keys before it are visible past the causal bound (0: none).
    pub prefix_len: u32,
    /// Chunked local attention: keys per chunk (0: none).
    pub chunk: u32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
}

/// One batch element or varlen sequence (`struct Sequence` in flash_common.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SequenceInfo {
    pub q_offset: u32,
    pub q_len: u32,
    pub kv_offset: u32,
    pub kv_len: u32,
    /// Keys outside `[key_lo, key_hi)` are hidden from every row (the key mask's span).
    pub key_lo: u32,
    pub key_hi: u32,
    pub diag_offset: i32,
    pub sigmoid_bias: f32,
}

const HAS_SINKS: u32 = 1;
const HAS_TEMPERATURE: u32 = 2;

/// Diagonal offsets and window sides are clamped to ±FAR so the kernel's i32 sums cannot
/// overflow; a bound that far out already means "every key" or "no key" for any problem that fits.
const FAR: i64 = 1 << 30;

/// The per-sequence records of the whole call: one per batch element, or per varlen sequence.
fn sequence_infos(shape: &Shape, opts: &AttentionOptions<'_>) -> Result<Vec<SequenceInfo>> {
    let info =
        |q_offset: usize, q_len: usize, kv_offset: usize, kv_len: usize, keys: (usize, usize)| {
            let diag_offset = match opts.causal {
                Some(Causal::TopLeft) => 0,
                Some(Causal::BottomRight) | None => kv_len as i64 - q_len as i64,
            };
            Ok(SequenceInfo {
                q_offset: q_offset as u32,
                q_len: q_len as u32,
                kv_offset: kv_offset as u32,
                kv_len: kv_len as u32,
                key_lo: keys.0 as u32,
                key_hi: keys.1 as u32,
                diag_offset: diag_offset.clamp(-FAR, FAR) as i32,
                sigmoid_bias: opts.resolved_sigmoid_bias(kv_len)?,
            })
        };
    if let Some(varlen) = opts.varlen {
        return varlen
            .spans()
            .map(|(q0, nq, k0, nk)| info(q0, nq, k0, nk, (0, nk)))
            .collect();
    }
    (0..shape.batch)
        .map(|b| {
            // The key mask's span: first to last key that takes part (none: an empty span).
            let keys = opts.key_mask.map_or((0, shape.kv_len), |mask| {
                let row = &mask[b * shape.kv_len..(b + 1) * shape.kv_len];
                match (row.iter().position(|&x| x), row.iter().rposition(|&x| x)) {
                    (Some(first), Some(last)) => (first, last + 1),
                    _ => (0, 0),
                }
            });
            info(0, shape.q_len, 0, shape.kv_len, keys)
        })
        .collect()
}

/// `row_data`'s per-head part: ALiBi slopes and sinks per query head (zeros when absent).
fn head_data(shape: &Shape, opts: &AttentionOptions<'_>) -> Vec<f32> {
    let heads = shape.q_heads;
    let mut data = Vec::with_capacity(2 * heads);
    data.extend_from_slice(opts.alibi_slopes.unwrap_or(&vec![0.0; heads]));
    data.extend_from_slice(opts.sinks.unwrap_or(&vec![0.0; heads]));
    data
}

/// The uniform values of a call, before its texture geometries. Plan has already bounded every
/// index to u32.
fn flash_params(shape: &Shape, layout: Layout, opts: &AttentionOptions<'_>) -> Result<FlashParams> {
    // A varlen dispatch's z index is the sequence, not a batch element: no batch stride.
    let batch_strides = opts.varlen.is_none() as usize;
    let stride = |heads: usize, seq: usize, dim: usize| {
        let [b, h, s] = layout.strides(heads, seq, dim);
        [(b * batch_strides) as u32, h as u32, s as u32, 1]
    };
    // Clamped in usize: a bound of 2⁶³ or more must not wrap to a negative i64.
    let far = FAR as usize;
    let side = |bound: Option<usize>| bound.map_or(-1, |b| b.min(far) as i32);
    let window = opts.window.unwrap_or_default();
    let score_unit = match opts.variant {
        Variant::Softmax => std::f32::consts::LOG2_E,
        Variant::Sigmoid { .. } => 1.0,
    };
    Ok(FlashParams {
        q_heads: shape.q_heads as u32,
        kv_heads: shape.kv_heads as u32,
        tex_rows_per_head: 0,
        tex_rows_per_batch: 0,
        q_stride: stride(shape.q_heads, shape.q_len, shape.head_dim),
        k_stride: stride(shape.kv_heads, shape.kv_len, shape.head_dim),
        v_stride: stride(shape.kv_heads, shape.kv_len, shape.value_dim),
        o_stride: stride(shape.q_heads, shape.q_len, shape.value_dim),
        row_batch_stride: (shape.q_heads * shape.q_len * batch_strides) as u32,
        row_head_stride: shape.q_len as u32,
        tex_fold: 0,
        flags: if opts.sinks.is_some() { HAS_SINKS } else { 0 }
            | if opts.temperature.is_some() {
                HAS_TEMPERATURE
            } else {
                0
            },
        q_scale: opts.resolved_scale(shape)? * score_unit,
        score_unit,
        softcap: opts.softcap.unwrap_or(1.0) * score_unit,
        window_left: side(window.left),
        window_right: side(window.right),
        bias_batch_rows: 0,
        bias_head_rows: 0,
        bias_fold: 1,
        bias_width4: 0,
        mask_fold: 1,
        mask_width4: 0,
        // Clamped so the kernel's i32 chunk bounds cannot overflow (see FAR).
        prefix_len: opts.prefix_len.map_or(0, |p| p.min(far) as u32),
        chunk: opts.chunk.map_or(0, |c| c.min(far - 1) as u32),
        _pad0: 0,
        _pad1: 0,
        _pad2: 0,
    })
}

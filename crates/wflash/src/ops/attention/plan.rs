//! How an attention call runs: validation, kernel, tile, dispatch grid and batch splitting,
//! decided on the host before anything touches the GPU.

use super::dispatch::{FlashParams, SequenceInfo, flash_params, head_data, sequence_infos};
use crate::gpu::tensor::buffer_bytes;
use crate::kernels::{Family, KernelKey, PackKernel, Storage, UNROLLED_KEYS, VariantKind};
use crate::ops::passes::PackShape;
use crate::{AttentionOptions, DType, Engine, Error, Layout, ModifierSet, Result, Shape};

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
        let (key, storage) = self.forward_kernel(shape, opts, dtype)?;
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
    ) -> Result<(KernelKey, Storage)> {
        shape.validate()?;
        opts.resolved_scale(shape)?;
        opts.validate_modifiers(shape)?;
        opts.resolved_sigmoid_bias(shape.kv_len)?;
        let storage = self.storage_for(dtype)?;
        if let Some(bias) = opts.bias {
            self.storage_for(bias.values.dtype())?;
        }
        let family = self.family();
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
        let per_batch_bytes = buffer_bytes(key.storage.dtype(), largest)
            .max(buffer_bytes(dtype, largest))
            .max(buffer_bytes(DType::F32, shape.q_heads * shape.q_len));
        let binding_limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        // Kernel index arithmetic is u32: every element index of a dispatch must fit.
        let index_limit = u64::from(u32::MAX);
        let mut batch_per_dispatch = (binding_limit / per_batch_bytes)
            .min(index_limit / largest as u64)
            .min(max_groups)
            .min(shape.batch as u64) as usize;
        if batch_per_dispatch == 0 {
            let (limit, needed, max) = if largest as u64 > index_limit {
                ("u32 element index", largest as u64, index_limit)
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

//! Attention calls: validation, planning, dispatch.

use crate::engine::{Inner, PipelineKey};
use crate::kernel::{Conversion, Family, KernelKey, Storage, UNROLLED_KEYS, VariantKind};
use crate::pool::Scratch;
use crate::tensor::{buffer_bytes, buffer_with_contents};
use crate::types::check_len;
use crate::{
    Attention, AttentionOptions, BiasValues, Causal, DType, Element, Engine, Error, Layout,
    Modifier, ModifierSet, Result, Shape, Tensor, Variant,
};

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

/// The uniform block of `pack_rows.wgsl` (`struct PackParams`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PackParams {
    pub stride: [u32; 4],
    pub heads: u32,
    pub seq_len: u32,
    pub dim: u32,
    pub width4: u32,
    pub rows_per_head: u32,
    pub fold: u32,
    pub texels: u32,
    pub groups_x: u32,
}

/// llvmpipe (Mesa 22.3) ends every loop of an invocation once 65535 loop iterations have run in
/// total (docs/PERF.md). On CPU adapters calls whose loop count could reach that are refused.
/// Unrolled kernel: one iteration per UNROLLED_KEYS keys, plus a few hundred elsewhere.
const CPU_UNROLLED_MAX_KV: usize = 60_000 * UNROLLED_KEYS as usize;
/// Tiled kernel: its staging and chunk loops grow with the head dim; measured correct at
/// kv_len 16384 for D=64 and 2048 for D=256 (wrong at 4096).
const CPU_TILED_MAX_KV_TIMES_CHUNKS: usize = 8192;

/// How one call runs: which kernel, and how many batch elements each dispatch takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub key: KernelKey,
    /// How Q, K, V and O are stored (the kernel's `key.storage` is f32 for the unrolled
    /// family, which converts Q and O at its edges).
    pub io_storage: Storage,
    /// Unrolled family: packed K/V rows per texture line (see pack_rows.wgsl).
    pub tex_fold: u32,
    /// Packed bias and key-mask rows per texture line (0 without them).
    pub bias_fold: u32,
    pub mask_fold: u32,
    /// Batch elements per dispatch; less than the batch when buffers would exceed a limit.
    pub batch_per_dispatch: usize,
    /// Workgroups along x (query tiles × value slices); y is heads, z the dispatch's batch.
    pub query_tiles: u32,
}

impl Engine {
    /// Checks a call and decides how it runs, without touching the GPU.
    pub fn plan(&self, shape: &Shape, opts: &AttentionOptions<'_>, dtype: DType) -> Result<Plan> {
        shape.validate()?;
        opts.resolved_scale(shape)?;
        opts.validate_modifiers(shape)?;
        opts.resolved_sigmoid_bias(shape.kv_len)?;
        let storage = self.storage_for(dtype)?;
        if let Some(bias) = opts.bias {
            self.storage_for(bias.values.dtype())?;
        }
        let limits = &self.inner.info.limits;

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
        let block_m = tile.block_m;

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
        let per_batch_bytes = buffer_bytes(kernel_storage.dtype(), largest)
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
        if family == Family::Unrolled {
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
        Ok(Plan {
            key,
            io_storage: storage,
            tex_fold,
            bias_fold,
            mask_fold,
            batch_per_dispatch,
            query_tiles: query_tiles as u32,
        })
    }

    /// Attention on host slices: uploads, runs, reads back. Splits over batch when the problem
    /// exceeds the adapter's buffer limits.
    ///
    /// `q`, `k`, `v` hold `[batch, heads, seq, dim]` (or `[batch, seq, heads, dim]` for
    /// [`Layout::Bshd`]) elements; the output has the same layout.
    pub async fn attention<T: Element>(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> Result<Attention<T>> {
        // The shape first: its element counts are only defined (no overflow) once it is valid.
        shape.validate()?;
        check_len("q", shape.q_elems(), q.len())?;
        check_len("k", shape.k_elems(), k.len())?;
        check_len("v", shape.v_elems(), v.len())?;
        let plan = self.plan(shape, opts, T::DTYPE)?;
        let mut output = Vec::with_capacity(shape.o_elems());
        let mut lse = Vec::with_capacity(shape.lse_elems());
        let mut start = 0;
        while start < shape.batch {
            let count = plan.batch_per_dispatch.min(shape.batch - start);
            let part = Shape {
                batch: count,
                ..*shape
            };
            let range = |per_batch: usize| start * per_batch..(start + count) * per_batch;
            let q_t = self.upload(&q[range(shape.q_elems() / shape.batch)])?;
            let k_t = self.upload(&k[range(shape.k_elems() / shape.batch)])?;
            let v_t = self.upload(&v[range(shape.v_elems() / shape.batch)])?;
            let out = self.run(&plan, &part, layout, opts, start, &q_t, &k_t, &v_t)?;
            output.extend(self.read::<T>(&out.output).await?);
            if let Some(l) = &out.lse {
                lse.extend(self.read::<f32>(l).await?);
            }
            start += count;
        }
        Ok(Attention {
            output,
            lse: matches!(opts.variant, Variant::Softmax).then_some(lse),
        })
    }

    /// Blocking twin of [`Engine::attention`].
    pub fn attention_blocking<T: Element>(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> Result<Attention<T>> {
        pollster::block_on(self.attention(shape, layout, opts, q, k, v))
    }

    /// Attention on GPU-resident tensors. Submits the work and returns at once; the results stay
    /// on the GPU (read them with [`Engine::read`], or pass them to the next call).
    pub fn attention_gpu(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<GpuAttention> {
        shape.validate()?;
        let dtype = check_qkv(shape, q, k, v)?;
        let plan = self.plan(shape, opts, dtype)?;
        if plan.batch_per_dispatch < shape.batch {
            return Err(Error::TooLarge {
                limit: "max_storage_buffer_binding_size",
                needed: shape.batch as u64,
                max: plan.batch_per_dispatch as u64,
                hint: " batch elements per GPU tensor (host-slice calls split over batch; split GPU tensors yourself)",
            });
        }
        self.run(&plan, shape, layout, opts, 0, q, k, v)
    }

    /// Records and submits one dispatch: batch elements `batch0..batch0 + shape.batch` of the
    /// call (the modifiers' per-batch data is sliced from there).
    #[expect(
        clippy::too_many_arguments,
        reason = "one call's full description; private"
    )]
    fn run(
        &self,
        plan: &Plan,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        batch0: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<GpuAttention> {
        self.check_alive()?;
        let pipeline = self.pipeline(PipelineKey::Forward(plan.key))?;
        let output = self.output_tensor(q.dtype, shape.o_elems())?;
        // Sigmoid has no row statistic; its kernel writes no LSE (one element keeps the binding).
        let lse = match opts.variant {
            Variant::Softmax => self.output_tensor(DType::F32, shape.lse_elems())?,
            Variant::Sigmoid { .. } => self.output_tensor(DType::F32, 1)?,
        };
        let mut params = flash_params(shape, layout, opts)?;
        let sequences = sequence_infos(shape, opts, batch0)?;
        let row_data = row_data(shape, opts, batch0);
        if opts.sinks.is_some() {
            params.flags |= HAS_SINKS;
        }
        if opts.temperature.is_some() {
            params.flags |= HAS_TEMPERATURE;
        }
        let max_groups = self.inner.info.limits.max_compute_workgroups_per_dimension;
        let key_width4 = shape.kv_len.div_ceil(4);

        // Textures the kernel reads: packed K/V (unrolled), the bias and the key mask. Each
        // is a pack_rows pass recorded ahead of the attention pass.
        let mut packs: Vec<(PipelineKey, Tensor, PackShape, &str)> = Vec::new();
        if plan.key.family == Family::Unrolled {
            let rows_per_head = tex_rows_per_head(shape, opts);
            params.tex_rows_per_head = rows_per_head as u32;
            params.tex_rows_per_batch = if opts.varlen.is_some() {
                0
            } else {
                (shape.kv_heads * rows_per_head) as u32
            };
            params.tex_fold = plan.tex_fold;
            for (tensor, dim, stride, name) in [
                (k, shape.head_dim, params.k_stride, "packed K"),
                (v, shape.value_dim, params.v_stride, "packed V"),
            ] {
                let pack_shape = PackShape {
                    stride,
                    heads: shape.kv_heads,
                    batch: shape.batch,
                    seq_len: shape.kv_len,
                    rows_per_head,
                    dim,
                    fold: plan.tex_fold,
                    max_groups,
                };
                packs.push((
                    PipelineKey::Pack(plan.io_storage),
                    tensor.clone(),
                    pack_shape,
                    name,
                ));
            }
        }
        if let Some(bias) = opts.bias {
            let (batches, first) = if bias.batch == 1 {
                (1, 0)
            } else {
                (shape.batch, batch0)
            };
            let per_batch = bias.heads * shape.q_len * shape.kv_len;
            let range = first * per_batch..(first + batches) * per_batch;
            let tensor = match bias.values {
                BiasValues::F32(values) => self.upload(&values[range])?,
                BiasValues::F16(values) => self.upload(&values[range])?,
            };
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
            params.bias_fold = plan.bias_fold;
            params.bias_width4 = key_width4 as u32;
            let pack_shape = PackShape {
                stride: [
                    (bias.heads * shape.q_len * shape.kv_len) as u32,
                    (shape.q_len * shape.kv_len) as u32,
                    shape.kv_len as u32,
                    1,
                ],
                heads: bias.heads,
                batch: batches,
                seq_len: shape.q_len,
                rows_per_head: shape.q_len,
                dim: shape.kv_len,
                fold: plan.bias_fold,
                max_groups,
            };
            let storage = self.storage_for(bias.values.dtype())?;
            packs.push((
                PipelineKey::Pack(storage),
                tensor,
                pack_shape,
                "packed bias",
            ));
        }
        if let Some(mask) = opts.key_mask {
            // Additive form: 0 where the key takes part, -inf where it is hidden.
            let rows = &mask[batch0 * shape.kv_len..(batch0 + shape.batch) * shape.kv_len];
            let additive: Vec<f32> = rows
                .iter()
                .map(|&keep| if keep { 0.0 } else { f32::NEG_INFINITY })
                .collect();
            params.mask_fold = plan.mask_fold;
            params.mask_width4 = key_width4 as u32;
            let pack_shape = PackShape {
                stride: [
                    shape.kv_len as u32,
                    shape.kv_len as u32,
                    shape.kv_len as u32,
                    1,
                ],
                heads: 1,
                batch: shape.batch,
                seq_len: 1,
                rows_per_head: 1,
                dim: shape.kv_len,
                fold: plan.mask_fold,
                max_groups,
            };
            packs.push((
                PipelineKey::Pack(Storage::F32),
                self.upload(&additive)?,
                pack_shape,
                "packed key mask",
            ));
        }
        let pack_pipelines = packs
            .iter()
            .map(|(key, ..)| self.pipeline(*key))
            .collect::<Result<Vec<_>>>()?;
        // Q and O in f32 around a kernel that computes in f32 on other storage types.
        let converted = (plan.key.storage != plan.io_storage).then_some(());
        let q_f32 = converted
            .map(|()| self.output_tensor(DType::F32, q.len))
            .transpose()?;
        let o_f32 = converted
            .map(|()| self.output_tensor(DType::F32, output.len))
            .transpose()?;
        let to_f32 = converted
            .map(|()| self.pipeline(PipelineKey::Convert(Conversion::ToF32(plan.io_storage))))
            .transpose()?;
        let from_f32 = converted
            .map(|()| self.pipeline(PipelineKey::Convert(Conversion::FromF32(plan.io_storage))))
            .transpose()?;

        self.guarded(|device| -> Result<()> {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("flash_fwd"),
            });
            // The loans go back to the pool when this closure ends, after the submit.
            let (_loans, views): (Vec<Scratch>, Vec<wgpu::TextureView>) = packs
                .iter()
                .zip(&pack_pipelines)
                .map(|((_, tensor, pack_shape, name), pipeline)| {
                    pack_rows(
                        &self.inner,
                        &mut encoder,
                        pipeline,
                        tensor,
                        *pack_shape,
                        name,
                    )
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .unzip();
            if let (Some(pipeline), Some(q_f32)) = (&to_f32, &q_f32) {
                let convert = Conversion::ToF32(plan.io_storage);
                convert_pass(
                    device,
                    &self.inner.queue,
                    &mut encoder,
                    pipeline,
                    convert,
                    q,
                    q_f32,
                    max_groups,
                );
            }
            let queue = &self.inner.queue;
            let uniform = buffer_with_contents(
                device,
                queue,
                "flash_fwd params",
                bytemuck::bytes_of(&params),
                wgpu::BufferUsages::UNIFORM,
            );
            let storage_init = |label, contents: &[u8]| {
                buffer_with_contents(device, queue, label, contents, wgpu::BufferUsages::STORAGE)
            };
            let row_data = storage_init("flash_fwd row data", bytemuck::cast_slice(&row_data));
            let sequences = storage_init("flash_fwd sequences", bytemuck::cast_slice(&sequences));
            let mut entries = vec![
                entry(0, &uniform),
                entry(1, &q_f32.as_ref().unwrap_or(q).buffer),
                entry(4, &o_f32.as_ref().unwrap_or(&output).buffer),
                entry(5, &lse.buffer),
                entry(6, &row_data),
                entry(7, &sequences),
            ];
            let mut views = views.iter();
            let mut texture = |binding| wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::TextureView(
                    views.next().expect("a packed view per texture binding"),
                ),
            };
            match plan.key.family {
                Family::Unrolled => {
                    entries.push(texture(2));
                    entries.push(texture(3));
                }
                Family::Tiled => {
                    entries.push(entry(2, &k.buffer));
                    entries.push(entry(3, &v.buffer));
                }
            }
            if plan.key.mods.contains(Modifier::Bias) {
                entries.push(texture(8));
            }
            if plan.key.mods.contains(Modifier::KeyMask) {
                entries.push(texture(9));
            }
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("flash_fwd bind group"),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("flash_fwd"),
                    timestamp_writes: None,
                });
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(
                    plan.query_tiles,
                    shape.q_heads as u32,
                    sequences_len(shape, opts) as u32,
                );
            }
            if let (Some(pipeline), Some(o_f32)) = (&from_f32, &o_f32) {
                let convert = Conversion::FromF32(plan.io_storage);
                convert_pass(
                    device,
                    &self.inner.queue,
                    &mut encoder,
                    pipeline,
                    convert,
                    o_f32,
                    &output,
                    max_groups,
                );
            }
            self.inner.queue.submit([encoder.finish()]);
            Ok(())
        })??;
        Ok(GpuAttention {
            output,
            lse: matches!(opts.variant, Variant::Softmax).then_some(lse),
        })
    }
}

/// Results of [`Engine::attention_gpu`], still on the GPU.
#[derive(Clone, Debug)]
pub struct GpuAttention {
    /// Same element type as the inputs.
    pub output: Tensor,
    /// f32 `[batch, q_heads, q_len]`; `Some` for softmax.
    pub lse: Option<Tensor>,
}

/// What `pack_rows` needs to know about one tensor it packs (K, V, the bias, the key mask).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PackShape {
    pub(crate) stride: [u32; 4],
    pub(crate) heads: usize,
    pub(crate) batch: usize,
    pub(crate) seq_len: usize,
    pub(crate) rows_per_head: usize,
    pub(crate) dim: usize,
    pub(crate) fold: u32,
    pub(crate) max_groups: u32,
}

/// Records the packing of `tensor` into an rgba32float texture from the scratch pool (layout in
/// pack_rows.wgsl) and returns the loan and its view; keep the loan until after the submit.
/// The plan has checked that the texture fits the adapter's limits.
pub(crate) fn pack_rows(
    engine: &Inner,
    encoder: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    tensor: &Tensor,
    shape: PackShape,
    label: &str,
) -> Result<(Scratch, wgpu::TextureView)> {
    let width4 = shape.dim.div_ceil(4) as u32;
    let rows = (shape.batch * shape.heads * shape.rows_per_head) as u32;
    let size = wgpu::Extent3d {
        width: shape.fold * width4,
        height: rows.div_ceil(shape.fold),
        depth_or_array_layers: 1,
    };
    let (device, queue) = (&engine.device, &engine.queue);
    let texture = engine.pool.texture(
        device,
        label,
        size,
        wgpu::TextureFormat::Rgba32Float,
        wgpu::TextureUsages::STORAGE_BINDING,
    )?;
    let view = texture
        .texture()
        .create_view(&wgpu::TextureViewDescriptor::default());
    let texels = rows * width4;
    let groups = texels.div_ceil(64);
    let groups_x = groups.min(shape.max_groups);
    let params = PackParams {
        stride: shape.stride,
        heads: shape.heads as u32,
        seq_len: shape.seq_len as u32,
        dim: shape.dim as u32,
        width4,
        rows_per_head: shape.rows_per_head as u32,
        fold: shape.fold,
        texels,
        groups_x,
    };
    let uniform = buffer_with_contents(
        device,
        queue,
        "pack_rows params",
        bytemuck::bytes_of(&params),
        wgpu::BufferUsages::UNIFORM,
    );
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            entry(0, &uniform),
            entry(1, &tensor.buffer),
            wgpu::BindGroupEntry {
                binding: 2,
                resource: wgpu::BindingResource::TextureView(&view),
            },
        ],
    });
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: None,
    });
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, &bind_group, &[]);
    pass.dispatch_workgroups(groups_x, groups.div_ceil(groups_x), 1);
    Ok((texture, view))
}

/// The uniform block of `convert.wgsl` (`struct ConvertParams`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ConvertParams {
    pub len: u32,
    pub units: u32,
    pub groups_x: u32,
    pub _pad0: u32,
}

/// Records `conversion` of every element of `src` into `dst` (same length).
#[expect(
    clippy::too_many_arguments,
    reason = "device, queue, encoder, pipeline, what, from, to, limit: one pass; private"
)]
fn convert_pass(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    encoder: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    conversion: Conversion,
    src: &Tensor,
    dst: &Tensor,
    max_groups: u32,
) {
    let len = src.len as u32;
    let units = len.div_ceil(conversion.elements_per_unit());
    let groups = units.div_ceil(64).max(1);
    let groups_x = groups.min(max_groups);
    let params = ConvertParams {
        len,
        units,
        groups_x,
        _pad0: 0,
    };
    let uniform = buffer_with_contents(
        device,
        queue,
        "convert params",
        bytemuck::bytes_of(&params),
        wgpu::BufferUsages::UNIFORM,
    );
    let label = conversion.label();
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(&label),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            entry(0, &uniform),
            entry(1, &src.buffer),
            entry(2, &dst.buffer),
        ],
    });
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(&label),
        timestamp_writes: None,
    });
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, &bind_group, &[]);
    pass.dispatch_workgroups(groups_x, groups.div_ceil(groups_x), 1);
}

/// Checks that GPU tensors Q, K and V share one element type and have the shape's lengths
/// (the shape already validated); returns their element type.
pub(crate) fn check_qkv(shape: &Shape, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<DType> {
    let dtype = q.dtype;
    for (name, t, expected) in [
        ("q", q, shape.q_elems()),
        ("k", k, shape.k_elems()),
        ("v", v, shape.v_elems()),
    ] {
        if t.dtype != dtype {
            return Err(Error::DTypeMismatch {
                tensor: name,
                expected: dtype,
                got: t.dtype,
            });
        }
        check_len(name, expected, t.len)?;
    }
    Ok(dtype)
}

pub(crate) fn entry(binding: u32, buffer: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: buffer.as_entire_binding(),
    }
}

/// Diagonal offsets and window sides are clamped to ±FAR so the kernel's i32 sums cannot
/// overflow; a bound that far out already means "every key" or "no key" for any problem that fits.
const FAR: i64 = 1 << 30;

/// Packed K/V rows per kv head: the keys rounded up to the unrolled kernel's key step (varlen:
/// one step more, since a sequence's last step may start up to 3 rows before the total).
fn tex_rows_per_head(shape: &Shape, opts: &AttentionOptions<'_>) -> usize {
    let keys = UNROLLED_KEYS as usize;
    shape.kv_len.next_multiple_of(keys) + if opts.varlen.is_some() { keys } else { 0 }
}

/// Workgroups along z: batch elements, or varlen sequences.
fn sequences_len(shape: &Shape, opts: &AttentionOptions<'_>) -> usize {
    opts.varlen.map_or(shape.batch, |v| v.sequences())
}

/// The per-sequence records of one dispatch (batch elements `batch0..batch0 + shape.batch`).
fn sequence_infos(
    shape: &Shape,
    opts: &AttentionOptions<'_>,
    batch0: usize,
) -> Result<Vec<SequenceInfo>> {
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
    (batch0..batch0 + shape.batch)
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

/// `row_data` of one dispatch: ALiBi slopes and sinks per query head (zeros when absent), then
/// the temperature rows of batch elements `batch0..batch0 + shape.batch` when given.
fn row_data(shape: &Shape, opts: &AttentionOptions<'_>, batch0: usize) -> Vec<f32> {
    let heads = shape.q_heads;
    let mut data = Vec::with_capacity(2 * heads);
    data.extend_from_slice(opts.alibi_slopes.unwrap_or(&vec![0.0; heads]));
    data.extend_from_slice(opts.sinks.unwrap_or(&vec![0.0; heads]));
    if let Some(t) = opts.temperature {
        let per_batch = heads * shape.q_len;
        data.extend_from_slice(&t[batch0 * per_batch..(batch0 + shape.batch) * per_batch]);
    }
    data
}

/// The uniform values for one dispatch. Plan has already bounded every index to u32.
pub(crate) fn flash_params(
    shape: &Shape,
    layout: Layout,
    opts: &AttentionOptions<'_>,
) -> Result<FlashParams> {
    // A varlen dispatch's z index is the sequence, not a batch element: no batch stride.
    let batch_strides = opts.varlen.is_none() as usize;
    let stride = |heads: usize, seq: usize, dim: usize| {
        let [b, h, s] = layout.strides(heads, seq, dim);
        [(b * batch_strides) as u32, h as u32, s as u32, 1]
    };
    let side = |bound: Option<usize>| bound.map_or(-1, |b| (b as i64).min(FAR) as i32);
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
        flags: 0,
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
        prefix_len: opts.prefix_len.map_or(0, |p| (p as i64).min(FAR) as u32),
        chunk: opts.chunk.map_or(0, |c| (c as i64).min(FAR - 1) as u32),
        _pad0: 0,
        _pad1: 0,
        _pad2: 0,
    })
}

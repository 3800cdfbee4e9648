//! Attention calls: validation, planning, dispatch.

use wgpu::util::DeviceExt;

use crate::engine::PipelineKey;
use crate::kernel::{self, Family, KernelKey, TileConfig, UNROLLED_KEYS, VariantKind};
use crate::tensor::buffer_bytes;
use crate::{
    Attention, AttentionOptions, Causal, DType, Element, Engine, Error, Layout, Result, Shape,
    Tensor, Variant,
};

/// The uniform block of `flash_fwd.wgsl` (`struct Params`); a test checks the layout against naga's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FlashParams {
    pub q_heads: u32,
    pub kv_heads: u32,
    pub q_len: u32,
    pub kv_len: u32,
    pub q_stride: [u32; 4],
    pub k_stride: [u32; 4],
    pub v_stride: [u32; 4],
    pub o_stride: [u32; 4],
    /// Query i's diagonal key is `i + diag_offset`; causal masks and windows are measured from it.
    pub diag_offset: i32,
    /// What Q is multiplied by: `scale · log2 e` (softmax) or `scale` (sigmoid).
    pub q_scale: f32,
    /// Unrolled family: packed K/V rows per (batch, kv head), and packed rows per texture line.
    pub tex_rows_per_head: u32,
    pub tex_fold: u32,
    pub sigmoid_bias: f32,
    /// Window bounds left/right of the diagonal; -1 for unbounded.
    pub window_left: i32,
    pub window_right: i32,
    pub _pad: u32,
}

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

/// Query rows per workgroup of the tiled kernel. One invocation owns one row.
const BLOCK_M: u32 = 64;
/// The largest key tile of the tiled kernel; smaller when workgroup memory is short.
const MAX_BLOCK_N: u32 = 32;

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
    /// Unrolled family: packed K/V rows per texture line (see pack_rows.wgsl).
    pub tex_fold: u32,
    /// Batch elements per dispatch; less than the batch when buffers would exceed a limit.
    pub batch_per_dispatch: usize,
    /// Workgroups along x (query tiles × value slices); y is heads, z the dispatch's batch.
    pub query_tiles: u32,
}

impl Engine {
    /// Checks a call and decides how it runs, without touching the GPU.
    pub fn plan(&self, shape: &Shape, opts: &AttentionOptions, dtype: DType) -> Result<Plan> {
        shape.validate()?;
        opts.resolved_scale(shape)?;
        opts.resolved_sigmoid_bias(shape)?;
        let storage = self.storage_for(dtype)?;
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
                self.tiled_tile(shape)?
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
                kernel::unrolled_tile(shape.head_dim as u32, shape.value_dim as u32)
            }
        };
        let key = KernelKey {
            family,
            storage,
            head_dim: shape.head_dim as u32,
            value_dim: shape.value_dim as u32,
            tile,
            causal: opts.causal.is_some(),
            variant: VariantKind::of(&opts.variant),
        };
        let block_m = tile.block_m;

        let max_groups = u64::from(limits.max_compute_workgroups_per_dimension);
        let query_tiles =
            (shape.q_len as u64).div_ceil(u64::from(block_m)) * u64::from(key.value_slices());
        for (needed, what) in [
            (query_tiles, " (query tiles × value slices)"),
            (shape.q_heads as u64, " (q_heads)"),
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
        let per_batch_bytes =
            buffer_bytes(dtype, largest).max(buffer_bytes(DType::F32, shape.q_heads * shape.q_len));
        let binding_limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        // Kernel index arithmetic is u32: every element index of a dispatch must fit.
        let index_limit = u64::from(u32::MAX);
        let mut batch_per_dispatch = (binding_limit / per_batch_bytes)
            .min(index_limit / largest as u64)
            .min(max_groups)
            .min(shape.batch as u64) as usize;
        let mut tex_fold = 0;
        if family == Family::Unrolled {
            // Packed rows fold into lines of at most max_texture_dimension_2d texels; the
            // texture's height is bounded by the same limit.
            let max_dim = u64::from(limits.max_texture_dimension_2d);
            let widest = (shape.head_dim.max(shape.value_dim) as u64).div_ceil(4);
            let fold = (max_dim / widest).max(1);
            let rows_per_batch =
                (shape.kv_heads * shape.kv_len.next_multiple_of(UNROLLED_KEYS as usize)) as u64;
            let fits = (max_dim * fold / rows_per_batch) as usize;
            if fits == 0 {
                return Err(Error::TooLarge {
                    limit: "max_texture_dimension_2d",
                    needed: rows_per_batch.div_ceil(fold),
                    max: max_dim,
                    hint: " texture lines for K/V of one batch element",
                });
            }
            batch_per_dispatch = batch_per_dispatch.min(fits);
            tex_fold = fold as u32;
        }
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
        Ok(Plan {
            key,
            tex_fold,
            batch_per_dispatch,
            query_tiles: query_tiles as u32,
        })
    }

    /// Tile sizes of the tiled kernel: the largest key tile that fits workgroup memory.
    fn tiled_tile(&self, shape: &Shape) -> Result<TileConfig> {
        let limits = &self.inner.info.limits;
        let block_m = BLOCK_M
            .min(limits.max_compute_invocations_per_workgroup)
            .min(limits.max_compute_workgroup_size_x);
        let tile_bytes = |block_n| {
            kernel::workgroup_bytes(
                block_m,
                block_n,
                shape.head_dim as u32,
                shape.value_dim as u32,
            )
        };
        let mut block_n = MAX_BLOCK_N;
        while block_n > 1 && tile_bytes(block_n) > limits.max_compute_workgroup_storage_size {
            block_n /= 2;
        }
        if tile_bytes(block_n) > limits.max_compute_workgroup_storage_size {
            return Err(Error::TooLarge {
                limit: "max_compute_workgroup_storage_size",
                needed: u64::from(tile_bytes(1)),
                max: u64::from(limits.max_compute_workgroup_storage_size),
                hint: " (one key row of K and V does not fit)",
            });
        }
        Ok(TileConfig { block_m, block_n })
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
        opts: &AttentionOptions,
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> Result<Attention<T>> {
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
            let out = self.run(&plan, &part, layout, opts, &q_t, &k_t, &v_t)?;
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
        opts: &AttentionOptions,
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
        opts: &AttentionOptions,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<GpuAttention> {
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
        let plan = self.plan(shape, opts, dtype)?;
        if plan.batch_per_dispatch < shape.batch {
            return Err(Error::TooLarge {
                limit: "max_storage_buffer_binding_size",
                needed: shape.batch as u64,
                max: plan.batch_per_dispatch as u64,
                hint: " batch elements per GPU tensor (host-slice calls split over batch; split GPU tensors yourself)",
            });
        }
        self.run(&plan, shape, layout, opts, q, k, v)
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call's full description; private"
    )]
    fn run(
        &self,
        plan: &Plan,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<GpuAttention> {
        self.check_alive()?;
        let pipeline = self.pipeline(PipelineKey::Forward(plan.key))?;
        let pack_pipeline = match plan.key.family {
            Family::Unrolled => Some(self.pipeline(PipelineKey::Pack(plan.key.storage))?),
            Family::Tiled => None,
        };
        let output = self.output_tensor(q.dtype, shape.o_elems())?;
        // Sigmoid has no row statistic; its kernel writes no LSE (one element keeps the binding).
        let lse = match opts.variant {
            Variant::Softmax => self.output_tensor(DType::F32, shape.lse_elems())?,
            Variant::Sigmoid { .. } => self.output_tensor(DType::F32, 1)?,
        };
        let mut params = flash_params(shape, layout, opts)?;
        self.guarded(|device| {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("flash_fwd"),
            });
            // The unrolled family reads K and V from textures packed here, in the same pass list.
            let (k_binding, v_binding) = if let Some(pack_pipeline) = &pack_pipeline {
                let rows_per_head = shape
                    .kv_len
                    .next_multiple_of(plan.key.tile.block_n as usize);
                params.tex_rows_per_head = rows_per_head as u32;
                params.tex_fold = plan.tex_fold;
                let mut packed = |tensor: &Tensor, dim: usize, stride: [u32; 4], name: &str| {
                    pack_rows(
                        device,
                        &mut encoder,
                        pack_pipeline,
                        tensor,
                        PackShape {
                            stride,
                            heads: shape.kv_heads,
                            batch: shape.batch,
                            seq_len: shape.kv_len,
                            rows_per_head,
                            dim,
                            fold: plan.tex_fold,
                            max_groups: self.inner.info.limits.max_compute_workgroups_per_dimension,
                        },
                        name,
                    )
                };
                let k_view = packed(k, shape.head_dim, params.k_stride, "packed K");
                let v_view = packed(v, shape.value_dim, params.v_stride, "packed V");
                (Binding::Texture(k_view), Binding::Texture(v_view))
            } else {
                (Binding::Buffer(&k.buffer), Binding::Buffer(&v.buffer))
            };
            let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("flash_fwd params"),
                contents: bytemuck::bytes_of(&params),
                usage: wgpu::BufferUsages::UNIFORM,
            });
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("flash_fwd bind group"),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &[
                    entry(0, &uniform),
                    entry(1, &q.buffer),
                    k_binding.entry(2),
                    v_binding.entry(3),
                    entry(4, &output.buffer),
                    entry(5, &lse.buffer),
                ],
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
                    shape.batch as u32,
                );
            }
            self.inner.queue.submit([encoder.finish()]);
        })?;
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

/// A K or V binding: the tensor's buffer (tiled) or its packed texture (unrolled).
enum Binding<'a> {
    Buffer(&'a wgpu::Buffer),
    Texture(wgpu::TextureView),
}

impl Binding<'_> {
    fn entry(&self, binding: u32) -> wgpu::BindGroupEntry<'_> {
        match self {
            Binding::Buffer(buffer) => entry(binding, buffer),
            Binding::Texture(view) => wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::TextureView(view),
            },
        }
    }
}

/// What `pack_rows` needs to know about one K or V tensor.
struct PackShape {
    stride: [u32; 4],
    heads: usize,
    batch: usize,
    seq_len: usize,
    rows_per_head: usize,
    dim: usize,
    fold: u32,
    max_groups: u32,
}

/// Records the packing of `tensor` into a new rgba32float texture (layout in pack_rows.wgsl)
/// and returns its view. The plan has checked that the texture fits the adapter's limits.
fn pack_rows(
    device: &wgpu::Device,
    encoder: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    tensor: &Tensor,
    shape: PackShape,
    label: &str,
) -> wgpu::TextureView {
    let width4 = shape.dim.div_ceil(4) as u32;
    let rows = (shape.batch * shape.heads * shape.rows_per_head) as u32;
    let texture = device.create_texture(&wgpu::TextureDescriptor {
        label: Some(label),
        size: wgpu::Extent3d {
            width: shape.fold * width4,
            height: rows.div_ceil(shape.fold),
            depth_or_array_layers: 1,
        },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::Rgba32Float,
        usage: wgpu::TextureUsages::STORAGE_BINDING | wgpu::TextureUsages::TEXTURE_BINDING,
        view_formats: &[],
    });
    let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
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
    let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("pack_rows params"),
        contents: bytemuck::bytes_of(&params),
        usage: wgpu::BufferUsages::UNIFORM,
    });
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
    view
}

fn entry(binding: u32, buffer: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: buffer.as_entire_binding(),
    }
}

fn check_len(tensor: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(Error::LengthMismatch {
            tensor,
            expected,
            got,
        });
    }
    Ok(())
}

/// The uniform values for one dispatch. Plan has already bounded every index to u32.
pub(crate) fn flash_params(
    shape: &Shape,
    layout: Layout,
    opts: &AttentionOptions,
) -> Result<FlashParams> {
    let stride = |heads: usize, seq: usize, dim: usize| {
        let [b, h, s] = layout.strides(heads, seq, dim);
        [b as u32, h as u32, s as u32, 1]
    };
    let diag_offset = match opts.causal {
        Some(Causal::TopLeft) => 0,
        Some(Causal::BottomRight) | None => shape.kv_len as i64 - shape.q_len as i64,
    };
    // Offsets and windows are clamped to ±2^30 so the kernel's i32 sums cannot overflow; a
    // bound that far out already means "every key" or "no key" for any problem that fits.
    const FAR: i64 = 1 << 30;
    let diag_offset = diag_offset.clamp(-FAR, FAR) as i32;
    let side = |bound: Option<usize>| bound.map_or(-1, |b| (b as i64).min(FAR) as i32);
    let window = opts.window.unwrap_or_default();
    Ok(FlashParams {
        q_heads: shape.q_heads as u32,
        kv_heads: shape.kv_heads as u32,
        q_len: shape.q_len as u32,
        kv_len: shape.kv_len as u32,
        q_stride: stride(shape.q_heads, shape.q_len, shape.head_dim),
        k_stride: stride(shape.kv_heads, shape.kv_len, shape.head_dim),
        v_stride: stride(shape.kv_heads, shape.kv_len, shape.value_dim),
        o_stride: stride(shape.q_heads, shape.q_len, shape.value_dim),
        diag_offset,
        q_scale: match opts.variant {
            Variant::Softmax => opts.resolved_scale(shape)? * std::f32::consts::LOG2_E,
            Variant::Sigmoid { .. } => opts.resolved_scale(shape)?,
        },
        tex_rows_per_head: 0,
        tex_fold: 0,
        sigmoid_bias: opts.resolved_sigmoid_bias(shape)?,
        window_left: side(window.left),
        window_right: side(window.right),
        _pad: 0,
    })
}

//! Attention calls: validation, planning, dispatch.

use wgpu::util::DeviceExt;

use crate::kernel::{self, KernelKey, TileConfig};
use crate::tensor::buffer_bytes;
use crate::{
    Attention, AttentionOptions, Causal, DType, Element, Engine, Error, Layout, Result, Shape,
    Tensor,
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
    pub causal_offset: i32,
    pub scale_log2: f32,
    pub _pad: [u32; 2],
}

/// Query rows per workgroup. One invocation owns one row.
const BLOCK_M: u32 = 64;
/// The largest key tile; smaller when workgroup memory is short.
const MAX_BLOCK_N: u32 = 32;

/// How one call runs: which kernel, and how many batch elements each dispatch takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub key: KernelKey,
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
        let storage = self.storage_for(dtype)?;
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
        let key = KernelKey {
            storage,
            head_dim: shape.head_dim as u32,
            value_dim: shape.value_dim as u32,
            tile: TileConfig { block_m, block_n },
            causal: opts.causal.is_some(),
        };

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
        let batch_per_dispatch = (binding_limit / per_batch_bytes)
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
        Ok(Plan {
            key,
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
            lse: Some(lse),
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
        let pipeline = self.pipeline(&plan.key)?;
        let output = self.output_tensor(q.dtype, shape.o_elems())?;
        let lse = self.output_tensor(DType::F32, shape.lse_elems())?;
        let params = flash_params(shape, layout, opts)?;
        self.guarded(|device| {
            let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("flash_fwd params"),
                contents: bytemuck::bytes_of(&params),
                usage: wgpu::BufferUsages::UNIFORM,
            });
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("flash_fwd bind group"),
                layout: &self.inner.bind_group_layout,
                entries: &[
                    entry(0, &uniform),
                    entry(1, &q.buffer),
                    entry(2, &k.buffer),
                    entry(3, &v.buffer),
                    entry(4, &output.buffer),
                    entry(5, &lse.buffer),
                ],
            });
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("flash_fwd"),
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
            lse: Some(lse),
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
    let causal_offset = match opts.causal {
        Some(Causal::BottomRight) => shape.kv_len as i64 - shape.q_len as i64,
        Some(Causal::TopLeft) | None => 0,
    };
    // Offsets beyond ±2^31 mean "every key" or "no key"; clamping keeps that meaning.
    let causal_offset = causal_offset.clamp(-(1 << 31) + 1, (1 << 31) - 1) as i32;
    Ok(FlashParams {
        q_heads: shape.q_heads as u32,
        kv_heads: shape.kv_heads as u32,
        q_len: shape.q_len as u32,
        kv_len: shape.kv_len as u32,
        q_stride: stride(shape.q_heads, shape.q_len, shape.head_dim),
        k_stride: stride(shape.kv_heads, shape.kv_len, shape.head_dim),
        v_stride: stride(shape.kv_heads, shape.kv_len, shape.value_dim),
        o_stride: stride(shape.q_heads, shape.q_len, shape.value_dim),
        causal_offset,
        scale_log2: opts.resolved_scale(shape)? * std::f32::consts::LOG2_E,
        _pad: [0; 2],
    })
}

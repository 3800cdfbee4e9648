//! Records a planned linear-attention call: packing, the passes, the state copies.

use super::plan::{ChunkPlan, LinearParams, LinearPlan};
use super::{GpuLinearAttention, GpuLinearState};
use crate::gpu::pool::Scratch;
use crate::gpu::tensor::{Region, buffer_with_contents};
use crate::kernels::{KernelId, PackKernel, binding};
use crate::ops::passes::{PackShape, entry, pack_into, packed_texture, record_pass, texture_entry};
use crate::{DType, Engine, LinearOptions, Result, Shape, Tensor};

/// What the passes of one call bind: the uniform block, Q/K/V, the decay powers and the four
/// state buffers (initial kv and z, final kv and z).
pub(super) struct Bound<'a> {
    pub uniform: &'a wgpu::Buffer,
    pub decay: &'a wgpu::Buffer,
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub states: [wgpu::BindGroupEntry<'a>; 4],
}

impl Engine {
    /// Records and submits a planned call: the recurrence, or packing and the three chunk
    /// passes.
    pub(super) fn run_linear(
        &self,
        plan: &LinearPlan,
        opts: &LinearOptions<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        initial: Option<&GpuLinearState>,
    ) -> Result<GpuLinearAttention> {
        self.check_alive()?;
        let shape = &plan.shape;
        let pipelines = (plan.passes.iter())
            .map(|&key| self.pipeline(KernelId::Linear(key)))
            .collect::<Result<Vec<_>>>()?;
        let pack_pipeline = match plan.chunked {
            Some(_) => Some(self.pipeline(KernelId::Pack(PackKernel(plan.storage)))?),
            None => None,
        };
        let states = shape.batch * shape.q_heads * shape.head_dim;
        let output = self.output_tensor(q.dtype, shape.o_elems())?;
        let kv_out = self.output_tensor(DType::F32, states * shape.value_dim)?;
        let z_out = if opts.normalize {
            Some(self.output_tensor(DType::F32, states)?)
        } else {
            None
        };

        self.guarded(|device| -> Result<()> {
            let queue = &self.inner.queue;
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("linear attention"),
            });
            let uniform = buffer_with_contents(
                device,
                queue,
                "linear params",
                bytemuck::bytes_of(&plan.params),
                wgpu::BufferUsages::UNIFORM,
            );
            let storage = |label, contents: &[u8]| {
                buffer_with_contents(device, queue, label, contents, wgpu::BufferUsages::STORAGE)
            };
            let decay = storage("linear decay", bytemuck::cast_slice(&plan.decay));
            // Absent states bind a word each (the kernel reads them only with has_initial).
            let dummy = || Region::whole(storage("linear absent state", &[0u8; 4]));
            let kv_in = initial.map_or_else(dummy, |s| s.kv.region());
            let z_in = initial
                .and_then(|s| s.z.as_ref())
                .map_or_else(dummy, Tensor::region);
            let z_out_region = z_out.as_ref().map_or_else(dummy, Tensor::region);
            let bound = Bound {
                uniform: &uniform,
                decay: &decay,
                q,
                k,
                v,
                states: [
                    kv_in.entry(binding::KV_IN),
                    z_in.entry(binding::Z_IN),
                    kv_out.entry(binding::KV_OUT),
                    z_out_region.entry(binding::Z_OUT),
                ],
            };
            // Loans from the scratch pool go back when this closure ends, after the submit.
            let _loans = match (plan.chunked, &pack_pipeline) {
                (Some(_), Some(pack)) => self.record_chunked(
                    device,
                    &mut encoder,
                    plan,
                    &bound,
                    &output,
                    &pipelines,
                    pack,
                )?,
                _ => {
                    let pipeline = &pipelines[0];
                    self.record_recurrent(device, &mut encoder, plan, &bound, &output, pipeline);
                    Vec::new()
                }
            };
            queue.submit([encoder.finish()]);
            Ok(())
        })??;
        Ok(GpuLinearAttention {
            output,
            state: GpuLinearState {
                kv: kv_out,
                z: z_out,
            },
        })
    }

    /// The recurrent kernel: one pass, one invocation per value column.
    fn record_recurrent(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        plan: &LinearPlan,
        bound: &Bound<'_>,
        output: &Tensor,
        pipeline: &wgpu::ComputePipeline,
    ) {
        let shape = &plan.shape;
        let mut entries = vec![
            entry(binding::PARAMS, bound.uniform),
            bound.q.entry(binding::Q),
            output.entry(binding::O),
            entry(binding::DECAY_POWERS, bound.decay),
            bound.k.entry(binding::LINEAR_K),
            bound.v.entry(binding::LINEAR_V),
        ];
        entries.extend(bound.states.iter().cloned());
        let grid = [
            shape.value_dim.div_ceil(64) as u32,
            shape.q_heads as u32,
            shape.batch as u32,
        ];
        record_pass(
            device,
            encoder,
            pipeline,
            &entries,
            grid,
            "linear recurrent",
        );
    }

    /// The chunked kernel: its resources ([`Engine::chunk_resources`]), then for each group
    /// of heads ([`Engine::head_groups`]) the chunk states and the output rows. Returns the
    /// scratch loans to hold until the submit.
    #[expect(
        clippy::too_many_arguments,
        reason = "a call's bindings and its pipelines"
    )]
    fn record_chunked(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        plan: &LinearPlan,
        bound: &Bound<'_>,
        output: &Tensor,
        pipelines: &[wgpu::ComputePipeline],
        pack: &wgpu::ComputePipeline,
    ) -> Result<Vec<Scratch>> {
        let shape = &plan.shape;
        let res = self.chunk_resources(device, plan, pack)?;
        let b = shape.batch as u32;
        for group in self.head_groups(device, &plan.params, &res.chunks, shape) {
            self.record_group_states(device, encoder, plan, bound, &group, &res, pipelines);
            let entries = [
                entry(binding::PARAMS, &group.uniform),
                bound.q.entry(binding::Q),
                texture_entry(binding::K, &res.k_view),
                texture_entry(binding::V, &res.v_view),
                output.entry(binding::O),
                entry(binding::DECAY_POWERS, bound.decay),
                texture_entry(binding::STATE_TEXTURE, &res.state_view),
            ];
            let rows = 64 * res.chunks.rows as usize;
            let grid = [shape.q_len.div_ceil(rows) as u32, group.heads, b];
            record_pass(
                device,
                encoder,
                &pipelines[2],
                &entries,
                grid,
                "linear chunk output",
            );
        }
        Ok(res.loans)
    }

    /// The uniform block of each group of heads the chunk passes run in (`head_base`), and
    /// the group's query and kv heads: one group unless the per-chunk states of all heads
    /// would not fit one binding (the plan's `group_heads`).
    pub(super) fn head_groups(
        &self,
        device: &wgpu::Device,
        params: &LinearParams,
        c: &ChunkPlan,
        shape: &Shape,
    ) -> Vec<HeadGroup> {
        let group = (shape.q_heads / shape.kv_heads) as u32;
        (0..shape.q_heads as u32)
            .step_by(c.group_heads as usize)
            .map(|head_base| {
                let heads = c.group_heads.min(shape.q_heads as u32 - head_base);
                let params = LinearParams {
                    head_base,
                    ..*params
                };
                HeadGroup {
                    uniform: buffer_with_contents(
                        device,
                        &self.inner.queue,
                        "linear params",
                        bytemuck::bytes_of(&params),
                        wgpu::BufferUsages::UNIFORM,
                    ),
                    head_base,
                    heads,
                    kv_heads: heads / group,
                }
            })
            .collect()
    }

    /// The chunked kernel's resources, each holding one group of heads: textures for packed K
    /// and V, and the per-chunk states as a buffer and as a texture (from the scratch pool;
    /// every group reuses them in turn).
    pub(super) fn chunk_resources(
        &self,
        device: &wgpu::Device,
        plan: &LinearPlan,
        pack: &wgpu::ComputePipeline,
    ) -> Result<ChunkResources> {
        let (shape, params) = (&plan.shape, &plan.params);
        let c = plan.chunked.ok_or_else(|| {
            crate::Error::Internal("a chunked recording of a recurrent plan".into())
        })?;
        let max_groups = self.inner.info.limits.max_compute_workgroups_per_dimension;
        let kv_heads = c.group_heads as usize / (shape.q_heads / shape.kv_heads);
        let pack_shape = |stride, dim| PackShape {
            stride,
            first_head: 0,
            heads: kv_heads,
            batch: shape.batch,
            seq_len: shape.q_len,
            rows_per_head: shape.q_len,
            dim,
            fold: c.tex_fold,
            max_groups,
        };
        let k_pack = pack_shape(params.k_stride, shape.head_dim);
        let v_pack = pack_shape(params.v_stride, shape.value_dim);
        let (k_loan, k_view) = packed_texture(&self.inner, k_pack, "linear packed K")?;
        let (v_loan, v_view) = packed_texture(&self.inner, v_pack, "linear packed V")?;
        let row_bytes = c.state_fold * c.pitch * 4;
        let chunk_states_loan = self.inner.pool.buffer(
            device,
            "linear chunk states",
            u64::from(row_bytes) * u64::from(c.state_lines),
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        )?;
        let chunk_states = chunk_states_loan.buffer().clone();
        let (state_loan, state_texture, state_view) =
            self.state_texture(device, &c, "linear chunk states texture")?;
        Ok(ChunkResources {
            chunks: c,
            loans: vec![k_loan, v_loan, chunk_states_loan, state_loan],
            pack: pack.clone(),
            k_pack,
            v_pack,
            k_view,
            v_view,
            chunk_states,
            state_texture,
            state_view,
        })
    }

    /// One group's chunk states: its K and V packed, each chunk's own state, the prefix scan
    /// over chunks (into the per-chunk states and the group's final states), those states
    /// copied into the texture. `pipelines` starts with the chunk-state and prefix passes.
    #[expect(
        clippy::too_many_arguments,
        reason = "a group's bindings and its pipelines"
    )]
    pub(super) fn record_group_states(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        plan: &LinearPlan,
        bound: &Bound<'_>,
        group: &HeadGroup,
        res: &ChunkResources,
        pipelines: &[wgpu::ComputePipeline],
    ) {
        let (shape, params, c) = (&plan.shape, &plan.params, &res.chunks);
        let b = shape.batch as u32;
        for (tensor, pack, view, label) in [
            (bound.k, res.k_pack, &res.k_view, "linear packed K"),
            (bound.v, res.v_pack, &res.v_view, "linear packed V"),
        ] {
            let pack = PackShape {
                first_head: (group.head_base / params.group) as usize,
                heads: group.kv_heads as usize,
                ..pack
            };
            pack_into(&self.inner, encoder, &res.pack, tensor, pack, view, label);
        }
        let column_groups = params.columns.div_ceil(4);
        let columns = column_groups.div_ceil(64);
        let prefix_groups = (column_groups * shape.head_dim as u32).div_ceil(64);
        let entries = [
            entry(binding::PARAMS, &group.uniform),
            texture_entry(binding::K, &res.k_view),
            texture_entry(binding::V, &res.v_view),
            entry(binding::DECAY_POWERS, bound.decay),
            entry(binding::CHUNK_STATES, &res.chunk_states),
        ];
        let grid = [c.chunks * columns, group.heads, b];
        record_pass(
            device,
            encoder,
            &pipelines[0],
            &entries,
            grid,
            "linear chunk states",
        );
        let mut entries = vec![
            entry(binding::PARAMS, &group.uniform),
            entry(binding::DECAY_POWERS, bound.decay),
            entry(binding::CHUNK_STATES, &res.chunk_states),
        ];
        entries.extend(bound.states.iter().cloned());
        let grid = [prefix_groups, group.heads, b];
        record_pass(
            device,
            encoder,
            &pipelines[1],
            &entries,
            grid,
            "linear chunk prefix",
        );
        copy_chunk_states(encoder, c, &res.chunk_states, &res.state_texture);
    }

    /// A texture for the per-chunk states of one group of heads (or their gradients), from the
    /// scratch pool: the loan, the texture and its view.
    pub(super) fn state_texture(
        &self,
        device: &wgpu::Device,
        c: &ChunkPlan,
        label: &str,
    ) -> Result<(Scratch, wgpu::Texture, wgpu::TextureView)> {
        let loan = self.inner.pool.texture(
            device,
            label,
            state_texture_size(c),
            wgpu::TextureFormat::Rgba32Float,
            wgpu::TextureUsages::STORAGE_BINDING | wgpu::TextureUsages::COPY_DST,
        )?;
        let texture = loan.texture().clone();
        let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
        Ok((loan, texture, view))
    }
}

fn state_texture_size(c: &ChunkPlan) -> wgpu::Extent3d {
    wgpu::Extent3d {
        width: c.state_fold * c.pitch / 4,
        height: c.state_lines,
        depth_or_array_layers: 1,
    }
}

/// Copies the per-chunk states (or their gradients) into `texture`, for the passes that read
/// them in loops.
pub(super) fn copy_chunk_states(
    encoder: &mut wgpu::CommandEncoder,
    c: &ChunkPlan,
    chunk_states: &wgpu::Buffer,
    texture: &wgpu::Texture,
) {
    encoder.copy_buffer_to_texture(
        wgpu::TexelCopyBufferInfo {
            buffer: chunk_states,
            layout: wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(c.state_fold * c.pitch * 4),
                rows_per_image: Some(c.state_lines),
            },
        },
        texture.as_image_copy(),
        state_texture_size(c),
    );
}

/// One group of heads of the chunk passes: its uniform block (`head_base`) and its query and
/// kv heads.
pub(super) struct HeadGroup {
    pub uniform: wgpu::Buffer,
    pub head_base: u32,
    pub heads: u32,
    pub kv_heads: u32,
}

/// What [`Engine::chunk_resources`] makes for the passes of a chunked call, for one group of
/// heads at a time: textures for the packed K and V (the pack pipeline and shapes that fill
/// them), the per-chunk states (`S_before[t]`, and the total at slot `chunks`) as a buffer and
/// as a texture, and the scratch loans to hold until the submit.
pub(super) struct ChunkResources {
    pub chunks: ChunkPlan,
    pub loans: Vec<Scratch>,
    pub pack: wgpu::ComputePipeline,
    pub k_pack: PackShape,
    pub v_pack: PackShape,
    pub k_view: wgpu::TextureView,
    pub v_view: wgpu::TextureView,
    pub chunk_states: wgpu::Buffer,
    pub state_texture: wgpu::Texture,
    pub state_view: wgpu::TextureView,
}

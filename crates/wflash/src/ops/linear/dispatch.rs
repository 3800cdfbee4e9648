//! Records a planned linear-attention call: packing, the passes, the state copies.

use super::plan::{ChunkPlan, LinearPlan};
use super::{GpuLinearAttention, GpuLinearState};
use crate::gpu::pool::Scratch;
use crate::gpu::tensor::buffer_with_contents;
use crate::kernels::{KernelId, PackKernel, binding};
use crate::ops::passes::{PackShape, entry, pack_rows, record_pass, texture_entry};
use crate::{DType, Engine, LinearOptions, Result, Tensor};

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
            let dummy = || storage("linear absent state", &[0u8; 4]);
            let kv_in = initial.map_or_else(dummy, |s| s.kv.buffer.clone());
            let z_in = initial
                .and_then(|s| s.z.as_ref())
                .map_or_else(dummy, |z| z.buffer.clone());
            let z_out_buffer = z_out.as_ref().map_or_else(dummy, |z| z.buffer.clone());
            let bound = Bound {
                uniform: &uniform,
                decay: &decay,
                q,
                k,
                v,
                states: [
                    entry(binding::KV_IN, &kv_in),
                    entry(binding::Z_IN, &z_in),
                    entry(binding::KV_OUT, &kv_out.buffer),
                    entry(binding::Z_OUT, &z_out_buffer),
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
            entry(binding::Q, &bound.q.buffer),
            entry(binding::O, &output.buffer),
            entry(binding::DECAY_POWERS, bound.decay),
            entry(binding::LINEAR_K, &bound.k.buffer),
            entry(binding::LINEAR_V, &bound.v.buffer),
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

    /// The chunked kernel: [`Engine::record_chunk_states`], then the output rows. Returns the
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
        let states = self.record_chunk_states(device, encoder, plan, bound, pipelines, pack)?;
        let c = states.chunks;
        let (h, b) = (shape.q_heads as u32, shape.batch as u32);
        let entries = [
            entry(binding::PARAMS, bound.uniform),
            entry(binding::Q, &bound.q.buffer),
            texture_entry(binding::K, &states.k_view),
            texture_entry(binding::V, &states.v_view),
            entry(binding::O, &output.buffer),
            entry(binding::DECAY_POWERS, bound.decay),
            texture_entry(binding::STATE_TEXTURE, &states.state_view),
        ];
        let grid = [shape.q_len.div_ceil(64 * c.rows as usize) as u32, h, b];
        record_pass(
            device,
            encoder,
            &pipelines[2],
            &entries,
            grid,
            "linear chunk output",
        );
        Ok(states.loans)
    }

    /// The chunked kernel's first passes: K and V packed into textures, each chunk's own
    /// state, the prefix scan over chunks (into the per-chunk states and the final state),
    /// those states copied into a texture. `pipelines` starts with the chunk-state and prefix
    /// passes.
    pub(super) fn record_chunk_states(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        plan: &LinearPlan,
        bound: &Bound<'_>,
        pipelines: &[wgpu::ComputePipeline],
        pack: &wgpu::ComputePipeline,
    ) -> Result<ChunkStates> {
        let (shape, params) = (&plan.shape, &plan.params);
        let c = plan.chunked.ok_or_else(|| {
            crate::Error::Internal("a chunked recording of a recurrent plan".into())
        })?;
        let (b, h) = (shape.batch as u32, shape.q_heads as u32);
        let max_groups = self.inner.info.limits.max_compute_workgroups_per_dimension;
        let (mut loans, mut views): (Vec<Scratch>, Vec<wgpu::TextureView>) = [
            (bound.k, shape.head_dim, params.k_stride, "linear packed K"),
            (bound.v, shape.value_dim, params.v_stride, "linear packed V"),
        ]
        .into_iter()
        .map(|(tensor, dim, stride, label)| {
            let pack_shape = PackShape {
                stride,
                heads: shape.kv_heads,
                batch: shape.batch,
                seq_len: shape.q_len,
                rows_per_head: shape.q_len,
                dim,
                fold: c.tex_fold,
                max_groups,
            };
            pack_rows(&self.inner, encoder, pack, tensor, pack_shape, label)
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
        let row_bytes = c.state_fold * c.pitch * 4;
        let chunk_states_loan = self.inner.pool.buffer(
            device,
            "linear chunk states",
            u64::from(row_bytes) * u64::from(c.state_lines),
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        )?;
        let chunk_states = chunk_states_loan.buffer().clone();
        let column_groups = params.columns.div_ceil(4);
        let columns = column_groups.div_ceil(64);
        let prefix_groups = (column_groups * shape.head_dim as u32).div_ceil(64);
        let entries = [
            entry(binding::PARAMS, bound.uniform),
            texture_entry(binding::K, &views[0]),
            texture_entry(binding::V, &views[1]),
            entry(binding::DECAY_POWERS, bound.decay),
            entry(binding::CHUNK_STATES, &chunk_states),
        ];
        let grid = [c.chunks * columns, h, b];
        record_pass(
            device,
            encoder,
            &pipelines[0],
            &entries,
            grid,
            "linear chunk states",
        );
        let mut entries = vec![
            entry(binding::PARAMS, bound.uniform),
            entry(binding::DECAY_POWERS, bound.decay),
            entry(binding::CHUNK_STATES, &chunk_states),
        ];
        entries.extend(bound.states.iter().cloned());
        let grid = [prefix_groups, h, b];
        record_pass(
            device,
            encoder,
            &pipelines[1],
            &entries,
            grid,
            "linear chunk prefix",
        );
        let (state_loan, state_view) = self.copy_chunk_states(
            device,
            encoder,
            &c,
            &chunk_states,
            "linear chunk states texture",
        )?;
        loans.push(chunk_states_loan);
        loans.push(state_loan);
        let v_view = views.pop().expect("two packed views");
        let k_view = views.pop().expect("two packed views");
        Ok(ChunkStates {
            chunks: c,
            loans,
            k_view,
            v_view,
            chunk_states,
            state_view,
        })
    }

    /// Copies the per-chunk states (or their gradients) into a texture from the scratch pool,
    /// for the passes that read them in loops; returns the loan and its view.
    pub(super) fn copy_chunk_states(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        c: &ChunkPlan,
        chunk_states: &wgpu::Buffer,
        label: &str,
    ) -> Result<(Scratch, wgpu::TextureView)> {
        let row_bytes = c.state_fold * c.pitch * 4;
        let size = wgpu::Extent3d {
            width: c.state_fold * c.pitch / 4,
            height: c.state_lines,
            depth_or_array_layers: 1,
        };
        let state_loan = self.inner.pool.texture(
            device,
            label,
            size,
            wgpu::TextureFormat::Rgba32Float,
            wgpu::TextureUsages::STORAGE_BINDING | wgpu::TextureUsages::COPY_DST,
        )?;
        let state_texture = state_loan.texture();
        encoder.copy_buffer_to_texture(
            wgpu::TexelCopyBufferInfo {
                buffer: chunk_states,
                layout: wgpu::TexelCopyBufferLayout {
                    offset: 0,
                    bytes_per_row: Some(row_bytes),
                    rows_per_image: Some(c.state_lines),
                },
            },
            state_texture.as_image_copy(),
            size,
        );
        let state_view = state_texture.create_view(&wgpu::TextureViewDescriptor::default());
        Ok((state_loan, state_view))
    }
}

/// What [`Engine::record_chunk_states`] leaves for the passes after it: the packed K and V,
/// the per-chunk states (`S_before[t]`, and the total at slot `chunks`) as a buffer and as a
/// texture, and the scratch loans to hold until the submit.
pub(super) struct ChunkStates {
    pub chunks: ChunkPlan,
    pub loans: Vec<Scratch>,
    pub k_view: wgpu::TextureView,
    pub v_view: wgpu::TextureView,
    pub chunk_states: wgpu::Buffer,
    pub state_view: wgpu::TextureView,
}

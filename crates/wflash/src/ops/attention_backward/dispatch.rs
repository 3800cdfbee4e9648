//! Records a planned backward call: inputs converted to f32 where they are not, Q, K, V (and
//! the bias and key mask) packed, the prep, dK/dV and dQ passes, the reductions, and the
//! gradients converted back to the inputs' element type.

use super::GpuAttentionGrads;
use super::plan::{BackwardPlan, ReduceParams};
use crate::gpu::pool::Scratch;
use crate::gpu::tensor::buffer_with_contents;
use crate::kernels::{
    BackwardKey, Conversion, KernelId, PackKernel, ReduceKernel, Storage, binding,
};
use crate::ops::attention::{GpuModifiers, copy_resident_sinks};
use crate::ops::passes::{convert_pass, entry, pack_rows, record_pass, texture_entry};
use crate::{AttentionOptions, DType, Engine, Modifier, Result, Tensor, Variant};

/// The tensors of a backward call (already checked against the plan's shape).
pub(super) struct BackwardInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub o: &'a Tensor,
    /// The forward's LSE (softmax); `None` for sigmoid.
    pub lse: Option<&'a Tensor>,
    pub d_o: &'a Tensor,
    /// The call's GPU-resident modifier values.
    pub modifiers: GpuModifiers<'a>,
}

impl Engine {
    /// Records and submits the planned backward call.
    pub(super) fn run_backward(
        &self,
        plan: &BackwardPlan,
        opts: &AttentionOptions<'_>,
        inputs: &BackwardInputs<'_>,
    ) -> Result<GpuAttentionGrads> {
        self.check_alive()?;
        let forward = &plan.forward;
        let shape = &forward.shape;
        let io = forward.io_storage;
        let dtype = inputs.q.dtype;
        let max_groups = self.inner.info.limits.max_compute_workgroups_per_dimension;

        let prep = self.pipeline(KernelId::Backward(plan.prep))?;
        let key_value = self.pipeline(KernelId::Backward(plan.key_value))?;
        let query = self.pipeline(KernelId::Backward(plan.query))?;
        let reduce_needed =
            plan.sinks.is_some() || plan.bias_grad.is_some_and(|b| b.reduce.is_some());
        let reduce = reduce_needed
            .then(|| self.pipeline(KernelId::Reduce(ReduceKernel)))
            .transpose()?;
        let sinks_pass = (plan.sinks.is_some())
            .then(|| self.pipeline(KernelId::Backward(BackwardKey::sinks())))
            .transpose()?;
        let pack_q = self.pipeline(KernelId::Pack(PackKernel(io)))?;
        let packs = (forward.packs.iter())
            .map(|pack| {
                let (pack_shape, tensor, label) = self.pack_input(
                    forward,
                    pack,
                    opts,
                    &inputs.modifiers,
                    0,
                    shape.batch,
                    inputs.k,
                    inputs.v,
                )?;
                let pipeline = self.pipeline(KernelId::Pack(pack.kernel))?;
                Ok((pack_shape, tensor, label, pipeline))
            })
            .collect::<Result<Vec<_>>>()?;
        // The kernels read and write f32: other element types are converted at the edges.
        let converted = io != Storage::F32;
        let to_f32 = converted
            .then(|| self.pipeline(KernelId::Convert(Conversion::ToF32(io))))
            .transpose()?;
        let from_f32 = converted
            .then(|| self.pipeline(KernelId::Convert(Conversion::FromF32(io))))
            .transpose()?;
        let f32_copy = |t: &Tensor| -> Result<Option<Tensor>> {
            converted
                .then(|| self.output_tensor(DType::F32, t.len))
                .transpose()
        };
        let inputs_f32 =
            [inputs.q, inputs.k, inputs.v, inputs.d_o].map(|t| f32_copy(t).map(|copy| (t, copy)));
        let [q32, k32, v32, do32] = inputs_f32;
        let (q32, k32, v32, do32) = (q32?, k32?, v32?, do32?);
        // Only softmax reads O (D = rowsum(dO ∘ O)): sigmoid's is neither converted nor read,
        // and its prep pass binds a one-float stand-in.
        let o32 = match opts.variant {
            Variant::Softmax => Some((inputs.o, f32_copy(inputs.o)?)),
            Variant::Sigmoid { .. } => None,
        };

        let dq = self.output_tensor(dtype, shape.q_elems())?;
        let dk = self.output_tensor(dtype, shape.k_elems())?;
        let dv = self.output_tensor(dtype, shape.v_elems())?;
        let grads_f32 = [&dq, &dk, &dv].map(f32_copy);
        let [dq32, dk32, dv32] = grads_f32;
        let (dq32, dk32, dv32) = (dq32?, dk32?, dv32?);
        let rows = shape.lse_elems();
        let stats = self.output_tensor(DType::F32, 4 * rows)?;
        let dummy = || self.output_tensor(DType::F32, 1);
        let sink_partials = match plan.sinks {
            Some(_) => self.output_tensor(
                DType::F32,
                shape.batch * shape.q_heads * plan.params.prep_blocks as usize,
            )?,
            None => dummy()?,
        };
        let d_sinks = plan
            .sinks
            .map(|_| self.output_tensor(DType::F32, shape.q_heads))
            .transpose()?;
        let d_temperature = opts
            .temperature
            .map(|_| self.output_tensor(DType::F32, rows))
            .transpose()?;
        let d_bias = plan
            .bias_grad
            .map(|b| self.output_tensor(DType::F32, b.elems))
            .transpose()?;
        // Where the bias broadcasts, dS per (batch, head) first, then its sum.
        let d_bias_full = match plan.bias_grad.and_then(|b| b.reduce) {
            Some(_) => Some(self.output_tensor(
                DType::F32,
                shape.batch * shape.q_heads * shape.q_len * shape.kv_len,
            )?),
            None => d_bias.clone(),
        };
        let d_temperature_binding = match &d_temperature {
            Some(t) => t.clone(),
            None => dummy()?,
        };
        // What the kernels read: the f32 copy where there is one.
        let f32_of = |(t, copy): &(&Tensor, Option<Tensor>)| copy.clone().unwrap_or((*t).clone());
        let (q_in, k_in, v_in, do_in) = (f32_of(&q32), f32_of(&k32), f32_of(&v32), f32_of(&do32));
        let o_in = match &o32 {
            Some(o) => f32_of(o),
            None => dummy()?,
        };
        let lse = match inputs.lse {
            Some(t) => t.clone(),
            None => dummy()?,
        };
        let d_bias_binding = match &d_bias_full {
            Some(t) => t.clone(),
            None => dummy()?,
        };
        let mut row_data = forward.head_data.clone();
        if let Some(t) = opts.temperature {
            row_data.extend_from_slice(t);
        }

        self.guarded(|device| -> Result<()> {
            let queue = &self.inner.queue;
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("flash_bwd"),
            });
            let uniform = |label, bytes: &[u8]| {
                buffer_with_contents(device, queue, label, bytes, wgpu::BufferUsages::UNIFORM)
            };
            let storage = |label, bytes: &[u8]| {
                buffer_with_contents(device, queue, label, bytes, wgpu::BufferUsages::STORAGE)
            };
            let params = uniform("flash_bwd params", bytemuck::bytes_of(&forward.params));
            let bwd = uniform("flash_bwd backward", bytemuck::bytes_of(&plan.params));
            let row_data = storage("flash_bwd row data", bytemuck::cast_slice(&row_data));
            copy_resident_sinks(&mut encoder, &inputs.modifiers, &row_data, shape.q_heads);
            let sequences = storage(
                "flash_bwd sequences",
                bytemuck::cast_slice(&forward.sequences),
            );

            let convert = |encoder: &mut wgpu::CommandEncoder,
                           pipeline: &wgpu::ComputePipeline,
                           conversion,
                           from: &Tensor,
                           to: &Tensor| {
                convert_pass(
                    device, queue, encoder, pipeline, conversion, from, to, max_groups,
                );
            };
            for (from, to) in [&q32, &k32, &v32, &do32].into_iter().chain(&o32) {
                if let (Some(pipeline), Some(to)) = (&to_f32, to) {
                    convert(&mut encoder, pipeline, Conversion::ToF32(io), from, to);
                }
            }

            // The loans go back to the pool when this closure ends, after the submit.
            let (q_loan, q_view) = pack_rows(
                &self.inner,
                &mut encoder,
                &pack_q,
                inputs.q,
                plan.q_pack,
                "packed Q",
            )?;
            let (_pack_loans, views): (Vec<Scratch>, Vec<wgpu::TextureView>) = packs
                .iter()
                .map(|(pack_shape, tensor, label, pipeline)| {
                    pack_rows(
                        &self.inner,
                        &mut encoder,
                        pipeline,
                        tensor,
                        *pack_shape,
                        label,
                    )
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .unzip();
            // The forward plan's packs: K, V, then the bias and the key mask when present.
            let (k_view, v_view) = (&views[0], &views[1]);
            let mut extras = views[2..].iter();
            let mut modifier_textures = Vec::new();
            for modifier in [Modifier::Bias, Modifier::KeyMask] {
                if plan.query.mods.contains(modifier) {
                    let view = extras.next().expect("a packed view per compiled texture");
                    let number = match modifier {
                        Modifier::Bias => binding::BIAS,
                        _ => binding::KEY_MASK,
                    };
                    modifier_textures.push(texture_entry(number, view));
                }
            }
            let do_loan = self.inner.pool.texture(
                device,
                "packed dO",
                wgpu::Extent3d {
                    width: plan.do_texture[0],
                    height: plan.do_texture[1],
                    depth_or_array_layers: 1,
                },
                wgpu::TextureFormat::Rgba32Float,
                wgpu::TextureUsages::STORAGE_BINDING,
            )?;
            let do_view = do_loan
                .texture()
                .create_view(&wgpu::TextureViewDescriptor::default());
            if let Some(full) = &d_bias_full {
                // Key tiles the dQ pass skips hold no visible pair: their gradient is zero.
                encoder.clear_buffer(&full.buffer, 0, None);
            }

            let entries = [
                entry(binding::PARAMS, &params),
                entry(binding::BWD, &bwd),
                o_in.entry(binding::BWD_O),
                do_in.entry(binding::BWD_DO),
                lse.entry(binding::LSE),
                entry(binding::ROW_DATA, &row_data),
                stats.entry(binding::BWD_STATS),
                texture_entry(binding::BWD_DO_TEX, &do_view),
            ];
            record_pass(
                device,
                &mut encoder,
                &prep,
                &entries,
                plan.grids[0],
                "flash_bwd_prep",
            );

            let dk_out = dk32.as_ref().unwrap_or(&dk);
            let dv_out = dv32.as_ref().unwrap_or(&dv);
            let mut entries = vec![
                entry(binding::PARAMS, &params),
                entry(binding::BWD, &bwd),
                entry(binding::ROW_DATA, &row_data),
                entry(binding::SEQUENCES, &sequences),
                texture_entry(binding::BWD_Q_TEX, &q_view),
                texture_entry(binding::BWD_DO_TEX, &do_view),
                k_in.entry(binding::BWD_K),
                v_in.entry(binding::BWD_V),
                dk_out.entry(binding::BWD_DK),
                dv_out.entry(binding::BWD_DV),
            ];
            entries.extend(modifier_textures.iter().cloned());
            let grid = plan.grids[1];
            record_pass(
                device,
                &mut encoder,
                &key_value,
                &entries,
                grid,
                "flash_bwd_dkdv",
            );

            let dq_out = dq32.as_ref().unwrap_or(&dq);
            let mut entries = vec![
                entry(binding::PARAMS, &params),
                entry(binding::ROW_DATA, &row_data),
                entry(binding::SEQUENCES, &sequences),
                texture_entry(binding::BWD_K_TEX, k_view),
                texture_entry(binding::BWD_V_TEX, v_view),
                q_in.entry(binding::BWD_Q),
                do_in.entry(binding::BWD_DO),
                stats.entry(binding::BWD_STATS),
                dq_out.entry(binding::BWD_DQ),
                d_temperature_binding.entry(binding::BWD_D_TEMPERATURE),
            ];
            entries.push(entry(binding::BWD, &bwd));
            entries.push(d_bias_binding.entry(binding::BWD_D_BIAS));
            entries.extend(modifier_textures.iter().cloned());
            record_pass(
                device,
                &mut encoder,
                &query,
                &entries,
                plan.grids[2],
                "flash_bwd_dq",
            );

            if let Some(pipeline) = &sinks_pass {
                // After the dQ pass, which leaves each row's exact D in its statistics.
                let entries = [
                    entry(binding::PARAMS, &params),
                    entry(binding::BWD, &bwd),
                    entry(binding::ROW_DATA, &row_data),
                    stats.entry(binding::BWD_STATS),
                    sink_partials.entry(binding::BWD_SINK_PARTIALS),
                ];
                let grid = plan.grids[0];
                record_pass(
                    device,
                    &mut encoder,
                    pipeline,
                    &entries,
                    grid,
                    "flash_bwd_sinks",
                );
            }
            let mut sum = |params: &ReduceParams, from: &Tensor, to: &Tensor| {
                let pipeline = reduce.as_ref().expect("planned with a reduction");
                let uniform = uniform("reduce_sum params", bytemuck::bytes_of(params));
                let entries = [
                    entry(binding::PARAMS, &uniform),
                    from.entry(binding::REDUCE_IN),
                    to.entry(binding::REDUCE_OUT),
                ];
                let groups = params.outputs.div_ceil(64).max(1);
                let grid = [params.groups_x, groups.div_ceil(params.groups_x), 1];
                record_pass(device, &mut encoder, pipeline, &entries, grid, "reduce_sum");
            };
            if let (Some(params), Some(out)) = (&plan.sinks, &d_sinks) {
                sum(params, &sink_partials, out);
            }
            if let (Some(params), Some(full), Some(out)) =
                (plan.bias_grad.and_then(|b| b.reduce), &d_bias_full, &d_bias)
            {
                sum(&params, full, out);
            }

            for (from, to) in [(&dq32, &dq), (&dk32, &dk), (&dv32, &dv)] {
                if let (Some(pipeline), Some(from)) = (&from_f32, from) {
                    convert(&mut encoder, pipeline, Conversion::FromF32(io), from, to);
                }
            }
            queue.submit([encoder.finish()]);
            drop((q_loan, do_loan));
            Ok(())
        })??;
        Ok(GpuAttentionGrads {
            dq,
            dk,
            dv,
            d_bias,
            d_sinks,
            d_temperature,
        })
    }
}

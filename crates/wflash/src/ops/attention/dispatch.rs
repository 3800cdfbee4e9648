//! Records a planned attention call: the packing passes, Q/O conversions, the attention pass.
//! Everything it binds was decided by the plan (plan.rs); it only slices the call's data by
//! batch element.

use super::plan::{PackPlan, Packed, Plan};
use super::{GpuAttention, GpuModifiers};
use crate::gpu::pool::Scratch;
use crate::gpu::tensor::buffer_with_contents;
use crate::kernels::{Conversion, Family, KernelId, binding};
use crate::ops::passes::{PackShape, convert_pass, entry, pack_rows, record_pass};
use crate::{AttentionOptions, BiasValues, DType, Engine, Modifier, Result, Tensor, Variant};

impl Engine {
    /// Records and submits the dispatch of batch elements `batch0..batch0 + batch` of the
    /// planned call (`q`, `k`, `v` hold just those); the modifiers' per-batch data is sliced
    /// from there. `modifiers`: the call's GPU-resident values (checked against `opts`).
    #[expect(
        clippy::too_many_arguments,
        reason = "the plan, its data and one dispatch's tensors; private"
    )]
    pub(super) fn run(
        &self,
        plan: &Plan,
        opts: &AttentionOptions<'_>,
        modifiers: &GpuModifiers<'_>,
        batch0: usize,
        batch: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<GpuAttention> {
        self.check_alive()?;
        let pipeline = self.pipeline(KernelId::Forward(plan.key))?;
        let params = &plan.params;
        let call = &plan.shape;
        // Query rows of one batch element: the LSE's and the temperature's per-batch size.
        let rows = call.q_heads * call.q_len;
        let output = self.output_tensor(q.dtype, batch * (call.o_elems() / call.batch))?;
        // Sigmoid has no row statistic; its kernel writes no LSE (one element keeps the binding).
        let lse = match opts.variant {
            Variant::Softmax => self.output_tensor(DType::F32, batch * rows)?,
            Variant::Sigmoid { .. } => self.output_tensor(DType::F32, 1)?,
        };
        let sequences = match opts.varlen {
            Some(_) => &plan.sequences[..],
            None => &plan.sequences[batch0..batch0 + batch],
        };
        let mut row_data = plan.head_data.clone();
        if let Some(t) = opts.temperature {
            row_data.extend_from_slice(&t[batch0 * rows..(batch0 + batch) * rows]);
        }
        let max_groups = self.inner.info.limits.max_compute_workgroups_per_dimension;

        // The textures the plan packs ahead of the kernel, filled from this dispatch's data.
        let packs = (plan.packs.iter())
            .map(|pack| {
                let (shape, tensor, label) =
                    self.pack_input(plan, pack, opts, modifiers, batch0, batch, k, v)?;
                Ok((
                    shape,
                    tensor,
                    label,
                    self.pipeline(KernelId::Pack(pack.kernel))?,
                ))
            })
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
            .map(|()| self.pipeline(KernelId::Convert(Conversion::ToF32(plan.io_storage))))
            .transpose()?;
        let from_f32 = converted
            .map(|()| self.pipeline(KernelId::Convert(Conversion::FromF32(plan.io_storage))))
            .transpose()?;

        self.guarded(|device| -> Result<()> {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("flash_fwd"),
            });
            // The loans go back to the pool when this closure ends, after the submit.
            let (_loans, views): (Vec<Scratch>, Vec<wgpu::TextureView>) = packs
                .iter()
                .map(|(pack_shape, tensor, name, pipeline)| {
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
                bytemuck::bytes_of(params),
                wgpu::BufferUsages::UNIFORM,
            );
            let storage_init = |label, contents: &[u8]| {
                buffer_with_contents(device, queue, label, contents, wgpu::BufferUsages::STORAGE)
            };
            let row_data = storage_init("flash_fwd row data", bytemuck::cast_slice(&row_data));
            copy_resident_sinks(&mut encoder, modifiers, &row_data, call.q_heads);
            let sequences_buffer =
                storage_init("flash_fwd sequences", bytemuck::cast_slice(sequences));
            let mut entries = vec![
                entry(binding::PARAMS, &uniform),
                q_f32.as_ref().unwrap_or(q).entry(binding::Q),
                entry(binding::O, &o_f32.as_ref().unwrap_or(&output).buffer),
                lse.entry(binding::LSE),
                entry(binding::ROW_DATA, &row_data),
                entry(binding::SEQUENCES, &sequences_buffer),
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
                    entries.push(texture(binding::K));
                    entries.push(texture(binding::V));
                }
                Family::Tiled => {
                    entries.push(k.entry(binding::K));
                    entries.push(v.entry(binding::V));
                }
            }
            if plan.key.mods.contains(Modifier::Bias) {
                entries.push(texture(binding::BIAS));
            }
            if plan.key.mods.contains(Modifier::KeyMask) {
                entries.push(texture(binding::KEY_MASK));
            }
            let grid = [plan.query_tiles, params.q_heads, sequences.len() as u32];
            record_pass(device, &mut encoder, &pipeline, &entries, grid, "flash_fwd");
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

impl Engine {
    /// The tensor a planned pack pass reads for batch elements `batch0..batch0 + batch`, with
    /// its shape for them; a resident bias's values come from `modifiers`.
    #[expect(
        clippy::too_many_arguments,
        reason = "the plan, one pack, the options and one dispatch's range and K/V; private"
    )]
    pub(crate) fn pack_input(
        &self,
        plan: &Plan,
        pack: &PackPlan,
        opts: &AttentionOptions<'_>,
        modifiers: &GpuModifiers<'_>,
        batch0: usize,
        batch: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(PackShape, Tensor, &'static str)> {
        let (q_len, kv_len) = (plan.shape.q_len, plan.shape.kv_len);
        let mut shape = PackShape {
            batch,
            ..pack.shape
        };
        let (tensor, label) = match pack.what {
            Packed::K => (k.clone(), "packed K"),
            Packed::V => (v.clone(), "packed V"),
            Packed::Bias => {
                let bias = opts.bias.ok_or_else(|| planned_without("a bias"))?;
                // A bias shared by the batch is packed once, whole.
                let (first, count) = if bias.batch == 1 {
                    (0, 1)
                } else {
                    (batch0, batch)
                };
                shape.batch = count;
                let per_batch = bias.heads * q_len * kv_len;
                let range = first * per_batch..(first + count) * per_batch;
                let tensor = match bias.values {
                    BiasValues::F32(values) => self.upload(&values[range])?,
                    BiasValues::F16(values) => self.upload(&values[range])?,
                    // GPU calls dispatch every batch element at once: the whole tensor.
                    BiasValues::Resident(_) => (modifiers.bias)
                        .ok_or_else(|| planned_without("a resident bias's tensor"))?
                        .values
                        .clone(),
                };
                (tensor, "packed bias")
            }
            Packed::KeyMask => {
                let mask = opts.key_mask.ok_or_else(|| planned_without("a key mask"))?;
                // Its additive form: 0 where a key takes part, -inf where it is hidden.
                let additive: Vec<f32> = mask[batch0 * kv_len..(batch0 + batch) * kv_len]
                    .iter()
                    .map(|&keep| if keep { 0.0 } else { f32::NEG_INFINITY })
                    .collect();
                (self.upload(&additive)?, "packed key mask")
            }
        };
        Ok((shape, tensor, label))
    }
}

/// Resident sinks into a call's row data, over the zeros that held their place (the head
/// data is ALiBi slopes, then sinks: `heads` f32 each). Recorded before the passes that read it.
pub(crate) fn copy_resident_sinks(
    encoder: &mut wgpu::CommandEncoder,
    modifiers: &GpuModifiers<'_>,
    row_data: &wgpu::Buffer,
    heads: usize,
) {
    if let Some(sinks) = modifiers.sinks {
        let bytes = (heads * size_of::<f32>()) as u64;
        encoder.copy_buffer_to_buffer(&sinks.buffer, sinks.offset, row_data, bytes, bytes);
    }
}

/// A plan that packs a modifier's texture was made with options that hold it; dispatch got
/// other options.
fn planned_without(what: &str) -> crate::Error {
    crate::Error::Internal(format!(
        "the plan packs {what} the call's options do not hold"
    ))
}

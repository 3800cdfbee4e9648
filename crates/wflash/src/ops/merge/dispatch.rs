//! Records a planned merge: the parts stacked into one buffer each for outputs and LSEs (from
//! the scratch pool), then merge.wgsl.

use super::plan::MergePlan;
use crate::gpu::tensor::buffer_with_contents;
use crate::kernels::{KernelId, binding};
use crate::ops::passes::{entry, record_pass};
use crate::{DType, Engine, GpuAttention, Result, Tensor};

impl Engine {
    /// Stacks the parts, merges them into new output and LSE tensors, submits.
    pub(super) fn run_merge(
        &self,
        plan: &MergePlan,
        parts: &[(&Tensor, &Tensor)],
    ) -> Result<GpuAttention> {
        self.check_alive()?;
        let pipeline = self.pipeline(KernelId::Merge(plan.kernel))?;
        let shape = &plan.shape;
        let output = self.output_tensor(plan.kernel.output.dtype(), shape.o_elems())?;
        let lse = self.output_tensor(DType::F32, shape.lse_elems())?;
        self.guarded(|device| -> Result<()> {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("merge attention"),
            });
            let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
            let count = parts.len() as u64;
            let pool = &self.inner.pool;
            let stacked = pool.buffer(device, "merge parts", plan.part_bytes * count, usage)?;
            let stacked_lse =
                pool.buffer(device, "merge part lses", plan.lse_bytes * count, usage)?;
            for (s, &(o, l)) in (0u64..).zip(parts) {
                let (part, lse_part) = (plan.part_bytes, plan.lse_bytes);
                encoder.copy_buffer_to_buffer(
                    &o.buffer,
                    o.offset,
                    stacked.buffer(),
                    s * part,
                    part,
                );
                encoder.copy_buffer_to_buffer(
                    &l.buffer,
                    l.offset,
                    stacked_lse.buffer(),
                    s * lse_part,
                    lse_part,
                );
            }
            self.record_merge(
                device,
                &mut encoder,
                plan,
                &pipeline,
                [
                    stacked.buffer(),
                    stacked_lse.buffer(),
                    &output.buffer,
                    &lse.buffer,
                ],
            );
            self.inner.queue.submit([encoder.finish()]);
            // The loans go back after the submit (the pool's rule).
            drop((stacked, stacked_lse));
            Ok(())
        })??;
        Ok(GpuAttention {
            output,
            lse: Some(lse),
        })
    }

    /// Records merge.wgsl over stacked parts: `buffers` are the stacked outputs and LSEs (a
    /// split-KV pass can write them directly), the merged output and LSE.
    pub(crate) fn record_merge(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        plan: &MergePlan,
        pipeline: &wgpu::ComputePipeline,
        [parts, lses, output, lse]: [&wgpu::Buffer; 4],
    ) {
        let uniform = buffer_with_contents(
            device,
            &self.inner.queue,
            "merge params",
            bytemuck::bytes_of(&plan.params),
            wgpu::BufferUsages::UNIFORM,
        );
        // Exactly the parts' LSEs: the kernel counts the parts by this binding's length.
        let lse_binding = wgpu::BindGroupEntry {
            binding: binding::MERGE_LSE,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: lses,
                offset: 0,
                size: std::num::NonZeroU64::new(plan.lse_bytes * u64::from(plan.params.parts)),
            }),
        };
        let entries = [
            entry(binding::PARAMS, &uniform),
            entry(binding::MERGE_PARTS, parts),
            lse_binding,
            entry(binding::MERGE_OUT, output),
            entry(binding::MERGE_LSE_OUT, lse),
        ];
        record_pass(
            device,
            encoder,
            pipeline,
            &entries,
            plan.grid,
            "merge attention",
        );
    }
}

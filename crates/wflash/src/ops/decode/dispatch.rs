//! Records planned appends and decode calls.

use super::KvCache;
use super::plan::{DecodeParams, DecodePlan};
use crate::gpu::tensor::buffer_with_contents;
use crate::kernels::{KernelId, binding};
use crate::ops::passes::{entry, record_pass};
use crate::{DType, Engine, Error, GpuAttention, Result, Tensor};

impl Engine {
    /// The sequences' lengths and (paged) block tables as storage buffers.
    fn cache_buffers(&self, device: &wgpu::Device, cache: &KvCache) -> [wgpu::Buffer; 2] {
        let lengths: Vec<u32> = cache.lengths.iter().map(|&l| l as u32).collect();
        let storage = |label, words: &[u32]| {
            buffer_with_contents(
                device,
                &self.inner.queue,
                label,
                bytemuck::cast_slice(words),
                wgpu::BufferUsages::STORAGE,
            )
        };
        [
            storage("decode lengths", &lengths),
            storage("decode block tables", &cache.flat_tables()),
        ]
    }

    /// A pass's uniform block.
    fn params_buffer(&self, device: &wgpu::Device, params: &DecodeParams) -> wgpu::Buffer {
        buffer_with_contents(
            device,
            &self.inner.queue,
            "decode params",
            bytemuck::bytes_of(params),
            wgpu::BufferUsages::UNIFORM,
        )
    }

    /// Records and submits a planned append: K's pass, then V's.
    pub(super) fn run_append(
        &self,
        cache: &KvCache,
        plan: &DecodePlan,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        self.check_alive()?;
        let pipelines = (plan.passes.iter())
            .map(|(key, _, _)| self.pipeline(KernelId::Decode(*key)))
            .collect::<Result<Vec<_>>>()?;
        self.guarded(|device| {
            let queue = &self.inner.queue;
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("kv cache append"),
            });
            let [lengths, blocks] = self.cache_buffers(device, cache);
            let sources = [(k, &cache.k), (v, &cache.v)];
            for (((_, params, grid), pipeline), (new, cached)) in
                plan.passes.iter().zip(&pipelines).zip(sources)
            {
                let uniform = self.params_buffer(device, params);
                let entries = [
                    entry(binding::PARAMS, &uniform),
                    entry(binding::DECODE_LENGTHS, &lengths),
                    entry(binding::DECODE_BLOCKS, &blocks),
                    new.entry(binding::DECODE_NEW),
                    cached.entry(binding::DECODE_CACHE),
                ];
                record_pass(
                    device,
                    &mut encoder,
                    pipeline,
                    &entries,
                    *grid,
                    "kv cache append",
                );
            }
            queue.submit([encoder.finish()]);
        })
    }

    /// Records and submits a planned decode call: the split pass into partials (scratch from
    /// the pool), then their merge into the output.
    pub(super) fn run_decode(
        &self,
        cache: &KvCache,
        plan: &DecodePlan,
        q: &Tensor,
    ) -> Result<GpuAttention> {
        self.check_alive()?;
        let (Some(merge), [(key, params, grid)]) = (&plan.merge, &plan.passes[..]) else {
            return Err(Error::Internal(
                "a decode plan has one split pass and a merge".into(),
            ));
        };
        let split = self.pipeline(KernelId::Decode(*key))?;
        let merge_pipeline = self.pipeline(KernelId::Merge(merge.kernel))?;
        let out = &merge.shape;
        let output = self.output_tensor(q.dtype, out.o_elems())?;
        let lse = self.output_tensor(DType::F32, out.lse_elems())?;
        let parts = u64::from(merge.params.parts);
        self.guarded(|device| -> Result<()> {
            let queue = &self.inner.queue;
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("decode attention"),
            });
            let pool = &self.inner.pool;
            let usage = wgpu::BufferUsages::STORAGE;
            let partial_o = pool.buffer(
                device,
                "decode partial outputs",
                merge.part_bytes * parts,
                usage,
            )?;
            let partial_lse = pool.buffer(
                device,
                "decode partial lses",
                merge.lse_bytes * parts,
                usage,
            )?;
            let [lengths, blocks] = self.cache_buffers(device, cache);
            let uniform = self.params_buffer(device, params);
            let row_data = buffer_with_contents(
                device,
                queue,
                "decode row data",
                bytemuck::cast_slice(&plan.row_data),
                wgpu::BufferUsages::STORAGE,
            );
            let entries = [
                entry(binding::PARAMS, &uniform),
                q.entry(binding::Q),
                cache.k.entry(binding::DECODE_K),
                cache.v.entry(binding::DECODE_V),
                entry(binding::DECODE_LENGTHS, &lengths),
                entry(binding::DECODE_BLOCKS, &blocks),
                entry(binding::DECODE_PARTIAL_O, partial_o.buffer()),
                entry(binding::DECODE_PARTIAL_LSE, partial_lse.buffer()),
                entry(binding::DECODE_ROW_DATA, &row_data),
            ];
            record_pass(
                device,
                &mut encoder,
                &split,
                &entries,
                *grid,
                "decode split",
            );
            self.record_merge(
                device,
                &mut encoder,
                merge,
                &merge_pipeline,
                [
                    partial_o.buffer(),
                    partial_lse.buffer(),
                    &output.buffer,
                    &lse.buffer,
                ],
            );
            queue.submit([encoder.finish()]);
            // The loans go back after the submit (the pool's rule).
            drop((partial_o, partial_lse));
            Ok(())
        })??;
        // Sigmoid has no LSE (its merge writes −∞ rows into the scratch it drops).
        Ok(GpuAttention {
            output,
            lse: (!key.sigmoid).then_some(lse),
        })
    }
}

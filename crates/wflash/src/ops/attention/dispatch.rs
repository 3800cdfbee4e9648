//! Records a planned attention call: the packing passes, Q/O conversions, the attention pass.

use super::GpuAttention;
use super::plan::{PackPlan, Packed, Plan};
use crate::gpu::pool::Scratch;
use crate::gpu::tensor::buffer_with_contents;
use crate::kernels::{Conversion, Family, KernelId, binding};
use crate::ops::passes::{PackShape, convert_pass, entry, pack_rows, record_pass};
use crate::{
    AttentionOptions, BiasValues, Causal, DType, Engine, Layout, Modifier, Result, Shape, Tensor,
    Variant,
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

impl Engine {
    /// Records and submits the dispatch of batch elements `batch0..batch0 + batch` of the
    /// planned call (`q`, `k`, `v` hold just those); the modifiers' per-batch data is sliced
    /// from there.
    #[expect(
        clippy::too_many_arguments,
        reason = "the plan, its data and one dispatch's tensors; private"
    )]
    pub(super) fn run(
        &self,
        plan: &Plan,
        opts: &AttentionOptions<'_>,
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
                    self.pack_input(plan, pack, opts, batch0, batch, k, v)?;
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
            let sequences_buffer =
                storage_init("flash_fwd sequences", bytemuck::cast_slice(sequences));
            let mut entries = vec![
                entry(binding::PARAMS, &uniform),
                entry(binding::Q, &q_f32.as_ref().unwrap_or(q).buffer),
                entry(binding::O, &o_f32.as_ref().unwrap_or(&output).buffer),
                entry(binding::LSE, &lse.buffer),
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
                    entries.push(entry(binding::K, &k.buffer));
                    entries.push(entry(binding::V, &v.buffer));
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

/// Diagonal offsets and window sides are clamped to ±FAR so the kernel's i32 sums cannot
/// overflow; a bound that far out already means "every key" or "no key" for any problem that fits.
const FAR: i64 = 1 << 30;

impl Engine {
    /// The tensor a planned pack pass reads for batch elements `batch0..batch0 + batch`, with
    /// its shape for them.
    #[expect(
        clippy::too_many_arguments,
        reason = "the plan, one pack, the options and one dispatch's range and K/V; private"
    )]
    fn pack_input(
        &self,
        plan: &Plan,
        pack: &PackPlan,
        opts: &AttentionOptions<'_>,
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

/// The per-sequence records of the whole call: one per batch element, or per varlen sequence.
pub(super) fn sequence_infos(
    shape: &Shape,
    opts: &AttentionOptions<'_>,
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
    (0..shape.batch)
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

/// `row_data`'s per-head part: ALiBi slopes and sinks per query head (zeros when absent).
pub(super) fn head_data(shape: &Shape, opts: &AttentionOptions<'_>) -> Vec<f32> {
    let heads = shape.q_heads;
    let mut data = Vec::with_capacity(2 * heads);
    data.extend_from_slice(opts.alibi_slopes.unwrap_or(&vec![0.0; heads]));
    data.extend_from_slice(opts.sinks.unwrap_or(&vec![0.0; heads]));
    data
}

/// A plan that packs a modifier's texture was made with options that hold it; dispatch got
/// other options.
fn planned_without(what: &str) -> crate::Error {
    crate::Error::Internal(format!(
        "the plan packs {what} the call's options do not hold"
    ))
}

/// The uniform values of a call, before its texture geometries. Plan has already bounded every
/// index to u32.
pub(super) fn flash_params(
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
    // Clamped in usize: a bound of 2⁶³ or more must not wrap to a negative i64.
    let far = FAR as usize;
    let side = |bound: Option<usize>| bound.map_or(-1, |b| b.min(far) as i32);
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
        flags: if opts.sinks.is_some() { HAS_SINKS } else { 0 }
            | if opts.temperature.is_some() {
                HAS_TEMPERATURE
            } else {
                0
            },
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
        prefix_len: opts.prefix_len.map_or(0, |p| p.min(far) as u32),
        chunk: opts.chunk.map_or(0, |c| c.min(far - 1) as u32),
        _pad0: 0,
        _pad1: 0,
        _pad2: 0,
    })
}

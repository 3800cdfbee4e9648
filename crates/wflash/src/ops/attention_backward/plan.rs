//! How a backward call runs: the forward's plan of the same call (its uniforms, sequences and
//! packed K/V, bias and key mask, as the unrolled family packs them), plus the backward's own
//! textures, kernels, grids and reductions, all decided before anything touches the GPU.

use crate::kernels::{
    BACKWARD_MAX_ROWS, BACKWARD_MAX_ROWS_BROWSER_CPU, BackwardKey, BackwardPass, Family,
    VariantKind, backward_rows,
};
use crate::ops::attention::Plan;
use crate::ops::passes::PackShape;
use crate::{AttentionOptions, DType, Engine, Error, Layout, ModifierSet, Result, Shape};

/// Query rows per workgroup of the prep pass (`PREP_ROWS` in flash_bwd.wgsl).
const PREP_ROWS: usize = 64;
/// Query rows per step of the dK/dV pass's loop (its `//#unroll u 4`).
const QUERY_STEP: usize = 4;
/// llvmpipe ends every loop of an invocation after 65535 iterations in total (docs/PERF.md):
/// the dK/dV pass runs one per QUERY_STEP rows of each head of a GQA group, the dQ pass one
/// per 4 keys; a few hundred more go to its searches and setup.
const CPU_MAX_LOOP_STEPS: usize = 60_000;

/// How one backward call runs. Dispatch records exactly this.
#[derive(Clone, Debug, PartialEq)]
pub struct BackwardPlan {
    /// The forward's plan of the call (unrolled family): uniforms, sequences, head data, and
    /// the K/V, bias and key-mask packing the dQ pass reads.
    pub forward: Plan,
    pub prep: BackwardKey,
    pub key_value: BackwardKey,
    pub query: BackwardKey,
    /// The backward's own uniform block.
    pub params: BackwardParams,
    /// Q packed for the dK/dV pass (from the call's Q).
    pub q_pack: PackShape,
    /// The packed dO texture the prep pass writes: texels per line and lines.
    pub do_texture: [u32; 2],
    /// Workgroup grids of the prep, dK/dV and dQ passes.
    pub grids: [[u32; 3]; 3],
    /// How the bias gradient comes out, when asked for.
    pub bias_grad: Option<BiasGradPlan>,
    /// With sinks: the sum of the prep pass's per-block shares into one gradient per head.
    pub sinks: Option<ReduceParams>,
}

/// The bias gradient: the dQ pass writes dS per (batch, head, row, key); where the bias
/// broadcasts, a reduction sums that over the broadcast axes into the bias's shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BiasGradPlan {
    /// Elements of the bias (and of its gradient).
    pub elems: usize,
    /// The reduction from `[batch, q_heads, q_len, kv_len]`, or `None` when the bias has that
    /// shape already.
    pub reduce: Option<ReduceParams>,
}

/// The backward passes' uniform block (`struct Backward` in flash_bwd.wgsl); a test checks the
/// layout against naga's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BackwardParams {
    pub q_rows_per_head: u32,
    pub q_rows_per_batch: u32,
    pub q_fold: u32,
    pub do_fold: u32,
    pub q_len: u32,
    pub kv_len: u32,
    pub prep_blocks: u32,
    pub _pad0: u32,
}

/// The reduction pass's uniform block (`struct Reduce` in flash_bwd.wgsl): output `o` is the
/// sum of `input[(o / inner) · outer + o % inner + a · stride_a + c · stride_c]` over
/// `a < count_a`, `c < count_c`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ReduceParams {
    pub outputs: u32,
    pub inner: u32,
    pub outer: u32,
    pub count_a: u32,
    pub stride_a: u32,
    pub count_c: u32,
    pub stride_c: u32,
    pub groups_x: u32,
}

impl Engine {
    /// Checks a backward call and decides how it runs, without touching the GPU.
    pub fn plan_backward(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        dtype: DType,
    ) -> Result<BackwardPlan> {
        let forward = self.plan_family(shape, layout, opts, dtype, Family::Unrolled)?;
        if forward.batch_per_dispatch < shape.batch {
            return Err(Error::TooLarge {
                limit: "max_storage_buffer_binding_size",
                needed: shape.batch as u64,
                max: forward.batch_per_dispatch as u64,
                hint: " batch elements per backward call (host-slice calls split over batch; split GPU tensors yourself)",
            });
        }
        let limits = &self.inner.info.limits;
        let max_dim = limits.max_texture_dimension_2d as usize;
        let max_groups = limits.max_compute_workgroups_per_dimension;
        let varlen = opts.varlen.is_some();
        let step_pad = if varlen { QUERY_STEP } else { 0 };
        let q_rows_per_head = shape.q_len.next_multiple_of(QUERY_STEP) + step_pad;
        let packed_rows = shape.batch * shape.q_heads * q_rows_per_head;
        let fold = |width4: usize, what| -> Result<u32> {
            let too_large = |needed| Error::TooLarge {
                limit: "max_texture_dimension_2d",
                needed: needed as u64,
                max: max_dim as u64,
                hint: what,
            };
            if width4 > max_dim {
                return Err(too_large(width4));
            }
            let fold = max_dim / width4;
            if packed_rows.div_ceil(fold) > max_dim {
                return Err(too_large(packed_rows.div_ceil(fold)));
            }
            Ok(fold as u32)
        };
        let q_fold = fold(shape.head_dim.div_ceil(4), " texels or lines for packed Q")?;
        let do_width4 = shape.value_dim.div_ceil(4) + 1;
        let do_fold = fold(do_width4, " texels or lines for packed dO")?;

        let max_rows = if self.browser_cpu_adapter() {
            BACKWARD_MAX_ROWS_BROWSER_CPU
        } else {
            BACKWARD_MAX_ROWS
        };
        let rows = backward_rows(shape.head_dim as u32, shape.value_dim as u32, max_rows);
        let block = crate::kernels::UNROLLED_LANES as usize * rows as usize;
        let group = shape.q_heads / shape.kv_heads;
        self.within_cpu_loop_limit(
            group * shape.q_len.div_ceil(QUERY_STEP),
            " steps of 4 query rows per key over a GQA group in the backward",
        )?;
        let sequences = forward.sequences.len();
        let longest = |len: fn(&crate::SequenceInfo) -> u32| {
            forward.sequences.iter().map(len).max().unwrap_or(0) as usize
        };
        let prep_blocks = q_rows_per_head.div_ceil(PREP_ROWS);
        let grids = [
            [prep_blocks, shape.q_heads, shape.batch],
            [
                longest(|s| s.kv_len).max(1).div_ceil(block),
                shape.kv_heads,
                sequences,
            ],
            [
                longest(|s| s.q_len).max(1).div_ceil(block),
                shape.q_heads,
                sequences,
            ],
        ];
        for grid in &grids {
            if let Some(&needed) = grid.iter().find(|&&n| n > max_groups as usize) {
                return Err(Error::TooLarge {
                    limit: "max_compute_workgroups_per_dimension",
                    needed: needed as u64,
                    max: u64::from(max_groups),
                    hint: " workgroups of a backward pass",
                });
            }
        }
        let grids = grids.map(|g| g.map(|n| n as u32));

        let variant = VariantKind::of(&opts.variant);
        let mods = ModifierSet::compiled_of(ModifierSet::of(opts));
        let bias_grad = opts.bias_grad && opts.bias.is_some();
        let pass = |pass| BackwardKey {
            pass,
            head_dim: shape.head_dim as u32,
            value_dim: shape.value_dim as u32,
            rows,
            causal: opts.causal.is_some(),
            variant,
            mods,
            bias_grad: bias_grad && pass == BackwardPass::Query,
        };
        let bias_grad = opts.bias.filter(|_| bias_grad).map(|bias| {
            let matrix = shape.q_len * shape.kv_len;
            let full = [shape.batch, shape.q_heads];
            let reduce = match (bias.batch == full[0], bias.heads == full[1]) {
                (true, true) => None,
                // Summed over heads: output (b, e) from (b, h, e).
                (true, false) => Some((shape.q_heads * matrix, shape.q_heads, matrix, 1, 0)),
                // Summed over batch: output (h, e) from (b, h, e).
                (false, true) => Some((matrix, shape.batch, shape.q_heads * matrix, 1, 0)),
                (false, false) => Some((
                    matrix,
                    shape.batch,
                    shape.q_heads * matrix,
                    shape.q_heads,
                    matrix,
                )),
            };
            let elems = bias.batch * bias.heads * matrix;
            BiasGradPlan {
                elems,
                reduce: reduce.map(|(outer, count_a, stride_a, count_c, stride_c)| {
                    reduce_params(
                        elems,
                        matrix,
                        outer,
                        [count_a, stride_a, count_c, stride_c],
                        max_groups,
                    )
                }),
            }
        });
        // The backward's own buffers, within the binding limit and u32 element indices: the
        // row statistics (a vec4 per query row) and, with the bias's gradient, dS per (batch,
        // head, row, key) before the reduction over the axes the bias broadcasts over.
        let mut own_buffers = vec![(4 * shape.lse_elems(), " floats of row statistics")];
        if let Some(b) = &bias_grad {
            let before_reduction = match b.reduce {
                Some(_) => shape.batch * shape.q_heads * shape.q_len * shape.kv_len,
                None => b.elems,
            };
            own_buffers.push((before_reduction, " floats of the bias's gradient"));
        }
        for (floats, hint) in own_buffers {
            let max_index = u64::from(u32::MAX);
            if floats as u64 > max_index {
                return Err(Error::TooLarge {
                    limit: "u32 element index",
                    needed: floats as u64,
                    max: max_index,
                    hint,
                });
            }
            self.inner
                .info
                .within_binding_limit(4 * floats as u64, hint)?;
        }
        let sinks = opts.sinks.map(|_| {
            let (heads, blocks) = (shape.q_heads, prep_blocks);
            let axes = [shape.batch, heads * blocks, blocks, 1];
            reduce_params(heads, 1, blocks, axes, max_groups)
        });
        // The reduction walks axis c inside axis a: count_a · (count_c + 1) loop iterations
        // per invocation, within llvmpipe's limit too (a bias broadcast over batch and heads
        // of 256 × 256 lost the last batch element's share past it).
        let reductions = bias_grad.iter().filter_map(|b| b.reduce.as_ref());
        for p in reductions.chain(&sinks) {
            self.within_cpu_loop_limit(
                p.count_a as usize * (p.count_c as usize + 1),
                " steps of the bias or sinks gradient's reduction (batch × heads it sums over)",
            )?;
        }
        let q_stride = forward.params.q_stride;
        Ok(BackwardPlan {
            prep: BackwardKey::prep(shape.value_dim as u32, variant),
            key_value: pass(BackwardPass::KeyValue),
            query: pass(BackwardPass::Query),
            params: BackwardParams {
                q_rows_per_head: q_rows_per_head as u32,
                q_rows_per_batch: if varlen {
                    0
                } else {
                    (shape.q_heads * q_rows_per_head) as u32
                },
                q_fold,
                do_fold,
                q_len: shape.q_len as u32,
                kv_len: shape.kv_len as u32,
                prep_blocks: prep_blocks as u32,
                _pad0: 0,
            },
            q_pack: PackShape {
                stride: q_stride,
                first_head: 0,
                heads: shape.q_heads,
                batch: shape.batch,
                seq_len: shape.q_len,
                rows_per_head: q_rows_per_head,
                dim: shape.head_dim,
                fold: q_fold,
                max_groups,
            },
            do_texture: [
                do_fold * do_width4 as u32,
                packed_rows.div_ceil(do_fold as usize) as u32,
            ],
            grids,
            bias_grad,
            // Shares at (batch, head, block): head h sums over batch and blocks.
            sinks,
            forward,
        })
    }
}

impl Engine {
    /// On a CPU adapter, `TooLarge` when an invocation would loop `steps` times, past what
    /// llvmpipe runs before it silently ends every loop (CPU_MAX_LOOP_STEPS).
    fn within_cpu_loop_limit(&self, steps: usize, hint: &'static str) -> Result<()> {
        if self.inner.info.device_type == wgpu::DeviceType::Cpu && steps > CPU_MAX_LOOP_STEPS {
            return Err(Error::TooLarge {
                limit: "CPU driver loop limit (65535 loop iterations per invocation)",
                needed: steps as u64,
                max: CPU_MAX_LOOP_STEPS as u64,
                hint,
            });
        }
        Ok(())
    }
}

/// The sum of each element of `[.., axes.., inner]` data over two strided axes
/// (`[count_a, stride_a, count_c, stride_c]`) into `outputs` elements.
pub(super) fn reduce_params(
    outputs: usize,
    inner: usize,
    outer: usize,
    axes: [usize; 4],
    max_groups: u32,
) -> ReduceParams {
    let groups = (outputs as u32).div_ceil(64).max(1);
    ReduceParams {
        outputs: outputs as u32,
        inner: inner as u32,
        outer: outer as u32,
        count_a: axes[0] as u32,
        stride_a: axes[1] as u32,
        count_c: axes[2] as u32,
        stride_c: axes[3] as u32,
        groups_x: groups.min(max_groups),
    }
}

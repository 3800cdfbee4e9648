//! Linear attention's backward (semantics: `wflash_ref::linear::backward`): the gradients of
//! `Σ dO ∘ O + ⟨d_final, final state⟩` with respect to Q, K, V and the initial state, on host
//! slices or GPU tensors. The chunked form (shaders/linear_bwd.wgsl): the forward's state
//! passes rebuild the state before each chunk, a reverse scan over chunks gives the state
//! gradient after each, and every gradient row is its chunk's masked quadratic part plus the
//! carried state's. No atomics: deterministic.

use super::dispatch::{Bound, copy_chunk_states};
use super::{GpuLinearState, LinearParams, LinearPlan};
use crate::gpu::tensor::{Region, buffer_with_contents};
use crate::kernels::{KernelId, LinearKey, LinearPass, PackKernel, binding, linear_rows};
use crate::linear::{LINEAR_MAX_SEQUENTIAL_STEPS, LinearKernel};
use crate::ops::passes::{
    PackShape, check_qkv, entry, pack_into, packed_texture, record_pass, texture_entry,
};
use crate::{
    DType, Element, Engine, Error, Layout, LinearGrads, LinearOptions, LinearState, Result, Shape,
    Tensor, check_len,
};

/// How one backward call runs, decided whole before anything touches the GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearBackwardPlan {
    /// The forward's chunked plan, whose chunk-state and prefix passes rebuild the states
    /// (its texture fold narrowed to fit the backward's widest packed rows).
    pub forward: LinearPlan,
    /// linear_bwd.wgsl's passes in order: readout, chunk state gradients, their reverse scan,
    /// dQ, dK/dV.
    pub passes: Vec<LinearKey>,
    /// The uniform block of the reverse scan: the forward's, with `has_initial` saying which
    /// parts of `d_final` are bound.
    pub scan_params: LinearParams,
}

/// The backward's passes, in the order they run.
const PASSES: [LinearPass; 5] = [
    LinearPass::BwdReadout,
    LinearPass::BwdChunkDState,
    LinearPass::BwdChunkDPrefix,
    LinearPass::BwdDq,
    LinearPass::BwdDkDv,
];

/// Results of [`Engine::linear_attention_backward_gpu`], still on the GPU: see
/// [`LinearGrads`] for each.
#[derive(Clone, Debug)]
pub struct GpuLinearGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
    pub d_initial: Option<GpuLinearState>,
}

impl Engine {
    /// Checks a linear-attention backward call and decides how it runs, without touching the
    /// GPU. The backward always runs the chunked algorithm (`opts.kernel` chooses only the
    /// forward's). `initial` and `d_final` give the `(kv, z)` sizes of the initial state and
    /// of the final state's gradient.
    pub fn plan_linear_backward(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &LinearOptions<'_>,
        dtype: DType,
        initial: Option<(usize, Option<usize>)>,
        d_final: Option<(usize, Option<usize>)>,
    ) -> Result<LinearBackwardPlan> {
        opts.validate_backward(shape, initial, d_final)?;
        let chunked = LinearOptions {
            kernel: LinearKernel::Chunked,
            ..*opts
        };
        let forward = self.plan_linear_for(shape, layout, &chunked, dtype, initial, true)?;
        let c = forward.chunked.ok_or_else(|| {
            Error::Internal("the chunked linear plan has no chunk geometry".into())
        })?;
        let limits = &self.inner.info.limits;
        let too_large = |limit, needed: usize, max: usize, hint| Error::TooLarge {
            limit,
            needed: needed as u64,
            max: max as u64,
            hint,
        };
        let columns = shape.value_dim + usize::from(opts.normalize);
        let rows = linear_rows(shape.head_dim as u32, columns as u32, c.chunk);
        let row_groups = shape.q_len.div_ceil(64 * rows as usize);
        let max_groups = limits.max_compute_workgroups_per_dimension as usize;
        if row_groups > max_groups {
            return Err(too_large(
                "max_compute_workgroups_per_dimension",
                row_groups,
                max_groups,
                " workgroups along x (use pieces)",
            ));
        }
        // A dK/dV invocation walks its chunk's queries and the state rows once per query head
        // of its kv head: llvmpipe ends loops after 65,535 iterations in all. Each loop costs
        // one more iteration than it runs (its exit), measured: group · (chunk + D + 3) + 3.
        let group = shape.q_heads / shape.kv_heads;
        let steps = group * (c.chunk as usize + shape.head_dim + 3) + 3;
        if steps > LINEAR_MAX_SEQUENTIAL_STEPS {
            return Err(too_large(
                "LINEAR_MAX_SEQUENTIAL_STEPS",
                steps,
                LINEAR_MAX_SEQUENTIAL_STEPS,
                " loop steps per dK/dV invocation: query heads per kv head × (chunk + head_dim) (use a smaller chunk_size)",
            ));
        }
        let passes = PASSES
            .iter()
            .map(|&pass| LinearKey {
                pass,
                storage: forward.storage,
                key_dim: shape.head_dim as u32,
                value_dim: shape.value_dim as u32,
                feature_map: opts.feature_map,
                normalize: opts.normalize,
                rows: if pass.has_rows() { rows } else { 1 },
            })
            .collect();
        let scan_params = LinearParams {
            has_initial: d_final.map_or(0, |(_, z)| 1 | (u32::from(z.is_some()) << 1)),
            ..forward.params
        };
        Ok(LinearBackwardPlan {
            forward,
            passes,
            scan_params,
        })
    }

    /// The gradients of a linear-attention call on host slices: uploads, runs, reads back.
    ///
    /// `q`, `k`, `v`, the options and `initial` are the forward call's; `d_o` is the gradient
    /// of the loss with respect to its output (laid out like O), `d_final` the gradient that
    /// reaches its final state from later pieces of the sequence (`None`: zero). Returns `dq`,
    /// `dk`, `dv` in the inputs' type and layout, and the initial state's gradient when there
    /// is an initial state. Deterministic: the same call gives bitwise-identical gradients.
    #[expect(
        clippy::too_many_arguments,
        reason = "the forward call's arguments and both output gradients"
    )]
    pub async fn linear_attention_backward<T: Element>(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &LinearOptions<'_>,
        q: &[T],
        k: &[T],
        v: &[T],
        initial: Option<&LinearState>,
        d_o: &[T],
        d_final: Option<&LinearState>,
    ) -> Result<LinearGrads<T>> {
        let plan = self.plan_linear_backward(
            shape,
            layout,
            opts,
            T::DTYPE,
            initial.map(super::host_state_sizes),
            d_final.map(super::host_state_sizes),
        )?;
        check_len("q", shape.q_elems(), q.len())?;
        check_len("k", shape.k_elems(), k.len())?;
        check_len("v", shape.v_elems(), v.len())?;
        check_len("d_o", shape.o_elems(), d_o.len())?;
        let initial = initial.map(|s| self.upload_state(s)).transpose()?;
        let d_final = d_final.map(|s| self.upload_state(s)).transpose()?;
        let (q, k, v) = (self.upload(q)?, self.upload(k)?, self.upload(v)?);
        let d_o = self.upload(d_o)?;
        let grads = self.run_linear_backward(
            &plan,
            opts,
            &q,
            &k,
            &v,
            initial.as_ref(),
            &d_o,
            d_final.as_ref(),
        )?;
        let d_initial = match &grads.d_initial {
            Some(s) => Some(self.read_state(s).await?),
            None => None,
        };
        Ok(LinearGrads {
            dq: self.read(&grads.dq).await?,
            dk: self.read(&grads.dk).await?,
            dv: self.read(&grads.dv).await?,
            d_initial,
        })
    }

    /// Blocking twin of [`Engine::linear_attention_backward`].
    #[expect(
        clippy::too_many_arguments,
        reason = "the forward call's arguments and both output gradients"
    )]
    #[cfg(not(target_arch = "wasm32"))]
    pub fn linear_attention_backward_blocking<T: Element>(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &LinearOptions<'_>,
        q: &[T],
        k: &[T],
        v: &[T],
        initial: Option<&LinearState>,
        d_o: &[T],
        d_final: Option<&LinearState>,
    ) -> Result<LinearGrads<T>> {
        pollster::block_on(
            self.linear_attention_backward(shape, layout, opts, q, k, v, initial, d_o, d_final),
        )
    }

    /// The gradients of a linear-attention call on GPU tensors (states f32, as
    /// [`Engine::linear_attention_gpu`] takes and returns them). Submits the work and returns
    /// at once.
    #[expect(
        clippy::too_many_arguments,
        reason = "the forward call's arguments and both output gradients"
    )]
    pub fn linear_attention_backward_gpu(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &LinearOptions<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        initial: Option<&GpuLinearState>,
        d_o: &Tensor,
        d_final: Option<&GpuLinearState>,
    ) -> Result<GpuLinearGrads> {
        let plan = self.plan_linear_backward(
            shape,
            layout,
            opts,
            q.dtype,
            initial.map(super::gpu_state_sizes),
            d_final.map(super::gpu_state_sizes),
        )?;
        let dtype = check_qkv(shape, q, k, v)?;
        if d_o.dtype != dtype {
            return Err(Error::DTypeMismatch {
                tensor: "d_o",
                expected: dtype,
                got: d_o.dtype,
            });
        }
        check_len("d_o", shape.o_elems(), d_o.len)?;
        super::check_state_dtype(initial, "initial kv state", "initial z state")?;
        super::check_state_dtype(d_final, "d_final kv state", "d_final z state")?;
        self.run_linear_backward(&plan, opts, q, k, v, initial, d_o, d_final)
    }

    /// Records and submits a planned backward call.
    #[expect(
        clippy::too_many_arguments,
        reason = "the forward call's arguments and both output gradients"
    )]
    fn run_linear_backward(
        &self,
        plan: &LinearBackwardPlan,
        opts: &LinearOptions<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        initial: Option<&GpuLinearState>,
        d_o: &Tensor,
        d_final: Option<&GpuLinearState>,
    ) -> Result<GpuLinearGrads> {
        self.check_alive()?;
        let fwd = &plan.forward;
        let shape = &fwd.shape;
        let c = fwd.chunked.ok_or_else(|| {
            Error::Internal("a linear backward plan without chunk geometry".into())
        })?;
        // The forward's chunk-state and prefix passes, then the backward's.
        let state_pipelines = (fwd.passes.iter())
            .filter(|k| matches!(k.pass, LinearPass::ChunkState | LinearPass::ChunkPrefix))
            .map(|&key| self.pipeline(KernelId::Linear(key)))
            .collect::<Result<Vec<_>>>()?;
        let pipelines = (plan.passes.iter())
            .map(|&key| self.pipeline(KernelId::Linear(key)))
            .collect::<Result<Vec<_>>>()?;
        let pack = self.pipeline(KernelId::Pack(PackKernel(fwd.storage)))?;
        let dq = self.output_tensor(q.dtype, shape.q_elems())?;
        let dk = self.output_tensor(q.dtype, shape.k_elems())?;
        let dv = self.output_tensor(q.dtype, shape.v_elems())?;
        // The initial state's gradient; the forward's prefix pass writes the final state here
        // first (nothing reads it), the reverse scan then overwrites it.
        let states = shape.batch * shape.q_heads * shape.head_dim;
        let d_kv = self.output_tensor(DType::F32, states * shape.value_dim)?;
        let d_z = if opts.normalize {
            Some(self.output_tensor(DType::F32, states)?)
        } else {
            None
        };
        let b = shape.batch as u32;
        let rows = plan.passes[0].rows as usize;
        let row_grid = |heads: u32| [shape.q_len.div_ceil(64 * rows) as u32, heads, b];
        let c4 = fwd.params.columns.div_ceil(4);

        self.guarded(|device| -> Result<()> {
            let queue = &self.inner.queue;
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("linear attention backward"),
            });
            let uniform = buffer_with_contents(
                device,
                queue,
                "linear params",
                bytemuck::bytes_of(&fwd.params),
                wgpu::BufferUsages::UNIFORM,
            );
            let storage = |label, contents: &[u8]| {
                buffer_with_contents(device, queue, label, contents, wgpu::BufferUsages::STORAGE)
            };
            let decay = storage("linear decay", bytemuck::cast_slice(&fwd.decay));
            // Absent states bind a word each (the kernels read them only with has_initial).
            let dummy = || Region::whole(storage("linear absent state", &[0u8; 4]));
            let kv_or_dummy = |s: Option<&GpuLinearState>| s.map_or_else(dummy, |s| s.kv.region());
            let z_or_dummy = |s: Option<&GpuLinearState>| {
                s.and_then(|s| s.z.as_ref())
                    .map_or_else(dummy, Tensor::region)
            };
            let (kv_in, z_in) = (kv_or_dummy(initial), z_or_dummy(initial));
            let (d_kv_in, d_z_in) = (kv_or_dummy(d_final), z_or_dummy(d_final));
            let d_z_out = d_z.as_ref().map_or_else(dummy, Tensor::region);
            let bound = Bound {
                uniform: &uniform,
                decay: &decay,
                q,
                k,
                v,
                states: [
                    kv_in.entry(binding::KV_IN),
                    z_in.entry(binding::Z_IN),
                    d_kv.entry(binding::KV_OUT),
                    d_z_out.entry(binding::Z_OUT),
                ],
            };
            let res = self.chunk_resources(device, fwd, &pack)?;
            // Loans from the scratch pool go back when this closure ends, after the submit.
            let mut loans = Vec::new();
            // Packed Q and the readout's ĝ, for one group of heads at a time.
            let q_pack = PackShape {
                stride: fwd.params.q_stride,
                first_head: 0,
                heads: c.group_heads as usize,
                batch: shape.batch,
                seq_len: shape.q_len,
                rows_per_head: shape.q_len,
                dim: shape.head_dim,
                fold: c.tex_fold,
                max_groups: self.inner.info.limits.max_compute_workgroups_per_dimension,
            };
            let (q_loan, q_view) = packed_texture(&self.inner, q_pack, "linear packed Q")?;
            loans.push(q_loan);
            let grad_pack = PackShape {
                dim: c4 as usize * 4,
                ..q_pack
            };
            let (grad_loan, grad_view) =
                packed_texture(&self.inner, grad_pack, "linear readout gradients")?;
            loans.push(grad_loan);
            let (d_loan, d_texture, d_view) =
                self.state_texture(device, &c, "linear state gradients texture")?;
            loans.push(d_loan);

            let [readout, d_state, d_prefix, d_q, d_kv_pass] = &pipelines[..] else {
                return Err(Error::Internal(
                    "the linear backward has five passes".into(),
                ));
            };
            let groups = self.head_groups(device, &fwd.params, &c, shape);
            let scan_groups = self.head_groups(device, &plan.scan_params, &c, shape);
            for (group, scan) in groups.iter().zip(&scan_groups) {
                let h = group.heads;
                let group_q = PackShape {
                    first_head: group.head_base as usize,
                    heads: h as usize,
                    ..q_pack
                };
                pack_into(
                    &self.inner,
                    &mut encoder,
                    &pack,
                    q,
                    group_q,
                    &q_view,
                    "linear packed Q",
                );
                self.record_group_states(
                    device,
                    &mut encoder,
                    fwd,
                    &bound,
                    group,
                    &res,
                    &state_pipelines,
                );
                let entries = [
                    entry(binding::PARAMS, &group.uniform),
                    q.entry(binding::Q),
                    texture_entry(binding::K, &res.k_view),
                    texture_entry(binding::V, &res.v_view),
                    entry(binding::DECAY_POWERS, &decay),
                    texture_entry(binding::STATE_TEXTURE, &res.state_view),
                    d_o.entry(binding::LINEAR_D_O),
                    texture_entry(binding::LINEAR_GRAD_OUT, &grad_view),
                ];
                let grid = row_grid(h);
                record_pass(
                    device,
                    &mut encoder,
                    readout,
                    &entries,
                    grid,
                    "linear bwd readout",
                );
                let entries = [
                    entry(binding::PARAMS, &group.uniform),
                    texture_entry(binding::LINEAR_Q_TEX, &q_view),
                    texture_entry(binding::LINEAR_GRAD_TEX, &grad_view),
                    entry(binding::DECAY_POWERS, &decay),
                    entry(binding::CHUNK_STATES, &res.chunk_states),
                ];
                let grid = [c.chunks * c4.div_ceil(64), h, b];
                record_pass(
                    device,
                    &mut encoder,
                    d_state,
                    &entries,
                    grid,
                    "linear bwd chunk dstate",
                );
                let entries = [
                    entry(binding::PARAMS, &scan.uniform),
                    entry(binding::DECAY_POWERS, &decay),
                    entry(binding::CHUNK_STATES, &res.chunk_states),
                    d_kv_in.entry(binding::KV_IN),
                    d_z_in.entry(binding::Z_IN),
                    d_kv.entry(binding::KV_OUT),
                    d_z_out.entry(binding::Z_OUT),
                ];
                let grid = [(c4 * shape.head_dim as u32).div_ceil(64), h, b];
                record_pass(
                    device,
                    &mut encoder,
                    d_prefix,
                    &entries,
                    grid,
                    "linear bwd chunk dprefix",
                );
                copy_chunk_states(&mut encoder, &c, &res.chunk_states, &d_texture);
                let entries = [
                    entry(binding::PARAMS, &group.uniform),
                    q.entry(binding::Q),
                    texture_entry(binding::K, &res.k_view),
                    texture_entry(binding::V, &res.v_view),
                    texture_entry(binding::LINEAR_GRAD_TEX, &grad_view),
                    texture_entry(binding::STATE_TEXTURE, &res.state_view),
                    entry(binding::DECAY_POWERS, &decay),
                    dq.entry(binding::LINEAR_DQ),
                ];
                let grid = row_grid(h);
                record_pass(device, &mut encoder, d_q, &entries, grid, "linear bwd dq");
                let entries = [
                    entry(binding::PARAMS, &group.uniform),
                    k.entry(binding::LINEAR_K),
                    v.entry(binding::LINEAR_V),
                    texture_entry(binding::LINEAR_Q_TEX, &q_view),
                    texture_entry(binding::LINEAR_GRAD_TEX, &grad_view),
                    texture_entry(binding::STATE_TEXTURE, &d_view),
                    entry(binding::DECAY_POWERS, &decay),
                    dk.entry(binding::LINEAR_DK),
                    dv.entry(binding::LINEAR_DV),
                ];
                let grid = row_grid(group.kv_heads);
                record_pass(
                    device,
                    &mut encoder,
                    d_kv_pass,
                    &entries,
                    grid,
                    "linear bwd dkdv",
                );
            }
            queue.submit([encoder.finish()]);
            drop((loans, res));
            Ok(())
        })??;
        Ok(GpuLinearGrads {
            dq,
            dk,
            dv,
            d_initial: initial.map(|_| GpuLinearState { kv: d_kv, z: d_z }),
        })
    }
}

//! How a linear-attention call runs: the kernel and its geometry, every limit checked.

use crate::kernels::{LinearKey, LinearPass, Storage, linear_rows};
use crate::linear::{
    LINEAR_MAX_CHUNK, LINEAR_MAX_SEQUENTIAL_STEPS, LinearKernel, RECURRENT_AUTO_MAX_LEN,
};
use crate::{DType, Engine, Error, Layout, LinearOptions, Result, Shape};

/// How one call runs, decided whole before anything touches the GPU: the kernel and, for the
/// chunked one, its geometry; the passes in order; the uniform block and the decay table.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearPlan {
    pub shape: Shape,
    pub storage: Storage,
    /// `None`: the recurrent kernel.
    pub chunked: Option<ChunkPlan>,
    /// The passes in order (chunked: state, prefix, output; else the recurrence).
    pub passes: Vec<LinearKey>,
    /// The uniform block of every pass.
    pub params: LinearParams,
    /// `λ_h^n` for `n < params.decay_stride`, per query head, rounded once from f64 (a
    /// shader's `exp2(n·log2 λ)` is off by up to n·2⁻²¹ in the exponent).
    pub decay: Vec<f32>,
}

/// The chunked kernel's geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkPlan {
    pub chunk: u32,
    pub chunks: u32,
    /// Floats per row of the per-chunk states (a multiple of 64, for 256-byte texture rows).
    pub pitch: u32,
    /// Per-chunk state rows per line of the state texture.
    pub state_fold: u32,
    /// Lines of the state texture.
    pub state_lines: u32,
    /// Packed K/V rows per texture line.
    pub tex_fold: u32,
    /// Tokens per invocation of the output pass ([`crate::kernels::linear_rows`]).
    pub rows: u32,
    /// Query heads per group of the chunk passes (a whole number of kv heads' query heads):
    /// the per-chunk states hold one group, so a call whose states for all heads would not
    /// fit one binding runs its chunk passes group by group.
    pub group_heads: u32,
}

/// The per-chunk states' row pitch in floats (texture copies need rows of 256 bytes).
const STATE_PITCH_ALIGN: usize = 64;

impl Engine {
    /// The chunk size this adapter gets when the caller does not choose.
    pub fn default_linear_chunk(&self) -> usize {
        64
    }

    /// Checks a linear-attention call and decides how it runs, without touching the GPU:
    /// the kernel, its geometry (every adapter limit checked here), its passes, the uniform
    /// block and the decay table. `initial` gives the sizes of an initial state's kv and z.
    pub fn plan_linear(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &LinearOptions<'_>,
        dtype: DType,
        initial: Option<(usize, Option<usize>)>,
    ) -> Result<LinearPlan> {
        self.plan_linear_for(shape, layout, opts, dtype, initial, false)
    }

    /// [`Engine::plan_linear`] for a forward call, or for the backward's rebuilding of the
    /// states (`backward`: its packed textures share the widest fold of K, V, Q and ĝ, and
    /// its scratch per head is larger, so its groups of heads may be smaller).
    pub(super) fn plan_linear_for(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &LinearOptions<'_>,
        dtype: DType,
        initial: Option<(usize, Option<usize>)>,
        backward: bool,
    ) -> Result<LinearPlan> {
        opts.validate(shape, initial)?;
        let (storage, chunked) = self.linear_kernel(shape, opts, dtype, backward)?;
        let passes: &[LinearPass] = match chunked {
            Some(_) => &[
                LinearPass::ChunkState,
                LinearPass::ChunkPrefix,
                LinearPass::ChunkOutput,
            ],
            None => &[LinearPass::Recurrent],
        };
        let passes = passes
            .iter()
            .map(|&pass| LinearKey {
                pass,
                storage,
                key_dim: shape.head_dim as u32,
                value_dim: shape.value_dim as u32,
                feature_map: opts.feature_map,
                normalize: opts.normalize,
                rows: match (pass, chunked) {
                    (LinearPass::ChunkOutput, Some(c)) => c.rows,
                    _ => 1,
                },
            })
            .collect();
        let stride = |heads: usize, dim: usize| {
            let [b, h, s] = layout.strides(heads, shape.q_len, dim);
            [b as u32, h as u32, s as u32, 1]
        };
        let geometry = chunked.unwrap_or(ChunkPlan {
            chunk: shape.q_len as u32,
            chunks: 1,
            pitch: 0,
            state_fold: 1,
            state_lines: 0,
            tex_fold: 1,
            rows: 1,
            group_heads: shape.q_heads as u32,
        });
        // λ_h^n for n = 0..=chunk (the recurrence needs λ^1), rounded once from f64.
        let decay_stride = match chunked {
            Some(c) => c.chunk as usize + 1,
            None => 2,
        };
        let decay: Vec<f32> = (0..shape.q_heads)
            .flat_map(|h| {
                let lambda = opts.decay.map_or(1.0, |d| f64::from(d[h]));
                (0..decay_stride).map(move |n| lambda.powi(n as i32) as f32)
            })
            .collect();
        let params = LinearParams {
            q_stride: stride(shape.q_heads, shape.head_dim),
            k_stride: stride(shape.kv_heads, shape.head_dim),
            v_stride: stride(shape.kv_heads, shape.value_dim),
            o_stride: stride(shape.q_heads, shape.value_dim),
            q_heads: shape.q_heads as u32,
            group: (shape.q_heads / shape.kv_heads) as u32,
            len: shape.q_len as u32,
            chunk: geometry.chunk,
            chunks: geometry.chunks,
            columns: (shape.value_dim + usize::from(opts.normalize)) as u32,
            pitch: geometry.pitch,
            tex_rows_per_head: shape.q_len as u32,
            tex_fold: geometry.tex_fold,
            state_fold: geometry.state_fold,
            scale: opts.resolved_scale(shape)?,
            eps: opts.eps,
            has_initial: initial.map_or(0, |(_, z)| 1 | (u32::from(z.is_some()) << 1)),
            causal: u32::from(opts.causal),
            decay_stride: decay_stride as u32,
            head_base: 0,
            state_heads: geometry.group_heads,
            _pad1: 0,
            _pad2: 0,
            _pad3: 0,
        };
        Ok(LinearPlan {
            shape: *shape,
            storage,
            chunked,
            passes,
            params,
            decay,
        })
    }

    /// The kernel (chunked with its geometry, or recurrent) and storage path of a call.
    fn linear_kernel(
        &self,
        shape: &Shape,
        opts: &LinearOptions<'_>,
        dtype: DType,
        backward: bool,
    ) -> Result<(Storage, Option<ChunkPlan>)> {
        let storage = self.storage_for(dtype)?;
        let len = shape.q_len;
        let limits = &self.inner.info.limits;
        let max_groups = limits.max_compute_workgroups_per_dimension as usize;
        let too_large = |limit, needed: usize, max: usize, hint| Error::TooLarge {
            limit,
            needed: needed as u64,
            max: max as u64,
            hint,
        };
        if shape.q_heads > max_groups || shape.batch > max_groups {
            return Err(too_large(
                "max_compute_workgroups_per_dimension",
                shape.q_heads.max(shape.batch),
                max_groups,
                " (q_heads and batch are dispatch dimensions)",
            ));
        }
        let recurrent = match opts.kernel {
            LinearKernel::Recurrent => true,
            LinearKernel::Chunked => false,
            LinearKernel::Auto => opts.causal && len <= RECURRENT_AUTO_MAX_LEN,
        };
        if recurrent {
            if len > LINEAR_MAX_SEQUENTIAL_STEPS {
                return Err(too_large(
                    "LINEAR_MAX_SEQUENTIAL_STEPS",
                    len,
                    LINEAR_MAX_SEQUENTIAL_STEPS,
                    " tokens in one recurrent call (use the chunked kernel, or pieces)",
                ));
            }
            return Ok((storage, None));
        }
        let columns = shape.value_dim + usize::from(opts.normalize);
        let pitch = columns.div_ceil(STATE_PITCH_ALIGN) * STATE_PITCH_ALIGN;
        let max_dim = limits.max_texture_dimension_2d as usize;
        let state_fold = (max_dim / (pitch / 4)).max(1);
        // The per-chunk states of a chunk size for a group of heads: texture lines and bytes.
        let state_size = |chunk: usize, heads: usize| {
            let state_rows = shape.batch * heads * (len.div_ceil(chunk) + 1) * shape.head_dim;
            let state_lines = state_rows.div_ceil(state_fold);
            (state_lines, (state_lines * state_fold * pitch * 4) as u64)
        };
        let max_binding = limits.max_storage_buffer_binding_size;
        let fits = |chunk: usize, heads: usize| {
            let (lines, bytes) = state_size(chunk, heads);
            lines <= max_dim && bytes <= max_binding.min(limits.max_buffer_size)
        };
        // The most query heads (whole kv heads' worth, for the backward's GQA sums) whose
        // per-chunk states fit one binding at a chunk size.
        let group = shape.q_heads / shape.kv_heads;
        let group_heads = |chunk: usize| {
            (1..=shape.kv_heads)
                .rev()
                .map(|kv| kv * group)
                .find(|&heads| fits(chunk.min(len), heads))
        };
        let chunk = match opts.chunk_size {
            Some(chunk) => chunk,
            // The adapter's chunk; doubled only while not even one kv head's query heads fit
            // (groups of heads keep the chunk, and so the work per token, as it is).
            None => {
                let mut chunk = self.default_linear_chunk();
                while group_heads(chunk).is_none() && chunk < LINEAR_MAX_CHUNK && chunk < len {
                    chunk *= 2;
                }
                chunk.min(LINEAR_MAX_CHUNK)
            }
        }
        .min(len);
        // Packed rows of K and V (and the backward's Q and ĝ) share one fold: as many rows per
        // texture line as the widest of them allows.
        let (d4, v4, c4) = (
            shape.head_dim.div_ceil(4),
            shape.value_dim.div_ceil(4),
            columns.div_ceil(4),
        );
        let widest = if backward { d4.max(c4) } else { d4.max(v4) };
        let tex_fold = (max_dim / widest).max(1);
        let texture_bytes =
            |rows: usize, width4: usize| (rows.div_ceil(tex_fold) * tex_fold * width4 * 16) as u64;
        // A group's scratch: packed K and V, its per-chunk states as a buffer and a texture;
        // the backward's packed Q and ĝ and the states' gradients as a texture.
        let scratch = |heads: usize| {
            let rows = shape.batch * heads * len;
            let kv_rows = rows / group;
            let states = state_size(chunk, heads).1;
            let forward = texture_bytes(kv_rows, d4) + texture_bytes(kv_rows, v4) + 2 * states;
            match backward {
                true => forward + texture_bytes(rows, d4) + texture_bytes(rows, c4) + states,
                false => forward,
            }
        };
        let texture_rows =
            |heads: usize| shape.batch * heads * len / if backward { 1 } else { group };
        // The most heads whose states fit one binding and whose scratch the pool keeps between
        // calls (a long call's scratch then scales with a group of heads, not the call, and is
        // not created and zero-filled again each time); at least one kv head's query heads,
        // where the checks below name the limit if even that does not fit.
        let cap = self.inner.pool.scratch_cap();
        let group_heads = (1..=shape.kv_heads)
            .rev()
            .map(|kv| kv * group)
            .find(|&heads| {
                fits(chunk, heads)
                    && texture_rows(heads).div_ceil(tex_fold) <= max_dim
                    && scratch(heads) <= cap
            })
            .unwrap_or(group);
        let chunks = len.div_ceil(chunk);
        if chunks > LINEAR_MAX_SEQUENTIAL_STEPS {
            return Err(too_large(
                "LINEAR_MAX_SEQUENTIAL_STEPS",
                chunks,
                LINEAR_MAX_SEQUENTIAL_STEPS,
                " chunks in one call (use a larger chunk_size, or pieces)",
            ));
        }
        let column_groups = columns.div_ceil(4).div_ceil(64);
        let rows = linear_rows(shape.head_dim as u32, shape.value_dim as u32, chunk as u32);
        let row_groups = len.div_ceil(64 * rows as usize);
        if chunks * column_groups > max_groups || row_groups > max_groups {
            return Err(too_large(
                "max_compute_workgroups_per_dimension",
                (chunks * column_groups).max(row_groups),
                max_groups,
                " workgroups along x (use a larger chunk_size, or pieces)",
            ));
        }
        let packed_rows = texture_rows(group_heads);
        if packed_rows.div_ceil(tex_fold) > max_dim {
            return Err(too_large(
                "max_texture_dimension_2d",
                packed_rows.div_ceil(tex_fold),
                max_dim,
                " texture lines for the packed rows of one kv head (use pieces)",
            ));
        }
        let (state_lines, state_bytes) = state_size(chunk, group_heads);
        if state_lines > max_dim {
            return Err(too_large(
                "max_texture_dimension_2d",
                state_lines,
                max_dim,
                " texture lines for the per-chunk states (use a larger chunk_size)",
            ));
        }
        if state_bytes > max_binding.min(limits.max_buffer_size) {
            return Err(Error::TooLarge {
                limit: "max_storage_buffer_binding_size",
                needed: state_bytes,
                max: max_binding,
                hint: " bytes of per-chunk states (use a larger chunk_size, or pieces)",
            });
        }
        Ok((
            storage,
            Some(ChunkPlan {
                chunk: chunk as u32,
                chunks: chunks as u32,
                pitch: pitch as u32,
                state_fold: state_fold as u32,
                state_lines: state_lines as u32,
                tex_fold: tex_fold as u32,
                rows,
                group_heads: group_heads as u32,
            }),
        ))
    }
}

/// The uniform block of linear.wgsl (`struct LinearParams`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LinearParams {
    pub q_stride: [u32; 4],
    pub k_stride: [u32; 4],
    pub v_stride: [u32; 4],
    pub o_stride: [u32; 4],
    pub q_heads: u32,
    pub group: u32,
    pub len: u32,
    pub chunk: u32,
    pub chunks: u32,
    pub columns: u32,
    pub pitch: u32,
    pub tex_rows_per_head: u32,
    pub tex_fold: u32,
    pub state_fold: u32,
    pub scale: f32,
    pub eps: f32,
    /// Bit 0: an initial kv state; bit 1: an initial z.
    pub has_initial: u32,
    pub causal: u32,
    /// Entries per head of the decay-power table (`λ^0 ..`).
    pub decay_stride: u32,
    /// The first head of this group of the chunk passes, and the heads a group's per-chunk
    /// states hold ([`ChunkPlan::group_heads`]).
    pub head_base: u32,
    pub state_heads: u32,
    pub _pad1: u32,
    pub _pad2: u32,
    pub _pad3: u32,
}

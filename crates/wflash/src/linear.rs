//! Linear attention (TransNormer / Lightning Attention-2): options, validation, planning and
//! dispatch of linear.wgsl's passes.
//!
//! # Semantics (`wflash_ref::linear` is the definition)
//!
//! Self-attention: `shape.q_len == shape.kv_len` (= `len`), `head_dim` is the key width,
//! `value_dim` the value width. With φ the [`FeatureMap`] applied elementwise to the raw rows:
//!
//! - **Causal** (the default), with per-query-head decay `λ_h ∈ (0, 1]` (1 without decay) and an
//!   optional initial state `S0` (zero when absent):
//!   `S_i = λ S_{i−1} + φ(k_i) v_iᵀ`, `o_i = scale · φ(q_i)ᵀ S_i`.
//! - **Normaliser** (`normalize`): `z_i = λ z_{i−1} + φ(k_i)` and
//!   `o_i ← o_i / (scale · φ(q_i)·z_i + eps)` (flash-linear-attention's convention).
//! - **Non-causal**: `O = scale · φ(Q) (φ(K)ᵀ V)` (and the normaliser with `z = Σ φ(k_j)`); no
//!   decay and no initial state (a typed error).
//!
//! `scale` defaults to `1/sqrt(head_dim)` and multiplies after φ. The final state `S_{len−1}`
//! (and `z`) is returned: `kv` `[batch, q_heads, head_dim, value_dim]` and `z` `[batch, q_heads,
//! head_dim]`, f32, row-major whatever the layout. Passing it as the next call's initial state
//! continues the sequence, so a long sequence processed in pieces, or token by token, gives
//! the one-call result. A state belongs to a query head even when kv heads are shared (GQA).
//!
//! # Kernels
//!
//! [`LinearKernel::Chunked`] (Lightning Attention-2): chunks of `chunk_size` tokens, each chunk's
//! own state computed in parallel, the carried state scanned chunk by chunk, then every output
//! row in parallel as its chunk's masked quadratic part plus the carried state.
//! [`LinearKernel::Recurrent`]: one dispatch that walks the tokens in order (decoding).
//! [`LinearKernel::Auto`] takes the recurrence for causal calls of at most
//! [`RECURRENT_AUTO_MAX_LEN`] tokens and the chunked kernel otherwise.

use crate::attention::{PackShape, check_qkv, entry, pack_rows};
use crate::engine::PipelineKey;
use crate::kernel::{LinearKey, LinearPass, Storage};
use crate::pool::Scratch;
use crate::tensor::buffer_with_contents;
use crate::types::{check_len, resolve_scale};
use crate::{DType, Element, Engine, Error, Layout, Result, Shape, Tensor, alibi_slopes};

/// The widest key or value row the linear kernels take (their per-invocation state column and
/// output row live in private arrays).
pub const LINEAR_MAX_DIM: usize = 128;

/// Causal calls of at most this many tokens run the recurrent kernel under
/// [`LinearKernel::Auto`]: one dispatch instead of the chunked kernel's packing and three passes.
pub const RECURRENT_AUTO_MAX_LEN: usize = 16;

/// The longest loop one invocation may run: llvmpipe (Mesa's software Vulkan) ends any shader
/// loop after 65,535 iterations in all (docs/PERF.md). The recurrent kernel loops over tokens
/// and the chunked prefix pass over chunks, so each is held below it.
pub const LINEAR_MAX_SEQUENTIAL_STEPS: usize = 65_000;

/// The largest chunk a caller may ask for.
pub const LINEAR_MAX_CHUNK: usize = 1024;

/// The elementwise feature map φ applied to query and key rows before their dot product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum FeatureMap {
    /// `φ(x) = x` (TNL and InLine; the model often applies SiLU first).
    #[default]
    Identity,
    /// `φ(x) = elu(x) + 1`: `x + 1` for `x > 0`, `exp(x)` otherwise; always positive
    /// (Katharopoulos et al.).
    EluPlusOne,
    /// `φ(x) = max(x, 0)`.
    Relu,
}

impl FeatureMap {
    pub const ALL: [FeatureMap; 3] = [
        FeatureMap::Identity,
        FeatureMap::EluPlusOne,
        FeatureMap::Relu,
    ];
    pub fn name(self) -> &'static str {
        match self {
            FeatureMap::Identity => "identity",
            FeatureMap::EluPlusOne => "elu+1",
            FeatureMap::Relu => "relu",
        }
    }
    /// The `FEATURE` constant of linear.wgsl's `phi`.
    pub(crate) fn code(self) -> u32 {
        match self {
            FeatureMap::Identity => 0,
            FeatureMap::EluPlusOne => 1,
            FeatureMap::Relu => 2,
        }
    }
}

/// Which linear-attention kernel runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LinearKernel {
    /// The recurrence for short causal calls (decoding), the chunked kernel otherwise.
    #[default]
    Auto,
    /// Chunked (Lightning Attention-2): parallel over chunks and tokens.
    Chunked,
    /// Token by token; causal only.
    Recurrent,
}

/// Options of a linear-attention call (see the module documentation for the semantics).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearOptions<'a> {
    /// Query `i` sees keys `j ≤ i` (default). `false`: every key; no decay, no initial state.
    pub causal: bool,
    pub feature_map: FeatureMap,
    /// `λ_h ∈ (0, 1]` per query head; `None` is no decay. [`lightning_decay`] gives Lightning
    /// Attention's schedule.
    pub decay: Option<&'a [f32]>,
    /// Divide by `scale · φ(q_i)·z_i + eps`. Meant for positive feature maps: with
    /// [`FeatureMap::Identity`] the denominator can cross zero.
    pub normalize: bool,
    /// Added to the normaliser's denominator (default `1e-10`, as flash-linear-attention).
    pub eps: f32,
    /// Multiplier of `φ(q)·φ(k)`; `None` is `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    pub kernel: LinearKernel,
    /// Tokens per chunk of the chunked kernel; `None` picks per adapter.
    pub chunk_size: Option<usize>,
}

impl Default for LinearOptions<'_> {
    fn default() -> Self {
        LinearOptions {
            causal: true,
            feature_map: FeatureMap::Identity,
            decay: None,
            normalize: false,
            eps: 1e-10,
            scale: None,
            kernel: LinearKernel::Auto,
            chunk_size: None,
        }
    }
}

impl<'a> LinearOptions<'a> {
    /// Causal, identity feature map, no decay, no normaliser.
    pub fn causal() -> Self {
        LinearOptions::default()
    }
    /// Every query sees every key.
    pub fn non_causal() -> Self {
        LinearOptions {
            causal: false,
            ..LinearOptions::default()
        }
    }
    pub fn with_feature_map(mut self, feature_map: FeatureMap) -> Self {
        self.feature_map = feature_map;
        self
    }
    pub fn with_decay(mut self, decay: &'a [f32]) -> Self {
        self.decay = Some(decay);
        self
    }
    pub fn with_normalizer(mut self) -> Self {
        self.normalize = true;
        self
    }
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
    pub fn with_kernel(mut self, kernel: LinearKernel) -> Self {
        self.kernel = kernel;
        self
    }
    pub fn with_chunk_size(mut self, chunk_size: usize) -> Self {
        self.chunk_size = Some(chunk_size);
        self
    }

    /// The scale the kernel uses.
    pub fn resolved_scale(&self, shape: &Shape) -> Result<f32> {
        resolve_scale(self.scale, shape)
    }

    /// Checks the shape and the options against each other (everything that does not depend
    /// on the adapter). `initial` is the initial state's `(kv, z)` element counts, if any.
    pub fn validate(&self, shape: &Shape, initial: Option<(usize, Option<usize>)>) -> Result<()> {
        shape.validate()?;
        if shape.q_len != shape.kv_len {
            return Err(Error::Unsupported {
                combination: "linear attention with q_len != kv_len (it is self-attention; continue a sequence through its state)",
            });
        }
        for (dim, got) in [("head_dim", shape.head_dim), ("value_dim", shape.value_dim)] {
            if got > LINEAR_MAX_DIM {
                return Err(Error::HeadDimUnsupported {
                    dim,
                    got,
                    max: LINEAR_MAX_DIM,
                });
            }
        }
        self.resolved_scale(shape)?;
        if !self.eps.is_finite() || self.eps < 0.0 {
            return Err(invalid(
                "eps",
                format!("{} must be finite and >= 0", self.eps),
            ));
        }
        if let Some(decay) = self.decay {
            check_len("decay", shape.q_heads, decay.len())?;
            if let Some((h, &l)) = decay
                .iter()
                .enumerate()
                .find(|&(_, &l)| !(l > 0.0 && l <= 1.0))
            {
                return Err(invalid(
                    "decay",
                    format!("λ must lie in (0, 1]; head {h} has {l}"),
                ));
            }
        }
        if let Some(chunk) = self.chunk_size
            && !(1..=LINEAR_MAX_CHUNK).contains(&chunk)
        {
            return Err(invalid(
                "chunk_size",
                format!("{chunk} is outside 1..={LINEAR_MAX_CHUNK}"),
            ));
        }
        if !self.causal {
            if self.decay.is_some() {
                return Err(Error::Unsupported {
                    combination: "decay with non-causal linear attention (decay needs a token order)",
                });
            }
            if initial.is_some() {
                return Err(Error::Unsupported {
                    combination: "an initial state with non-causal linear attention",
                });
            }
            if self.kernel == LinearKernel::Recurrent {
                return Err(Error::Unsupported {
                    combination: "the recurrent linear kernel with non-causal attention",
                });
            }
        }
        if let Some((kv, z)) = initial {
            let states = shape.batch * shape.q_heads * shape.head_dim;
            check_len("initial kv state", states * shape.value_dim, kv)?;
            match (z, self.normalize) {
                (Some(z), true) => check_len("initial z state", states, z)?,
                (Some(_), false) => {
                    return Err(invalid(
                        "initial_state",
                        "a z state is given but the normaliser is off".into(),
                    ));
                }
                // Without z the normaliser starts from zero.
                (None, _) => {}
            }
        }
        Ok(())
    }
}

fn invalid(modifier: &'static str, reason: String) -> Error {
    Error::InvalidModifier { modifier, reason }
}

/// Lightning Attention's per-head decays `λ_h = exp(−s_h)`, `s_h` ALiBi's slopes
/// ([`alibi_slopes`]): every λ lies in (0, 1); the first head decays fastest.
pub fn lightning_decay(heads: usize) -> Vec<f32> {
    alibi_slopes(heads)
        .into_iter()
        .map(|s| (-f64::from(s)).exp() as f32)
        .collect()
}

/// A linear-attention state on the host: what prefill hands to decode, or one piece of a
/// sequence to the next.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinearState {
    /// `[batch, q_heads, head_dim, value_dim]`, row-major.
    pub kv: Vec<f32>,
    /// `[batch, q_heads, head_dim]`; empty when the call does not normalise (as an initial
    /// state, empty means zero).
    pub z: Vec<f32>,
}

/// A linear-attention state on the GPU (f32 tensors, layouts as [`LinearState`]).
#[derive(Clone, Debug)]
pub struct GpuLinearState {
    pub kv: Tensor,
    /// `Some` when the call normalises.
    pub z: Option<Tensor>,
}

/// Results of [`Engine::linear_attention`].
#[derive(Clone, Debug)]
pub struct LinearAttention<T> {
    /// `[batch, q_heads, len, value_dim]` in the call's layout.
    pub output: Vec<T>,
    /// The state after the last token.
    pub state: LinearState,
}

/// Results of [`Engine::linear_attention_gpu`], still on the GPU.
#[derive(Clone, Debug)]
pub struct GpuLinearAttention {
    pub output: Tensor,
    pub state: GpuLinearState,
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
    pub _pad1: u32,
}

/// How one call runs: the kernel and, for the chunked one, its geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearPlan {
    pub storage: Storage,
    /// `None`: the recurrent kernel.
    pub chunked: Option<ChunkPlan>,
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
    /// Tokens per invocation of the output pass ([`crate::kernel::linear_rows`]).
    pub rows: u32,
}

/// The per-chunk states' row pitch in floats (texture copies need rows of 256 bytes).
const STATE_PITCH_ALIGN: usize = 64;

impl Engine {
    /// The chunk size this adapter gets when the caller does not choose.
    pub fn default_linear_chunk(&self) -> usize {
        64
    }

    /// Picks the kernel and its geometry; every adapter limit is checked here.
    pub fn plan_linear(
        &self,
        shape: &Shape,
        opts: &LinearOptions<'_>,
        dtype: DType,
    ) -> Result<LinearPlan> {
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
            return Ok(LinearPlan {
                storage,
                chunked: None,
            });
        }
        let chunk = opts
            .chunk_size
            .unwrap_or_else(|| self.default_linear_chunk())
            .min(len);
        let chunks = len.div_ceil(chunk);
        if chunks > LINEAR_MAX_SEQUENTIAL_STEPS {
            return Err(too_large(
                "LINEAR_MAX_SEQUENTIAL_STEPS",
                chunks,
                LINEAR_MAX_SEQUENTIAL_STEPS,
                " chunks in one call (use a larger chunk_size, or pieces)",
            ));
        }
        let columns = shape.value_dim + usize::from(opts.normalize);
        let column_groups = columns.div_ceil(4).div_ceil(64);
        let rows =
            crate::kernel::linear_rows(shape.head_dim as u32, shape.value_dim as u32, chunk as u32);
        let row_groups = len.div_ceil(64 * rows as usize);
        if chunks * column_groups > max_groups || row_groups > max_groups {
            return Err(too_large(
                "max_compute_workgroups_per_dimension",
                (chunks * column_groups).max(row_groups),
                max_groups,
                " workgroups along x (use a larger chunk_size, or pieces)",
            ));
        }
        let max_dim = limits.max_texture_dimension_2d as usize;
        // Packed K/V: rows of width4 texels, `fold` rows per line.
        let width4 = shape.head_dim.max(shape.value_dim).div_ceil(4);
        let tex_fold = (max_dim / width4).max(1);
        let kv_rows = shape.batch * shape.kv_heads * len;
        if kv_rows.div_ceil(tex_fold) > max_dim {
            return Err(too_large(
                "max_texture_dimension_2d",
                kv_rows.div_ceil(tex_fold),
                max_dim,
                " texture lines for packed K/V",
            ));
        }
        let pitch = columns.div_ceil(STATE_PITCH_ALIGN) * STATE_PITCH_ALIGN;
        let state_fold = (max_dim / (pitch / 4)).max(1);
        let state_rows = shape.batch * shape.q_heads * (chunks + 1) * shape.head_dim;
        let state_lines = state_rows.div_ceil(state_fold);
        if state_lines > max_dim {
            return Err(too_large(
                "max_texture_dimension_2d",
                state_lines,
                max_dim,
                " texture lines for the per-chunk states (use a larger chunk_size)",
            ));
        }
        let state_bytes = (state_lines * state_fold * pitch * 4) as u64;
        let max_binding = limits.max_storage_buffer_binding_size;
        if state_bytes > max_binding.min(limits.max_buffer_size) {
            return Err(Error::TooLarge {
                limit: "max_storage_buffer_binding_size",
                needed: state_bytes,
                max: max_binding,
                hint: " bytes of per-chunk states (use a larger chunk_size, or pieces)",
            });
        }
        Ok(LinearPlan {
            storage,
            chunked: Some(ChunkPlan {
                chunk: chunk as u32,
                chunks: chunks as u32,
                pitch: pitch as u32,
                state_fold: state_fold as u32,
                state_lines: state_lines as u32,
                tex_fold: tex_fold as u32,
                rows,
            }),
        })
    }

    /// Linear attention on host slices: uploads, runs, reads back the output and final state.
    ///
    /// `q`, `k`, `v` hold `[batch, heads, len, dim]` (or `[batch, len, heads, dim]` for
    /// [`Layout::Bshd`]) elements; `shape.q_len == shape.kv_len`. `initial` continues a
    /// sequence from an earlier call's [`LinearAttention::state`].
    #[expect(
        clippy::too_many_arguments,
        reason = "the attention call's arguments plus the state"
    )]
    pub async fn linear_attention<T: Element>(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &LinearOptions<'_>,
        q: &[T],
        k: &[T],
        v: &[T],
        initial: Option<&LinearState>,
    ) -> Result<LinearAttention<T>> {
        opts.validate(
            shape,
            initial.map(|s| (s.kv.len(), (!s.z.is_empty()).then_some(s.z.len()))),
        )?;
        check_len("q", shape.q_elems(), q.len())?;
        check_len("k", shape.k_elems(), k.len())?;
        check_len("v", shape.v_elems(), v.len())?;
        let initial = match initial {
            Some(state) => Some(GpuLinearState {
                kv: self.upload(&state.kv)?,
                z: if state.z.is_empty() {
                    None
                } else {
                    Some(self.upload(&state.z)?)
                },
            }),
            None => None,
        };
        let (q, k, v) = (self.upload(q)?, self.upload(k)?, self.upload(v)?);
        let out = self.linear_attention_gpu(shape, layout, opts, &q, &k, &v, initial.as_ref())?;
        let output = self.read::<T>(&out.output).await?;
        let kv = self.read::<f32>(&out.state.kv).await?;
        let z = match &out.state.z {
            Some(z) => self.read::<f32>(z).await?,
            None => Vec::new(),
        };
        Ok(LinearAttention {
            output,
            state: LinearState { kv, z },
        })
    }

    /// Blocking twin of [`Engine::linear_attention`].
    #[expect(
        clippy::too_many_arguments,
        reason = "the attention call's arguments plus the state"
    )]
    pub fn linear_attention_blocking<T: Element>(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &LinearOptions<'_>,
        q: &[T],
        k: &[T],
        v: &[T],
        initial: Option<&LinearState>,
    ) -> Result<LinearAttention<T>> {
        pollster::block_on(self.linear_attention(shape, layout, opts, q, k, v, initial))
    }

    /// Linear attention on GPU-resident tensors. Submits the work and returns at once; the
    /// output and the final state stay on the GPU (a decode loop passes the state straight
    /// to its next call).
    #[expect(
        clippy::too_many_arguments,
        reason = "the attention call's arguments plus the state"
    )]
    pub fn linear_attention_gpu(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &LinearOptions<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        initial: Option<&GpuLinearState>,
    ) -> Result<GpuLinearAttention> {
        opts.validate(
            shape,
            initial.map(|s| (s.kv.len, s.z.as_ref().map(|z| z.len))),
        )?;
        let dtype = check_qkv(shape, q, k, v)?;
        if let Some(state) = initial {
            for (name, t) in [
                ("initial kv state", Some(&state.kv)),
                ("initial z state", state.z.as_ref()),
            ] {
                if let Some(t) = t
                    && t.dtype != DType::F32
                {
                    return Err(Error::DTypeMismatch {
                        tensor: name,
                        expected: DType::F32,
                        got: t.dtype,
                    });
                }
            }
        }
        let plan = self.plan_linear(shape, opts, dtype)?;
        self.run_linear(&plan, shape, layout, opts, q, k, v, initial)
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call's full description; private"
    )]
    fn run_linear(
        &self,
        plan: &LinearPlan,
        shape: &Shape,
        layout: Layout,
        opts: &LinearOptions<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        initial: Option<&GpuLinearState>,
    ) -> Result<GpuLinearAttention> {
        self.check_alive()?;
        let key = |pass| {
            PipelineKey::Linear(LinearKey {
                pass,
                storage: plan.storage,
                key_dim: shape.head_dim as u32,
                value_dim: shape.value_dim as u32,
                feature_map: opts.feature_map,
                normalize: opts.normalize,
                rows: match (pass, plan.chunked) {
                    (LinearPass::ChunkOutput, Some(c)) => c.rows,
                    _ => 1,
                },
            })
        };
        let passes: &[LinearPass] = match plan.chunked {
            Some(_) => &[
                LinearPass::ChunkState,
                LinearPass::ChunkPrefix,
                LinearPass::ChunkOutput,
            ],
            None => &[LinearPass::Recurrent],
        };
        let pipelines = passes
            .iter()
            .map(|&pass| self.pipeline(key(pass)))
            .collect::<Result<Vec<_>>>()?;
        let pack_pipeline = match plan.chunked {
            Some(_) => Some(self.pipeline(PipelineKey::Pack(plan.storage))?),
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
        let stride = |heads: usize, dim: usize| {
            let [b, h, s] = layout.strides(heads, shape.q_len, dim);
            [b as u32, h as u32, s as u32, 1]
        };
        let chunked = plan.chunked.unwrap_or(ChunkPlan {
            chunk: shape.q_len as u32,
            chunks: 1,
            pitch: 0,
            state_fold: 1,
            state_lines: 0,
            tex_fold: 1,
            rows: 1,
        });
        // λ_h^n for n = 0..=chunk (the recurrence needs λ^1), rounded once from f64.
        let decay_stride = match plan.chunked {
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
            chunk: chunked.chunk,
            chunks: chunked.chunks,
            columns: (shape.value_dim + usize::from(opts.normalize)) as u32,
            pitch: chunked.pitch,
            tex_rows_per_head: shape.q_len as u32,
            tex_fold: chunked.tex_fold,
            state_fold: chunked.state_fold,
            scale: opts.resolved_scale(shape)?,
            eps: opts.eps,
            has_initial: initial.map_or(0, |s| 1 | (u32::from(s.z.is_some()) << 1)),
            causal: u32::from(opts.causal),
            decay_stride: decay_stride as u32,
            _pad1: 0,
        };
        let max_groups = self.inner.info.limits.max_compute_workgroups_per_dimension;
        let (b, h) = (shape.batch as u32, shape.q_heads as u32);

        self.guarded(|device| -> Result<()> {
            let queue = &self.inner.queue;
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("linear attention"),
            });
            let uniform = buffer_with_contents(
                device,
                queue,
                "linear params",
                bytemuck::bytes_of(&params),
                wgpu::BufferUsages::UNIFORM,
            );
            let storage = |label, contents: &[u8]| {
                buffer_with_contents(device, queue, label, contents, wgpu::BufferUsages::STORAGE)
            };
            let decay = storage("linear decay", bytemuck::cast_slice(&decay));
            // Absent states bind a word each (the kernel reads them only with has_initial).
            let dummy = || storage("linear absent state", &[0u8; 4]);
            let kv_in = initial.map_or_else(dummy, |s| s.kv.buffer.clone());
            let z_in = initial
                .and_then(|s| s.z.as_ref())
                .map_or_else(dummy, |z| z.buffer.clone());
            let z_out_buffer = z_out.as_ref().map_or_else(dummy, |z| z.buffer.clone());
            let state_entries = [
                entry(7, &kv_in),
                entry(8, &z_in),
                entry(9, &kv_out.buffer),
                entry(10, &z_out_buffer),
            ];
            let dispatch = |encoder: &mut wgpu::CommandEncoder,
                            pipeline: &wgpu::ComputePipeline,
                            entries: &[wgpu::BindGroupEntry<'_>],
                            groups: (u32, u32, u32),
                            label: &str| {
                let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(label),
                    layout: &pipeline.get_bind_group_layout(0),
                    entries,
                });
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(label),
                    timestamp_writes: None,
                });
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(groups.0, groups.1, groups.2);
            };
            match plan.chunked {
                None => {
                    let mut entries = vec![
                        entry(0, &uniform),
                        entry(1, &q.buffer),
                        entry(4, &output.buffer),
                        entry(5, &decay),
                        entry(12, &k.buffer),
                        entry(13, &v.buffer),
                    ];
                    entries.extend(state_entries.iter().cloned());
                    let groups = (shape.value_dim.div_ceil(64) as u32, h, b);
                    dispatch(
                        &mut encoder,
                        &pipelines[0],
                        &entries,
                        groups,
                        "linear recurrent",
                    );
                }
                Some(c) => {
                    let pack = pack_pipeline.as_ref().expect("chunked plans pack K/V");
                    // Loans from the scratch pool go back when this closure ends, after the submit.
                    let (_packed, views): (Vec<Scratch>, Vec<wgpu::TextureView>) = [
                        (k, shape.head_dim, params.k_stride, "linear packed K"),
                        (v, shape.value_dim, params.v_stride, "linear packed V"),
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
                        pack_rows(&self.inner, &mut encoder, pack, tensor, pack_shape, label)
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
                    let chunk_states = chunk_states_loan.buffer();
                    let column_groups = params.columns.div_ceil(4);
                    let columns = column_groups.div_ceil(64);
                    let prefix_groups = (column_groups * shape.head_dim as u32).div_ceil(64);
                    let entries = [
                        entry(0, &uniform),
                        texture_entry(2, &views[0]),
                        texture_entry(3, &views[1]),
                        entry(5, &decay),
                        entry(6, chunk_states),
                    ];
                    let groups = (c.chunks * columns, h, b);
                    dispatch(
                        &mut encoder,
                        &pipelines[0],
                        &entries,
                        groups,
                        "linear chunk states",
                    );
                    let mut entries =
                        vec![entry(0, &uniform), entry(5, &decay), entry(6, chunk_states)];
                    entries.extend(state_entries.iter().cloned());
                    dispatch(
                        &mut encoder,
                        &pipelines[1],
                        &entries,
                        (prefix_groups, h, b),
                        "linear chunk prefix",
                    );
                    let size = wgpu::Extent3d {
                        width: c.state_fold * c.pitch / 4,
                        height: c.state_lines,
                        depth_or_array_layers: 1,
                    };
                    let state_loan = self.inner.pool.texture(
                        device,
                        "linear chunk states texture",
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
                    let state_view =
                        state_texture.create_view(&wgpu::TextureViewDescriptor::default());
                    let entries = [
                        entry(0, &uniform),
                        entry(1, &q.buffer),
                        texture_entry(2, &views[0]),
                        texture_entry(3, &views[1]),
                        entry(4, &output.buffer),
                        entry(5, &decay),
                        texture_entry(11, &state_view),
                    ];
                    let groups = (shape.q_len.div_ceil(64 * c.rows as usize) as u32, h, b);
                    dispatch(
                        &mut encoder,
                        &pipelines[2],
                        &entries,
                        groups,
                        "linear chunk output",
                    );
                }
            }
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
}

fn texture_entry(binding: u32, view: &wgpu::TextureView) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: wgpu::BindingResource::TextureView(view),
    }
}

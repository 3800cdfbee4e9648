//! Linear attention (TransNormer / Lightning Attention-2): options, states, validation.
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

use crate::{Error, Result, Shape, alibi_slopes, check_len, resolve_scale};

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
    /// Tokens per chunk of the chunked kernel; `None` takes the adapter's
    /// (`Engine::default_linear_chunk`), doubled while the per-chunk states of a long call
    /// would not fit the adapter's buffer or texture limits.
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

impl LinearOptions<'_> {
    /// [`LinearOptions::validate`] for a backward call, plus its `d_final` (the gradient that
    /// reaches the final state, `(kv, z)` element counts): the final state's sizes, and only
    /// causal calls carry a state on.
    pub fn validate_backward(
        &self,
        shape: &Shape,
        initial: Option<(usize, Option<usize>)>,
        d_final: Option<(usize, Option<usize>)>,
    ) -> Result<()> {
        self.validate(shape, initial)?;
        let Some((kv, z)) = d_final else {
            return Ok(());
        };
        if !self.causal {
            return Err(Error::Unsupported {
                combination: "a d_final state with non-causal linear attention (no state carries on)",
            });
        }
        let states = shape.batch * shape.q_heads * shape.head_dim;
        check_len("d_final kv state", states * shape.value_dim, kv)?;
        match (z, self.normalize) {
            (Some(z), true) => check_len("d_final z state", states, z),
            (Some(_), false) => Err(invalid(
                "d_final_state",
                "a z gradient is given but the normaliser is off".into(),
            )),
            (None, _) => Ok(()),
        }
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

/// Results of [`Engine::linear_attention`](crate::Engine::linear_attention).
#[derive(Clone, Debug)]
pub struct LinearAttention<T> {
    /// `[batch, q_heads, len, value_dim]` in the call's layout.
    pub output: Vec<T>,
    /// The state after the last token.
    pub state: LinearState,
}

/// Results of [`Engine::linear_attention_backward`](crate::Engine::linear_attention_backward):
/// the gradients of `Σ dO ∘ O + ⟨d_final, final state⟩`.
#[derive(Clone, Debug)]
pub struct LinearGrads<T> {
    /// Like Q.
    pub dq: Vec<T>,
    /// Like K: summed over the query heads of each GQA group.
    pub dk: Vec<T>,
    /// Like V: summed over the query heads of each GQA group.
    pub dv: Vec<T>,
    /// The gradient of the initial state (f32, its layout; `z` when the call normalises),
    /// `Some` when the call had one: the `d_final` of the piece before it in a sequence
    /// trained in pieces.
    pub d_initial: Option<LinearState>,
}

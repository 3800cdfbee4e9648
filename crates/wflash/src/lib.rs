//! wflash: FlashAttention-class attention in WGSL compute kernels, dispatched through wgpu on
//! Vulkan, Metal and DX12.
//!
//! ```no_run
//! use wflash::{AttentionOptions, Causal, Engine, EngineOptions, Layout, Shape};
//! # fn main() -> wflash::Result<()> {
//! let engine = Engine::new_blocking(EngineOptions::default())?;
//! let shape = Shape::mha(1, 8, 1024, 64);
//! let q = vec![0.1f32; shape.q_elems()];
//! let k = vec![0.2f32; shape.k_elems()];
//! let v = vec![0.3f32; shape.v_elems()];
//! let opts = AttentionOptions::softmax().with_causal(Causal::BottomRight);
//! let out = engine.attention_blocking(&shape, Layout::Bhsd, &opts, &q, &k, &v)?;
//! assert_eq!(out.output.len(), shape.o_elems());
//! # Ok(()) }
//! ```
//!
//! # Semantics
//!
//! - Scores are `scale · q·k`, `scale` defaulting to `1/sqrt(head_dim)`; arithmetic is f32 for
//!   every storage type (f32, f16, bf16).
//! - Causal masks are bottom-right aligned by default: key `j` is visible to query `i` iff
//!   `j <= i + kv_len - q_len`. [`Causal::TopLeft`] gives PyTorch's `is_causal` (`j <= i`).
//! - A query row that sees no key gets output 0 and LSE `-inf`, never NaN. A logit of `-inf`
//!   (from infinite inputs) counts as a hidden key.
//! - NaN and `±inf` in Q, K and V propagate as in the f64 reference (`wflash-ref`): a NaN logit,
//!   or two `+inf` logits, make their row NaN (output and LSE); a non-finite value of V reaches
//!   the output columns of the rows that see its key. As in FlashAttention, it may also reach a
//!   row that does not see its key (as `0·inf = NaN`) when the row's block of query rows loads
//!   that key's tile for rows that do see it (causal and prefix-LM masks, windows, chunks, key
//!   masks, biases of `-inf`), or when the key is hidden by a `-inf` logit.
//! - GQA/MQA: `q_heads % kv_heads == 0`; query head `h` reads kv head `h / (q_heads / kv_heads)`.
//! - The LSE is the natural-log logsumexp of the scaled scores, f32, `[batch, q_heads, q_len]`.
//!
//! Invalid input returns a typed [`Error`] before anything is dispatched.
//!
//! Linear attention ([`Engine::linear_attention`], [`LinearOptions`]) has its own semantics and
//! kernels: see the [`linear`] module.

// Layers, each importing only from those below it: ops -> engine -> gpu -> kernels -> api.
mod api;
mod engine;
mod gpu;
pub mod kernels;
mod ops;

/// Linear attention's options, states and semantics.
pub mod linear {
    pub use crate::api::linear::*;
}
/// Measured tile choices per adapter.
pub use engine::tuning;

pub use api::error::{Error, Result};
pub use api::linear::{
    FeatureMap, LINEAR_MAX_CHUNK, LINEAR_MAX_DIM, LINEAR_MAX_SEQUENTIAL_STEPS, LinearAttention,
    LinearGrads, LinearKernel, LinearOptions, LinearState, RECURRENT_AUTO_MAX_LEN, lightning_decay,
};
pub use api::modifier::{Modifier, ModifierSet};
pub(crate) use api::options::resolve_scale;
pub use api::options::{
    AttentionOptions, Bias, BiasValues, Causal, Variant, Varlen, Window, alibi_slopes,
};
pub(crate) use api::shape::check_len;
pub use api::shape::{
    Attention, AttentionGrads, DType, Element, Layout, MAX_HEAD_DIM, OutputShape, Shape,
};
pub use engine::{Engine, EngineInfo, EngineOptions, F16Path, TuningSource};
pub use gpu::pool::PoolStats;
pub use gpu::tensor::Tensor;
pub use kernels::{Family, TileConfig};
pub use ops::attention::{
    FlashParams, GpuAttention, GpuBias, GpuModifiers, PackPlan, Packed, Plan, SequenceInfo,
};
pub use ops::attention_backward::{
    BackwardParams, BackwardPlan, BiasGradPlan, GpuAttentionGrads, ReduceParams,
};
pub use ops::decode::{
    DECODE_LANES, DECODE_MAX_BLOCK_SIZE, DECODE_MAX_KEYS_PER_LANE, DECODE_MAX_SPLITS,
    DECODE_MAX_TOKENS, DecodeOptions, DecodeParams, DecodePlan, KvBlocks, KvCache, KvCacheShape,
    Paging,
};
pub use ops::linear::{
    ChunkPlan, GpuLinearAttention, GpuLinearGrads, GpuLinearState, LinearBackwardPlan,
    LinearParams, LinearPlan,
};
pub use ops::merge::{MERGE_MAX_PARTS, MergeParams, MergePlan};
pub use ops::passes::{PackParams, PackShape};

pub use half;
pub use wgpu;

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
//!   row that does not see its key (as `0·inf = NaN`) when that key shares a key tile with keys
//!   the row sees (causal masks, windows, key masks).
//! - GQA/MQA: `q_heads % kv_heads == 0`; query head `h` reads kv head `h / (q_heads / kv_heads)`.
//! - The LSE is the natural-log logsumexp of the scaled scores, f32, `[batch, q_heads, q_len]`.
//!
//! Invalid input returns a typed [`Error`] before anything is dispatched.
//!
//! Linear attention ([`Engine::linear_attention`], [`LinearOptions`]) has its own semantics and
//! kernels: see the [`linear`] module.

mod attention;
mod engine;
mod error;
pub mod kernel;
pub mod linear;
mod memory;
mod modifier;
mod pool;
mod readback;
mod tensor;
pub mod tuning;
mod types;

pub use attention::{FlashParams, GpuAttention, PackParams, Plan, SequenceInfo};
pub use engine::{Engine, EngineInfo, EngineOptions, F16Path, TuningSource};
pub use error::{Error, Result};
pub use kernel::{Family, TileConfig};
pub use linear::{
    ChunkPlan, FeatureMap, GpuLinearAttention, GpuLinearState, LINEAR_MAX_CHUNK, LINEAR_MAX_DIM,
    LINEAR_MAX_SEQUENTIAL_STEPS, LinearAttention, LinearKernel, LinearOptions, LinearParams,
    LinearPlan, LinearState, RECURRENT_AUTO_MAX_LEN, lightning_decay,
};
pub use modifier::{Modifier, ModifierSet};
pub use pool::PoolStats;
pub use tensor::Tensor;
pub use types::{
    Attention, AttentionOptions, Bias, BiasValues, Causal, DType, Element, Layout, MAX_HEAD_DIM,
    Shape, Variant, Varlen, Window, alibi_slopes,
};

pub use half;
pub use wgpu;

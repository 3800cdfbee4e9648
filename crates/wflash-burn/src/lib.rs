//! wflash's attention kernels inside burn's wgpu backend: the forward through wflash's
//! forward, and under `Autodiff` the backward through wflash's backward, on burn's own device
//! and buffers.
//!
//! ```no_run
//! use burn::tensor::{Distribution, Tensor};
//! use wflash_burn::{AttentionOptions, Causal, EngineOptions};
//! # fn main() -> Result<(), wflash_burn::Error> {
//! // Once: burn's wgpu device, with a wflash engine on the same wgpu device and queue.
//! let device = wflash_burn::init(EngineOptions::default())?.autodiff();
//! let [b, h, n, d] = [2, 8, 1024, 64];
//! let q = Tensor::<4>::random([b, h, n, d], Distribution::Normal(0.0, 1.0), &device).require_grad();
//! let k = Tensor::<4>::random([b, h, n, d], Distribution::Normal(0.0, 1.0), &device);
//! let v = Tensor::<4>::random([b, h, n, d], Distribution::Normal(0.0, 1.0), &device);
//! let opts = AttentionOptions::softmax().with_causal(Causal::BottomRight);
//! // Where burn has `attention(q, k, v, None, None, options)`:
//! let o = wflash_burn::attention(q.clone(), k, v, &opts)?;
//! let grads = o.sum().backward();
//! let dq = q.grad(&grads);
//! # Ok(()) }
//! ```
//!
//! Tensors are `[batch, heads, seq, dim]` (burn's attention layout) in f32, f16 or bf16; a
//! non-contiguous tensor (a `swap_dims` of a `[batch, seq, heads, dim]` one, say) is made
//! contiguous first, by burn's `into_contiguous`. GQA follows from the shapes (`q_heads` a
//! multiple of `kv_heads`). burn's `mask` and additive `attn_bias`, and attention sinks, are
//! burn tensors given to [`attention_with`] in [`Modifiers`] (a learnable bias or sinks get
//! their gradients); of wflash's [`AttentionOptions`], host-slice ALiBi slopes and sinks are
//! constants of the call, and a host-slice bias, key mask, temperature or varlen is refused
//! (pass masks and biases as tensors).
//!
//! What wflash refuses (an option combination, a head dim, a device that cannot run the
//! kernels) is an [`Error`] before anything is dispatched, never a silent fallback to burn's
//! own attention.

mod attention;
mod bridge;
mod engines;
mod linear;

pub use attention::{Modifiers, attention, attention_with};
pub use engines::{engine, init, register};
pub use linear::{LinearState, linear_attention, linear_attention_with_state};
pub use wflash::{
    AttentionOptions, Bias, BiasValues, Causal, Engine, EngineOptions, FeatureMap, LinearKernel,
    LinearOptions, Variant, Window, lightning_decay,
};

/// What can go wrong between burn and wflash.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// wflash refused the call (its typed error says why).
    #[error(transparent)]
    Wflash(#[from] wflash::Error),
    /// No wflash engine is registered for the tensors' device.
    #[error(
        "no wflash engine for {device}: make the device with wflash_burn::init, or register \
         an engine on its wgpu device and queue with wflash_burn::register"
    )]
    NoEngine { device: String },
    /// A tensor is not a float tensor of burn's wgpu backend (without fusion).
    #[error("tensor `{tensor}` is not on burn's wgpu backend: {reason}")]
    NotWgpu {
        tensor: &'static str,
        reason: String,
    },
    /// Tensors whose shapes do not make one attention call.
    #[error("tensor `{tensor}` has shape {got:?}; {reason}")]
    Shape {
        tensor: &'static str,
        got: Vec<usize>,
        reason: String,
    },
    /// burn could not create or register its wgpu device.
    #[error("burn's wgpu device: {0}")]
    Device(String),
    /// burn's runtime failed while flushing its work or handing over a buffer.
    #[error("burn's runtime: {0}")]
    Runtime(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

//! The backward pass of attention (softmax and sigmoid, every mask and modifier): gradients of
//! `Σ dO ∘ O` with respect to Q, K, V and the learnable modifiers, on host slices or GPU
//! tensors. [`plan`] decides how a call runs (on top of the forward's plan of the same call),
//! [`dispatch`] records it: FlashAttention-2's three kernels without atomics
//! (shaders/flash_bwd.wgsl), deterministic, O(N) extra memory.

mod dispatch;
mod plan;

pub use plan::{BackwardParams, BackwardPlan, BiasGradPlan, ReduceParams};

use dispatch::BackwardInputs;

use crate::ops::attention::GpuModifiers;
use crate::ops::passes::check_qkv;
use crate::{
    AttentionGrads, AttentionOptions, Element, Engine, Error, Layout, Result, Shape, Tensor,
    Variant, check_len,
};

impl Engine {
    /// The gradients of an attention call on host slices: uploads, runs, reads back.
    ///
    /// `q`, `k`, `v` and the options are the forward call's; `o` and `lse` are what it
    /// returned ([`crate::Attention`]: the LSE for softmax, `None` for sigmoid); `d_o` is the
    /// gradient of the loss with respect to O, laid out like O. The bias's gradient comes only
    /// when asked for ([`AttentionOptions::with_bias_grad`]). Deterministic: the same call
    /// gives bitwise-identical gradients.
    #[expect(
        clippy::too_many_arguments,
        reason = "the forward call's arguments, its results and dO"
    )]
    pub async fn attention_backward<T: Element>(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        q: &[T],
        k: &[T],
        v: &[T],
        o: &[T],
        lse: Option<&[f32]>,
        d_o: &[T],
    ) -> Result<AttentionGrads<T>> {
        let plan = self.plan_backward(shape, layout, opts, T::DTYPE)?;
        // Host calls take host values: a bias described as resident has no tensor here.
        GpuModifiers::default().check(shape, opts)?;
        check_len("q", shape.q_elems(), q.len())?;
        check_len("k", shape.k_elems(), k.len())?;
        check_len("v", shape.v_elems(), v.len())?;
        check_len("o", shape.o_elems(), o.len())?;
        check_len("d_o", shape.o_elems(), d_o.len())?;
        check_lse(shape, opts, lse.map(<[f32]>::len))?;
        let lse = lse.map(|l| self.upload(l)).transpose()?;
        let inputs = BackwardInputs {
            q: &self.upload(q)?,
            k: &self.upload(k)?,
            v: &self.upload(v)?,
            o: &self.upload(o)?,
            lse: lse.as_ref(),
            d_o: &self.upload(d_o)?,
            modifiers: GpuModifiers::default(),
        };
        let grads = self.run_backward(&plan, opts, &inputs)?;
        let read_f32 = async |t: Option<Tensor>| match t {
            Some(t) => self.read::<f32>(&t).await.map(Some),
            None => Ok(None),
        };
        Ok(AttentionGrads {
            dq: self.read(&grads.dq).await?,
            dk: self.read(&grads.dk).await?,
            dv: self.read(&grads.dv).await?,
            d_bias: read_f32(grads.d_bias).await?,
            d_sinks: read_f32(grads.d_sinks).await?,
            d_temperature: read_f32(grads.d_temperature).await?,
        })
    }

    /// Blocking twin of [`Engine::attention_backward`].
    #[expect(
        clippy::too_many_arguments,
        reason = "the forward call's arguments, its results and dO"
    )]
    #[cfg(not(target_arch = "wasm32"))]
    pub fn attention_backward_blocking<T: Element>(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        q: &[T],
        k: &[T],
        v: &[T],
        o: &[T],
        lse: Option<&[f32]>,
        d_o: &[T],
    ) -> Result<AttentionGrads<T>> {
        pollster::block_on(self.attention_backward(shape, layout, opts, q, k, v, o, lse, d_o))
    }

    /// The gradients of an attention call on GPU tensors (`o` and `lse` as
    /// [`Engine::attention_gpu`] returned them). Submits the work and returns at once.
    #[expect(
        clippy::too_many_arguments,
        reason = "the forward call's arguments, its results and dO"
    )]
    pub fn attention_backward_gpu(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        lse: Option<&Tensor>,
        d_o: &Tensor,
    ) -> Result<GpuAttentionGrads> {
        let modifiers = GpuModifiers::default();
        self.attention_backward_gpu_with(shape, layout, opts, &modifiers, q, k, v, o, lse, d_o)
    }

    /// [`Engine::attention_backward_gpu`] of an [`Engine::attention_gpu_with`] call: `d_bias`
    /// has the GPU bias's shape (with [`AttentionOptions::with_bias_grad`]), `d_sinks` is the
    /// GPU sinks' gradient.
    #[expect(
        clippy::too_many_arguments,
        reason = "the forward call's arguments, its results and dO"
    )]
    pub fn attention_backward_gpu_with(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        modifiers: &GpuModifiers<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        lse: Option<&Tensor>,
        d_o: &Tensor,
    ) -> Result<GpuAttentionGrads> {
        let sinks = modifiers.sink_placeholder(shape);
        let opts = modifiers.options(opts, &sinks)?;
        let plan = self.plan_backward(shape, layout, &opts, q.dtype)?;
        modifiers.check(shape, &opts)?;
        let dtype = check_qkv(shape, q, k, v)?;
        for (name, t) in [("o", o), ("d_o", d_o)] {
            if t.dtype != dtype {
                return Err(Error::DTypeMismatch {
                    tensor: name,
                    expected: dtype,
                    got: t.dtype,
                });
            }
            check_len(name, shape.o_elems(), t.len)?;
        }
        if let Some(l) = lse
            && l.dtype != crate::DType::F32
        {
            return Err(Error::DTypeMismatch {
                tensor: "lse",
                expected: crate::DType::F32,
                got: l.dtype,
            });
        }
        check_lse(shape, &opts, lse.map(|l| l.len))?;
        let inputs = BackwardInputs {
            q,
            k,
            v,
            o,
            lse,
            d_o,
            modifiers: *modifiers,
        };
        self.run_backward(&plan, &opts, &inputs)
    }

    /// [`Engine::plan_backward`] of an [`Engine::attention_backward_gpu_with`] call.
    pub fn plan_backward_with(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        modifiers: &GpuModifiers<'_>,
        dtype: crate::DType,
    ) -> Result<BackwardPlan> {
        let sinks = modifiers.sink_placeholder(shape);
        self.plan_backward(shape, layout, &modifiers.options(opts, &sinks)?, dtype)
    }
}

/// Softmax needs the forward's LSE (`[batch, q_heads, q_len]`); sigmoid has none.
fn check_lse(shape: &Shape, opts: &AttentionOptions<'_>, lse_len: Option<usize>) -> Result<()> {
    match (opts.variant, lse_len) {
        (Variant::Softmax, None) => Err(Error::Lse(
            "the softmax backward needs the forward's LSE (Attention::lse)",
        )),
        (Variant::Softmax, Some(len)) => check_len("lse", shape.lse_elems(), len),
        (_, Some(_)) => Err(Error::Lse(
            "sigmoid attention has no LSE; pass None to its backward",
        )),
        (_, None) => Ok(()),
    }
}

/// Results of [`Engine::attention_backward_gpu`], still on the GPU: see
/// [`AttentionGrads`] for each.
#[derive(Clone, Debug)]
pub struct GpuAttentionGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
    pub d_bias: Option<Tensor>,
    pub d_sinks: Option<Tensor>,
    pub d_temperature: Option<Tensor>,
}

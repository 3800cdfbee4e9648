//! Attention calls (softmax and sigmoid, every mask and modifier): the host and GPU-resident
//! entry points. [`plan`] decides how a call runs, [`dispatch`] records it.

mod dispatch;
mod plan;

pub use plan::{FlashParams, PackPlan, Packed, Plan, SequenceInfo};

use crate::ops::passes::check_qkv;
use crate::{
    Attention, AttentionOptions, Bias, BiasValues, Element, Engine, Error, Layout, Result, Shape,
    Tensor, Variant, check_len,
};

impl Engine {
    /// Attention on host slices: uploads, runs, reads back. Splits over batch when the problem
    /// exceeds the adapter's buffer limits.
    ///
    /// `q`, `k`, `v` hold `[batch, heads, seq, dim]` (or `[batch, seq, heads, dim]` for
    /// [`Layout::Bshd`]) elements; the output has the same layout.
    pub async fn attention<T: Element>(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> Result<Attention<T>> {
        // The plan validates the shape first: its element counts are only defined (no
        // overflow) once it is valid.
        let plan = self.plan(shape, layout, opts, T::DTYPE)?;
        check_resident_bias(shape, opts, None)?;
        check_len("q", shape.q_elems(), q.len())?;
        check_len("k", shape.k_elems(), k.len())?;
        check_len("v", shape.v_elems(), v.len())?;
        let mut output = Vec::with_capacity(shape.o_elems());
        let mut lse = Vec::with_capacity(shape.lse_elems());
        let mut start = 0;
        while start < shape.batch {
            let count = plan.batch_per_dispatch.min(shape.batch - start);
            let range = |per_batch: usize| start * per_batch..(start + count) * per_batch;
            let q_t = self.upload(&q[range(shape.q_elems() / shape.batch)])?;
            let k_t = self.upload(&k[range(shape.k_elems() / shape.batch)])?;
            let v_t = self.upload(&v[range(shape.v_elems() / shape.batch)])?;
            let out = self.run(&plan, opts, None, start, count, &q_t, &k_t, &v_t)?;
            output.extend(self.read::<T>(&out.output).await?);
            if let Some(l) = &out.lse {
                lse.extend(self.read::<f32>(l).await?);
            }
            start += count;
        }
        Ok(Attention {
            output,
            lse: matches!(opts.variant, Variant::Softmax).then_some(lse),
        })
    }

    #[cfg(not(target_arch = "wasm32"))]
    /// Blocking twin of [`Engine::attention`].
    pub fn attention_blocking<T: Element>(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> Result<Attention<T>> {
        pollster::block_on(self.attention(shape, layout, opts, q, k, v))
    }

    /// Attention on GPU-resident tensors. Submits the work and returns at once; the results stay
    /// on the GPU (read them with [`Engine::read`], or pass them to the next call).
    pub fn attention_gpu(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<GpuAttention> {
        self.attention_gpu_resident(shape, layout, opts, None, q, k, v)
    }

    /// [`Engine::attention_gpu`] with an additive bias that is a GPU tensor too (a mask made on
    /// the device, a learnable bias in training): `opts` holds no bias of its own.
    #[expect(
        clippy::too_many_arguments,
        reason = "attention_gpu's arguments and the bias"
    )]
    pub fn attention_gpu_with_bias(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        bias: &GpuBias<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<GpuAttention> {
        let opts = bias.options(opts)?;
        self.attention_gpu_resident(shape, layout, &opts, Some(bias.values), q, k, v)
    }

    /// A GPU call whose resident bias, if `opts` has one, is `bias`.
    #[expect(
        clippy::too_many_arguments,
        reason = "attention_gpu's arguments and the bias; private"
    )]
    fn attention_gpu_resident(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        bias: Option<&Tensor>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<GpuAttention> {
        let plan = self.plan(shape, layout, opts, q.dtype)?;
        check_resident_bias(shape, opts, bias)?;
        check_qkv(shape, q, k, v)?;
        if plan.batch_per_dispatch < shape.batch {
            return Err(Error::TooLarge {
                limit: "max_storage_buffer_binding_size",
                needed: shape.batch as u64,
                max: plan.batch_per_dispatch as u64,
                hint: " batch elements per GPU tensor (host-slice calls split over batch; split GPU tensors yourself)",
            });
        }
        self.run(&plan, opts, bias, 0, shape.batch, q, k, v)
    }
}

/// An additive bias on the GPU: [`Bias`]'s layout and meaning (`[batch, heads, q_len,
/// kv_len]`, `batch` 1 or the call's, `heads` 1 or its `q_heads`), f32 or f16 values.
#[derive(Clone, Copy, Debug)]
pub struct GpuBias<'a> {
    pub values: &'a Tensor,
    pub batch: usize,
    pub heads: usize,
}

impl GpuBias<'_> {
    /// `opts` with this bias described in it ([`Bias::resident`]): what a call with it plans
    /// with ([`Engine::plan`], [`Engine::plan_backward`]). `opts` must hold no bias of its own.
    pub fn options<'o>(&self, opts: &AttentionOptions<'o>) -> Result<AttentionOptions<'o>> {
        if opts.bias.is_some() {
            return Err(Error::Unsupported {
                combination: "a bias in the options and a GPU bias in one call",
            });
        }
        let bias = Bias::resident(self.values.dtype, self.batch, self.heads);
        Ok(AttentionOptions {
            bias: Some(bias),
            ..*opts
        })
    }
}

/// A resident bias in `opts` comes with its tensor (`bias`), of the size its shape says; a call
/// given no tensor refuses one. Run after planning, which validated the shape and the bias's.
pub(crate) fn check_resident_bias(
    shape: &Shape,
    opts: &AttentionOptions<'_>,
    bias: Option<&Tensor>,
) -> Result<()> {
    let Some(described) = opts
        .bias
        .filter(|b| matches!(b.values, BiasValues::Resident(_)))
    else {
        return Ok(());
    };
    let Some(tensor) = bias else {
        return Err(Error::InvalidModifier {
            modifier: "bias",
            reason: "BiasValues::Resident is for a GPU tensor given to \
                     Engine::attention_gpu_with_bias or its backward; this call has none"
                .into(),
        });
    };
    let len = described.batch * described.heads * shape.q_len * shape.kv_len;
    check_len("bias", len, tensor.len)
}

/// Results of [`Engine::attention_gpu`], still on the GPU.
#[derive(Clone, Debug)]
pub struct GpuAttention {
    /// Same element type as the inputs.
    pub output: Tensor,
    /// f32 `[batch, q_heads, q_len]`; `Some` for softmax.
    pub lse: Option<Tensor>,
}

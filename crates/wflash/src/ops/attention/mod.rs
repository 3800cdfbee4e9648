//! Attention calls (softmax and sigmoid, every mask and modifier): the host and GPU-resident
//! entry points. [`plan`] decides how a call runs, [`dispatch`] records it.

mod dispatch;
mod plan;

pub(crate) use dispatch::copy_resident_sinks;
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
        // Host calls take host values: a bias described as resident has no tensor here.
        GpuModifiers::default().check(shape, opts)?;
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
            let out = self.run(
                &plan,
                opts,
                &GpuModifiers::default(),
                start,
                count,
                &q_t,
                &k_t,
                &v_t,
            )?;
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
        self.attention_gpu_with(shape, layout, opts, &GpuModifiers::default(), q, k, v)
    }

    /// [`Engine::attention_gpu`] with modifier values that are GPU tensors too (a mask made on
    /// the device, a learnable bias or sinks in training): see [`GpuModifiers`].
    #[expect(
        clippy::too_many_arguments,
        reason = "attention_gpu's arguments and the modifiers"
    )]
    pub fn attention_gpu_with(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        modifiers: &GpuModifiers<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<GpuAttention> {
        let sinks = modifiers.sink_placeholder(shape);
        let opts = modifiers.options(opts, &sinks)?;
        let plan = self.plan(shape, layout, &opts, q.dtype)?;
        modifiers.check(shape, &opts)?;
        check_qkv(shape, q, k, v)?;
        if plan.batch_per_dispatch < shape.batch {
            return Err(Error::TooLarge {
                limit: "max_storage_buffer_binding_size",
                needed: shape.batch as u64,
                max: plan.batch_per_dispatch as u64,
                hint: " batch elements per GPU tensor (host-slice calls split over batch; split GPU tensors yourself)",
            });
        }
        self.run(&plan, &opts, modifiers, 0, shape.batch, q, k, v)
    }
}

/// Modifier values already on the GPU, for [`Engine::attention_gpu_with`] and
/// [`Engine::attention_backward_gpu_with`]. Each one present takes the place of that
/// modifier's host values in the call's options, which must not hold them too.
#[derive(Clone, Copy, Debug, Default)]
pub struct GpuModifiers<'a> {
    /// An additive bias: see [`GpuBias`]. Its gradient is the backward's `d_bias` (with
    /// [`AttentionOptions::with_bias_grad`]).
    pub bias: Option<GpuBias<'a>>,
    /// A sink logit per query head, f32 `[q_heads]`: [`AttentionOptions::sinks`]. Its gradient is
    /// the backward's `d_sinks`.
    pub sinks: Option<&'a Tensor>,
}

/// An additive bias on the GPU: [`Bias`]'s layout and meaning (`[batch, heads, q_len,
/// kv_len]`, `batch` 1 or the call's, `heads` 1 or its `q_heads`), f32 or f16 values.
#[derive(Clone, Copy, Debug)]
pub struct GpuBias<'a> {
    pub values: &'a Tensor,
    pub batch: usize,
    pub heads: usize,
}

impl GpuModifiers<'_> {
    /// Zeros standing in for resident sinks while the call is planned and its head data built;
    /// the dispatch copies the tensor over them on the device. Empty without resident sinks.
    pub(crate) fn sink_placeholder(&self, shape: &Shape) -> Vec<f32> {
        match self.sinks {
            Some(_) => vec![0.0; shape.q_heads],
            None => Vec::new(),
        }
    }

    /// `opts` as a call with these modifiers plans it: the bias described as resident
    /// ([`Bias::resident`]), the sinks as `placeholder` ([`GpuModifiers::sink_placeholder`]).
    pub(crate) fn options<'o>(
        &self,
        opts: &AttentionOptions<'o>,
        placeholder: &'o [f32],
    ) -> Result<AttentionOptions<'o>> {
        let mut planned = *opts;
        if let Some(bias) = &self.bias {
            if opts.bias.is_some() {
                return Err(Error::Unsupported {
                    combination: "a bias in the options and a GPU bias in one call",
                });
            }
            planned.bias = Some(Bias::resident(bias.values.dtype, bias.batch, bias.heads));
        }
        if self.sinks.is_some() {
            if opts.sinks.is_some() {
                return Err(Error::Unsupported {
                    combination: "sinks in the options and GPU sinks in one call",
                });
            }
            planned.sinks = Some(placeholder);
        }
        Ok(planned)
    }

    /// The tensors against what `opts` (planned, so validated) says of them: a resident bias
    /// has its tensor, of the size its shape says; the sinks are f32, one per query head.
    pub(crate) fn check(&self, shape: &Shape, opts: &AttentionOptions<'_>) -> Result<()> {
        let resident = opts
            .bias
            .filter(|b| matches!(b.values, BiasValues::Resident(_)));
        match (resident, &self.bias) {
            (Some(described), Some(bias)) => {
                let len = described.batch * described.heads * shape.q_len * shape.kv_len;
                check_len("bias", len, bias.values.len)?;
            }
            (Some(_), None) => {
                return Err(Error::InvalidModifier {
                    modifier: "bias",
                    reason: "BiasValues::Resident is for a GPU tensor given in GpuModifiers \
                             (Engine::attention_gpu_with, its backward); this call has none"
                        .into(),
                });
            }
            _ => {}
        }
        if let Some(sinks) = self.sinks {
            if sinks.dtype != crate::DType::F32 {
                return Err(Error::DTypeMismatch {
                    tensor: "sinks",
                    expected: crate::DType::F32,
                    got: sinks.dtype,
                });
            }
            check_len("sinks", shape.q_heads, sinks.len)?;
        }
        Ok(())
    }
}

/// Results of [`Engine::attention_gpu`], still on the GPU.
#[derive(Clone, Debug)]
pub struct GpuAttention {
    /// Same element type as the inputs.
    pub output: Tensor,
    /// f32 `[batch, q_heads, q_len]`; `Some` for softmax.
    pub lse: Option<Tensor>,
}

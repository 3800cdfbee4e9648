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
    AttentionGrads, AttentionOptions, BiasValues, Element, Engine, Error, Layout, Result, Shape,
    Tensor, Variant, check_len,
};

impl Engine {
    /// The gradients of an attention call on host slices: uploads, runs, reads back. Splits
    /// over batch, as the forward does, when the problem exceeds the adapter's limits.
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
        let (run, whole) = self.backward_batch_run(shape, layout, opts, T::DTYPE)?;
        // Host calls take host values: a bias described as resident has no tensor here.
        GpuModifiers::default().check(shape, opts)?;
        check_len("q", shape.q_elems(), q.len())?;
        check_len("k", shape.k_elems(), k.len())?;
        check_len("v", shape.v_elems(), v.len())?;
        check_len("o", shape.o_elems(), o.len())?;
        check_len("d_o", shape.o_elems(), d_o.len())?;
        check_lse(shape, opts, lse.map(<[f32]>::len))?;
        let read_f32 = async |t: Option<Tensor>| match t {
            Some(t) => self.read::<f32>(&t).await.map(Some),
            None => Ok(None),
        };
        // The gradients of batch elements `start..start + count` (`plan`: theirs, if made).
        let batch_run = async |start: usize,
                               count: usize,
                               plan: Option<BackwardPlan>|
               -> Result<AttentionGrads<T>> {
            let part = Shape {
                batch: count,
                ..*shape
            };
            let part_opts = batch_run_options(shape, opts, start, count);
            let plan = match plan {
                Some(plan) => plan,
                None => self.plan_backward(&part, layout, &part_opts, T::DTYPE)?,
            };
            // Batch is outermost in both layouts: a run of batch elements is one slice.
            let range = |elems: usize| {
                let per_batch = elems / shape.batch;
                start * per_batch..(start + count) * per_batch
            };
            let lse = lse
                .map(|l| self.upload(&l[range(shape.lse_elems())]))
                .transpose()?;
            let inputs = BackwardInputs {
                q: &self.upload(&q[range(shape.q_elems())])?,
                k: &self.upload(&k[range(shape.k_elems())])?,
                v: &self.upload(&v[range(shape.v_elems())])?,
                o: &self.upload(&o[range(shape.o_elems())])?,
                lse: lse.as_ref(),
                d_o: &self.upload(&d_o[range(shape.o_elems())])?,
                modifiers: GpuModifiers::default(),
            };
            let grads = self.run_backward(&plan, &part_opts, &inputs)?;
            Ok(AttentionGrads {
                dq: self.read(&grads.dq).await?,
                dk: self.read(&grads.dk).await?,
                dv: self.read(&grads.dv).await?,
                d_bias: read_f32(grads.d_bias).await?,
                d_sinks: read_f32(grads.d_sinks).await?,
                d_temperature: read_f32(grads.d_temperature).await?,
            })
        };
        let mut grads = batch_run(0, run, whole).await?;
        let bias_per_batch = opts.bias.is_some_and(|b| b.batch == shape.batch);
        let mut start = run;
        while start < shape.batch {
            let count = run.min(shape.batch - start);
            grads.append_batch_run(batch_run(start, count, None).await?, bias_per_batch);
            start += count;
        }
        Ok(grads)
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

impl Engine {
    /// How many batch elements each backward dispatch of a host-slice call takes: all of them
    /// (with the whole call's plan) when the call plans within the adapter's limits, else the
    /// most that do (planning is monotone in the batch: every limit is a capacity that batch
    /// elements fill). A call that cannot split (varlen, one batch element) or whose single
    /// batch element is too large gets the whole call's error.
    fn backward_batch_run(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &AttentionOptions<'_>,
        dtype: crate::DType,
    ) -> Result<(usize, Option<BackwardPlan>)> {
        let whole = match self.plan_backward(shape, layout, opts, dtype) {
            Ok(plan) => return Ok((shape.batch, Some(plan))),
            Err(e @ Error::TooLarge { .. }) if shape.batch > 1 && opts.varlen.is_none() => e,
            Err(e) => return Err(e),
        };
        let plans = |count: usize| {
            let part = Shape {
                batch: count,
                ..*shape
            };
            let part_opts = batch_run_options(shape, opts, 0, count);
            match self.plan_backward(&part, layout, &part_opts, dtype) {
                Ok(_) => Ok(true),
                Err(Error::TooLarge { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        };
        // `fits` plans (0 trivially), `fails` does not.
        let (mut fits, mut fails) = (0, shape.batch);
        while fails - fits > 1 {
            let mid = (fits + fails) / 2;
            if plans(mid)? {
                fits = mid;
            } else {
                fails = mid;
            }
        }
        if fits == 0 {
            return Err(whole);
        }
        Ok((fits, None))
    }
}

/// The options of batch elements `start..start + count` of a call over `shape`: the values
/// given per batch element (a bias with a batch axis, the key mask, the temperature) sliced,
/// the rest as they are.
fn batch_run_options<'a>(
    shape: &Shape,
    opts: &AttentionOptions<'a>,
    start: usize,
    count: usize,
) -> AttentionOptions<'a> {
    if start == 0 && count == shape.batch {
        return *opts;
    }
    fn run<X>(values: &[X], batch: usize, start: usize, count: usize) -> &[X] {
        let per_batch = values.len() / batch;
        &values[start * per_batch..(start + count) * per_batch]
    }
    let mut part = *opts;
    if let Some(bias) = &mut part.bias
        && bias.batch == shape.batch
    {
        bias.values = match bias.values {
            BiasValues::F32(v) => BiasValues::F32(run(v, shape.batch, start, count)),
            BiasValues::F16(v) => BiasValues::F16(run(v, shape.batch, start, count)),
            resident @ BiasValues::Resident(_) => resident,
        };
        bias.batch = count;
    }
    part.key_mask = opts.key_mask.map(|m| run(m, shape.batch, start, count));
    part.temperature = opts.temperature.map(|t| run(t, shape.batch, start, count));
    part
}

impl<T> AttentionGrads<T> {
    /// Appends the gradients of the next run of batch elements: those given per batch
    /// element follow this run's, and those summed over the batch (the sinks', a bias's
    /// without a batch axis) add up, in run order.
    fn append_batch_run(&mut self, next: AttentionGrads<T>, bias_per_batch: bool) {
        fn add(sum: &mut Option<Vec<f32>>, part: Option<Vec<f32>>) {
            if let (Some(sum), Some(part)) = (sum, part) {
                for (s, p) in sum.iter_mut().zip(part) {
                    *s += p;
                }
            }
        }
        fn append(all: &mut Option<Vec<f32>>, part: Option<Vec<f32>>) {
            if let (Some(all), Some(part)) = (all, part) {
                all.extend(part);
            }
        }
        self.dq.extend(next.dq);
        self.dk.extend(next.dk);
        self.dv.extend(next.dv);
        if bias_per_batch {
            append(&mut self.d_bias, next.d_bias);
        } else {
            add(&mut self.d_bias, next.d_bias);
        }
        add(&mut self.d_sinks, next.d_sinks);
        append(&mut self.d_temperature, next.d_temperature);
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

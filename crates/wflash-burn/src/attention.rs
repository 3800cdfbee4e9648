//! `attention` on burn tensors: wflash's forward, and its backward as the autodiff step.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Cube, DispatchKindConversion, DispatchTensor};
use burn::tensor::{Bool, DType, Shape, Tensor};
use burn_cubecl::tensor::CubeTensor;
use wflash::{AttentionOptions, Causal, GpuBias, Layout, Variant, Window};

use crate::bridge::{Pins, contiguous, flush, to_burn, view};
use crate::{Error, Result, engine};

/// Attention of `q` `[batch, q_heads, q_len, head_dim]` over `k` `[batch, kv_heads, kv_len,
/// head_dim]` and `v` `[batch, kv_heads, kv_len, value_dim]`, all on one burn wgpu device
/// with a wflash engine ([`crate::init`]): returns `[batch, q_heads, q_len, value_dim]`.
///
/// On an autodiff device the result is differentiable in `q`, `k` and `v` through wflash's
/// backward (the forward keeps its output and LSE for it, so nothing is recomputed).
/// Options wflash refuses, for the forward or (on an autodiff device) the backward, are an
/// [`Error`] here, before anything is dispatched.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    opts: &AttentionOptions<'_>,
) -> Result<Tensor<4>> {
    attention_with(q, k, v, None, None, opts)
}

/// [`attention`] with burn's `mask` and `attn_bias` arguments (`burn::tensor::module::attention`):
/// `mask` `[batch | 1, q_heads | 1, q_len, kv_len]` is `true` where a key is hidden from a
/// query, `bias` of the same shape is added to the scores (relative positions, a padding or
/// document mask in additive form); a size of 1 broadcasts. Both become one additive bias on
/// the device (`-inf` where masked) that wflash's kernels read tile by tile; under autodiff
/// `bias` gets its gradient (summed over the axes it broadcasts over) through wflash's
/// backward. A row whose keys are all hidden gives 0 (wflash's rule), where burn's own
/// attention gives NaN.
pub fn attention_with(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    bias: Option<Tensor<4>>,
    opts: &AttentionOptions<'_>,
) -> Result<Tensor<4>> {
    let (engine, shape) = checks(&q, &k, &v)?;
    let device = q.device();
    let opts = OwnedOptions::new(opts)?;
    let bias = additive_bias(&shape, &q, mask, bias)?;
    if device.is_autodiff() {
        let balanced = Some(burn::backend::GradientCheckpointingStrategy::Balanced);
        let balanced = device.gradient_checkpointing_strategy() == balanced;
        match (bias, balanced) {
            (None, false) => tracked::<NoCheckpointing, 3>(&engine, shape, opts, [q, k, v]),
            (None, true) => tracked::<BalancedCheckpointing, 3>(&engine, shape, opts, [q, k, v]),
            (Some(b), false) => tracked::<NoCheckpointing, 4>(&engine, shape, opts, [q, k, v, b]),
            (Some(b), true) => {
                tracked::<BalancedCheckpointing, 4>(&engine, shape, opts, [q, k, v, b])
            }
        }
    } else {
        let [q, k, v] = primitives::<Cube, 3>([q, k, v])?;
        let bias = bias
            .map(|b| primitives::<Cube, 1>([b]).map(|[b]| contiguous(b)))
            .transpose()?;
        let out = forward(&engine, &shape, &opts, [&q, &k, &v], bias.as_ref())?;
        Ok(Tensor::from_primitive::<Cube>(out.output))
    }
}

/// The mask and the bias as one additive bias in f32 or f16 (`-inf` where masked), broadcast
/// to the larger of their batch and head counts; `None` without either.
fn additive_bias(
    shape: &wflash::Shape,
    q: &Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    bias: Option<Tensor<4>>,
) -> Result<Option<Tensor<4>>> {
    let expected = |tensor, dims: [usize; 4], device: &burn::tensor::Device| {
        let [b, h, rows, cols] = dims;
        let fits = (b == 1 || b == shape.batch)
            && (h == 1 || h == shape.q_heads)
            && rows == shape.q_len
            && cols == shape.kv_len;
        if device != &q.device() {
            return Err(Error::Shape {
                tensor,
                got: dims.to_vec(),
                reason: format!("it is on {device:?}, q on {:?}", q.device()),
            });
        }
        if !fits {
            return Err(Error::Shape {
                tensor,
                got: dims.to_vec(),
                reason: format!(
                    "it must be [{} or 1, {} or 1, {}, {}] (batch, q_heads, q_len, kv_len)",
                    shape.batch, shape.q_heads, shape.q_len, shape.kv_len
                ),
            });
        }
        Ok(dims)
    };
    let mask_dims = mask
        .as_ref()
        .map(|m| expected("mask", m.dims(), &m.device()))
        .transpose()?;
    let bias_dims = bias
        .as_ref()
        .map(|b| expected("bias", b.dims(), &b.device()))
        .transpose()?;
    // wflash reads a bias in f32 or f16.
    let dtype = match bias.as_ref().map_or(q.dtype(), Tensor::dtype) {
        DType::F16 => DType::F16,
        _ => DType::F32,
    };
    let bias = bias.map(|b| if b.dtype() == dtype { b } else { b.cast(dtype) });
    Ok(match (mask, bias) {
        (None, bias) => bias,
        (Some(mask), bias) => {
            let [mb, mh, rows, cols] = mask_dims.unwrap_or_default();
            let [bb, bh, ..] = bias_dims.unwrap_or([1, 1, rows, cols]);
            let dims = [mb.max(bb), mh.max(bh), rows, cols];
            let bias = bias
                .unwrap_or_else(|| Tensor::<4>::zeros([1, 1, rows, cols], &q.device()).cast(dtype));
            Some(
                bias.expand(dims)
                    .mask_fill(mask.expand(dims), f32::NEG_INFINITY),
            )
        }
    })
}
/// The engine of the tensors' device and the wflash shape of the call, or why they do not
/// make one.
pub(crate) fn checks(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
) -> Result<(wflash::Engine, wflash::Shape)> {
    let device = q.device();
    for (name, t) in [("k", k), ("v", v)] {
        if t.device() != device {
            return Err(Error::Shape {
                tensor: name,
                got: t.dims().to_vec(),
                reason: format!("it is on {:?}, q on {device:?}", t.device()),
            });
        }
    }
    let shape = wflash_shape(&q.dims(), &k.dims(), &v.dims())?;
    Ok((engine(&device)?, shape))
}

/// The wflash shape of one call, or why the tensors do not make one.
fn wflash_shape(q: &[usize; 4], k: &[usize; 4], v: &[usize; 4]) -> Result<wflash::Shape> {
    let [batch, q_heads, q_len, head_dim] = *q;
    let [kb, kv_heads, kv_len, kd] = *k;
    let mismatch = |tensor, got: &[usize; 4], reason: String| {
        Err(Error::Shape {
            tensor,
            got: got.to_vec(),
            reason,
        })
    };
    if kb != batch || kd != head_dim {
        return mismatch("k", k, format!("q is {q:?}: batch and head_dim must match"));
    }
    if v[..3] != k[..3] {
        return mismatch(
            "v",
            v,
            format!("k is {k:?}: batch, heads and kv_len must match"),
        );
    }
    let shape = wflash::Shape {
        batch,
        q_heads,
        kv_heads,
        q_len,
        kv_len,
        head_dim,
        value_dim: v[3],
    };
    Ok(shape)
}

/// burn's primitives of `tensors`, named (for errors) q, k, v, bias in that order.
pub(crate) fn primitives<B, const N: usize>(
    tensors: [Tensor<4>; N],
) -> Result<[B::FloatTensorPrimitive; N]>
where
    B: burn::backend::Backend,
    DispatchTensor: DispatchKindConversion<B>,
{
    const NAMES: [&str; 4] = ["q", "k", "v", "bias"];
    let mut out = Vec::with_capacity(N);
    for (i, t) in tensors.into_iter().enumerate() {
        let primitive = t.try_into_primitive::<B>().map_err(|e| Error::NotWgpu {
            tensor: NAMES.get(i).copied().unwrap_or("tensor"),
            reason: format!("{e:?}"),
        })?;
        out.push(primitive);
    }
    Ok(out
        .try_into()
        .unwrap_or_else(|_| unreachable!("N tensors in, N primitives out")))
}

/// The options of a call, owned, so the backward (run later, from burn's graph) has them.
/// Options that would be burn tensors (bias, masks, temperature) are refused for now.
#[derive(Clone, Debug)]
struct OwnedOptions {
    variant: Variant,
    scale: Option<f32>,
    causal: Option<Causal>,
    window: Option<Window>,
    softcap: Option<f32>,
    alibi_slopes: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
    prefix_len: Option<usize>,
    chunk: Option<usize>,
}

impl OwnedOptions {
    fn new(o: &AttentionOptions<'_>) -> Result<OwnedOptions> {
        let refused = [
            ("bias", o.bias.is_some()),
            ("key_mask", o.key_mask.is_some()),
            ("temperature", o.temperature.is_some()),
            ("varlen", o.varlen.is_some()),
            ("bias_grad", o.bias_grad),
        ];
        if let Some((name, _)) = refused.iter().find(|(_, set)| *set) {
            return Err(Error::Wflash(wflash::Error::Unsupported {
                combination: match *name {
                    "bias" => {
                        "a host-slice bias in wflash-burn (pass it as a burn tensor to attention_with)"
                    }
                    "key_mask" => {
                        "a host-slice key_mask in wflash-burn (pass a mask tensor to attention_with)"
                    }
                    "temperature" => "temperature in wflash-burn (not yet a burn tensor input)",
                    "varlen" => "varlen in wflash-burn (burn tensors are padded batches)",
                    _ => {
                        "bias_grad in wflash-burn (a bias tensor passed to attention_with gets its gradient through autodiff)"
                    }
                },
            }));
        }
        Ok(OwnedOptions {
            variant: o.variant,
            scale: o.scale,
            causal: o.causal,
            window: o.window,
            softcap: o.softcap,
            alibi_slopes: o.alibi_slopes.map(<[f32]>::to_vec),
            sinks: o.sinks.map(<[f32]>::to_vec),
            prefix_len: o.prefix_len,
            chunk: o.chunk,
        })
    }

    fn get(&self) -> AttentionOptions<'_> {
        let mut o = AttentionOptions::softmax();
        o.variant = self.variant;
        o.scale = self.scale;
        o.causal = self.causal;
        o.window = self.window;
        o.softcap = self.softcap;
        o.alibi_slopes = self.alibi_slopes.as_deref();
        o.sinks = self.sinks.as_deref();
        o.prefix_len = self.prefix_len;
        o.chunk = self.chunk;
        o
    }
}

/// A forward's results: burn's output, and wflash's copy of it and the LSE for a backward.
struct Forward {
    output: CubeTensor,
    wflash_output: wflash::Tensor,
    lse: Option<wflash::Tensor>,
}

/// The wflash description of a contiguous `[batch | 1, heads | 1, q_len, kv_len]` bias.
fn gpu_bias<'t>(bias: &CubeTensor, values: &'t wflash::Tensor) -> GpuBias<'t> {
    let dims = bias.meta.shape();
    GpuBias {
        values,
        batch: dims[0],
        heads: dims[1],
    }
}

fn forward(
    engine: &wflash::Engine,
    shape: &wflash::Shape,
    opts: &OwnedOptions,
    [q, k, v]: [&CubeTensor; 3],
    bias: Option<&CubeTensor>,
) -> Result<Forward> {
    let opts = opts.get();
    let (q, k, v) = (
        contiguous(q.clone()),
        contiguous(k.clone()),
        contiguous(v.clone()),
    );
    let mut pins = Pins::default();
    let views = [
        view(engine, &mut pins, "q", &q)?,
        view(engine, &mut pins, "k", &k)?,
        view(engine, &mut pins, "v", &v)?,
    ];
    let bias_view = bias
        .map(|b| view(engine, &mut pins, "bias", b))
        .transpose()?;
    flush(&q)?;
    let out = match (bias, &bias_view) {
        (Some(bias), Some(values)) => engine.attention_gpu_with_bias(
            shape,
            Layout::Bhsd,
            &opts,
            &gpu_bias(bias, values),
            &views[0],
            &views[1],
            &views[2],
        )?,
        _ => engine.attention_gpu(shape, Layout::Bhsd, &opts, &views[0], &views[1], &views[2])?,
    };
    let dims = [shape.batch, shape.q_heads, shape.q_len, shape.value_dim];
    let output = to_burn(engine, &q, Shape::from(dims), &out.output)?;
    Ok(Forward {
        output,
        wflash_output: out.output,
        lse: out.lse,
    })
}

/// What the backward step keeps from the forward.
#[derive(Clone, Debug)]
struct Saved {
    engine: wflash::Engine,
    shape: wflash::Shape,
    opts: OwnedOptions,
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    bias: Option<CubeTensor>,
    output: wflash::Tensor,
    lse: Option<wflash::Tensor>,
}

/// The autodiff step of a call: `N` = 3 parents (q, k, v), or 4 with a bias.
#[derive(Debug)]
struct AttentionBackward<const N: usize>;

impl<const N: usize> Backward<Cube, N> for AttentionBackward<N> {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_o = grads.consume::<Cube>(&ops.node);
        // The bias's gradient only where burn's graph wants it.
        let bias_grad = ops.parents.get(3).is_some_and(Option::is_some);
        // The plan was checked in the forward; what is left to fail is the device itself,
        // which burn's own backward steps treat the same way.
        let computed = backward(&ops.state, d_o, bias_grad)
            .unwrap_or_else(|e| panic!("wflash attention backward failed: {e}"));
        for (node, grad) in ops.parents.into_iter().zip(computed) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<Cube>(node.id, grad);
            }
        }
    }
}

/// dQ, dK, dV and (with `bias_grad`) the bias's gradient, as burn tensors.
fn backward(s: &Saved, d_o: CubeTensor, bias_grad: bool) -> Result<[Option<CubeTensor>; 4]> {
    let engine = &s.engine;
    let mut opts = s.opts.get();
    opts.bias_grad = bias_grad;
    let d_o = contiguous(d_o);
    let mut pins = Pins::default();
    let views = [
        view(engine, &mut pins, "q", &s.q)?,
        view(engine, &mut pins, "k", &s.k)?,
        view(engine, &mut pins, "v", &s.v)?,
        view(engine, &mut pins, "d_o", &d_o)?,
    ];
    let bias_view = (s.bias.as_ref())
        .map(|b| view(engine, &mut pins, "bias", b))
        .transpose()?;
    flush(&d_o)?;
    let [q, k, v, d_o] = &views;
    let g = match (&s.bias, &bias_view) {
        (Some(bias), Some(values)) => engine.attention_backward_gpu_with_bias(
            &s.shape,
            Layout::Bhsd,
            &opts,
            &gpu_bias(bias, values),
            q,
            k,
            v,
            &s.output,
            s.lse.as_ref(),
            d_o,
        )?,
        _ => engine.attention_backward_gpu(
            &s.shape,
            Layout::Bhsd,
            &opts,
            q,
            k,
            v,
            &s.output,
            s.lse.as_ref(),
            d_o,
        )?,
    };
    let sh = &s.shape;
    let d_bias = match (&s.bias, &g.d_bias) {
        // wflash's bias gradient is f32, of the bias's shape.
        (Some(bias), Some(d_bias)) => {
            let like = CubeTensor {
                dtype: DType::F32,
                ..bias.clone()
            };
            let d_bias = to_burn(engine, &like, bias.meta.shape().clone(), d_bias)?;
            Some(burn_cubecl::kernel::cast(d_bias, bias.dtype))
        }
        _ => None,
    };
    Ok([
        Some(to_burn(
            engine,
            &s.q,
            Shape::from([sh.batch, sh.q_heads, sh.q_len, sh.head_dim]),
            &g.dq,
        )?),
        Some(to_burn(
            engine,
            &s.k,
            Shape::from([sh.batch, sh.kv_heads, sh.kv_len, sh.head_dim]),
            &g.dk,
        )?),
        Some(to_burn(
            engine,
            &s.v,
            Shape::from([sh.batch, sh.kv_heads, sh.kv_len, sh.value_dim]),
            &g.dv,
        )?),
        d_bias,
    ])
}

/// A call on an autodiff device: `tensors` are q, k, v and, when `N` is 4, the bias.
fn tracked<C: CheckpointStrategy, const N: usize>(
    engine: &wflash::Engine,
    shape: wflash::Shape,
    opts: OwnedOptions,
    tensors: [Tensor<4>; N],
) -> Result<Tensor<4>>
where
    DispatchTensor: DispatchKindConversion<Autodiff<Cube, C>>,
{
    let inputs = primitives::<Autodiff<Cube, C>, N>(tensors)?;
    let prep = AttentionBackward::<N>
        .prepare::<C>(inputs.each_ref().map(|t| t.node()))
        .compute_bound()
        .stateful();
    let [q, k, v] = [0, 1, 2].map(|i| contiguous(inputs[i].primitive().clone()));
    let bias = inputs.get(3).map(|b| contiguous(b.primitive().clone()));
    let out = match prep {
        OpsKind::Tracked(prep) => {
            let dtype = crate::bridge::wflash_dtype("q", q.dtype)?;
            // Refuse now what the backward would refuse later, inside burn's graph: with the
            // bias's gradient, the larger of the two backward plans.
            let mut planned = opts.get();
            if let Some(bias) = &bias {
                let dims = bias.meta.shape();
                let dtype = crate::bridge::wflash_dtype("bias", bias.dtype)?;
                planned.bias = Some(wflash::Bias::resident(dtype, dims[0], dims[1]));
                planned.bias_grad = true;
            }
            engine.plan_backward(&shape, Layout::Bhsd, &planned, dtype)?;
            let fwd = forward(engine, &shape, &opts, [&q, &k, &v], bias.as_ref())?;
            let saved = Saved {
                engine: engine.clone(),
                shape,
                opts,
                q,
                k,
                v,
                bias,
                output: fwd.wflash_output,
                lse: fwd.lse,
            };
            prep.finish(saved, fwd.output)
        }
        OpsKind::UnTracked(prep) => {
            let fwd = forward(engine, &shape, &opts, [&q, &k, &v], bias.as_ref())?;
            prep.finish(fwd.output)
        }
    };
    Ok(Tensor::from_primitive::<Autodiff<Cube, C>>(out))
}

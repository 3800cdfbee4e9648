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
use wflash::{AttentionOptions, Causal, GpuBias, GpuModifiers, Layout, Variant, Window};

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
    attention_with(q, k, v, Modifiers::default(), opts)
}

/// Modifier values that are burn tensors, for [`attention_with`]: burn's `mask` and `attn_bias`
/// (`burn::tensor::module::attention`), and learnable attention sinks.
#[derive(Clone, Debug, Default)]
pub struct Modifiers {
    /// `[batch | 1, q_heads | 1, q_len, kv_len]`, `true` where a key is hidden from a query
    /// (burn's convention); a size of 1 broadcasts.
    pub mask: Option<Tensor<4, Bool>>,
    /// The same shape, added to the scores (relative positions, a padding or document mask in
    /// additive form). Differentiable.
    pub bias: Option<Tensor<4>>,
    /// `[q_heads]`: a sink logit per query head (gpt-oss), softmax only, in f32 on the device.
    /// Differentiable.
    pub sinks: Option<Tensor<1>>,
}

/// [`attention`] with modifier values that are burn tensors ([`Modifiers`]). The mask and the
/// bias become one additive bias on the device (`-inf` where masked) that wflash's kernels read
/// tile by tile; under autodiff the bias and the sinks get their gradients through wflash's
/// backward (the bias's summed over the axes it broadcasts over). A row whose keys are all
/// hidden gives 0 (wflash's rule), where burn's own attention gives NaN.
pub fn attention_with(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    modifiers: Modifiers,
    opts: &AttentionOptions<'_>,
) -> Result<Tensor<4>> {
    let (engine, shape) = checks(&q, &k, &v)?;
    let device = q.device();
    let opts = OwnedOptions::new(opts)?;
    let Modifiers { mask, bias, sinks } = modifiers;
    let bias = additive_bias(&shape, &q, mask, bias)?;
    let sinks = sinks.map(|s| sink_tensor(&shape, &q, s)).transpose()?;
    let has = Extras {
        bias: bias.is_some(),
        sinks: sinks.is_some(),
    };
    // q, k, v, then the bias and the sinks where present: the autodiff step's parents.
    let mut tensors = vec![("q", q), ("k", k), ("v", v)];
    tensors.extend(bias.map(|b| ("bias", b)));
    tensors.extend(sinks.map(|s| ("sinks", s)));
    if device.is_autodiff() {
        let balanced = Some(burn::backend::GradientCheckpointingStrategy::Balanced);
        if device.gradient_checkpointing_strategy() == balanced {
            tracked_any::<BalancedCheckpointing>(&engine, shape, opts, has, tensors)
        } else {
            tracked_any::<NoCheckpointing>(&engine, shape, opts, has, tensors)
        }
    } else {
        let inputs = tensors
            .into_iter()
            .map(|(name, t)| primitives::<Cube, 1>([name], [t]).map(|[t]| contiguous(t)))
            .collect::<Result<Vec<_>>>()?;
        let t = Resident::new(has, &inputs);
        let mut pins = Pins::default();
        let resident = t.views(&engine, &mut pins)?;
        let out = forward(&engine, &shape, &opts, &t, &mut pins, &resident)?;
        Ok(Tensor::from_primitive::<Cube>(out.output))
    }
}

/// Which modifier tensors a call has, after q, k and v.
#[derive(Clone, Copy, Debug)]
struct Extras {
    bias: bool,
    sinks: bool,
}

/// A call's tensors as burn primitives: q, k, v and its modifier tensors.
struct Resident<'a> {
    q: &'a CubeTensor,
    k: &'a CubeTensor,
    v: &'a CubeTensor,
    bias: Option<&'a CubeTensor>,
    sinks: Option<&'a CubeTensor>,
}

impl<'a> Resident<'a> {
    /// `inputs` in the order [`attention_with`] puts them: q, k, v, then the extras present.
    fn new(has: Extras, inputs: &'a [CubeTensor]) -> Resident<'a> {
        let mut extras = inputs[3..].iter();
        let bias = if has.bias { extras.next() } else { None };
        let sinks = if has.sinks { extras.next() } else { None };
        Resident {
            q: &inputs[0],
            k: &inputs[1],
            v: &inputs[2],
            bias,
            sinks,
        }
    }

    /// Views of the modifier tensors (pinned in `pins`).
    fn views(&self, engine: &wflash::Engine, pins: &mut Pins) -> Result<ResidentViews> {
        let bias = match self.bias {
            Some(b) => Some((b.meta.shape().clone(), view(engine, pins, "bias", b)?)),
            None => None,
        };
        let sinks = match self.sinks {
            Some(s) => Some(view(engine, pins, "sinks", s)?),
            None => None,
        };
        Ok(ResidentViews { bias, sinks })
    }
}

/// wflash views of a call's modifier tensors; the bias with its burn shape.
struct ResidentViews {
    bias: Option<(Shape, wflash::Tensor)>,
    sinks: Option<wflash::Tensor>,
}

impl ResidentViews {
    fn modifiers(&self) -> GpuModifiers<'_> {
        GpuModifiers {
            bias: self.bias.as_ref().map(|(dims, values)| GpuBias {
                values,
                batch: dims[0],
                heads: dims[1],
            }),
            sinks: self.sinks.as_ref(),
        }
    }
}

/// The sinks `[q_heads]` as wflash reads them: f32, as a `[1, 1, 1, q_heads]` tensor (the
/// rank the autodiff step's parents share; a reshape, so burn routes its gradient back).
fn sink_tensor(shape: &wflash::Shape, q: &Tensor<4>, sinks: Tensor<1>) -> Result<Tensor<4>> {
    let [heads] = sinks.dims();
    if heads != shape.q_heads || sinks.device() != q.device() {
        return Err(Error::Shape {
            tensor: "sinks",
            got: vec![heads],
            reason: format!(
                "it must be [{}] (one per query head), on q's device {:?}",
                shape.q_heads,
                q.device()
            ),
        });
    }
    let sinks = if sinks.dtype() == DType::F32 {
        sinks
    } else {
        sinks.cast(DType::F32)
    };
    Ok(sinks.reshape([1, 1, 1, heads]))
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

/// burn's primitives of `tensors` (`names` for errors).
pub(crate) fn primitives<B, const N: usize>(
    names: [&'static str; N],
    tensors: [Tensor<4>; N],
) -> Result<[B::FloatTensorPrimitive; N]>
where
    B: burn::backend::Backend,
    DispatchTensor: DispatchKindConversion<B>,
{
    let mut out = Vec::with_capacity(N);
    for (tensor, t) in names.into_iter().zip(tensors) {
        let primitive = t.try_into_primitive::<B>().map_err(|e| Error::NotWgpu {
            tensor,
            reason: format!("{e:?}"),
        })?;
        out.push(primitive);
    }
    Ok(exactly(out))
}

/// `items` as an array: its length is `N` (the caller knows).
pub(crate) fn exactly<T, const N: usize>(items: Vec<T>) -> [T; N] {
    items
        .try_into()
        .unwrap_or_else(|_| unreachable!("as many items as the array holds"))
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

/// The forward on contiguous tensors; `resident`: views of `t`'s modifier tensors, pinned in
/// `pins`.
fn forward(
    engine: &wflash::Engine,
    shape: &wflash::Shape,
    opts: &OwnedOptions,
    t: &Resident<'_>,
    pins: &mut Pins,
    resident: &ResidentViews,
) -> Result<Forward> {
    let opts = opts.get();
    let [q, k, v] =
        [("q", t.q), ("k", t.k), ("v", t.v)].map(|(name, x)| view(engine, pins, name, x));
    flush(t.q)?;
    let out = engine.attention_gpu_with(
        shape,
        Layout::Bhsd,
        &opts,
        &resident.modifiers(),
        &q?,
        &k?,
        &v?,
    )?;
    let dims = [shape.batch, shape.q_heads, shape.q_len, shape.value_dim];
    let output = to_burn(engine, t.q, Shape::from(dims), &out.output)?;
    Ok(Forward {
        output,
        wflash_output: out.output,
        lse: out.lse,
    })
}

/// What the backward step keeps from the forward: its contiguous inputs (q, k, v and the
/// extras present, in [`attention_with`]'s order), options, output and LSE.
#[derive(Clone, Debug)]
struct Saved {
    engine: wflash::Engine,
    shape: wflash::Shape,
    opts: OwnedOptions,
    has: Extras,
    inputs: Vec<CubeTensor>,
    output: wflash::Tensor,
    lse: Option<wflash::Tensor>,
}

/// The autodiff step of a call: `N` parents, q, k, v and the extras present.
#[derive(Debug)]
struct AttentionBackward<const N: usize>;

impl<const N: usize> Backward<Cube, N> for AttentionBackward<N> {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_o = grads.consume::<Cube>(&ops.node);
        // The bias's gradient only where burn's graph wants it (the bias is parent 3).
        let bias_grad = ops.state.has.bias && ops.parents.get(3).is_some_and(Option::is_some);
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

/// The gradients of the saved inputs, in their order, as burn tensors: dQ, dK, dV, then the
/// bias's (with `bias_grad`) and the sinks'.
fn backward(s: &Saved, d_o: CubeTensor, bias_grad: bool) -> Result<Vec<Option<CubeTensor>>> {
    let engine = &s.engine;
    let mut opts = s.opts.get();
    opts.bias_grad = bias_grad;
    let t = Resident::new(s.has, &s.inputs);
    let d_o = contiguous(d_o);
    let mut pins = Pins::default();
    let [q, k, v, d_o_view] = [("q", t.q), ("k", t.k), ("v", t.v), ("d_o", &d_o)]
        .map(|(name, x)| view(engine, &mut pins, name, x));
    let resident = t.views(engine, &mut pins)?;
    flush(&d_o)?;
    let g = engine.attention_backward_gpu_with(
        &s.shape,
        Layout::Bhsd,
        &opts,
        &resident.modifiers(),
        &q?,
        &k?,
        &v?,
        &s.output,
        s.lse.as_ref(),
        &d_o_view?,
    )?;
    // wflash's modifier gradients are f32: into burn tensors of their input's shape and type.
    let modifier_grad = |input: Option<&CubeTensor>, grad: &Option<wflash::Tensor>| {
        let (Some(input), Some(grad)) = (input, grad) else {
            return Ok(None);
        };
        let like = CubeTensor {
            dtype: DType::F32,
            ..input.clone()
        };
        let grad = to_burn(engine, &like, input.meta.shape().clone(), grad)?;
        Ok::<_, Error>(Some(burn_cubecl::kernel::cast(grad, input.dtype)))
    };
    let sh = &s.shape;
    let mut out = vec![
        Some(to_burn(
            engine,
            t.q,
            Shape::from([sh.batch, sh.q_heads, sh.q_len, sh.head_dim]),
            &g.dq,
        )?),
        Some(to_burn(
            engine,
            t.k,
            Shape::from([sh.batch, sh.kv_heads, sh.kv_len, sh.head_dim]),
            &g.dk,
        )?),
        Some(to_burn(
            engine,
            t.v,
            Shape::from([sh.batch, sh.kv_heads, sh.kv_len, sh.value_dim]),
            &g.dv,
        )?),
    ];
    if s.has.bias {
        out.push(modifier_grad(t.bias, &g.d_bias)?);
    }
    if s.has.sinks {
        out.push(modifier_grad(t.sinks, &g.d_sinks)?);
    }
    Ok(out)
}

/// [`tracked`] for as many tensors as the call has (3 to 5).
fn tracked_any<C: CheckpointStrategy>(
    engine: &wflash::Engine,
    shape: wflash::Shape,
    opts: OwnedOptions,
    has: Extras,
    tensors: Vec<(&'static str, Tensor<4>)>,
) -> Result<Tensor<4>>
where
    DispatchTensor: DispatchKindConversion<Autodiff<Cube, C>>,
{
    let (names, tensors): (Vec<_>, Vec<_>) = tensors.into_iter().unzip();
    match tensors.len() {
        3 => tracked::<C, 3>(engine, shape, opts, has, exactly(names), exactly(tensors)),
        4 => tracked::<C, 4>(engine, shape, opts, has, exactly(names), exactly(tensors)),
        _ => tracked::<C, 5>(engine, shape, opts, has, exactly(names), exactly(tensors)),
    }
}

/// A call on an autodiff device: `tensors` are q, k, v and the extras `has` says.
fn tracked<C: CheckpointStrategy, const N: usize>(
    engine: &wflash::Engine,
    shape: wflash::Shape,
    opts: OwnedOptions,
    has: Extras,
    names: [&'static str; N],
    tensors: [Tensor<4>; N],
) -> Result<Tensor<4>>
where
    DispatchTensor: DispatchKindConversion<Autodiff<Cube, C>>,
{
    let inputs = primitives::<Autodiff<Cube, C>, N>(names, tensors)?;
    let prep = AttentionBackward::<N>
        .prepare::<C>(inputs.each_ref().map(|t| t.node()))
        .compute_bound()
        .stateful();
    let contiguous_inputs: Vec<CubeTensor> = (inputs.iter())
        .map(|t| contiguous(t.primitive().clone()))
        .collect();
    let t = Resident::new(has, &contiguous_inputs);
    let mut pins = Pins::default();
    let resident = t.views(engine, &mut pins)?;
    let out = match prep {
        OpsKind::Tracked(prep) => {
            let dtype = crate::bridge::wflash_dtype("q", t.q.dtype)?;
            // Refuse now what the backward would refuse later, inside burn's graph: with the
            // bias's gradient, the larger of the two backward plans.
            let mut planned = opts.get();
            planned.bias_grad = has.bias;
            engine.plan_backward_with(
                &shape,
                Layout::Bhsd,
                &planned,
                &resident.modifiers(),
                dtype,
            )?;
            let fwd = forward(engine, &shape, &opts, &t, &mut pins, &resident)?;
            let saved = Saved {
                engine: engine.clone(),
                shape,
                opts,
                has,
                inputs: contiguous_inputs.clone(),
                output: fwd.wflash_output,
                lse: fwd.lse,
            };
            prep.finish(saved, fwd.output)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(forward(engine, &shape, &opts, &t, &mut pins, &resident)?.output)
        }
    };
    Ok(Tensor::from_primitive::<Autodiff<Cube, C>>(out))
}

//! `attention` on burn tensors: wflash's forward, and its backward as the autodiff step.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Cube, DispatchKindConversion, DispatchTensor};
use burn::tensor::{Shape, Tensor};
use burn_cubecl::tensor::CubeTensor;
use wflash::{AttentionOptions, Causal, Layout, Variant, Window};

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
    let (engine, shape) = checks(&q, &k, &v)?;
    let device = q.device();
    let opts = OwnedOptions::new(opts)?;
    if device.is_autodiff() {
        let balanced = Some(burn::backend::GradientCheckpointingStrategy::Balanced);
        if device.gradient_checkpointing_strategy() == balanced {
            tracked::<BalancedCheckpointing>(&engine, shape, opts, [q, k, v])
        } else {
            tracked::<NoCheckpointing>(&engine, shape, opts, [q, k, v])
        }
    } else {
        let [q, k, v] = primitives::<Cube>([q, k, v])?;
        let out = forward(&engine, &shape, &opts, [&q, &k, &v])?;
        Ok(Tensor::from_primitive::<Cube>(out.output))
    }
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

pub(crate) fn primitives<B>(tensors: [Tensor<4>; 3]) -> Result<[B::FloatTensorPrimitive; 3]>
where
    B: burn::backend::Backend,
    DispatchTensor: DispatchKindConversion<B>,
{
    let [q, k, v] = tensors;
    let one = |name, t: Tensor<4>| {
        t.try_into_primitive::<B>().map_err(|e| Error::NotWgpu {
            tensor: name,
            reason: format!("{e:?}"),
        })
    };
    Ok([one("q", q)?, one("k", k)?, one("v", v)?])
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
                    "bias" => "bias in wflash-burn (not yet a burn tensor input)",
                    "key_mask" => "key_mask in wflash-burn (not yet a burn tensor input)",
                    "temperature" => "temperature in wflash-burn (not yet a burn tensor input)",
                    "varlen" => "varlen in wflash-burn (burn tensors are padded batches)",
                    _ => "bias_grad in wflash-burn (no bias input yet)",
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

fn forward(
    engine: &wflash::Engine,
    shape: &wflash::Shape,
    opts: &OwnedOptions,
    [q, k, v]: [&CubeTensor; 3],
) -> Result<Forward> {
    let opts = opts.get();
    let dtype = crate::bridge::wflash_dtype("q", q.dtype)?;
    engine.plan(shape, Layout::Bhsd, &opts, dtype)?;
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
    flush(&q)?;
    let out = engine.attention_gpu(shape, Layout::Bhsd, &opts, &views[0], &views[1], &views[2])?;
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
    output: wflash::Tensor,
    lse: Option<wflash::Tensor>,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Cube, 3> for AttentionBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let d_o = grads.consume::<Cube>(&ops.node);
        // The plan was checked in the forward; what is left to fail is the device itself,
        // which burn's own backward steps treat the same way.
        let [dq, dk, dv] = backward(&ops.state, d_o)
            .unwrap_or_else(|e| panic!("wflash attention backward failed: {e}"));
        for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<Cube>(node.id, grad);
            }
        }
    }
}

fn backward(s: &Saved, d_o: CubeTensor) -> Result<[CubeTensor; 3]> {
    let engine = &s.engine;
    let opts = s.opts.get();
    let d_o = contiguous(d_o);
    let mut pins = Pins::default();
    let views = [
        view(engine, &mut pins, "q", &s.q)?,
        view(engine, &mut pins, "k", &s.k)?,
        view(engine, &mut pins, "v", &s.v)?,
        view(engine, &mut pins, "d_o", &d_o)?,
    ];
    flush(&d_o)?;
    let g = engine.attention_backward_gpu(
        &s.shape,
        Layout::Bhsd,
        &opts,
        &views[0],
        &views[1],
        &views[2],
        &s.output,
        s.lse.as_ref(),
        &views[3],
    )?;
    let sh = &s.shape;
    Ok([
        to_burn(
            engine,
            &s.q,
            Shape::from([sh.batch, sh.q_heads, sh.q_len, sh.head_dim]),
            &g.dq,
        )?,
        to_burn(
            engine,
            &s.k,
            Shape::from([sh.batch, sh.kv_heads, sh.kv_len, sh.head_dim]),
            &g.dk,
        )?,
        to_burn(
            engine,
            &s.v,
            Shape::from([sh.batch, sh.kv_heads, sh.kv_len, sh.value_dim]),
            &g.dv,
        )?,
    ])
}

fn tracked<C: CheckpointStrategy>(
    engine: &wflash::Engine,
    shape: wflash::Shape,
    opts: OwnedOptions,
    tensors: [Tensor<4>; 3],
) -> Result<Tensor<4>>
where
    DispatchTensor: DispatchKindConversion<Autodiff<Cube, C>>,
{
    let [q, k, v] = primitives::<Autodiff<Cube, C>>(tensors)?;
    let prep = AttentionBackward
        .prepare::<C>([q.node(), k.node(), v.node()])
        .compute_bound()
        .stateful();
    let out = match prep {
        OpsKind::Tracked(prep) => {
            let dtype = crate::bridge::wflash_dtype("q", q.primitive().dtype)?;
            // Refuse now what the backward would refuse later, inside burn's graph.
            engine.plan_backward(&shape, Layout::Bhsd, &opts.get(), dtype)?;
            let (qp, kp, vp) = (
                contiguous(q.primitive().clone()),
                contiguous(k.primitive().clone()),
                contiguous(v.primitive().clone()),
            );
            let fwd = forward(engine, &shape, &opts, [&qp, &kp, &vp])?;
            let saved = Saved {
                engine: engine.clone(),
                shape,
                opts,
                q: qp,
                k: kp,
                v: vp,
                output: fwd.wflash_output,
                lse: fwd.lse,
            };
            prep.finish(saved, fwd.output)
        }
        OpsKind::UnTracked(prep) => {
            let fwd = forward(
                engine,
                &shape,
                &opts,
                [q.primitive(), k.primitive(), v.primitive()],
            )?;
            prep.finish(fwd.output)
        }
    };
    Ok(Tensor::from_primitive::<Autodiff<Cube, C>>(out))
}

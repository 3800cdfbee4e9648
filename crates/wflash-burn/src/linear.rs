//! Linear attention on burn tensors: differentiable over a whole sequence, or carrying its
//! state from call to call (generation; no gradient).

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
use wflash::{FeatureMap, Layout, LinearKernel, LinearOptions};

use crate::attention::{checks, primitives};
use crate::bridge::{Pins, contiguous, flush, to_burn, view};
use crate::{Error, Result};

/// A linear-attention state as burn tensors: `kv` `[batch, q_heads, head_dim, value_dim]` and,
/// when the call normalises, `z` `[batch, q_heads, head_dim]`, both f32.
#[derive(Clone, Debug)]
pub struct LinearState {
    pub kv: Tensor<4>,
    pub z: Option<Tensor<3>>,
}

/// Linear attention (wflash's [`LinearOptions`]: causal or not, feature map, per-head decay,
/// normaliser) of `q` `[batch, q_heads, len, head_dim]` over `k` `[batch, kv_heads, len,
/// head_dim]` and `v` `[batch, kv_heads, len, value_dim]`: returns `[batch, q_heads, len,
/// value_dim]`. On an autodiff device it is differentiable in `q`, `k` and `v` through wflash's
/// chunked backward.
pub fn linear_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    opts: &LinearOptions<'_>,
) -> Result<Tensor<4>> {
    let (engine, shape) = checks(&q, &k, &v)?;
    let opts = OwnedLinear::new(opts);
    let device = q.device();
    if device.is_autodiff() {
        let balanced = Some(burn::backend::GradientCheckpointingStrategy::Balanced);
        if device.gradient_checkpointing_strategy() == balanced {
            tracked::<BalancedCheckpointing>(&engine, shape, opts, [q, k, v])
        } else {
            tracked::<NoCheckpointing>(&engine, shape, opts, [q, k, v])
        }
    } else {
        let [q, k, v] = primitives::<Cube, 3>(["q", "k", "v"], [q, k, v])?;
        let (out, _) = forward(&engine, &shape, &opts, [&q, &k, &v], None)?;
        Ok(Tensor::from_primitive::<Cube>(out))
    }
}

/// [`linear_attention`] continuing from `initial` (an earlier call's state; `None` starts from
/// zero), returning the output and the state after the last token: a sequence fed in pieces,
/// or decoded token by token. Forward only: on an autodiff device it is an
/// [`Error::Wflash`]`(Unsupported)` (train over whole sequences with [`linear_attention`]).
pub fn linear_attention_with_state(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    opts: &LinearOptions<'_>,
    initial: Option<&LinearState>,
) -> Result<(Tensor<4>, LinearState)> {
    let (engine, shape) = checks(&q, &k, &v)?;
    if q.device().is_autodiff() {
        return Err(Error::Wflash(wflash::Error::Unsupported {
            combination: "linear_attention_with_state on an autodiff device (no gradient \
                          through the state yet; use linear_attention)",
        }));
    }
    let opts = OwnedLinear::new(opts);
    let [qp, kp, vp] = primitives::<Cube, 3>(["q", "k", "v"], [q, k, v])?;
    let initial = match initial {
        Some(s) => Some((
            state_primitive("initial.kv", s.kv.clone())?,
            match &s.z {
                Some(z) => Some(state_primitive("initial.z", z.clone())?),
                None => None,
            },
        )),
        None => None,
    };
    let (out, state) = forward(&engine, &shape, &opts, [&qp, &kp, &vp], initial)?;
    let dims = |t: &wflash::Tensor| t.len();
    let (b, h, dk, dv) = (shape.batch, shape.q_heads, shape.head_dim, shape.value_dim);
    debug_assert_eq!(dims(&state.kv), b * h * dk * dv);
    let f32_like = CubeTensor {
        dtype: burn::tensor::DType::F32,
        ..qp.clone()
    };
    let kv = to_burn(&engine, &f32_like, Shape::from([b, h, dk, dv]), &state.kv)?;
    let z = match &state.z {
        Some(z) => Some(Tensor::from_primitive::<Cube>(to_burn(
            &engine,
            &f32_like,
            Shape::from([b, h, dk]),
            z,
        )?)),
        None => None,
    };
    let state = LinearState {
        kv: Tensor::from_primitive::<Cube>(kv),
        z,
    };
    Ok((Tensor::from_primitive::<Cube>(out), state))
}

fn state_primitive<const D: usize>(name: &'static str, t: Tensor<D>) -> Result<CubeTensor> {
    t.try_into_primitive::<Cube>().map_err(|e| Error::NotWgpu {
        tensor: name,
        reason: format!("{e:?}"),
    })
}

/// The options of a call, owned, for the backward.
#[derive(Clone, Debug)]
struct OwnedLinear {
    causal: bool,
    feature_map: FeatureMap,
    decay: Option<Vec<f32>>,
    normalize: bool,
    eps: f32,
    scale: Option<f32>,
    kernel: LinearKernel,
    chunk_size: Option<usize>,
}

impl OwnedLinear {
    fn new(o: &LinearOptions<'_>) -> OwnedLinear {
        OwnedLinear {
            causal: o.causal,
            feature_map: o.feature_map,
            decay: o.decay.map(<[f32]>::to_vec),
            normalize: o.normalize,
            eps: o.eps,
            scale: o.scale,
            kernel: o.kernel,
            chunk_size: o.chunk_size,
        }
    }

    fn get(&self) -> LinearOptions<'_> {
        LinearOptions {
            causal: self.causal,
            feature_map: self.feature_map,
            decay: self.decay.as_deref(),
            normalize: self.normalize,
            eps: self.eps,
            scale: self.scale,
            kernel: self.kernel,
            chunk_size: self.chunk_size,
        }
    }
}

/// burn's output, and wflash's final state.
fn forward(
    engine: &wflash::Engine,
    shape: &wflash::Shape,
    opts: &OwnedLinear,
    [q, k, v]: [&CubeTensor; 3],
    initial: Option<(CubeTensor, Option<CubeTensor>)>,
) -> Result<(CubeTensor, wflash::GpuLinearState)> {
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
    let initial = match initial {
        Some((kv, z)) => {
            let kv = contiguous(kv);
            let z = z.map(contiguous);
            Some(wflash::GpuLinearState {
                kv: view(engine, &mut pins, "initial.kv", &kv)?,
                z: match &z {
                    Some(z) => Some(view(engine, &mut pins, "initial.z", z)?),
                    None => None,
                },
            })
        }
        None => None,
    };
    flush(&q)?;
    let out = engine.linear_attention_gpu(
        shape,
        Layout::Bhsd,
        &opts,
        &views[0],
        &views[1],
        &views[2],
        initial.as_ref(),
    )?;
    let dims = [shape.batch, shape.q_heads, shape.q_len, shape.value_dim];
    let output = to_burn(engine, &q, Shape::from(dims), &out.output)?;
    Ok((output, out.state))
}

#[derive(Clone, Debug)]
struct Saved {
    engine: wflash::Engine,
    shape: wflash::Shape,
    opts: OwnedLinear,
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<Cube, 3> for LinearBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let d_o = grads.consume::<Cube>(&ops.node);
        // The plan was checked in the forward; what is left to fail is the device itself.
        let [dq, dk, dv] = backward(&ops.state, d_o)
            .unwrap_or_else(|e| panic!("wflash linear attention backward failed: {e}"));
        for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<Cube>(node.id, grad);
            }
        }
    }
}

fn backward(s: &Saved, d_o: CubeTensor) -> Result<[CubeTensor; 3]> {
    let engine = &s.engine;
    let d_o = contiguous(d_o);
    let mut pins = Pins::default();
    let views = [
        view(engine, &mut pins, "q", &s.q)?,
        view(engine, &mut pins, "k", &s.k)?,
        view(engine, &mut pins, "v", &s.v)?,
        view(engine, &mut pins, "d_o", &d_o)?,
    ];
    flush(&d_o)?;
    let g = engine.linear_attention_backward_gpu(
        &s.shape,
        Layout::Bhsd,
        &s.opts.get(),
        &views[0],
        &views[1],
        &views[2],
        None,
        &views[3],
        None,
    )?;
    let sh = &s.shape;
    let shape = |heads, dim| Shape::from([sh.batch, heads, sh.q_len, dim]);
    Ok([
        to_burn(engine, &s.q, shape(sh.q_heads, sh.head_dim), &g.dq)?,
        to_burn(engine, &s.k, shape(sh.kv_heads, sh.head_dim), &g.dk)?,
        to_burn(engine, &s.v, shape(sh.kv_heads, sh.value_dim), &g.dv)?,
    ])
}

fn tracked<C: CheckpointStrategy>(
    engine: &wflash::Engine,
    shape: wflash::Shape,
    opts: OwnedLinear,
    tensors: [Tensor<4>; 3],
) -> Result<Tensor<4>>
where
    DispatchTensor: DispatchKindConversion<Autodiff<Cube, C>>,
{
    let [q, k, v] = primitives::<Autodiff<Cube, C>, 3>(["q", "k", "v"], tensors)?;
    let prep = LinearBackward
        .prepare::<C>([q.node(), k.node(), v.node()])
        .compute_bound()
        .stateful();
    let out = match prep {
        OpsKind::Tracked(prep) => {
            let dtype = crate::bridge::wflash_dtype("q", q.primitive().dtype)?;
            // Refuse now what the backward would refuse later, inside burn's graph.
            engine.plan_linear_backward(&shape, Layout::Bhsd, &opts.get(), dtype, None, None)?;
            let (qp, kp, vp) = (
                contiguous(q.primitive().clone()),
                contiguous(k.primitive().clone()),
                contiguous(v.primitive().clone()),
            );
            let (output, _) = forward(engine, &shape, &opts, [&qp, &kp, &vp], None)?;
            let saved = Saved {
                engine: engine.clone(),
                shape,
                opts,
                q: qp,
                k: kp,
                v: vp,
            };
            prep.finish(saved, output)
        }
        OpsKind::UnTracked(prep) => {
            let (output, _) = forward(
                engine,
                &shape,
                &opts,
                [q.primitive(), k.primitive(), v.primitive()],
                None,
            )?;
            prep.finish(output)
        }
    };
    Ok(Tensor::from_primitive::<Autodiff<Cube, C>>(out))
}

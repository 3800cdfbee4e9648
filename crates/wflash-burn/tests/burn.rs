//! wflash inside burn, judged by FlashAttention's standard with burn's own materialised
//! attention as the same-precision baseline: the f64 truth is `wflash-ref`; wflash's output
//! may be at most 2× (forward) and its gradients 3× (backward) as far from it as burn's
//! `attention_fallback` is. Plus the shared device's ordering and the typed errors.

use std::sync::OnceLock;

use burn::tensor::module::attention_fallback;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, Tensor, TensorData, activation};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use wflash::{Layout, Shape};
use wflash_burn::{
    AttentionOptions, Causal, EngineOptions, Error, FeatureMap, LinearOptions, Window,
};
use wflash_conformance::judge::{Output, judge};
use wflash_conformance::reference_problem;

/// burn's wgpu device with wflash's engine on it, made once for the whole test binary (burn's
/// runtime cannot be initialised twice). No adapter fails the test unless a person allows it.
fn device() -> Option<Device> {
    static DEVICE: OnceLock<Option<Device>> = OnceLock::new();
    DEVICE
        .get_or_init(|| match wflash_burn::init(EngineOptions::default()) {
            Ok(device) => Some(device),
            Err(e) if std::env::var("WFLASH_ALLOW_NO_GPU").as_deref() == Ok("1") => {
                eprintln!("no GPU (allowed by WFLASH_ALLOW_NO_GPU=1): {e}");
                None
            }
            Err(e) => panic!("no wgpu device for burn and wflash: {e}"),
        })
        .clone()
}

#[derive(Clone, Copy, Debug)]
struct Case {
    shape: Shape,
    dtype: DType,
    causal: bool,
    scale: Option<f32>,
    softcap: Option<f32>,
    /// Sigmoid attention (with its default bias) instead of softmax.
    sigmoid: bool,
    /// A sliding window of this many keys ending at the diagonal.
    window: Option<usize>,
    /// A sink logit per query head (gpt-oss), drawn with the inputs.
    sinks: bool,
    /// The sinks as a learnable burn tensor (judged with their gradient), not host constants.
    learnable_sinks: bool,
    seed: u64,
}

/// Random normals exactly representable in `dtype`, as f32.
fn normals(rng: &mut StdRng, n: usize, dtype: DType) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x: f32 = rng.sample(StandardNormal);
            match dtype {
                DType::F16 => half::f16::from_f32(x).to_f32(),
                DType::BF16 => half::bf16::from_f32(x).to_f32(),
                _ => x,
            }
        })
        .collect()
}

fn tensor(values: &[f32], dims: [usize; 4], dtype: DType, device: &Device) -> Tensor<4> {
    let t = Tensor::<4>::from_data(TensorData::new(values.to_vec(), dims), device);
    if dtype == DType::F32 {
        t
    } else {
        t.cast(dtype)
    }
}

fn host(t: Tensor<4>) -> Vec<f64> {
    let data = t.cast(DType::F32).into_data();
    data.try_to_vec::<f32>()
        .expect("f32 data")
        .into_iter()
        .map(f64::from)
        .collect()
}

/// One call's random inputs (exactly representable in its dtype) and dO, with their dims.
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
    /// Q, K, V and O (= dO) dims, `[batch, heads, len, dim]`.
    dims: [[usize; 4]; 4],
}

impl Inputs {
    fn draw(rng: &mut StdRng, s: &Shape, dtype: DType) -> Inputs {
        Inputs {
            q: normals(rng, s.q_elems(), dtype),
            k: normals(rng, s.k_elems(), dtype),
            v: normals(rng, s.v_elems(), dtype),
            d_o: normals(rng, s.o_elems(), dtype),
            dims: [
                [s.batch, s.q_heads, s.q_len, s.head_dim],
                [s.batch, s.kv_heads, s.kv_len, s.head_dim],
                [s.batch, s.kv_heads, s.kv_len, s.value_dim],
                [s.batch, s.q_heads, s.q_len, s.value_dim],
            ],
        }
    }

    /// The f64 reference's forward and gradients of these inputs in a call of `shape` with
    /// `opts`.
    fn truth(
        &self,
        shape: &Shape,
        opts: &AttentionOptions<'_>,
    ) -> (wflash_ref::Forward, wflash_ref::backward::Grads) {
        let problem = reference_problem(shape, Layout::Bhsd, opts);
        let [q, k, v, d_o] = [&self.q, &self.k, &self.v, &self.d_o]
            .map(|x| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>());
        (
            wflash_ref::forward(&problem, &q, &k, &v),
            wflash_ref::backward::backward(&problem, &q, &k, &v, &d_o),
        )
    }
}

/// burn's materialised attention; K and V repeated over the query heads they serve (GQA),
/// through ops autodiff follows, so their gradients sum over the group.
fn burn_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, c: &Case) -> Tensor<4> {
    let s = c.shape;
    let group = s.q_heads / s.kv_heads;
    let repeat = |t: Tensor<4>| {
        let [b, h, n, d] = t.dims();
        t.reshape([b, h, 1, n * d])
            .repeat_dim(2, group)
            .reshape([b, h * group, n, d])
    };
    let opts = AttentionModuleOptions {
        scale: c.scale.map(f64::from),
        softcap: c.softcap.map(f64::from),
        is_causal: c.causal,
    };
    attention_fallback(q, repeat(k), repeat(v), None, None, opts)
}

fn wflash_options<'a>(c: &Case, sinks: Option<&'a [f32]>) -> AttentionOptions<'a> {
    let mut o = if c.sigmoid {
        AttentionOptions::sigmoid()
    } else {
        AttentionOptions::softmax()
    };
    if c.causal {
        o = o.with_causal(Causal::BottomRight);
    }
    if let Some(size) = c.window {
        o = o.with_window(Window::trailing(size));
    }
    if let Some(sinks) = sinks {
        o = o.with_sinks(sinks);
    }
    o.scale = c.scale;
    o.softcap = c.softcap;
    o
}

/// The same attention materialised in burn tensor ops (what burn's `attention_fallback` does,
/// plus what it lacks: windows, sinks, sigmoid), masks from the reference's definition.
fn burn_ops_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    c: &Case,
    sinks: Option<Tensor<1>>,
) -> Tensor<4> {
    let s = c.shape;
    let device = q.device();
    // The scale and the masks (what the sinks do not change).
    let problem = reference_problem(&s, Layout::Bhsd, &wflash_options(c, None));
    let group = s.q_heads / s.kv_heads;
    let repeat = |t: Tensor<4>| {
        let [b, h, n, d] = t.dims();
        t.reshape([b, h, 1, n * d])
            .repeat_dim(2, group)
            .reshape([b, h * group, n, d])
    };
    let mut scores = q.matmul(repeat(k).swap_dims(2, 3)) * problem.scale;
    if let Some(cap) = c.softcap {
        scores = (scores / cap).tanh() * cap;
    }
    let hidden: Vec<bool> = (0..s.q_len)
        .flat_map(|i| (0..s.kv_len).map(move |j| (i, j)))
        .map(|(i, j)| !problem.is_visible(i, j))
        .collect();
    let hidden =
        Tensor::<4, Bool>::from_data(TensorData::new(hidden, [1, 1, s.q_len, s.kv_len]), &device)
            .repeat_dim(0, s.batch)
            .repeat_dim(1, s.q_heads);
    let probabilities = if let Some(bias) = problem.sigmoid_bias() {
        activation::sigmoid(scores + bias).mask_fill(hidden, 0.0)
    } else if let Some(sinks) = sinks {
        let sink = (sinks.reshape([1, s.q_heads, 1, 1]).cast(c.dtype))
            .repeat_dim(0, s.batch)
            .repeat_dim(2, s.q_len);
        let with_sink = Tensor::cat(vec![scores.mask_fill(hidden, f32::NEG_INFINITY), sink], 3);
        activation::softmax(with_sink, 3).narrow(3, 0, s.kv_len)
    } else {
        activation::softmax(scores.mask_fill(hidden, f32::NEG_INFINITY), 3)
    };
    probabilities.matmul(repeat(v))
}

/// `Shape` from its fields in order: batch, q_heads, kv_heads, q_len, kv_len, head_dim,
/// value_dim.
fn shape(
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    q_len: usize,
    kv_len: usize,
    head_dim: usize,
    value_dim: usize,
) -> Shape {
    Shape {
        batch,
        q_heads,
        kv_heads,
        q_len,
        kv_len,
        head_dim,
        value_dim,
    }
}

fn cases() -> Vec<Case> {
    let base = Case {
        shape: shape(2, 4, 4, 70, 70, 32, 32),
        dtype: DType::F32,
        causal: true,
        scale: None,
        softcap: None,
        sigmoid: false,
        window: None,
        sinks: false,
        learnable_sinks: false,
        seed: 1,
    };
    vec![
        base,
        Case {
            shape: shape(1, 8, 2, 33, 97, 64, 64),
            seed: 2,
            ..base
        },
        Case {
            shape: shape(2, 2, 1, 50, 50, 16, 24),
            causal: false,
            scale: Some(0.3),
            softcap: Some(5.0),
            seed: 3,
            ..base
        },
        Case {
            dtype: DType::F16,
            seed: 4,
            ..base
        },
        Case {
            shape: shape(1, 8, 2, 45, 45, 32, 32),
            sigmoid: true,
            seed: 5,
            ..base
        },
        Case {
            window: Some(9),
            seed: 6,
            ..base
        },
        Case {
            shape: shape(1, 4, 2, 40, 64, 32, 32),
            sinks: true,
            dtype: DType::F16,
            seed: 7,
            ..base
        },
        Case {
            shape: shape(2, 2, 2, 37, 37, 16, 16),
            sigmoid: true,
            causal: false,
            softcap: Some(4.0),
            window: Some(12),
            seed: 8,
            ..base
        },
        Case {
            shape: shape(2, 4, 2, 40, 40, 32, 32),
            sinks: true,
            learnable_sinks: true,
            window: Some(17),
            seed: 9,
            ..base
        },
    ]
}

#[test]
fn forward_and_gradients_match_burns_materialised_attention() {
    let Some(device) = device() else { return };
    let device = device.autodiff();
    for c in cases() {
        let s = c.shape;
        let mut rng = StdRng::seed_from_u64(c.seed);
        let inputs = Inputs::draw(&mut rng, &s, c.dtype);
        let Inputs { q, k, v, d_o, .. } = &inputs;
        let [q_dims, k_dims, v_dims, o_dims] = inputs.dims;
        let sinks = normals(&mut rng, s.q_heads, c.dtype);

        // Both paths: o, and the gradients of sum(o · dO), so dO reaches the backward.
        let run = |wflash: bool| {
            let leaf = |x: &[f32], dims| tensor(x, dims, c.dtype, &device).require_grad();
            let (qt, kt, vt) = (leaf(q, q_dims), leaf(k, k_dims), leaf(v, v_dims));
            let sinks_t = c.sinks.then(|| {
                let t =
                    Tensor::<1>::from_data(TensorData::new(sinks.clone(), [s.q_heads]), &device);
                if c.learnable_sinks {
                    t.require_grad()
                } else {
                    t
                }
            });
            let o = if wflash && c.learnable_sinks {
                let modifiers = wflash_burn::Modifiers {
                    sinks: sinks_t.clone(),
                    ..Default::default()
                };
                let opts = wflash_options(&c, None);
                wflash_burn::attention_with(qt.clone(), kt.clone(), vt.clone(), modifiers, &opts)
                    .unwrap_or_else(|e| panic!("{c:?}: {e}"))
            } else if wflash {
                let opts = wflash_options(&c, c.sinks.then_some(&sinks[..]));
                wflash_burn::attention(qt.clone(), kt.clone(), vt.clone(), &opts)
                    .unwrap_or_else(|e| panic!("{c:?}: {e}"))
            } else if c.sigmoid || c.window.is_some() || c.sinks {
                burn_ops_attention(qt.clone(), kt.clone(), vt.clone(), &c, sinks_t.clone())
            } else {
                burn_attention(qt.clone(), kt.clone(), vt.clone(), &c)
            };
            let weights = tensor(d_o, o_dims, c.dtype, &device);
            let grads = (o.clone() * weights).sum().backward();
            let grad = |t: &Tensor<4>| host(t.grad(&grads).expect("a gradient"));
            let d_sinks = (sinks_t.filter(|_| c.learnable_sinks)).map(|t| {
                host(
                    t.grad(&grads)
                        .expect("a sinks gradient")
                        .reshape([1, 1, 1, s.q_heads]),
                )
            });
            (host(o), grad(&qt), grad(&kt), grad(&vt), d_sinks)
        };
        let (o, dq, dk, dv, d_sinks) = run(true);
        let (naive_o, naive_dq, naive_dk, naive_dv, naive_d_sinks) = run(false);

        let truth_opts = wflash_options(&c, c.sinks.then_some(&sinks[..]));
        let (truth, grads) = inputs.truth(&s, &truth_opts);
        let mut outputs = vec![
            Output::forward("O", o, &truth.output, &naive_o),
            Output::backward("dQ", dq, &grads.dq, &naive_dq),
            Output::backward("dK", dk, &grads.dk, &naive_dk),
            Output::backward("dV", dv, &grads.dv, &naive_dv),
        ];
        if let (Some(got), Some(naive)) = (d_sinks, &naive_d_sinks) {
            let truth = grads.d_sinks.as_deref().expect("the reference's dSinks");
            outputs.push(Output::backward("dSinks", got, truth, naive));
        }
        let verdict = judge(&c, outputs).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{c:?}: ratio {:.3}", verdict.ratio);
    }
}

#[test]
fn burns_pending_work_runs_before_wflash_and_wflash_before_burns_next() {
    let Some(device) = device() else { return };
    let s = Shape::mha(1, 2, 40, 16);
    let mut rng = StdRng::seed_from_u64(7);
    let x = normals(&mut rng, s.q_elems(), DType::F32);
    let k = normals(&mut rng, s.k_elems(), DType::F32);
    let v = normals(&mut rng, s.v_elems(), DType::F32);
    let dims = [s.batch, s.q_heads, s.q_len, s.head_dim];
    // Q comes out of burn kernels recorded but not yet submitted; the output goes straight
    // into another burn kernel. Either ordering wrong reads stale or unwritten memory.
    let q = tensor(&x, dims, DType::F32, &device) * 2.0 + 1.0;
    let opts = AttentionOptions::softmax().with_causal(Causal::TopLeft);
    let o = wflash_burn::attention(
        q,
        tensor(&k, dims, DType::F32, &device),
        tensor(&v, dims, DType::F32, &device),
        &opts,
    )
    .unwrap();
    let got = host(o * 3.0);

    let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    let q64: Vec<f64> = x.iter().map(|&a| f64::from(a * 2.0 + 1.0)).collect();
    let problem = reference_problem(&s, Layout::Bhsd, &opts);
    let truth = wflash_ref::forward(&problem, &q64, &wide(&k), &wide(&v));
    for (g, t) in got.iter().zip(&truth.output) {
        assert!((g - 3.0 * t).abs() < 1e-4, "got {g}, want {}", 3.0 * t);
    }
}

#[test]
fn what_wflash_refuses_is_a_typed_error() {
    let Some(device) = device() else { return };
    let t = |dims: [usize; 4]| Tensor::<4>::zeros(dims, &device);
    let opts = AttentionOptions::softmax();
    let err = wflash_burn::attention(t([1, 2, 8, 16]), t([1, 2, 9, 16]), t([1, 2, 8, 16]), &opts)
        .unwrap_err();
    assert!(matches!(err, Error::Shape { tensor: "v", .. }), "{err:?}");
    let err = wflash_burn::attention(t([1, 3, 8, 16]), t([1, 2, 8, 16]), t([1, 2, 8, 16]), &opts)
        .unwrap_err();
    assert!(
        matches!(err, Error::Wflash(wflash::Error::HeadsNotDivisible { .. })),
        "{err:?}"
    );
    let err = wflash_burn::attention(
        t([1, 2, 8, 1024]),
        t([1, 2, 8, 1024]),
        t([1, 2, 8, 16]),
        &opts,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Wflash(wflash::Error::HeadDimUnsupported { .. })),
        "{err:?}"
    );
    let mask = [true; 8];
    let err = wflash_burn::attention(
        t([1, 2, 8, 16]),
        t([1, 2, 8, 16]),
        t([1, 2, 8, 16]),
        &AttentionOptions::softmax().with_key_mask(&mask),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Wflash(wflash::Error::Unsupported { .. })),
        "{err:?}"
    );
    // A bias or mask whose shape is not [batch | 1, heads | 1, q_len, kv_len].
    let err = wflash_burn::attention_with(
        t([2, 2, 8, 16]),
        t([2, 2, 8, 16]),
        t([2, 2, 8, 16]),
        wflash_burn::Modifiers {
            bias: Some(t([2, 2, 8, 9])),
            ..Default::default()
        },
        &opts,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Shape { tensor: "bias", .. }),
        "{err:?}"
    );
    let mask = Tensor::<4, Bool>::empty([3, 1, 8, 8], &device);
    let err = wflash_burn::attention_with(
        t([2, 2, 8, 16]),
        t([2, 2, 8, 16]),
        t([2, 2, 8, 16]),
        wflash_burn::Modifiers {
            mask: Some(mask),
            ..Default::default()
        },
        &opts,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Shape { tensor: "mask", .. }),
        "{err:?}"
    );
    // Sinks: one per query head; not in the options and as a tensor at once; not with sigmoid.
    let sinks = |n: usize| wflash_burn::Modifiers {
        sinks: Some(Tensor::<1>::zeros([n], &device)),
        ..Default::default()
    };
    let qkv = || (t([1, 2, 8, 16]), t([1, 2, 8, 16]), t([1, 2, 8, 16]));
    let (q, k, v) = qkv();
    let err = wflash_burn::attention_with(q, k, v, sinks(3), &opts).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shape {
                tensor: "sinks",
                ..
            }
        ),
        "{err:?}"
    );
    let host_sinks = [0.5, 0.25];
    for opts in [opts.with_sinks(&host_sinks), AttentionOptions::sigmoid()] {
        let (q, k, v) = qkv();
        let err = wflash_burn::attention_with(q, k, v, sinks(2), &opts).unwrap_err();
        assert!(
            matches!(err, Error::Wflash(wflash::Error::Unsupported { .. })),
            "{err:?}"
        );
    }
}

/// A call with burn's `mask` and `attn_bias`: their shapes (`[batch | 1, heads | 1]`; `None`
/// for none), whether the bias is learnable.
#[derive(Clone, Copy, Debug)]
struct MaskedCase {
    shape: Shape,
    dtype: DType,
    causal: bool,
    mask: Option<[usize; 2]>,
    bias: Option<[usize; 2]>,
    learnable_bias: bool,
    seed: u64,
}

#[test]
fn mask_and_bias_tensors_match_burns_attention_with_the_bias_gradient() {
    let Some(device) = device() else { return };
    let plain = device.clone();
    let device = device.autodiff();
    let cases = [
        MaskedCase {
            shape: shape(2, 4, 4, 40, 52, 32, 32),
            dtype: DType::F32,
            causal: false,
            mask: Some([2, 1]),
            bias: Some([2, 4]),
            learnable_bias: true,
            seed: 11,
        },
        MaskedCase {
            shape: shape(2, 4, 2, 33, 33, 16, 24),
            dtype: DType::F32,
            causal: true,
            mask: None,
            bias: Some([1, 4]),
            learnable_bias: true,
            seed: 12,
        },
        MaskedCase {
            shape: shape(1, 2, 2, 48, 48, 32, 32),
            dtype: DType::F16,
            causal: true,
            mask: Some([1, 1]),
            bias: None,
            learnable_bias: false,
            seed: 13,
        },
        MaskedCase {
            shape: shape(2, 2, 2, 30, 30, 16, 16),
            dtype: DType::F32,
            causal: false,
            mask: Some([2, 2]),
            bias: Some([2, 2]),
            learnable_bias: false,
            seed: 14,
        },
    ];
    for c in cases {
        let s = c.shape;
        let mut rng = StdRng::seed_from_u64(c.seed);
        let inputs = Inputs::draw(&mut rng, &s, c.dtype);
        let Inputs { q, k, v, d_o, .. } = &inputs;
        let [q_dims, k_dims, v_dims, o_dims] = inputs.dims;
        let matrix = s.q_len * s.kv_len;
        let dims = |[b, h]: [usize; 2]| [b, h, s.q_len, s.kv_len];
        let bias = c
            .bias
            .map(|[b, h]| normals(&mut rng, b * h * matrix, DType::F32));
        // About a quarter of the keys hidden; key 0 never, so no row is empty.
        let mask = c.mask.map(|[b, h]| {
            (0..b * h * matrix)
                .map(|i| i % s.kv_len != 0 && rng.random_bool(0.25))
                .collect::<Vec<bool>>()
        });

        let causal = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: c.causal,
        };
        let opts = if c.causal {
            AttentionOptions::softmax().with_causal(Causal::TopLeft)
        } else {
            AttentionOptions::softmax()
        };
        let run = |wflash: bool, device: &Device| {
            let learnable = |t: Tensor<4>, learns: bool| {
                if learns && device.is_autodiff() {
                    t.require_grad()
                } else {
                    t
                }
            };
            let leaf = |x: &[f32], dims| learnable(tensor(x, dims, c.dtype, device), true);
            let (qt, kt, vt) = (leaf(q, q_dims), leaf(k, k_dims), leaf(v, v_dims));
            let bt = (bias.as_ref()).map(|b| {
                let t = tensor(b, dims(c.bias.unwrap_or_default()), DType::F32, device);
                learnable(t, c.learnable_bias)
            });
            let mt = (mask.as_ref()).map(|m| {
                Tensor::<4, Bool>::from_data(
                    TensorData::new(m.clone(), dims(c.mask.unwrap_or_default())),
                    device,
                )
            });
            let o = if wflash {
                wflash_burn::attention_with(
                    qt.clone(),
                    kt.clone(),
                    vt.clone(),
                    wflash_burn::Modifiers {
                        mask: mt,
                        bias: bt.clone(),
                        sinks: None,
                    },
                    &opts,
                )
                .unwrap_or_else(|e| panic!("{c:?}: {e}"))
            } else {
                let group = s.q_heads / s.kv_heads;
                let repeat = |t: Tensor<4>| {
                    let [b, h, n, d] = t.dims();
                    t.reshape([b, h, 1, n * d])
                        .repeat_dim(2, group)
                        .reshape([b, h * group, n, d])
                };
                let full = |t: Tensor<4>| {
                    let [b, h, ..] = t.dims();
                    t.repeat_dim(0, s.batch / b).repeat_dim(1, s.q_heads / h)
                };
                let mt = mt.map(|m| {
                    let [b, h, ..] = m.dims();
                    m.repeat_dim(0, s.batch / b).repeat_dim(1, s.q_heads / h)
                });
                let bt = bt.clone().map(|b| full(b.cast(c.dtype)));
                attention_fallback(
                    qt.clone(),
                    repeat(kt.clone()),
                    repeat(vt.clone()),
                    mt,
                    bt,
                    causal,
                )
            };
            let out = host(o.clone());
            if !device.is_autodiff() {
                return (out, None);
            }
            let weights = tensor(d_o, o_dims, c.dtype, device);
            let grads = (o * weights).sum().backward();
            let grad = |t: &Tensor<4>| host(t.grad(&grads).expect("a gradient"));
            let d_bias = bt.filter(|_| c.learnable_bias).map(|b| grad(&b));
            (out, Some((grad(&qt), grad(&kt), grad(&vt), d_bias)))
        };
        let (o, grads) = run(true, &device);
        let (dq, dk, dv, d_bias) = grads.expect("autodiff gradients");
        let (naive_o, naive_grads) = run(false, &device);
        let (naive_dq, naive_dk, naive_dv, naive_d_bias) = naive_grads.expect("autodiff gradients");
        // The plain device runs the same forward: bitwise the same output.
        let (plain_o, _) = run(true, &plain);
        assert!(
            plain_o
                .iter()
                .zip(&o)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{c:?}: the plain device's output differs from the autodiff device's"
        );

        // The truth: one additive bias of the combined shape, -inf where masked.
        let [bb, bh] = [0, 1].map(|axis| {
            c.mask
                .map_or(1, |m| m[axis])
                .max(c.bias.map_or(1, |b| b[axis]))
        });
        let additive: Vec<f32> = (0..bb * bh * matrix)
            .map(|i| {
                let (batch, head, cell) = (i / (bh * matrix), i / matrix % bh, i % matrix);
                let at = |[b, h]: [usize; 2]| (batch % b * h + head % h) * matrix + cell;
                let hidden = c
                    .mask
                    .is_some_and(|m| mask.as_ref().is_some_and(|v| v[at(m)]));
                let value = c
                    .bias
                    .map_or(0.0, |b| bias.as_ref().map_or(0.0, |v| v[at(b)]));
                if hidden { f32::NEG_INFINITY } else { value }
            })
            .collect();
        let truth_opts = opts.with_bias(wflash::Bias::f32(&additive, bb, bh));
        let (truth, truth_grads) = inputs.truth(&s, &truth_opts);
        let mut outputs = vec![
            Output::forward("O", o, &truth.output, &naive_o),
            Output::backward("dQ", dq, &truth_grads.dq, &naive_dq),
            Output::backward("dK", dk, &truth_grads.dk, &naive_dk),
            Output::backward("dV", dv, &truth_grads.dv, &naive_dv),
        ];
        if c.learnable_bias {
            let truth_d_bias = truth_grads
                .d_bias
                .as_deref()
                .expect("the reference's dBias");
            outputs.push(Output::backward(
                "dBias",
                d_bias.expect("wflash's dBias"),
                truth_d_bias,
                naive_d_bias.as_deref().expect("burn's dBias"),
            ));
        } else {
            assert!(d_bias.is_none());
        }
        let verdict = judge(&c, outputs).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{c:?}: ratio {:.3}", verdict.ratio);
    }
}

#[derive(Clone, Copy, Debug)]
struct LinearCase {
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    len: usize,
    key_dim: usize,
    value_dim: usize,
    dtype: DType,
    relu: bool,
    decay: bool,
    normalize: bool,
    seed: u64,
}

impl LinearCase {
    fn shape(&self) -> Shape {
        Shape {
            batch: self.batch,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            q_len: self.len,
            kv_len: self.len,
            head_dim: self.key_dim,
            value_dim: self.value_dim,
        }
    }
    fn decays(&self) -> Option<Vec<f32>> {
        self.decay
            .then(|| wflash_burn::lightning_decay(self.q_heads))
    }
    fn options<'a>(&self, decay: Option<&'a [f32]>) -> LinearOptions<'a> {
        LinearOptions {
            feature_map: if self.relu {
                FeatureMap::Relu
            } else {
                FeatureMap::Identity
            },
            decay,
            normalize: self.normalize,
            ..LinearOptions::causal()
        }
    }
    fn problem(&self, decay: Option<&[f32]>) -> wflash_ref::linear::LinearProblem {
        wflash_ref::linear::LinearProblem {
            feature_map: if self.relu {
                wflash_ref::linear::FeatureMap::Relu
            } else {
                wflash_ref::linear::FeatureMap::Identity
            },
            decay: decay.map(|d| d.iter().map(|&x| f64::from(x)).collect()),
            normalize: self.normalize,
            ..wflash_ref::linear::LinearProblem::new(
                self.batch,
                self.q_heads,
                self.kv_heads,
                self.len,
                self.key_dim,
                self.value_dim,
                wflash_ref::Layout::Bhsd,
            )
        }
    }
}

/// Causal linear attention materialised in burn ops: `(scale · φ(q)φ(k)ᵀ ∘ W) v`, with
/// `W_ij = λ^{i−j}` for `j ≤ i` (0 above the diagonal), divided by its row sums plus eps when
/// it normalises.
fn burn_ops_linear(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, c: &LinearCase) -> Tensor<4> {
    let device = q.device();
    let problem = c.problem(c.decays().as_deref());
    let group = c.q_heads / c.kv_heads;
    let repeat = |t: Tensor<4>| {
        let [b, h, n, d] = t.dims();
        t.reshape([b, h, 1, n * d])
            .repeat_dim(2, group)
            .reshape([b, h * group, n, d])
    };
    let phi = |t: Tensor<4>| if c.relu { activation::relu(t) } else { t };
    let n = c.len;
    let weights: Vec<f32> = (0..c.q_heads)
        .flat_map(|h| (0..n).flat_map(move |i| (0..n).map(move |j| (h, i, j))))
        .map(|(h, i, j)| {
            let decay = problem.decay.as_ref().map_or(1.0, |d| d[h]);
            if j <= i {
                decay.powi((i - j) as i32) as f32
            } else {
                0.0
            }
        })
        .collect();
    let weights = Tensor::<4>::from_data(TensorData::new(weights, [1, c.q_heads, n, n]), &device)
        .cast(c.dtype)
        .repeat_dim(0, c.batch);
    let scores = phi(q).matmul(repeat(phi(k)).swap_dims(2, 3)) * problem.scale * weights;
    let numerator = scores.clone().matmul(repeat(v));
    if c.normalize {
        numerator / (scores.sum_dim(3) + problem.eps)
    } else {
        numerator
    }
}

#[test]
fn linear_attention_and_its_gradients_match_burn_ops_materialised() {
    let Some(device) = device() else { return };
    let device = device.autodiff();
    let base = LinearCase {
        batch: 2,
        q_heads: 4,
        kv_heads: 2,
        len: 70,
        key_dim: 16,
        value_dim: 32,
        dtype: DType::F32,
        relu: false,
        decay: true,
        normalize: false,
        seed: 11,
    };
    let cases = [
        base,
        LinearCase {
            relu: true,
            decay: false,
            normalize: true,
            kv_heads: 4,
            seed: 12,
            ..base
        },
        LinearCase {
            dtype: DType::F16,
            len: 45,
            seed: 13,
            ..base
        },
    ];
    for c in cases {
        let s = c.shape();
        let mut rng = StdRng::seed_from_u64(c.seed);
        let dims = |heads, dim| [c.batch, heads, c.len, dim];
        let q = normals(&mut rng, s.q_elems(), c.dtype);
        let k = normals(&mut rng, s.k_elems(), c.dtype);
        let v = normals(&mut rng, s.v_elems(), c.dtype);
        let d_o = normals(&mut rng, s.o_elems(), c.dtype);
        let decays = c.decays();
        let run = |wflash: bool| {
            let leaf = |x: &[f32], dims| tensor(x, dims, c.dtype, &device).require_grad();
            let qt = leaf(&q, dims(c.q_heads, c.key_dim));
            let kt = leaf(&k, dims(c.kv_heads, c.key_dim));
            let vt = leaf(&v, dims(c.kv_heads, c.value_dim));
            let o = if wflash {
                let opts = c.options(decays.as_deref());
                wflash_burn::linear_attention(qt.clone(), kt.clone(), vt.clone(), &opts)
                    .unwrap_or_else(|e| panic!("{c:?}: {e}"))
            } else {
                burn_ops_linear(qt.clone(), kt.clone(), vt.clone(), &c)
            };
            let weights = tensor(&d_o, dims(c.q_heads, c.value_dim), c.dtype, &device);
            let grads = (o.clone() * weights).sum().backward();
            let grad = |t: &Tensor<4>| host(t.grad(&grads).expect("a gradient"));
            (host(o), grad(&qt), grad(&kt), grad(&vt))
        };
        let (o, dq, dk, dv) = run(true);
        let (naive_o, naive_dq, naive_dk, naive_dv) = run(false);

        let problem = c.problem(decays.as_deref());
        let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
        let (q64, k64, v64, d_o64) = (wide(&q), wide(&k), wide(&v), wide(&d_o));
        let truth = wflash_ref::linear::linear_forward(&problem, &q64, &k64, &v64, None);
        let grads = wflash_ref::linear::backward::linear_backward(
            &problem, &q64, &k64, &v64, None, &d_o64, None,
        );
        let verdict = judge(
            &c,
            vec![
                Output::forward("O", o, &truth.output, &naive_o),
                Output::backward("dQ", dq, &grads.dq, &naive_dq),
                Output::backward("dK", dk, &grads.dk, &naive_dk),
                Output::backward("dV", dv, &grads.dv, &naive_dv),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{c:?}: ratio {:.3}", verdict.ratio);
    }
}

#[test]
fn linear_state_carries_a_sequence_across_calls() {
    let Some(device) = device() else { return };
    let c = LinearCase {
        batch: 1,
        q_heads: 2,
        kv_heads: 2,
        len: 48,
        key_dim: 16,
        value_dim: 16,
        dtype: DType::F32,
        relu: true,
        decay: true,
        normalize: true,
        seed: 21,
    };
    let s = c.shape();
    let mut rng = StdRng::seed_from_u64(c.seed);
    let (q, k, v) = (
        normals(&mut rng, s.q_elems(), c.dtype),
        normals(&mut rng, s.k_elems(), c.dtype),
        normals(&mut rng, s.v_elems(), c.dtype),
    );
    let decays = c.decays();
    let opts = c.options(decays.as_deref());
    let whole = |x: &[f32]| tensor(x, [1, 2, c.len, 16], DType::F32, &device);
    // Two calls of 30 and 18 tokens, the state carried from the first to the second.
    let half = |t: Tensor<4>, range: std::ops::Range<usize>| t.narrow(2, range.start, range.len());
    let (first, state) = wflash_burn::linear_attention_with_state(
        half(whole(&q), 0..30),
        half(whole(&k), 0..30),
        half(whole(&v), 0..30),
        &opts,
        None,
    )
    .unwrap();
    let (second, last) = wflash_burn::linear_attention_with_state(
        half(whole(&q), 30..48),
        half(whole(&k), 30..48),
        half(whole(&v), 30..48),
        &opts,
        Some(&state),
    )
    .unwrap();
    let got = host(Tensor::cat(vec![first, second], 2));
    let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    let truth = wflash_ref::linear::linear_forward(
        &c.problem(decays.as_deref()),
        &wide(&q),
        &wide(&k),
        &wide(&v),
        None,
    );
    for (g, t) in got.iter().zip(&truth.output) {
        assert!((g - t).abs() < 1e-4 * t.abs().max(1.0), "got {g}, want {t}");
    }
    let kv = host(last.kv);
    for (g, t) in kv.iter().zip(&truth.state.kv) {
        assert!(
            (g - t).abs() < 1e-4 * t.abs().max(1.0),
            "state: got {g}, want {t}"
        );
    }
    assert!(last.z.is_some());

    let autodiff = device.autodiff();
    let t = Tensor::<4>::zeros([1, 2, 8, 16], &autodiff);
    let err =
        wflash_burn::linear_attention_with_state(t.clone(), t.clone(), t, &opts, None).unwrap_err();
    assert!(
        matches!(err, Error::Wflash(wflash::Error::Unsupported { .. })),
        "{err:?}"
    );
}

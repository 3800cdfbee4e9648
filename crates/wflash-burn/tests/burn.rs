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
use wflash_burn::{AttentionOptions, Causal, EngineOptions, Error, Window};
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

fn wflash_options<'a>(c: &Case, sinks: &'a [f32]) -> AttentionOptions<'a> {
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
    if c.sinks {
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
    sinks: &[f32],
) -> Tensor<4> {
    let s = c.shape;
    let device = q.device();
    let problem = reference_problem(&s, Layout::Bhsd, &wflash_options(c, sinks));
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
    } else if c.sinks {
        let sink = Tensor::<4>::from_data(
            TensorData::new(sinks.to_vec(), [1, s.q_heads, 1, 1]),
            &device,
        )
        .cast(c.dtype)
        .repeat_dim(0, s.batch)
        .repeat_dim(2, s.q_len);
        let with_sink = Tensor::cat(vec![scores.mask_fill(hidden, f32::NEG_INFINITY), sink], 3);
        activation::softmax(with_sink, 3).narrow(3, 0, s.kv_len)
    } else {
        activation::softmax(scores.mask_fill(hidden, f32::NEG_INFINITY), 3)
    };
    probabilities.matmul(repeat(v))
}

fn cases() -> Vec<Case> {
    let shape = |batch, q_heads, kv_heads, q_len, kv_len, head_dim, value_dim| Shape {
        batch,
        q_heads,
        kv_heads,
        q_len,
        kv_len,
        head_dim,
        value_dim,
    };
    let base = Case {
        shape: shape(2, 4, 4, 70, 70, 32, 32),
        dtype: DType::F32,
        causal: true,
        scale: None,
        softcap: None,
        sigmoid: false,
        window: None,
        sinks: false,
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
    ]
}

#[test]
fn forward_and_gradients_match_burns_materialised_attention() {
    let Some(device) = device() else { return };
    let device = device.autodiff();
    for c in cases() {
        let s = c.shape;
        let mut rng = StdRng::seed_from_u64(c.seed);
        let q_dims = [s.batch, s.q_heads, s.q_len, s.head_dim];
        let k_dims = [s.batch, s.kv_heads, s.kv_len, s.head_dim];
        let v_dims = [s.batch, s.kv_heads, s.kv_len, s.value_dim];
        let o_dims = [s.batch, s.q_heads, s.q_len, s.value_dim];
        let q = normals(&mut rng, s.q_elems(), c.dtype);
        let k = normals(&mut rng, s.k_elems(), c.dtype);
        let v = normals(&mut rng, s.v_elems(), c.dtype);
        let d_o = normals(&mut rng, s.o_elems(), c.dtype);
        let sinks = normals(&mut rng, s.q_heads, c.dtype);

        // Both paths: o, and the gradients of sum(o · dO), so dO reaches the backward.
        let run = |wflash: bool| {
            let leaf = |x: &[f32], dims| tensor(x, dims, c.dtype, &device).require_grad();
            let (qt, kt, vt) = (leaf(&q, q_dims), leaf(&k, k_dims), leaf(&v, v_dims));
            let o = if wflash {
                let opts = wflash_options(&c, &sinks);
                wflash_burn::attention(qt.clone(), kt.clone(), vt.clone(), &opts)
                    .unwrap_or_else(|e| panic!("{c:?}: {e}"))
            } else if c.sigmoid || c.window.is_some() || c.sinks {
                burn_ops_attention(qt.clone(), kt.clone(), vt.clone(), &c, &sinks)
            } else {
                burn_attention(qt.clone(), kt.clone(), vt.clone(), &c)
            };
            let weights = tensor(&d_o, o_dims, c.dtype, &device);
            let grads = (o.clone() * weights).sum().backward();
            let grad = |t: &Tensor<4>| host(t.grad(&grads).expect("a gradient"));
            (host(o), grad(&qt), grad(&kt), grad(&vt))
        };
        let (o, dq, dk, dv) = run(true);
        let (naive_o, naive_dq, naive_dk, naive_dv) = run(false);

        let problem = reference_problem(&s, Layout::Bhsd, &wflash_options(&c, &sinks));
        let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
        let (q64, k64, v64, d_o64) = (wide(&q), wide(&k), wide(&v), wide(&d_o));
        let truth = wflash_ref::forward(&problem, &q64, &k64, &v64);
        let grads = wflash_ref::backward::backward(&problem, &q64, &k64, &v64, &d_o64);
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
}

//! The public API beyond the grid: typed errors for bad input (each checked by variant),
//! splitting over batch under small buffer limits, the GPU-resident path and the async path.

use wflash::tuning::{TunedTile, TuningFile};
use wflash::{
    AttentionOptions, Bias, Causal, DType, Engine, EngineOptions, Error, F16Path, Family, GpuBias,
    GpuModifiers, Layout, Shape, TileConfig, TuningSource, wgpu,
};
use wflash_conformance::{Case, Path, custom_engine, engine, run_case};

fn shape() -> Shape {
    Shape {
        batch: 2,
        q_heads: 4,
        kv_heads: 2,
        q_len: 33,
        kv_len: 47,
        head_dim: 24,
        value_dim: 17,
    }
}

fn inputs(s: &Shape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let f = |n: usize, m: usize| {
        (0..n)
            .map(|i| ((i * m % 97) as f32 - 48.0) / 48.0)
            .collect::<Vec<f32>>()
    };
    (f(s.q_elems(), 7), f(s.k_elems(), 11), f(s.v_elems(), 13))
}

fn call(engine: &Engine, s: &Shape, opts: &AttentionOptions) -> Result<(), Error> {
    let (q, k, v) = inputs(s);
    engine
        .attention_blocking(s, Layout::Bhsd, opts, &q, &k, &v)
        .map(|_| ())
}

#[test]
fn bad_input_is_a_typed_error() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let opts = AttentionOptions::softmax();
    let s = shape();
    let (q, k, v) = inputs(&s);
    let err = engine
        .attention_blocking(&s, Layout::Bhsd, &opts, &q[1..], &k, &v)
        .unwrap_err();
    assert!(
        matches!(err, Error::LengthMismatch { tensor: "q", .. }),
        "{err}"
    );
    let err = engine
        .attention_blocking(&s, Layout::Bhsd, &opts, &q, &k, &v[..3])
        .unwrap_err();
    assert!(
        matches!(err, Error::LengthMismatch { tensor: "v", .. }),
        "{err}"
    );

    for dim in [
        "batch",
        "q_heads",
        "kv_heads",
        "q_len",
        "kv_len",
        "head_dim",
        "value_dim",
    ] {
        let mut z = s;
        match dim {
            "batch" => z.batch = 0,
            "q_heads" => z.q_heads = 0,
            "kv_heads" => z.kv_heads = 0,
            "q_len" => z.q_len = 0,
            "kv_len" => z.kv_len = 0,
            "head_dim" => z.head_dim = 0,
            _ => z.value_dim = 0,
        }
        let err = call(engine, &z, &opts).unwrap_err();
        assert!(
            matches!(err, Error::ZeroDimension { dim: d } if d == dim),
            "{dim}: {err}"
        );
    }

    let err = call(
        engine,
        &Shape {
            q_heads: 3,
            kv_heads: 2,
            ..s
        },
        &opts,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::HeadsNotDivisible {
                q_heads: 3,
                kv_heads: 2
            }
        ),
        "{err}"
    );
    let err = call(engine, &Shape { head_dim: 257, ..s }, &opts).unwrap_err();
    assert!(
        matches!(
            err,
            Error::HeadDimUnsupported {
                dim: "head_dim",
                got: 257,
                max: 256
            }
        ),
        "{err}"
    );
    let err = call(
        engine,
        &Shape {
            value_dim: 300,
            ..s
        },
        &opts,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::HeadDimUnsupported {
                dim: "value_dim",
                got: 300,
                ..
            }
        ),
        "{err}"
    );
    for scale in [f32::NAN, f32::INFINITY, 0.0] {
        let err = call(engine, &s, &opts.with_scale(scale)).unwrap_err();
        assert!(matches!(err, Error::InvalidScale { .. }), "{err}");
    }
    for bias in [f32::NAN, f32::NEG_INFINITY] {
        let err = call(engine, &s, &AttentionOptions::sigmoid_with_bias(bias)).unwrap_err();
        assert!(matches!(err, Error::InvalidBias { .. }), "{err}");
    }

    // GPU-resident tensors of the wrong type or length.
    let (q, k, v) = inputs(&s);
    let qt = engine.upload(&q).unwrap();
    let kt = engine.upload(&k).unwrap();
    let vt = engine.upload(&v).unwrap();
    let k16 = engine
        .upload(
            &k.iter()
                .map(|&x| half::f16::from_f32(x))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let err = engine
        .attention_gpu(&s, Layout::Bhsd, &opts, &qt, &k16, &vt)
        .unwrap_err();
    assert!(
        matches!(err, Error::DTypeMismatch { tensor: "k", .. }),
        "{err}"
    );
    let err = engine
        .attention_gpu(&s, Layout::Bhsd, &opts, &qt, &vt, &vt)
        .unwrap_err();
    assert!(
        matches!(err, Error::LengthMismatch { tensor: "k", .. }),
        "{err}"
    );
    assert!(
        engine
            .attention_gpu(&s, Layout::Bhsd, &opts, &qt, &kt, &vt)
            .is_ok()
    );
}

#[test]
fn too_large_problems_split_over_batch_or_fail_with_the_limit_named() {
    if engine(Path::F32).is_none() {
        return;
    }
    // 64 KiB bindings: one batch element of this shape needs 4·33·24·4 = 12.7 KiB of Q; the whole
    // problem of batch 12 does not fit, so the call runs as several dispatches.
    let small = wflash_conformance::buffer_limited_engine(64 << 10);
    let s = Shape {
        batch: 12,
        ..shape()
    };
    let plan = small
        .plan(&s, Layout::Bhsd, &AttentionOptions::softmax(), DType::F32)
        .unwrap();
    assert!(
        plan.batch_per_dispatch < s.batch && plan.batch_per_dispatch > 0,
        "{plan:?}"
    );
    // The split result must equal the reference (checked like any conformance case).
    let case = Case {
        layout: Layout::Bshd,
        causal: Some(Causal::BottomRight),
        ..Case::softmax(s, Path::F32, 77)
    };
    let outcome = wflash_conformance::run_case_on(&small, &case).expect("split call conforms");
    assert!(outcome.ratio <= 1.0);

    // One batch element that cannot fit: a typed error naming the limit.
    let huge = Shape {
        batch: 1,
        q_heads: 8,
        kv_heads: 8,
        q_len: 4096,
        kv_len: 16,
        head_dim: 64,
        value_dim: 64,
    };
    let err = small
        .plan(
            &huge,
            Layout::Bhsd,
            &AttentionOptions::softmax(),
            DType::F32,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                limit: "max_storage_buffer_binding_size",
                ..
            }
        ),
        "{err}"
    );
    let q = vec![0.5f32; huge.q_elems()];
    let k = vec![0.5f32; huge.k_elems()];
    let err = small
        .attention_blocking(
            &huge,
            Layout::Bhsd,
            &AttentionOptions::softmax(),
            &q,
            &k,
            &k,
        )
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
}

#[test]
fn f16_without_shader_f16_uses_the_packed_path_or_fails_when_native_is_required() {
    if engine(Path::F32).is_none() {
        return;
    }
    let required = custom_engine(
        |_| {},
        wgpu::Features::empty(),
        EngineOptions {
            f16_path: F16Path::RequireNative,
            ..Default::default()
        },
    );
    assert!(!required.info().shader_f16);
    let err = required
        .plan(
            &shape(),
            Layout::Bhsd,
            &AttentionOptions::softmax(),
            DType::F16,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DTypeUnsupported {
                dtype: DType::F16,
                ..
            }
        ),
        "{err}"
    );
    let auto = custom_engine(
        |_| {},
        wgpu::Features::empty(),
        EngineOptions {
            poison_outputs: true,
            ..Default::default()
        },
    );
    let case = Case::softmax(shape(), Path::F16Packed, 5);
    assert!(
        wflash_conformance::run_case_on(&auto, &case)
            .expect("packed f16 conforms")
            .ratio
            <= 1.0
    );
}

/// A device that cannot run the kernels (here: fewer storage buffers per shader than they
/// bind, as on small GL drivers) is refused when the engine is made, with the way out named.
#[test]
fn a_device_that_cannot_run_the_kernels_is_refused_with_the_backend_named() {
    let Some(shared) = engine(Path::F32) else {
        return;
    };
    let (device, queue) = wflash_conformance::custom_device(
        |limits| {
            limits.max_storage_buffers_per_shader_stage =
                wflash::kernels::STORAGE_BUFFERS_PER_KERNEL - 1;
        },
        wgpu::Features::empty(),
    );
    let err = Engine::from_device(device, queue, EngineOptions::default()).unwrap_err();
    let Error::BackendUnsupported { backend, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(*backend, shared.info().backend);
    let message = err.to_string();
    for named in ["storage buffers", "WGPU_BACKEND", "mesa-vulkan-drivers"] {
        assert!(message.contains(named), "{message}");
    }
    // The shared engine's device has what the kernels need: it was made.
    assert!(
        shared.info().limits.max_storage_buffers_per_shader_stage
            >= wflash::kernels::STORAGE_BUFFERS_PER_KERNEL
    );
}

#[test]
fn gpu_resident_calls_chain_and_match_the_host_path() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let s = Shape {
        batch: 1,
        q_heads: 2,
        kv_heads: 2,
        q_len: 40,
        kv_len: 40,
        head_dim: 16,
        value_dim: 16,
    };
    let (q, k, v) = inputs(&s);
    let opts = AttentionOptions::softmax().with_causal(Causal::TopLeft);
    let (qt, kt, vt) = (
        engine.upload(&q).unwrap(),
        engine.upload(&k).unwrap(),
        engine.upload(&v).unwrap(),
    );
    // Two chained calls: the first output is the second call's query, never leaving the GPU.
    let first = engine
        .attention_gpu(&s, Layout::Bhsd, &opts, &qt, &kt, &vt)
        .unwrap();
    let second = engine
        .attention_gpu(&s, Layout::Bhsd, &opts, &first.output, &kt, &vt)
        .unwrap();
    let chained: Vec<f32> = engine.read_blocking(&second.output).unwrap();

    let host1 = engine
        .attention_blocking(&s, Layout::Bhsd, &opts, &q, &k, &v)
        .unwrap();
    let host2 = engine
        .attention_blocking(&s, Layout::Bhsd, &opts, &host1.output, &k, &v)
        .unwrap();
    assert_eq!(chained, host2.output);
    let lse: Vec<f32> = engine.read_blocking(first.lse.as_ref().unwrap()).unwrap();
    assert_eq!(Some(lse), host1.lse);
}

/// One application buffer holding `parts` at aligned offsets, NaN between them (so a kernel
/// that read past a view's bytes, or from its buffer's start, would show it); the views.
fn views_in_one_buffer(engine: &Engine, parts: &[&[f32]]) -> (wgpu::Buffer, Vec<wflash::Tensor>) {
    let align = u64::from(engine.info().limits.min_storage_buffer_offset_alignment) as usize;
    let mut words: Vec<f32> = Vec::new();
    let mut offsets = Vec::new();
    for part in parts {
        // One aligned gap of NaN before each part, so no view starts at byte 0.
        words.resize(
            (words.len() * 4).next_multiple_of(align) / 4 + align / 4,
            f32::NAN,
        );
        offsets.push(words.len() * 4);
        words.extend_from_slice(part);
    }
    words.resize(words.len() + align / 4, f32::NAN);
    let buffer = engine.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("application buffer"),
        size: (words.len() * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    engine.queue().write_buffer(&buffer, 0, &bytes);
    let views = parts
        .iter()
        .zip(&offsets)
        .map(|(part, &offset)| {
            engine
                .tensor_view(&buffer, offset as u64, DType::F32, part.len())
                .unwrap()
        })
        .collect();
    (buffer, views)
}

#[test]
fn views_of_an_application_buffer_bind_in_place_and_match_owned_tensors() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let s = shape();
    let (q, k, v) = inputs(&s);
    let d_o: Vec<f32> = (0..s.o_elems())
        .map(|i| ((i % 23) as f32 - 11.0) / 11.0)
        .collect();
    let opts = AttentionOptions::softmax().with_causal(Causal::BottomRight);
    let owned = [&q, &k, &v].map(|x| engine.upload(x).unwrap());
    let (_buffer, views) = views_in_one_buffer(engine, &[&q, &k, &v, &d_o]);
    assert_eq!(engine.read_blocking::<f32>(&views[1]).unwrap(), k);

    let fwd = |t: &[wflash::Tensor]| {
        engine
            .attention_gpu(&s, Layout::Bhsd, &opts, &t[0], &t[1], &t[2])
            .unwrap()
    };
    let (by_view, by_owned) = (fwd(&views), fwd(&owned));
    let read = |t: &wflash::Tensor| engine.read_blocking::<f32>(t).unwrap();
    assert_eq!(read(&by_view.output), read(&by_owned.output));
    assert!(read(&by_view.output).iter().all(|x| x.is_finite()));

    // The backward reads Q, K, V and dO through views, O and the LSE from the forward.
    let d_o_owned = engine.upload(&d_o).unwrap();
    let bwd = |t: &[wflash::Tensor], d_o: &wflash::Tensor, f: &wflash::GpuAttention| {
        engine
            .attention_backward_gpu(
                &s,
                Layout::Bhsd,
                &opts,
                &t[0],
                &t[1],
                &t[2],
                &f.output,
                f.lse.as_ref(),
                d_o,
            )
            .unwrap()
    };
    let (gv, go) = (
        bwd(&views, &views[3], &by_view),
        bwd(&owned, &d_o_owned, &by_owned),
    );
    for (a, b) in [(&gv.dq, &go.dq), (&gv.dk, &go.dk), (&gv.dv, &go.dv)] {
        assert_eq!(read(a), read(b));
    }

    // The merge copies its parts: a view's bytes, not its buffer's start.
    let out_shape = wflash::OutputShape {
        batch: s.batch,
        heads: s.q_heads,
        len: s.q_len,
        value_dim: s.value_dim,
    };
    let lse: Vec<f32> = read(by_owned.lse.as_ref().unwrap());
    let o: Vec<f32> = read(&by_owned.output);
    let (_parts_buffer, parts) = views_in_one_buffer(engine, &[&o, &lse]);
    let merged = engine
        .merge_attention_gpu(&out_shape, Layout::Bhsd, &[(&parts[0], &parts[1])])
        .unwrap();
    assert_eq!(read(&merged.output), o);
}

#[test]
fn views_that_cannot_bind_are_typed_errors() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let align = u64::from(engine.info().limits.min_storage_buffer_offset_alignment);
    let buffer = |usage| {
        engine.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 4 * align,
            usage,
            mapped_at_creation: false,
        })
    };
    let storage = buffer(wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC);
    let f32 = DType::F32;
    let view = |b: &wgpu::Buffer, offset, len| engine.tensor_view(b, offset, f32, len);
    assert!(view(&storage, align, (align / 4) as usize).is_ok());
    for err in [
        view(&storage, 4, 1).unwrap_err(),
        view(&storage, 3 * align, (align / 4) as usize + 1).unwrap_err(),
        view(&storage, u64::MAX - u64::MAX % align, 1).unwrap_err(),
        view(
            &buffer(wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST),
            0,
            1,
        )
        .unwrap_err(),
    ] {
        assert!(matches!(err, Error::InvalidView { .. }), "{err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_calls_from_tasks_match_blocking_calls() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let s = shape();
    let (q, k, v) = inputs(&s);
    let opts = AttentionOptions::softmax().with_causal(Causal::BottomRight);
    let expected = engine
        .attention_blocking(&s, Layout::Bshd, &opts, &q, &k, &v)
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (engine, q, k, v) = (engine.clone(), q.clone(), k.clone(), v.clone());
        tasks.push(tokio::spawn(async move {
            engine.attention(&s, Layout::Bshd, &opts, &q, &k, &v).await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), expected);
    }
}

#[test]
fn a_row_with_no_visible_key_gives_zero_and_negative_infinity() {
    // Bottom-right causal with q_len > kv_len hides every key from the first rows.
    let case = Case {
        causal: Some(Causal::BottomRight),
        ..Case::softmax(
            Shape {
                batch: 1,
                q_heads: 1,
                kv_heads: 1,
                q_len: 100,
                kv_len: 30,
                head_dim: 32,
                value_dim: 32,
            },
            Path::F32,
            9,
        )
    };
    if run_case(&case).expect("conforms").is_none() {
        return;
    }
    let engine = engine(Path::F32).unwrap();
    let (q, k, v) = inputs(&case.shape);
    let out = engine
        .attention_blocking(
            &case.shape,
            Layout::Bhsd,
            &AttentionOptions::softmax().with_causal(Causal::BottomRight),
            &q,
            &k,
            &v,
        )
        .unwrap();
    let lse = out.lse.unwrap();
    assert!(out.output[..70 * 32].iter().all(|&x| x == 0.0));
    assert!(lse[..70].iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(lse[70..].iter().all(|x| x.is_finite()));
}

#[test]
fn texture_limits_split_the_unrolled_kernel_over_batch_or_fail_with_the_limit_named() {
    if engine(Path::F32).is_none() {
        return;
    }
    let with_texture_limit = |max: u32| {
        custom_engine(
            |l| l.max_texture_dimension_2d = max,
            wgpu::Features::empty(),
            EngineOptions {
                poison_outputs: true,
                family: Some(Family::Unrolled),
                ..Default::default()
            },
        )
    };
    // head_dim 24 → 6 texels per packed row; one batch element is kv_heads 2 × 48 padded rows.
    let s = Shape {
        batch: 3,
        ..shape()
    };
    let opts = AttentionOptions::softmax();
    // 32-texel lines hold 5 rows; 32 lines hold 160 rows: one batch element per dispatch.
    let split = with_texture_limit(32);
    let plan = split.plan(&s, Layout::Bhsd, &opts, DType::F32).unwrap();
    assert_eq!(plan.batch_per_dispatch, 1, "{plan:?}");
    let case = Case {
        causal: Some(Causal::TopLeft),
        ..Case::softmax(s, Path::F32, 78)
    };
    let outcome = wflash_conformance::run_case_on(&split, &case).expect("split call conforms");
    assert!(outcome.ratio <= 1.0);
    // 16-texel lines hold 2 rows; 16 lines hold 32 rows: not even one batch element fits.
    let err = with_texture_limit(16).plan(&s, Layout::Bhsd, &opts, DType::F32);
    assert!(
        matches!(
            err,
            Err(Error::TooLarge {
                limit: "max_texture_dimension_2d",
                ..
            })
        ),
        "{err:?}"
    );
}

#[test]
fn long_key_sequences_are_exact_or_refused_on_cpu_drivers() {
    let Some(default) = engine(Path::F32) else {
        return;
    };
    // Past where llvmpipe's loop limiter broke the tiled kernel at head dim 256 (docs/PERF.md).
    let case = Case::softmax(
        Shape {
            batch: 1,
            q_heads: 1,
            kv_heads: 1,
            q_len: 9,
            kv_len: 12_000,
            head_dim: 256,
            value_dim: 256,
        },
        Path::F32,
        79,
    );
    for family in [Family::Unrolled, Family::Tiled] {
        let engine = wflash_conformance::engine_with(Path::F32, Some(family)).unwrap();
        let on_cpu = default.info().device_type == wgpu::DeviceType::Cpu;
        match wflash_conformance::run_case_on(engine, &case) {
            Ok(outcome) => assert!(outcome.ratio <= 1.0, "{family:?}: {outcome:?}"),
            Err(msg) => {
                // Only the tiled kernel on a CPU driver may refuse, and only with the limit named.
                assert!(
                    on_cpu && family == Family::Tiled && msg.contains("loop limit"),
                    "{family:?}: {msg}"
                );
            }
        }
    }
}

#[test]
fn the_same_call_twice_is_bitwise_identical() {
    if engine(Path::F32).is_none() {
        return;
    }
    let s = Shape {
        batch: 2,
        q_heads: 4,
        kv_heads: 2,
        q_len: 70,
        kv_len: 90,
        head_dim: 40,
        value_dim: 24,
    };
    let (q, k, v) = inputs(&s);
    let opts = AttentionOptions::softmax()
        .with_causal(Causal::BottomRight)
        .with_window(wflash::Window::trailing(33));
    for family in [Family::Unrolled, Family::Tiled] {
        let engine = wflash_conformance::engine_with(Path::F32, Some(family)).unwrap();
        let run = || {
            engine
                .attention_blocking(&s, Layout::Bshd, &opts, &q, &k, &v)
                .unwrap()
        };
        let (a, b) = (run(), run());
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&a.output), bits(&b.output), "{family:?} output");
        assert_eq!(
            bits(a.lse.as_deref().unwrap()),
            bits(b.lse.as_deref().unwrap()),
            "{family:?} lse"
        );
    }
}

/// Modifiers with wrong lengths or values, and combinations without meaning, are typed errors
/// found before any dispatch; none falls back to an unfused path.
#[test]
fn bad_modifiers_and_unfusable_combinations_are_typed_errors() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let s = shape(); // batch 2, q_heads 4, q_len 33, kv_len 47
    let heads = vec![0.5f32; s.q_heads];
    let short = vec![0.5f32; s.q_heads - 1];
    let nan = vec![f32::NAN; s.q_heads];
    let rows = vec![1.0f32; s.batch * s.q_heads * s.q_len];
    let bias = vec![0.0f32; s.q_len * s.kv_len];
    let mask = vec![true; s.batch * s.kv_len];
    let cu_q = [0u32, 10, 33];
    let cu_k = [0u32, 20, 47];
    let varlen = wflash::Varlen {
        cu_seqlens_q: &cu_q,
        cu_seqlens_k: &cu_k,
    };
    let packed = Shape { batch: 1, ..s };
    let softmax = AttentionOptions::softmax;
    type Expect = fn(&Error) -> bool;
    let cases: Vec<(&str, Shape, AttentionOptions, Expect)> = vec![
        ("softcap 0", s, softmax().with_softcap(0.0), |e| {
            matches!(
                e,
                Error::InvalidModifier {
                    modifier: "softcap",
                    ..
                }
            )
        }),
        ("softcap NaN", s, softmax().with_softcap(f32::NAN), |e| {
            matches!(
                e,
                Error::InvalidModifier {
                    modifier: "softcap",
                    ..
                }
            )
        }),
        ("short slopes", s, softmax().with_alibi(&short), |e| {
            matches!(
                e,
                Error::LengthMismatch {
                    tensor: "alibi_slopes",
                    ..
                }
            )
        }),
        ("NaN sinks", s, softmax().with_sinks(&nan), |e| {
            matches!(
                e,
                Error::InvalidModifier {
                    modifier: "sinks",
                    ..
                }
            )
        }),
        (
            "short temperature",
            s,
            softmax().with_temperature(&rows[1..]),
            |e| {
                matches!(
                    e,
                    Error::LengthMismatch {
                        tensor: "temperature",
                        ..
                    }
                )
            },
        ),
        (
            "short key mask",
            s,
            softmax().with_key_mask(&mask[1..]),
            |e| {
                matches!(
                    e,
                    Error::LengthMismatch {
                        tensor: "key_mask",
                        ..
                    }
                )
            },
        ),
        (
            "bias of 3 batches",
            s,
            softmax().with_bias(Bias::f32(&bias, 3, 1)),
            |e| {
                matches!(
                    e,
                    Error::InvalidModifier {
                        modifier: "bias",
                        ..
                    }
                )
            },
        ),
        (
            "bias length",
            s,
            softmax().with_bias(Bias::f32(&bias[1..], 1, 1)),
            |e| matches!(e, Error::LengthMismatch { tensor: "bias", .. }),
        ),
        (
            "sinks with sigmoid",
            s,
            AttentionOptions::sigmoid().with_sinks(&heads),
            |e| matches!(e, Error::Unsupported { .. }),
        ),
        (
            "bias with varlen",
            packed,
            softmax()
                .with_varlen(varlen)
                .with_bias(Bias::f32(&bias, 1, 1)),
            |e| matches!(e, Error::Unsupported { .. }),
        ),
        (
            "key mask with varlen",
            packed,
            softmax()
                .with_varlen(varlen)
                .with_key_mask(&mask[..s.kv_len]),
            |e| matches!(e, Error::Unsupported { .. }),
        ),
        (
            "varlen with batch 2",
            s,
            softmax().with_varlen(varlen),
            |e| {
                matches!(
                    e,
                    Error::InvalidModifier {
                        modifier: "varlen",
                        ..
                    }
                )
            },
        ),
        (
            "cu_seqlens not ending at the total",
            packed,
            softmax().with_varlen(wflash::Varlen {
                cu_seqlens_q: &[0, 10, 30],
                cu_seqlens_k: &cu_k,
            }),
            |e| {
                matches!(
                    e,
                    Error::InvalidModifier {
                        modifier: "varlen",
                        ..
                    }
                )
            },
        ),
        (
            "cu_seqlens decreasing",
            packed,
            softmax().with_varlen(wflash::Varlen {
                cu_seqlens_q: &cu_q,
                cu_seqlens_k: &[0, 30, 20, 47],
            }),
            |e| {
                matches!(
                    e,
                    Error::InvalidModifier {
                        modifier: "varlen",
                        ..
                    }
                )
            },
        ),
    ];
    for (what, shape, opts, expected) in cases {
        let err = call(engine, &shape, &opts).expect_err(what);
        assert!(expected(&err), "{what}: {err}");
        assert!(
            engine
                .plan(&shape, Layout::Bhsd, &opts, DType::F32)
                .is_err(),
            "{what}: planned"
        );
    }
}

/// A bias that hides every key of some rows, a key mask that hides every key of a batch
/// element: those rows are exactly 0 (LSE -inf), never NaN; with a sink the LSE is the sink.
#[test]
fn rows_hidden_by_bias_or_key_mask_are_zero() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let s = shape();
    let (q, k, v) = inputs(&s);
    let mut bias = vec![0.0f32; s.q_len * s.kv_len];
    bias[..2 * s.kv_len].fill(f32::NEG_INFINITY); // rows 0 and 1 see nothing
    let mut mask = vec![true; s.batch * s.kv_len];
    mask[s.kv_len..].fill(false); // batch 1 sees nothing
    let sinks = vec![0.25f32; s.q_heads];
    for sinks in [None, Some(&sinks[..])] {
        let opts = AttentionOptions {
            bias: Some(Bias::f32(&bias, 1, 1)),
            key_mask: Some(&mask),
            sinks,
            ..AttentionOptions::softmax()
        };
        let out = engine
            .attention_blocking(&s, Layout::Bhsd, &opts, &q, &k, &v)
            .expect("runs");
        let lse = out.lse.expect("softmax has an LSE");
        let row = |b: usize, h: usize, i: usize| (b * s.q_heads + h) * s.q_len + i;
        for h in 0..s.q_heads {
            for (b, i) in [(0, 0), (0, 1), (1, 0), (1, 20)] {
                let o = &out.output[row(b, h, i) * s.value_dim..][..s.value_dim];
                assert!(o.iter().all(|&x| x == 0.0), "b{b} h{h} i{i}: {o:?}");
                let (got, want) = (lse[row(b, h, i)], sinks.map_or(f32::NEG_INFINITY, |s| s[h]));
                assert!(
                    got == want || (got - want).abs() < 1e-6,
                    "b{b} h{h} i{i}: {got} vs {want}"
                );
            }
            assert!(lse[row(0, h, 2)].is_finite());
        }
    }
}

/// Every tile `cargo xtask bench --tune` may pick conforms (causal and not, awkward lengths),
/// a tile the kernel cannot run is a typed error, and a tuning file's entries for this adapter
/// take effect while entries it cannot run and other adapters' entries do not.
#[test]
fn tuned_tiles_conform_and_tuning_files_apply() {
    if engine(Path::F32).is_none() {
        return;
    }
    let options = |family, tuning| EngineOptions {
        family: Some(family),
        poison_outputs: true,
        tuning,
        ..Default::default()
    };
    let (head_dim, value_dim) = (40, 24);
    let mut tried = 0;
    for family in [Family::Unrolled, Family::Tiled] {
        let engine = custom_engine(
            |_| {},
            wgpu::Features::empty(),
            options(family, TuningSource::Off),
        );
        let candidates = engine.tile_candidates(family, head_dim, value_dim);
        assert!(!candidates.is_empty(), "{family:?} has no tile");
        for tile in candidates {
            engine
                .set_tile(family, head_dim, value_dim, Some(tile))
                .unwrap();
            for causal in [None, Some(Causal::BottomRight)] {
                let shape = Shape {
                    kv_heads: 1,
                    q_len: 77,
                    kv_len: 93,
                    value_dim: value_dim as usize,
                    ..Shape::mha(1, 2, 93, head_dim as usize)
                };
                let case = Case {
                    causal,
                    ..Case::softmax(shape, Path::F32, 40 + tried)
                };
                let outcome = wflash_conformance::run_case_on(&engine, &case).unwrap();
                assert!(
                    outcome.ratio <= 1.0,
                    "{family:?} {tile:?} causal {causal:?}: error ratio {}",
                    outcome.ratio
                );
                tried += 1;
            }
        }
        let bad = TileConfig {
            block_m: 24,
            block_n: 3,
        };
        let err = engine
            .set_tile(family, head_dim, value_dim, Some(bad))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidTile { .. }), "{err}");
    }
    eprintln!("{tried} tuned-tile cases conform");

    // A tuning file: one usable entry for this adapter, one it cannot run, one for another.
    let probe = custom_engine(
        |_| {},
        wgpu::Features::empty(),
        options(Family::Unrolled, TuningSource::Off),
    );
    let info = probe.info();
    let smallest = *probe
        .tile_candidates(Family::Unrolled, head_dim, value_dim)
        .last()
        .unwrap();
    let entry = |head_dim, tile: TileConfig| TunedTile {
        family: Family::Unrolled,
        head_dim,
        value_dim: head_dim,
        block_m: tile.block_m,
        block_n: tile.block_n,
    };
    let mut file = TuningFile::default();
    let tuned = TunedTile {
        value_dim,
        ..entry(head_dim, smallest)
    };
    file.set(&info.adapter_name, &info.driver, &info.driver_info, tuned);
    let unrunnable = TileConfig {
        block_m: 8 * 64,
        block_n: 4,
    };
    file.set(
        &info.adapter_name,
        &info.driver,
        &info.driver_info,
        entry(128, unrunnable),
    );
    file.set("another adapter", "", "", entry(64, smallest));
    let dir = std::env::temp_dir().join(format!("wflash-api-tuning-{}", std::process::id()));
    let path = dir.join("tuning.json");
    file.save(&path).unwrap();
    let engine = custom_engine(
        |_| {},
        wgpu::Features::empty(),
        options(Family::Unrolled, TuningSource::File(path.clone())),
    );
    assert_eq!(
        engine.tuned_tiles(),
        vec![(Family::Unrolled, head_dim, value_dim, smallest)]
    );
    std::fs::write(&path, "[1, 2").unwrap();
    let instance_options = options(Family::Unrolled, TuningSource::File(path.clone()));
    let err = Engine::new_blocking(instance_options).unwrap_err();
    assert!(matches!(err, Error::TuningFile { .. }), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Shapes built to overflow u32 element offsets (more than 2³² elements in all, or in one batch
/// element): the plan splits them over batch so that every index a dispatch computes fits u32
/// and every binding fits the adapter, or refuses with `TooLarge`. Planning allocates nothing,
/// so shapes far beyond this machine's memory are checked; splitting itself is proven correct
/// on small limits by `too_large_problems_split_over_batch_or_fail_with_the_limit_named`.
#[test]
fn element_counts_past_u32_split_over_batch_or_are_refused() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let limits = &engine.info().limits;
    let binding = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);
    let shapes = [
        // 65 · 2²⁶ Q elements in all, 2²⁶ (256 MiB of f32) per batch element.
        Shape::mha(65, 8, 65536, 128),
        // 1025 · 2²² elements: just past 2³².
        Shape::mha(1025, 8, 8192, 64),
        Shape::mha(4100, 16, 1024, 64),
        // GQA with many keys per batch element.
        Shape {
            batch: 1100,
            q_heads: 32,
            kv_heads: 4,
            q_len: 1024,
            kv_len: 8192,
            head_dim: 128,
            value_dim: 128,
        },
        // One batch element past 2³² elements: refused.
        Shape::mha(1, 64, 1 << 20, 128),
    ];
    let mut split = 0;
    for shape in shapes {
        assert!(shape.validate().is_ok(), "{shape:?}");
        let total = shape.q_elems().max(shape.k_elems()).max(shape.v_elems());
        assert!(
            total as u64 > u64::from(u32::MAX),
            "{shape:?} does not overflow u32"
        );
        for dtype in [DType::F32, DType::F16] {
            match engine.plan(&shape, Layout::Bhsd, &AttentionOptions::softmax(), dtype) {
                Ok(plan) => {
                    let per_batch = [
                        shape.q_elems(),
                        shape.k_elems(),
                        shape.v_elems(),
                        shape.o_elems(),
                    ]
                    .map(|n| (n / shape.batch) as u64);
                    let dispatch = plan.batch_per_dispatch as u64;
                    assert!(
                        dispatch >= 1 && dispatch < shape.batch as u64,
                        "{shape:?}: {plan:?}"
                    );
                    for n in per_batch {
                        assert!(dispatch * n <= u64::from(u32::MAX), "{shape:?}: {plan:?}");
                        // f32 is the widest element any binding holds.
                        assert!(dispatch * n * 4 <= binding, "{shape:?}: {plan:?}");
                    }
                    split += 1;
                }
                Err(err) => assert!(matches!(err, Error::TooLarge { .. }), "{shape:?}: {err}"),
            }
        }
    }
    assert!(
        split >= 4,
        "only {split} of the overflowing shapes were split"
    );
}

#[test]
fn gpu_modifiers_give_the_host_results_bitwise_and_bad_ones_are_typed_errors() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let s = shape();
    let (q, k, v) = inputs(&s);
    let d_o: Vec<f32> = (0..s.o_elems())
        .map(|i| ((i % 29) as f32 - 14.0) / 14.0)
        .collect();
    // Shared by the batch, one matrix per head; every 5th score hidden, never key 0.
    let matrix = s.q_len * s.kv_len;
    let bias: Vec<f32> = (0..s.q_heads * matrix)
        .map(|i| match i % 5 {
            0 if i % s.kv_len != 0 => f32::NEG_INFINITY,
            _ => ((i % 31) as f32 - 15.0) / 10.0,
        })
        .collect();
    let sinks: Vec<f32> = (0..s.q_heads).map(|h| h as f32 * 0.7 - 1.0).collect();
    let opts = AttentionOptions::softmax()
        .with_causal(Causal::TopLeft)
        .with_bias_grad();
    let host_opts = opts
        .with_bias(Bias::f32(&bias, 1, s.q_heads))
        .with_sinks(&sinks);
    let host = engine
        .attention_blocking(&s, Layout::Bhsd, &host_opts, &q, &k, &v)
        .unwrap();
    let host_grads = engine
        .attention_backward_blocking(
            &s,
            Layout::Bhsd,
            &host_opts,
            &q,
            &k,
            &v,
            &host.output,
            host.lse.as_deref(),
            &d_o,
        )
        .unwrap();

    let [qt, kt, vt, d_ot, bias_t, sinks_t] =
        [&q, &k, &v, &d_o, &bias, &sinks].map(|x| engine.upload(x).unwrap());
    let gpu_bias = GpuBias {
        values: &bias_t,
        batch: 1,
        heads: s.q_heads,
    };
    let modifiers = GpuModifiers {
        bias: Some(gpu_bias),
        sinks: Some(&sinks_t),
    };
    let read = |t: &wflash::Tensor| engine.read_blocking::<f32>(t).unwrap();
    let gpu = engine
        .attention_gpu_with(&s, Layout::Bhsd, &opts, &modifiers, &qt, &kt, &vt)
        .unwrap();
    assert_eq!(read(&gpu.output), host.output);
    assert_eq!(Some(read(gpu.lse.as_ref().unwrap())), host.lse);
    let grads = engine
        .attention_backward_gpu_with(
            &s,
            Layout::Bhsd,
            &opts,
            &modifiers,
            &qt,
            &kt,
            &vt,
            &gpu.output,
            gpu.lse.as_ref(),
            &d_ot,
        )
        .unwrap();
    assert_eq!(read(&grads.dq), host_grads.dq);
    assert_eq!(read(&grads.dk), host_grads.dk);
    assert_eq!(read(&grads.dv), host_grads.dv);
    assert_eq!(grads.d_bias.as_ref().map(read), host_grads.d_bias);
    assert_eq!(grads.d_sinks.as_ref().map(read), host_grads.d_sinks);
    assert!(host_grads.d_bias.is_some() && host_grads.d_sinks.is_some());

    // A resident bias without its tensor, tensors of the wrong size or type, values given
    // twice, sinks with sigmoid.
    let bias_error = |e: &Error| {
        matches!(
            e,
            Error::InvalidModifier {
                modifier: "bias",
                ..
            }
        )
    };
    let resident = opts.with_bias(Bias::resident(DType::F32, 1, s.q_heads));
    let err = engine
        .attention_blocking(&s, Layout::Bhsd, &resident, &q, &k, &v)
        .unwrap_err();
    assert!(bias_error(&err), "{err:?}");
    let err = engine
        .attention_gpu(&s, Layout::Bhsd, &resident, &qt, &kt, &vt)
        .unwrap_err();
    assert!(bias_error(&err), "{err:?}");
    let gpu_call = |opts: &AttentionOptions, modifiers: &GpuModifiers| {
        engine
            .attention_gpu_with(&s, Layout::Bhsd, opts, modifiers, &qt, &kt, &vt)
            .unwrap_err()
    };
    let with_bias = |bias: GpuBias<'_>| {
        gpu_call(
            &opts,
            &GpuModifiers {
                bias: Some(bias),
                sinks: None,
            },
        )
    };
    let err = with_bias(GpuBias {
        values: &kt,
        ..gpu_bias
    });
    assert!(
        matches!(err, Error::LengthMismatch { tensor: "bias", .. }),
        "{err:?}"
    );
    let err = with_bias(GpuBias {
        heads: 3,
        ..gpu_bias
    });
    assert!(bias_error(&err), "{err:?}");
    let bf16 = engine.upload(&vec![half::bf16::ZERO; bias.len()]).unwrap();
    let err = with_bias(GpuBias {
        values: &bf16,
        ..gpu_bias
    });
    assert!(matches!(err, Error::DTypeUnsupported { .. }), "{err:?}");
    let err = gpu_call(&host_opts, &modifiers);
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    let with_sinks = |opts: &AttentionOptions, sinks: &wflash::Tensor| {
        gpu_call(
            opts,
            &GpuModifiers {
                bias: None,
                sinks: Some(sinks),
            },
        )
    };
    let err = with_sinks(&opts, &qt);
    assert!(
        matches!(
            err,
            Error::LengthMismatch {
                tensor: "sinks",
                ..
            }
        ),
        "{err:?}"
    );
    let f16_sinks = engine.upload(&vec![half::f16::ZERO; s.q_heads]).unwrap();
    let err = with_sinks(&opts, &f16_sinks);
    assert!(
        matches!(
            err,
            Error::DTypeMismatch {
                tensor: "sinks",
                ..
            }
        ),
        "{err:?}"
    );
    let err = with_sinks(&opts.with_sinks(&sinks), &sinks_t);
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    let err = with_sinks(&AttentionOptions::sigmoid(), &sinks_t);
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
}

/// Dropped tensors' buffers back later tensors of the same size class (the tensor cache): a
/// repeated call takes its output and LSE from it, with the same result bit for bit (the
/// engine poisons outputs, reused ones too, so a kernel that relied on a buffer's old contents
/// would show); a reused buffer holds only the new tensor's bytes; the cache stays under its cap,
/// a cap of 0 keeps nothing, and `release_cached` lets everything go.
#[test]
fn dropped_tensors_back_later_ones_within_the_cache_cap() {
    if engine(Path::F32).is_none() {
        return;
    }
    const CAP: u64 = 1 << 20;
    let cached_engine = |cap| {
        custom_engine(
            |_| {},
            wgpu::Features::empty(),
            EngineOptions {
                poison_outputs: true,
                tensor_cache_bytes: cap,
                tuning: TuningSource::Off,
                ..EngineOptions::default()
            },
        )
    };
    let engine = cached_engine(CAP);
    let s = Shape::mha(1, 2, 40, 16);
    let (q, k, v) = inputs(&s);
    let opts = AttentionOptions::softmax().with_causal(Causal::BottomRight);
    let (qt, kt, vt) = (
        engine.upload(&q).unwrap(),
        engine.upload(&k).unwrap(),
        engine.upload(&v).unwrap(),
    );
    let call = || {
        let out = engine
            .attention_gpu(&s, Layout::Bhsd, &opts, &qt, &kt, &vt)
            .unwrap();
        let o: Vec<f32> = engine.read_blocking(&out.output).unwrap();
        let lse: Vec<f32> = engine.read_blocking(out.lse.as_ref().unwrap()).unwrap();
        (o, lse)
    };
    let first = call();
    let before = engine.tensor_cache_stats();
    assert!(
        before.bytes > 0,
        "the first call's outputs were kept: {before:?}"
    );
    for _ in 0..3 {
        assert_eq!(call(), first, "a reused buffer changed the result");
    }
    // Each call's output and LSE.
    wflash_conformance::assert_reused(before, engine.tensor_cache_stats(), 3 * 2);
    drop((qt, kt, vt));

    // Five floats and then three share a 256-byte buffer; the tensor is three floats, whatever
    // the buffer held before.
    let five = engine.upload(&[1.0f32, 2.0, 3.0, 4.0, 5.0]).unwrap();
    let reused = five.buffer().clone();
    drop(five);
    let three = engine.upload(&[7.0f32, 8.0, 9.0]).unwrap();
    assert_eq!(three.buffer(), &reused, "same size class, same buffer");
    assert_eq!(three.binding().size.map(|n| n.get()), Some(12));
    assert_eq!(
        engine.read_blocking::<f32>(&three).unwrap(),
        [7.0, 8.0, 9.0]
    );
    drop((three, reused));

    // Many sizes: the cache evicts to stay under its cap; one past the cap is not kept.
    for n in (1..200).map(|i| i * 997) {
        drop(engine.upload(&vec![0.5f32; n]).unwrap());
        let stats = engine.tensor_cache_stats();
        assert!(stats.bytes <= CAP, "{stats:?}");
    }
    engine.release_cached();
    assert_eq!(engine.cached_bytes(), 0);
    assert_eq!(engine.memory_in_use(), 0, "nothing lives, nothing kept");
    drop(
        engine
            .upload(&vec![0.5f32; (CAP as usize) / 4 + 1])
            .unwrap(),
    );
    assert_eq!(engine.tensor_cache_stats().bytes, 0, "larger than the cap");

    // A cap of 0 keeps nothing: every tensor is a new buffer.
    let uncached = cached_engine(0);
    for _ in 0..3 {
        drop(uncached.upload(&q).unwrap());
    }
    let stats = uncached.tensor_cache_stats();
    assert_eq!(
        (stats.bytes, stats.hits, stats.misses),
        (0, 0, 3),
        "{stats:?}"
    );
}

//! Reliability under many callers: one `Engine` shared by tokio tasks and OS threads making
//! mixed calls, every result bitwise equal to the same call made alone, within a time bound.

use std::sync::{Arc, mpsc};
use std::time::Duration;

use wflash::{
    AttentionOptions, Causal, DType, Element, Engine, Error, Layout, Modifier, Shape, Window,
};
use wflash_conformance::{ModData, Mods, Path, engine};

/// Calls per task or thread (the figure).
const CALLS_EACH: usize = 200;
const TASKS: usize = 8;
const THREADS: usize = 4;
/// Generous for ~2400 small calls on lavapipe (about a minute there); a deadlock never ends.
const TIME_BOUND: Duration = Duration::from_secs(600);

/// One call: shape, layout, element type and options (with the modifier data it borrows).
struct Spec {
    shape: Shape,
    layout: Layout,
    dtype: DType,
    causal: Option<Causal>,
    window: Option<Window>,
    sigmoid: bool,
    slopes: Option<Vec<f32>>,
    softcap: Option<f32>,
    /// Linear attention instead (q_len == kv_len): (normaliser, decays) and its kernel.
    linear: Option<(bool, Option<Vec<f32>>, wflash::LinearKernel)>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Spec {
    fn linear_options(&self) -> Option<wflash::LinearOptions<'_>> {
        let (normalize, decay, kernel) = self.linear.as_ref()?;
        Some(wflash::LinearOptions {
            feature_map: wflash::FeatureMap::EluPlusOne,
            normalize: *normalize,
            decay: decay.as_deref(),
            kernel: *kernel,
            ..wflash::LinearOptions::causal()
        })
    }

    fn options(&self) -> AttentionOptions<'_> {
        AttentionOptions {
            causal: self.causal,
            window: self.window,
            softcap: self.softcap,
            alibi_slopes: self.slopes.as_deref(),
            ..if self.sigmoid {
                AttentionOptions::sigmoid()
            } else {
                AttentionOptions::softmax()
            }
        }
    }
}

/// A mix of variants, shapes, dtypes and layouts over few distinct kernels (each costs a cold
/// compile on llvmpipe): head dim 32 throughout.
fn specs() -> Vec<Spec> {
    let mut specs = Vec::new();
    let dtypes = [DType::F32, DType::F16, DType::Bf16];
    let layouts = [Layout::Bhsd, Layout::Bshd];
    for i in 0..12 {
        let shape = Shape {
            batch: 1 + i % 2,
            q_heads: 4,
            kv_heads: [4, 2, 1][i % 3],
            q_len: [1, 17, 40, 64][i % 4],
            kv_len: [23, 64, 9][i % 3],
            head_dim: 32,
            value_dim: 32,
        };
        let value = |n: usize, m: usize| {
            (0..n)
                .map(|x| (((x + i) * m % 101) as f32 - 50.0) / 50.0)
                .collect::<Vec<f32>>()
        };
        specs.push(Spec {
            shape,
            layout: layouts[i % 2],
            dtype: dtypes[i % 3],
            causal: (i % 4 == 1).then_some(Causal::BottomRight),
            window: (i % 5 == 2).then_some(Window::trailing(8)),
            sigmoid: i % 3 == 2,
            slopes: (i % 4 == 3).then(|| wflash::alibi_slopes(4)),
            softcap: (i % 4 == 3).then_some(5.0),
            linear: None,
            q: value(shape.q_elems(), 7),
            k: value(shape.k_elems(), 11),
            v: value(shape.v_elems(), 13),
        });
    }
    // Linear attention: chunked and recurrent, with and without decay and normaliser.
    for i in 0..4 {
        let len = [17, 64, 100, 5][i];
        let shape = Shape {
            batch: 1 + i % 2,
            q_heads: 4,
            kv_heads: [4, 2][i % 2],
            q_len: len,
            kv_len: len,
            head_dim: 32,
            value_dim: 32,
        };
        let value = |n: usize, m: usize| {
            (0..n)
                .map(|x| (((x + i) * m % 101) as f32 - 50.0) / 50.0)
                .collect::<Vec<f32>>()
        };
        let kernel = [
            wflash::LinearKernel::Chunked,
            wflash::LinearKernel::Recurrent,
        ][i % 2];
        specs.push(Spec {
            shape,
            layout: layouts[i % 2],
            dtype: dtypes[i % 3],
            causal: None,
            window: None,
            sigmoid: false,
            slopes: None,
            softcap: None,
            linear: Some((
                i >= 2,
                (i % 2 == 0).then(|| wflash::lightning_decay(4)),
                kernel,
            )),
            q: value(shape.q_elems(), 7),
            k: value(shape.k_elems(), 11),
            v: value(shape.v_elems(), 13),
        });
    }
    specs
}

/// The result of a call as bits: output, then the LSE (empty for sigmoid; linear attention:
/// its final state, kv then z).
type Bits = (Vec<u32>, Vec<u32>);

async fn call_typed<T: Element>(
    engine: &Engine,
    spec: &Spec,
    bits: fn(T) -> u32,
) -> wflash::Result<Bits> {
    let convert = |x: &[f32]| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
    if let Some(opts) = spec.linear_options() {
        let (q, k, v) = (convert(&spec.q), convert(&spec.k), convert(&spec.v));
        let out = engine
            .linear_attention(&spec.shape, spec.layout, &opts, &q, &k, &v, None)
            .await?;
        let state = out.state.kv.iter().chain(&out.state.z).map(|x| x.to_bits());
        return Ok((out.output.into_iter().map(bits).collect(), state.collect()));
    }
    let out = engine
        .attention(
            &spec.shape,
            spec.layout,
            &spec.options(),
            &convert(&spec.q),
            &convert(&spec.k),
            &convert(&spec.v),
        )
        .await?;
    let lse = out.lse.unwrap_or_default();
    Ok((
        out.output.into_iter().map(bits).collect(),
        lse.into_iter().map(f32::to_bits).collect(),
    ))
}

async fn try_call(engine: &Engine, spec: &Spec) -> wflash::Result<Bits> {
    match spec.dtype {
        DType::F32 => call_typed::<f32>(engine, spec, f32::to_bits).await,
        DType::F16 => call_typed(engine, spec, |x: half::f16| u32::from(x.to_bits())).await,
        DType::Bf16 => call_typed(engine, spec, |x: half::bf16| u32::from(x.to_bits())).await,
    }
}

async fn call(engine: &Engine, spec: &Spec) -> Bits {
    try_call(engine, spec).await.expect("call succeeds")
}

/// The mixed specs, and the result of each made alone on `engine`, to share between callers.
fn specs_made_alone(engine: &Engine) -> (Arc<Vec<Spec>>, Arc<Vec<Bits>>) {
    let specs = specs();
    let alone = specs
        .iter()
        .map(|spec| pollster::block_on(call(engine, spec)))
        .collect();
    (Arc::new(specs), Arc::new(alone))
}

#[test]
fn many_tasks_and_threads_get_the_results_of_calls_made_alone() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let (specs, alone) = specs_made_alone(engine);

    // Everything runs on a worker; this thread only waits, so a deadlock fails the test.
    let (done, finished) = mpsc::channel();
    let worker = {
        let (engine, specs, alone) = (engine.clone(), specs.clone(), alone.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .build()
                .expect("tokio runtime");
            let mut mismatches = Vec::new();
            let threads: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (engine, specs, alone) = (engine.clone(), specs.clone(), alone.clone());
                    std::thread::spawn(move || {
                        let mut bad = Vec::new();
                        for n in 0..CALLS_EACH {
                            let i = (t * 7 + n * 5) % specs.len();
                            if pollster::block_on(call(&engine, &specs[i])) != alone[i] {
                                bad.push(format!("thread {t} call {n} (spec {i})"));
                            }
                        }
                        bad
                    })
                })
                .collect();
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let (engine, specs, alone) = (engine.clone(), specs.clone(), alone.clone());
                    runtime.spawn(async move {
                        let mut bad = Vec::new();
                        for n in 0..CALLS_EACH {
                            let i = (t * 3 + n * 7) % specs.len();
                            if call(&engine, &specs[i]).await != alone[i] {
                                bad.push(format!("task {t} call {n} (spec {i})"));
                            }
                        }
                        bad
                    })
                })
                .collect();
            for task in tasks {
                mismatches.extend(runtime.block_on(task).expect("task ran"));
            }
            for thread in threads {
                mismatches.extend(thread.join().expect("thread ran"));
            }
            let _ = done.send(mismatches);
        })
    };
    let start = std::time::Instant::now();
    let mismatches = match finished.recv_timeout(TIME_BOUND) {
        Ok(mismatches) => mismatches,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("no result after {TIME_BOUND:?}: deadlock or hang")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            panic!("the callers failed: {:?}", worker.join().err())
        }
    };
    worker.join().expect("worker");
    eprintln!(
        "{} calls from {TASKS} tasks and {THREADS} threads in {:.1} s",
        (TASKS + THREADS) * CALLS_EACH,
        start.elapsed().as_secs_f64()
    );
    assert!(
        mismatches.is_empty(),
        "{} calls differ from the same call made alone: {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(10)]
    );
}

/// Device work on other threads goes on while pipelines compile, on every backend. On GL,
/// whose context lock gives up after 6 s and panics, llvmpipe holds the context for seconds
/// (building a pipeline, and compiling its shader variant at the first dispatch inside the
/// submit), and any thread that touched the device meanwhile panicked (issue #21; this test
/// did, in `create_buffer`, `get_fence_value` and `destroy_buffer`, before the engine's
/// device gate, `gpu/gate.rs`, made those threads wait for their turn instead). A fresh
/// engine compiles the forward and backward kernels at head dim 256 (the longest builds) on
/// one thread while three threads upload, read back and drop tensors, make cached calls and
/// create and drop a buffer of their own through `Engine::with_device`.
#[test]
fn device_work_on_other_threads_goes_on_while_a_compile_is_in_flight() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    let Some(shared) = engine(Path::F32) else {
        return;
    };
    // An empty pipeline cache: every kernel of the big call compiles below.
    let engine = fresh_engine_like(shared);
    let small = Shape::mha(1, 2, 40, 32);
    let ones = vec![0.25f32; small.q_elems()];
    let halves = vec![0.5f32; small.v_elems()];
    let softmax = AttentionOptions::softmax();
    let cached = || {
        let out = engine
            .attention_blocking(&small, Layout::Bhsd, &softmax, &ones, &ones, &halves)
            .expect("cached call")
            .output;
        assert!(out.iter().all(|&x| (x - 0.5).abs() < 1e-6));
    };
    cached(); // compiled before the race starts
    let builds = Arc::new(Mutex::new(Vec::<(String, Instant)>::new()));
    let seen = builds.clone();
    engine.on_pipeline_build(move |label| {
        seen.lock()
            .unwrap()
            .push((label.to_string(), Instant::now()));
    });
    let big = Shape::mha(1, 2, 48, 256);
    let x: Vec<f32> = (0..big.q_elems())
        .map(|i| ((i % 17) as f32 - 8.0) / 16.0)
        .collect();
    let done = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|scope| {
        let compiling = scope.spawn(|| {
            let result = engine
                .attention_blocking(&big, Layout::Bhsd, &softmax, &x, &x, &x)
                .and_then(|fwd| {
                    engine.attention_backward_blocking(
                        &big,
                        Layout::Bhsd,
                        &softmax,
                        &x,
                        &x,
                        &x,
                        &fwd.output,
                        fwd.lse.as_deref(),
                        &x,
                    )
                });
            done.store(true, Ordering::SeqCst);
            result
        });
        let workers: Vec<_> = (0..3)
            .map(|t| {
                let (engine, builds, done, cached) = (&engine, &builds, &done, &cached);
                scope.spawn(move || {
                    let (mut ops, mut during) = (0, 0);
                    while !done.load(Ordering::SeqCst) {
                        let building = !builds.lock().unwrap().is_empty();
                        let data: Vec<f32> = (0..4096).map(|i| (i * 3 + t) as f32).collect();
                        let tensor = engine.upload(&data).expect("upload");
                        assert_eq!(engine.read_blocking::<f32>(&tensor).expect("read"), data);
                        drop(tensor);
                        cached();
                        // An application's own device work, beside wflash's, in the gate.
                        let own = engine.with_device(|device, _| {
                            device.create_buffer(&wflash::wgpu::BufferDescriptor {
                                label: Some("the application's own"),
                                size: 1 << 16,
                                usage: wflash::wgpu::BufferUsages::STORAGE,
                                mapped_at_creation: false,
                            })
                        });
                        engine.with_device(|_, _| drop(own));
                        ops += 1;
                        during += usize::from(building && !done.load(Ordering::SeqCst));
                    }
                    (ops, during)
                })
            })
            .collect();
        let grads = compiling
            .join()
            .expect("the compiling thread")
            .expect("forward and backward");
        assert!(
            grads
                .dq
                .iter()
                .chain(&grads.dk)
                .chain(&grads.dv)
                .all(|g| g.is_finite())
        );
        let (ops, during) = workers
            .into_iter()
            .map(|w| w.join().expect("a worker thread"))
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
        let builds = builds.lock().unwrap();
        eprintln!(
            "{} builds in {:.1} s on {:?}; {ops} rounds of upload, read, drop and cached call \
             on 3 threads, {during} of them begun while the big call compiled and ran",
            builds.len(),
            start.elapsed().as_secs_f64(),
            engine.info().backend
        );
        assert!(
            builds.len() >= 4,
            "{:?}",
            builds.iter().map(|b| &b.0).collect::<Vec<_>>()
        );
        assert!(during > 0, "no device work overlapped the compiles");
    });
}

/// A caller whose pipelines are cached never waits behind another caller's compile: while one
/// thread is held inside a pipeline build (by the build hook), calls on cached pipelines run to
/// completion on other threads; then the held build finishes and its call is right too.
/// (The hook runs before the build takes the device: on GL, where the build itself holds the
/// device gate, cached calls wait out the compile proper; see the test above.)
#[test]
fn cached_pipelines_do_not_wait_behind_a_compile() {
    let Some(shared) = engine(Path::F32) else {
        return;
    };
    let engine = fresh_engine_like(shared);
    let shape = Shape::mha(1, 2, 40, 32);
    let q = vec![0.25f32; shape.q_elems()];
    let v = vec![0.5f32; shape.v_elems()];
    let softmax = AttentionOptions::softmax();
    let call = |engine: &Engine, opts: &AttentionOptions| {
        engine
            .attention_blocking(&shape, Layout::Bhsd, opts, &q, &q, &v)
            .expect("call")
            .output
    };
    call(&engine, &softmax); // its pipelines are cached from here on
    let cached = engine.cached_pipelines();

    let (entered_tx, entered) = mpsc::channel::<String>();
    let (release, release_rx) = mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    engine.on_pipeline_build(move |label| {
        if label.contains("sigmoid") {
            let _ = entered_tx.send(label.to_string());
            // Held until the main thread says so (bounded, so a failure cannot hang CI).
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(120));
        }
    });
    std::thread::scope(|scope| {
        let compiling = scope.spawn(|| call(&engine, &AttentionOptions::sigmoid_with_bias(0.0)));
        let label = entered
            .recv_timeout(Duration::from_secs(120))
            .expect("the sigmoid build starts");
        // Cached calls on other threads, while that build is held open.
        let (done_tx, done) = mpsc::channel();
        let engine_ref = &engine;
        let call_ref = &call;
        let softmax_ref = &softmax;
        scope.spawn(move || {
            for _ in 0..3 {
                let out = call_ref(engine_ref, softmax_ref);
                let _ = done_tx.send(out);
            }
        });
        for i in 0..3 {
            let out = done
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| {
                    let _ = release.send(());
                    panic!("cached call {i} waited behind the build of `{label}`")
                });
            assert!(out.iter().all(|&x| (x - 0.5).abs() < 1e-6));
        }
        assert!(!compiling.is_finished(), "the held build finished early");
        assert_eq!(
            engine.cached_pipelines(),
            cached,
            "the held build is not cached yet"
        );
        release.send(()).expect("release");
        let out = compiling.join().expect("the held call");
        // sigmoid(0.25 * 0.25 * 32 / sqrt(32) + 0) * 0.5 per key, 40 keys.
        let weight = 1.0 / (1.0 + (-(0.0625f64 * 32.0 / 32f64.sqrt())).exp());
        let want = (40.0 * 0.5 * weight) as f32;
        assert!(
            out.iter().all(|&x| (x - want).abs() < 1e-4 * want),
            "{} vs {want}",
            out[0]
        );
    });
    assert_eq!(engine.cached_pipelines(), cached + 1);
}

/// NaN and ±inf in Q, K and V, in both kernel families, softmax and sigmoid, with and without
/// soft-capping: the output and LSE have NaN and infinities exactly where the f64 reference has
/// them, and agree with it elsewhere. A key whose logit is -inf counts as hidden (a row of
/// nothing else is 0 with LSE -inf); a NaN logit makes its row NaN.
#[test]
fn non_finite_inputs_propagate_as_the_reference_says() {
    if engine(Path::F32).is_none() {
        return;
    }
    let shape = Shape {
        batch: 1,
        q_heads: 2,
        kv_heads: 1,
        q_len: 9,
        kv_len: 13,
        head_dim: 32,
        value_dim: 24,
    };
    let finite = |n: usize, salt: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i + salt) * 37 % 29) as f32 - 14.0) / 14.0)
            .collect()
    };
    // (what, tensor, element, value): one element of one tensor made non-finite.
    let row = shape.head_dim;
    let poisons: [(&str, usize, usize, f32); 7] = [
        ("NaN in a query row", 0, 4 * row + 3, f32::NAN),
        ("NaN in a key row", 1, 6 * row + 1, f32::NAN),
        ("NaN in a value row", 2, 5 * shape.value_dim + 2, f32::NAN),
        ("+inf in a query row", 0, 2 * row, f32::INFINITY),
        ("-inf in a key row", 1, 3 * row + 7, f32::NEG_INFINITY),
        (
            "+inf in a value row",
            2,
            11 * shape.value_dim,
            f32::INFINITY,
        ),
        (
            "-inf in every key's dim 0, +inf in query rows' dim 0",
            3,
            0,
            f32::INFINITY,
        ),
    ];
    let mut checked = 0;
    for family in [wflash::Family::Unrolled, wflash::Family::Tiled] {
        let engine = wflash_conformance::engine_with(Path::F32, Some(family)).unwrap();
        for (what, tensor, at, value) in poisons {
            let mut inputs = [
                finite(shape.q_elems(), 1),
                finite(shape.k_elems(), 2),
                finite(shape.v_elems(), 3),
            ];
            if tensor == 3 {
                // Every logit -inf: rows with nothing visible of finite weight.
                inputs[1]
                    .iter_mut()
                    .step_by(row)
                    .for_each(|x| *x = f32::NEG_INFINITY);
                inputs[0].iter_mut().step_by(row).for_each(|x| *x = value);
            } else {
                inputs[tensor][at] = value;
            }
            let [q, k, v] = &inputs;
            for (variant, softcap) in [
                (wflash::Variant::Softmax, None),
                (wflash::Variant::Softmax, Some(5.0)),
                (wflash::Variant::Sigmoid { bias: None }, None),
            ] {
                let opts = AttentionOptions {
                    variant,
                    softcap,
                    ..AttentionOptions::softmax()
                };
                let out = engine
                    .attention_blocking(&shape, Layout::Bhsd, &opts, q, k, v)
                    .unwrap();
                let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
                let problem = wflash_conformance::reference_problem(&shape, Layout::Bhsd, &opts);
                let reference = wflash_ref::forward(&problem, &wide(q), &wide(k), &wide(v));
                let case = format!("{family:?}, {what}, {variant:?}, soft-cap {softcap:?}");
                agrees(&out.output, &reference.output)
                    .unwrap_or_else(|e| panic!("{case}: output {e}"));
                if let Some(lse) = &out.lse {
                    agrees(lse, &reference.lse).unwrap_or_else(|e| panic!("{case}: LSE {e}"));
                }
                checked += 1;
            }
        }
    }
    eprintln!("{checked} calls with non-finite inputs agree with the reference");
}

/// A device destroyed under an engine: the next call is a typed `DeviceLost` error (no panic,
/// no hang), and a new engine works.
#[test]
fn a_lost_device_gives_typed_errors_and_a_new_engine_works() {
    if engine(Path::F32).is_none() {
        return;
    }
    let (lost, device) = wflash_conformance::custom_device_engine(
        |_| {},
        wflash::wgpu::Features::empty(),
        wflash::EngineOptions::default(),
    );
    let specs = specs();
    let spec = &specs[0];
    pollster::block_on(call(&lost, spec));
    device.destroy();
    let err = lost
        .attention_blocking(
            &spec.shape,
            spec.layout,
            &spec.options(),
            &spec.q,
            &spec.k,
            &spec.v,
        )
        .expect_err("a destroyed device cannot run");
    assert!(matches!(err, Error::DeviceLost(_)), "{err}");
    let fresh = Engine::new_blocking(wflash::EngineOptions::default()).expect("a new engine");
    let expected = pollster::block_on(call(engine(Path::F32).unwrap(), spec));
    assert_eq!(pollster::block_on(call(&fresh, spec)), expected);
}

/// Out of memory, injected through the engine's memory budget (lavapipe never reports it: it
/// over-commits host memory, so a real exhaustion ends in the host's OOM killer). Uploads and
/// calls past the budget are typed errors; the scratch pool lets go of what it keeps before
/// anything is refused; once tensors are dropped the same engine runs calls that conform; and
/// threads sharing a budgeted engine get either the result of the call made alone or a typed
/// error, within a time bound.
#[test]
fn out_of_memory_is_a_typed_error_and_the_engine_works_afterwards() {
    use wflash::{EngineOptions, Error, TuningSource};
    use wflash_conformance::{Case, custom_engine, run_case_on};

    let Some(shared) = engine(Path::F32) else {
        return;
    };
    const BUDGET: u64 = 4 << 20;
    const FILLER: usize = 64 << 10; // f32 elements: 256 KiB a tensor
    const CALLS_UNDER_BUDGET: usize = 32;
    let budgeted_engine = |budget| {
        custom_engine(
            |_| {},
            wflash::wgpu::Features::empty(),
            EngineOptions {
                memory_budget_bytes: Some(budget),
                poison_outputs: true,
                tuning: TuningSource::Off,
                ..Default::default()
            },
        )
    };
    let budgeted = budgeted_engine(BUDGET);
    let conforms = |seed| {
        let case = Case::softmax(Shape::mha(2, 4, 96, 64), Path::F32, seed);
        let outcome = run_case_on(&budgeted, &case).expect("the call conforms");
        assert!(outcome.ratio <= 1.0, "{outcome:?}");
    };
    conforms(1);
    assert!(
        budgeted.pool_stats().bytes > 0,
        "the call left scratch in the pool"
    );
    assert_eq!(budgeted.memory_in_use(), budgeted.cached_bytes());

    // Q, K, V for a later call, then filler until the budget refuses.
    let shape = Shape::mha(1, 4, 64, 32);
    let q = budgeted.upload(&vec![0.25f32; shape.q_elems()]).unwrap();
    let k = budgeted.upload(&vec![0.5f32; shape.k_elems()]).unwrap();
    let v = budgeted.upload(&vec![1.0f32; shape.v_elems()]).unwrap();
    let mut filler = Vec::new();
    let refused = loop {
        match budgeted.upload(&vec![1.0f32; FILLER]) {
            Ok(t) => filler.push(t),
            Err(err) => break err,
        }
        assert!(
            filler.len() <= 16,
            "a 4 MiB budget held 16 tensors of 256 KiB"
        );
    };
    assert!(
        matches!(refused, Error::MemoryBudget { needed, in_use, budget: BUDGET }
            if needed == 4 * FILLER as u64 && in_use + needed > BUDGET),
        "{refused}"
    );
    assert!(refused.is_out_of_memory());
    assert!(budgeted.memory_in_use() <= BUDGET);
    assert_eq!(
        budgeted.cached_bytes(),
        0,
        "the pool let go of its scratch before an upload was refused"
    );
    eprintln!(
        "budget {BUDGET} B: {} filler tensors held, then: {refused}",
        filler.len()
    );

    // Calls past the budget fail the same way, and leave nothing held.
    let opts = AttentionOptions::softmax();
    while budgeted.memory_in_use() + (shape.o_elems() as u64) * 4 <= BUDGET {
        // Room for the output: take it, so the call itself cannot fit.
        filler.push(budgeted.upload(&vec![0.0f32; shape.o_elems()]).unwrap());
    }
    let held_before_call = budgeted.memory_in_use();
    let err = budgeted
        .attention_gpu(&shape, Layout::Bhsd, &opts, &q, &k, &v)
        .expect_err("no room for the output");
    assert!(err.is_out_of_memory(), "{err}");
    assert_eq!(budgeted.memory_in_use(), held_before_call);
    let err = budgeted
        .attention_blocking(
            &shape,
            Layout::Bhsd,
            &opts,
            &vec![0.0f32; shape.q_elems()],
            &vec![0.0f32; shape.k_elems()],
            &vec![0.0f32; shape.v_elems()],
        )
        .expect_err("no room for the inputs");
    assert!(err.is_out_of_memory(), "{err}");
    assert_eq!(budgeted.memory_in_use(), held_before_call);

    // One request larger than the whole budget, with nothing else held.
    drop(filler);
    let too_big = budgeted.upload(&vec![0.0f32; (BUDGET as usize) / 4 + 1]);
    assert!(
        matches!(too_big, Err(Error::MemoryBudget { needed, .. }) if needed > BUDGET),
        "{too_big:?}"
    );

    // Room again: the held inputs run, and fresh cases conform.
    let out = budgeted
        .attention_gpu(&shape, Layout::Bhsd, &opts, &q, &k, &v)
        .expect("room again");
    let values = budgeted.read_blocking::<f32>(&out.output).unwrap();
    assert!(
        values.iter().all(|&x| (x - 1.0).abs() < 1e-6),
        "V is all ones, so is O"
    );
    drop((out, q, k, v));
    conforms(2);
    assert_eq!(budgeted.memory_in_use(), budgeted.cached_bytes());

    // Threads sharing a budgeted engine: the mixed calls all fit, the oversized one never
    // does; every result is the call made alone, bit for bit. While it runs a call holds up
    // to ~1.3 MiB (inputs, output, scratch, the readback's staging), so THREADS of them at once
    // can pass 4 MiB (this test failed so, now and then): the threads share a budget of
    // THREADS × BUDGET.
    const SHARED_BUDGET: u64 = THREADS as u64 * BUDGET;
    let budgeted = budgeted_engine(SHARED_BUDGET);
    let (specs, alone) = specs_made_alone(shared);
    let (done, finished) = mpsc::channel();
    let callers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (engine, specs, alone, done) =
                (budgeted.clone(), specs.clone(), alone.clone(), done.clone());
            std::thread::spawn(move || {
                let mut bad = Vec::new();
                let mut refused = 0;
                for n in 0..CALLS_UNDER_BUDGET {
                    let i = (t * 5 + n * 3) % specs.len();
                    match pollster::block_on(try_call(&engine, &specs[i])) {
                        Ok(bits) if bits == alone[i] => {}
                        Ok(_) => bad.push(format!("thread {t} call {n} (spec {i}) differs")),
                        Err(err) => bad.push(format!("thread {t} call {n} (spec {i}): {err}")),
                    }
                    if n % 4 == 0 {
                        match engine.upload(&vec![0.0f32; (SHARED_BUDGET as usize) / 4 + 1]) {
                            Err(err) if err.is_out_of_memory() => refused += 1,
                            other => bad.push(format!("oversized upload: {other:?}")),
                        }
                    }
                }
                let _ = done.send((bad, refused));
            })
        })
        .collect();
    drop(done);
    let mut refused = 0;
    for _ in 0..THREADS {
        match finished.recv_timeout(TIME_BOUND) {
            Ok((bad, r)) => {
                assert!(bad.is_empty(), "{bad:?}");
                refused += r;
            }
            Err(e) => panic!("callers under a memory budget: {e:?} (a hang, or a panic)"),
        }
    }
    for caller in callers {
        caller.join().expect("caller");
    }
    assert_eq!(refused, THREADS * CALLS_UNDER_BUDGET.div_ceil(4));
    assert_eq!(budgeted.memory_in_use(), budgeted.cached_bytes());
    assert!(budgeted.memory_in_use() <= SHARED_BUDGET);
}

/// A readback cannot wait forever. With a 1 ms timeout, reading a 64 MiB tensor behind queued
/// attention calls fails with `ReadbackTimeout` (the queued work doubles until it does: lavapipe
/// needs none, as its copy alone takes ~5 ms, and a fast GPU is caught too). The engine goes on
/// dispatching, and once the queue drains the tensor reads back whole (through a twin engine on
/// the same device with a generous timeout: at 1 ms, any large read would time out again).
/// On GL, where nothing is left to wait for after a submit, the reads come back whole instead.
#[test]
fn a_readback_past_its_timeout_is_a_typed_error_and_the_engine_works_afterwards() {
    use wflash::{EngineOptions, Error, TuningSource};
    if engine(Path::F32).is_none() {
        return;
    }
    let timeout = Duration::from_millis(1);
    let tight = wflash_conformance::custom_engine(
        |_| {},
        wflash::wgpu::Features::empty(),
        EngineOptions {
            readback_timeout: timeout,
            tuning: TuningSource::Off,
            ..Default::default()
        },
    );
    let patient = Engine::from_device(
        tight.device().clone(),
        tight.queue().clone(),
        EngineOptions {
            tuning: TuningSource::Off,
            ..Default::default()
        },
    )
    .unwrap();
    let big: Vec<f32> = (0..16 << 20).map(|i| (i % 1000) as f32).collect();
    let big_tensor = tight.upload(&big).unwrap();
    // V is 0.5 everywhere, so O is too.
    let shape = Shape::mha(1, 8, 1024, 64);
    let q = tight.upload(&vec![0.1f32; shape.q_elems()]).unwrap();
    let v = tight.upload(&vec![0.5f32; shape.v_elems()]).unwrap();
    let opts = AttentionOptions::softmax();
    let call = || {
        tight
            .attention_gpu(&shape, Layout::Bhsd, &opts, &q, &q, &v)
            .expect("the engine dispatches")
    };
    drop(call()); // compile: the timeout is about waiting for the GPU, not for pipeline builds
    let drain = || {
        tight
            .device()
            .poll(wflash::wgpu::PollType::wait_indefinitely())
            .unwrap()
    };
    drain();
    // wgpu's GL backend runs each submission to completion inside `queue.submit` (on
    // llvmpipe GL, 1024 queued calls and a 64 MiB copy left no read anything to wait for), so
    // there no readback can pass its timeout: the reads must simply be whole.
    let on_gl = tight.info().backend == wflash::wgpu::Backend::Gl;
    let start = std::time::Instant::now();
    let mut queued = 0;
    let err = loop {
        for _ in 0..queued {
            drop(call());
        }
        match tight.read_blocking::<f32>(&big_tensor) {
            Err(err) => break Some(err),
            Ok(read) if on_gl && queued >= 16 => {
                assert_eq!(read, big);
                break None;
            }
            Ok(_) => {
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "no read timed out, {queued} calls queued"
                );
                drain();
                queued = (queued * 2).max(1);
            }
        }
    };
    match err {
        Some(err) => {
            assert!(
                matches!(err, Error::ReadbackTimeout { timeout: t } if t == timeout),
                "{err}"
            );
            eprintln!("behind {queued} queued call(s): {err}");
        }
        None => eprintln!(
            "GL runs each submission inside submit: reads behind up to {queued} queued calls \
             had nothing to wait for and came back whole"
        ),
    }

    let out = call();
    drain();
    assert_eq!(patient.read_blocking::<f32>(&big_tensor).unwrap(), big);
    let values = patient.read_blocking::<f32>(&out.output).unwrap();
    assert!(values.iter().all(|&x| (x - 0.5).abs() < 1e-6));
}

/// A fresh engine (an empty pipeline cache) on the same kind of adapter and kernel family as
/// `shared`, for tests that watch pipelines being built.
fn fresh_engine_like(shared: &Engine) -> Engine {
    Engine::new_blocking(wflash::EngineOptions {
        tuning: wflash::TuningSource::Off,
        family: Some(shared.family()),
        ..Default::default()
    })
    .expect("engine")
}

/// Whether GPU values agree with the f64 reference: NaN exactly where it is NaN, the same
/// infinity where it is infinite, within 1e-3 (relative, and absolute near 0) elsewhere.
/// The conformance grid holds precision to FlashAttention's standard; this checks that
/// hostile values propagate as the reference says.
fn agrees(gpu: &[f32], reference: &[f64]) -> Result<(), String> {
    compare(gpu, reference, true)
}

/// As [`agrees`], except that where the reference is non-finite the GPU value need only be
/// non-finite too: linear attention's kernels form `φ(q)·(φ(k) vᵀ)` where the reference forms
/// `(φ(q)·φ(k)) v`, and with infinities the two associations give NaN and ±inf differently.
fn agrees_up_to_association(gpu: &[f32], reference: &[f64]) -> Result<(), String> {
    compare(gpu, reference, false)
}

fn compare(gpu: &[f32], reference: &[f64], exact_non_finite: bool) -> Result<(), String> {
    if gpu.len() != reference.len() {
        return Err(format!(
            "{} values, reference {}",
            gpu.len(),
            reference.len()
        ));
    }
    for (i, (&g, &r)) in gpu.iter().zip(reference).enumerate() {
        let g64 = f64::from(g);
        let ok = if !r.is_finite() && !exact_non_finite {
            !g.is_finite()
        } else if r.is_nan() {
            g.is_nan()
        } else if r.is_infinite() {
            g64 == r
        } else {
            g.is_finite() && (g64 - r).abs() <= 1e-3 * (1.0 + r.abs())
        };
        if !ok {
            return Err(format!("[{i}] = {g}, reference {r}"));
        }
    }
    Ok(())
}

/// Whether `err` is an answer to the input (a typed error of the call), not a failure of the
/// engine: `Error::Internal` (a bug) and `Error::DeviceLost` fail the hostile-input tests.
fn is_user_error(err: &Error) -> bool {
    !matches!(err, Error::Internal(_) | Error::DeviceLost(_))
}

/// Spoils a call's modifier data (`how` 1-4; else leaves it): NaN first values, vectors one
/// short, a zero chunk with an absurd prefix, an absurd chunk.
fn spoil_modifier_data(data: &mut ModData, how: usize) {
    let floats = [
        &mut data.alibi_slopes,
        &mut data.bias_f32,
        &mut data.sinks,
        &mut data.temperature,
    ];
    match how {
        1 => floats.into_iter().for_each(|v| {
            if let Some(x) = v.first_mut() {
                *x = f32::NAN;
            }
        }),
        2 => {
            floats.into_iter().for_each(|v| {
                v.pop();
            });
            data.key_mask.pop();
            data.cu_seqlens_k.pop();
        }
        3 => {
            data.chunk = 0;
            data.prefix_len = usize::MAX;
        }
        4 => data.chunk = usize::MAX,
        _ => {}
    }
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    /// Hostile calls that ran (Ok), and those of them with NaN or ±inf inputs, for the log.
    static RAN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static RAN_NON_FINITE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    #[test]
    fn hostile_calls_include_calls_that_run() {
        hostile_calls_end_in_ok_or_a_typed_error();
        let ran = RAN.load(std::sync::atomic::Ordering::Relaxed);
        let non_finite = RAN_NON_FINITE.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "hostile calls that ran: {ran} of 64 (the rest: typed errors), {non_finite} of them \
             with NaN or ±inf inputs; all agree with the reference"
        );
        // About 12 are expected; fewer than 3 would mean validation refuses nearly everything.
        assert!(ran >= 3, "only {ran} hostile calls got past validation");
    }

    /// Dimensions from empty to absurd; the head dims that can run are 32 (one kernel family
    /// of few variants, so the cases do not each pay a cold compile).
    fn dim() -> impl Strategy<Value = usize> {
        prop_oneof![
            Just(0),
            1usize..40,
            Just(1 << 31),
            Just(1usize << 40),
            Just(usize::MAX / 3)
        ]
    }
    fn head_dim() -> impl Strategy<Value = usize> {
        prop_oneof![Just(0), Just(32), Just(257), Just(usize::MAX)]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// Random shapes (zero, huge, overflowing), options (NaN, infinite or zero scale,
        /// soft-cap and sigmoid bias; windows out to usize::MAX), slices one element short or
        /// long, and inputs with NaN or ±inf: every call ends in Ok with an output of the
        /// right size, or in a typed error, never a panic; the engine works afterwards.
        /// (Run by `hostile_calls_include_calls_that_run`.)
        fn hostile_calls_end_in_ok_or_a_typed_error(
            (batch, q_heads, group, q_len, kv_len) in (dim(), dim(), 1usize..3, dim(), dim()),
            (head_dim, value_dim) in (head_dim(), head_dim()),
            scale in prop_oneof![
                3 => Just(None), 1 => Just(Some(f32::NAN)), 1 => Just(Some(0.0)),
                1 => Just(Some(f32::INFINITY)), 3 => (-4.0f32..4.0).prop_map(Some)
            ],
            softcap in prop_oneof![
                4 => Just(None), 1 => Just(Some(f32::NAN)), 1 => Just(Some(-1.0)), 2 => Just(Some(3.0))
            ],
            window in prop::option::of((prop::option::of(any::<usize>()), prop::option::of(0usize..50))),
            sigmoid in prop_oneof![Just(None), Just(Some(None)), Just(Some(Some(f32::NAN))), Just(Some(Some(-1.0)))],
            causal in any::<bool>(),
            len_delta in prop_oneof![4 => Just(0i64), 1 => Just(-1), 1 => Just(1)],
            poison in 0usize..4,
            // Most cases keep the shape runnable, so options and values are what is hostile.
            sane in prop::option::weighted(0.75, (1usize..3, 1usize..3, 1usize..40, 1usize..40)),
            // One modifier of the table (or none), its data drawn as the conformance grid does,
            // then maybe spoiled (spoil_modifier_data).
            modifier in prop::option::of(prop::sample::select(Modifier::ALL.to_vec())),
            spoil in 0usize..6,
        ) {
            let Some(engine) = engine(Path::F32) else {
                return Ok(());
            };
            let shape = match sane {
                Some((batch, kv_heads, q_len, kv_len)) => Shape {
                    batch,
                    q_heads: kv_heads * group,
                    kv_heads,
                    q_len,
                    kv_len,
                    head_dim: 32,
                    value_dim: 32,
                },
                None => Shape {
                    batch,
                    q_heads: q_heads.saturating_mul(group),
                    kv_heads: q_heads,
                    q_len,
                    kv_len,
                    head_dim,
                    value_dim,
                },
            };
            let mut opts = match sigmoid {
                None => AttentionOptions::softmax(),
                Some(bias) => AttentionOptions {
                    variant: wflash::Variant::Sigmoid { bias },
                    ..AttentionOptions::softmax()
                },
            };
            opts.scale = scale;
            opts.softcap = softcap;
            opts.window = window.map(|(left, right)| Window { left, right });
            opts.causal = causal.then_some(Causal::TopLeft);
            // Real slices only for shapes small enough to hold; others get 7 elements.
            let small = shape.validate().is_ok() && shape.q_elems().max(shape.k_elems()).max(shape.v_elems()) < 1 << 20;
            let mods = Mods {
                on: modifier.into_iter().collect(),
                bias_form: Default::default(),
            };
            let mut data = if small { mods.draw(&shape, 7) } else { Default::default() };
            spoil_modifier_data(&mut data, spoil);
            mods.apply(&shape, &data, &mut opts);
            // Non-finite values go into V only where every key is visible to every row: a
            // hidden key's V row may reach a row as 0·inf = NaN when the row's block loads its
            // tile, as in FlashAttention (lib.rs, "Semantics"), which the reference does not
            // model. Whatever hides keys (masks, windows, chunks, key masks, -inf biases), the
            // reference's count of visible pairs says.
            let hides_keys = !small || {
                let problem = wflash_conformance::reference_problem(&shape, Layout::Bhsd, &opts);
                let all = (shape.batch * shape.q_heads * shape.q_len * shape.kv_len) as u64;
                opts.validate_modifiers(&shape).is_err() || problem.visible_pairs_total() < all
            };
            let sized = |n: usize, poison: usize| {
                let n = if small { (n as i64 + len_delta).max(0) as usize } else { 7 };
                (0..n)
                    .map(|i| match (poison, i % 17) {
                        (1, 3) => f32::NAN,
                        (2, 5) => f32::INFINITY,
                        (3, 7) => f32::NEG_INFINITY,
                        _ => ((i * 31 % 23) as f32 - 11.0) / 11.0,
                    })
                    .collect::<Vec<f32>>()
            };
            let (q, k, v) = if small {
                // Infinities in Q and K can make a logit -inf, which hides its key too: V gets
                // NaN only (a NaN logit makes its row NaN in the reference as in the kernel).
                let poison_v = if hides_keys || poison != 1 { 0 } else { poison };
                (sized(shape.q_elems(), poison), sized(shape.k_elems(), poison), sized(shape.v_elems(), poison_v))
            } else {
                (sized(0, 0), sized(0, 0), sized(0, 0))
            };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine.attention_blocking(&shape, Layout::Bhsd, &opts, &q, &k, &v)
            }));
            let result = result.map_err(|_| TestCaseError::fail(format!("panicked: {shape:?} {opts:?}")))?;
            if let Err(err) = &result {
                prop_assert!(is_user_error(err), "{err:?} is not an error of the input: {shape:?} {opts:?}");
            }
            if let Ok(out) = result {
                prop_assert!(small && len_delta == 0, "Ok for a call with wrong lengths: {shape:?}");
                prop_assert_eq!(out.output.len(), shape.o_elems());
                // NaN and ±inf where the reference has them, close to it elsewhere.
                let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
                let problem = wflash_conformance::reference_problem(&shape, Layout::Bhsd, &opts);
                let reference = wflash_ref::forward(&problem, &wide(&q), &wide(&k), &wide(&v));
                let what = format!("poison {poison}, {shape:?} {opts:?}");
                agrees(&out.output, &reference.output).map_err(|e| TestCaseError::fail(format!("output {e}: {what}")))?;
                if let Some(lse) = &out.lse {
                    agrees(lse, &reference.lse).map_err(|e| TestCaseError::fail(format!("LSE {e}: {what}")))?;
                }
                RAN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if poison != 0 {
                    RAN_NON_FINITE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            // The engine is still usable.
            let spec = &specs()[0];
            prop_assert!(pollster::block_on(call(engine, spec)).0.len() == spec.shape.o_elems());
        }
    }
}

/// Linear attention under hostile input: the same promise as `hostile` (Ok with the right
/// sizes, or a typed error; never a panic; the engine works afterwards).
mod hostile_linear {
    use super::*;
    use proptest::prelude::*;
    use wflash::{FeatureMap, LinearKernel, LinearOptions, LinearState};
    use wflash_ref::linear::{
        FeatureMap as ReferenceMap, LinearProblem, LinearState as ReferenceState, linear_backward,
        linear_forward,
    };

    static RAN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static BACKWARD_RAN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    #[test]
    fn hostile_linear_calls_include_calls_that_run() {
        hostile_linear_calls_end_in_ok_or_a_typed_error();
        let ran = RAN.load(std::sync::atomic::Ordering::Relaxed);
        let backward_ran = BACKWARD_RAN.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "hostile linear calls that ran: {ran} forward, {backward_ran} backward, of 96 each \
             (the rest: typed errors)"
        );
        assert!(
            backward_ran >= 3,
            "only {backward_ran} hostile linear backward calls got past validation"
        );
        // About 16 are expected (48 cases gave 3 to 12); fewer than 3 would mean validation
        // refuses nearly everything.
        assert!(
            ran >= 3,
            "only {ran} hostile linear calls got past validation"
        );
    }

    fn dim() -> impl Strategy<Value = usize> {
        prop_oneof![Just(0), 1usize..30, Just(1 << 31), Just(usize::MAX / 3)]
    }

    fn lambda() -> impl Strategy<Value = f32> {
        prop_oneof![
            12 => 0.5f32..=1.0,
            1 => Just(0.0),
            1 => Just(1.5),
            1 => Just(f32::NAN),
            1 => Just(f32::INFINITY)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
        /// Random shapes (zero, huge, q_len != kv_len, dims past 128), decays outside (0, 1],
        /// NaN eps and scale, chunk sizes from 0 up, either kernel, initial states of wrong
        /// sizes, and inputs with NaN or ±inf; each also through the backward, with a dO of the
        /// inputs' kind and the initial state as `d_final` (wrong sizes, non-causal).
        /// (Run by `hostile_linear_calls_include_calls_that_run`.)
        fn hostile_linear_calls_end_in_ok_or_a_typed_error(
            (batch, heads, len, other_len) in (dim(), dim(), dim(), dim()),
            dims in prop_oneof![Just((0usize, 0usize)), Just((129, 8)), Just((8, usize::MAX))],
            decay in prop::option::of(lambda()),
            eps in prop_oneof![10 => Just(1e-10f32), 1 => Just(f32::NAN), 1 => Just(-1.0)],
            scale in prop_oneof![10 => Just(None), 1 => Just(Some(f32::NAN)), 1 => Just(Some(0.0))],
            chunk in prop_oneof![6 => Just(None), 1 => Just(Some(0usize)), 6 => (1usize..80).prop_map(Some), 1 => Just(Some(5000))],
            kernel in prop_oneof![Just(LinearKernel::Auto), Just(LinearKernel::Chunked), Just(LinearKernel::Recurrent)],
            (causal, normalize) in (any::<bool>(), any::<bool>()),
            state_delta in prop_oneof![6 => Just(None), 6 => Just(Some(0i64)), 1 => Just(Some(-1)), 1 => Just(Some(1))],
            len_delta in prop_oneof![10 => Just(0i64), 1 => Just(-1), 1 => Just(1)],
            poison in 0usize..4,
            // Most cases keep the shape runnable, so options and values are what is hostile.
            sane in prop::option::weighted(0.85, (1usize..3, 1usize..3, 1usize..3, 1usize..70)),
        ) {
            let Some(engine) = engine(Path::F32) else {
                return Ok(());
            };
            let shape = match sane {
                Some((batch, kv_heads, group, len)) => Shape {
                    batch,
                    q_heads: kv_heads * group,
                    kv_heads,
                    q_len: len,
                    kv_len: len,
                    head_dim: 32,
                    value_dim: 32,
                },
                None => Shape {
                    batch,
                    q_heads: heads,
                    kv_heads: heads,
                    q_len: len,
                    kv_len: other_len,
                    head_dim: dims.0,
                    value_dim: dims.1,
                },
            };
            let decays = decay.map(|l| vec![l; shape.q_heads.min(64)]);
            let opts = LinearOptions {
                causal,
                feature_map: FeatureMap::EluPlusOne,
                decay: decays.as_deref(),
                normalize,
                eps,
                scale,
                kernel,
                chunk_size: chunk,
            };
            let small = shape.validate().is_ok() && shape.q_elems().max(shape.k_elems()).max(shape.v_elems()) < 1 << 20;
            let sized = |n: usize, delta: i64| {
                let n = if small { (n as i64 + delta).max(0) as usize } else { 7 };
                (0..n)
                    .map(|i| match (poison, i % 17) {
                        (1, 3) => f32::NAN,
                        (2, 5) => f32::INFINITY,
                        (3, 7) => f32::NEG_INFINITY,
                        _ => ((i * 31 % 23) as f32 - 11.0) / 11.0,
                    })
                    .collect::<Vec<f32>>()
            };
            // Element counts exist only for valid shapes; others get 7 elements.
            let (q, k, v) = if small {
                (
                    sized(shape.q_elems(), len_delta),
                    sized(shape.k_elems(), len_delta),
                    sized(shape.v_elems(), len_delta),
                )
            } else {
                (sized(0, 0), sized(0, 0), sized(0, 0))
            };
            let states = shape.batch.saturating_mul(shape.q_heads).saturating_mul(shape.head_dim);
            let initial = state_delta.map(|delta| LinearState {
                kv: sized(states.saturating_mul(shape.value_dim), delta),
                z: if normalize { sized(states, delta) } else { Vec::new() },
            });
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine.linear_attention_blocking(&shape, Layout::Bhsd, &opts, &q, &k, &v, initial.as_ref())
            }));
            let result = result.map_err(|_| TestCaseError::fail(format!("panicked: {shape:?} {opts:?}")))?;
            if let Err(err) = &result {
                prop_assert!(is_user_error(err), "{err:?} is not an error of the input: {shape:?} {opts:?}");
            }
            if let Ok(out) = result {
                prop_assert!(small && len_delta == 0, "Ok for a call with wrong lengths: {shape:?}");
                prop_assert_eq!(out.output.len(), shape.o_elems());
                prop_assert_eq!(out.state.kv.len(), states * shape.value_dim);
                // Against the reference, where it can say: with finite inputs, or without the
                // causal mask (the chunked kernel's masked products inside a chunk meet a
                // later token's non-finite key as 0·inf, which the reference never forms).
                if poison == 0 || !causal {
                    let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
                    let problem = LinearProblem {
                        causal,
                        feature_map: ReferenceMap::EluPlusOne,
                        decay: decays.as_ref().map(|d| wide(d)),
                        normalize,
                        ..LinearProblem::new(shape.batch, shape.q_heads, shape.kv_heads, shape.q_len, shape.head_dim, shape.value_dim, wflash_ref::Layout::Bhsd)
                    };
                    let initial = initial.as_ref().map(|s| ReferenceState { kv: wide(&s.kv), z: wide(&s.z) });
                    let reference = linear_forward(&problem, &wide(&q), &wide(&k), &wide(&v), initial.as_ref());
                    let what = format!("poison {poison}, {shape:?} {opts:?}");
                    agrees_up_to_association(&out.output, &reference.output).map_err(|e| TestCaseError::fail(format!("output {e}: {what}")))?;
                    agrees_up_to_association(&out.state.kv, &reference.state.kv).map_err(|e| TestCaseError::fail(format!("state {e}: {what}")))?;
                }
                RAN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let d_o = if small { sized(shape.o_elems(), len_delta) } else { sized(0, 0) };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine.linear_attention_backward_blocking(
                    &shape, Layout::Bhsd, &opts, &q, &k, &v, initial.as_ref(), &d_o, initial.as_ref(),
                )
            }));
            let result = result.map_err(|_| TestCaseError::fail(format!("backward panicked: {shape:?} {opts:?}")))?;
            if let Err(err) = &result {
                prop_assert!(is_user_error(err), "backward: {err:?} is not an error of the input: {shape:?} {opts:?}");
            }
            if let Ok(grads) = result {
                prop_assert!(small && len_delta == 0, "backward Ok for a call with wrong lengths: {shape:?}");
                prop_assert_eq!(grads.dq.len(), shape.q_elems());
                prop_assert_eq!(grads.d_initial.is_some(), initial.is_some());
                // Against the reference with finite inputs (as the forward, non-finite values
                // meet the masked products differently).
                if poison == 0 {
                    let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
                    let problem = LinearProblem {
                        causal,
                        feature_map: ReferenceMap::EluPlusOne,
                        decay: decays.as_ref().map(|d| wide(d)),
                        normalize,
                        ..LinearProblem::new(shape.batch, shape.q_heads, shape.kv_heads, shape.q_len, shape.head_dim, shape.value_dim, wflash_ref::Layout::Bhsd)
                    };
                    let state = initial.as_ref().map(|s| ReferenceState { kv: wide(&s.kv), z: wide(&s.z) });
                    let reference = linear_backward(&problem, &wide(&q), &wide(&k), &wide(&v), state.as_ref(), &wide(&d_o), state.as_ref());
                    let what = format!("{shape:?} {opts:?}");
                    for (name, got, want) in [("dq", &grads.dq, &reference.dq), ("dk", &grads.dk, &reference.dk), ("dv", &grads.dv, &reference.dv)] {
                        agrees_up_to_association(got, want).map_err(|e| TestCaseError::fail(format!("{name} {e}: {what}")))?;
                    }
                }
                BACKWARD_RAN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            // The engine is still usable.
            let spec = &specs()[0];
            prop_assert!(pollster::block_on(call(engine, spec)).0.len() == spec.shape.o_elems());
        }
    }
}

//! Linear attention on the GPU against the f64 reference (tests/src/linear.rs): a pairwise
//! covering grid over every option, storage path, layout, head grouping, kernel and way of
//! feeding the sequence (one call, pieces, token by token).

use wflash::{FeatureMap, Layout, LinearKernel};
use wflash_conformance::Verdict;
use wflash_conformance::grid::covering_rows;
use wflash_conformance::linear::{
    AXES, Feed, LinearCase, allowed, grid, run_linear_backward_case, run_linear_case,
};
use wflash_conformance::{Path, engine};

/// The cases this run takes (`WFLASH_SEEDS`, `WFLASH_GRID_SAMPLE`: see `grid::selected`).
fn selected(cases: Vec<LinearCase>) -> Vec<LinearCase> {
    wflash_conformance::grid::selected(cases, |c| c.seed).0
}

#[test]
fn linear_conformance_grid() {
    run_grid("linear", run_linear_case);
}

/// The same grid's gradients: dQ, dK, dV and the initial state's (each case's dO, and for
/// causal cases of even seed a d_final, drawn from its seed); cases fed in pieces train their
/// sequence in pieces (tests/src/linear.rs).
#[test]
fn linear_backward_grid() {
    run_grid("linear backward", run_linear_backward_case);
}

/// Runs the selected cases of the grid through `run`, writes the worst error ratio per path to
/// target/conformance/<name>.txt and fails with every failing case.
fn run_grid(name: &str, run: fn(&wflash::Engine, &LinearCase) -> Result<Verdict, String>) {
    let cases = selected(grid());
    let mut failures = Vec::new();
    let mut worst = std::collections::BTreeMap::<&str, f64>::new();
    for case in &cases {
        // None: no adapter (WFLASH_ALLOW_NO_GPU=1), or native f16 on one without it.
        let Some(engine) = engine(case.path) else {
            continue;
        };
        match run(engine, case) {
            Ok(outcome) => {
                let path = match case.path {
                    Path::F32 => "f32",
                    Path::F16Native => "f16 native",
                    Path::F16Packed => "f16 packed",
                    Path::Bf16 => "bf16",
                };
                let w = worst.entry(path).or_default();
                *w = w.max(outcome.ratio);
            }
            Err(err) => failures.push(format!("seed {:#x}: {err}", case.seed)),
        }
    }
    let summary = format!(
        "{name}: {} cases, worst error ratio per path {worst:.3?} (pass <= 1)\n",
        cases.len()
    );
    eprint!("{summary}");
    // Kept for the record (xtask test prints it), as the attention grids do.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/conformance");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join(format!("{}.txt", name.replace(' ', "_"))), summary);
    }
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn linear_grid_covers_every_option_pairwise_and_respects_exclusions() {
    let cases = grid();
    let rows = covering_rows(AXES, 0x11ea7, allowed);
    assert_eq!(rows.len(), cases.len());
    for (a, &size_a) in AXES.iter().enumerate() {
        for (b, &size_b) in AXES.iter().enumerate().skip(a + 1) {
            for va in 0..size_a {
                for vb in 0..size_b {
                    let covered = rows.iter().any(|r| r[a] == va && r[b] == vb);
                    assert_eq!(covered, allowed(a, va, b, vb), "pair ({a}={va}, {b}={vb})");
                }
            }
        }
    }
    for c in &cases {
        assert!(c.causal || (!c.decay && !c.initial && c.feed == Feed::OneCall));
    }
}

fn linear_shape() -> wflash::Shape {
    wflash::Shape {
        batch: 2,
        q_heads: 4,
        kv_heads: 2,
        q_len: 21,
        kv_len: 21,
        head_dim: 12,
        value_dim: 10,
    }
}

/// Every bad input of a linear call returns its typed error (each checked by variant), from the
/// host API and, for tensor types, from the GPU-resident one.
#[test]
fn bad_linear_input_is_a_typed_error() {
    use wflash::{Error, LinearOptions, LinearState, Shape};
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let s = linear_shape();
    let decay = vec![0.9f32; s.q_heads];
    let short_decay = vec![0.9f32; s.q_heads - 1];
    let zero_decay = [0.9, 0.0, 0.9, 0.9];
    let big_decay = [0.9, 1.5, 0.9, 0.9];
    let nan_decay = [f32::NAN; 4];
    let states = s.batch * s.q_heads * s.head_dim;
    let good_state = LinearState {
        kv: vec![0.0; states * s.value_dim],
        z: Vec::new(),
    };
    let short_state = LinearState {
        kv: vec![0.0; states * s.value_dim - 1],
        z: Vec::new(),
    };
    let z_state = LinearState {
        kv: vec![0.0; states * s.value_dim],
        z: vec![0.0; states],
    };
    let short_z_state = LinearState {
        kv: vec![0.0; states * s.value_dim],
        z: vec![0.0; states + 1],
    };
    let causal = LinearOptions::causal;
    type Expect = fn(&Error) -> bool;
    let invalid = |name: &'static str| move |e: &Error| matches!(e, Error::InvalidModifier { modifier, .. } if *modifier == name);
    type Check = Box<dyn Fn(&Error) -> bool>;
    type Row<'a> = (
        &'a str,
        Shape,
        LinearOptions<'a>,
        Option<&'a LinearState>,
        Check,
    );
    let cases: Vec<Row> = vec![
        (
            "q_len != kv_len",
            Shape { kv_len: 22, ..s },
            causal(),
            None,
            Box::new((|e| matches!(e, Error::Unsupported { .. })) as Expect),
        ),
        (
            "key dim 129",
            Shape { head_dim: 129, ..s },
            causal(),
            None,
            Box::new(
                (|e| {
                    matches!(
                        e,
                        Error::HeadDimUnsupported {
                            dim: "head_dim",
                            ..
                        }
                    )
                }) as Expect,
            ),
        ),
        (
            "value dim 200",
            Shape {
                value_dim: 200,
                ..s
            },
            causal(),
            None,
            Box::new(
                (|e| {
                    matches!(
                        e,
                        Error::HeadDimUnsupported {
                            dim: "value_dim",
                            ..
                        }
                    )
                }) as Expect,
            ),
        ),
        (
            "zero batch",
            Shape { batch: 0, ..s },
            causal(),
            None,
            Box::new((|e| matches!(e, Error::ZeroDimension { dim: "batch" })) as Expect),
        ),
        (
            "heads 4 over 3",
            Shape { kv_heads: 3, ..s },
            causal(),
            None,
            Box::new((|e| matches!(e, Error::HeadsNotDivisible { .. })) as Expect),
        ),
        (
            "decay too short",
            s,
            causal().with_decay(&short_decay),
            None,
            Box::new(
                (|e| {
                    matches!(
                        e,
                        Error::LengthMismatch {
                            tensor: "decay",
                            ..
                        }
                    )
                }) as Expect,
            ),
        ),
        (
            "decay 0",
            s,
            causal().with_decay(&zero_decay),
            None,
            Box::new(invalid("decay")),
        ),
        (
            "decay 1.5",
            s,
            causal().with_decay(&big_decay),
            None,
            Box::new(invalid("decay")),
        ),
        (
            "decay NaN",
            s,
            causal().with_decay(&nan_decay),
            None,
            Box::new(invalid("decay")),
        ),
        (
            "eps NaN",
            s,
            LinearOptions {
                eps: f32::NAN,
                ..causal()
            },
            None,
            Box::new(invalid("eps")),
        ),
        (
            "eps < 0",
            s,
            LinearOptions {
                eps: -1.0,
                ..causal()
            },
            None,
            Box::new(invalid("eps")),
        ),
        (
            "scale 0",
            s,
            causal().with_scale(0.0),
            None,
            Box::new((|e| matches!(e, Error::InvalidScale { .. })) as Expect),
        ),
        (
            "scale inf",
            s,
            causal().with_scale(f32::INFINITY),
            None,
            Box::new((|e| matches!(e, Error::InvalidScale { .. })) as Expect),
        ),
        (
            "chunk 0",
            s,
            causal().with_chunk_size(0),
            None,
            Box::new(invalid("chunk_size")),
        ),
        (
            "chunk 2048",
            s,
            causal().with_chunk_size(2048),
            None,
            Box::new(invalid("chunk_size")),
        ),
        (
            "non-causal with decay",
            s,
            LinearOptions::non_causal().with_decay(&decay),
            None,
            Box::new((|e| matches!(e, Error::Unsupported { .. })) as Expect),
        ),
        (
            "non-causal with a state",
            s,
            LinearOptions::non_causal(),
            Some(&good_state),
            Box::new((|e| matches!(e, Error::Unsupported { .. })) as Expect),
        ),
        (
            "non-causal recurrent",
            s,
            LinearOptions::non_causal().with_kernel(LinearKernel::Recurrent),
            None,
            Box::new((|e| matches!(e, Error::Unsupported { .. })) as Expect),
        ),
        (
            "state too short",
            s,
            causal(),
            Some(&short_state),
            Box::new(
                (|e| {
                    matches!(
                        e,
                        Error::LengthMismatch {
                            tensor: "initial kv state",
                            ..
                        }
                    )
                }) as Expect,
            ),
        ),
        (
            "z without the normaliser",
            s,
            causal(),
            Some(&z_state),
            Box::new(invalid("initial_state")),
        ),
        (
            "z too long",
            s,
            causal().with_normalizer(),
            Some(&short_z_state),
            Box::new(
                (|e| {
                    matches!(
                        e,
                        Error::LengthMismatch {
                            tensor: "initial z state",
                            ..
                        }
                    )
                }) as Expect,
            ),
        ),
    ];
    for (what, shape, opts, initial, expect) in &cases {
        // Inputs sized for the valid shape: a bad shape must fail on the shape, not on lengths.
        let (q, k, v) = (
            vec![0.5f32; s.q_elems()],
            vec![0.5f32; s.k_elems()],
            vec![0.5f32; s.v_elems()],
        );
        match engine.linear_attention_blocking(shape, Layout::Bhsd, opts, &q, &k, &v, *initial) {
            Err(e) => assert!(expect(&e), "{what}: unexpected error {e:?}"),
            Ok(_) => panic!("{what}: accepted"),
        }
        // The backward refuses the same calls the same way.
        let d_o = vec![0.5f32; s.o_elems()];
        match engine.linear_attention_backward_blocking(
            shape,
            Layout::Bhsd,
            opts,
            &q,
            &k,
            &v,
            *initial,
            &d_o,
            None,
        ) {
            Err(e) => assert!(expect(&e), "{what} (backward): unexpected error {e:?}"),
            Ok(_) => panic!("{what} (backward): accepted"),
        }
    }
    // The backward's own inputs: d_final (sizes, non-causal, z without the normaliser) and dO.
    let backward_cases: Vec<(&str, LinearOptions, &LinearState, Check)> = vec![
        (
            "d_final too short",
            causal(),
            &short_state,
            Box::new(
                (|e| {
                    matches!(
                        e,
                        Error::LengthMismatch {
                            tensor: "d_final kv state",
                            ..
                        }
                    )
                }) as Expect,
            ),
        ),
        (
            "d_final z too long",
            causal().with_normalizer(),
            &short_z_state,
            Box::new(
                (|e| {
                    matches!(
                        e,
                        Error::LengthMismatch {
                            tensor: "d_final z state",
                            ..
                        }
                    )
                }) as Expect,
            ),
        ),
        (
            "d_final z without the normaliser",
            causal(),
            &z_state,
            Box::new(invalid("d_final_state")),
        ),
        (
            "d_final for a non-causal call",
            LinearOptions::non_causal(),
            &good_state,
            Box::new((|e| matches!(e, Error::Unsupported { .. })) as Expect),
        ),
    ];
    let (q, k, v, d_o) = (
        vec![0.5f32; s.q_elems()],
        vec![0.5f32; s.k_elems()],
        vec![0.5f32; s.v_elems()],
        vec![0.5f32; s.o_elems()],
    );
    for (what, opts, d_final, expect) in &backward_cases {
        match engine.linear_attention_backward_blocking(
            &s,
            Layout::Bhsd,
            opts,
            &q,
            &k,
            &v,
            None,
            &d_o,
            Some(*d_final),
        ) {
            Err(e) => assert!(expect(&e), "{what}: unexpected error {e:?}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }
    let err = engine
        .linear_attention_backward_blocking(
            &s,
            Layout::Bhsd,
            &causal(),
            &q,
            &k,
            &v,
            None,
            &d_o[1..],
            None,
        )
        .expect_err("short d_o");
    assert!(
        matches!(err, Error::LengthMismatch { tensor: "d_o", .. }),
        "{err:?}"
    );
    // Lengths of Q, K, V.
    let (q, k, v) = (
        vec![0.5f32; s.q_elems()],
        vec![0.5f32; s.k_elems()],
        vec![0.5f32; s.v_elems()],
    );
    let err = engine
        .linear_attention_blocking(&s, Layout::Bhsd, &causal(), &q, &k[1..], &v, None)
        .expect_err("short k");
    assert!(
        matches!(err, Error::LengthMismatch { tensor: "k", .. }),
        "{err:?}"
    );
    // GPU-resident: mixed element types, and a state that is not f32.
    let qt = engine.upload(&q).expect("upload");
    let kt = engine
        .upload(
            &k.iter()
                .map(|&x| half::f16::from_f32(x))
                .collect::<Vec<_>>(),
        )
        .expect("upload");
    let vt = engine.upload(&v).expect("upload");
    let err = engine
        .linear_attention_gpu(&s, Layout::Bhsd, &causal(), &qt, &kt, &vt, None)
        .expect_err("f16 k with f32 q");
    assert!(
        matches!(err, Error::DTypeMismatch { tensor: "k", .. }),
        "{err:?}"
    );
    let kt = engine.upload(&k).expect("upload");
    let f16_state = wflash::GpuLinearState {
        kv: engine
            .upload(&vec![half::f16::ZERO; states * s.value_dim])
            .expect("upload"),
        z: None,
    };
    let err = engine
        .linear_attention_gpu(&s, Layout::Bhsd, &causal(), &qt, &kt, &vt, Some(&f16_state))
        .expect_err("f16 state");
    assert!(
        matches!(
            err,
            Error::DTypeMismatch {
                tensor: "initial kv state",
                ..
            }
        ),
        "{err:?}"
    );
    // The backward on GPU tensors: dO of another type, a d_final that is not f32.
    let d_o16 = engine
        .upload(&vec![half::f16::ZERO; s.o_elems()])
        .expect("upload");
    let err = engine
        .linear_attention_backward_gpu(
            &s,
            Layout::Bhsd,
            &causal(),
            &qt,
            &kt,
            &vt,
            None,
            &d_o16,
            None,
        )
        .expect_err("f16 d_o with f32 q");
    assert!(
        matches!(err, Error::DTypeMismatch { tensor: "d_o", .. }),
        "{err:?}"
    );
    let d_o32 = engine.upload(&vec![0.5f32; s.o_elems()]).expect("upload");
    let err = engine
        .linear_attention_backward_gpu(
            &s,
            Layout::Bhsd,
            &causal(),
            &qt,
            &kt,
            &vt,
            None,
            &d_o32,
            Some(&f16_state),
        )
        .expect_err("f16 d_final");
    assert!(
        matches!(
            err,
            Error::DTypeMismatch {
                tensor: "d_final kv state",
                ..
            }
        ),
        "{err:?}"
    );
}

/// A call longer than one invocation may loop (llvmpipe ends any loop after 65,535 steps) is
/// refused with the limit named, not computed wrong: tokens for the recurrent kernel, chunks
/// for the chunked one.
#[test]
fn linear_calls_past_the_sequential_limit_are_refused() {
    use wflash::{Error, LINEAR_MAX_SEQUENTIAL_STEPS, LinearOptions, Shape};
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let len = LINEAR_MAX_SEQUENTIAL_STEPS + 1;
    let s = Shape::mha(1, 1, len, 1);
    let x = vec![0.5f32; len];
    for opts in [
        LinearOptions::causal().with_kernel(LinearKernel::Recurrent),
        LinearOptions::causal().with_chunk_size(1),
    ] {
        let err = engine
            .linear_attention_blocking(&s, Layout::Bhsd, &opts, &x, &x, &x, None)
            .expect_err("past the limit");
        assert!(
            matches!(
                err,
                Error::TooLarge {
                    limit: "LINEAR_MAX_SEQUENTIAL_STEPS",
                    ..
                }
            ),
            "{opts:?}: {err:?}"
        );
    }
    // The backward's dK/dV invocation walks group × (chunk + head_dim + 3) + 3 iterations
    // (measured): 256 × (125 + 128 + 3) + 3 = 65539 is past the limit, 200 × 256 + 3 is not.
    let gqa = |q_heads| Shape {
        batch: 1,
        q_heads,
        kv_heads: 1,
        q_len: 125,
        kv_len: 125,
        head_dim: 128,
        value_dim: 4,
    };
    let opts = LinearOptions::causal().with_chunk_size(125);
    let plan = |q_heads| {
        engine.plan_linear_backward(
            &gqa(q_heads),
            Layout::Bhsd,
            &opts,
            wflash::DType::F32,
            None,
            None,
        )
    };
    assert!(matches!(
        plan(256),
        Err(Error::TooLarge {
            limit: "LINEAR_MAX_SEQUENTIAL_STEPS",
            ..
        })
    ));
    assert!(plan(200).is_ok());
}

/// Many chunks (65 at the default 64 tokens, and 316 at 13): the carried state crosses every
/// chunk boundary of a long sequence, with decay, the normaliser and GQA.
#[test]
fn long_sequences_carry_the_state_across_many_chunks() {
    for (chunk_size, feed) in [(None, Feed::OneCall), (Some(13), Feed::Pieces(2))] {
        let case = LinearCase {
            path: Path::F32,
            layout: Layout::Bshd,
            batch: 1,
            q_heads: 2,
            kv_heads: 1,
            len: 4100,
            key_dim: 16,
            value_dim: 24,
            causal: true,
            feature_map: FeatureMap::EluPlusOne,
            decay: true,
            normalize: true,
            kernel: LinearKernel::Chunked,
            chunk_size,
            initial: true,
            feed,
            seed: 0x10_4100,
        };
        let Some(engine) = engine(case.path) else {
            return;
        };
        let outcome = run_linear_case(engine, &case).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{chunk_size:?}: {outcome:?}");
        // The backward scans the state gradient back across the same boundaries.
        let outcome = run_linear_backward_case(engine, &case).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{chunk_size:?} backward: {outcome:?}");
    }
}

/// The backward has no atomics: the same call gives bitwise-identical gradients, alone and
/// with other calls in flight on other threads.
#[test]
fn linear_backward_is_deterministic() {
    use wflash::{LinearOptions, LinearState, Shape};
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let s = Shape {
        batch: 2,
        q_heads: 4,
        kv_heads: 2,
        q_len: 300,
        kv_len: 300,
        head_dim: 24,
        value_dim: 20,
    };
    let decay = wflash::lightning_decay(s.q_heads);
    let opts = LinearOptions::causal()
        .with_feature_map(FeatureMap::EluPlusOne)
        .with_decay(&decay)
        .with_normalizer()
        .with_chunk_size(32);
    let values = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    };
    let states = s.batch * s.q_heads * s.head_dim;
    let state = |seed| LinearState {
        kv: values(states * s.value_dim, seed),
        z: values(states, seed + 1).iter().map(|x| x.abs()).collect(),
    };
    let (q, k, v, d_o) = (
        values(s.q_elems(), 1),
        values(s.k_elems(), 2),
        values(s.v_elems(), 3),
        values(s.o_elems(), 4),
    );
    let (initial, d_final) = (state(5), state(7));
    let run = || {
        let g = engine
            .linear_attention_backward_blocking(
                &s,
                Layout::Bshd,
                &opts,
                &q,
                &k,
                &v,
                Some(&initial),
                &d_o,
                Some(&d_final),
            )
            .expect("backward");
        let d = g.d_initial.expect("an initial state was given");
        [g.dq, g.dk, g.dv, d.kv, d.z].map(|x| x.iter().map(|a| a.to_bits()).collect::<Vec<_>>())
    };
    let first = run();
    assert_eq!(run(), first, "a second call differs");
    let concurrent: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3).map(|_| scope.spawn(run)).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for got in concurrent {
        assert_eq!(got, first, "a concurrent call differs");
    }
}

/// The scratch pool (packed K/V, chunk states) serves repeated calls from what earlier ones gave
/// back, and never holds more than its cap, whatever the mix of shapes.
#[test]
fn the_scratch_pool_reuses_and_stays_under_its_cap() {
    use wflash::{Engine, EngineOptions, LinearOptions, Shape};
    let Some(shared) = engine(Path::F32) else {
        return;
    };
    let _ = shared;
    let cap = 2 << 20;
    let engine = Engine::new_blocking(EngineOptions {
        scratch_pool_bytes: cap,
        ..EngineOptions::default()
    })
    .expect("a second engine on the same adapter");
    let opts = LinearOptions::causal().with_kernel(LinearKernel::Chunked);
    let call = |len: usize| {
        let s = Shape::mha(1, 2, len, 16);
        let x = vec![0.25f32; s.q_elems()];
        engine
            .linear_attention_blocking(&s, Layout::Bhsd, &opts, &x, &x, &x, None)
            .expect("call")
    };
    let first = call(300);
    let before = engine.pool_stats();
    for _ in 0..5 {
        assert_eq!(
            call(300).output,
            first.output,
            "a reused resource changed the result"
        );
    }
    wflash_conformance::assert_reused(before, engine.pool_stats(), 5 * 3);
    // Many shapes: the pool evicts to stay under the cap.
    for len in (1..60).map(|i| i * 97) {
        call(len);
        let stats = engine.pool_stats();
        assert!(stats.bytes <= cap, "{stats:?}");
    }
}

/// Per-chunk states too large for one storage binding run the chunk passes in groups of heads
/// (whole kv heads' worth) at the same chunk size, forward and backward, and conform.
#[test]
fn chunk_states_too_large_for_one_binding_run_in_groups_of_heads() {
    use wflash::{EngineOptions, LinearOptions};
    if engine(Path::F32).is_none() {
        return;
    }
    // 256-texel lines hold 16 state rows of 64 floats (4 KiB); a head's 20 slots (19 chunks of
    // 16 tokens, and the total) × 8 rows take 10 lines (40 KiB): 96 KiB hold two heads' states
    // but not four, and every tensor (38 KiB at most).
    let (small, _device) = wflash_conformance::custom_device_engine(
        |l| {
            l.max_texture_dimension_2d = 256;
            l.max_storage_buffer_binding_size = 96 << 10;
        },
        wflash::wgpu::Features::empty(),
        EngineOptions {
            poison_outputs: true,
            ..Default::default()
        },
    );
    let case = LinearCase {
        path: Path::F32,
        layout: Layout::Bshd,
        batch: 1,
        q_heads: 4,
        kv_heads: 2,
        len: 300,
        key_dim: 8,
        value_dim: 8,
        causal: true,
        feature_map: FeatureMap::EluPlusOne,
        decay: true,
        normalize: true,
        kernel: LinearKernel::Chunked,
        chunk_size: Some(16),
        initial: true,
        feed: Feed::OneCall,
        seed: 0x10_6666,
    };
    let decay = case.decays();
    let opts: LinearOptions = case.options(decay.as_deref());
    let plan = small
        .plan_linear(&case.shape(), case.layout, &opts, wflash::DType::F32, None)
        .expect("plan");
    let chunks = plan.chunked.expect("chunked");
    assert_eq!((chunks.chunk, chunks.group_heads), (16, 2), "{chunks:?}");
    let forward = run_linear_case(&small, &case).unwrap_or_else(|e| panic!("{e}"));
    let backward = run_linear_backward_case(&small, &case).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("forward {forward:?}\nbackward {backward:?}");
}

/// A call whose scratch would pass the scratch pool's cap runs its chunk passes in groups of
/// heads (whole kv heads), each group packing only its own K, V, Q and ĝ rows into textures
/// sized for one group: its outputs, final state and gradients are bitwise those of one group,
/// over batches, GQA, both layouts, the normaliser and an initial state.
#[test]
fn scratch_past_the_pool_cap_runs_in_groups_of_heads_bitwise_equal() {
    use rand::SeedableRng;
    use wflash::{EngineOptions, LinearOptions, LinearState, Shape};
    let Some(whole) = engine(Path::F32) else {
        return;
    };
    // No scratch kept: every group is one kv head's query heads.
    let (grouped, _device) = wflash_conformance::custom_device_engine(
        |_| {},
        wflash::wgpu::Features::empty(),
        EngineOptions {
            scratch_pool_bytes: 0,
            poison_outputs: true,
            ..Default::default()
        },
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5c_7a7c);
    for (layout, batch, normalize) in [(Layout::Bhsd, 2, false), (Layout::Bshd, 3, true)] {
        let shape = Shape {
            batch,
            q_heads: 6,
            kv_heads: 3,
            q_len: 100,
            kv_len: 100,
            head_dim: 12,
            value_dim: 8,
        };
        let decay = [0.9, 0.95, 0.99, 0.8, 1.0, 0.97];
        let opts = LinearOptions {
            feature_map: FeatureMap::EluPlusOne,
            decay: Some(&decay),
            normalize,
            kernel: LinearKernel::Chunked,
            chunk_size: Some(16),
            ..Default::default()
        };
        let random =
            |rng: &mut rand::rngs::StdRng, n| wflash_conformance::random::<f32>(rng, n, 1.0).0;
        let (q, k, v) = (
            random(&mut rng, shape.q_elems()),
            random(&mut rng, shape.k_elems()),
            random(&mut rng, shape.v_elems()),
        );
        let states = batch * shape.q_heads * shape.head_dim;
        let state = |rng: &mut rand::rngs::StdRng| LinearState {
            kv: random(rng, states * shape.value_dim),
            z: if normalize {
                random(rng, states).iter().map(|z| z.abs()).collect()
            } else {
                Vec::new()
            },
        };
        let (initial, d_final) = (state(&mut rng), state(&mut rng));
        let d_o = random(&mut rng, shape.o_elems());
        let groups = |engine: &wflash::Engine| {
            let plan = engine
                .plan_linear_backward(&shape, layout, &opts, wflash::DType::F32, None, None)
                .expect("plan");
            let forward = engine
                .plan_linear(&shape, layout, &opts, wflash::DType::F32, None)
                .expect("plan");
            (
                forward.chunked.expect("chunked").group_heads,
                plan.forward.chunked.expect("chunked").group_heads,
            )
        };
        assert_eq!(groups(whole), (6, 6));
        assert_eq!(groups(&grouped), (2, 2));
        let run = |engine: &wflash::Engine| {
            let fwd = engine
                .linear_attention_blocking(&shape, layout, &opts, &q, &k, &v, Some(&initial))
                .expect("forward");
            let bwd = engine
                .linear_attention_backward_blocking(
                    &shape,
                    layout,
                    &opts,
                    &q,
                    &k,
                    &v,
                    Some(&initial),
                    &d_o,
                    Some(&d_final),
                )
                .expect("backward");
            let d_initial = bwd.d_initial.expect("an initial state's gradient");
            [
                fwd.output,
                fwd.state.kv,
                fwd.state.z,
                bwd.dq,
                bwd.dk,
                bwd.dv,
                d_initial.kv,
                d_initial.z,
            ]
            .map(|x| x.iter().map(|a| a.to_bits()).collect::<Vec<u32>>())
        };
        let names = [
            "O",
            "final kv",
            "final z",
            "dQ",
            "dK",
            "dV",
            "d_initial kv",
            "d_initial z",
        ];
        for ((name, a), b) in names.iter().zip(run(whole)).zip(run(&grouped)) {
            assert!(
                a == b,
                "{layout:?} batch {batch}: {name} differs between one group and groups of 2 heads"
            );
        }
    }
}

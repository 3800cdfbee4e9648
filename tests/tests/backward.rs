//! The backward pass on the GPU: every gradient of softmax and sigmoid attention (dQ, dK, dV,
//! and the bias's, the sinks' and the temperature's) judged against the f64 reference's by
//! FlashAttention's backward standard, over the backward grid (`grid::backward_cases`: every
//! axis of the conformance grid, head dims 1-256) and the modifier grid (each modifier alone,
//! with causal masks, and with each other).

use std::io::Write;

use wflash_conformance::backward::run_backward_case;
use wflash_conformance::{Case, Path, engine, grid};

/// Runs `cases` of `path` and writes a one-line summary to target/conformance/<name>.txt.
fn run(name: &str, cases: Vec<Case>, path: Path) {
    let path_cases = cases.into_iter().filter(|c| c.path == path).collect();
    let (cases, seeds_given) = grid::selected(path_cases, |c: &Case| c.seed);
    let Some(engine) = engine(path) else {
        return;
    };
    let name = format!("backward-{name}{path:?}");
    let (mut failures, mut worst, mut ran) = (Vec::new(), 0.0f64, 0);
    for case in &cases {
        let start = std::time::Instant::now();
        let result = run_backward_case(engine, case);
        eprintln!("{case:?} {:.1} s", start.elapsed().as_secs_f64());
        match result {
            Ok(verdict) => {
                // Each gradient's error over its bound (visible with --nocapture).
                let ratios: Vec<String> = (verdict.outputs.iter())
                    .map(|o| format!("{} {:.3}", o.name, o.err / o.bound))
                    .collect();
                eprintln!("  {}", ratios.join(", "));
                ran += 1;
                worst = worst.max(verdict.ratio);
            }
            Err(msg) => failures.push(msg),
        }
    }
    let summary = format!("{name}: {ran} cases, worst error ratio {worst:.3} (pass <= 1)\n");
    eprint!("{summary}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/conformance");
    if std::fs::create_dir_all(&dir).is_ok()
        && let Ok(mut f) = std::fs::File::create(dir.join(format!("{name}.txt")))
    {
        let _ = f.write_all(summary.as_bytes());
    }
    assert!(seeds_given || !cases.is_empty(), "no cases for {name}");
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn backward_grid_covers_every_pair_of_axis_values() {
    let cases = grid::backward_cases();
    // Every head dim meets every sequence pair, causal mode, variant and path.
    for &d in &grid::BACKWARD_HEAD_DIMS {
        for &seq in &grid::BACKWARD_SEQ_LENS {
            assert!(
                (cases.iter())
                    .any(|c| c.shape.head_dim == d && (c.shape.q_len, c.shape.kv_len) == seq),
                "head dim {d} never with {seq:?}"
            );
        }
        for path in Path::ALL {
            assert!((cases.iter()).any(|c| c.shape.head_dim == d && c.path == path));
        }
        for causal in grid::CAUSAL {
            assert!((cases.iter()).any(|c| c.shape.head_dim == d && c.causal == causal));
        }
        for variant in grid::VARIANTS {
            assert!((cases.iter()).any(|c| c.shape.head_dim == d && c.variant == variant));
        }
    }
}

#[test]
fn backward_f32() {
    run("", grid::backward_cases(), Path::F32);
}

#[test]
fn backward_f16_native() {
    run("", grid::backward_cases(), Path::F16Native);
}

#[test]
fn backward_f16_packed() {
    run("", grid::backward_cases(), Path::F16Packed);
}

#[test]
fn backward_bf16() {
    run("", grid::backward_cases(), Path::Bf16);
}

/// Every modifier alone, with causal masks and with each other (the modifier grid).
#[test]
fn backward_modifiers_every_path() {
    for path in Path::ALL {
        run("modifiers-", grid::modifier_cases(), path);
    }
}

/// Seeded random normals.
fn normals(n: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect()
}

/// Q, K, V and dO of `shape`, and the forward's O and LSE under `opts`.
fn training_step_inputs(
    engine: &wflash::Engine,
    shape: &wflash::Shape,
    opts: &wflash::AttentionOptions,
    seed: u64,
) -> [Vec<f32>; 6] {
    let q = normals(shape.q_elems(), seed);
    let k = normals(shape.k_elems(), seed + 1);
    let v = normals(shape.v_elems(), seed + 2);
    let d_o = normals(shape.o_elems(), seed + 3);
    let fwd = engine
        .attention_blocking(shape, wflash::Layout::Bhsd, opts, &q, &k, &v)
        .expect("forward");
    let lse = fwd.lse.unwrap_or_default();
    [q, k, v, fwd.output, lse, d_o]
}

/// The backward of one training step's inputs (`training_step_inputs`; an empty LSE is
/// sigmoid's none), BHSD.
fn backward_of(
    engine: &wflash::Engine,
    shape: &wflash::Shape,
    opts: &wflash::AttentionOptions,
    [q, k, v, o, lse, d_o]: &[Vec<f32>; 6],
) -> wflash::AttentionGrads<f32> {
    let lse = (!lse.is_empty()).then_some(lse.as_slice());
    let layout = wflash::Layout::Bhsd;
    engine
        .attention_backward_blocking(shape, layout, opts, q, k, v, o, lse, d_o)
        .expect("backward")
}

/// Under small buffer limits a host-slice backward runs as several dispatches over batch, as
/// the forward does, and its gradients conform: those given per batch element (a bias with a
/// batch axis, the temperature) in order, those summed over the batch (the sinks', a bias's
/// without a batch axis) added up. The whole call does not plan within the limits, so a
/// conforming result is a split one. The forward of the sigmoid case splits too: its bias has
/// a batch axis, which counts in the forward's runs.
#[test]
fn host_backward_splits_over_batch_under_small_limits() {
    use wflash::{Error, Layout, Modifier, Shape, Variant};
    use wflash_conformance::{BiasForm, Mods, buffer_limited_engine};
    if engine(Path::F32).is_none() {
        return;
    }
    // 64 KiB bindings: one batch element's Q is 4·33·24·4 B = 12.4 KiB and its bias gradient
    // 4·33·40·4 B = 20.6 KiB, so batch 9 takes several dispatches.
    let small = buffer_limited_engine(64 << 10);
    let shape = Shape {
        batch: 9,
        q_heads: 4,
        kv_heads: 2,
        q_len: 33,
        kv_len: 40,
        head_dim: 24,
        value_dim: 24,
    };
    let mods = |on: &[Modifier], per_batch| Mods {
        on: on.iter().copied().collect(),
        bias_form: BiasForm {
            per_batch,
            per_head: true,
            f16: false,
        },
    };
    use Modifier::{Bias, KeyMask, Sinks, Temperature};
    let cases = [
        Case {
            layout: Layout::Bshd,
            mods: mods(&[Bias, KeyMask, Sinks, Temperature], false),
            ..Case::softmax(shape, Path::F32, 91)
        },
        Case {
            variant: Variant::Sigmoid { bias: None },
            mods: mods(&[Bias, KeyMask, Temperature], true),
            ..Case::softmax(shape, Path::F16Packed, 92)
        },
    ];
    for case in &cases {
        let data = case.data();
        let opts = case.options(&data).with_bias_grad();
        let dtype = case.path.dtype();
        let err = (small.plan_backward(&case.shape, case.layout, &opts, dtype)).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{err}");
        let verdict = run_backward_case(&small, case).unwrap_or_else(|e| panic!("{e}"));
        assert!(verdict.ratio <= 1.0, "{case:?}: {}", verdict.ratio);
    }
    // Batch 4 fits every input (49.6 KiB of Q) but not the broadcast bias's gradient before
    // its sum over batch (4 × 20.6 KiB): the plan says so, rather than a buffer failing to be
    // made (`Error::Internal`) when a GPU-tensor call records it.
    let case = Case {
        shape: Shape { batch: 4, ..shape },
        ..cases[0]
    };
    let data = case.data();
    let opts = case.options(&data).with_bias_grad();
    let err =
        (small.plan_backward(&case.shape, case.layout, &opts, case.path.dtype())).unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { hint, .. } if hint.contains("bias's gradient")),
        "{err}"
    );
}

/// Mismatched O, LSE and dO, an LSE from another call's shape, an LSE where sigmoid has none
/// or none where softmax needs one, and bad options: each a typed error before any dispatch.
#[test]
fn bad_backward_input_is_a_typed_error() {
    use wflash::{AttentionOptions, Error, Layout, Shape};
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let shape = Shape {
        batch: 1,
        q_heads: 2,
        kv_heads: 1,
        q_len: 9,
        kv_len: 11,
        head_dim: 8,
        value_dim: 8,
    };
    let softmax = AttentionOptions::softmax();
    let [q, k, v, o, lse, d_o] = training_step_inputs(engine, &shape, &softmax, 1);
    let run = |opts: &AttentionOptions, o: &[f32], lse: Option<&[f32]>, d_o: &[f32]| {
        engine.attention_backward_blocking(&shape, Layout::Bhsd, opts, &q, &k, &v, o, lse, d_o)
    };
    assert!(run(&softmax, &o, Some(&lse), &d_o).is_ok());
    let short = |x: &[f32]| x[..x.len() - 1].to_vec();
    let err = run(&softmax, &short(&o), Some(&lse), &d_o).unwrap_err();
    assert!(
        matches!(err, Error::LengthMismatch { tensor: "o", .. }),
        "{err}"
    );
    let err = run(&softmax, &o, Some(&lse), &short(&d_o)).unwrap_err();
    assert!(
        matches!(err, Error::LengthMismatch { tensor: "d_o", .. }),
        "{err}"
    );
    // The LSE of a call with other query rows.
    let other = vec![0.0; lse.len() + shape.q_heads];
    let err = run(&softmax, &o, Some(&other), &d_o).unwrap_err();
    assert!(
        matches!(err, Error::LengthMismatch { tensor: "lse", .. }),
        "{err}"
    );
    let err = run(&softmax, &o, None, &d_o).unwrap_err();
    assert!(matches!(err, Error::Lse(_)), "{err}");
    let err = run(&AttentionOptions::sigmoid(), &o, Some(&lse), &d_o).unwrap_err();
    assert!(matches!(err, Error::Lse(_)), "{err}");
    let err = run(&softmax.with_scale(f32::NAN), &o, Some(&lse), &d_o).unwrap_err();
    assert!(matches!(err, Error::InvalidScale { .. }), "{err}");
    // GPU tensors: an O of another element type.
    let t = |x: &[f32]| engine.upload(x).unwrap();
    let o16: Vec<half::f16> = o.iter().map(|&x| half::f16::from_f32(x)).collect();
    let err = engine
        .attention_backward_gpu(
            &shape,
            Layout::Bhsd,
            &softmax,
            &t(&q),
            &t(&k),
            &t(&v),
            &engine.upload(&o16).unwrap(),
            Some(&t(&lse)),
            &t(&d_o),
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::DTypeMismatch { tensor: "o", .. }),
        "{err}"
    );
}

/// Rows that see no key (bottom-right causal with more queries than keys, a key mask hiding
/// a whole batch element) get zero gradients, and nothing is NaN.
#[test]
fn fully_masked_rows_have_zero_gradients() {
    use wflash::{AttentionOptions, Causal, Shape};
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let shape = Shape {
        batch: 2,
        q_heads: 2,
        kv_heads: 2,
        q_len: 20,
        kv_len: 7,
        head_dim: 16,
        value_dim: 16,
    };
    // Batch element 1 has no key at all.
    let mask: Vec<bool> = (0..2 * 7).map(|j| j < 7).collect();
    let sinks = [0.5f32, -0.5];
    for opts in [
        AttentionOptions::softmax().with_causal(Causal::BottomRight),
        AttentionOptions::sigmoid().with_causal(Causal::BottomRight),
        AttentionOptions::softmax()
            .with_key_mask(&mask)
            .with_sinks(&sinks),
    ] {
        let g = backward_of(
            engine,
            &shape,
            &opts,
            &training_step_inputs(engine, &shape, &opts, 7),
        );
        let all = g.dq.iter().chain(&g.dk).chain(&g.dv);
        assert!(all.clone().all(|x| x.is_finite()), "{opts:?}");
        for b in 0..2 {
            for h in 0..2 {
                for i in 0..20 {
                    // Causal: rows 0..13 see nothing; key mask: all of batch 1.
                    let blind = if opts.key_mask.is_some() {
                        b == 1
                    } else {
                        i < 13
                    };
                    let row = ((b * 2 + h) * 20 + i) * 16;
                    if blind {
                        assert!(g.dq[row..row + 16].iter().all(|&x| x == 0.0), "{opts:?}");
                    }
                }
            }
        }
        if let Some(d_sinks) = &g.d_sinks {
            assert!(d_sinks.iter().all(|x| x.is_finite()));
        }
    }
}

/// The same call twice gives bitwise-identical gradients, and so do 8 concurrent tasks
/// against the same calls made one by one.
#[test]
fn backward_is_deterministic_alone_and_concurrent() {
    use wflash::{AttentionOptions, Causal, Layout, Shape};
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let shape = Shape {
        batch: 2,
        q_heads: 4,
        kv_heads: 2,
        q_len: 70,
        kv_len: 90,
        head_dim: 24,
        value_dim: 24,
    };
    static SINKS: [f32; 4] = [0.3, -1.0, 0.5, 2.0];
    let opts = AttentionOptions::softmax()
        .with_causal(Causal::BottomRight)
        .with_sinks(&SINKS);
    let calls: Vec<[Vec<f32>; 6]> = (0..8)
        .map(|i| training_step_inputs(engine, &shape, &opts, 100 + 10 * i))
        .collect();
    let bits = |g: &wflash::AttentionGrads<f32>| {
        let all = g.dq.iter().chain(&g.dk).chain(&g.dv);
        all.chain(g.d_sinks.as_deref().unwrap_or(&[]))
            .map(|x| x.to_bits())
            .collect::<Vec<u32>>()
    };
    let call = |inputs: &[Vec<f32>; 6]| bits(&backward_of(engine, &shape, &opts, inputs));
    let serial: Vec<Vec<u32>> = calls.iter().map(call).collect();
    assert_eq!(serial[0], call(&calls[0]), "the same call twice");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let concurrent: Vec<Vec<u32>> = runtime.block_on(async {
        let tasks: Vec<_> = (calls.iter().cloned())
            .map(|[q, k, v, o, lse, d_o]| {
                let engine = engine.clone();
                let opts = AttentionOptions::softmax()
                    .with_causal(Causal::BottomRight)
                    .with_sinks(&SINKS);
                tokio::spawn(async move {
                    let g = engine
                        .attention_backward(
                            &shape,
                            Layout::Bhsd,
                            &opts,
                            &q,
                            &k,
                            &v,
                            &o,
                            Some(&lse),
                            &d_o,
                        )
                        .await
                        .unwrap();
                    let all = g.dq.iter().chain(&g.dk).chain(&g.dv);
                    all.chain(g.d_sinks.as_deref().unwrap_or(&[]))
                        .map(|x| x.to_bits())
                        .collect::<Vec<u32>>()
                })
            })
            .collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.unwrap());
        }
        out
    });
    assert_eq!(
        serial, concurrent,
        "8 concurrent tasks against serial calls"
    );
}

/// A backward at N = 16384 under a memory budget that an N×N score matrix alone would exceed
/// (O(N) extra memory). Checked by two identities that need no reference: softmax rows sum to
/// one, so Σ_j dV_j = Σ_i dO_i; and each row's dS sums to zero, so Σ_j dK_j = 0.
#[test]
fn backward_at_16384_fits_a_budget_below_one_score_matrix() {
    use wflash::{AttentionOptions, Causal, Engine, EngineOptions, Shape};
    let n = 16384;
    let budget = 256u64 << 20;
    assert!(budget < (n * n * 4) as u64);
    let engine = match Engine::new_blocking(EngineOptions {
        memory_budget_bytes: Some(budget),
        poison_outputs: true,
        tuning: wflash::TuningSource::Off,
        ..Default::default()
    }) {
        Ok(engine) => engine,
        Err(_) if std::env::var("WFLASH_ALLOW_NO_GPU").is_ok_and(|v| v == "1") => return,
        Err(err) => panic!("no GPU adapter ({err})"),
    };
    let shape = Shape::mha(1, 1, n, 64);
    let opts = AttentionOptions::softmax().with_causal(Causal::BottomRight);
    let inputs = training_step_inputs(&engine, &shape, &opts, 16384);
    let g = backward_of(&engine, &shape, &opts, &inputs);
    let d_o = &inputs[5];
    let column_sums = |x: &[f32]| {
        let mut sums = vec![0.0f64; 64];
        for row in x.chunks(64) {
            sums.iter_mut()
                .zip(row)
                .for_each(|(s, &a)| *s += f64::from(a));
        }
        sums
    };
    let (dv, d_o_sum, dk) = (column_sums(&g.dv), column_sums(d_o), column_sums(&g.dk));
    for c in 0..64 {
        assert!(
            (dv[c] - d_o_sum[c]).abs() < 1e-2,
            "column {c}: Σ dV {} vs Σ dO {}",
            dv[c],
            d_o_sum[c]
        );
        assert!(dk[c].abs() < 1e-2, "column {c}: Σ dK {}", dk[c]);
    }
    assert!(g.dq.iter().all(|x| x.is_finite()));
}

/// NaN in dO, or in V (then in the forward's O too), reaches exactly the gradients the f64
/// reference says it reaches. With full attention every row sees every key: a NaN in row i of
/// dO makes dQ_i, every dK_j and a column of every dV_j NaN; one in V, every dQ and dK.
#[test]
fn nan_in_d_o_and_v_propagates_as_the_reference_says() {
    use wflash::{AttentionOptions, Layout, Shape};
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let shape = Shape {
        batch: 1,
        q_heads: 2,
        kv_heads: 1,
        q_len: 13,
        kv_len: 17,
        head_dim: 8,
        value_dim: 8,
    };
    for opts in [AttentionOptions::softmax(), AttentionOptions::sigmoid()] {
        for poisoned in ["d_o", "v"] {
            let mut inputs = training_step_inputs(engine, &shape, &opts, 3);
            match poisoned {
                "d_o" => inputs[5][5 * 8 + 3] = f32::NAN,
                _ => {
                    // The forward of the poisoned V gives the backward its O and LSE.
                    inputs[2][7 * 8 + 2] = f32::NAN;
                    let [q, k, v, ..] = &inputs;
                    let fwd = engine
                        .attention_blocking(&shape, Layout::Bhsd, &opts, q, k, v)
                        .unwrap();
                    (inputs[3], inputs[4]) = (fwd.output, fwd.lse.unwrap_or_default());
                }
            }
            let g = backward_of(engine, &shape, &opts, &inputs);
            let p = wflash_conformance::reference_problem(&shape, Layout::Bhsd, &opts);
            let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
            let [q, k, v, d_o] = [0, 1, 2, 5].map(|i| wide(&inputs[i]));
            let truth = wflash_ref::backward(&p, &q, &k, &v, &d_o);
            assert!(truth.dq.iter().any(|x| x.is_nan()), "the reference has NaN");
            for (name, got, want) in [
                ("dq", &g.dq, &truth.dq),
                ("dk", &g.dk, &truth.dk),
                ("dv", &g.dv, &truth.dv),
            ] {
                let got: Vec<bool> = got.iter().map(|x| x.is_nan()).collect();
                let want: Vec<bool> = want.iter().map(|x| x.is_nan()).collect();
                assert_eq!(got, want, "{opts:?}, NaN in {poisoned}: {name}'s NaNs");
            }
        }
    }
}

/// On a CPU adapter, a backward whose key pass would loop past llvmpipe's 65535 iterations
/// per invocation (4 query rows a step, over every head of a GQA group), or whose bias
/// gradient's reduction would, is refused with `TooLarge` at plan time; the same rows with
/// fewer heads per group plan.
#[test]
fn backward_past_the_cpu_loop_limit_is_too_large() {
    use wflash::{AttentionOptions, DType, Error, Layout, Shape};
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    if engine.info().device_type != wflash::wgpu::DeviceType::Cpu {
        return;
    }
    let shape = |kv_heads| Shape {
        batch: 1,
        q_heads: 8,
        kv_heads,
        q_len: 40_000,
        kv_len: 64,
        head_dim: 16,
        value_dim: 16,
    };
    let opts = AttentionOptions::softmax();
    // 8 heads per kv head × 10,000 steps of 4 rows.
    let err = engine
        .plan_backward(&shape(1), Layout::Bhsd, &opts, DType::F32)
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    // 1 head per kv head × 10,000 steps.
    assert!(
        engine
            .plan_backward(&shape(8), Layout::Bhsd, &opts, DType::F32)
            .is_ok()
    );
    // The gradient of a bias broadcast over batch and heads sums batch × heads shares: 256 ×
    // (256 + 1) iterations are past the limit (measured: the last batch element's share was
    // lost), 256 × (200 + 1) are within it.
    let values = [0.0f32; 64];
    let bias = wflash::Bias {
        values: wflash::BiasValues::F32(&values),
        batch: 1,
        heads: 1,
    };
    let broadcast = AttentionOptions::softmax().with_bias(bias).with_bias_grad();
    let many = |heads| Shape {
        batch: 256,
        q_heads: heads,
        kv_heads: heads,
        q_len: 8,
        kv_len: 8,
        head_dim: 4,
        value_dim: 4,
    };
    let err = engine
        .plan_backward(&many(256), Layout::Bhsd, &broadcast, DType::F32)
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    assert!(
        engine
            .plan_backward(&many(200), Layout::Bhsd, &broadcast, DType::F32)
            .is_ok()
    );
}

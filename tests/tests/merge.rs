//! The public merge of partial attention results (`Engine::merge_attention`): attention over
//! keys split into parts and merged is attention over all the keys, judged like the forward;
//! the merge itself against the f64 reference merge, −∞ and NaN LSEs included; bad input is a
//! typed error before anything is dispatched.

use rand::{Rng, SeedableRng};
use wflash::{AttentionOptions, DType, Element, Error, Layout, OutputShape, Shape};
use wflash_conformance::linear::take_tokens;
use wflash_conformance::{Output, Path, engine, judge, random, reference_problem};
use wflash_ref::merge::{Part, merge};

/// One attention call over all the keys and, from the same inputs, calls over the key ranges
/// `cuts` splits them into, merged (host slices, and GPU tensors, bitwise alike): the merge is
/// judged against the f64 truth of the whole call with the forward's standard. A key mask
/// hides the first part's keys from batch element 1, so those rows merge a part that saw no
/// key (LSE −∞).
fn check_split<T: Element>(path: Path, layout: Layout, cuts: &[usize], seed: u64) {
    let Some(engine) = engine(path) else {
        return;
    };
    let shape = Shape {
        batch: 2,
        q_heads: 4,
        kv_heads: 2,
        q_len: 5,
        kv_len: 150,
        head_dim: 32,
        value_dim: 24,
    };
    let mut key_mask = vec![true; shape.batch * shape.kv_len];
    key_mask[shape.kv_len..shape.kv_len + cuts[0]].fill(false);
    let opts = AttentionOptions::softmax().with_key_mask(&key_mask);
    let p = reference_problem(&shape, layout, &opts);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (q, q32) = random::<T>(&mut rng, p.q_elems(), 1.0);
    let (k, k32) = random::<T>(&mut rng, p.k_elems(), 1.0);
    let (v, v32) = random::<T>(&mut rng, p.v_elems(), 1.0);

    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(shape.kv_len);
    let parts: Vec<_> = bounds
        .windows(2)
        .map(|w| {
            let range = w[0]..w[1];
            let part = Shape {
                kv_len: range.len(),
                ..shape
            };
            let k_dims = [shape.batch, shape.kv_heads, shape.kv_len, shape.head_dim];
            let v_dims = [shape.batch, shape.kv_heads, shape.kv_len, shape.value_dim];
            let mask: Vec<bool> = (0..shape.batch)
                .flat_map(|b| key_mask[b * shape.kv_len..][range.clone()].to_vec())
                .collect();
            let opts = AttentionOptions::softmax().with_key_mask(&mask);
            let (k, v) = (
                take_tokens(&k, layout, k_dims, range.clone()),
                take_tokens(&v, layout, v_dims, range),
            );
            let out = engine
                .attention_blocking(&part, layout, &opts, &q, &k, &v)
                .expect("a part's attention");
            (out.output, out.lse.expect("softmax has an LSE"))
        })
        .collect();
    let rows = shape.output_shape();
    let slices: Vec<(&[T], &[f32])> = parts.iter().map(|(o, l)| (&o[..], &l[..])).collect();
    let merged = engine
        .merge_attention_blocking(&rows, layout, &slices)
        .expect("merge");
    let merged_lse = merged.lse.expect("the merge's LSE");
    assert!(
        !merged_lse.contains(&f32::NEG_INFINITY),
        "every row sees some key"
    );

    // The GPU-tensor path gives the same bits.
    let tensors: Vec<_> = parts
        .iter()
        .map(|(o, l)| (engine.upload(o).unwrap(), engine.upload(l).unwrap()))
        .collect();
    let refs: Vec<_> = tensors.iter().map(|(o, l)| (o, l)).collect();
    let gpu = engine
        .merge_attention_gpu(&rows, layout, &refs)
        .expect("merge");
    let bits = |x: &[f32]| x.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
    let gpu_output: Vec<T> = engine.read_blocking(&gpu.output).unwrap();
    let gpu_lse: Vec<f32> = engine.read_blocking(gpu.lse.as_ref().unwrap()).unwrap();
    let narrow = |x: &[T]| x.iter().map(|a| a.to_f32()).collect::<Vec<f32>>();
    assert_eq!(bits(&narrow(&gpu_output)), bits(&narrow(&merged.output)));
    assert_eq!(bits(&gpu_lse), bits(&merged_lse));

    let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    let truth = wflash_ref::forward(&p, &wide(&q32), &wide(&k32), &wide(&v32));
    let store = |x: f32| T::from_f32(x).to_f32();
    let naive = wflash_ref::naive::forward_f32(&p, &q32, &k32, &v32, store);
    let what = format!("{path:?} {layout:?} cuts {cuts:?} seed {seed}");
    let verdict = judge(
        &what,
        vec![
            Output::forward(
                "O",
                wide(&narrow(&merged.output)),
                &truth.output,
                &naive.output,
            ),
            Output::forward("LSE", wide(&merged_lse), &truth.lse, &naive.lse)
                .slack_scaled_to_truth(),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{what}: {verdict:?}");
}

#[test]
fn merged_key_splits_are_attention_over_all_keys() {
    check_split::<f32>(Path::F32, Layout::Bhsd, &[40], 0x3e_0001);
    check_split::<f32>(Path::F32, Layout::Bshd, &[10, 75, 130], 0x3e_0002);
    check_split::<half::f16>(Path::F16Native, Layout::Bshd, &[64], 0x3e_0003);
    check_split::<half::f16>(Path::F16Packed, Layout::Bhsd, &[33, 100], 0x3e_0004);
    check_split::<half::bf16>(Path::Bf16, Layout::Bhsd, &[1, 149], 0x3e_0005);
}

/// The merge alone against the f64 reference merge on random parts: LSEs spread over tens of
/// units, parts that saw no key (LSE −∞, a NaN output: it must not reach the result), a row no
/// part saw (O = 0, LSE −∞), a NaN LSE and a +∞ LSE (the row is NaN).
#[test]
fn the_merge_matches_the_reference_merge() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x3e_0100);
    for (layout, parts_count) in [(Layout::Bhsd, 1), (Layout::Bshd, 3), (Layout::Bhsd, 7)] {
        let shape = OutputShape {
            batch: 2,
            heads: 3,
            len: 9,
            value_dim: 13,
        };
        let ref_layout = match layout {
            Layout::Bhsd => wflash_ref::Layout::Bhsd,
            Layout::Bshd => wflash_ref::Layout::Bshd,
        };
        // The LSE row of each output element.
        let mut row_of = vec![0; shape.o_elems()];
        for b in 0..shape.batch {
            for h in 0..shape.heads {
                for t in 0..shape.len {
                    for d in 0..shape.value_dim {
                        let i =
                            ref_layout.index(b, h, t, d, shape.heads, shape.len, shape.value_dim);
                        row_of[i] = (b * shape.heads + h) * shape.len + t;
                    }
                }
            }
        }
        let rows = shape.lse_elems();
        let mut parts: Vec<(Vec<f32>, Vec<f32>)> = (0..parts_count)
            .map(|_| {
                let output = random::<f32>(&mut rng, shape.o_elems(), 1.0).1;
                let lse = (0..rows)
                    .map(|_| rng.random_range(-20.0f32..20.0))
                    .collect();
                (output, lse)
            })
            .collect();
        // Row 0 seen by no part, row 1 by the last part only; rows 2 and 3 a NaN and a +∞.
        for (s, (output, lse)) in parts.iter_mut().enumerate() {
            for row in [0, 1] {
                if row == 0 || s + 1 < parts_count {
                    lse[row] = f32::NEG_INFINITY;
                    for (x, &r) in output.iter_mut().zip(&row_of) {
                        if r == row {
                            *x = f32::NAN;
                        }
                    }
                }
            }
        }
        parts[0].1[2] = f32::NAN;
        parts[parts_count - 1].1[3] = f32::INFINITY;
        let slices: Vec<(&[f32], &[f32])> = parts.iter().map(|(o, l)| (&o[..], &l[..])).collect();
        let merged = engine
            .merge_attention_blocking(&shape, layout, &slices)
            .expect("merge");
        let lse = merged.lse.expect("an LSE");

        let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
        let widened: Vec<_> = parts.iter().map(|(o, l)| (wide(o), wide(l))).collect();
        let truth = merge(
            &shape_ref(&shape),
            ref_layout,
            &widened
                .iter()
                .map(|(o, l)| Part { output: o, lse: l })
                .collect::<Vec<_>>(),
        );
        let naive = merge(
            &shape_ref(&shape),
            ref_layout,
            &parts
                .iter()
                .map(|(o, l)| Part {
                    output: &o[..],
                    lse: &l[..],
                })
                .collect::<Vec<_>>(),
        );

        // The special rows exactly (NaN, −∞ or 0); the rest by the forward's standard.
        let what = format!("{layout:?}, {parts_count} parts");
        let same = |got: f32, want: f64| (got.is_nan() && want.is_nan()) || f64::from(got) == want;
        for (i, (&got, &want)) in merged.output.iter().zip(&truth.0).enumerate() {
            if row_of[i] < 4 {
                assert!(same(got, want), "{what}: O[{i}] = {got}, reference {want}");
            }
        }
        for (row, (&got, &want)) in lse.iter().zip(&truth.1).enumerate().take(4) {
            assert!(
                same(got, want),
                "{what}: LSE[{row}] = {got}, reference {want}"
            );
        }
        let ordinary = |x: Vec<f64>, rows: &dyn Fn(usize) -> usize| -> Vec<f64> {
            x.into_iter()
                .enumerate()
                .filter(|&(i, _)| rows(i) >= 4)
                .map(|(_, a)| a)
                .collect()
        };
        let o_rows = |i: usize| row_of[i];
        let lse_rows = |i: usize| i;
        let (truth_o, truth_lse) = (ordinary(truth.0, &o_rows), ordinary(truth.1, &lse_rows));
        let (naive_o, naive_lse) = (
            ordinary(wide(&naive.0), &o_rows),
            ordinary(wide(&naive.1), &lse_rows),
        );
        judge(
            &what,
            vec![
                Output::forward(
                    "O",
                    ordinary(wide(&merged.output), &o_rows),
                    &truth_o,
                    &naive_o,
                ),
                Output::forward(
                    "LSE",
                    ordinary(wide(&lse), &lse_rows),
                    &truth_lse,
                    &naive_lse,
                )
                .slack_scaled_to_truth(),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

fn shape_ref(shape: &OutputShape) -> wflash_ref::merge::OutputShape {
    wflash_ref::merge::OutputShape {
        batch: shape.batch,
        heads: shape.heads,
        len: shape.len,
        value_dim: shape.value_dim,
    }
}

/// Bad input is a typed error before anything is dispatched.
#[test]
fn bad_merge_input_is_a_typed_error() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let shape = OutputShape {
        batch: 1,
        heads: 2,
        len: 3,
        value_dim: 4,
    };
    let (o, lse) = (
        vec![0.0f32; shape.o_elems()],
        vec![0.0f32; shape.lse_elems()],
    );
    let merge = |shape: &OutputShape, parts: &[(&[f32], &[f32])]| {
        engine.merge_attention_blocking(shape, Layout::Bhsd, parts)
    };
    assert!(matches!(
        merge(&shape, &[]),
        Err(Error::ZeroDimension { dim: "parts" })
    ));
    // More parts than an invocation may walk within llvmpipe's loop limit.
    let many = vec![(o.as_slice(), lse.as_slice()); wflash::MERGE_MAX_PARTS + 1];
    assert!(matches!(
        merge(&shape, &many),
        Err(Error::TooLarge {
            limit: "MERGE_MAX_PARTS",
            ..
        })
    ));
    let zero = OutputShape { len: 0, ..shape };
    assert!(matches!(
        merge(&zero, &[(&o, &lse)]),
        Err(Error::ZeroDimension { dim: "len" })
    ));
    let wide = OutputShape {
        value_dim: 1000,
        ..shape
    };
    assert!(matches!(
        merge(&wide, &[(&o, &lse)]),
        Err(Error::HeadDimUnsupported { .. })
    ));
    assert!(matches!(
        merge(&shape, &[(&o, &lse), (&o[1..], &lse)]),
        Err(Error::LengthMismatch {
            tensor: "merge part output",
            ..
        })
    ));
    assert!(matches!(
        merge(&shape, &[(&o, &lse[1..])]),
        Err(Error::LengthMismatch {
            tensor: "merge part lse",
            ..
        })
    ));
    // GPU tensors: outputs of two types, an LSE that is not f32.
    let o32 = engine.upload(&o).unwrap();
    let l32 = engine.upload(&lse).unwrap();
    let half: Vec<half::f16> = o.iter().map(|&x| half::f16::from_f32(x)).collect();
    let o16 = engine.upload(&half).unwrap();
    let l16 = engine.upload(&half[..shape.lse_elems()]).unwrap();
    assert!(matches!(
        engine.merge_attention_gpu(&shape, Layout::Bhsd, &[(&o32, &l32), (&o16, &l32)]),
        Err(Error::DTypeMismatch {
            tensor: "merge part output",
            expected: DType::F32,
            got: DType::F16
        })
    ));
    assert!(matches!(
        engine.merge_attention_gpu(&shape, Layout::Bhsd, &[(&o32, &l16)]),
        Err(Error::DTypeMismatch {
            tensor: "merge part lse",
            ..
        })
    ));
}

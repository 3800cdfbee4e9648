//! Properties of the reference itself: it must be right before it can judge anything.

use super::*;
use proptest::prelude::*;

fn problem(q_len: usize, kv_len: usize, causal: Option<CausalAlign>) -> Problem {
    Problem {
        causal,
        ..Problem::new(1, 1, 1, q_len, kv_len, 1, 1, Layout::Bhsd)
    }
}

#[test]
fn bottom_right_mask_worked_by_hand() {
    // q_len 2, kv_len 4: the last query sees every key, the first sees keys 0..=2.
    let p = problem(2, 4, Some(CausalAlign::BottomRight));
    let seen: Vec<Vec<bool>> = (0..2)
        .map(|i| (0..4).map(|j| p.is_visible(i, j)).collect())
        .collect();
    assert_eq!(
        seen,
        vec![vec![true, true, true, false], vec![true, true, true, true]]
    );
    // q_len 4, kv_len 2: queries 0 and 1 see nothing, query 2 sees key 0, query 3 sees both.
    let p = problem(4, 2, Some(CausalAlign::BottomRight));
    let seen: Vec<Vec<bool>> = (0..4)
        .map(|i| (0..2).map(|j| p.is_visible(i, j)).collect())
        .collect();
    assert_eq!(
        seen,
        vec![
            vec![false, false],
            vec![false, false],
            vec![true, false],
            vec![true, true]
        ]
    );
}

#[test]
fn top_left_mask_worked_by_hand() {
    let p = problem(2, 4, Some(CausalAlign::TopLeft));
    let seen: Vec<Vec<bool>> = (0..2)
        .map(|i| (0..4).map(|j| p.is_visible(i, j)).collect())
        .collect();
    assert_eq!(
        seen,
        vec![
            vec![true, false, false, false],
            vec![true, true, false, false]
        ]
    );
    assert_eq!(p.visible_pairs(), 3);
}

/// The two masks as FlexAttention's users write them (`mask_mod`s over absolute positions,
/// q_len == kv_len): prefix-LM `kv <= q || kv < prefix`; Llama 4's chunked attention
/// `q / chunk == kv / chunk && kv <= q`; without a causal mask, block-diagonal chunks.
#[test]
fn prefix_lm_and_chunked_masks_match_their_flex_attention_definitions() {
    for (n, prefix, chunk) in [(9, 0, 1), (9, 4, 3), (16, 20, 5), (7, 3, 7)] {
        let causal = problem(n, n, Some(CausalAlign::BottomRight));
        let mut p = causal.clone();
        p.modifiers.prefix_len = Some(prefix);
        let mut c = causal.clone();
        c.modifiers.chunk = Some(chunk);
        let mut blocks = problem(n, n, None);
        blocks.modifiers.chunk = Some(chunk);
        for q in 0..n {
            for kv in 0..n {
                assert_eq!(
                    p.is_visible(q, kv),
                    kv <= q || kv < prefix,
                    "{n} {prefix} {q} {kv}"
                );
                let same_chunk = q / chunk == kv / chunk;
                assert_eq!(
                    c.is_visible(q, kv),
                    same_chunk && kv <= q,
                    "{n} {chunk} {q} {kv}"
                );
                assert_eq!(blocks.is_visible(q, kv), same_chunk, "{n} {chunk} {q} {kv}");
            }
        }
    }
    // Decoding (one query at the end of 10 keys, bottom-right): its chunk is its position's.
    let mut decode = problem(1, 10, Some(CausalAlign::BottomRight));
    decode.modifiers.chunk = Some(4);
    let seen: Vec<bool> = (0..10).map(|j| decode.is_visible(0, j)).collect();
    let want = [
        false, false, false, false, false, false, false, false, true, true,
    ];
    assert_eq!(seen, want);
}

#[test]
fn fully_masked_rows_give_zero_and_negative_infinity() {
    let p = problem(4, 2, Some(CausalAlign::BottomRight));
    let fwd = softmax_forward(&p, &[1.0, 2.0, 3.0, 4.0], &[0.5, -0.5], &[7.0, 9.0]);
    assert_eq!(&fwd.output[..2], &[0.0, 0.0]);
    assert_eq!(&fwd.lse[..2], &[f64::NEG_INFINITY, f64::NEG_INFINITY]);
    // Query 2 sees key 0 alone: output is v[0], lse is its logit.
    assert_eq!(fwd.output[2], 7.0);
    assert_eq!(fwd.lse[2], 3.0 * 0.5);
}

#[test]
fn two_key_softmax_by_hand() {
    // Logits 0 and ln 3: weights 1/4 and 3/4.
    let p = problem(1, 2, None);
    let fwd = softmax_forward(&p, &[1.0], &[0.0, 3f64.ln()], &[4.0, 8.0]);
    assert!((fwd.output[0] - 7.0).abs() < 1e-12);
    assert!((fwd.lse[0] - 4f64.ln()).abs() < 1e-12);
}

#[test]
fn large_logits_do_not_overflow() {
    let p = problem(1, 3, None);
    let fwd = softmax_forward(&p, &[1.0], &[800.0, 799.0, -800.0], &[1.0, 2.0, 3.0]);
    let e = (-1f64).exp();
    assert!((fwd.output[0] - (1.0 + 2.0 * e) / (1.0 + e)).abs() < 1e-12);
    assert!(fwd.lse[0].is_finite());
}

#[test]
fn layouts_index_the_same_element() {
    // (b, h, s, d) = (1, 2, 3, 4) in a [2, 3, 5, 7] tensor.
    assert_eq!(
        Layout::Bhsd.index(1, 2, 3, 4, 3, 5, 7),
        ((3 + 2) * 5 + 3) * 7 + 4
    );
    assert_eq!(
        Layout::Bshd.index(1, 2, 3, 4, 3, 5, 7),
        ((5 + 3) * 3 + 2) * 7 + 4
    );
}

fn arb_problem() -> impl Strategy<Value = Problem> {
    (
        1usize..3,
        1usize..4,
        1usize..3,
        1usize..9,
        1usize..9,
        1usize..6,
        1usize..6,
        any::<bool>(),
        0usize..3,
    )
        .prop_map(
            |(batch, group, kv_heads, q_len, kv_len, head_dim, value_dim, bshd, causal)| Problem {
                batch,
                q_heads: group * kv_heads,
                kv_heads,
                q_len,
                kv_len,
                head_dim,
                value_dim,
                layout: if bshd { Layout::Bshd } else { Layout::Bhsd },
                scale: 1.0 / (head_dim as f64).sqrt(),
                causal: [
                    None,
                    Some(CausalAlign::BottomRight),
                    Some(CausalAlign::TopLeft),
                ][causal],
                window: None,
                variant: Variant::Softmax,
                modifiers: Modifiers::default(),
                varlen: None,
            },
        )
}

/// Deterministic values in [-2, 2) (the reference crate has no RNG dependency); shared with
/// the linear-attention tests.
pub(crate) fn values(n: usize, seed: u64) -> Vec<f64> {
    // A small deterministic generator keeps the reference crate free of dependencies.
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
        })
        .collect()
}

proptest! {
    #[test]
    fn rows_of_p_sum_to_one_or_zero(p in arb_problem(), seed in any::<u64>()) {
        let q = values(p.q_elems(), seed);
        let k = values(p.k_elems(), seed ^ 1);
        for b in 0..p.batch {
            for h in 0..p.q_heads {
                let probs = softmax_probabilities(&p, &q, &k, b, h);
                for i in 0..p.q_len {
                    let sum: f64 = probs[i * p.kv_len..(i + 1) * p.kv_len].iter().sum();
                    let any_visible = (0..p.kv_len).any(|j| p.is_visible(i, j));
                    let want = if any_visible { 1.0 } else { 0.0 };
                    prop_assert!((sum - want).abs() < 1e-12, "row sum {}", sum);
                }
            }
        }
    }

    #[test]
    fn forward_equals_probabilities_times_values(p in arb_problem(), seed in any::<u64>()) {
        let q = values(p.q_elems(), seed);
        let k = values(p.k_elems(), seed ^ 1);
        let v = values(p.v_elems(), seed ^ 2);
        let fwd = softmax_forward(&p, &q, &k, &v);
        for b in 0..p.batch {
            for h in 0..p.q_heads {
                let probs = softmax_probabilities(&p, &q, &k, b, h);
                let kh = p.kv_head_of(h);
                for i in 0..p.q_len {
                    for e in 0..p.value_dim {
                        let direct: f64 = (0..p.kv_len)
                            .map(|j| probs[i * p.kv_len + j] * v[p.layout.index(b, kh, j, e, p.kv_heads, p.kv_len, p.value_dim)])
                            .sum();
                        let got = fwd.output[p.layout.index(b, h, i, e, p.q_heads, p.q_len, p.value_dim)];
                        prop_assert!((got - direct).abs() < 1e-12, "{got} vs {direct}");
                    }
                }
            }
        }
    }

    #[test]
    fn naive_f32_is_close_to_reference(p in arb_problem(), seed in any::<u64>()) {
        let q = values(p.q_elems(), seed);
        let k = values(p.k_elems(), seed ^ 1);
        let v = values(p.v_elems(), seed ^ 2);
        let truth = softmax_forward(&p, &q, &k, &v);
        let f = |x: &[f64]| x.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let naive = naive::softmax_forward_f32(&p, &f(&q), &f(&k), &f(&v), &|x| x);
        for (a, b) in naive.output.iter().zip(&truth.output) {
            prop_assert!((a - b).abs() < 1e-5);
        }
        for (a, b) in naive.lse.iter().zip(&truth.lse) {
            prop_assert!(a == b || (a - b).abs() < 1e-5);
        }
    }
}

#[test]
fn sigmoid_is_stable_and_symmetric() {
    for x in [-1000.0, -80.0, -1.0, 0.0, 1.0, 80.0, 1000.0] {
        let y = sigmoid(x);
        assert!(y.is_finite() && (0.0..=1.0).contains(&y), "σ({x}) = {y}");
        assert!(
            (y + sigmoid(-x) - 1.0).abs() < 1e-15,
            "σ(x) + σ(-x) = 1 at {x}"
        );
    }
    assert_eq!(sigmoid(0.0), 0.5);
}

#[test]
fn sigmoid_attention_worked_by_hand() {
    // One query (q = 1), keys k = [0, 2], values v = [10, 20], scale 1, bias -1, top-left causal
    // with q_len 1 sees key 0 only; non-causal sees both.
    let mut p = problem(1, 2, None);
    p.variant = Variant::Sigmoid { bias: Some(-1.0) };
    let out = forward(&p, &[1.0], &[0.0, 2.0], &[10.0, 20.0]);
    let expected = sigmoid(-1.0) * 10.0 + sigmoid(1.0) * 20.0;
    assert!((out.output[0] - expected).abs() < 1e-12);
    assert!(out.lse.is_empty());
    p.causal = Some(CausalAlign::TopLeft);
    let out = forward(&p, &[1.0], &[0.0, 2.0], &[10.0, 20.0]);
    assert!((out.output[0] - sigmoid(-1.0) * 10.0).abs() < 1e-12);
}

#[test]
fn window_mask_worked_by_hand() {
    // q_len 3, kv_len 5: diagonals (bottom-right) are keys 2, 3, 4. Window left 1, right 0:
    // each query sees its diagonal key and the one before.
    let mut p = problem(3, 5, None);
    p.window = Some(Window {
        left: Some(1),
        right: Some(0),
    });
    let seen: Vec<Vec<usize>> = (0..3)
        .map(|i| (0..5).filter(|&j| p.is_visible(i, j)).collect())
        .collect();
    assert_eq!(seen, vec![vec![1, 2], vec![2, 3], vec![3, 4]]);
    // Right 1 with top-left causal: causal wins on the right, the window bounds the left.
    p.causal = Some(CausalAlign::TopLeft);
    p.window = Some(Window {
        left: Some(1),
        right: Some(1),
    });
    let seen: Vec<Vec<usize>> = (0..3)
        .map(|i| (0..5).filter(|&j| p.is_visible(i, j)).collect())
        .collect();
    assert_eq!(seen, vec![vec![0], vec![0, 1], vec![1, 2]]);
    // A window left of every key (q_len > kv_len pushes diagonals negative) hides everything.
    let mut p = problem(4, 2, None);
    p.window = Some(Window {
        left: Some(0),
        right: Some(0),
    });
    assert!((0..2).all(|j| !p.is_visible(0, j) && !p.is_visible(1, j)));
    let out = forward(&p, &[1.0; 4], &[1.0; 2], &[3.0; 2]);
    assert_eq!(out.output[0], 0.0);
    assert_eq!(out.lse[0], f64::NEG_INFINITY);
    assert_eq!(out.output[2], 3.0); // query 2's diagonal is key 0
}

#[test]
fn softcap_alibi_and_bias_worked_by_hand() {
    // One query (q = 1) over keys k = [0, 2, 4], values [10, 20, 30], scale 1, bottom-right:
    // the query's diagonal is key 2.
    let mut p = problem(1, 3, None);
    let (q, k, v) = ([1.0], [0.0, 2.0, 4.0], [10.0, 20.0, 30.0]);
    let weighted = |logits: [f64; 3]| {
        let sum: f64 = logits.iter().map(|s| s.exp()).sum();
        logits.iter().zip(v).map(|(s, x)| s.exp() * x).sum::<f64>() / sum
    };
    // Soft-capping at 3: logits 3·tanh(s/3).
    p.modifiers.softcap = Some(3.0);
    let want = weighted([
        0.0,
        3.0 * (2.0f64 / 3.0).tanh(),
        3.0 * (4.0f64 / 3.0).tanh(),
    ]);
    assert!((forward(&p, &q, &k, &v).output[0] - want).abs() < 1e-12);
    // ALiBi slope 0.5, distances 2, 1, 0 from the diagonal key 2: logits 0 - 1, 2 - 0.5, 4.
    p.modifiers.softcap = None;
    p.modifiers.alibi_slopes = Some(vec![0.5]);
    let want = weighted([-1.0, 1.5, 4.0]);
    assert!((forward(&p, &q, &k, &v).output[0] - want).abs() < 1e-12);
    // A bias that adds 1 to key 0 and hides key 2.
    p.modifiers.alibi_slopes = None;
    p.modifiers.bias = Some(Bias {
        values: vec![1.0, 0.0, f64::NEG_INFINITY],
        batch: 1,
        heads: 1,
    });
    let fwd = forward(&p, &q, &k, &v);
    let (e1, e2) = (1f64.exp(), 2f64.exp());
    assert!((fwd.output[0] - (10.0 * e1 + 20.0 * e2) / (e1 + e2)).abs() < 1e-12);
    assert!((fwd.lse[0] - (e1 + e2).ln()).abs() < 1e-12);
    // Sigmoid applies ALiBi in full (not shift invariant): σ(s - slope·d + b).
    p.modifiers.bias = None;
    p.modifiers.alibi_slopes = Some(vec![0.5]);
    p.variant = Variant::Sigmoid { bias: Some(-1.0) };
    let want = 10.0 * sigmoid(-2.0) + 20.0 * sigmoid(0.5) + 30.0 * sigmoid(3.0);
    assert!((forward(&p, &q, &k, &v).output[0] - want).abs() < 1e-12);
}

#[test]
fn sinks_temperature_and_key_mask_worked_by_hand() {
    let mut p = problem(1, 2, None);
    let (q, k, v) = ([1.0], [0.0, 3f64.ln()], [4.0, 8.0]);
    // A sink of logit ln 4 joins the denominator: weights 1/8 and 3/8 (the sink takes 4/8).
    p.modifiers.sinks = Some(vec![4f64.ln()]);
    let fwd = forward(&p, &q, &k, &v);
    assert!((fwd.output[0] - (4.0 + 3.0 * 8.0) / 8.0).abs() < 1e-12);
    assert!((fwd.lse[0] - 8f64.ln()).abs() < 1e-12);
    // Every key hidden: output 0 and the LSE is the sink's logit.
    p.modifiers.key_mask = Some(vec![false, false]);
    let fwd = forward(&p, &q, &k, &v);
    assert_eq!(fwd.output[0], 0.0);
    assert!((fwd.lse[0] - 4f64.ln()).abs() < 1e-12);
    // Without the sink a fully masked row is 0 / -inf; key 0 alone gives v[0].
    p.modifiers.sinks = None;
    assert_eq!(forward(&p, &q, &k, &v).lse[0], f64::NEG_INFINITY);
    p.modifiers.key_mask = Some(vec![true, false]);
    assert_eq!(forward(&p, &q, &k, &v).output[0], 4.0);
    // Temperature 2 doubles the logits: weights 1 and 9.
    p.modifiers.key_mask = None;
    p.modifiers.temperature = Some(vec![2.0]);
    assert!((forward(&p, &q, &k, &v).output[0] - (4.0 + 9.0 * 8.0) / 10.0).abs() < 1e-12);
}

#[test]
fn varlen_is_each_sequence_on_its_own() {
    // Two sequences packed in one BSHD batch: (q 2, kv 3) and (q 1, kv 2); two heads.
    let mut p = Problem::new(1, 2, 2, 3, 5, 2, 2, Layout::Bshd);
    p.causal = Some(CausalAlign::BottomRight);
    p.varlen = Some(Varlen {
        cu_seqlens_q: vec![0, 2, 3],
        cu_seqlens_k: vec![0, 3, 5],
    });
    let (q, k, v) = (values(12, 1), values(20, 2), values(20, 3));
    let packed = forward(&p, &q, &k, &v);
    // Sequence by sequence, as separate problems.
    let slice = |x: &[f64], rows: std::ops::Range<usize>| x[rows.start * 4..rows.end * 4].to_vec();
    for (qr, kr) in [(0..2, 0..3), (2..3, 3..5)] {
        let mut one = Problem::new(1, 2, 2, qr.len(), kr.len(), 2, 2, Layout::Bshd);
        one.causal = p.causal;
        let alone = forward(
            &one,
            &slice(&q, qr.clone()),
            &slice(&k, kr.clone()),
            &slice(&v, kr),
        );
        assert_eq!(&packed.output[qr.start * 4..qr.end * 4], &alone.output[..]);
        for h in 0..2 {
            for (s, row) in qr.clone().enumerate() {
                assert_eq!(packed.lse[h * 3 + row], alone.lse[h * qr.len() + s]);
            }
        }
    }
    // A sequence with no keys: its rows are 0 / -inf.
    p.varlen = Some(Varlen {
        cu_seqlens_q: vec![0, 2, 3],
        cu_seqlens_k: vec![0, 5, 5],
    });
    let fwd = forward(&p, &q, &k, &v);
    assert!(fwd.output[8..12].iter().all(|&x| x == 0.0));
    assert_eq!(fwd.lse[2], f64::NEG_INFINITY);
}

/// `Σ dO ∘ O`, the loss whose gradients [`backward()`] returns.
fn loss(p: &Problem, q: &[f64], k: &[f64], v: &[f64], d_o: &[f64]) -> f64 {
    let out = forward(p, q, k, v).output;
    out.iter().zip(d_o).map(|(a, b)| a * b).sum()
}

/// Central differences of the loss along each element of `x` (as `set` writes it into a copy of
/// the problem and inputs), compared with `analytic`.
fn check_by_finite_differences(
    what: &str,
    analytic: &[f64],
    x: &[f64],
    loss_at: impl Fn(&[f64]) -> f64,
) {
    assert_eq!(analytic.len(), x.len(), "{what}: length");
    let step = 1e-5;
    for i in 0..x.len() {
        let mut plus = x.to_vec();
        let mut minus = x.to_vec();
        plus[i] += step;
        minus[i] -= step;
        let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * step);
        let err = (numeric - analytic[i]).abs();
        assert!(
            err <= 1e-6 * (1.0 + numeric.abs()),
            "{what}[{i}]: analytic {} vs finite differences {numeric}",
            analytic[i]
        );
    }
}

/// Every gradient of every modifier, checked against central differences of the forward.
fn check_gradients(p: &Problem, seed: u64) {
    let q = values(p.q_elems(), seed);
    let k = values(p.k_elems(), seed ^ 1);
    let v = values(p.v_elems(), seed ^ 2);
    let d_o = values(p.o_elems(), seed ^ 3);
    let g = backward(p, &q, &k, &v, &d_o);
    check_by_finite_differences("dq", &g.dq, &q, |x| loss(p, x, &k, &v, &d_o));
    check_by_finite_differences("dk", &g.dk, &k, |x| loss(p, &q, x, &v, &d_o));
    check_by_finite_differences("dv", &g.dv, &v, |x| loss(p, &q, &k, x, &d_o));
    let with = |f: &dyn Fn(&mut Modifiers)| {
        let mut p = p.clone();
        f(&mut p.modifiers);
        loss(&p, &q, &k, &v, &d_o)
    };
    let m = &p.modifiers;
    assert_eq!(g.d_sinks.is_some(), m.sinks.is_some());
    assert_eq!(g.d_temperature.is_some(), m.temperature.is_some());
    assert_eq!(g.d_bias.is_some(), m.bias.is_some());
    if let (Some(d), Some(sinks)) = (&g.d_sinks, &m.sinks) {
        check_by_finite_differences("d_sinks", d, sinks, |x| {
            with(&|m| m.sinks = Some(x.to_vec()))
        });
    }
    if let (Some(d), Some(t)) = (&g.d_temperature, &m.temperature) {
        check_by_finite_differences("d_temperature", d, t, |x| {
            with(&|m| m.temperature = Some(x.to_vec()))
        });
    }
    if let (Some(d), Some(bias)) = (&g.d_bias, &m.bias) {
        // -inf entries stay -inf under a finite step: their gradient is 0.
        check_by_finite_differences("d_bias", d, &bias.values, |x| {
            with(&|m| {
                m.bias = Some(Bias {
                    values: x.to_vec(),
                    ..bias.clone()
                })
            })
        });
    }
}

#[test]
fn gradients_match_finite_differences_for_every_option() {
    let base = Problem::new(2, 4, 2, 5, 7, 3, 2, Layout::Bhsd);
    let (b, h, nq, nk) = (base.batch, base.q_heads, base.q_len, base.kv_len);
    let mut problems = vec![base.clone()];
    let mut add = |f: &dyn Fn(&mut Problem)| {
        let mut p = base.clone();
        f(&mut p);
        problems.push(p);
    };
    add(&|p| p.causal = Some(CausalAlign::BottomRight));
    add(&|p| {
        p.causal = Some(CausalAlign::TopLeft);
        p.layout = Layout::Bshd;
    });
    add(&|p| {
        p.window = Some(Window {
            left: Some(2),
            right: Some(1),
        })
    });
    add(&|p| p.modifiers.softcap = Some(0.7));
    add(&|p| p.modifiers.alibi_slopes = Some(vec![0.5, 0.25, 0.125, 0.0625]));
    let bias = |batch: usize, heads: usize, seed: u64| Bias {
        values: values(batch * heads * nq * nk, seed)
            .into_iter()
            .enumerate()
            .map(|(i, x)| if i % 5 == 1 { f64::NEG_INFINITY } else { x })
            .collect(),
        batch,
        heads,
    };
    add(&|p| p.modifiers.bias = Some(bias(b, h, 11)));
    add(&|p| p.modifiers.bias = Some(bias(1, h, 12)));
    add(&|p| p.modifiers.bias = Some(bias(b, 1, 13)));
    add(&|p| p.modifiers.bias = Some(bias(1, 1, 14)));
    add(&|p| {
        p.modifiers.key_mask = Some((0..b * nk).map(|j| j % 3 != 0 && j != 8).collect());
        p.causal = Some(CausalAlign::BottomRight);
    });
    add(&|p| p.modifiers.sinks = Some(vec![0.3, -1.0, 2.0, 0.0]));
    add(&|p| p.modifiers.temperature = Some(values(b * h * nq, 15)));
    add(&|p| {
        p.causal = Some(CausalAlign::BottomRight);
        p.modifiers.prefix_len = Some(3);
    });
    add(&|p| p.modifiers.chunk = Some(3));
    for sigmoid_bias in [None, Some(-1.5)] {
        add(&|p| {
            p.variant = Variant::Sigmoid { bias: sigmoid_bias };
            p.causal = Some(CausalAlign::BottomRight);
            p.modifiers.softcap = Some(1.3);
            p.modifiers.alibi_slopes = Some(vec![0.5, 0.25, 0.125, 0.0625]);
            p.modifiers.bias = Some(bias(1, h, 16));
            p.modifiers.temperature = Some(values(b * h * nq, 17));
        });
    }
    // Everything softmax has at once.
    add(&|p| {
        p.causal = Some(CausalAlign::TopLeft);
        p.modifiers.softcap = Some(1.1);
        p.modifiers.bias = Some(bias(b, 1, 18));
        p.modifiers.sinks = Some(vec![0.3, -1.0, 2.0, 0.0]);
        p.modifiers.temperature = Some(values(b * h * nq, 19));
        p.modifiers.prefix_len = Some(2);
    });
    // Varlen: three sequences, one without keys, one without queries.
    for variant in [Variant::Softmax, Variant::Sigmoid { bias: None }] {
        add(&|p| {
            p.batch = 1;
            p.q_len = 8;
            p.kv_len = 9;
            p.layout = Layout::Bshd;
            p.variant = variant;
            p.causal = Some(CausalAlign::BottomRight);
            p.varlen = Some(Varlen {
                cu_seqlens_q: vec![0, 3, 3, 6, 8],
                cu_seqlens_k: vec![0, 4, 6, 9, 9],
            });
            p.modifiers.temperature = Some(values(4 * 8, 20));
            if variant == Variant::Softmax {
                p.modifiers.sinks = Some(vec![0.3, -1.0, 2.0, 0.0]);
            }
        });
    }
    for (n, p) in problems.iter().enumerate() {
        check_gradients(p, 100 + n as u64);
    }
}

#[test]
fn fully_masked_rows_have_zero_gradients() {
    // q_len 4 > kv_len 2, bottom-right causal: queries 0 and 1 see nothing.
    let mut p = Problem::new(1, 1, 1, 4, 2, 2, 2, Layout::Bhsd);
    p.causal = Some(CausalAlign::BottomRight);
    let (q, k, v, d_o) = (values(8, 1), values(4, 2), values(4, 3), values(8, 4));
    let g = backward(&p, &q, &k, &v, &d_o);
    assert!(g.dq[..4].iter().all(|&x| x == 0.0), "{:?}", g.dq);
    assert!(g.dq.iter().chain(&g.dk).chain(&g.dv).all(|x| x.is_finite()));
}

proptest! {
    #[test]
    fn naive_f32_backward_is_close_to_reference(p in arb_problem(), seed in any::<u64>()) {
        let q = values(p.q_elems(), seed);
        let k = values(p.k_elems(), seed ^ 1);
        let v = values(p.v_elems(), seed ^ 2);
        let d_o = values(p.o_elems(), seed ^ 3);
        let narrow = |x: &[f64]| x.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let truth = backward(&p, &q, &k, &v, &d_o);
        let naive = naive::backward_f32(&p, &narrow(&q), &narrow(&k), &narrow(&v), &narrow(&d_o), |x| x);
        for (got, want) in [(&naive.dq, &truth.dq), (&naive.dk, &truth.dk), (&naive.dv, &truth.dv)] {
            for (a, b) in got.iter().zip(want.iter()) {
                prop_assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }
}

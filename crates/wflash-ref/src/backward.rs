//! Gradients of attention, by their plain definition: for each query row the probabilities `P`,
//! `dP = dO Vᵀ` and `dS` are materialised and every gradient is summed from them in `f64`.
//! The tests check them against central finite differences of [`crate::forward`].
//!
//! With `s = modified(x)` and `x = scale · t_i · q_i·k_j` ([`Problem::logit`]):
//! - softmax `P = exp(s − LSE)`, `D_i = Σ_j P_ij dP_ij`, `dS = P ∘ (dP − D)`;
//!   sigmoid `P = σ(s + b)`, `dS = dP ∘ σ'(s + b)`;
//! - `dV_j = Σ_i P_ij dO_i`; `dx = dS · (1 − tanh²(x / cap))` with soft-capping, else `dS`;
//! - `dQ_i = scale · t_i · Σ_j dx_ij k_j`, `dK_j = scale · Σ_i t_i dx_ij q_i`;
//! - `d_bias = dS` (summed over the axes the bias broadcasts over), `d_t_i = scale · Σ_j dx_ij q_i·k_j`,
//!   `d_sink_h = −Σ_i P_sink,i · D_i`; ALiBi slopes are constants.

use crate::{Problem, sigmoid};

/// Every gradient of a call, each in the layout of what it differentiates: `dq` like Q, `dk`
/// like K, `dv` like V (summed over each GQA group), `d_bias` like the bias, `d_sinks` per query
/// head, `d_temperature` like the temperature. A modifier's gradient is `Some` when it is present.
#[derive(Clone, Debug, PartialEq)]
pub struct Grads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    pub d_bias: Option<Vec<f64>>,
    pub d_sinks: Option<Vec<f64>>,
    pub d_temperature: Option<Vec<f64>>,
}

/// `d tanh-capped score / d score`: `1 − tanh²(x / cap)` at the uncapped score `x`.
pub fn softcap_slope(x: f64, cap: f64) -> f64 {
    let t = (x / cap).tanh();
    1.0 - t * t
}

/// `σ'(x) = σ(x) σ(−x)`, without overflow.
pub fn sigmoid_slope(x: f64) -> f64 {
    sigmoid(x) * sigmoid(-x)
}

/// The gradients of `Σ dO ∘ O` (O = [`crate::forward`]) with respect to Q, K, V and the learnable
/// modifiers, `d_o` laid out like O.
///
/// # Panics
/// If a slice length does not match the problem (the reference trusts its caller).
pub fn backward(p: &Problem, q: &[f64], k: &[f64], v: &[f64], d_o: &[f64]) -> Grads {
    assert_eq!(d_o.len(), p.o_elems(), "d_o length");
    per_sequence_grads(p, q, k, v, d_o, sequence_backward)
}

/// Runs `f` on each sequence of a varlen problem as its own batch-1 problem and assembles the
/// gradients in the packed layout (the sinks' summed over sequences); calls `f` once otherwise.
pub fn per_sequence_grads<T: Copy + Default>(
    p: &Problem,
    q: &[T],
    k: &[T],
    v: &[T],
    d_o: &[T],
    f: impl Fn(&Problem, &[T], &[T], &[T], &[T]) -> Grads,
) -> Grads {
    if p.varlen.is_none() {
        return f(p, q, k, v, d_o);
    }
    let m = &p.modifiers;
    let mut grads = Grads {
        dq: vec![0.0; p.q_elems()],
        dk: vec![0.0; p.k_elems()],
        dv: vec![0.0; p.v_elems()],
        d_bias: None,
        d_sinks: m.sinks.as_ref().map(|s| vec![0.0; s.len()]),
        d_temperature: m.temperature.as_ref().map(|t| vec![0.0; t.len()]),
    };
    for seq in crate::sequences(p) {
        let g = f(
            &seq.problem,
            &seq.gather_q(p, q, p.head_dim),
            &seq.gather_kv(p, k, p.head_dim),
            &seq.gather_kv(p, v, p.value_dim),
            &seq.gather_q(p, d_o, p.value_dim),
        );
        seq.scatter_q(p, &g.dq, &mut grads.dq, p.head_dim);
        // Sequences own disjoint key rows: a plain write.
        seq.scatter_kv(p, &g.dk, &mut grads.dk, p.head_dim);
        seq.scatter_kv(p, &g.dv, &mut grads.dv, p.value_dim);
        if let (Some(all), Some(one)) = (&mut grads.d_temperature, &g.d_temperature) {
            seq.scatter_rows(p, one, all);
        }
        if let (Some(all), Some(one)) = (&mut grads.d_sinks, &g.d_sinks) {
            all.iter_mut().zip(one).for_each(|(a, x)| *a += x);
        }
    }
    grads
}

/// [`backward()`] of one sequence (no varlen).
fn sequence_backward(p: &Problem, q: &[f64], k: &[f64], v: &[f64], d_o: &[f64]) -> Grads {
    assert_eq!(q.len(), p.q_elems(), "q length");
    assert_eq!(k.len(), p.k_elems(), "k length");
    assert_eq!(v.len(), p.v_elems(), "v length");
    let m = &p.modifiers;
    let mut dq = vec![0.0; p.q_elems()];
    let mut dk = vec![0.0; p.k_elems()];
    let mut dv = vec![0.0; p.v_elems()];
    let mut d_bias = m.bias.as_ref().map(|b| vec![0.0; b.values.len()]);
    let mut d_sinks = m.sinks.as_ref().map(|s| vec![0.0; s.len()]);
    let mut d_temperature = m.temperature.as_ref().map(|t| vec![0.0; t.len()]);
    let sigmoid_bias = p.sigmoid_bias();
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let kh = p.kv_head_of(h);
            for i in 0..p.q_len {
                let q_row = p.q_row(q, b, h, i);
                let do_row = &d_o[p.o_row_range(b, h, i)];
                let t = p.temperature(b, h, i);
                // (key, q·k, unmodified score x, final score s) of every visible key.
                let scores: Vec<(usize, f64, f64, f64)> = (0..p.kv_len)
                    .filter(|&j| p.is_visible(i, j) && p.key_visible(b, j))
                    .filter_map(|j| {
                        let k_row = p.k_row(k, b, kh, j);
                        let dot: f64 = q_row.iter().zip(k_row).map(|(a, c)| a * c).sum();
                        let x = p.scale * t * dot;
                        p.modified(x, b, h, i, j).map(|s| (j, dot, x, s))
                    })
                    .collect();
                // P of the row, and the sink's (softmax with a sink).
                let (probs, p_sink): (Vec<f64>, f64) = match sigmoid_bias {
                    Some(bias) => (scores.iter().map(|e| sigmoid(e.3 + bias)).collect(), 0.0),
                    None => {
                        let sink = p.sink(h);
                        let all = || scores.iter().map(|e| e.3).chain(sink);
                        if all().all(|s| s == f64::NEG_INFINITY) {
                            // Nothing with weight: O = 0 whatever the inputs; no gradient.
                            continue;
                        }
                        let max = all().fold(f64::NEG_INFINITY, f64::max);
                        let lse = max + all().map(|s| (s - max).exp()).sum::<f64>().ln();
                        let probs = scores.iter().map(|e| (e.3 - lse).exp()).collect();
                        (probs, sink.map_or(0.0, |s| (s - lse).exp()))
                    }
                };
                let d_p: Vec<f64> = (scores.iter())
                    .map(|e| {
                        let v_row = p.v_row(v, b, kh, e.0);
                        do_row.iter().zip(v_row).map(|(a, c)| a * c).sum()
                    })
                    .collect();
                // D_i = Σ_j P_ij dP_ij = dO_i · O_i (the sink's value is zero).
                let d_row: f64 = probs.iter().zip(&d_p).map(|(a, c)| a * c).sum();
                if let Some(d_sinks) = &mut d_sinks {
                    d_sinks[h] -= p_sink * d_row;
                }
                let mut d_t = 0.0;
                for ((&(j, dot, x, s), &pj), &dpj) in scores.iter().zip(&probs).zip(&d_p) {
                    let ds = match sigmoid_bias {
                        Some(bias) => dpj * sigmoid_slope(s + bias),
                        None => pj * (dpj - d_row),
                    };
                    if let (Some(d_bias), Some(bias)) = (&mut d_bias, &m.bias) {
                        let (bb, bh) = (b.min(bias.batch - 1), h.min(bias.heads - 1));
                        d_bias[((bb * bias.heads + bh) * p.q_len + i) * p.kv_len + j] += ds;
                    }
                    let dx = ds * m.softcap.map_or(1.0, |cap| softcap_slope(x, cap));
                    d_t += dx * p.scale * dot;
                    let k_row = p.k_row(k, b, kh, j);
                    let dq_at = p.layout.index(b, h, i, 0, p.q_heads, p.q_len, p.head_dim);
                    let dk_at = p
                        .layout
                        .index(b, kh, j, 0, p.kv_heads, p.kv_len, p.head_dim);
                    for d in 0..p.head_dim {
                        dq[dq_at + d] += dx * p.scale * t * k_row[d];
                        dk[dk_at + d] += dx * p.scale * t * q_row[d];
                    }
                    let dv_at = p
                        .layout
                        .index(b, kh, j, 0, p.kv_heads, p.kv_len, p.value_dim);
                    for (e, &g) in do_row.iter().enumerate() {
                        dv[dv_at + e] += pj * g;
                    }
                }
                if let Some(d_temperature) = &mut d_temperature {
                    d_temperature[(b * p.q_heads + h) * p.q_len + i] = d_t;
                }
            }
        }
    }
    Grads {
        dq,
        dk,
        dv,
        d_bias,
        d_sinks,
        d_temperature,
    }
}

//! The same-precision naive baseline that the correctness contract measures kernels against.
//!
//! FlashAttention's standard: a kernel passes when its error against the `f64` truth is at most
//! twice the error of a naive computation done in the same storage precision. "Naive" here is
//! what a framework does without fusion: materialise `S = scale · Q Kᵀ` (f32 accumulation,
//! stored in the storage type), a max-subtracted softmax in f32 stored as `P` in the storage
//! type, then `O = P V` (f32 accumulation) stored in the storage type.

use crate::{Forward, Grads, Problem, Variant};

/// The logit of query `i` of (batch `b`, query head `h`) with key `j` in f32: `q·k` accumulated
/// in f32, scaled, then the modifiers in f32 (as [`Problem::logit`] defines them), stored once.
/// `None` where the key is hidden.
#[expect(clippy::too_many_arguments, reason = "one score's coordinates")]
fn logit_f32(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    b: usize,
    h: usize,
    i: usize,
    j: usize,
    store: &impl Fn(f32) -> f32,
) -> Option<f32> {
    if !p.is_visible(i, j) || !p.key_visible(b, j) {
        return None;
    }
    let k_row = p.k_row(k, b, p.kv_head_of(h), j);
    let mut dot = 0.0f32;
    for (a, b) in p.q_row(q, b, h, i).iter().zip(k_row) {
        dot += a * b;
    }
    let s = p.scale as f32 * p.temperature(b, h, i) as f32 * dot;
    p.modified(s, b, h, i, j).map(store)
}

/// `O[i] = Σ_j P[i, j] V[j]` for one query row, accumulated in f32 (in key order) and stored.
#[expect(clippy::too_many_arguments, reason = "one output row's coordinates")]
fn store_row_f32(
    p: &Problem,
    probs: &[f32],
    v: &[f32],
    b: usize,
    h: usize,
    i: usize,
    store: &impl Fn(f32) -> f32,
    output: &mut [f64],
) {
    let kh = p.kv_head_of(h);
    let mut acc = vec![0.0f32; p.value_dim];
    for (j, &pj) in probs.iter().enumerate() {
        for (a, x) in acc.iter_mut().zip(p.v_row(v, b, kh, j)) {
            *a += pj * x;
        }
    }
    for (o, a) in output[p.o_row_range(b, h, i)].iter_mut().zip(acc) {
        *o = f64::from(store(a));
    }
}

/// The naive computation of `p.variant` in `f32` (see [`softmax_forward_f32`]).
pub fn forward_f32(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    store: impl Fn(f32) -> f32,
) -> Forward {
    crate::per_sequence(p, q, k, v, |p, q, k, v| match p.variant {
        Variant::Softmax => softmax_forward_f32(p, q, k, v, &store),
        Variant::Sigmoid { .. } => sigmoid_forward_f32(p, q, k, v, &store),
    })
}

/// Naive sigmoid attention in `f32` (one sequence): `S` (the logits) stored, `P = σ(S + bias)`
/// stored, then `O = P V` (f32 accumulation) stored.
pub fn sigmoid_forward_f32(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    store: &impl Fn(f32) -> f32,
) -> Forward {
    let bias = p.sigmoid_bias().expect("a sigmoid problem") as f32;
    let mut output = vec![0.0; p.o_elems()];
    let mut probs = vec![0.0f32; p.kv_len];
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            for i in 0..p.q_len {
                for (j, slot) in probs.iter_mut().enumerate() {
                    *slot = match logit_f32(p, q, k, b, h, i, j, store) {
                        Some(s) => store(crate::sigmoid(f64::from(s + bias)) as f32),
                        None => 0.0,
                    };
                }
                store_row_f32(p, &probs, v, b, h, i, store, &mut output);
            }
        }
    }
    Forward {
        output,
        lse: Vec::new(),
    }
}

/// Runs the naive computation in `f32` (one sequence), rounding every materialised tensor with
/// `store` (identity for f32, a round trip through `half::f16` or `half::bf16` for those).
///
/// Inputs are the values the kernel sees (already representable in the storage type).
/// Returns `f64` copies so callers can compare against the reference directly.
pub fn softmax_forward_f32(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    store: &impl Fn(f32) -> f32,
) -> Forward {
    let mut output = vec![0.0; p.o_elems()];
    let mut lse = vec![f64::NEG_INFINITY; p.lse_elems()];
    let mut probs = vec![0.0f32; p.kv_len];
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let sink = p.sink(h).map(|s| s as f32);
            for i in 0..p.q_len {
                let mut max = f32::NEG_INFINITY;
                for (j, slot) in probs.iter_mut().enumerate() {
                    *slot = logit_f32(p, q, k, b, h, i, j, store).unwrap_or(f32::NEG_INFINITY);
                    max = max.max(*slot);
                }
                if max == f32::NEG_INFINITY {
                    // No visible key: output 0, lse -inf (or the sink's logit).
                    lse[(b * p.q_heads + h) * p.q_len + i] =
                        sink.map_or(f64::NEG_INFINITY, f64::from);
                    continue;
                }
                let max = max.max(sink.unwrap_or(f32::NEG_INFINITY));
                let mut sum = sink.map_or(0.0, |s| (s - max).exp());
                for s in probs.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                lse[(b * p.q_heads + h) * p.q_len + i] = f64::from(max + sum.ln());
                for s in probs.iter_mut() {
                    *s = store(*s / sum);
                }
                store_row_f32(p, &probs, v, b, h, i, store, &mut output);
            }
        }
    }
    Forward { output, lse }
}

/// The naive backward in `f32` (what a framework's autograd does through the unfused forward):
/// `S`, `P`, `dP = dO Vᵀ` and `dS` materialised and rounded with `store`, `D = rowsum(P ∘ dP)`
/// and every product accumulated in f32, `dQ`, `dK`, `dV` stored. The modifier gradients are
/// f32 sums of the stored `dS` (see [`mod@crate::backward`] for the formulas).
pub fn backward_f32(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
    store: impl Fn(f32) -> f32,
) -> Grads {
    crate::backward::per_sequence_grads(p, q, k, v, d_o, |p, q, k, v, d_o| {
        sequence_backward_f32(p, q, k, v, d_o, &store)
    })
}

fn sequence_backward_f32(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
    store: &impl Fn(f32) -> f32,
) -> Grads {
    let m = &p.modifiers;
    let mut dq = vec![0.0f32; p.q_elems()];
    let mut dk = vec![0.0f32; p.k_elems()];
    let mut dv = vec![0.0f32; p.v_elems()];
    let mut d_bias = m.bias.as_ref().map(|b| vec![0.0f32; b.values.len()]);
    let mut d_sinks = m.sinks.as_ref().map(|s| vec![0.0f32; s.len()]);
    let mut d_temperature = m.temperature.as_ref().map(|t| vec![0.0f32; t.len()]);
    let sigmoid_bias = p.sigmoid_bias().map(|b| b as f32);
    let scale = p.scale as f32;
    let cap = m.softcap.map(|c| c as f32);
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let kh = p.kv_head_of(h);
            let sink = p.sink(h).map(|s| s as f32);
            for i in 0..p.q_len {
                let t = p.temperature(b, h, i) as f32;
                let q_row = p.q_row(q, b, h, i);
                let do_row = &d_o[p.o_row_range(b, h, i)];
                // (key, q·k, stored S) of the visible keys.
                let scores: Vec<(usize, f32, f32)> = (0..p.kv_len)
                    .filter_map(|j| {
                        let s = logit_f32(p, q, k, b, h, i, j, store)?;
                        let k_row = p.k_row(k, b, kh, j);
                        let mut dot = 0.0f32;
                        for (a, c) in q_row.iter().zip(k_row) {
                            dot += a * c;
                        }
                        Some((j, dot, s))
                    })
                    .collect();
                let (probs, p_sink): (Vec<f32>, f32) = match sigmoid_bias {
                    Some(bias) => (
                        (scores.iter())
                            .map(|e| store(crate::sigmoid(f64::from(e.2 + bias)) as f32))
                            .collect(),
                        0.0,
                    ),
                    None => {
                        let all = || scores.iter().map(|e| e.2).chain(sink);
                        let max = all().fold(f32::NEG_INFINITY, f32::max);
                        if max == f32::NEG_INFINITY {
                            continue;
                        }
                        let sum: f32 = all().map(|s| (s - max).exp()).sum();
                        let probs = (scores.iter())
                            .map(|e| store((e.2 - max).exp() / sum))
                            .collect();
                        (probs, sink.map_or(0.0, |s| (s - max).exp() / sum))
                    }
                };
                let d_p: Vec<f32> = (scores.iter())
                    .map(|e| {
                        let mut acc = 0.0f32;
                        for (a, c) in do_row.iter().zip(p.v_row(v, b, kh, e.0)) {
                            acc += a * c;
                        }
                        store(acc)
                    })
                    .collect();
                let mut d_row = 0.0f32;
                for (a, c) in probs.iter().zip(&d_p) {
                    d_row += a * c;
                }
                if let Some(d_sinks) = &mut d_sinks {
                    d_sinks[h] -= p_sink * d_row;
                }
                let mut dq_acc = vec![0.0f32; p.head_dim];
                let mut d_t = 0.0f32;
                for ((&(j, dot, s), &pj), &dpj) in scores.iter().zip(&probs).zip(&d_p) {
                    let ds = store(match sigmoid_bias {
                        Some(bias) => dpj * crate::sigmoid_slope(f64::from(s + bias)) as f32,
                        None => pj * (dpj - d_row),
                    });
                    if let (Some(d_bias), Some(bias)) = (&mut d_bias, &m.bias) {
                        let (bb, bh) = (b.min(bias.batch - 1), h.min(bias.heads - 1));
                        d_bias[((bb * bias.heads + bh) * p.q_len + i) * p.kv_len + j] += ds;
                    }
                    let dx = match cap {
                        Some(c) => {
                            let th = (scale * t * dot / c).tanh();
                            store(ds * (1.0 - th * th))
                        }
                        None => ds,
                    };
                    d_t += dx * scale * dot;
                    let k_row = p.k_row(k, b, kh, j);
                    let dk_at = p
                        .layout
                        .index(b, kh, j, 0, p.kv_heads, p.kv_len, p.head_dim);
                    for d in 0..p.head_dim {
                        dq_acc[d] += dx * k_row[d];
                        dk[dk_at + d] += dx * scale * t * q_row[d];
                    }
                    let dv_at = p
                        .layout
                        .index(b, kh, j, 0, p.kv_heads, p.kv_len, p.value_dim);
                    for (e, &g) in do_row.iter().enumerate() {
                        dv[dv_at + e] += pj * g;
                    }
                }
                let dq_at = p.layout.index(b, h, i, 0, p.q_heads, p.q_len, p.head_dim);
                for (d, acc) in dq_acc.into_iter().enumerate() {
                    dq[dq_at + d] = scale * t * acc;
                }
                if let Some(d_temperature) = &mut d_temperature {
                    d_temperature[(b * p.q_heads + h) * p.q_len + i] = d_t;
                }
            }
        }
    }
    let stored = |x: Vec<f32>| x.into_iter().map(|a| f64::from(store(a))).collect();
    let wide = |x: Vec<f32>| x.into_iter().map(f64::from).collect();
    Grads {
        dq: stored(dq),
        dk: stored(dk),
        dv: stored(dv),
        d_bias: d_bias.map(wide),
        d_sinks: d_sinks.map(wide),
        d_temperature: d_temperature.map(wide),
    }
}

//! Gradients of linear attention, in `f64`: the quadratic form differentiated term by term
//! ([`linear_backward`], the definition), the recurrence run backwards ([`linear_backward_recurrent`],
//! an independent formulation the tests hold it to), and the same-precision naive baseline
//! ([`naive_linear_backward_f32`]). The tests check the definition against central finite
//! differences of [`super::linear_forward`].
//!
//! The loss is `L = Σ dO ∘ O + ⟨dS_N, S_N⟩ + ⟨dz_N, z_N⟩`: `d_final` (when given) is the gradient
//! that reaches the final state from what read it later (the next piece of a sequence trained in
//! pieces). Per (batch, query head), with `w_ij = λ^{i−j}` (1 when non-causal), the numerator
//! `n_i = scale · φ(q_i)ᵀ S_i` and the denominator `δ_i = scale · φ(q_i)·z_i + eps`:
//!
//! - the readout: `g_i = dO_i / δ_i` and `dδ_i = −dO_i·O_i / δ_i` with the normaliser;
//!   `g_i = dO_i`, `dδ_i = 0` without;
//! - `dφ(q_i) = scale · Σ_j w_ij (g_i·v_j + dδ_i) φ(k_j) + scale · λ^{i+1} (S0 g_i + z0 dδ_i)`;
//! - `dφ(k_j) = scale · Σ_i w_ij (g_i·v_j + dδ_i) φ(q_i) + λ^{N−1−j} (dS_N v_j + dz_N)`;
//! - `dv_j = scale · Σ_i w_ij (φ(q_i)·φ(k_j)) g_i + λ^{N−1−j} dS_Nᵀ φ(k_j)`;
//! - `dS0 = scale · Σ_i λ^{i+1} φ(q_i) g_iᵀ + λ^N dS_N`, `dz0 = scale · Σ_i λ^{i+1} φ(q_i) dδ_i + λ^N dz_N`;
//! - `dq = φ'(q) ∘ dφ(q)`, and `dk`, `dv` summed over the query heads that share a kv head.
//!
//! In recurrent form, with `D_i = ∂L/∂S_i` and `E_i = ∂L/∂z_i` scanned from the last token:
//! `D_i = scale · φ(q_i) g_iᵀ + λ D_{i+1}` (`D_N = dS_N`), `dφ(k_i) = D_i v_i + E_i`,
//! `dv_i = D_iᵀ φ(k_i)`, `dφ(q_i) = scale · (S_i g_i + z_i dδ_i)`, `dS0 = λ D_0`.

use super::{LinearProblem, LinearState, dot, initial_kv, initial_z};

/// The gradients of a linear-attention call, each like what it differentiates: `dq` like Q,
/// `dk` like K and `dv` like V (summed over each GQA group), `d_initial` like the initial
/// state (present when one was given; its `z` is full length when the problem normalises, even
/// if the initial state's `z` was empty, i.e. zero, and empty otherwise).
#[derive(Clone, Debug, PartialEq)]
pub struct LinearGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    pub d_initial: Option<LinearState>,
}

impl LinearGrads {
    fn zeros(p: &LinearProblem, initial: Option<&LinearState>) -> LinearGrads {
        LinearGrads {
            dq: vec![0.0; p.q_elems()],
            dk: vec![0.0; p.k_elems()],
            dv: vec![0.0; p.v_elems()],
            d_initial: initial.map(|_| LinearState::zeros(p)),
        }
    }
}

/// Checks what the backward adds to the forward's inputs.
fn assert_backward_inputs(p: &LinearProblem, d_o: usize, d_final: Option<&LinearState>) {
    assert_eq!(d_o, p.o_elems(), "d_o length");
    if let Some(d_final) = d_final {
        assert!(
            p.causal,
            "non-causal linear attention carries no state on: no d_final"
        );
        assert_eq!(d_final.kv.len(), p.state_elems(), "d_final kv length");
        assert!(
            d_final.z.is_empty() || d_final.z.len() == p.norm_state_elems(),
            "d_final z length {} (expected 0 or {})",
            d_final.z.len(),
            p.norm_state_elems()
        );
    }
}

/// (batch `b`, query head `h`)'s block of a state gradient: `kv`, and `z` when the problem
/// normalises and the state carries one.
fn state_blocks<'a>(
    p: &LinearProblem,
    state: Option<&'a LinearState>,
    b: usize,
    h: usize,
) -> (Option<&'a [f64]>, Option<&'a [f64]>) {
    (initial_kv(p, state, b, h), initial_z(p, state, b, h))
}

/// The readout's gradients of one output row: `g = dO / δ` and `dδ = −dO·O / δ` with the
/// normaliser (`numerator` the row before division, `denominator` without `eps`); `dO` and 0
/// without.
fn readout_grads(
    p: &LinearProblem,
    numerator: &[f64],
    denominator: f64,
    d_o: &[f64],
) -> (Vec<f64>, f64) {
    if !p.normalize {
        return (d_o.to_vec(), 0.0);
    }
    let den = denominator + p.eps;
    let g = d_o.iter().map(|x| x / den).collect();
    (g, -dot(d_o, numerator) / (den * den))
}

/// The gradients of `Σ dO ∘ O + ⟨d_final, final state⟩` (O and the final state from
/// [`super::linear_forward`]) by the quadratic form, term by term (see the module
/// documentation); `d_o` laid out like O.
///
/// # Panics
/// If a slice length does not match the problem, or as [`super::linear_forward`]; if a
/// non-causal problem has a `d_final`.
pub fn linear_backward(
    p: &LinearProblem,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    initial: Option<&LinearState>,
    d_o: &[f64],
    d_final: Option<&LinearState>,
) -> LinearGrads {
    p.assert_inputs(q.len(), k.len(), v.len(), initial);
    assert_backward_inputs(p, d_o.len(), d_final);
    let (kdim, ve, n) = (p.key_dim, p.value_dim, p.len);
    let mut grads = LinearGrads::zeros(p, initial);
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let kh = p.kv_head_of(h);
            let phi_q: Vec<Vec<f64>> = (0..n)
                .map(|i| p.feature_map.map_row(p.q_row(q, b, h, i)))
                .collect();
            let phi_k: Vec<Vec<f64>> = (0..n)
                .map(|j| p.feature_map.map_row(p.k_row(k, b, kh, j)))
                .collect();
            let v_rows: Vec<&[f64]> = (0..n).map(|j| p.v_row(v, b, kh, j)).collect();
            let (s0, z0) = state_blocks(p, initial, b, h);
            let (ds_n, dz_n) = state_blocks(p, d_final, b, h);
            // `scale · λ^{i+1}`: the initial state's weight in row i.
            let carried = |i: usize| p.scale * p.decay_power(h, i + 1);
            // The forward rows again, then the readout gradients (g_i, dδ_i).
            let readout: Vec<(Vec<f64>, f64)> = (0..n)
                .map(|i| {
                    let mut numerator = vec![0.0; ve];
                    let mut denominator = 0.0;
                    for j in p.visible_keys(i) {
                        let score = p.key_weight(h, i, j) * p.scale * dot(&phi_q[i], &phi_k[j]);
                        for (o, x) in numerator.iter_mut().zip(v_rows[j]) {
                            *o += score * x;
                        }
                        denominator += score;
                    }
                    if let Some(s0) = s0 {
                        for (d, qd) in phi_q[i].iter().enumerate() {
                            for (o, x) in numerator.iter_mut().zip(&s0[d * ve..(d + 1) * ve]) {
                                *o += carried(i) * qd * x;
                            }
                        }
                    }
                    if let Some(z0) = z0 {
                        denominator += carried(i) * dot(&phi_q[i], z0);
                    }
                    readout_grads(p, &numerator, denominator, &d_o[p.o_row_range(b, h, i)])
                })
                .collect();
            let mut d_phi_q = vec![vec![0.0; kdim]; n];
            let mut d_phi_k = vec![vec![0.0; kdim]; n];
            let mut d_v = vec![vec![0.0; ve]; n];
            for (i, (g, d_den)) in readout.iter().enumerate() {
                for j in p.visible_keys(i) {
                    let weight = p.scale * p.key_weight(h, i, j);
                    // ∂L/∂(φ(q_i)·φ(k_j)), and the score itself for dV.
                    let d_score = weight * (dot(g, v_rows[j]) + d_den);
                    let score = weight * dot(&phi_q[i], &phi_k[j]);
                    for d in 0..kdim {
                        d_phi_q[i][d] += d_score * phi_k[j][d];
                        d_phi_k[j][d] += d_score * phi_q[i][d];
                    }
                    for (x, gi) in d_v[j].iter_mut().zip(g) {
                        *x += score * gi;
                    }
                }
                for d in 0..kdim {
                    if let Some(s0) = s0 {
                        d_phi_q[i][d] += carried(i) * dot(&s0[d * ve..(d + 1) * ve], g);
                    }
                    if let Some(z0) = z0 {
                        d_phi_q[i][d] += carried(i) * z0[d] * d_den;
                    }
                }
            }
            // What reaches the final state: λ^{N−1−j} φ(k_j) v_jᵀ and λ^{N−1−j} φ(k_j).
            for j in 0..n {
                let weight = p.decay_power(h, n - 1 - j);
                for d in 0..kdim {
                    if let Some(ds) = ds_n {
                        let row = &ds[d * ve..(d + 1) * ve];
                        d_phi_k[j][d] += weight * dot(row, v_rows[j]);
                        for (x, s) in d_v[j].iter_mut().zip(row) {
                            *x += weight * s * phi_k[j][d];
                        }
                    }
                    if let Some(dz) = dz_n {
                        d_phi_k[j][d] += weight * dz[d];
                    }
                }
            }
            if let Some(d_initial) = &mut grads.d_initial {
                let final_weight = p.decay_power(h, n);
                let d_s0 = &mut d_initial.kv[p.kv_state_range(b, h)];
                if let Some(ds) = ds_n {
                    for (x, s) in d_s0.iter_mut().zip(ds) {
                        *x = final_weight * s;
                    }
                }
                for (i, (g, _)) in readout.iter().enumerate() {
                    for d in 0..kdim {
                        for (x, gi) in d_s0[d * ve..(d + 1) * ve].iter_mut().zip(g) {
                            *x += carried(i) * phi_q[i][d] * gi;
                        }
                    }
                }
                if p.normalize {
                    let d_z0 = &mut d_initial.z[p.z_state_range(b, h)];
                    if let Some(dz) = dz_n {
                        for (x, s) in d_z0.iter_mut().zip(dz) {
                            *x = final_weight * s;
                        }
                    }
                    for (i, (_, d_den)) in readout.iter().enumerate() {
                        for (x, qd) in d_z0.iter_mut().zip(&phi_q[i]) {
                            *x += carried(i) * qd * d_den;
                        }
                    }
                }
            }
            chain_rule(p, q, k, b, h, &d_phi_q, &d_phi_k, &d_v, &mut grads);
        }
    }
    grads
}

/// Writes (batch `b`, query head `h`)'s gradients through φ: `dq = φ'(q) ∘ dφ(q)`, and adds
/// `φ'(k) ∘ dφ(k)` and `dv` to its kv head's rows (the GQA sum).
#[expect(
    clippy::too_many_arguments,
    reason = "one head's gradients and where they go"
)]
fn chain_rule(
    p: &LinearProblem,
    q: &[f64],
    k: &[f64],
    b: usize,
    h: usize,
    d_phi_q: &[Vec<f64>],
    d_phi_k: &[Vec<f64>],
    d_v: &[Vec<f64>],
    grads: &mut LinearGrads,
) {
    let kh = p.kv_head_of(h);
    let map = p.feature_map;
    for i in 0..p.len {
        let at = p.layout.index(b, h, i, 0, p.q_heads, p.len, p.key_dim);
        for (d, (x, dphi)) in p.q_row(q, b, h, i).iter().zip(&d_phi_q[i]).enumerate() {
            grads.dq[at + d] = map.slope(*x) * dphi;
        }
        let at = p.layout.index(b, kh, i, 0, p.kv_heads, p.len, p.key_dim);
        for (d, (x, dphi)) in p.k_row(k, b, kh, i).iter().zip(&d_phi_k[i]).enumerate() {
            grads.dk[at + d] += map.slope(*x) * dphi;
        }
        let at = p.layout.index(b, kh, i, 0, p.kv_heads, p.len, p.value_dim);
        for (e, x) in d_v[i].iter().enumerate() {
            grads.dv[at + e] += x;
        }
    }
}

/// The gradients of [`linear_backward`] by the recurrence run backwards: the states `S_i`, `z_i`
/// kept from a token-by-token forward, then `D_i = ∂L/∂S_i` and `E_i = ∂L/∂z_i` scanned from
/// the last token (see the module documentation). Causal only.
///
/// # Panics
/// If the problem is not causal, or as [`linear_backward`].
pub fn linear_backward_recurrent(
    p: &LinearProblem,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    initial: Option<&LinearState>,
    d_o: &[f64],
    d_final: Option<&LinearState>,
) -> LinearGrads {
    assert!(
        p.causal,
        "linear_backward_recurrent is causal only (use linear_backward)"
    );
    p.assert_inputs(q.len(), k.len(), v.len(), initial);
    assert_backward_inputs(p, d_o.len(), d_final);
    let (kdim, ve, n) = (p.key_dim, p.value_dim, p.len);
    let mut grads = LinearGrads::zeros(p, initial);
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let (kh, lambda) = (p.kv_head_of(h), p.decay_of(h));
            let phi_q: Vec<Vec<f64>> = (0..n)
                .map(|i| p.feature_map.map_row(p.q_row(q, b, h, i)))
                .collect();
            let phi_k: Vec<Vec<f64>> = (0..n)
                .map(|j| p.feature_map.map_row(p.k_row(k, b, kh, j)))
                .collect();
            let (s0, z0) = state_blocks(p, initial, b, h);
            // The states after each token.
            let mut s = s0.map_or_else(|| vec![0.0; kdim * ve], <[f64]>::to_vec);
            let mut z = z0.map_or_else(|| vec![0.0; kdim], <[f64]>::to_vec);
            let mut states = Vec::with_capacity(n);
            for (i, phi_ki) in phi_k.iter().enumerate() {
                let v_row = p.v_row(v, b, kh, i);
                for (d, kd) in phi_ki.iter().enumerate() {
                    for (x, vx) in s[d * ve..(d + 1) * ve].iter_mut().zip(v_row) {
                        *x = lambda * *x + kd * vx;
                    }
                    z[d] = lambda * z[d] + kd;
                }
                states.push((s.clone(), z.clone()));
            }
            let (ds_n, dz_n) = state_blocks(p, d_final, b, h);
            let mut big_d = ds_n.map_or_else(|| vec![0.0; kdim * ve], <[f64]>::to_vec);
            let mut big_e = dz_n.map_or_else(|| vec![0.0; kdim], <[f64]>::to_vec);
            let mut d_phi_q = vec![vec![0.0; kdim]; n];
            let mut d_phi_k = vec![vec![0.0; kdim]; n];
            let mut d_v = vec![vec![0.0; ve]; n];
            for i in (0..n).rev() {
                let (s_i, z_i) = &states[i];
                let numerator: Vec<f64> = (0..ve)
                    .map(|e| {
                        p.scale
                            * (0..kdim)
                                .map(|d| phi_q[i][d] * s_i[d * ve + e])
                                .sum::<f64>()
                    })
                    .collect();
                let denominator = p.scale * dot(&phi_q[i], z_i);
                let (g, d_den) =
                    readout_grads(p, &numerator, denominator, &d_o[p.o_row_range(b, h, i)]);
                let v_row = p.v_row(v, b, kh, i);
                for d in 0..kdim {
                    let row = &mut big_d[d * ve..(d + 1) * ve];
                    for (x, gi) in row.iter_mut().zip(&g) {
                        *x += p.scale * phi_q[i][d] * gi;
                    }
                    if p.normalize {
                        big_e[d] += p.scale * phi_q[i][d] * d_den;
                    }
                    d_phi_q[i][d] =
                        p.scale * (dot(&s_i[d * ve..(d + 1) * ve], &g) + z_i[d] * d_den);
                    d_phi_k[i][d] = dot(row, v_row) + if p.normalize { big_e[d] } else { 0.0 };
                    for (x, s) in d_v[i].iter_mut().zip(row.iter()) {
                        *x += s * phi_k[i][d];
                    }
                }
                for x in big_d.iter_mut().chain(big_e.iter_mut()) {
                    *x *= lambda;
                }
            }
            if let Some(d_initial) = &mut grads.d_initial {
                d_initial.kv[p.kv_state_range(b, h)].copy_from_slice(&big_d);
                if p.normalize {
                    d_initial.z[p.z_state_range(b, h)].copy_from_slice(&big_e);
                }
            }
            chain_rule(p, q, k, b, h, &d_phi_q, &d_phi_k, &d_v, &mut grads);
        }
    }
    grads
}

/// The naive backward in `f32` storage precision: what a framework's autograd does through
/// [`super::naive_linear_f32`]. φ in f32; the decayed score matrix `A_ij = scale · φ(q_i)·φ(k_j)
/// · λ^{i−j}` and its gradient `dA_ij = g_i·v_j + dδ_i` materialised and rounded with `store`;
/// every product accumulated in f32; `dq`, `dk`, `dv` rounded with `store`. The state gradient
/// stays in f32 (states are f32 whatever the storage type).
///
/// # Panics
/// As [`linear_backward`].
#[expect(
    clippy::too_many_arguments,
    reason = "the forward's inputs and both output gradients"
)]
pub fn naive_linear_backward_f32(
    p: &LinearProblem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    initial: Option<&LinearState>,
    d_o: &[f32],
    d_final: Option<&LinearState>,
    store: &impl Fn(f32) -> f32,
) -> LinearGrads {
    p.assert_inputs(q.len(), k.len(), v.len(), initial);
    assert_backward_inputs(p, d_o.len(), d_final);
    let (kdim, ve, n) = (p.key_dim, p.value_dim, p.len);
    let (scale, eps) = (p.scale as f32, p.eps as f32);
    let to_f32 = |x: &[f64]| x.iter().map(|&a| a as f32).collect::<Vec<f32>>();
    let mut dq = vec![0.0f32; p.q_elems()];
    let mut dk = vec![0.0f32; p.k_elems()];
    let mut dv = vec![0.0f32; p.v_elems()];
    let mut d_initial = initial.map(|_| LinearState::zeros(p));
    let map = p.feature_map;
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let kh = p.kv_head_of(h);
            let phi_q: Vec<Vec<f32>> = (0..n)
                .map(|i| map.map_row_f32(p.q_row(q, b, h, i)))
                .collect();
            let phi_k: Vec<Vec<f32>> = (0..n)
                .map(|j| map.map_row_f32(p.k_row(k, b, kh, j)))
                .collect();
            let v_rows: Vec<&[f32]> = (0..n).map(|j| p.v_row(v, b, kh, j)).collect();
            let (s0, z0) = state_blocks(p, initial, b, h);
            let (s0, z0) = (s0.map(to_f32), z0.map(to_f32));
            let (ds_n, dz_n) = state_blocks(p, d_final, b, h);
            let (ds_n, dz_n) = (ds_n.map(to_f32), dz_n.map(to_f32));
            let dot32 = |a: &[f32], c: &[f32]| {
                let mut acc = 0.0f32;
                for (x, y) in a.iter().zip(c) {
                    acc += x * y;
                }
                acc
            };
            // The forward again: the stored score matrix, the numerators and denominators.
            let weight = |i: usize, j: usize| p.key_weight(h, i, j) as f32;
            let mut scores = vec![vec![0.0f32; n]; n];
            let mut readout = Vec::with_capacity(n);
            for i in 0..n {
                let mut acc = vec![0.0f32; ve];
                let mut denominator = 0.0f32;
                for j in p.visible_keys(i) {
                    let a = store(scale * dot32(&phi_q[i], &phi_k[j]) * weight(i, j));
                    scores[i][j] = a;
                    for (x, y) in acc.iter_mut().zip(v_rows[j]) {
                        *x += a * y;
                    }
                    denominator += a;
                }
                let carried = scale * p.decay_power(h, i + 1) as f32;
                if let Some(s0) = &s0 {
                    for (e, x) in acc.iter_mut().enumerate() {
                        let mut read = 0.0f32;
                        for (d, qd) in phi_q[i].iter().enumerate() {
                            read += qd * s0[d * ve + e];
                        }
                        *x += carried * read;
                    }
                }
                if let Some(z0) = &z0 {
                    denominator += carried * dot32(&phi_q[i], z0);
                }
                let do_row = &d_o[p.o_row_range(b, h, i)];
                readout.push(if p.normalize {
                    let den = denominator + eps;
                    let g: Vec<f32> = do_row.iter().map(|x| x / den).collect();
                    (g, -dot32(do_row, &acc) / (den * den))
                } else {
                    (do_row.to_vec(), 0.0)
                });
            }
            let mut d_phi_q = vec![vec![0.0f32; kdim]; n];
            let mut d_phi_k = vec![vec![0.0f32; kdim]; n];
            let mut d_v = vec![vec![0.0f32; ve]; n];
            for (i, (g, d_den)) in readout.iter().enumerate() {
                let carried = scale * p.decay_power(h, i + 1) as f32;
                for j in p.visible_keys(i) {
                    let d_a = store(dot32(g, v_rows[j]) + d_den);
                    let d_dot = d_a * scale * weight(i, j);
                    for d in 0..kdim {
                        d_phi_q[i][d] += d_dot * phi_k[j][d];
                        d_phi_k[j][d] += d_dot * phi_q[i][d];
                    }
                    for (x, gi) in d_v[j].iter_mut().zip(g) {
                        *x += scores[i][j] * gi;
                    }
                }
                for d in 0..kdim {
                    if let Some(s0) = &s0 {
                        d_phi_q[i][d] += carried * dot32(&s0[d * ve..(d + 1) * ve], g);
                    }
                    if let Some(z0) = &z0 {
                        d_phi_q[i][d] += carried * z0[d] * d_den;
                    }
                }
            }
            for j in 0..n {
                let weight = p.decay_power(h, n - 1 - j) as f32;
                for d in 0..kdim {
                    if let Some(ds) = &ds_n {
                        let row = &ds[d * ve..(d + 1) * ve];
                        d_phi_k[j][d] += weight * dot32(row, v_rows[j]);
                        for (x, s) in d_v[j].iter_mut().zip(row) {
                            *x += weight * s * phi_k[j][d];
                        }
                    }
                    if let Some(dz) = &dz_n {
                        d_phi_k[j][d] += weight * dz[d];
                    }
                }
            }
            if let Some(d_initial) = &mut d_initial {
                let final_weight = p.decay_power(h, n) as f32;
                let mut d_s0: Vec<f32> = match &ds_n {
                    Some(ds) => ds.iter().map(|s| final_weight * s).collect(),
                    None => vec![0.0; kdim * ve],
                };
                let mut d_z0: Vec<f32> = match &dz_n {
                    Some(dz) => dz.iter().map(|s| final_weight * s).collect(),
                    None => vec![0.0; kdim],
                };
                for (i, (g, d_den)) in readout.iter().enumerate() {
                    let carried = scale * p.decay_power(h, i + 1) as f32;
                    for d in 0..kdim {
                        for (x, gi) in d_s0[d * ve..(d + 1) * ve].iter_mut().zip(g) {
                            *x += carried * phi_q[i][d] * gi;
                        }
                        d_z0[d] += carried * phi_q[i][d] * d_den;
                    }
                }
                for (x, s) in d_initial.kv[p.kv_state_range(b, h)].iter_mut().zip(d_s0) {
                    *x = f64::from(s);
                }
                if p.normalize {
                    for (x, s) in d_initial.z[p.z_state_range(b, h)].iter_mut().zip(d_z0) {
                        *x = f64::from(s);
                    }
                }
            }
            for i in 0..n {
                let at = p.layout.index(b, h, i, 0, p.q_heads, n, kdim);
                for (d, x) in p.q_row(q, b, h, i).iter().enumerate() {
                    dq[at + d] = map.slope_f32(*x) * d_phi_q[i][d];
                }
                let at = p.layout.index(b, kh, i, 0, p.kv_heads, n, kdim);
                for (d, x) in p.k_row(k, b, kh, i).iter().enumerate() {
                    dk[at + d] += map.slope_f32(*x) * d_phi_k[i][d];
                }
                let at = p.layout.index(b, kh, i, 0, p.kv_heads, n, ve);
                for (e, x) in d_v[i].iter().enumerate() {
                    dv[at + e] += x;
                }
            }
        }
    }
    let stored = |x: Vec<f32>| x.into_iter().map(|a| f64::from(store(a))).collect();
    LinearGrads {
        dq: stored(dq),
        dk: stored(dk),
        dv: stored(dv),
        d_initial,
    }
}

#[cfg(test)]
mod tests {
    //! The backward reference must be right before it can judge kernels: hand-worked values,
    //! central finite differences of the forward, the recurrence against the quadratic form,
    //! and a sequence in two pieces against one call.

    use super::super::tests::{Case, arb_case, cut, inputs, max_rel_err};
    use super::super::{FeatureMap, linear_forward};
    use super::*;
    use crate::Layout;
    use crate::tests::values;
    use proptest::prelude::*;

    fn assert_near(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn causal_decay_worked_by_hand() {
        // One head, len 2, widths 1, scale 1, λ = 0.5; q = (1, 2), k = (3, 4), v = (5, 6).
        // o_0 = q0 k0 v0, o_1 = λ q1 k0 v0 + q1 k1 v1; dO = (1, 1):
        // dq = (k0 v0, λ k0 v0 + k1 v1) = (15, 31.5); dk = (q0 v0 + λ q1 v0, q1 v1) = (10, 12);
        // dv = (q0 k0 + λ q1 k0, q1 k1) = (6, 8).
        let p = LinearProblem {
            decay: Some(vec![0.5]),
            scale: 1.0,
            ..LinearProblem::new(1, 1, 1, 2, 1, 1, Layout::Bhsd)
        };
        let (q, k, v, d_o) = ([1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [1.0, 1.0]);
        for backward in [linear_backward, linear_backward_recurrent] {
            let g = backward(&p, &q, &k, &v, None, &d_o, None);
            assert_near(&g.dq, &[15.0, 31.5]);
            assert_near(&g.dk, &[10.0, 12.0]);
            assert_near(&g.dv, &[6.0, 8.0]);
            assert!(g.d_initial.is_none());
            // S0 = 2 adds λ q0 S0 and λ² q1 S0 to the outputs: dq gains (λ S0, λ² S0) = (1, 0.5)
            // and dS0 = λ q0 + λ² q1 = 1. dS_N = 1 on S_N = λ² S0 + λ k0 v0 + k1 v1 adds
            // (λ v0, v1) to dk, (λ k0, k1) to dv and λ² to dS0.
            let initial = LinearState {
                kv: vec![2.0],
                z: Vec::new(),
            };
            let d_final = LinearState {
                kv: vec![1.0],
                z: Vec::new(),
            };
            let g = backward(&p, &q, &k, &v, Some(&initial), &d_o, Some(&d_final));
            assert_near(&g.dq, &[16.0, 32.0]);
            assert_near(&g.dk, &[12.5, 18.0]);
            assert_near(&g.dv, &[7.5, 12.0]);
            assert_near(
                &g.d_initial.expect("an initial state was given").kv,
                &[1.25],
            );
        }
    }

    /// `Σ dO ∘ O + ⟨d_final, final state⟩` of the forward: the loss the gradients differentiate.
    fn loss(
        p: &LinearProblem,
        (q, k, v): (&[f64], &[f64], &[f64]),
        initial: Option<&LinearState>,
        d_o: &[f64],
        d_final: Option<&LinearState>,
    ) -> f64 {
        let fwd = linear_forward(p, q, k, v, initial);
        let mut l = dot(&fwd.output, d_o);
        if let Some(d_final) = d_final {
            l += dot(&fwd.state.kv, &d_final.kv);
            if p.normalize {
                l += dot(&fwd.state.z, &d_final.z);
            }
        }
        l
    }

    /// The gradient of `loss` by central differences, one element at a time, in the order
    /// q, k, v, initial kv, initial z.
    fn finite_differences(
        p: &LinearProblem,
        (q, k, v): (&[f64], &[f64], &[f64]),
        initial: Option<&LinearState>,
        d_o: &[f64],
        d_final: Option<&LinearState>,
    ) -> Vec<f64> {
        const H: f64 = 1e-5;
        let mut inputs = [q.to_vec(), k.to_vec(), v.to_vec()].to_vec();
        if let Some(s) = initial {
            inputs.extend([s.kv.clone(), s.z.clone()]);
        }
        let eval = |x: &[Vec<f64>]| {
            let state = (x.len() > 3).then(|| LinearState {
                kv: x[3].clone(),
                z: x[4].clone(),
            });
            loss(p, (&x[0], &x[1], &x[2]), state.as_ref(), d_o, d_final)
        };
        let mut out = Vec::new();
        for t in 0..inputs.len() {
            for e in 0..inputs[t].len() {
                let at = inputs[t][e];
                inputs[t][e] = at + H;
                let up = eval(&inputs);
                inputs[t][e] = at - H;
                let down = eval(&inputs);
                inputs[t][e] = at;
                out.push((up - down) / (2.0 * H));
            }
        }
        out
    }

    fn flat(g: &LinearGrads) -> Vec<f64> {
        let mut out = [g.dq.clone(), g.dk.clone(), g.dv.clone()].concat();
        if let Some(s) = &g.d_initial {
            out.extend(s.kv.iter().chain(&s.z));
        }
        out
    }

    /// Every option of the forward, each against central differences: feature maps, causal or
    /// not, decay, normaliser, an initial state and a `d_final` (causal), GQA, both layouts.
    #[test]
    fn gradients_match_central_differences() {
        let mut checked = 0;
        for (m, map) in FeatureMap::ALL.into_iter().enumerate() {
            for causal in [true, false] {
                for normalize in [false, true] {
                    for (decayed, initial_after, with_d_final) in [
                        (false, None, false),
                        (true, None, true),
                        (false, Some(3), true),
                        (true, Some(2), false),
                    ] {
                        if !causal && (decayed || initial_after.is_some() || with_d_final) {
                            continue;
                        }
                        let seed = 0xfd00 + checked;
                        let q_heads = 2;
                        let p = LinearProblem {
                            causal,
                            feature_map: map,
                            decay: decayed.then(|| vec![0.9, 0.6]),
                            normalize,
                            ..LinearProblem::new(
                                1 + m % 2,
                                q_heads,
                                1,
                                5,
                                3,
                                2,
                                [Layout::Bhsd, Layout::Bshd][(checked % 2) as usize],
                            )
                        };
                        let c = Case {
                            p: p.clone(),
                            seed,
                            initial_after,
                        };
                        let (q, k, v, initial) = inputs(&c);
                        let d_o = values(p.o_elems(), seed ^ 3);
                        let d_final = with_d_final.then(|| LinearState {
                            kv: values(p.state_elems(), seed ^ 4),
                            z: if normalize {
                                values(p.norm_state_elems(), seed ^ 5)
                            } else {
                                Vec::new()
                            },
                        });
                        let g = linear_backward(
                            &p,
                            &q,
                            &k,
                            &v,
                            initial.as_ref(),
                            &d_o,
                            d_final.as_ref(),
                        );
                        let fd = finite_differences(
                            &p,
                            (&q, &k, &v),
                            initial.as_ref(),
                            &d_o,
                            d_final.as_ref(),
                        );
                        let err = max_rel_err(&flat(&g), &fd);
                        assert!(err < 1e-6, "{p:?} initial {initial_after:?}: error {err:e}");
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 3 * (2 * 4 + 2));
    }

    /// A `d_final` (and random `dO`) for a case: present or not, as `with` says.
    fn output_grads(c: &Case, with: bool) -> (Vec<f64>, Option<LinearState>) {
        let p = &c.p;
        let d_final = with.then(|| LinearState {
            kv: values(p.state_elems(), c.seed ^ 4),
            z: if p.normalize {
                values(p.norm_state_elems(), c.seed ^ 5)
            } else {
                Vec::new()
            },
        });
        (values(p.o_elems(), c.seed ^ 3), d_final)
    }

    /// The smallest normaliser denominator `scale·φ(q_i)·z_i + eps` of any row (as the
    /// reference forward computes it).
    fn min_denominator(
        p: &LinearProblem,
        q: &[f64],
        k: &[f64],
        initial: Option<&LinearState>,
    ) -> f64 {
        let mut smallest = f64::INFINITY;
        for b in 0..p.batch {
            for h in 0..p.q_heads {
                let kh = p.kv_head_of(h);
                let z0 = initial_z(p, initial, b, h);
                for i in 0..p.len {
                    let phi_q = p.feature_map.map_row(p.q_row(q, b, h, i));
                    let mut denominator: f64 = p
                        .visible_keys(i)
                        .map(|j| {
                            let phi_k = p.feature_map.map_row(p.k_row(k, b, kh, j));
                            p.key_weight(h, i, j) * p.scale * dot(&phi_q, &phi_k)
                        })
                        .sum();
                    if let Some(z0) = z0 {
                        denominator += p.scale * p.decay_power(h, i + 1) * dot(&phi_q, z0);
                    }
                    smallest = smallest.min((denominator + p.eps).abs());
                }
            }
        }
        smallest
    }

    fn max_grad_err(a: &LinearGrads, b: &LinearGrads) -> f64 {
        max_rel_err(&flat(a), &flat(b))
    }

    proptest! {
        #[test]
        fn recurrent_equals_quadratic(c in arb_case(true), with_d_final in any::<bool>()) {
            let (q, k, v, initial) = inputs(&c);
            let (d_o, d_final) = output_grads(&c, with_d_final);
            let quadratic = linear_backward(&c.p, &q, &k, &v, initial.as_ref(), &d_o, d_final.as_ref());
            let recurrent = linear_backward_recurrent(&c.p, &q, &k, &v, initial.as_ref(), &d_o, d_final.as_ref());
            let err = max_grad_err(&recurrent, &quadratic);
            prop_assert!(err < 1e-9, "error {err:e}");
        }

        #[test]
        fn two_pieces_equal_one_call(c in arb_case(true), split in any::<usize>(), with_d_final in any::<bool>()) {
            // Truncated BPTT done right: the second piece's gradient of its initial state is the
            // first piece's d_final.
            let p = &c.p;
            let (q, k, v, initial) = inputs(&c);
            let (d_o, d_final) = output_grads(&c, with_d_final);
            let whole = linear_backward(p, &q, &k, &v, initial.as_ref(), &d_o, d_final.as_ref());
            let split = split % (p.len + 1);
            let q_shape = (p.batch, p.q_heads, p.len, p.key_dim);
            let k_shape = (p.batch, p.kv_heads, p.len, p.key_dim);
            let v_shape = (p.batch, p.kv_heads, p.len, p.value_dim);
            let o_shape = (p.batch, p.q_heads, p.len, p.value_dim);
            let rows = |rows: std::ops::Range<usize>| {
                (
                    LinearProblem { len: rows.len(), ..p.clone() },
                    cut(&q, p.layout, q_shape, rows.clone()),
                    cut(&k, p.layout, k_shape, rows.clone()),
                    cut(&v, p.layout, v_shape, rows.clone()),
                    cut(&d_o, p.layout, o_shape, rows),
                )
            };
            let (p1, q1, k1, v1, do1) = rows(0..split);
            let (p2, q2, k2, v2, do2) = rows(split..p.len);
            // The first piece starts from the call's initial state, or from zeros (whose
            // gradient is then simply not used).
            let start = initial.clone().unwrap_or_else(|| LinearState::zeros(p));
            let middle = linear_forward(&p1, &q1, &k1, &v1, Some(&start)).state;
            let second = linear_backward(&p2, &q2, &k2, &v2, Some(&middle), &do2, d_final.as_ref());
            let carried = second.d_initial.clone().expect("the second piece has an initial state");
            let first = linear_backward(&p1, &q1, &k1, &v1, Some(&start), &do1, Some(&carried));
            let errs = [
                max_rel_err(&first.dq, &cut(&whole.dq, p.layout, q_shape, 0..split)),
                max_rel_err(&second.dq, &cut(&whole.dq, p.layout, q_shape, split..p.len)),
                max_rel_err(&first.dk, &cut(&whole.dk, p.layout, k_shape, 0..split)),
                max_rel_err(&second.dk, &cut(&whole.dk, p.layout, k_shape, split..p.len)),
                max_rel_err(&first.dv, &cut(&whole.dv, p.layout, v_shape, 0..split)),
                max_rel_err(&second.dv, &cut(&whole.dv, p.layout, v_shape, split..p.len)),
            ];
            prop_assert!(errs.iter().all(|&e| e < 1e-9), "split {split}: errors {errs:?}");
            if let Some(whole_initial) = &whole.d_initial {
                let first_initial = first.d_initial.expect("given");
                prop_assert!(max_rel_err(&first_initial.kv, &whole_initial.kv) < 1e-9);
                prop_assert!(max_rel_err(&first_initial.z, &whole_initial.z) < 1e-9);
            }
        }

        #[test]
        fn naive_f32_is_close_to_reference(c in prop_oneof![arb_case(true), arb_case(false)], with_d_final in any::<bool>()) {
            let round = |x: &[f64]| x.iter().map(|&a| f64::from(a as f32)).collect::<Vec<f64>>();
            let to_f32 = |x: &[f64]| x.iter().map(|&a| a as f32).collect::<Vec<f32>>();
            let (q, k, v, initial) = inputs(&c);
            let (q, k, v) = (round(&q), round(&k), round(&v));
            let initial = initial.map(|s| LinearState { kv: round(&s.kv), z: round(&s.z) });
            let (d_o, d_final) = output_grads(&c, with_d_final && c.p.causal);
            let d_o = round(&d_o);
            let d_final = d_final.map(|s| LinearState { kv: round(&s.kv), z: round(&s.z) });
            let truth = linear_backward(&c.p, &q, &k, &v, initial.as_ref(), &d_o, d_final.as_ref());
            let naive = naive_linear_backward_f32(
                &c.p,
                &to_f32(&q),
                &to_f32(&k),
                &to_f32(&v),
                initial.as_ref(),
                &to_f32(&d_o),
                d_final.as_ref(),
                &|x| x,
            );
            // With the normaliser, dQ and dK are differences of terms of size ~1/δ (the rows'
            // denominators), which f32 rounds at that size: the bound scales with 1/δ.
            let scale = match c.p.normalize {
                true => 1f64.max(1.0 / min_denominator(&c.p, &q, &k, initial.as_ref())),
                false => 1.0,
            };
            let err = max_grad_err(&naive, &truth);
            prop_assert!(err < 1e-4 * scale, "error {err:e}, 1/δ {scale:e}");
        }
    }

    #[test]
    #[should_panic(expected = "no d_final")]
    fn non_causal_rejects_d_final() {
        let p = LinearProblem {
            causal: false,
            ..LinearProblem::new(1, 1, 1, 2, 1, 1, Layout::Bhsd)
        };
        let d_final = LinearState::zeros(&p);
        linear_backward(
            &p,
            &[1.0; 2],
            &[1.0; 2],
            &[1.0; 2],
            None,
            &[1.0; 2],
            Some(&d_final),
        );
    }
}

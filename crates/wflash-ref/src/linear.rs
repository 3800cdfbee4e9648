//! Linear attention: the `f64` reference that defines what a correct linear-attention kernel
//! computes, an independent recurrent formulation to check it, and the same-precision naive
//! baseline that kernels are measured against.
//!
//! # Contract
//!
//! Tensors, each in a [`Layout`] (innermost dimension contiguous): Q `[batch, q_heads, len,
//! key_dim]`, K `[batch, kv_heads, len, key_dim]`, V `[batch, kv_heads, len, value_dim]`, O
//! `[batch, q_heads, len, value_dim]`. Query head `h` reads kv head `h / (q_heads / kv_heads)`
//! (GQA/MQA). Queries and keys have the same length `len` (self-attention).
//!
//! With the feature map φ applied elementwise to the raw rows, the score of query `i` and key
//! `j` of query head `h` is `s_ij = scale · φ(q_i)·φ(k_j)` (`scale` multiplies after φ).
//!
//! **Causal** (query `i` sees keys `j ≤ i`), with a per-query-head decay `λ_h ∈ (0, 1]` (1
//! without decay) and an optional initial state `S0` (`key_dim × value_dim`, zero when absent):
//!
//! ```text
//! o_i = Σ_{j≤i} λ^{i−j} s_ij v_j  +  scale · λ^{i+1} φ(q_i)ᵀ S0
//! ```
//!
//! or, equivalently, the recurrence
//!
//! ```text
//! S_{−1} = S0;   S_i = λ S_{i−1} + φ(k_i) v_iᵀ;   o_i = scale · φ(q_i)ᵀ S_i
//! ```
//!
//! The final state is `S_{len−1} = λ^len S0 + Σ_j λ^{len−1−j} φ(k_j) v_jᵀ` (`S0` itself when
//! `len` is 0): the initial state of the sequence's continuation (prefill → decode, or a long
//! sequence processed in pieces).
//!
//! **Normaliser** (`normalize`): a second state `z` (`key_dim` long) with `z_{−1} = z0` (zero
//! when absent), `z_i = λ z_{i−1} + φ(k_i)`, and `o_i ← o_i / (scale · φ(q_i)·z_i + eps)`:
//! flash-linear-attention's convention (`eps` is added to the denominator, nothing is clamped).
//! The final `z` is returned with the final `S`.
//!
//! **Non-causal**: every query sees every key, `O = scale · φ(Q) (φ(K)ᵀ V)`, divided row by row
//! by `scale · φ(q_i)·Σ_j φ(k_j) + eps` with the normaliser. Without a token order there is no
//! decay and no initial state: the functions here panic on them, and the GPU API rejects those
//! combinations with a typed error. The final state of a non-causal pass is `φ(K)ᵀ V` (and
//! `Σ_j φ(k_j)` for `z`), the summary every output row was read from.
//!
//! States are `f64` and row-major whatever the layout: `kv` `[batch, q_heads, key_dim,
//! value_dim]`, `z` `[batch, q_heads, key_dim]`. A state belongs to a query head (the decay is
//! per query head) even when kv heads are shared.
//!
//! [`linear_forward`] is the definition: the quadratic form above, written out. [`linear_recurrent`]
//! is the token-by-token recurrence, an independent formulation the tests hold it to.
//! [`naive_linear_f32`] is the unfused baseline in storage precision (see [`crate::naive`]).

use crate::Layout;
use std::ops::Range;

pub mod backward;
pub use backward::{
    LinearGrads, linear_backward, linear_backward_recurrent, naive_linear_backward_f32,
};

/// The elementwise feature map φ applied to query and key rows before their dot product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FeatureMap {
    /// `φ(x) = x`: the raw dot product (TNL and InLine, often after a SiLU in the model).
    #[default]
    Identity,
    /// `φ(x) = elu(x) + 1`: `x + 1` for `x > 0`, `exp(x)` otherwise; always positive
    /// (Katharopoulos et al.).
    EluPlusOne,
    /// `φ(x) = max(x, 0)`.
    Relu,
}

impl FeatureMap {
    pub const ALL: [FeatureMap; 3] = [
        FeatureMap::Identity,
        FeatureMap::EluPlusOne,
        FeatureMap::Relu,
    ];

    /// φ of one element, in `f64`.
    pub fn apply(self, x: f64) -> f64 {
        match self {
            FeatureMap::Identity => x,
            FeatureMap::EluPlusOne => {
                if x > 0.0 {
                    x + 1.0
                } else {
                    x.exp()
                }
            }
            FeatureMap::Relu => x.max(0.0),
        }
    }

    /// φ of one element, in `f32`: what a kernel computes (used by [`naive_linear_f32`]).
    pub fn apply_f32(self, x: f32) -> f32 {
        match self {
            FeatureMap::Identity => x,
            FeatureMap::EluPlusOne => {
                if x > 0.0 {
                    x + 1.0
                } else {
                    x.exp()
                }
            }
            FeatureMap::Relu => x.max(0.0),
        }
    }

    /// `φ'(x)`, the chain rule's factor: 1 for the identity; 1 above zero and `exp(x)` at or
    /// below it for elu+1 (the branch `apply` takes); 1 above zero and 0 at or below it for relu
    /// (PyTorch's convention at the kink).
    pub fn slope(self, x: f64) -> f64 {
        match self {
            FeatureMap::Identity => 1.0,
            FeatureMap::EluPlusOne => {
                if x > 0.0 {
                    1.0
                } else {
                    x.exp()
                }
            }
            FeatureMap::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }

    /// `φ'(x)` in `f32` (see [`FeatureMap::slope`]).
    pub fn slope_f32(self, x: f32) -> f32 {
        match self {
            FeatureMap::Identity => 1.0,
            FeatureMap::EluPlusOne => {
                if x > 0.0 {
                    1.0
                } else {
                    x.exp()
                }
            }
            FeatureMap::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }

    /// φ of every element of a row.
    pub(crate) fn map_row(self, row: &[f64]) -> Vec<f64> {
        row.iter().map(|&x| self.apply(x)).collect()
    }

    /// φ of every element of a row, in `f32`.
    pub(crate) fn map_row_f32(self, row: &[f32]) -> Vec<f32> {
        row.iter().map(|&x| self.apply_f32(x)).collect()
    }
}

/// One linear-attention problem: shapes, layout and options (see the module documentation for
/// the semantics of each option).
#[derive(Clone, Debug, PartialEq)]
pub struct LinearProblem {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    /// Sequence length, of the queries and the keys alike (self-attention).
    pub len: usize,
    /// Width of the query and key rows.
    pub key_dim: usize,
    /// Width of the value and output rows.
    pub value_dim: usize,
    pub layout: Layout,
    /// `true`: query `i` sees keys `j ≤ i`, and decay and an initial state are allowed.
    /// `false`: every query sees every key; no decay, no initial state.
    pub causal: bool,
    pub feature_map: FeatureMap,
    /// `λ_h ∈ (0, 1]` per query head, multiplying the state once per token (causal only);
    /// `None` is no decay (λ = 1). [`lightning_decay`] gives Lightning Attention's schedule.
    pub decay: Option<Vec<f64>>,
    /// Divide each output row by `scale · φ(q_i)·z_i + eps`, carrying `z` in the state.
    pub normalize: bool,
    /// Added to the normaliser's denominator (flash-linear-attention uses `1e-10`).
    pub eps: f64,
    /// Multiplier of `φ(q)·φ(k)`; flash-linear-attention's default is `1/sqrt(key_dim)`.
    pub scale: f64,
}

impl LinearProblem {
    /// A causal problem with the identity feature map, no decay, no normaliser (`eps` `1e-10`
    /// for when one is turned on) and `scale = 1/sqrt(key_dim)`.
    pub fn new(
        batch: usize,
        q_heads: usize,
        kv_heads: usize,
        len: usize,
        key_dim: usize,
        value_dim: usize,
        layout: Layout,
    ) -> LinearProblem {
        LinearProblem {
            batch,
            q_heads,
            kv_heads,
            len,
            key_dim,
            value_dim,
            layout,
            causal: true,
            feature_map: FeatureMap::Identity,
            decay: None,
            normalize: false,
            eps: 1e-10,
            scale: 1.0 / (key_dim as f64).sqrt(),
        }
    }

    /// Element count of Q.
    pub fn q_elems(&self) -> usize {
        self.batch * self.q_heads * self.len * self.key_dim
    }
    /// Element count of K.
    pub fn k_elems(&self) -> usize {
        self.batch * self.kv_heads * self.len * self.key_dim
    }
    /// Element count of V.
    pub fn v_elems(&self) -> usize {
        self.batch * self.kv_heads * self.len * self.value_dim
    }
    /// Element count of O.
    pub fn o_elems(&self) -> usize {
        self.batch * self.q_heads * self.len * self.value_dim
    }
    /// Element count of the `kv` state, `[batch, q_heads, key_dim, value_dim]`.
    pub fn state_elems(&self) -> usize {
        self.batch * self.q_heads * self.key_dim * self.value_dim
    }
    /// Element count of the normaliser state `z`, `[batch, q_heads, key_dim]`.
    pub fn norm_state_elems(&self) -> usize {
        self.batch * self.q_heads * self.key_dim
    }

    /// The kv head that query head `h` reads (GQA/MQA).
    pub fn kv_head_of(&self, h: usize) -> usize {
        h / (self.q_heads / self.kv_heads)
    }

    /// Query head `h`'s decay λ (1 without decay).
    pub fn decay_of(&self, h: usize) -> f64 {
        self.decay.as_ref().map_or(1.0, |decay| decay[h])
    }

    /// `λ_h^n`: what `n` tokens of decay do to query head `h`'s state.
    pub fn decay_power(&self, h: usize, n: usize) -> f64 {
        self.decay_of(h).powf(n as f64)
    }

    /// The keys query `i` sees: `0..=i` when causal, all of them otherwise.
    pub fn visible_keys(&self, i: usize) -> Range<usize> {
        if self.causal { 0..i + 1 } else { 0..self.len }
    }

    /// The decay weight `λ^{i−j}` of key `j` in query `i`'s output (1 when non-causal).
    pub(crate) fn key_weight(&self, h: usize, i: usize, j: usize) -> f64 {
        if self.causal {
            self.decay_power(h, i - j)
        } else {
            1.0
        }
    }

    /// Query row `i` of (batch `b`, query head `h`).
    pub fn q_row<'a, T>(&self, q: &'a [T], b: usize, h: usize, i: usize) -> &'a [T] {
        let start = self
            .layout
            .index(b, h, i, 0, self.q_heads, self.len, self.key_dim);
        &q[start..start + self.key_dim]
    }
    /// Key row `j` of (batch `b`, kv head `kh`).
    pub fn k_row<'a, T>(&self, k: &'a [T], b: usize, kh: usize, j: usize) -> &'a [T] {
        let start = self
            .layout
            .index(b, kh, j, 0, self.kv_heads, self.len, self.key_dim);
        &k[start..start + self.key_dim]
    }
    /// Value row `j` of (batch `b`, kv head `kh`).
    pub fn v_row<'a, T>(&self, v: &'a [T], b: usize, kh: usize, j: usize) -> &'a [T] {
        let start = self
            .layout
            .index(b, kh, j, 0, self.kv_heads, self.len, self.value_dim);
        &v[start..start + self.value_dim]
    }
    /// The elements of output row `i` of (batch `b`, query head `h`).
    pub fn o_row_range(&self, b: usize, h: usize, i: usize) -> Range<usize> {
        let start = self
            .layout
            .index(b, h, i, 0, self.q_heads, self.len, self.value_dim);
        start..start + self.value_dim
    }
    /// The elements of (batch `b`, query head `h`)'s `key_dim × value_dim` block of the `kv` state.
    pub fn kv_state_range(&self, b: usize, h: usize) -> Range<usize> {
        let size = self.key_dim * self.value_dim;
        let start = (b * self.q_heads + h) * size;
        start..start + size
    }
    /// The elements of (batch `b`, query head `h`)'s `key_dim` block of the `z` state.
    pub fn z_state_range(&self, b: usize, h: usize) -> Range<usize> {
        let start = (b * self.q_heads + h) * self.key_dim;
        start..start + self.key_dim
    }

    /// Checks the inputs against the problem and the contract (the reference trusts its caller
    /// only this far).
    pub(crate) fn assert_inputs(
        &self,
        q_len: usize,
        k_len: usize,
        v_len: usize,
        initial: Option<&LinearState>,
    ) {
        assert!(
            self.kv_heads > 0 && self.q_heads.is_multiple_of(self.kv_heads),
            "q_heads ({}) must be a multiple of kv_heads ({})",
            self.q_heads,
            self.kv_heads
        );
        assert_eq!(q_len, self.q_elems(), "q length");
        assert_eq!(k_len, self.k_elems(), "k length");
        assert_eq!(v_len, self.v_elems(), "v length");
        if let Some(decay) = &self.decay {
            assert_eq!(decay.len(), self.q_heads, "one decay per query head");
            assert!(
                decay.iter().all(|&l| l > 0.0 && l <= 1.0),
                "decay must lie in (0, 1]: {decay:?}"
            );
        }
        if !self.causal {
            assert!(
                self.decay.is_none(),
                "non-causal linear attention has no decay"
            );
            assert!(
                initial.is_none(),
                "non-causal linear attention has no initial state"
            );
        }
        if let Some(state) = initial {
            assert_eq!(
                state.kv.len(),
                self.state_elems(),
                "initial kv state length"
            );
            assert!(
                state.z.is_empty() || state.z.len() == self.norm_state_elems(),
                "initial z state length {} (expected 0 or {})",
                state.z.len(),
                self.norm_state_elems()
            );
        }
    }
}

/// The recurrent state of linear attention after some tokens: what prefill hands to decode,
/// or one piece of a long sequence to the next.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearState {
    /// `Σ λ^… φ(k) vᵀ`, `[batch, q_heads, key_dim, value_dim]` row-major.
    pub kv: Vec<f64>,
    /// The normaliser `Σ λ^… φ(k)`, `[batch, q_heads, key_dim]` row-major; empty when the problem
    /// does not normalise. As an initial state, empty means zero.
    pub z: Vec<f64>,
}

impl LinearState {
    /// The state before any token: zeros, with `z` present only when `p` normalises.
    pub fn zeros(p: &LinearProblem) -> LinearState {
        LinearState {
            kv: vec![0.0; p.state_elems()],
            z: if p.normalize {
                vec![0.0; p.norm_state_elems()]
            } else {
                Vec::new()
            },
        }
    }
}

/// Output of a linear-attention pass: `output` in the problem's layout and the final state.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearForward {
    pub output: Vec<f64>,
    pub state: LinearState,
}

/// The initial `kv` block of (batch `b`, query head `h`), if there is an initial state.
pub(crate) fn initial_kv<'a>(
    p: &LinearProblem,
    initial: Option<&'a LinearState>,
    b: usize,
    h: usize,
) -> Option<&'a [f64]> {
    initial.map(|state| &state.kv[p.kv_state_range(b, h)])
}

/// The initial `z` block of (batch `b`, query head `h`), if the problem normalises and the
/// initial state carries one.
pub(crate) fn initial_z<'a>(
    p: &LinearProblem,
    initial: Option<&'a LinearState>,
    b: usize,
    h: usize,
) -> Option<&'a [f64]> {
    initial
        .filter(|state| p.normalize && !state.z.is_empty())
        .map(|state| &state.z[p.z_state_range(b, h)])
}

pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Linear attention by its definition: the quadratic form, each output row summed over its
/// visible keys with the decay mask `λ^{i−j}`, plus the initial state's term; the final state
/// computed directly as `λ^len S0 + Σ_j λ^{len−1−j} φ(k_j) v_jᵀ` (see the module documentation).
///
/// # Panics
/// If a slice length does not match the problem, `q_heads` is not a multiple of `kv_heads`, a
/// decay lies outside `(0, 1]`, or a non-causal problem has a decay or an initial state.
pub fn linear_forward(
    p: &LinearProblem,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    initial: Option<&LinearState>,
) -> LinearForward {
    p.assert_inputs(q.len(), k.len(), v.len(), initial);
    let ve = p.value_dim;
    let mut output = vec![0.0; p.o_elems()];
    let mut state = LinearState::zeros(p);
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let kh = p.kv_head_of(h);
            let phi_q: Vec<Vec<f64>> = (0..p.len)
                .map(|i| p.feature_map.map_row(p.q_row(q, b, h, i)))
                .collect();
            let phi_k: Vec<Vec<f64>> = (0..p.len)
                .map(|j| p.feature_map.map_row(p.k_row(k, b, kh, j)))
                .collect();
            let (s0, z0) = (initial_kv(p, initial, b, h), initial_z(p, initial, b, h));
            for (i, phi_qi) in phi_q.iter().enumerate() {
                let mut numerator = vec![0.0; ve];
                // Σ of the decayed scores plus the initial term: scale · φ(q_i)·z_i.
                let mut denominator = 0.0;
                for j in p.visible_keys(i) {
                    let score = p.key_weight(h, i, j) * p.scale * dot(phi_qi, &phi_k[j]);
                    for (o, x) in numerator.iter_mut().zip(p.v_row(v, b, kh, j)) {
                        *o += score * x;
                    }
                    denominator += score;
                }
                // Every state entry has decayed i + 1 times by the time query i reads it.
                let carried = p.scale * p.decay_power(h, i + 1);
                if let Some(s0) = s0 {
                    for (d, qd) in phi_qi.iter().enumerate() {
                        for (o, x) in numerator.iter_mut().zip(&s0[d * ve..(d + 1) * ve]) {
                            *o += carried * qd * x;
                        }
                    }
                }
                if let Some(z0) = z0 {
                    denominator += carried * dot(phi_qi, z0);
                }
                for (o, n) in output[p.o_row_range(b, h, i)].iter_mut().zip(numerator) {
                    *o = if p.normalize {
                        n / (denominator + p.eps)
                    } else {
                        n
                    };
                }
            }
            // The final state: λ^len S0 + Σ_j λ^{len−1−j} φ(k_j) v_jᵀ (and the same for z).
            let carried = p.decay_power(h, p.len);
            let kv = &mut state.kv[p.kv_state_range(b, h)];
            if let Some(s0) = s0 {
                for (s, x) in kv.iter_mut().zip(s0) {
                    *s = carried * x;
                }
            }
            for (j, phi_kj) in phi_k.iter().enumerate() {
                let weight = p.decay_power(h, p.len - 1 - j);
                let v_row = p.v_row(v, b, kh, j);
                for (d, kd) in phi_kj.iter().enumerate() {
                    for (s, x) in kv[d * ve..(d + 1) * ve].iter_mut().zip(v_row) {
                        *s += weight * kd * x;
                    }
                }
            }
            if p.normalize {
                let z = &mut state.z[p.z_state_range(b, h)];
                if let Some(z0) = z0 {
                    for (s, x) in z.iter_mut().zip(z0) {
                        *s = carried * x;
                    }
                }
                for (j, phi_kj) in phi_k.iter().enumerate() {
                    let weight = p.decay_power(h, p.len - 1 - j);
                    for (s, kd) in z.iter_mut().zip(phi_kj) {
                        *s += weight * kd;
                    }
                }
            }
        }
    }
    LinearForward { output, state }
}

/// Causal linear attention token by token: `S_i = λ S_{i−1} + φ(k_i) v_iᵀ`, `o_i = scale ·
/// φ(q_i)ᵀ S_i` (and `z_i = λ z_{i−1} + φ(k_i)` with the normaliser). The decode form, and an
/// independent formulation of [`linear_forward`] used to cross-check it.
///
/// # Panics
/// If the problem is not causal (the recurrence needs a token order), or as [`linear_forward`].
pub fn linear_recurrent(
    p: &LinearProblem,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    initial: Option<&LinearState>,
) -> LinearForward {
    assert!(
        p.causal,
        "linear_recurrent is causal only: non-causal linear attention has no token order \
         (use linear_forward)"
    );
    p.assert_inputs(q.len(), k.len(), v.len(), initial);
    let ve = p.value_dim;
    let mut output = vec![0.0; p.o_elems()];
    let mut state = LinearState::zeros(p);
    if let Some(initial) = initial {
        state.kv.copy_from_slice(&initial.kv);
        if p.normalize && !initial.z.is_empty() {
            state.z.copy_from_slice(&initial.z);
        }
    }
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let (kh, lambda) = (p.kv_head_of(h), p.decay_of(h));
            let kv = &mut state.kv[p.kv_state_range(b, h)];
            let mut z = if p.normalize {
                Some(&mut state.z[p.z_state_range(b, h)])
            } else {
                None
            };
            for i in 0..p.len {
                let phi_k = p.feature_map.map_row(p.k_row(k, b, kh, i));
                let v_row = p.v_row(v, b, kh, i);
                for (d, kd) in phi_k.iter().enumerate() {
                    for (s, x) in kv[d * ve..(d + 1) * ve].iter_mut().zip(v_row) {
                        *s = lambda * *s + kd * x;
                    }
                }
                if let Some(z) = z.as_deref_mut() {
                    for (s, kd) in z.iter_mut().zip(&phi_k) {
                        *s = lambda * *s + kd;
                    }
                }
                let phi_q = p.feature_map.map_row(p.q_row(q, b, h, i));
                let denominator = z.as_deref().map(|z| p.scale * dot(&phi_q, z) + p.eps);
                let out = &mut output[p.o_row_range(b, h, i)];
                for (e, o) in out.iter_mut().enumerate() {
                    let read: f64 = phi_q
                        .iter()
                        .enumerate()
                        .map(|(d, qd)| qd * kv[d * ve + e])
                        .sum();
                    *o = p.scale * read / denominator.unwrap_or(1.0);
                }
            }
        }
    }
    LinearForward { output, state }
}

/// The naive computation of linear attention in `f32` storage precision: the baseline a kernel
/// is measured against (see [`crate::naive`] for the standard).
///
/// What an unfused framework does: φ in f32; the decayed score matrix `S_ij = scale · φ(q_i)·φ(k_j)
/// · λ^{i−j}` (dot products accumulated in f32, the decay mask computed exactly and rounded to
/// f32) materialised and rounded with `store`; `O = S V` accumulated in f32 plus the initial
/// state's term; with the normaliser, divided by the row sum of `S` plus the initial `z` term plus
/// `eps`, in f32; the output rounded with `store`. The final state is accumulated in f32 and not
/// rounded with `store` (engines keep states in f32 whatever the storage type).
///
/// Inputs are the values the kernel sees (already representable in the storage type); the
/// initial state is rounded to f32. Returns `f64` copies so callers can compare against
/// [`linear_forward`] directly.
///
/// # Panics
/// As [`linear_forward`].
pub fn naive_linear_f32(
    p: &LinearProblem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    initial: Option<&LinearState>,
    store: &impl Fn(f32) -> f32,
) -> LinearForward {
    p.assert_inputs(q.len(), k.len(), v.len(), initial);
    let ve = p.value_dim;
    let (scale, eps) = (p.scale as f32, p.eps as f32);
    let mut output = vec![0.0; p.o_elems()];
    let mut state = LinearState::zeros(p);
    let to_f32 = |x: &[f64]| x.iter().map(|&a| a as f32).collect::<Vec<f32>>();
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let kh = p.kv_head_of(h);
            let phi_q: Vec<Vec<f32>> = (0..p.len)
                .map(|i| p.feature_map.map_row_f32(p.q_row(q, b, h, i)))
                .collect();
            let phi_k: Vec<Vec<f32>> = (0..p.len)
                .map(|j| p.feature_map.map_row_f32(p.k_row(k, b, kh, j)))
                .collect();
            let s0 = initial_kv(p, initial, b, h).map(to_f32);
            let z0 = initial_z(p, initial, b, h).map(to_f32);
            // One row of the materialised, decayed, stored score matrix.
            let mut scores = vec![0.0f32; p.len];
            for (i, phi_qi) in phi_q.iter().enumerate() {
                let keys = p.visible_keys(i);
                for j in keys.clone() {
                    let mut dot = 0.0f32;
                    for (a, c) in phi_qi.iter().zip(&phi_k[j]) {
                        dot += a * c;
                    }
                    scores[j] = store(scale * dot * p.key_weight(h, i, j) as f32);
                }
                let mut acc = vec![0.0f32; ve];
                let mut denominator = 0.0f32;
                for j in keys {
                    for (a, x) in acc.iter_mut().zip(p.v_row(v, b, kh, j)) {
                        *a += scores[j] * x;
                    }
                    denominator += scores[j];
                }
                let carried = scale * p.decay_power(h, i + 1) as f32;
                if let Some(s0) = &s0 {
                    for (e, a) in acc.iter_mut().enumerate() {
                        let mut read = 0.0f32;
                        for (d, qd) in phi_qi.iter().enumerate() {
                            read += qd * s0[d * ve + e];
                        }
                        *a += carried * read;
                    }
                }
                if let Some(z0) = &z0 {
                    let mut read = 0.0f32;
                    for (qd, zd) in phi_qi.iter().zip(z0) {
                        read += qd * zd;
                    }
                    denominator += carried * read;
                }
                for (o, a) in output[p.o_row_range(b, h, i)].iter_mut().zip(acc) {
                    let a = if p.normalize {
                        a / (denominator + eps)
                    } else {
                        a
                    };
                    *o = f64::from(store(a));
                }
            }
            // The final state, directly, accumulated in f32.
            let carried = p.decay_power(h, p.len) as f32;
            let mut kv = match &s0 {
                Some(s0) => s0.iter().map(|x| carried * x).collect(),
                None => vec![0.0f32; p.key_dim * ve],
            };
            let mut z = match &z0 {
                Some(z0) => z0.iter().map(|x| carried * x).collect(),
                None => vec![0.0f32; p.key_dim],
            };
            for (j, phi_kj) in phi_k.iter().enumerate() {
                let weight = p.decay_power(h, p.len - 1 - j) as f32;
                let v_row = p.v_row(v, b, kh, j);
                for (d, kd) in phi_kj.iter().enumerate() {
                    for (s, x) in kv[d * ve..(d + 1) * ve].iter_mut().zip(v_row) {
                        *s += weight * kd * x;
                    }
                    z[d] += weight * kd;
                }
            }
            for (s, x) in state.kv[p.kv_state_range(b, h)].iter_mut().zip(kv) {
                *s = f64::from(x);
            }
            if p.normalize {
                for (s, x) in state.z[p.z_state_range(b, h)].iter_mut().zip(z) {
                    *s = f64::from(x);
                }
            }
        }
    }
    LinearForward { output, state }
}

/// ALiBi's head slopes (Press et al.), as Lightning Attention builds them: for `heads` a power
/// of two, `s_h = 2^(−8h/heads)` for `h = 1..=heads`; otherwise the slopes of the largest power
/// of two below, followed by the odd-numbered (h = 1, 3, 5, …) slopes of twice that power.
fn alibi_slopes(heads: usize) -> Vec<f64> {
    if heads == 0 {
        return Vec::new();
    }
    let geometric = |n: usize| (1..=n).map(move |h| 2f64.powf(-8.0 * h as f64 / n as f64));
    let power = 1usize << heads.ilog2();
    let mut slopes: Vec<f64> = geometric(power).collect();
    slopes.extend(geometric(2 * power).step_by(2).take(heads - power));
    slopes
}

/// Lightning Attention's per-head decays `λ_h = exp(−s_h)`, with `s_h` ALiBi's slopes: for
/// `heads` a power of two, `s_h = 2^(−8h/heads)`, `h = 1..=heads`; otherwise the first power of
/// two's slopes followed by the odd-numbered slopes of twice that power (ALiBi's recipe). Every
/// λ lies in (0, 1); the first head decays fastest.
pub fn lightning_decay(heads: usize) -> Vec<f64> {
    alibi_slopes(heads)
        .into_iter()
        .map(|s| (-s).exp())
        .collect()
}

#[cfg(test)]
mod tests {
    //! Linear attention's reference must be right before it can judge kernels: hand-worked
    //! values, and its quadratic form against independent formulations.

    use super::*;
    use crate::tests::values;
    use proptest::prelude::*;

    /// The tiny problem worked by hand below: one head, len 2, key and value width 1, identity
    /// map, scale 1, `eps` 0.5 (so its place in the formula shows), λ = 0.5 when causal.
    fn tiny(causal: bool) -> LinearProblem {
        LinearProblem {
            causal,
            decay: causal.then(|| vec![0.5]),
            eps: 0.5,
            scale: 1.0,
            ..LinearProblem::new(1, 1, 1, 2, 1, 1, Layout::Bhsd)
        }
    }

    const Q: [f64; 2] = [1.0, 2.0];
    const K: [f64; 2] = [3.0, 4.0];
    const V: [f64; 2] = [5.0, 6.0];

    fn assert_near(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }

    /// Both formulations of a causal problem, checked against the same hand-worked values.
    fn assert_causal_by_hand(
        p: &LinearProblem,
        initial: Option<&LinearState>,
        output: [f64; 2],
        kv: f64,
        z: &[f64],
    ) {
        for fwd in [
            linear_forward(p, &Q, &K, &V, initial),
            linear_recurrent(p, &Q, &K, &V, initial),
        ] {
            assert_near(&fwd.output, &output);
            assert_near(&fwd.state.kv, &[kv]);
            assert_near(&fwd.state.z, z);
        }
    }

    #[test]
    fn causal_decay_worked_by_hand() {
        // Scores s_00 = 1·3 = 3, s_10 = 2·3 = 6, s_11 = 2·4 = 8.
        // o_0 = 3·5 = 15; o_1 = 0.5·6·5 + 8·6 = 63; S = 0.5·3·5 + 4·6 = 31.5.
        let mut p = tiny(true);
        assert_causal_by_hand(&p, None, [15.0, 63.0], 31.5, &[]);
        // Scale 2 doubles the outputs but not the state.
        p.scale = 2.0;
        assert_causal_by_hand(&p, None, [30.0, 126.0], 31.5, &[]);
    }

    #[test]
    fn causal_initial_state_worked_by_hand() {
        // S0 = 2: o_0 gains λ·q_0·S0 = 0.5·1·2 = 1, o_1 gains λ²·q_1·S0 = 0.25·2·2 = 1;
        // the final state gains λ²·S0 = 0.5. A z in a non-normalising problem is ignored.
        let p = tiny(true);
        let initial = LinearState {
            kv: vec![2.0],
            z: vec![100.0],
        };
        assert_causal_by_hand(&p, Some(&initial), [16.0, 64.0], 32.0, &[]);
    }

    #[test]
    fn causal_normaliser_worked_by_hand() {
        // z_0 = 3, z_1 = 0.5·3 + 4 = 5.5; denominators 1·3 + 0.5 and 2·5.5 + 0.5.
        let mut p = tiny(true);
        p.normalize = true;
        assert_causal_by_hand(&p, None, [15.0 / 3.5, 63.0 / 11.5], 31.5, &[5.5]);
        // With S0 = 2, z0 = 1: z_0 = 0.5·1 + 3 = 3.5, z_1 = 0.5·3.5 + 4 = 5.75;
        // o_0 = 16 / (3.5 + 0.5) = 4, o_1 = 64 / (2·5.75 + 0.5) = 16/3.
        let initial = LinearState {
            kv: vec![2.0],
            z: vec![1.0],
        };
        assert_causal_by_hand(&p, Some(&initial), [4.0, 16.0 / 3.0], 32.0, &[5.75]);
        // An initial state without z starts z at zero.
        let kv_only = LinearState {
            kv: vec![2.0],
            z: Vec::new(),
        };
        assert_causal_by_hand(&p, Some(&kv_only), [16.0 / 3.5, 64.0 / 11.5], 32.0, &[5.5]);
    }

    #[test]
    fn non_causal_worked_by_hand() {
        // φ(K)ᵀV = 3·5 + 4·6 = 39: o_0 = 1·39, o_1 = 2·39; Σk = 7.
        let mut p = tiny(false);
        let fwd = linear_forward(&p, &Q, &K, &V, None);
        assert_near(&fwd.output, &[39.0, 78.0]);
        assert_near(&fwd.state.kv, &[39.0]);
        assert!(fwd.state.z.is_empty());
        p.normalize = true;
        let fwd = linear_forward(&p, &Q, &K, &V, None);
        assert_near(&fwd.output, &[39.0 / 7.5, 78.0 / 14.5]);
        assert_near(&fwd.state.z, &[7.0]);
    }

    #[test]
    fn feature_maps_worked_by_hand() {
        use FeatureMap::*;
        let e = (-1f64).exp();
        let cases = [
            (Identity, [-1.0, 0.0, 2.0]),
            (EluPlusOne, [e, 1.0, 3.0]),
            (Relu, [0.0, 0.0, 2.0]),
        ];
        for (map, want) in cases {
            for (x, w) in [-1.0, 0.0, 2.0].into_iter().zip(want) {
                assert!((map.apply(x) - w).abs() < 1e-15, "{map:?}({x})");
                assert!((f64::from(map.apply_f32(x as f32)) - w).abs() < 1e-7);
            }
        }
        // The feature map applies to the raw rows, before the scale: relu hides q = -1.
        let mut p = tiny(true);
        p.feature_map = Relu;
        let fwd = linear_forward(&p, &[-1.0, 2.0], &K, &V, None);
        assert_near(&fwd.output, &[0.0, 63.0]);
    }

    #[test]
    #[should_panic(expected = "non-causal linear attention has no decay")]
    fn non_causal_rejects_decay() {
        let mut p = tiny(false);
        p.decay = Some(vec![0.5]);
        linear_forward(&p, &Q, &K, &V, None);
    }

    #[test]
    #[should_panic(expected = "non-causal linear attention has no initial state")]
    fn non_causal_rejects_initial_state() {
        let p = tiny(false);
        let initial = LinearState::zeros(&p);
        linear_forward(&p, &Q, &K, &V, Some(&initial));
    }

    #[test]
    #[should_panic(expected = "linear_recurrent is causal only")]
    fn recurrent_rejects_non_causal() {
        linear_recurrent(&tiny(false), &Q, &K, &V, None);
    }

    #[test]
    fn lightning_decay_follows_alibi_slopes() {
        let near = |got: Vec<f64>, slopes: &[f64]| {
            assert_eq!(got.len(), slopes.len());
            for (g, s) in got.iter().zip(slopes) {
                assert!(
                    (g - (-s).exp()).abs() < 1e-15,
                    "{got:?} vs slopes {slopes:?}"
                );
            }
        };
        // Eight heads: s_h = 2^(−h).
        let eight: Vec<f64> = (1..=8).map(|h| 0.5f64.powi(h)).collect();
        near(lightning_decay(8), &eight);
        // Six heads: four heads' slopes 2^(−2h), then slopes 1 and 3 of eight heads.
        let six = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125];
        near(lightning_decay(6), &six);
        near(lightning_decay(1), &[1.0 / 256.0]);
        assert!(lightning_decay(0).is_empty());
        assert!(lightning_decay(12).iter().all(|&l| l > 0.0 && l < 1.0));
    }

    /// A random problem, the seed of its inputs, and whether (and after how many prefix tokens)
    /// it starts from an initial state.
    #[derive(Clone, Debug)]
    pub(super) struct Case {
        pub(super) p: LinearProblem,
        pub(super) seed: u64,
        pub(super) initial_after: Option<usize>,
    }

    pub(super) fn arb_case(causal: bool) -> impl Strategy<Value = Case> {
        (
            (
                1usize..3,
                1usize..3,
                1usize..3,
                0usize..9,
                1usize..5,
                1usize..5,
                any::<bool>(),
            ),
            (
                0usize..3,
                any::<bool>(),
                any::<bool>(),
                prop::option::of(1usize..5),
                any::<u64>(),
            ),
        )
            .prop_map(
                move |(
                    (batch, group, kv_heads, len, key_dim, value_dim, bshd),
                    (map, decayed, normalize, initial_after, seed),
                )| {
                    let q_heads = group * kv_heads;
                    let p = LinearProblem {
                        causal,
                        feature_map: [
                            FeatureMap::Identity,
                            FeatureMap::EluPlusOne,
                            FeatureMap::Relu,
                        ][map],
                        // λ in [0.2, 1).
                        decay: (causal && decayed).then(|| {
                            values(q_heads, seed ^ 7)
                                .iter()
                                .map(|x| 0.6 + 0.2 * x)
                                .collect()
                        }),
                        normalize,
                        ..LinearProblem::new(
                            batch,
                            q_heads,
                            kv_heads,
                            len,
                            key_dim,
                            value_dim,
                            if bshd { Layout::Bshd } else { Layout::Bhsd },
                        )
                    };
                    Case {
                        p,
                        seed,
                        initial_after: initial_after.filter(|_| causal),
                    }
                },
            )
    }

    /// Q, K, V and the initial state of a case. The initial state is a real one: the final
    /// state of a random prefix. With the identity map and the normaliser, Q and K are made
    /// non-negative, as a usable normaliser needs (a denominator near zero would measure
    /// cancellation, not the formulas).
    pub(super) fn inputs(c: &Case) -> (Vec<f64>, Vec<f64>, Vec<f64>, Option<LinearState>) {
        let non_negative = c.p.normalize && c.p.feature_map == FeatureMap::Identity;
        let qk = |n: usize, seed: u64| {
            let x = values(n, seed);
            if non_negative {
                x.iter().map(|a| a.abs()).collect()
            } else {
                x
            }
        };
        let p = &c.p;
        let initial = c.initial_after.map(|prefix_len| {
            let prefix = LinearProblem {
                len: prefix_len,
                ..p.clone()
            };
            let (q, k) = (
                qk(prefix.q_elems(), c.seed ^ 11),
                qk(prefix.k_elems(), c.seed ^ 12),
            );
            let v = values(prefix.v_elems(), c.seed ^ 13);
            linear_forward(&prefix, &q, &k, &v, None).state
        });
        (
            qk(p.q_elems(), c.seed),
            qk(p.k_elems(), c.seed ^ 1),
            values(p.v_elems(), c.seed ^ 2),
            initial,
        )
    }

    /// The largest difference relative to the larger magnitude (at least 1).
    pub(super) fn max_rel_err(got: &[f64], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len(), "lengths differ");
        got.iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs() / 1f64.max(a.abs()).max(b.abs()))
            .fold(0.0, f64::max)
    }

    /// Rows `rows` of every (batch, head) of a `[batch, heads, len, dim]` tensor in `layout`,
    /// as a tensor of length `rows.len()` in the same layout.
    pub(super) fn cut(
        x: &[f64],
        layout: Layout,
        (batch, heads, len, dim): (usize, usize, usize, usize),
        rows: Range<usize>,
    ) -> Vec<f64> {
        let mut out = vec![0.0; batch * heads * rows.len() * dim];
        for b in 0..batch {
            for h in 0..heads {
                for (s, row) in rows.clone().enumerate() {
                    let from = layout.index(b, h, row, 0, heads, len, dim);
                    let to = layout.index(b, h, s, 0, heads, rows.len(), dim);
                    out[to..to + dim].copy_from_slice(&x[from..from + dim]);
                }
            }
        }
        out
    }

    proptest! {
        #[test]
        fn quadratic_equals_recurrent(c in arb_case(true)) {
            let (q, k, v, initial) = inputs(&c);
            let direct = linear_forward(&c.p, &q, &k, &v, initial.as_ref());
            let recurrent = linear_recurrent(&c.p, &q, &k, &v, initial.as_ref());
            let errs = [
                max_rel_err(&recurrent.output, &direct.output),
                max_rel_err(&recurrent.state.kv, &direct.state.kv),
                max_rel_err(&recurrent.state.z, &direct.state.z),
            ];
            prop_assert!(errs.iter().all(|&e| e < 1e-9), "output, kv, z errors {errs:?}");
        }

        #[test]
        fn two_pieces_equal_one_call(c in arb_case(true), split in any::<usize>()) {
            let p = &c.p;
            let (q, k, v, initial) = inputs(&c);
            let whole = linear_forward(p, &q, &k, &v, initial.as_ref());
            let split = split % (p.len + 1);
            let (first_rows, second_rows) = (0..split, split..p.len);
            let q_shape = (p.batch, p.q_heads, p.len, p.key_dim);
            let k_shape = (p.batch, p.kv_heads, p.len, p.key_dim);
            let v_shape = (p.batch, p.kv_heads, p.len, p.value_dim);
            let o_shape = (p.batch, p.q_heads, p.len, p.value_dim);
            let piece = |rows: Range<usize>, initial: Option<&LinearState>| {
                let sub = LinearProblem { len: rows.len(), ..p.clone() };
                linear_forward(
                    &sub,
                    &cut(&q, p.layout, q_shape, rows.clone()),
                    &cut(&k, p.layout, k_shape, rows.clone()),
                    &cut(&v, p.layout, v_shape, rows),
                    initial,
                )
            };
            let first = piece(first_rows.clone(), initial.as_ref());
            let second = piece(second_rows.clone(), Some(&first.state));
            let errs = [
                max_rel_err(&first.output, &cut(&whole.output, p.layout, o_shape, first_rows)),
                max_rel_err(&second.output, &cut(&whole.output, p.layout, o_shape, second_rows)),
                max_rel_err(&second.state.kv, &whole.state.kv),
                max_rel_err(&second.state.z, &whole.state.z),
            ];
            prop_assert!(errs.iter().all(|&e| e < 1e-9), "split {split}: errors {errs:?}");
        }

        #[test]
        fn non_causal_is_its_definition(c in arb_case(false)) {
            let p = &c.p;
            let (q, k, v, _) = inputs(&c);
            let fwd = linear_forward(p, &q, &k, &v, None);
            let at = |x: &[f64], b, h, s, d, heads, dim| x[p.layout.index(b, h, s, d, heads, p.len, dim)];
            let phi = |x: f64| p.feature_map.apply(x);
            let (dk, dv) = (p.key_dim, p.value_dim);
            for b in 0..p.batch {
                for h in 0..p.q_heads {
                    let kh = h / (p.q_heads / p.kv_heads);
                    // φ(K)ᵀV and Σ_j φ(k_j), by explicit sums.
                    let mut kv = vec![0.0; dk * dv];
                    let mut ksum = vec![0.0; dk];
                    for j in 0..p.len {
                        for d in 0..dk {
                            let kd = phi(at(&k, b, kh, j, d, p.kv_heads, dk));
                            ksum[d] += kd;
                            for e in 0..dv {
                                kv[d * dv + e] += kd * at(&v, b, kh, j, e, p.kv_heads, dv);
                            }
                        }
                    }
                    prop_assert!(max_rel_err(&fwd.state.kv[p.kv_state_range(b, h)], &kv) < 1e-12);
                    if p.normalize {
                        prop_assert!(max_rel_err(&fwd.state.z[p.z_state_range(b, h)], &ksum) < 1e-12);
                    }
                    for i in 0..p.len {
                        let phi_q: Vec<f64> = (0..dk).map(|d| phi(at(&q, b, h, i, d, p.q_heads, dk))).collect();
                        let denominator = if p.normalize {
                            p.scale * phi_q.iter().zip(&ksum).map(|(a, c)| a * c).sum::<f64>() + p.eps
                        } else {
                            1.0
                        };
                        for e in 0..dv {
                            // The explicit double loop over keys and key features...
                            let mut by_keys = 0.0;
                            for j in 0..p.len {
                                let mut score = 0.0;
                                for (d, qd) in phi_q.iter().enumerate() {
                                    score += qd * phi(at(&k, b, kh, j, d, p.kv_heads, dk));
                                }
                                by_keys += p.scale * score * at(&v, b, kh, j, e, p.kv_heads, dv);
                            }
                            // ... and the kernel trick, scale · φ(q_i)ᵀ (φ(K)ᵀV).
                            let by_state: f64 = p.scale
                                * phi_q.iter().enumerate().map(|(d, qd)| qd * kv[d * dv + e]).sum::<f64>();
                            let got = fwd.output[p.layout.index(b, h, i, e, p.q_heads, p.len, dv)];
                            let errs = [
                                max_rel_err(&[got], &[by_keys / denominator]),
                                max_rel_err(&[got], &[by_state / denominator]),
                            ];
                            prop_assert!(errs.iter().all(|&x| x < 1e-9), "{errs:?}");
                        }
                    }
                }
            }
        }

        #[test]
        fn gqa_reads_the_shared_kv_head(c in arb_case(true)) {
            // The same problem with each kv head copied out to its query heads (MHA).
            let p = &c.p;
            let (q, k, v, initial) = inputs(&c);
            let mha = LinearProblem { kv_heads: p.q_heads, ..p.clone() };
            let repeat = |x: &[f64], dim: usize| {
                let mut out = vec![0.0; p.batch * p.q_heads * p.len * dim];
                for b in 0..p.batch {
                    for h in 0..p.q_heads {
                        for s in 0..p.len {
                            let from = p.layout.index(b, p.kv_head_of(h), s, 0, p.kv_heads, p.len, dim);
                            let to = p.layout.index(b, h, s, 0, p.q_heads, p.len, dim);
                            out[to..to + dim].copy_from_slice(&x[from..from + dim]);
                        }
                    }
                }
                out
            };
            let grouped = linear_forward(p, &q, &k, &v, initial.as_ref());
            let repeated = linear_forward(
                &mha,
                &q,
                &repeat(&k, p.key_dim),
                &repeat(&v, p.value_dim),
                initial.as_ref(),
            );
            prop_assert_eq!(grouped, repeated);
        }

        #[test]
        fn layouts_give_the_same_result(c in arb_case(true)) {
            // A BSHD problem equals the BHSD problem on the transposed tensors.
            let p = LinearProblem { layout: Layout::Bshd, ..c.p.clone() };
            let (q, k, v, initial) = inputs(&c);
            let bhsd = LinearProblem { layout: Layout::Bhsd, ..p.clone() };
            let to_bhsd = |x: &[f64], heads: usize, dim: usize| {
                let mut out = vec![0.0; x.len()];
                for b in 0..p.batch {
                    for h in 0..heads {
                        for s in 0..p.len {
                            let from = Layout::Bshd.index(b, h, s, 0, heads, p.len, dim);
                            let to = Layout::Bhsd.index(b, h, s, 0, heads, p.len, dim);
                            out[to..to + dim].copy_from_slice(&x[from..from + dim]);
                        }
                    }
                }
                out
            };
            let a = linear_forward(&p, &q, &k, &v, initial.as_ref());
            let b = linear_forward(
                &bhsd,
                &to_bhsd(&q, p.q_heads, p.key_dim),
                &to_bhsd(&k, p.kv_heads, p.key_dim),
                &to_bhsd(&v, p.kv_heads, p.value_dim),
                initial.as_ref(),
            );
            prop_assert_eq!(to_bhsd(&a.output, p.q_heads, p.value_dim), b.output);
            prop_assert_eq!(a.state, b.state);
        }

        #[test]
        fn naive_f32_is_close_to_reference(c in prop_oneof![arb_case(true), arb_case(false)]) {
            // Inputs (and the initial state) rounded to f32 first, so both see the same values.
            let round = |x: &[f64]| x.iter().map(|&a| f64::from(a as f32)).collect::<Vec<f64>>();
            let to_f32 = |x: &[f64]| x.iter().map(|&a| a as f32).collect::<Vec<f32>>();
            let (q, k, v, initial) = inputs(&c);
            let (q, k, v) = (round(&q), round(&k), round(&v));
            let initial = initial.map(|s| LinearState { kv: round(&s.kv), z: round(&s.z) });
            let truth = linear_forward(&c.p, &q, &k, &v, initial.as_ref());
            let naive = naive_linear_f32(
                &c.p,
                &to_f32(&q),
                &to_f32(&k),
                &to_f32(&v),
                initial.as_ref(),
                &|x| x,
            );
            let errs = [
                max_rel_err(&naive.output, &truth.output),
                max_rel_err(&naive.state.kv, &truth.state.kv),
                max_rel_err(&naive.state.z, &truth.state.z),
            ];
            prop_assert!(errs.iter().all(|&e| e < 1e-4), "output, kv, z errors {errs:?}");
        }
    }
}

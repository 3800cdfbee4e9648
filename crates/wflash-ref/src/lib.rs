//! CPU reference for wflash: plain `f64` loops that define what a correct result is.
//!
//! Every GPU kernel in `wflash` is judged against the functions here. They are written for
//! clarity, not speed: one query row at a time, the softmax taken over exactly the visible keys.
//! The semantics (layouts, mask alignment, GQA head mapping, fully masked rows) are the
//! contract documented in the `wflash` crate; this crate is their executable definition.

pub mod backward;
pub mod linear;
pub mod merge;
pub mod naive;

pub use backward::{Grads, backward, sigmoid_slope, softcap_slope};

/// How a 4-D tensor is laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `[batch, heads, seq, dim]`.
    Bhsd,
    /// `[batch, seq, heads, dim]`, what most model code holds.
    Bshd,
}

impl Layout {
    /// Flat index of element `(b, h, s, d)` of a tensor with `heads` heads, `seq` rows and `dim` columns.
    #[expect(
        clippy::too_many_arguments,
        reason = "the four coordinates and three extents of a 4-D index"
    )]
    pub fn index(
        self,
        b: usize,
        h: usize,
        s: usize,
        d: usize,
        heads: usize,
        seq: usize,
        dim: usize,
    ) -> usize {
        match self {
            Layout::Bhsd => ((b * heads + h) * seq + s) * dim + d,
            Layout::Bshd => ((b * seq + s) * heads + h) * dim + d,
        }
    }
}

/// Which diagonal a causal mask is aligned to when `q_len != kv_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CausalAlign {
    /// Key `j` is visible to query `i` iff `j <= i + kv_len - q_len` (FlashAttention >= 2.1, KV-cache decoding).
    BottomRight,
    /// Key `j` is visible to query `i` iff `j <= i` (PyTorch's `is_causal`).
    TopLeft,
}

/// Sliding-window (local) attention: query `i` sees keys within `left` before and `right` after
/// its diagonal key `i + offset` (offset as for the causal mask: `kv_len - q_len`, or 0 with
/// top-left causal). `None` leaves that side unbounded. FlashAttention's `window_size`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Window {
    pub left: Option<usize>,
    pub right: Option<usize>,
}

/// The attention function.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Variant {
    /// `O = softmax(s) V` over the visible keys, with the natural-log LSE of each row.
    #[default]
    Softmax,
    /// `O = σ(s + bias) V` over the visible keys (FlashSigmoid): elementwise, no normalisation,
    /// no LSE. `bias: None` is [`default_sigmoid_bias`] of each sequence's key count.
    Sigmoid { bias: Option<f64> },
}

/// The sigmoid bias when none is given: `-ln(kv_len)`, rounded to f32 as the engine computes it.
pub fn default_sigmoid_bias(kv_len: usize) -> f64 {
    f64::from(-(kv_len as f32).ln())
}

/// An additive bias / mask over the scores, `[batch, heads, q_len, kv_len]` row-major, where
/// `batch` is 1 or the problem's batch and `heads` 1 or its q_heads (broadcast when 1).
/// `-inf` hides a key.
#[derive(Clone, Debug, PartialEq)]
pub struct Bias {
    pub values: Vec<f64>,
    pub batch: usize,
    pub heads: usize,
}

/// Packed variable-length sequences (FlashAttention's varlen interface): sequence `s` owns
/// query rows `cu_seqlens_q[s]..cu_seqlens_q[s + 1]` and key rows
/// `cu_seqlens_k[s]..cu_seqlens_k[s + 1]` of a batch-1 problem, and attends only within itself,
/// as if it were its own problem (its own causal diagonal and default sigmoid bias).
#[derive(Clone, Debug, PartialEq)]
pub struct Varlen {
    pub cu_seqlens_q: Vec<usize>,
    pub cu_seqlens_k: Vec<usize>,
}

/// Score and mask modifiers. Applied in this order to the score of a visible key:
/// `s = scale · temperature[b, h, i] · q·k`; `s = softcap · tanh(s / softcap)`;
/// `s -= alibi_slopes[h] · |j - diagonal(i)|`; `s += bias[b, h, i, j]`
/// ([`Problem::modified`]). A key is hidden by the causal mask (widened by `prefix_len`), the
/// window, `chunk`, `key_mask[b, j] == false` or a bias of `-inf` ([`Problem::is_visible`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Modifiers {
    /// Logit soft-capping (Gemma 2).
    pub softcap: Option<f64>,
    /// ALiBi slope per query head, applied in full (not only its row-varying part).
    pub alibi_slopes: Option<Vec<f64>>,
    pub bias: Option<Bias>,
    /// `[batch, kv_len]`: `true` where the key takes part.
    pub key_mask: Option<Vec<bool>>,
    /// Softmax only: one sink logit per query head that joins every row's denominator (and
    /// its LSE) as a key with a zero value (gpt-oss).
    pub sinks: Option<Vec<f64>>,
    /// Per-query inverse temperature `[batch, q_heads, q_len]` multiplying the scores.
    pub temperature: Option<Vec<f64>>,
    /// Prefix-LM: keys `j < prefix_len` are visible to every query besides those the causal
    /// mask shows (no effect without a causal mask).
    pub prefix_len: Option<usize>,
    /// Chunked local attention: query `i` sees only keys `j` with
    /// `floor(j / chunk) == floor(diagonal(i) / chunk)`.
    pub chunk: Option<usize>,
}

/// The arithmetic a score modifier needs, so that one definition ([`Problem::modified`])
/// serves the f64 truth and the f32 naive baseline.
pub trait Real:
    Copy
    + PartialEq
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    const NEG_INFINITY: Self;
    /// `x` rounded to this type.
    fn from_f64(x: f64) -> Self;
    fn tanh(self) -> Self;
    fn abs(self) -> Self;
}

impl Real for f64 {
    const NEG_INFINITY: f64 = f64::NEG_INFINITY;
    fn from_f64(x: f64) -> f64 {
        x
    }
    fn tanh(self) -> f64 {
        f64::tanh(self)
    }
    fn abs(self) -> f64 {
        f64::abs(self)
    }
}

impl Real for f32 {
    const NEG_INFINITY: f32 = f32::NEG_INFINITY;
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    fn tanh(self) -> f32 {
        f32::tanh(self)
    }
    fn abs(self) -> f32 {
        f32::abs(self)
    }
}

/// One attention problem: shapes, layout and options.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub value_dim: usize,
    pub layout: Layout,
    /// Multiplier of `q·k`; callers usually pass `1/sqrt(head_dim)`.
    pub scale: f64,
    pub causal: Option<CausalAlign>,
    pub window: Option<Window>,
    pub variant: Variant,
    pub modifiers: Modifiers,
    /// `Some` for packed variable-length sequences (then `batch` is 1).
    pub varlen: Option<Varlen>,
}

impl Problem {
    /// A problem with no causal mask, window, modifiers or varlen.
    #[expect(
        clippy::too_many_arguments,
        reason = "the seven sizes of a problem and its layout"
    )]
    pub fn new(
        batch: usize,
        q_heads: usize,
        kv_heads: usize,
        q_len: usize,
        kv_len: usize,
        head_dim: usize,
        value_dim: usize,
        layout: Layout,
    ) -> Problem {
        Problem {
            batch,
            q_heads,
            kv_heads,
            q_len,
            kv_len,
            head_dim,
            value_dim,
            layout,
            scale: 1.0 / (head_dim as f64).sqrt(),
            causal: None,
            window: None,
            variant: Variant::Softmax,
            modifiers: Modifiers::default(),
            varlen: None,
        }
    }

    /// Element counts of Q, K, V and O: their rows (over batch and heads) times their width.
    pub fn q_elems(&self) -> usize {
        self.lse_elems() * self.head_dim
    }
    pub fn k_elems(&self) -> usize {
        self.kv_rows() * self.head_dim
    }
    pub fn v_elems(&self) -> usize {
        self.kv_rows() * self.value_dim
    }
    pub fn o_elems(&self) -> usize {
        self.lse_elems() * self.value_dim
    }
    /// Key (and value) rows over every batch element and kv head.
    fn kv_rows(&self) -> usize {
        self.batch * self.kv_heads * self.kv_len
    }
    /// Element count of the LSE, laid out `[batch, q_heads, q_len]` whatever the layout.
    pub fn lse_elems(&self) -> usize {
        self.batch * self.q_heads * self.q_len
    }

    /// The kv head that query head `h` reads (GQA/MQA).
    pub fn kv_head_of(&self, h: usize) -> usize {
        h / (self.q_heads / self.kv_heads)
    }

    /// The key on query `i`'s diagonal: `i + kv_len - q_len` (bottom-right), or `i` with
    /// top-left causal alignment. Causal masks and windows are measured from it.
    pub fn diagonal(&self, i: usize) -> i64 {
        match self.causal {
            Some(CausalAlign::TopLeft) => i as i64,
            // Signed: negative when q_len > kv_len.
            _ => i as i64 + self.kv_len as i64 - self.q_len as i64,
        }
    }

    /// Whether key `j` is visible to query `i` under the causal mask (with its prefix-LM
    /// prefix), the window and the chunk of chunked local attention.
    pub fn is_visible(&self, i: usize, j: usize) -> bool {
        // i128: window sides go up to usize::MAX, which must mean "every key", not wrap.
        let (j, diag) = (j as i128, i128::from(self.diagonal(i)));
        let m = &self.modifiers;
        let in_prefix = m.prefix_len.is_some_and(|p| j < p as i128);
        let causal_ok = self.causal.is_none() || j <= diag || in_prefix;
        let window_ok = self.window.is_none_or(|w| {
            w.left.is_none_or(|left| j >= diag - left as i128)
                && w.right.is_none_or(|right| j <= diag + right as i128)
        });
        let chunk_ok = m
            .chunk
            .is_none_or(|c| j.div_euclid(c as i128) == diag.div_euclid(c as i128));
        causal_ok && window_ok && chunk_ok
    }

    /// Query row `i` of (batch `b`, query head `h`). A row's elements are contiguous in both layouts.
    pub fn q_row<'a, T>(&self, q: &'a [T], b: usize, h: usize, i: usize) -> &'a [T] {
        let start = self
            .layout
            .index(b, h, i, 0, self.q_heads, self.q_len, self.head_dim);
        &q[start..start + self.head_dim]
    }
    /// Key row `j` of (batch `b`, kv head `kh`).
    pub fn k_row<'a, T>(&self, k: &'a [T], b: usize, kh: usize, j: usize) -> &'a [T] {
        let start = self
            .layout
            .index(b, kh, j, 0, self.kv_heads, self.kv_len, self.head_dim);
        &k[start..start + self.head_dim]
    }
    /// Value row `j` of (batch `b`, kv head `kh`).
    pub fn v_row<'a, T>(&self, v: &'a [T], b: usize, kh: usize, j: usize) -> &'a [T] {
        let start = self
            .layout
            .index(b, kh, j, 0, self.kv_heads, self.kv_len, self.value_dim);
        &v[start..start + self.value_dim]
    }
    /// Output row `i` of (batch `b`, query head `h`).
    pub fn o_row_range(&self, b: usize, h: usize, i: usize) -> std::ops::Range<usize> {
        let start = self
            .layout
            .index(b, h, i, 0, self.q_heads, self.q_len, self.value_dim);
        start..start + self.value_dim
    }

    /// The score of query `i` of (batch `b`, query head `h`) with key `j` after every modifier
    /// (see [`Modifiers`]), or `None` when the key is hidden from the query.
    pub fn logit(
        &self,
        q: &[f64],
        k: &[f64],
        b: usize,
        h: usize,
        i: usize,
        j: usize,
    ) -> Option<f64> {
        if !self.is_visible(i, j) || !self.key_visible(b, j) {
            return None;
        }
        let q_row = self.q_row(q, b, h, i);
        let k_row = self.k_row(k, b, self.kv_head_of(h), j);
        let dot: f64 = q_row.iter().zip(k_row).map(|(a, b)| a * b).sum();
        self.modified(self.scale * self.temperature(b, h, i) * dot, b, h, i, j)
    }

    /// Query `i`'s inverse temperature (1 without one).
    pub fn temperature(&self, b: usize, h: usize, i: usize) -> f64 {
        let m = &self.modifiers;
        m.temperature
            .as_ref()
            .map_or(1.0, |t| t[(b * self.q_heads + h) * self.q_len + i])
    }

    /// Whether `key_mask` lets key `j` of batch `b` take part.
    pub fn key_visible(&self, b: usize, j: usize) -> bool {
        let m = &self.modifiers;
        m.key_mask
            .as_ref()
            .is_none_or(|mask| mask[b * self.kv_len + j])
    }

    /// Soft-capping, ALiBi and the bias applied to score `s` (already scaled and tempered),
    /// in `R`'s precision (each parameter rounded to it); `None` where the bias is `-inf`.
    pub fn modified<R: Real>(&self, s: R, b: usize, h: usize, i: usize, j: usize) -> Option<R> {
        let m = &self.modifiers;
        let mut s = s;
        if let Some(cap) = m.softcap {
            let cap = R::from_f64(cap);
            s = cap * (s / cap).tanh();
        }
        if let Some(slopes) = &m.alibi_slopes {
            let distance = R::from_f64(j as f64 - self.diagonal(i) as f64).abs();
            s = s - R::from_f64(slopes[h]) * distance;
        }
        if let Some(bias) = &m.bias {
            let (bb, bh) = (b.min(bias.batch - 1), h.min(bias.heads - 1));
            let x = bias.values[((bb * bias.heads + bh) * self.q_len + i) * self.kv_len + j];
            let x = R::from_f64(x);
            if x == R::NEG_INFINITY {
                return None;
            }
            s = s + x;
        }
        Some(s)
    }

    /// Query head `h`'s sink logit, if there are sinks.
    pub fn sink(&self, h: usize) -> Option<f64> {
        self.modifiers.sinks.as_ref().map(|s| s[h])
    }

    /// The sigmoid bias of this problem (its default resolved), or `None` for softmax.
    pub fn sigmoid_bias(&self) -> Option<f64> {
        match self.variant {
            Variant::Softmax => None,
            Variant::Sigmoid { bias } => Some(bias.unwrap_or(default_sigmoid_bias(self.kv_len))),
        }
    }

    /// Visible (query, key) pairs summed over batch elements and query heads under every mask
    /// (causal, window, key mask, `-inf` bias, varlen): what a fused kernel must compute, and
    /// the unit of the FLOP count.
    pub fn visible_pairs_total(&self) -> u64 {
        if let Some(varlen) = &self.varlen {
            let spans = varlen
                .cu_seqlens_q
                .windows(2)
                .zip(varlen.cu_seqlens_k.windows(2));
            return spans
                .map(|(q, k)| {
                    let sub = Problem {
                        q_len: q[1] - q[0],
                        kv_len: k[1] - k[0],
                        varlen: None,
                        modifiers: Modifiers::default(),
                        ..self.clone()
                    };
                    sub.visible_pairs() * self.q_heads as u64
                })
                .sum();
        }
        let bias = self.modifiers.bias.as_ref();
        // A bias that varies by head must be counted per head; otherwise heads share the count.
        let counted_heads = bias.map_or(1, |b| b.heads);
        let mut total = 0;
        for b in 0..self.batch {
            for h in 0..counted_heads {
                let pairs = (0..self.q_len)
                    .map(|i| {
                        (0..self.kv_len)
                            .filter(|&j| {
                                self.is_visible(i, j)
                                    && self.key_visible(b, j)
                                    && bias
                                        .is_none_or(|_| self.modified(0.0f64, b, h, i, j).is_some())
                            })
                            .count() as u64
                    })
                    .sum::<u64>();
                total += pairs * (self.q_heads / counted_heads) as u64;
            }
        }
        total
    }

    /// Number of (query, key) pairs per (batch, head) that the causal mask and the window leave
    /// visible.
    pub fn visible_pairs(&self) -> u64 {
        (0..self.q_len)
            .map(|i| (0..self.kv_len).filter(|&j| self.is_visible(i, j)).count() as u64)
            .sum()
    }
}

/// Output of a forward pass: `output` in the problem's layout, `lse` as `[batch, q_heads, q_len]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Forward {
    pub output: Vec<f64>,
    /// Softmax: natural-log logsumexp of the scaled scores of each query row; `-inf` for a row
    /// with no visible key. Sigmoid: empty (there is no row statistic).
    pub lse: Vec<f64>,
}

/// The forward pass of `p.variant`.
///
/// # Panics
/// If a slice length does not match the problem (the reference trusts its caller).
pub fn forward(p: &Problem, q: &[f64], k: &[f64], v: &[f64]) -> Forward {
    per_sequence(p, q, k, v, |p, q, k, v| match p.variant {
        Variant::Softmax => softmax_forward(p, q, k, v),
        Variant::Sigmoid { .. } => sigmoid_forward(p, q, k, v),
    })
}

/// Runs `f` on each sequence of a varlen problem as its own batch-1 problem and assembles the
/// results in the packed layout (LSE `[q_heads, total_q]`); calls `f` once otherwise.
///
/// # Panics
/// If the varlen offsets are inconsistent with the problem.
pub fn per_sequence<T: Copy + Default>(
    p: &Problem,
    q: &[T],
    k: &[T],
    v: &[T],
    f: impl Fn(&Problem, &[T], &[T], &[T]) -> Forward,
) -> Forward {
    if p.varlen.is_none() {
        return f(p, q, k, v);
    }
    let mut output = vec![0.0; p.o_elems()];
    let mut lse = match p.variant {
        Variant::Softmax => vec![f64::NEG_INFINITY; p.lse_elems()],
        Variant::Sigmoid { .. } => Vec::new(),
    };
    for seq in sequences(p) {
        let sub = &seq.problem;
        // A sequence without keys is a problem with kv_len 0: every row sees nothing.
        let result = f(
            sub,
            &seq.gather_q(p, q, p.head_dim),
            &seq.gather_kv(p, k, p.head_dim),
            &seq.gather_kv(p, v, p.value_dim),
        );
        seq.scatter_q(p, &result.output, &mut output, p.value_dim);
        if !lse.is_empty() {
            seq.scatter_rows(p, &result.lse, &mut lse);
        }
    }
    Forward { output, lse }
}

/// One sequence of a varlen problem, as its own batch-1 problem: its rows start at `q0` (queries)
/// and `k0` (keys) of the packed tensors.
#[derive(Clone, Debug)]
pub struct Sequence {
    pub problem: Problem,
    pub q0: usize,
    pub k0: usize,
}

/// The non-empty sequences of a varlen problem (sequences without query rows have nothing to
/// compute), each with its per-query data (temperature) sliced out.
///
/// # Panics
/// If `p` has no varlen, or its batch is not 1.
pub fn sequences(p: &Problem) -> Vec<Sequence> {
    let varlen = p.varlen.as_ref().expect("a varlen problem");
    assert_eq!(p.batch, 1, "varlen problems have batch 1");
    let spans = varlen
        .cu_seqlens_q
        .windows(2)
        .zip(varlen.cu_seqlens_k.windows(2));
    spans
        .filter(|(qs, _)| qs[1] > qs[0])
        .map(|(qs, ks)| {
            let (q0, nq, k0, nk) = (qs[0], qs[1] - qs[0], ks[0], ks[1] - ks[0]);
            let mut sub = Problem {
                q_len: nq,
                kv_len: nk,
                varlen: None,
                ..p.clone()
            };
            sub.modifiers.temperature = p.modifiers.temperature.as_ref().map(|t| {
                (0..p.q_heads)
                    .flat_map(|h| t[h * p.q_len + q0..h * p.q_len + q0 + nq].iter().copied())
                    .collect()
            });
            Sequence {
                problem: sub,
                q0,
                k0,
            }
        })
        .collect()
}

impl Sequence {
    /// The sequence's rows of a packed per-query tensor (Q, O, dO) of row width `dim`.
    pub fn gather_q<T: Copy + Default>(&self, p: &Problem, x: &[T], dim: usize) -> Vec<T> {
        self.gather(p, x, p.q_heads, p.q_len, self.q0, self.problem.q_len, dim)
    }
    /// The sequence's rows of a packed per-key tensor (K, V) of row width `dim`.
    pub fn gather_kv<T: Copy + Default>(&self, p: &Problem, x: &[T], dim: usize) -> Vec<T> {
        self.gather(
            p,
            x,
            p.kv_heads,
            p.kv_len,
            self.k0,
            self.problem.kv_len,
            dim,
        )
    }
    /// Writes the sequence's per-query rows `rows` (its own layout) into packed `out`.
    pub fn scatter_q(&self, p: &Problem, rows: &[f64], out: &mut [f64], dim: usize) {
        let (len, n) = (p.q_len, self.problem.q_len);
        self.scatter(p, rows, out, p.q_heads, len, self.q0, n, dim);
    }
    /// Writes the sequence's per-key rows `rows` (its own layout) into packed `out`.
    pub fn scatter_kv(&self, p: &Problem, rows: &[f64], out: &mut [f64], dim: usize) {
        let (len, n) = (p.kv_len, self.problem.kv_len);
        self.scatter(p, rows, out, p.kv_heads, len, self.k0, n, dim);
    }
    /// Writes the sequence's per-query values `[q_heads, n]` (LSE, temperature gradient) into
    /// packed `out` (`[q_heads, total_q]`).
    pub fn scatter_rows(&self, p: &Problem, values: &[f64], out: &mut [f64]) {
        let n = self.problem.q_len;
        for h in 0..p.q_heads {
            out[h * p.q_len + self.q0..][..n].copy_from_slice(&values[h * n..(h + 1) * n]);
        }
    }

    #[expect(clippy::too_many_arguments, reason = "a strided block copy's extents")]
    fn gather<T: Copy + Default>(
        &self,
        p: &Problem,
        x: &[T],
        heads: usize,
        len: usize,
        start: usize,
        n: usize,
        dim: usize,
    ) -> Vec<T> {
        let mut out = vec![T::default(); heads * n * dim];
        for h in 0..heads {
            for s in 0..n {
                let from = p.layout.index(0, h, start + s, 0, heads, len, dim);
                let to = p.layout.index(0, h, s, 0, heads, n, dim);
                out[to..to + dim].copy_from_slice(&x[from..from + dim]);
            }
        }
        out
    }

    #[expect(clippy::too_many_arguments, reason = "a strided block copy's extents")]
    fn scatter(
        &self,
        p: &Problem,
        rows: &[f64],
        out: &mut [f64],
        heads: usize,
        len: usize,
        start: usize,
        n: usize,
        dim: usize,
    ) {
        for h in 0..heads {
            for s in 0..n {
                let from = p.layout.index(0, h, s, 0, heads, n, dim);
                let to = p.layout.index(0, h, start + s, 0, heads, len, dim);
                out[to..to + dim].copy_from_slice(&rows[from..from + dim]);
            }
        }
    }
}

/// The numerically stable logistic function: no overflow for any finite `x`.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Sigmoid attention forward: `O[i] = Σ_j visible σ(logit(i, j) + bias) v_j`, per (batch,
/// query head). Hidden keys contribute nothing; a row with no visible key gets output 0.
/// One sequence: see [`forward`] for varlen problems.
///
/// # Panics
/// If a slice length does not match the problem.
pub fn sigmoid_forward(p: &Problem, q: &[f64], k: &[f64], v: &[f64]) -> Forward {
    assert_eq!(q.len(), p.q_elems(), "q length");
    assert_eq!(k.len(), p.k_elems(), "k length");
    assert_eq!(v.len(), p.v_elems(), "v length");
    let bias = p.sigmoid_bias().expect("a sigmoid problem");
    let mut output = vec![0.0; p.o_elems()];
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let kh = p.kv_head_of(h);
            for i in 0..p.q_len {
                let out = &mut output[p.o_row_range(b, h, i)];
                for j in 0..p.kv_len {
                    let Some(s) = p.logit(q, k, b, h, i, j) else {
                        continue;
                    };
                    let weight = sigmoid(s + bias);
                    for (o, x) in out.iter_mut().zip(p.v_row(v, b, kh, j)) {
                        *o += weight * x;
                    }
                }
            }
        }
    }
    Forward {
        output,
        lse: Vec::new(),
    }
}

/// Softmax attention forward: `O = softmax(logits) V` over the visible keys (and the sink,
/// whose value is zero), per (batch, query head). One sequence: see [`forward`] for varlen.
///
/// A query row with no visible key, or whose visible logits are all `-inf`, gets output 0 and
/// LSE `-inf` (the sink logit with a sink). NaN and `+inf` propagate as f64 arithmetic has it:
/// a NaN logit, or two `+inf` ones, make the row NaN; a non-finite value of V reaches the output
/// columns of the rows that see its key.
///
/// # Panics
/// If a slice length does not match the problem (the reference trusts its caller).
pub fn softmax_forward(p: &Problem, q: &[f64], k: &[f64], v: &[f64]) -> Forward {
    assert_eq!(q.len(), p.q_elems(), "q length");
    assert_eq!(k.len(), p.k_elems(), "k length");
    assert_eq!(v.len(), p.v_elems(), "v length");
    let mut output = vec![0.0; p.o_elems()];
    let mut lse = vec![f64::NEG_INFINITY; p.lse_elems()];
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let kh = p.kv_head_of(h);
            for i in 0..p.q_len {
                let logits: Vec<(usize, f64)> = (0..p.kv_len)
                    .filter_map(|j| p.logit(q, k, b, h, i, j).map(|s| (j, s)))
                    .collect();
                let sink = p.sink(h);
                // f64::max skips NaN: a NaN logit reaches the row through exp below.
                let max = logits
                    .iter()
                    .map(|&(_, s)| s)
                    .chain(sink)
                    .fold(f64::NEG_INFINITY, f64::max);
                let nothing = logits
                    .iter()
                    .map(|&(_, s)| s)
                    .chain(sink)
                    .all(|s| s == f64::NEG_INFINITY);
                if nothing {
                    // Nothing with weight: output stays 0; the LSE is the sink's (or -inf).
                    lse[(b * p.q_heads + h) * p.q_len + i] = sink.unwrap_or(f64::NEG_INFINITY);
                    continue;
                }
                let sum: f64 = logits
                    .iter()
                    .map(|&(_, s)| s)
                    .chain(sink)
                    .map(|s| (s - max).exp())
                    .sum();
                lse[(b * p.q_heads + h) * p.q_len + i] = max + sum.ln();
                let out = &mut output[p.o_row_range(b, h, i)];
                for &(j, s) in &logits {
                    let weight = (s - max).exp();
                    for (o, x) in out.iter_mut().zip(p.v_row(v, b, kh, j)) {
                        *o += weight * x;
                    }
                }
                out.iter_mut().for_each(|o| *o /= sum);
            }
        }
    }
    Forward { output, lse }
}

/// The attention probabilities `P` of one (batch, query head) as a `q_len × kv_len` row-major
/// matrix (one sequence).
///
/// Used by property tests (rows of P sum to 1 where any key is visible and there is no sink).
pub fn softmax_probabilities(p: &Problem, q: &[f64], k: &[f64], b: usize, h: usize) -> Vec<f64> {
    let mut probs = vec![0.0; p.q_len * p.kv_len];
    for i in 0..p.q_len {
        let row = &mut probs[i * p.kv_len..(i + 1) * p.kv_len];
        let mut max = f64::NEG_INFINITY;
        for (j, slot) in row.iter_mut().enumerate() {
            *slot = p.logit(q, k, b, h, i, j).unwrap_or(f64::NEG_INFINITY);
            max = max.max(*slot);
        }
        if max == f64::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let sink = p.sink(h);
        let max = max.max(sink.unwrap_or(f64::NEG_INFINITY));
        let sum: f64 = row
            .iter()
            .chain(sink.as_ref())
            .map(|s| (s - max).exp())
            .sum();
        row.iter_mut().for_each(|s| *s = (*s - max).exp() / sum);
    }
    probs
}

#[cfg(test)]
mod tests;

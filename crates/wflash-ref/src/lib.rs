//! CPU reference for wflash: plain `f64` loops that define what a correct result is.
//!
//! Every GPU kernel in `wflash` is judged against the functions here. They are written for
//! clarity, not speed: one query row at a time, the softmax taken over exactly the visible keys.
//! The semantics (layouts, mask alignment, GQA head mapping, fully masked rows) are the
//! contract documented in the `wflash` crate; this crate is their executable definition.

pub mod naive;

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
    /// no LSE.
    Sigmoid { bias: f64 },
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
}

impl Problem {
    /// Element counts of Q, K, V and O.
    pub fn q_elems(&self) -> usize {
        self.batch * self.q_heads * self.q_len * self.head_dim
    }
    pub fn k_elems(&self) -> usize {
        self.batch * self.kv_heads * self.kv_len * self.head_dim
    }
    pub fn v_elems(&self) -> usize {
        self.batch * self.kv_heads * self.kv_len * self.value_dim
    }
    pub fn o_elems(&self) -> usize {
        self.batch * self.q_heads * self.q_len * self.value_dim
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

    /// Whether key `j` is visible to query `i` under the causal and window options.
    pub fn is_visible(&self, i: usize, j: usize) -> bool {
        let (j, diag) = (j as i64, self.diagonal(i));
        let causal_ok = self.causal.is_none() || j <= diag;
        let window_ok = self.window.is_none_or(|w| {
            w.left.is_none_or(|left| j >= diag - left as i64)
                && w.right.is_none_or(|right| j <= diag + right as i64)
        });
        causal_ok && window_ok
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

    /// The scaled score `scale · q·k` of query `i` of (batch `b`, query head `h`) with key `j`.
    pub fn score(&self, q: &[f64], k: &[f64], b: usize, h: usize, i: usize, j: usize) -> f64 {
        let q_row = self.q_row(q, b, h, i);
        let k_row = self.k_row(k, b, self.kv_head_of(h), j);
        let dot: f64 = q_row.iter().zip(k_row).map(|(a, b)| a * b).sum();
        self.scale * dot
    }

    /// Number of visible (query, key) pairs per (batch, head): the FLOP count's unit.
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
    match p.variant {
        Variant::Softmax => softmax_forward(p, q, k, v),
        Variant::Sigmoid { bias } => sigmoid_forward(p, bias, q, k, v),
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

/// Sigmoid attention forward: `O[i] = Σ_j visible σ(scale · q_i·k_j + bias) v_j`, per (batch,
/// query head). Invisible keys contribute nothing; a row with no visible key gets output 0.
///
/// # Panics
/// If a slice length does not match the problem.
pub fn sigmoid_forward(p: &Problem, bias: f64, q: &[f64], k: &[f64], v: &[f64]) -> Forward {
    assert_eq!(q.len(), p.q_elems(), "q length");
    assert_eq!(k.len(), p.k_elems(), "k length");
    assert_eq!(v.len(), p.v_elems(), "v length");
    let mut output = vec![0.0; p.o_elems()];
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let kh = p.kv_head_of(h);
            for i in 0..p.q_len {
                let out = &mut output[p.o_row_range(b, h, i)];
                for j in (0..p.kv_len).filter(|&j| p.is_visible(i, j)) {
                    let weight = sigmoid(p.score(q, k, b, h, i, j) + bias);
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

/// Softmax attention forward: `O = softmax(scale · Q Kᵀ + mask) V`, per (batch, query head).
///
/// A query row with no visible key gets output 0 and LSE `-inf`.
///
/// # Panics
/// If a slice length does not match the problem (the reference trusts its caller).
pub fn softmax_forward(p: &Problem, q: &[f64], k: &[f64], v: &[f64]) -> Forward {
    assert_eq!(q.len(), p.q_elems(), "q length");
    assert_eq!(k.len(), p.k_elems(), "k length");
    assert_eq!(v.len(), p.v_elems(), "v length");
    let mut output = vec![0.0; p.o_elems()];
    let mut lse = vec![f64::NEG_INFINITY; p.lse_elems()];
    let mut logits = vec![0.0; p.kv_len];
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            let kh = p.kv_head_of(h);
            for i in 0..p.q_len {
                let visible: Vec<usize> = (0..p.kv_len).filter(|&j| p.is_visible(i, j)).collect();
                if visible.is_empty() {
                    continue; // output already 0, lse already -inf
                }
                for &j in &visible {
                    logits[j] = p.score(q, k, b, h, i, j);
                }
                let max = visible
                    .iter()
                    .map(|&j| logits[j])
                    .fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = visible.iter().map(|&j| (logits[j] - max).exp()).sum();
                lse[(b * p.q_heads + h) * p.q_len + i] = max + sum.ln();
                let out = &mut output[p.o_row_range(b, h, i)];
                for &j in &visible {
                    let weight = (logits[j] - max).exp();
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

/// The attention probabilities `P` of one (batch, query head) as a `q_len × kv_len` row-major matrix.
///
/// Used by property tests (rows of P sum to 1 where any key is visible).
pub fn softmax_probabilities(p: &Problem, q: &[f64], k: &[f64], b: usize, h: usize) -> Vec<f64> {
    let mut probs = vec![0.0; p.q_len * p.kv_len];
    for i in 0..p.q_len {
        let row = &mut probs[i * p.kv_len..(i + 1) * p.kv_len];
        let mut max = f64::NEG_INFINITY;
        for (j, slot) in row.iter_mut().enumerate() {
            *slot = if p.is_visible(i, j) {
                p.score(q, k, b, h, i, j)
            } else {
                f64::NEG_INFINITY
            };
            max = max.max(*slot);
        }
        if max == f64::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let sum: f64 = row.iter().map(|s| (s - max).exp()).sum();
        row.iter_mut().for_each(|s| *s = (*s - max).exp() / sum);
    }
    probs
}

#[cfg(test)]
mod tests;

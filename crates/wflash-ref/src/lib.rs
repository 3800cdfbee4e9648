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

    /// Whether key `j` is visible to query `i` under the causal option.
    pub fn is_visible(&self, i: usize, j: usize) -> bool {
        match self.causal {
            None => true,
            Some(CausalAlign::TopLeft) => j <= i,
            // Written in signed arithmetic: `i + kv_len - q_len` is negative when q_len > kv_len.
            Some(CausalAlign::BottomRight) => {
                (j as i64) <= i as i64 + self.kv_len as i64 - self.q_len as i64
            }
        }
    }

    /// The scaled score `scale · q·k` of query `i` of (batch `b`, query head `h`) with key `j`.
    pub fn score(&self, q: &[f64], k: &[f64], b: usize, h: usize, i: usize, j: usize) -> f64 {
        let kh = self.kv_head_of(h);
        let dot: f64 = (0..self.head_dim)
            .map(|d| {
                q[self
                    .layout
                    .index(b, h, i, d, self.q_heads, self.q_len, self.head_dim)]
                    * k[self
                        .layout
                        .index(b, kh, j, d, self.kv_heads, self.kv_len, self.head_dim)]
            })
            .sum();
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
                for j in (0..p.kv_len).filter(|&j| p.is_visible(i, j)) {
                    let weight = sigmoid(p.score(q, k, b, h, i, j) + bias);
                    for e in 0..p.value_dim {
                        output[p.layout.index(b, h, i, e, p.q_heads, p.q_len, p.value_dim)] +=
                            weight
                                * v[p
                                    .layout
                                    .index(b, kh, j, e, p.kv_heads, p.kv_len, p.value_dim)];
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
                for e in 0..p.value_dim {
                    let acc: f64 = visible
                        .iter()
                        .map(|&j| {
                            (logits[j] - max).exp()
                                * v[p
                                    .layout
                                    .index(b, kh, j, e, p.kv_heads, p.kv_len, p.value_dim)]
                        })
                        .sum();
                    output[p.layout.index(b, h, i, e, p.q_heads, p.q_len, p.value_dim)] = acc / sum;
                }
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

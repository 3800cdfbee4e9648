//! Merging partial softmax attention results: what `wflash`'s `merge_attention` computes.
//!
//! Attention over a key set split into disjoint parts (the splits of split-KV decoding, the
//! shards of context or ring parallelism) is recovered from each part's output `O_s` and
//! log-sum-exp `lse_s`: `lse = m + ln Σ_s exp(lse_s − m)` with `m = max_s lse_s`, and
//! `O = Σ_s exp(lse_s − lse) O_s`. A part whose row saw no key (`lse_s = −∞`) contributes
//! nothing, whatever its output holds; a row no part saw gets `O = 0` and `lse = −∞`, as one
//! attention call over all the keys gives it. A NaN in any part's LSE or in a contributing
//! output propagates.

use crate::Layout;

/// The query side of the attention calls being merged: outputs `[batch, heads, len,
/// value_dim]` in a layout, LSEs `[batch, heads, len]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputShape {
    pub batch: usize,
    pub heads: usize,
    pub len: usize,
    pub value_dim: usize,
}

impl OutputShape {
    pub fn o_elems(&self) -> usize {
        self.batch * self.heads * self.len * self.value_dim
    }
    pub fn lse_elems(&self) -> usize {
        self.batch * self.heads * self.len
    }
}

/// One part: its output (in the call's layout) and its LSE.
#[derive(Clone, Copy, Debug)]
pub struct Part<'a, F = f64> {
    pub output: &'a [F],
    pub lse: &'a [F],
}

/// The float types a merge runs in: f64 for the truth, f32 for the same-precision baseline.
pub trait Real:
    Copy
    + PartialEq
    + std::iter::Sum
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Add<Output = Self>
{
    const ZERO: Self;
    const NEG_INFINITY: Self;
    const NAN: Self;
    fn is_nan(self) -> bool;
    fn max(self, other: Self) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            const NAN: Self = <$t>::NAN;
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
        }
    };
}
real!(f32);
real!(f64);

/// Merges `parts` (each of `shape`, outputs in `layout`) into the output and LSE of attention
/// over the union of their keys: in f64 the truth, in f32 the same-precision baseline.
pub fn merge<F: Real>(
    shape: &OutputShape,
    layout: Layout,
    parts: &[Part<'_, F>],
) -> (Vec<F>, Vec<F>) {
    let mut output = vec![F::ZERO; shape.o_elems()];
    let mut lse = vec![F::NEG_INFINITY; shape.lse_elems()];
    for b in 0..shape.batch {
        for h in 0..shape.heads {
            for s in 0..shape.len {
                let row = (b * shape.heads + h) * shape.len + s;
                let at = |d| layout.index(b, h, s, d, shape.heads, shape.len, shape.value_dim);
                let m = parts
                    .iter()
                    .map(|p| p.lse[row])
                    .fold(F::NEG_INFINITY, |m, x| {
                        if x.is_nan() || m.is_nan() {
                            F::NAN
                        } else {
                            m.max(x)
                        }
                    });
                if m == F::NEG_INFINITY {
                    continue;
                }
                let sum: F = parts.iter().map(|p| (p.lse[row] - m).exp()).sum();
                let merged = m + sum.ln();
                lse[row] = merged;
                for d in 0..shape.value_dim {
                    output[at(d)] = parts
                        .iter()
                        .filter(|p| p.lse[row] != F::NEG_INFINITY)
                        .map(|p| (p.lse[row] - merged).exp() * p.output[at(d)])
                        .sum();
                }
            }
        }
    }
    (output, lse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::values;
    use crate::{Problem, forward};
    use proptest::prelude::*;

    /// Keys `range` of a `[batch, heads, len, dim]` tensor in `layout`, as a tensor of their own.
    fn take_keys(
        x: &[f64],
        layout: Layout,
        dims: [usize; 4],
        range: std::ops::Range<usize>,
    ) -> Vec<f64> {
        let [batch, heads, len, dim] = dims;
        let mut out = vec![0.0; batch * heads * range.len() * dim];
        for b in 0..batch {
            for h in 0..heads {
                for (i, s) in range.clone().enumerate() {
                    for d in 0..dim {
                        out[layout.index(b, h, i, d, heads, range.len(), dim)] =
                            x[layout.index(b, h, s, d, heads, len, dim)];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn worked_by_hand() {
        // One row, two parts: lse ln 1 and ln 3 merge to ln 4, weights 1/4 and 3/4; a part
        // that saw no key (lse −∞, a NaN output) changes nothing.
        let shape = OutputShape {
            batch: 1,
            heads: 1,
            len: 1,
            value_dim: 1,
        };
        let parts = [
            Part {
                output: &[2.0],
                lse: &[0.0],
            },
            Part {
                output: &[f64::NAN],
                lse: &[f64::NEG_INFINITY],
            },
            Part {
                output: &[6.0],
                lse: &[3f64.ln()],
            },
        ];
        let (o, lse) = merge(&shape, Layout::Bhsd, &parts);
        assert!((o[0] - (0.25 * 2.0 + 0.75 * 6.0)).abs() < 1e-12);
        assert!((lse[0] - 4f64.ln()).abs() < 1e-12);
        let empty = [Part {
            output: &[f64::NAN],
            lse: &[f64::NEG_INFINITY],
        }; 2];
        assert_eq!(
            merge(&shape, Layout::Bhsd, &empty),
            (vec![0.0], vec![f64::NEG_INFINITY])
        );
        let nan = [
            Part {
                output: &[1.0],
                lse: &[f64::NAN],
            },
            parts[0],
        ];
        let (o, lse) = merge(&shape, Layout::Bhsd, &nan);
        assert!(o[0].is_nan() && lse[0].is_nan());
    }

    proptest! {
        /// Attention over keys split into parts, merged, is attention over all the keys.
        #[test]
        fn merged_parts_equal_one_call(
            batch in 1usize..3, kv_heads in 1usize..3, group in 1usize..3,
            q_len in 1usize..4, kv_len in 1usize..10, head_dim in 1usize..5, value_dim in 1usize..5,
            bshd in any::<bool>(), cuts in proptest::collection::vec(0usize..10, 0..4),
            seed in any::<u64>(),
        ) {
            let layout = if bshd { Layout::Bshd } else { Layout::Bhsd };
            let q_heads = kv_heads * group;
            let p = Problem::new(batch, q_heads, kv_heads, q_len, kv_len, head_dim, value_dim, layout);
            let (q, k, v) = (values(p.q_elems(), seed), values(p.k_elems(), seed ^ 1), values(p.v_elems(), seed ^ 2));
            let whole = forward(&p, &q, &k, &v);
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(kv_len)).collect();
            bounds.extend([0, kv_len]);
            bounds.sort_unstable();
            let pieces: Vec<_> = bounds
                .windows(2)
                .map(|w| {
                    let range = w[0]..w[1];
                    if range.is_empty() {
                        // A part with no key: what an empty split leaves.
                        return (vec![f64::NAN; p.o_elems()], vec![f64::NEG_INFINITY; p.lse_elems()]);
                    }
                    let part = Problem { kv_len: range.len(), ..p.clone() };
                    let k = take_keys(&k, layout, [batch, kv_heads, kv_len, head_dim], range.clone());
                    let v = take_keys(&v, layout, [batch, kv_heads, kv_len, value_dim], range);
                    let f = forward(&part, &q, &k, &v);
                    (f.output, f.lse)
                })
                .collect();
            let parts: Vec<Part<'_>> = pieces.iter().map(|(o, l)| Part { output: o, lse: l }).collect();
            let shape = OutputShape { batch, heads: q_heads, len: q_len, value_dim };
            let (o, lse) = merge(&shape, layout, &parts);
            for (a, b) in o.iter().zip(&whole.output).chain(lse.iter().zip(&whole.lse)) {
                prop_assert!((a - b).abs() < 1e-12, "{a} vs {b}");
            }
            // The f32 merge is the same operator, to f32 rounding.
            let narrow = |x: &[f64]| x.iter().map(|&a| a as f32).collect::<Vec<f32>>();
            let narrowed: Vec<_> = pieces.iter().map(|(o, l)| (narrow(o), narrow(l))).collect();
            let parts32: Vec<Part<'_, f32>> = narrowed.iter().map(|(o, l)| Part { output: o, lse: l }).collect();
            let (o32, _) = merge(&shape, layout, &parts32);
            for (a, b) in o32.iter().zip(&o) {
                prop_assert!((f64::from(*a) - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }
}

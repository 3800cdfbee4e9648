//! The conformance grid and a pairwise covering sample of it: every value of every axis meets
//! every value of every other axis in at least one case.

use rand::{Rng, SeedableRng};
use wflash::{Causal, Layout, Shape, Variant, Window};

use crate::{Case, Path};

pub const SEQ_LENS: [(usize, usize); 8] = [
    (1, 1),
    (1, 300),
    (113, 203),
    (128, 217),
    (256, 512),
    (512, 256),
    (1023, 1024),
    (1024, 1023),
];
pub const HEAD_DIMS: [usize; 9] = [8, 32, 40, 59, 64, 96, 111, 128, 256];
pub const CAUSAL: [Option<Causal>; 3] = [None, Some(Causal::BottomRight), Some(Causal::TopLeft)];
/// (q_heads, kv_heads): MHA, GQA, MQA.
pub const HEADS: [(usize, usize); 3] = [(2, 2), (4, 2), (3, 1)];
pub const LAYOUTS: [Layout; 2] = [Layout::Bhsd, Layout::Bshd];
/// value_dim relative to head_dim: equal, or a different (odd) size.
pub const VALUE_DIMS: [ValueDim; 2] = [ValueDim::SameAsHead, ValueDim::Different];
pub const BATCHES: [usize; 2] = [1, 2];
/// No window; a trailing local window (Mistral-style); a two-sided one narrower than most tiles.
pub const WINDOWS: [Option<Window>; 3] = [
    None,
    Some(Window {
        left: Some(100),
        right: Some(0),
    }),
    Some(Window {
        left: Some(7),
        right: Some(30),
    }),
];
/// Sigmoid with its default bias (-ln kv_len) and with a given one.
pub const VARIANTS: [Variant; 3] = [
    Variant::Softmax,
    Variant::Sigmoid { bias: None },
    Variant::Sigmoid { bias: Some(-2.5) },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueDim {
    SameAsHead,
    /// A value_dim unlike the head_dim (odd, to exercise packed 16-bit rows that straddle words).
    Different,
}

fn value_dim(head_dim: usize, v: ValueDim) -> usize {
    match v {
        ValueDim::SameAsHead => head_dim,
        ValueDim::Different => match head_dim {
            256 => 77,
            d if d < 64 => d * 2 + 3,
            d => d / 2 + 1,
        },
    }
}

/// Axis sizes, in the order of the index vector a row holds.
const AXES: [usize; 10] = [
    SEQ_LENS.len(),
    HEAD_DIMS.len(),
    CAUSAL.len(),
    HEADS.len(),
    Path::ALL.len(),
    LAYOUTS.len(),
    VALUE_DIMS.len(),
    BATCHES.len(),
    VARIANTS.len(),
    WINDOWS.len(),
];

/// A greedy pairwise covering array (AETG-style): repeatedly take, among random candidates,
/// the row that covers the most still-uncovered pairs. Deterministic for a given seed.
pub fn pairwise_rows(seed: u64) -> Vec<[usize; 10]> {
    let mut uncovered = std::collections::HashSet::new();
    for (a, &size_a) in AXES.iter().enumerate() {
        for (b, &size_b) in AXES.iter().enumerate().skip(a + 1) {
            for va in 0..size_a {
                for vb in 0..size_b {
                    uncovered.insert((a, va, b, vb));
                }
            }
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows = Vec::new();
    while !uncovered.is_empty() {
        // Seed each candidate with one uncovered pair so every round makes progress.
        let &(a0, va0, b0, vb0) = uncovered.iter().min().expect("non-empty");
        let mut best: Option<([usize; 10], usize)> = None;
        for _ in 0..48 {
            let mut row = [0; 10];
            for (axis, slot) in row.iter_mut().enumerate() {
                *slot = rng.random_range(0..AXES[axis]);
            }
            row[a0] = va0;
            row[b0] = vb0;
            let gain = covered_by(&row).filter(|p| uncovered.contains(p)).count();
            if best.is_none_or(|(_, g)| gain > g) {
                best = Some((row, gain));
            }
        }
        let (row, _) = best.expect("48 candidates");
        for pair in covered_by(&row) {
            uncovered.remove(&pair);
        }
        rows.push(row);
    }
    rows
}

fn covered_by(row: &[usize; 10]) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
    (0..AXES.len()).flat_map(move |a| (a + 1..AXES.len()).map(move |b| (a, row[a], b, row[b])))
}

/// The sampled grid as cases, with a fresh seed per case.
pub fn cases() -> Vec<Case> {
    pairwise_rows(0x5eed)
        .into_iter()
        .enumerate()
        .map(|(i, [s, d, c, h, p, l, v, b, var, w])| {
            let (q_len, kv_len) = SEQ_LENS[s];
            let head_dim = HEAD_DIMS[d];
            let (q_heads, kv_heads) = HEADS[h];
            Case {
                shape: Shape {
                    batch: BATCHES[b],
                    q_heads,
                    kv_heads,
                    q_len,
                    kv_len,
                    head_dim,
                    value_dim: value_dim(head_dim, VALUE_DIMS[v]),
                },
                layout: LAYOUTS[l],
                causal: CAUSAL[c],
                window: WINDOWS[w],
                scale: None,
                variant: VARIANTS[var],
                path: Path::ALL[p],
                input_std: 1.0,
                seed: 1000 + i as u64,
            }
        })
        .collect()
}

//! The conformance grid and a pairwise covering sample of it: every value of every axis meets
//! every value of every other axis in at least one case.

use rand::{Rng, SeedableRng};
use wflash::{Causal, Layout, Shape, Variant, Window};

use crate::{BiasForm, Case, Mods, Path};

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
    covering_rows(AXES, seed, |_, _, _, _| true)
}

/// A pairwise covering array over `axes` whose rows hold no pair that `allowed` refuses
/// (pairs it refuses are not covered, of course).
pub fn covering_rows<const N: usize>(
    axes: [usize; N],
    seed: u64,
    allowed: impl Fn(usize, usize, usize, usize) -> bool,
) -> Vec<[usize; N]> {
    let mut uncovered = std::collections::HashSet::new();
    for (a, &size_a) in axes.iter().enumerate() {
        for (b, &size_b) in axes.iter().enumerate().skip(a + 1) {
            for va in 0..size_a {
                for vb in 0..size_b {
                    if allowed(a, va, b, vb) {
                        uncovered.insert((a, va, b, vb));
                    }
                }
            }
        }
    }
    let valid = |row: &[usize; N]| covered_by(row).all(|(a, va, b, vb)| allowed(a, va, b, vb));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows = Vec::new();
    while !uncovered.is_empty() {
        // Seed each candidate with one uncovered pair so every round makes progress.
        let &(a0, va0, b0, vb0) = uncovered.iter().min().expect("non-empty");
        let mut best: Option<([usize; N], usize)> = None;
        let mut tries = 0;
        while tries < 48 || best.is_none() {
            tries += 1;
            let mut row = [0; N];
            for (axis, slot) in row.iter_mut().enumerate() {
                *slot = rng.random_range(0..axes[axis]);
            }
            row[a0] = va0;
            row[b0] = vb0;
            if !valid(&row) {
                continue;
            }
            let gain = covered_by(&row).filter(|p| uncovered.contains(p)).count();
            if best.is_none_or(|(_, g)| gain > g) {
                best = Some((row, gain));
            }
        }
        let (row, _) = best.expect("a valid candidate");
        for pair in covered_by(&row) {
            uncovered.remove(&pair);
        }
        rows.push(row);
    }
    rows
}

fn covered_by<const N: usize>(
    row: &[usize; N],
) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
    (0..N).flat_map(move |a| (a + 1..N).map(move |b| (a, row[a], b, row[b])))
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
                mods: Default::default(),
                seed: 1000 + i as u64,
            }
        })
        .collect()
}

/// Sequence pairs of the modifier grid: one query, q < kv, q > kv, square.
pub const MOD_SEQ_LENS: [(usize, usize); 5] =
    [(1, 1), (1, 300), (113, 203), (512, 256), (300, 300)];
/// Modifiers do not touch the head-dim code (the main grid covers head dims): one head dim
/// keeps the number of distinct kernels, whose cold compile on llvmpipe is 10-25 s each, small.
pub const MOD_HEAD_DIM: usize = 64;
/// Per batch and head (f32); broadcast over both (f16); per head only (f32).
pub const BIAS_FORMS: [BiasForm; 3] = [
    BiasForm {
        per_batch: true,
        per_head: true,
        f16: false,
    },
    BiasForm {
        per_batch: false,
        per_head: false,
        f16: true,
    },
    BiasForm {
        per_batch: false,
        per_head: true,
        f16: false,
    },
];
/// A cap of 2 bends most scores (they are about N(0, 1)).
pub const SOFTCAP: f32 = 2.0;

/// What selects a kernel among the modifier options: the score modifiers compiled in (softcap,
/// ALiBi, bias, key mask), causal or not, and softmax or sigmoid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    pub softcap: bool,
    pub alibi: bool,
    pub bias: bool,
    pub key_mask: bool,
    pub causal: bool,
    pub sigmoid: bool,
}

const fn config(mods: [bool; 4], causal: bool, sigmoid: bool) -> KernelConfig {
    KernelConfig {
        softcap: mods[0],
        alibi: mods[1],
        bias: mods[2],
        key_mask: mods[3],
        causal,
        sigmoid,
    }
}

/// Seven kernels in which every pair of values of those six on/off axes meets (a strength-2
/// covering array; `kernel_configs_cover_every_pair` checks it): none; each compiled modifier
/// alone; all four with softmax and with sigmoid.
pub const KERNEL_CONFIGS: [KernelConfig; 7] = [
    config([false, false, false, false], false, false),
    config([true, false, false, false], true, true),
    config([false, true, false, false], true, false),
    config([false, false, true, false], false, true),
    config([false, false, false, true], true, false),
    config([true, true, true, true], false, false),
    config([true, true, true, true], true, true),
];

impl KernelConfig {
    /// The six axes as on/off values.
    pub fn axes(&self) -> [bool; 6] {
        [
            self.softcap,
            self.alibi,
            self.bias,
            self.key_mask,
            self.causal,
            self.sigmoid,
        ]
    }
}

/// Axes of the modifier grid: kernel config, sequences, causal alignment (when causal), heads,
/// path, layout, batch, window, bias form (when biased), sinks, temperature, varlen.
const MOD_AXES: [usize; 12] = [
    KERNEL_CONFIGS.len(),
    MOD_SEQ_LENS.len(),
    2,
    HEADS.len(),
    Path::ALL.len(),
    LAYOUTS.len(),
    BATCHES.len(),
    WINDOWS.len(),
    BIAS_FORMS.len(),
    2,
    2,
    2,
];

/// Combinations that have no meaning and return `Error::Unsupported` or `InvalidModifier`
/// (tested in api.rs): sinks with sigmoid, a bias or key mask with varlen, varlen in batch 2.
fn mod_pair_allowed(a: usize, va: usize, b: usize, vb: usize) -> bool {
    let refused = |(x, vx): (usize, usize), (y, vy): (usize, usize)| {
        let kernel = KERNEL_CONFIGS[vx.min(KERNEL_CONFIGS.len() - 1)];
        match (x, y) {
            (0, 9) => kernel.sigmoid && vy == 1,                    // sinks
            (0, 11) => (kernel.bias || kernel.key_mask) && vy == 1, // varlen
            (6, 11) => vx == 1 && vy == 1,                          // batch 2, varlen
            _ => false,
        }
    };
    !refused((a, va), (b, vb)) && !refused((b, vb), (a, va))
}

/// The modifier grid as cases: each score modifier alone, then a pairwise covering sample of
/// the modifiers with each other and with every other option (over the seven kernel configs).
pub fn modifier_cases() -> Vec<Case> {
    let mut rows = Vec::new();
    // Alone: each compiled modifier (configs 1-4), then sinks, temperature and varlen on
    // the plain kernel; (113, 203), GQA, batch 2 (1 for varlen), no window.
    for config in 1..5 {
        rows.push([config, 2, 0, 1, config % 4, 0, 1, 0, 0, 0, 0, 0]);
    }
    rows.push([0, 2, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0]);
    rows.push([0, 2, 0, 1, 1, 0, 1, 0, 0, 0, 1, 0]);
    rows.push([0, 2, 0, 1, 2, 1, 0, 0, 0, 0, 0, 1]);
    rows.extend(covering_rows(MOD_AXES, 0x6d0d, mod_pair_allowed));
    rows.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let kernel = KERNEL_CONFIGS[r[0]];
            let (q_len, kv_len) = MOD_SEQ_LENS[r[1]];
            let (q_heads, kv_heads) = HEADS[r[3]];
            let varlen = r[11] == 1;
            Case {
                shape: Shape {
                    batch: if varlen { 1 } else { BATCHES[r[6]] },
                    q_heads,
                    kv_heads,
                    q_len,
                    kv_len,
                    head_dim: MOD_HEAD_DIM,
                    value_dim: MOD_HEAD_DIM,
                },
                layout: LAYOUTS[r[5]],
                causal: kernel
                    .causal
                    .then_some([Causal::BottomRight, Causal::TopLeft][r[2]]),
                window: WINDOWS[r[7]],
                scale: None,
                variant: if kernel.sigmoid {
                    Variant::Sigmoid { bias: None }
                } else {
                    Variant::Softmax
                },
                path: Path::ALL[r[4]],
                input_std: 1.0,
                mods: Mods {
                    softcap: kernel.softcap.then_some(SOFTCAP),
                    alibi: kernel.alibi,
                    bias: kernel.bias.then_some(BIAS_FORMS[r[8]]),
                    key_mask: kernel.key_mask,
                    sinks: r[9] == 1,
                    temperature: r[10] == 1,
                    varlen,
                },
                seed: 5000 + i as u64,
            }
        })
        .collect()
}

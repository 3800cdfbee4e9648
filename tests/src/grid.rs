//! The conformance grid and a pairwise covering sample of it: every value of every axis meets
//! every value of every other axis in at least one case.

use rand::{Rng, SeedableRng};
use wflash::{Causal, Layout, Shape, Variant, Window};

use wflash::{Modifier, ModifierSet};

use crate::{BiasForm, Case, Mods, Path};

/// The cases of a grid this run takes, from the environment:
/// - `WFLASH_SEEDS=5004,0x1f00` keeps only the cases with these seeds (decimal or 0x-hex), to
///   chase one failure;
/// - `WFLASH_GRID_SAMPLE=K` keeps every K-th case (the first, the (K+1)-th, ...) of what the
///   caller passes: CI's GL part runs a sample of each grid this way (xtask `gl_part`).
///
/// Returns the cases and whether a seed list was given.
pub fn selected<T>(cases: Vec<T>, seed: impl Fn(&T) -> u64) -> (Vec<T>, bool) {
    let parse = |s: &str| {
        let s = s.trim();
        s.strip_prefix("0x")
            .map_or_else(|| s.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
    };
    let seeds: Option<Vec<u64>> = std::env::var("WFLASH_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(parse).collect());
    let every = std::env::var("WFLASH_GRID_SAMPLE")
        .ok()
        .and_then(|k| k.trim().parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let cases = (cases.into_iter())
        .filter(|c| seeds.as_ref().is_none_or(|s| s.contains(&seed(c))))
        .enumerate()
        .filter(|(i, _)| i % every == 0)
        .map(|(_, c)| c)
        .collect();
    (cases, seeds.is_some())
}

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
pub const AXES: [usize; 10] = [
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
    extend_rows(Vec::new(), &axes, seed, allowed)
        .into_iter()
        .map(|row| row.try_into().expect("a row per axis"))
        .collect()
}

/// The sampled grid as cases, with a fresh seed per case.
pub fn cases() -> Vec<Case> {
    rows_to_cases(pairwise_rows(0x5eed), &SEQ_LENS, &HEAD_DIMS, 1000)
}

/// Sequence pairs of the backward grid: the main grid's but its longest (1023 × 1024 and
/// 1024 × 1023), where the f64 reference backward takes most of a case's time.
pub const BACKWARD_SEQ_LENS: [(usize, usize); 6] = [
    (1, 1),
    (1, 300),
    (113, 203),
    (128, 217),
    (256, 512),
    (512, 256),
];
/// Head dims of the backward grid, 1 to 256: each is a kernel of its own (a 10-25 s compile on
/// llvmpipe per pass), so fewer than the main grid's, odd and even, across the
/// rows-per-invocation classes.
pub const BACKWARD_HEAD_DIMS: [usize; 6] = [1, 32, 59, 64, 128, 256];

/// The backward grid: a pairwise covering sample of the main grid's axes with
/// [`BACKWARD_SEQ_LENS`] and [`BACKWARD_HEAD_DIMS`] (every other axis whole: causal modes,
/// MHA/GQA/MQA, storage paths, layouts, value dims, batch, variants, windows).
pub fn backward_cases() -> Vec<Case> {
    let mut axes = AXES;
    axes[0] = BACKWARD_SEQ_LENS.len();
    axes[1] = BACKWARD_HEAD_DIMS.len();
    let rows = covering_rows(axes, 0xbac4, |_, _, _, _| true);
    rows_to_cases(rows, &BACKWARD_SEQ_LENS, &BACKWARD_HEAD_DIMS, 7000)
}

/// The cases rows of [`AXES`] (sequence pairs and head dims from the given lists) stand for,
/// seeded from `first_seed` on.
fn rows_to_cases(
    rows: Vec<[usize; 10]>,
    seq_lens: &[(usize, usize)],
    head_dims: &[usize],
    first_seed: u64,
) -> Vec<Case> {
    rows.into_iter()
        .enumerate()
        .map(|(i, [s, d, c, h, p, l, v, b, var, w])| {
            let (q_len, kv_len) = seq_lens[s];
            let head_dim = head_dims[d];
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
                seed: first_seed + i as u64,
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

/// The modifiers compiled into kernels ([`Modifier::compiled`]), in [`Modifier::ALL`]'s order.
pub fn compiled_modifiers() -> Vec<Modifier> {
    Modifier::ALL
        .into_iter()
        .filter(|m| m.compiled().is_some())
        .collect()
}

/// The modifiers that are runtime data, in [`Modifier::ALL`]'s order: one on/off axis each.
pub fn runtime_modifiers() -> Vec<Modifier> {
    Modifier::ALL
        .into_iter()
        .filter(|m| m.compiled().is_none())
        .collect()
}

/// What selects a kernel among the modifier options: the compiled modifiers, causal or not,
/// and softmax or sigmoid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    pub mods: ModifierSet,
    pub causal: bool,
    pub sigmoid: bool,
}

impl KernelConfig {
    /// The on/off axes: each compiled modifier, then causal and sigmoid.
    pub fn axes(&self) -> Vec<bool> {
        let mut axes: Vec<bool> = compiled_modifiers()
            .into_iter()
            .map(|m| self.mods.contains(m))
            .collect();
        axes.extend([self.causal, self.sigmoid]);
        axes
    }
}

/// Kernels in which every pair of values of the on/off axes (each compiled modifier, causal,
/// sigmoid) meets (a strength-2 covering array; `kernel_configs_cover_every_pair` checks it):
/// none; each compiled modifier alone, with causal and sigmoid cycling through
/// (on, on), (on, off), (off, on), (on, off); all of them with softmax and with causal sigmoid.
/// Few kernels: each costs a 10-25 s compile on llvmpipe.
pub fn kernel_configs() -> Vec<KernelConfig> {
    let config = |mods, causal, sigmoid| KernelConfig {
        mods,
        causal,
        sigmoid,
    };
    const CYCLE: [(bool, bool); 4] = [(true, true), (true, false), (false, true), (true, false)];
    let all = ModifierSet::all_compiled();
    let mut configs = vec![config(ModifierSet::NONE, false, false)];
    for (i, m) in compiled_modifiers().into_iter().enumerate() {
        let (causal, sigmoid) = CYCLE[i % CYCLE.len()];
        configs.push(config(ModifierSet::NONE.with(m), causal, sigmoid));
    }
    configs.push(config(all, false, false));
    configs.push(config(all, true, true));
    configs
}

/// The modifier grid's axes before the runtime modifiers: kernel config, sequences, causal
/// alignment (when causal), heads, path, layout, batch, window, bias form (when biased).
const FIXED_MOD_AXES: usize = 9;
/// The axes the grid's covering rows were first drawn over (the fixed ones, then sinks,
/// temperature and varlen). Each axis after them joins with its first value (off) in the rows
/// that exist, and new rows cover its pairs: adding a modifier never changes an existing case,
/// so a refactor that adds one still compares outputs case by case (`WFLASH_OUTPUT_HASHES`).
const FIRST_MOD_AXES: usize = 12;

/// Value counts of the modifier grid's axes, in the order of its rows.
pub fn mod_axes() -> Vec<usize> {
    let mut axes = vec![
        kernel_configs().len(),
        MOD_SEQ_LENS.len(),
        2,
        HEADS.len(),
        Path::ALL.len(),
        LAYOUTS.len(),
        BATCHES.len(),
        WINDOWS.len(),
        BIAS_FORMS.len(),
    ];
    axes.extend(runtime_modifiers().iter().map(|_| 2));
    axes
}

/// The case a row of the modifier grid stands for (`seed` its seed).
fn mod_case(r: &[usize], seed: u64) -> Case {
    let kernel = kernel_configs()[r[0]];
    let (q_len, kv_len) = MOD_SEQ_LENS[r[1]];
    let (q_heads, kv_heads) = HEADS[r[3]];
    let mut on = kernel.mods;
    for (i, m) in runtime_modifiers().into_iter().enumerate() {
        if r[FIXED_MOD_AXES + i] == 1 {
            on = on.with(m);
        }
    }
    Case {
        shape: Shape {
            batch: BATCHES[r[6]],
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
            on,
            bias_form: BIAS_FORMS[r[8]],
        },
        seed,
    }
}

/// Whether the engine accepts the case's options: combinations without meaning
/// (`Error::Unsupported`, `InvalidModifier`; api.rs tests each) are left out of the grid. The
/// engine's own validation decides, so a new modifier brings its refusals with it.
pub fn accepted(case: &Case) -> bool {
    let data = case.data();
    case.options(&data).validate_modifiers(&case.shape).is_ok()
}

/// Whether the pair (axis `a` = `va`, axis `b` = `vb`) may meet in a case: a row with those
/// two values set, the rest at their first value but the kernel config, is accepted for some
/// kernel config (a prefix-LM mask needs a causal one).
pub fn mod_pair_allowed(a: usize, va: usize, b: usize, vb: usize) -> bool {
    let axes = mod_axes();
    // When the pair holds the kernel config, the config is the pair's.
    let configs = if a == 0 || b == 0 { 1 } else { axes[0] };
    (0..configs).any(|config| {
        let mut row = vec![0; axes.len()];
        row[0] = config;
        row[a] = va;
        row[b] = vb;
        accepted(&mod_case(&row, 0))
    })
}

/// The modifier grid as cases: each modifier alone, then a pairwise covering sample of the
/// modifiers with each other and with every other option, all derived from [`Modifier::ALL`].
pub fn modifier_cases() -> Vec<Case> {
    static CASES: std::sync::OnceLock<Vec<Case>> = std::sync::OnceLock::new();
    CASES.get_or_init(draw_modifier_cases).clone()
}

fn draw_modifier_cases() -> Vec<Case> {
    modifier_rows()
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut case = mod_case(&r, 5000 + i as u64);
            // A modifier alone that needs a causal mask (prefix-LM) gets one.
            if case.causal.is_none() && !accepted(&case) {
                case.causal = Some(Causal::BottomRight);
            }
            case
        })
        .collect()
}

/// The rows of [`modifier_cases`] (values per [`mod_axes`]).
pub fn modifier_rows() -> Vec<Vec<usize>> {
    let axes = mod_axes();
    let allowed: Vec<Vec<Vec<Vec<bool>>>> = (0..axes.len())
        .map(|a| {
            (0..axes[a])
                .map(|va| {
                    (0..axes.len())
                        .map(|b| {
                            (0..axes[b])
                                .map(|vb| mod_pair_allowed(a, va, b, vb))
                                .collect()
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let allowed = |a: usize, va: usize, b: usize, vb: usize| allowed[a][va][b][vb];
    // Alone: each compiled modifier (configs 1..), then each runtime modifier on the plain
    // kernel; (113, 203), GQA, batch 2 where allowed, no window, paths and layouts in turn.
    let mut alone: Vec<Vec<usize>> = Vec::new();
    for config in 1..=compiled_modifiers().len() {
        let mut row = vec![0; axes.len()];
        row[..FIXED_MOD_AXES].copy_from_slice(&[config, 2, 0, 1, config % 4, 0, 1, 0, 0]);
        alone.push(row);
    }
    for i in 0..runtime_modifiers().len() {
        let mut row = vec![0; axes.len()];
        row[..FIXED_MOD_AXES].copy_from_slice(&[0, 2, 0, 1, i % 4, (i + 1) % 2, 1, 0, 0]);
        row[FIXED_MOD_AXES + i] = 1;
        if !accepted(&mod_case(&row, 0)) {
            row[6] = 0; // batch 1
        }
        alone.push(row);
    }
    // The rows of the first axes (alone and covering), then those of each later axis, so
    // that a later axis shifts no earlier case's seed.
    let later_alone = alone.split_off(compiled_modifiers().len() + FIRST_MOD_AXES - FIXED_MOD_AXES);
    let mut rows = alone;
    let first = covering_rows::<FIRST_MOD_AXES>(
        axes[..FIRST_MOD_AXES].try_into().expect("the first axes"),
        0x6d0d,
        allowed,
    );
    rows.extend(first.into_iter().map(|r| {
        let mut row = r.to_vec();
        row.resize(axes.len(), 0);
        row
    }));
    rows.extend(later_alone);
    extend_rows(rows, &axes, 0x6d0e, allowed)
}

/// `rows` and, after them, rows that cover the pairs of `axes` values they leave uncovered
/// (greedily, AETG-style: among random candidates the row that covers the most uncovered
/// pairs; deterministic for a seed), none holding a pair `allowed` refuses.
pub fn extend_rows(
    mut rows: Vec<Vec<usize>>,
    axes: &[usize],
    seed: u64,
    allowed: impl Fn(usize, usize, usize, usize) -> bool,
) -> Vec<Vec<usize>> {
    let n = axes.len();
    let pairs = |row: &[usize]| -> Vec<(usize, usize, usize, usize)> {
        (0..n)
            .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
            .map(|(a, b)| (a, row[a], b, row[b]))
            .collect()
    };
    let mut uncovered = std::collections::HashSet::new();
    for a in 0..n {
        for b in a + 1..n {
            for va in 0..axes[a] {
                for vb in 0..axes[b] {
                    if allowed(a, va, b, vb) {
                        uncovered.insert((a, va, b, vb));
                    }
                }
            }
        }
    }
    for row in &rows {
        for pair in pairs(row) {
            uncovered.remove(&pair);
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    while !uncovered.is_empty() {
        // Seed each candidate with one uncovered pair so every round makes progress.
        let &(a0, va0, b0, vb0) = uncovered.iter().min().expect("non-empty");
        let mut best: Option<(Vec<usize>, usize)> = None;
        let mut tries = 0;
        while tries < 48 || best.is_none() {
            tries += 1;
            let mut row: Vec<usize> = axes.iter().map(|&size| rng.random_range(0..size)).collect();
            row[a0] = va0;
            row[b0] = vb0;
            let row_pairs = pairs(&row);
            if !row_pairs
                .iter()
                .all(|&(a, va, b, vb)| allowed(a, va, b, vb))
            {
                continue;
            }
            let gain = row_pairs.iter().filter(|p| uncovered.contains(p)).count();
            if best.as_ref().is_none_or(|(_, g)| gain > *g) {
                best = Some((row, gain));
            }
        }
        let (row, _) = best.expect("a valid candidate");
        for pair in pairs(&row) {
            uncovered.remove(&pair);
        }
        rows.push(row);
    }
    rows
}

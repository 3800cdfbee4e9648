//! Linear attention on the GPU against the f64 reference (tests/src/linear.rs): a pairwise
//! covering grid over every option, storage path, layout, head grouping, kernel and way of
//! feeding the sequence (one call, pieces, token by token).

use wflash::{FeatureMap, Layout, LinearKernel};
use wflash_conformance::grid::covering_rows;
use wflash_conformance::linear::{Feed, LinearCase, run_linear_case};
use wflash_conformance::{Path, engine};

const LAYOUTS: [Layout; 2] = [Layout::Bhsd, Layout::Bshd];
const HEADS: [(usize, usize); 3] = [(2, 2), (4, 2), (3, 1)];
const BATCHES: [usize; 2] = [1, 2];
/// Lengths around the chunk sizes below (16, 13, the default 64) and a single token.
const LENS: [usize; 5] = [1, 5, 64, 100, 257];
/// (key_dim, value_dim): equal, unequal both ways, odd, the largest.
const DIMS: [(usize, usize); 5] = [(64, 64), (32, 59), (59, 32), (128, 128), (8, 8)];
const CAUSAL: [bool; 2] = [true, false];
const FEATURE_MAPS: [FeatureMap; 3] = FeatureMap::ALL;
const FLAGS: [bool; 2] = [false, true];
const KERNELS: [(LinearKernel, Option<usize>); 5] = [
    (LinearKernel::Auto, None),
    (LinearKernel::Chunked, None),
    (LinearKernel::Chunked, Some(16)),
    (LinearKernel::Chunked, Some(13)),
    (LinearKernel::Recurrent, None),
];
const FEEDS: [Feed; 3] = [Feed::OneCall, Feed::Pieces(3), Feed::TokenByToken];

/// Axis order of a grid row.
const AXES: [usize; 13] = [
    Path::ALL.len(),
    LAYOUTS.len(),
    HEADS.len(),
    BATCHES.len(),
    LENS.len(),
    DIMS.len(),
    CAUSAL.len(),
    FEATURE_MAPS.len(),
    FLAGS.len(), // decay
    FLAGS.len(), // normalize
    KERNELS.len(),
    FLAGS.len(), // initial state
    FEEDS.len(),
];
const CAUSAL_AXIS: usize = 6;
const FEATURE_AXIS: usize = 7;
const DECAY_AXIS: usize = 8;
const NORMALIZE_AXIS: usize = 9;
const KERNEL_AXIS: usize = 10;
const INITIAL_AXIS: usize = 11;
const FEED_AXIS: usize = 12;

/// Pairs no case may hold: non-causal attention has no decay, no initial state, no
/// recurrent kernel and no pieces (every query sees every key); the normaliser is judged
/// only with positive feature maps (with the identity its denominator crosses zero).
fn allowed(a: usize, va: usize, b: usize, vb: usize) -> bool {
    let value = |axis: usize| {
        if a == axis {
            Some(va)
        } else if b == axis {
            Some(vb)
        } else {
            None
        }
    };
    if value(CAUSAL_AXIS) == Some(1) {
        let causal_only = value(DECAY_AXIS) == Some(1)
            || value(INITIAL_AXIS) == Some(1)
            || value(KERNEL_AXIS) == Some(4)
            || value(FEED_AXIS).is_some_and(|f| f != 0);
        if causal_only {
            return false;
        }
    }
    !(value(NORMALIZE_AXIS) == Some(1) && value(FEATURE_AXIS) == Some(0))
}

fn grid() -> Vec<LinearCase> {
    covering_rows(AXES, 0x11ea7, allowed)
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let (q_heads, kv_heads) = HEADS[r[2]];
            let (key_dim, value_dim) = DIMS[r[5]];
            let (kernel, chunk_size) = KERNELS[r[KERNEL_AXIS]];
            LinearCase {
                path: Path::ALL[r[0]],
                layout: LAYOUTS[r[1]],
                batch: BATCHES[r[3]],
                q_heads,
                kv_heads,
                len: LENS[r[4]],
                key_dim,
                value_dim,
                causal: CAUSAL[r[CAUSAL_AXIS]],
                feature_map: FEATURE_MAPS[r[FEATURE_AXIS]],
                decay: FLAGS[r[DECAY_AXIS]],
                normalize: FLAGS[r[NORMALIZE_AXIS]],
                kernel,
                chunk_size,
                initial: FLAGS[r[INITIAL_AXIS]],
                feed: FEEDS[r[FEED_AXIS]],
                seed: 0x11_0000 + i as u64,
            }
        })
        .collect()
}

/// `WFLASH_SEEDS=a,b` runs only the cases with these seeds (decimal or 0x-hex).
fn selected(cases: Vec<LinearCase>) -> Vec<LinearCase> {
    let Ok(seeds) = std::env::var("WFLASH_SEEDS") else {
        return cases;
    };
    let parse = |s: &str| {
        let s = s.trim();
        s.strip_prefix("0x")
            .map_or_else(|| s.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
    };
    let seeds: Vec<u64> = seeds.split(',').filter_map(parse).collect();
    cases
        .into_iter()
        .filter(|c| seeds.contains(&c.seed))
        .collect()
}

#[test]
fn linear_conformance_grid() {
    let cases = selected(grid());
    let mut failures = Vec::new();
    let mut worst = std::collections::BTreeMap::<&str, f64>::new();
    for case in &cases {
        let Some(engine) = engine(case.path) else {
            return;
        };
        match run_linear_case(engine, case) {
            Ok(outcome) => {
                let path = match case.path {
                    Path::F32 => "f32",
                    Path::F16Native => "f16 native",
                    Path::F16Packed => "f16 packed",
                    Path::Bf16 => "bf16",
                };
                let w = worst.entry(path).or_default();
                *w = w.max(outcome.ratio);
            }
            Err(err) => failures.push(format!("seed {:#x}: {err}", case.seed)),
        }
    }
    eprintln!(
        "linear grid: {} cases; worst error ratio per path: {worst:?}",
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn linear_grid_covers_every_option_pairwise_and_respects_exclusions() {
    let cases = grid();
    let rows = covering_rows(AXES, 0x11ea7, allowed);
    assert_eq!(rows.len(), cases.len());
    for (a, &size_a) in AXES.iter().enumerate() {
        for (b, &size_b) in AXES.iter().enumerate().skip(a + 1) {
            for va in 0..size_a {
                for vb in 0..size_b {
                    let covered = rows.iter().any(|r| r[a] == va && r[b] == vb);
                    assert_eq!(covered, allowed(a, va, b, vb), "pair ({a}={va}, {b}={vb})");
                }
            }
        }
    }
    for c in &cases {
        assert!(c.causal || (!c.decay && !c.initial && c.feed == Feed::OneCall));
    }
}

//! The conformance grid on the GPU: a pairwise covering sample of every axis of DESIGN.md's
//! grid (sequence lengths, head dims, causal modes, MHA/GQA/MQA, storage paths, layouts,
//! value dims, batch), each case judged against the f64 reference.

use std::io::Write;

use wflash::Family;
use wflash_conformance::{Path, grid, run_case_with};

/// Runs the grid's cases for `path` on the kernel `family` (`None`: the adapter's default) and
/// writes a one-line summary to target/conformance/<name>.txt.
fn run_path(path: Path, family: Option<Family>) {
    run_cases(path, family, |_| true);
}

fn run_cases(path: Path, family: Option<Family>, keep: impl Fn(&wflash_conformance::Case) -> bool) {
    let cases: Vec<_> = grid::cases()
        .into_iter()
        .filter(|c| c.path == path && keep(c))
        .collect();
    let name = match family {
        None => format!("{path:?}"),
        Some(f) => format!("{path:?}-{}", f.name()),
    };
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    let mut ran = 0;
    for case in &cases {
        let start = std::time::Instant::now();
        let result = run_case_with(case, family);
        // Visible with --nocapture: where the grid's time goes.
        eprintln!("{:?} {:.1} s", case, start.elapsed().as_secs_f64());
        match result {
            Ok(Some(outcome)) => {
                ran += 1;
                worst = worst.max(outcome.ratio);
            }
            Ok(None) => return, // WFLASH_ALLOW_NO_GPU=1 on a machine without an adapter
            Err(msg) => failures.push(msg),
        }
    }
    let summary = format!("{name}: {ran} cases, worst error ratio {worst:.3} (pass <= 1)\n");
    eprint!("{summary}");
    // Kept for the record (xtask test prints it): the closing notes quote these figures.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/conformance");
    if std::fs::create_dir_all(&dir).is_ok()
        && let Ok(mut f) = std::fs::File::create(dir.join(format!("{name}.txt")))
    {
        let _ = f.write_all(summary.as_bytes());
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn grid_covers_every_pair_of_axis_values() {
    let rows = grid::pairwise_rows(0x5eed);
    // 9 head dims × 8 sequence pairs is the largest product: no sample can be smaller.
    assert!(rows.len() >= 72, "{}", rows.len());
    let axes = rows[0].len();
    for a in 0..axes {
        for b in a + 1..axes {
            let seen: std::collections::HashSet<_> = rows.iter().map(|r| (r[a], r[b])).collect();
            let max_a = rows.iter().map(|r| r[a]).max().unwrap_or(0) + 1;
            let max_b = rows.iter().map(|r| r[b]).max().unwrap_or(0) + 1;
            assert_eq!(seen.len(), max_a * max_b, "axes {a} and {b}");
        }
    }
}

#[test]
fn conformance_f32() {
    run_path(Path::F32, None);
}

#[test]
fn conformance_f16_native() {
    run_path(Path::F16Native, None);
}

#[test]
fn conformance_f16_packed() {
    run_path(Path::F16Packed, None);
}

#[test]
fn conformance_bf16() {
    run_path(Path::Bf16, None);
}

/// The other kernel family than the adapter's default (on lavapipe: the tiled GPU kernel) runs
/// the grid too, so both implementations are proven on every CI run. On a CPU adapter the
/// tiled kernel runs at ~0.5 GFLOP/s, so there it skips the ~1024×1024 sequence pairs (about
/// 20 s each); every other axis value, and sequence pairs up to 512×256, still meet.
#[test]
fn conformance_other_family_every_path() {
    let Some(engine) = wflash_conformance::engine(Path::F32) else {
        return;
    };
    let (other, max_pairs) = match engine.family() {
        Family::Tiled => (Family::Unrolled, usize::MAX),
        Family::Unrolled => (Family::Tiled, 512 * 256),
    };
    for path in Path::ALL {
        run_cases(path, Some(other), |c| {
            c.shape.q_len * c.shape.kv_len <= max_pairs
        });
    }
}

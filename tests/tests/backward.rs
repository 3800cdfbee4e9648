//! The backward pass on the GPU: every gradient of softmax and sigmoid attention (dQ, dK, dV,
//! and the bias's, the sinks' and the temperature's) judged against the f64 reference's by
//! FlashAttention's backward standard, over the conformance grid (every axis: sequence
//! lengths, head dims 8-256, causal modes, MHA/GQA/MQA, storage paths, layouts, value dims,
//! batch, variants, windows) and the modifier grid (each modifier alone, with causal masks,
//! and with each other).

use std::io::Write;

use wflash_conformance::backward::run_backward_case;
use wflash_conformance::{Case, Path, engine, grid};

/// Runs `cases` of `path` and writes a one-line summary to target/conformance/<name>.txt.
fn run(name: &str, cases: Vec<Case>, path: Path) {
    // WFLASH_SEEDS=5004,5005 runs only those cases (to chase one failure).
    let seeds: Option<Vec<u64>> = std::env::var("WFLASH_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    let cases: Vec<Case> = (cases.into_iter())
        .filter(|c| c.path == path)
        .filter(|c| seeds.as_ref().is_none_or(|s| s.contains(&c.seed)))
        .collect();
    let Some(engine) = engine(path) else {
        return;
    };
    let name = format!("backward-{name}{path:?}");
    let (mut failures, mut worst, mut ran) = (Vec::new(), 0.0f64, 0);
    for case in &cases {
        let start = std::time::Instant::now();
        let result = run_backward_case(engine, case);
        eprintln!("{case:?} {:.1} s", start.elapsed().as_secs_f64());
        match result {
            Ok(verdict) => {
                // Each gradient's error over its bound (visible with --nocapture).
                let ratios: Vec<String> = (verdict.outputs.iter())
                    .map(|o| format!("{} {:.3}", o.name, o.err / o.bound))
                    .collect();
                eprintln!("  {}", ratios.join(", "));
                ran += 1;
                worst = worst.max(verdict.ratio);
            }
            Err(msg) => failures.push(msg),
        }
    }
    let summary = format!("{name}: {ran} cases, worst error ratio {worst:.3} (pass <= 1)\n");
    eprint!("{summary}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/conformance");
    if std::fs::create_dir_all(&dir).is_ok()
        && let Ok(mut f) = std::fs::File::create(dir.join(format!("{name}.txt")))
    {
        let _ = f.write_all(summary.as_bytes());
    }
    assert!(
        seeds.is_some() || !cases.is_empty(),
        "no cases for {name}"
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn backward_f32() {
    run("", grid::cases(), Path::F32);
}

#[test]
fn backward_f16_native() {
    run("", grid::cases(), Path::F16Native);
}

#[test]
fn backward_f16_packed() {
    run("", grid::cases(), Path::F16Packed);
}

#[test]
fn backward_bf16() {
    run("", grid::cases(), Path::Bf16);
}

/// Every modifier alone, with causal masks and with each other (the modifier grid).
#[test]
fn backward_modifiers_every_path() {
    for path in Path::ALL {
        run("modifiers-", grid::modifier_cases(), path);
    }
}

//! The backward pass on the GPU: every gradient of softmax and sigmoid attention judged
//! against the f64 reference's, over the conformance grid and the modifier grid.

use wflash_conformance::backward::run_backward_case;
use wflash_conformance::{Case, Path, engine};

fn run(cases: Vec<Case>) {
    let seeds: Option<Vec<u64>> = std::env::var("WFLASH_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    for case in cases
        .iter()
        .filter(|c| seeds.as_ref().is_none_or(|s| s.contains(&c.seed)))
    {
        let Some(engine) = engine(case.path) else {
            return;
        };
        let start = std::time::Instant::now();
        let result = run_backward_case(engine, case);
        eprintln!("{:?} {:.1} s", case, start.elapsed().as_secs_f64());
        match result {
            Ok(verdict) => {
                eprintln!(
                    "  {:?}",
                    verdict
                        .outputs
                        .iter()
                        .map(|o| (o.name, o.err / o.bound))
                        .collect::<Vec<_>>()
                );
                worst = worst.max(verdict.ratio)
            }
            Err(msg) => failures.push(msg),
        }
    }
    eprintln!("worst error ratio {worst:.3} (pass <= 1)");
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn backward_smoke() {
    let mut cases = Vec::new();
    for (i, variant) in [
        wflash::Variant::Softmax,
        wflash::Variant::Sigmoid { bias: None },
    ]
    .into_iter()
    .enumerate()
    {
        let shape = wflash::Shape {
            batch: 1,
            q_heads: 4,
            kv_heads: 2,
            q_len: 37,
            kv_len: 53,
            head_dim: 16,
            value_dim: 16,
        };
        let mut c = Case::softmax(shape, Path::F32, 900 + i as u64);
        c.variant = variant;
        cases.push(c);
    }
    run(cases);
}

//! The soak, scaled down for CI, in a test binary of its own: resident memory is a whole
//! process's, so no other test may compile pipelines or allocate beside it (next to the
//! reliability tests, a cold compile of their pipelines once read as 128 MiB of growth).

use wflash_conformance::{Path, engine};

/// The soak, scaled down for CI (`cargo xtask soak` runs 10,000 calls): resident memory after
/// the warm-up and at the end stay within 64 MiB of each other, and the engine's memory ledger
/// ends where the calls left nothing but the scratch pool.
#[test]
fn a_scaled_down_soak_keeps_memory_bounded() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let report = wflash_conformance::soak::soak(engine, 400, 100, 100, |done, rss| {
        eprintln!("soak: {done} calls, resident {rss:?} bytes");
    })
    .expect("every soak call succeeds");
    // Every tensor the calls made has been dropped: the engine holds its scratch pool only.
    assert_eq!(engine.memory_in_use(), engine.cached_bytes());
    let (Some(warm), Some(end)) = (report.resident_after_warmup, report.resident_at_end) else {
        return; // no /proc: nothing to compare (not Linux)
    };
    assert!(
        end < warm + 64 * 1024 * 1024,
        "resident memory grew from {warm} to {end} bytes over {} calls",
        report.calls
    );
}

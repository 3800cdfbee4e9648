//! `cargo xtask soak`: many calls of varied shapes on one engine; prints the process's resident
//! memory at the start, every 1000 calls and at the end, and fails when it keeps growing.

use std::process::ExitCode;

use clap::Parser;
use wflash::{Engine, EngineOptions};
use wflash_conformance::soak::{resident_bytes, soak};

#[derive(Parser, Debug)]
#[command(
    name = "wflash-soak",
    about = "Soak test: many varied calls, memory at start and end"
)]
struct Args {
    /// Number of calls.
    #[arg(long, default_value_t = 10_000)]
    calls: usize,
    /// Calls before the reference memory sample (pipelines and driver caches warm up).
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Largest accepted growth of resident memory after the warm-up, in MiB.
    #[arg(long, default_value_t = 64)]
    max_growth_mib: u64,
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "unknown".into(),
        |b| format!("{:.1} MiB", b as f64 / 1048576.0),
    )
}

fn main() -> ExitCode {
    let args = Args::parse();
    let engine = match Engine::new_blocking(EngineOptions::default()) {
        Ok(engine) => engine,
        Err(err) => {
            eprintln!("wflash-soak: no usable GPU adapter: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!("adapter: {}", engine.info());
    println!("resident memory at start: {}", mib(resident_bytes()));
    let start = std::time::Instant::now();
    let report = soak(&engine, args.calls, args.warmup, 1000, |done, rss| {
        let (pool, cache) = (engine.pool_stats(), engine.tensor_cache_stats());
        println!(
            "{done:>7} calls, {:.1} s, resident {}, engine holds {}, scratch pool {}, tensor cache {}",
            start.elapsed().as_secs_f64(),
            mib(rss),
            mib(Some(engine.memory_in_use())),
            kept(&pool),
            kept(&cache),
        );
    });
    let report = match report {
        Ok(report) => report,
        Err(err) => {
            eprintln!("wflash-soak: a call failed: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{} calls in {:.1} s; resident after {} warm-up calls {}, at the end {}",
        report.calls,
        start.elapsed().as_secs_f64(),
        args.warmup,
        mib(report.resident_after_warmup),
        mib(report.resident_at_end)
    );
    let (held, cached) = (engine.memory_in_use(), engine.cached_bytes());
    println!(
        "engine holds {} at the end; its scratch pool and tensor cache {}",
        mib(Some(held)),
        mib(Some(cached))
    );
    if held != cached {
        eprintln!(
            "wflash-soak: the engine still holds {held} B beyond the {cached} B it keeps for reuse"
        );
        return ExitCode::FAILURE;
    }
    if let (Some(a), Some(b)) = (report.resident_after_warmup, report.resident_at_end)
        && b > a + args.max_growth_mib * 1048576
    {
        eprintln!(
            "wflash-soak: resident memory grew by more than {} MiB",
            args.max_growth_mib
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// "kept of cap MiB (reused, new)" for one class of the engine's pool.
fn kept(stats: &wflash::PoolStats) -> String {
    format!(
        "{:.1} of {:.0} MiB ({} reused, {} new)",
        stats.bytes as f64 / 1048576.0,
        stats.cap as f64 / 1048576.0,
        stats.hits,
        stats.misses
    )
}

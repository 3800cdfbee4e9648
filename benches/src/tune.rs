//! `cargo xtask bench --tune`: times every tile the engine's forward kernel can run at a few
//! head dims and stores the fastest per (adapter, driver, dims) in the tuning file that engines
//! load (wflash::tuning).

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::StdRng;
use wflash::tuning::{TunedTile, TuningFile};
use wflash::{AttentionOptions, Engine, Layout, Shape, TileConfig};

use crate::timing::{GpuTimer, Sample, Timing, time_submission};

/// The dims tuned, and the problem each candidate is timed on (B=1, H=8, f32, non-causal
/// softmax): long enough that the kernel, not the dispatch, dominates.
const TUNED_DIMS: [usize; 3] = [32, 64, 128];
const TUNE_SEQ: usize = 1024;
const TUNE_HEADS: usize = 8;

/// One candidate's timed runs.
struct Candidate {
    tile: TileConfig,
    samples: Vec<Sample>,
}

impl Candidate {
    /// Median of the timer's source (GPU timestamps where every run has one), as the bench.
    fn median(&self) -> f64 {
        Timing::of(&self.samples).stats.median
    }
}

/// Times the candidates (with `timer`'s GPU timestamps where there is one, else wall clock),
/// prints a table per dims, writes the winners to `path` (or the default tuning path).
/// Returns an error message on failure.
pub fn tune(
    engine: &Engine,
    timer: Option<&GpuTimer>,
    path: Option<&Path>,
    samples: usize,
) -> Result<PathBuf, String> {
    let path = path
        .map(Path::to_path_buf)
        .or_else(wflash::tuning::default_tuning_path)
        .ok_or("no tuning file path: pass --tune-file, or set WFLASH_TUNING or HOME")?;
    let mut file = TuningFile::load(&path).map_err(|e| e.to_string())?;
    let family = engine.family();
    let info = engine.info();
    let source = match timer {
        Some(_) => "GPU timestamps around each call",
        None => "wall clock around submit + wait",
    };
    println!(
        "tuning the {} kernel on {} ({}); B=1 H={TUNE_HEADS} N={TUNE_SEQ} f32 softmax, \
         samples interleaved, medians of {source}",
        family.name(),
        info.adapter_name,
        info.driver_info
    );
    let mut rng = StdRng::seed_from_u64(0x7475_6e65);
    for dim in TUNED_DIMS {
        let shape = Shape::mha(1, TUNE_HEADS, TUNE_SEQ, dim);
        let upload = |len: usize, rng: &mut StdRng| {
            engine
                .upload(&crate::random_normals(rng, len))
                .map_err(|e| e.to_string())
        };
        let q = upload(shape.q_elems(), &mut rng)?;
        let k = upload(shape.k_elems(), &mut rng)?;
        let v = upload(shape.v_elems(), &mut rng)?;
        let opts = AttentionOptions::softmax();
        let (d, dv) = (dim as u32, dim as u32);
        let run = |tile: TileConfig| -> Result<Sample, String> {
            engine
                .set_tile(family, d, dv, Some(tile))
                .map_err(|e| e.to_string())?;
            let (_, sample) = time_submission(engine, timer, || {
                engine
                    .attention_gpu(&shape, Layout::Bhsd, &opts, &q, &k, &v)
                    .map_err(|e| e.to_string())
            })?;
            Ok(sample)
        };
        let mut timed: Vec<Candidate> = engine
            .tile_candidates(family, d, dv)
            .into_iter()
            .map(|tile| Candidate {
                tile,
                samples: Vec::new(),
            })
            .collect();
        // The first run of each candidate compiles its pipeline: a warm-up, not timed.
        for round in 0..=samples.max(1) {
            for candidate in &mut timed {
                let sample = run(candidate.tile)?;
                if round > 0 {
                    candidate.samples.push(sample);
                }
            }
        }
        let flops = 4.0 * (TUNE_HEADS * TUNE_SEQ * TUNE_SEQ * dim) as f64;
        let best = timed
            .iter()
            .min_by(|a, b| a.median().total_cmp(&b.median()))
            .ok_or("no candidate tile")?;
        println!("  D={dim}:");
        for (i, candidate) in timed.iter().enumerate() {
            let median = candidate.median();
            println!(
                "    block_m {:>3} block_n {:>2}  {:>9.2} ms  {:>7.2} GFLOP/s{}{}",
                candidate.tile.block_m,
                candidate.tile.block_n,
                median * 1e3,
                flops / median / 1e9,
                if i == 0 { "  (default)" } else { "" },
                if std::ptr::eq(candidate, best) {
                    "  <- fastest"
                } else {
                    ""
                },
            );
        }
        engine
            .set_tile(family, d, dv, Some(best.tile))
            .map_err(|e| e.to_string())?;
        file.set(
            &info.adapter_name,
            &info.driver,
            &info.driver_info,
            TunedTile {
                family,
                head_dim: d,
                value_dim: dv,
                block_m: best.tile.block_m,
                block_n: best.tile.block_n,
            },
        );
    }
    file.save(&path).map_err(|e| e.to_string())?;
    Ok(path)
}

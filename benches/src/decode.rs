//! Decode cases (#16): one new query token per sequence against a long KV cache. Decoding is
//! memory-bound, so a case reports the bytes of K and V it reads per second beside the run's
//! copy-bandwidth probe and shader read probe, and its split count.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wflash::{
    DType, DecodeOptions, Element, Engine, KvBlocks, KvCache, KvCacheShape, Layout, Tensor,
};

use crate::naive::ReadProbe;
use crate::timing::{GpuTimer, Sample, Timing, time_submission};

/// One decode measurement's problem.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeCase {
    pub dtype: DType,
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Cached tokens of every sequence.
    pub cache_len: usize,
    /// A paged cache of blocks of this many tokens, else a contiguous one.
    pub block_size: Option<usize>,
    /// One split, else the planner's count.
    pub one_split: bool,
}

/// Tokens appended per call while a case fills its cache.
const FILL_CHUNK: usize = 4096;

impl DecodeCase {
    pub fn name(&self) -> String {
        format!(
            "decode_{}_b{}_hq{}_hkv{}_d{}_n{}{}{}",
            self.dtype.name(),
            self.batch,
            self.q_heads,
            self.kv_heads,
            self.head_dim,
            self.cache_len,
            self.block_size
                .map_or(String::new(), |b| format!("_paged{b}")),
            if self.one_split { "_split1" } else { "" },
        )
    }

    /// Bytes of K and V one call reads.
    pub fn kv_bytes(&self) -> f64 {
        (2 * self.batch * self.kv_heads * self.cache_len * self.head_dim * self.dtype.size_bytes())
            as f64
    }

    /// q·k and p·v multiply-adds.
    pub fn flops(&self) -> f64 {
        (4 * self.batch * self.q_heads * self.cache_len * self.head_dim) as f64
    }

    pub fn options(&self) -> DecodeOptions<'static> {
        DecodeOptions {
            splits: self.one_split.then_some(1),
            ..DecodeOptions::new(self.q_heads)
        }
    }
}

/// #16's reference case: B = 1, Hq = 32, Hkv = 8, D = 128, 32k cached tokens, f16, a
/// contiguous cache, the planner's splits.
pub fn base_case() -> DecodeCase {
    DecodeCase {
        dtype: DType::F16,
        batch: 1,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
        cache_len: 32768,
        block_size: None,
        one_split: false,
    }
}

/// The decode cases: #16's (B = 1 and 8; Hq = 32, Hkv = 8, D = 128; 4k, 32k and 128k cached
/// tokens; f16 and f32), and at B = 1, 32k, f16 one split, a paged cache and Hq = 8 beside
/// them, and one kv head with and without split-KV. Caches larger than the adapter binds are
/// refused by the engine, and reported so.
pub fn cases(quick: bool) -> Vec<DecodeCase> {
    let base = base_case();
    let variations = |base: DecodeCase| {
        [
            DecodeCase {
                one_split: true,
                ..base
            },
            DecodeCase {
                block_size: Some(16),
                ..base
            },
            DecodeCase { q_heads: 8, ..base },
        ]
    };
    if quick {
        let small = DecodeCase {
            cache_len: 4096,
            ..base
        };
        return [small].into_iter().chain(variations(small)).collect();
    }
    let mut cases = Vec::new();
    for dtype in [DType::F16, DType::F32] {
        for batch in [1, 8] {
            for cache_len in [4096, 32768, 131072] {
                cases.push(DecodeCase {
                    dtype,
                    batch,
                    cache_len,
                    ..base
                });
            }
        }
    }
    cases.extend(variations(base));
    // One kv head (MQA, 8 query heads): one workgroup without split-KV, so the planner splits.
    let mqa = DecodeCase {
        q_heads: 8,
        kv_heads: 1,
        ..base
    };
    cases.push(mqa);
    cases.push(DecodeCase {
        one_split: true,
        ..mqa
    });
    cases.push(DecodeCase {
        one_split: true,
        cache_len: 4096,
        ..base
    });
    cases.push(DecodeCase {
        one_split: true,
        batch: 8,
        cache_len: 4096,
        ..base
    });
    cases
}

/// A case ready to time: its cache filled with random K/V, its query uploaded, its pipelines
/// compiled.
pub struct PreparedDecode {
    pub case: DecodeCase,
    cache: KvCache,
    q: Tensor,
    /// The split count the planner chose.
    pub splits: u32,
}

impl PreparedDecode {
    /// A cache larger than the adapter binds is the engine's typed refusal
    /// (`Error::TooLarge` of `max_storage_buffer_binding_size`).
    pub fn new(engine: &Engine, case: &DecodeCase) -> wflash::Result<PreparedDecode> {
        match case.dtype {
            DType::F32 => Self::fill::<f32>(engine, case),
            DType::F16 => Self::fill::<half::f16>(engine, case),
            DType::Bf16 => Self::fill::<half::bf16>(engine, case),
        }
    }

    fn fill<T: Element>(engine: &Engine, case: &DecodeCase) -> wflash::Result<PreparedDecode> {
        let shape = KvCacheShape {
            batch: case.batch,
            kv_heads: case.kv_heads,
            capacity: case.cache_len,
            head_dim: case.head_dim,
            value_dim: case.head_dim,
        };
        let mut cache = match case.block_size {
            None => engine.kv_cache(shape, case.dtype)?,
            Some(block_size) => {
                let per_sequence = case.cache_len.div_ceil(block_size);
                let blocks = KvBlocks {
                    block_size,
                    num_blocks: case.batch * per_sequence,
                };
                let mut cache = engine.paged_kv_cache(shape, blocks, case.dtype)?;
                // Each sequence's blocks in the pool in reverse order, as a real allocator's
                // would not be in order either.
                let tables: Vec<Vec<u32>> = (0..case.batch)
                    .map(|b| {
                        (0..per_sequence)
                            .rev()
                            .map(|i| (b * per_sequence + i) as u32)
                            .collect()
                    })
                    .collect();
                cache.set_block_tables(&tables)?;
                cache
            }
        };
        let mut rng = StdRng::seed_from_u64(0xdec0de);
        let mut random = |len: usize| -> Vec<T> {
            (0..len)
                .map(|_| T::from_f32(rng.random_range(-1.0..1.0)))
                .collect()
        };
        let mut filled = 0;
        while filled < case.cache_len {
            let tokens = FILL_CHUNK.min(case.cache_len - filled);
            let elems = case.batch * case.kv_heads * tokens * case.head_dim;
            let k = engine.upload(&random(elems))?;
            let v = engine.upload(&random(elems))?;
            engine.append_kv(&mut cache, Layout::Bhsd, &k, &v, tokens)?;
            filled += tokens;
        }
        let q = engine.upload(&random(case.batch * case.q_heads * case.head_dim))?;
        let opts = case.options();
        let plan = engine.plan_decode(&cache, &opts, Layout::Bhsd, &q)?;
        let splits = plan
            .passes
            .first()
            .map_or(0, |(_, params, _)| params.splits);
        // Compiles the pipelines, so that compile time stays out of the samples.
        engine.decode_attention_gpu(&cache, &opts, Layout::Bhsd, &q)?;
        crate::wait(engine.device()).map_err(wflash::Error::Internal)?;
        Ok(PreparedDecode {
            case: *case,
            cache,
            q,
            splits,
        })
    }

    fn sample(&self, engine: &Engine, timer: Option<&GpuTimer>) -> Result<Sample, String> {
        let opts = self.case.options();
        let (_, sample) = time_submission(engine, timer, || {
            engine
                .decode_attention_gpu(&self.cache, &opts, Layout::Bhsd, &self.q)
                .map_err(|e| e.to_string())
        })?;
        Ok(sample)
    }
}

/// A run's samples, or why it failed.
type Samples = Result<Vec<Sample>, String>;

/// Times the prepared cases with their samples interleaved (a case's sample k runs beside the
/// others' sample k, and beside the read probe's), after `warmups` runs of each. Returns the
/// cases' timings and the read probe's samples.
pub fn time_group(
    engine: &Engine,
    timer: Option<&GpuTimer>,
    prepared: &[PreparedDecode],
    read_probe: Option<&ReadProbe>,
    warmups: usize,
    samples: usize,
) -> (Vec<Result<Timing, String>>, Samples) {
    let mut runs: Vec<Samples> = prepared.iter().map(|_| Ok(vec![])).collect();
    let mut probe_runs: Samples = match read_probe {
        Some(_) => Ok(Vec::new()),
        None => Err("no read probe".into()),
    };
    for round in 0..warmups + samples {
        for (p, run) in prepared.iter().zip(&mut runs) {
            if let Ok(list) = run {
                match p.sample(engine, timer) {
                    Ok(sample) if round >= warmups => list.push(sample),
                    Ok(_) => {}
                    Err(err) => *run = Err(err),
                }
            }
        }
        if let (Some(probe), Ok(list)) = (read_probe, &mut probe_runs)
            && round >= warmups
        {
            match probe.sample(engine, timer) {
                Ok(sample) => list.push(sample),
                Err(err) => probe_runs = Err(err),
            }
        }
    }
    let timings = runs
        .into_iter()
        .map(|run| run.map(|samples| Timing::of(&samples)))
        .collect();
    (timings, probe_runs)
}

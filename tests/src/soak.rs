//! The soak workload: many calls of varied shapes on one engine, with the process's resident
//! memory sampled as it goes. `cargo xtask soak` runs 10,000 calls; the test suite a few hundred.

use wflash::{AttentionOptions, Causal, DType, Engine, Layout, Shape};

/// The process's resident memory in bytes (Linux: VmRSS of /proc/self/status), if known.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Call `i` of the soak: lengths 1..=300, batch 1-2, MHA/GQA/MQA, both layouts, f32/f16/bf16,
/// softmax / causal softmax / sigmoid, and every fourth call causal linear attention; head dim
/// 32 (few kernels, so the soak measures calls, not compiles).
pub fn soak_call(engine: &Engine, i: usize) -> wflash::Result<()> {
    let shape = Shape {
        batch: 1 + i % 2,
        q_heads: 4,
        kv_heads: [4, 2, 1][i % 3],
        q_len: 1 + (i * 37) % 200,
        kv_len: 1 + (i * 53) % 300,
        head_dim: 32,
        value_dim: 32,
    };
    let opts = match i % 3 {
        0 => AttentionOptions::softmax(),
        1 => AttentionOptions::softmax().with_causal(Causal::BottomRight),
        _ => AttentionOptions::sigmoid(),
    };
    let layout = [Layout::Bhsd, Layout::Bshd][i % 2];
    let values = |n: usize| {
        (0..n)
            .map(|x| (((x + i) * 31 % 97) as f32 - 48.0) / 48.0)
            .collect::<Vec<f32>>()
    };
    let (q, k, v) = (
        values(shape.q_elems()),
        values(shape.k_elems()),
        values(shape.v_elems()),
    );
    let half = |x: &[f32]| {
        x.iter()
            .map(|&a| half::f16::from_f32(a))
            .collect::<Vec<_>>()
    };
    let brain = |x: &[f32]| {
        x.iter()
            .map(|&a| half::bf16::from_f32(a))
            .collect::<Vec<_>>()
    };
    // Every fourth call is causal linear attention with decay (f32; recurrent kernel for up to
    // 16 tokens, chunked beyond).
    if i % 4 == 3 {
        let shape = Shape {
            kv_len: shape.q_len,
            ..shape
        };
        let (q, k, v) = (
            values(shape.q_elems()),
            values(shape.k_elems()),
            values(shape.v_elems()),
        );
        let decay = wflash::lightning_decay(shape.q_heads);
        let opts = wflash::LinearOptions::causal().with_decay(&decay);
        return engine
            .linear_attention_blocking(&shape, layout, &opts, &q, &k, &v, None)
            .map(drop);
    }
    // The dtype changes every third call, so it meets every variant.
    match [DType::F32, DType::F16, DType::Bf16][(i / 3) % 3] {
        DType::F32 => engine
            .attention_blocking(&shape, layout, &opts, &q, &k, &v)
            .map(drop),
        DType::F16 => engine
            .attention_blocking(&shape, layout, &opts, &half(&q), &half(&k), &half(&v))
            .map(drop),
        DType::Bf16 => engine
            .attention_blocking(&shape, layout, &opts, &brain(&q), &brain(&k), &brain(&v))
            .map(drop),
    }
}

/// What a soak measured.
#[derive(Clone, Copy, Debug)]
pub struct SoakReport {
    pub calls: usize,
    /// Resident memory after the warm-up calls (pipelines built, driver caches filled) and at
    /// the end.
    pub resident_after_warmup: Option<u64>,
    pub resident_at_end: Option<u64>,
}

/// Runs `calls` soak calls (the first `warmup` of them before the first memory sample),
/// calling `progress(done, resident)` every `every` calls.
pub fn soak(
    engine: &Engine,
    calls: usize,
    warmup: usize,
    every: usize,
    mut progress: impl FnMut(usize, Option<u64>),
) -> wflash::Result<SoakReport> {
    let mut resident_after_warmup = None;
    for i in 0..calls {
        if i == warmup.min(calls) {
            resident_after_warmup = resident_bytes();
        }
        soak_call(engine, i)?;
        if (i + 1) % every.max(1) == 0 {
            progress(i + 1, resident_bytes());
        }
    }
    Ok(SoakReport {
        calls,
        resident_after_warmup,
        resident_at_end: resident_bytes(),
    })
}

//! The decode harness: a KV cache filled, cut to ragged lengths, appended to and decoded
//! (`Engine::kv_cache`, `append_kv`, `decode_attention`); the output and LSE judged against
//! the forward over each sequence's cached keys (bottom-right causal) in f64.

use rand::SeedableRng;
use wflash::{
    DType, DecodeOptions, Element, Engine, Error, KvBlocks, KvCache, KvCacheShape, Layout, Variant,
};
use wflash_ref::{CausalAlign, Problem};

use crate::{Output, Path, Verdict, judge, random};

/// One decode case: a cache filled, cut to ragged lengths, appended to and decoded.
#[derive(Clone, Debug)]
pub struct DecodeCase {
    pub path: Path,
    pub layout: Layout,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub value_dim: usize,
    pub capacity: usize,
    /// Tokens appended first to every sequence, then each sequence cut to its length here
    /// (ragged), then `tokens` more appended and decoded.
    pub prefill: usize,
    pub lengths: Vec<usize>,
    pub tokens: usize,
    pub splits: Option<usize>,
    /// A paged cache of blocks of this many tokens (each sequence's blocks drawn at random
    /// from a pool with spare blocks), instead of a contiguous one.
    pub block_size: Option<usize>,
    /// A trailing window (keys before the diagonal) and a soft-cap.
    pub window: Option<usize>,
    pub softcap: Option<f32>,
    pub variant: Variant,
    /// ALiBi's standard slopes; a sink logit per head (`sinks`).
    pub alibi: bool,
    pub sinks: bool,
    pub seed: u64,
}

impl DecodeCase {
    pub fn alibi_slopes(&self) -> Option<Vec<f32>> {
        self.alibi.then(|| wflash::alibi_slopes(self.q_heads))
    }
    /// Sinks from 1.5 down, so some heads' sinks outweigh their keys and some do not.
    pub fn sinks(&self) -> Option<Vec<f32>> {
        self.sinks
            .then(|| (0..self.q_heads).map(|h| 1.5 - 0.7 * h as f32).collect())
    }
}

/// A cache for `case`: contiguous, or paged with shuffled block tables.
pub fn make_cache(
    engine: &Engine,
    case: &DecodeCase,
    shape: KvCacheShape,
    dtype: DType,
    rng: &mut rand::rngs::StdRng,
) -> Result<KvCache, Error> {
    let Some(block_size) = case.block_size else {
        return engine.kv_cache(shape, dtype);
    };
    use rand::seq::SliceRandom;
    let per_sequence = shape.capacity.div_ceil(block_size);
    let num_blocks = shape.batch * per_sequence + 3;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(rng);
    let mut cache = engine.paged_kv_cache(
        shape,
        KvBlocks {
            block_size,
            num_blocks,
        },
        dtype,
    )?;
    let tables: Vec<Vec<u32>> = ids
        .chunks(per_sequence)
        .take(shape.batch)
        .map(<[u32]>::to_vec)
        .collect();
    cache.set_block_tables(&tables)?;
    Ok(cache)
}

/// Element (b, h, s, d) of a `[batch, heads, len, dim]` tensor in `layout`.
pub fn index(
    layout: Layout,
    [_, heads, len, dim]: [usize; 4],
    b: usize,
    h: usize,
    s: usize,
    d: usize,
) -> usize {
    match layout {
        Layout::Bhsd => ((b * heads + h) * len + s) * dim + d,
        Layout::Bshd => ((b * len + s) * heads + h) * dim + d,
    }
}

/// Rows `tokens` of batch element `b` of a tensor in `layout`, as a batch-1 BHSD tensor.
pub fn rows_of(
    x: &[f32],
    layout: Layout,
    dims: [usize; 4],
    b: usize,
    tokens: std::ops::Range<usize>,
) -> Vec<f64> {
    let [_, heads, _, dim] = dims;
    let mut out = Vec::with_capacity(heads * tokens.len() * dim);
    for h in 0..heads {
        for s in tokens.clone() {
            for d in 0..dim {
                out.push(f64::from(x[index(layout, dims, b, h, s, d)]));
            }
        }
    }
    out
}

/// Runs a decode case on `engine` and judges its output (and LSE) against the forward over
/// each sequence's cached keys in f64.
#[cfg(not(target_arch = "wasm32"))]
pub fn run_decode_case(engine: &Engine, case: &DecodeCase) -> Result<Verdict, String> {
    pollster::block_on(run_decode_case_async(engine, case))
}

/// [`run_decode_case`], awaited (a browser cannot block).
pub async fn run_decode_case_async(engine: &Engine, case: &DecodeCase) -> Result<Verdict, String> {
    match case.path.dtype() {
        DType::F32 => judge_decode::<f32>(engine, case).await,
        DType::F16 => judge_decode::<half::f16>(engine, case).await,
        DType::Bf16 => judge_decode::<half::bf16>(engine, case).await,
    }
}

async fn judge_decode<T: Element>(engine: &Engine, case: &DecodeCase) -> Result<Verdict, String> {
    let batch = case.lengths.len();
    let cache_shape = KvCacheShape {
        batch,
        kv_heads: case.kv_heads,
        capacity: case.capacity,
        head_dim: case.head_dim,
        value_dim: case.value_dim,
    };
    let err = |e: Error| format!("{case:?}: {e}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(case.seed);
    let mut cache = make_cache(engine, case, cache_shape, T::DTYPE, &mut rng).map_err(err)?;
    let (kv, n) = (case.kv_heads, case.tokens);
    let prefill_k_dims = [batch, kv, case.prefill, case.head_dim];
    let prefill_v_dims = [batch, kv, case.prefill, case.value_dim];
    let (pk, pk32) = random::<T>(&mut rng, prefill_k_dims.iter().product(), 1.0);
    let (pv, pv32) = random::<T>(&mut rng, prefill_v_dims.iter().product(), 1.0);
    engine
        .append_kv(
            &mut cache,
            case.layout,
            &engine.upload(&pk).map_err(err)?,
            &engine.upload(&pv).map_err(err)?,
            case.prefill,
        )
        .map_err(err)?;
    cache.set_lengths(&case.lengths).map_err(err)?;
    let new_k_dims = [batch, kv, n, case.head_dim];
    let new_v_dims = [batch, kv, n, case.value_dim];
    let (nk, nk32) = random::<T>(&mut rng, new_k_dims.iter().product(), 1.0);
    let (nv, nv32) = random::<T>(&mut rng, new_v_dims.iter().product(), 1.0);
    engine
        .append_kv(
            &mut cache,
            case.layout,
            &engine.upload(&nk).map_err(err)?,
            &engine.upload(&nv).map_err(err)?,
            n,
        )
        .map_err(err)?;
    let want_lengths: Vec<usize> = case.lengths.iter().map(|l| l + n).collect();
    if cache.lengths() != want_lengths {
        return Err(format!(
            "{case:?}: lengths {:?} after the append",
            cache.lengths()
        ));
    }
    let q_dims = [batch, case.q_heads, n, case.head_dim];
    let (q, q32) = random::<T>(&mut rng, q_dims.iter().product(), 1.0);
    let (slopes, sinks) = (case.alibi_slopes(), case.sinks());
    let opts = DecodeOptions {
        tokens: n,
        splits: case.splits,
        window: case.window,
        softcap: case.softcap,
        variant: case.variant,
        alibi_slopes: slopes.as_deref(),
        sinks: sinks.as_deref(),
        ..DecodeOptions::new(case.q_heads)
    };
    let out = engine
        .decode_attention(&cache, &opts, case.layout, &q)
        .await
        .map_err(err)?;
    let sigmoid = matches!(case.variant, Variant::Sigmoid { .. });
    if out.lse.is_some() == sigmoid {
        return Err(format!("{case:?}: an LSE exactly when softmax"));
    }

    // The reference, sequence by sequence: its kept prefill keys, then the new ones.
    let o_dims = [batch, case.q_heads, n, case.value_dim];
    let o_elems: usize = o_dims.iter().product();
    let (mut truth_o, mut naive_o) = (vec![0.0; o_elems], vec![0.0; o_elems]);
    let (mut truth_lse, mut naive_lse) = (Vec::new(), Vec::new());
    let store = |x: f32| T::from_f32(x).to_f32();
    for (b, &length) in case.lengths.iter().enumerate() {
        let keys = |prefill: &[f32], dims_p: [usize; 4], new: &[f32], dims_n: [usize; 4]| {
            let (old, fresh) = (
                rows_of(prefill, case.layout, dims_p, b, 0..length),
                rows_of(new, case.layout, dims_n, b, 0..n),
            );
            let dim = dims_p[3];
            let mut out = Vec::new();
            for h in 0..kv {
                out.extend_from_slice(&old[h * length * dim..(h + 1) * length * dim]);
                out.extend_from_slice(&fresh[h * n * dim..(h + 1) * n * dim]);
            }
            out
        };
        let k = keys(&pk32, prefill_k_dims, &nk32, new_k_dims);
        let v = keys(&pv32, prefill_v_dims, &nv32, new_v_dims);
        let q_b = rows_of(&q32, case.layout, q_dims, b, 0..n);
        let mut p = Problem::new(
            1,
            case.q_heads,
            kv,
            n,
            length + n,
            case.head_dim,
            case.value_dim,
            wflash_ref::Layout::Bhsd,
        );
        p.causal = Some(CausalAlign::BottomRight);
        p.window = case.window.map(|left| wflash_ref::Window {
            left: Some(left),
            right: None,
        });
        p.modifiers.softcap = case.softcap.map(f64::from);
        let wide =
            |x: &Option<Vec<f32>>| (x.as_ref()).map(|v| v.iter().map(|&a| f64::from(a)).collect());
        p.modifiers.alibi_slopes = wide(&slopes);
        p.modifiers.sinks = wide(&sinks);
        if let Variant::Sigmoid { bias } = case.variant {
            p.variant = wflash_ref::Variant::Sigmoid {
                bias: bias.map(f64::from),
            };
        }
        p.scale = f64::from(1.0 / (case.head_dim as f32).sqrt());
        let truth = wflash_ref::forward(&p, &q_b, &k, &v);
        let narrow = |x: &[f64]| x.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let naive =
            wflash_ref::naive::forward_f32(&p, &narrow(&q_b), &narrow(&k), &narrow(&v), store);
        for h in 0..case.q_heads {
            for t in 0..n {
                for d in 0..case.value_dim {
                    let at = index(case.layout, o_dims, b, h, t, d);
                    let from = (h * n + t) * case.value_dim + d;
                    truth_o[at] = truth.output[from];
                    naive_o[at] = naive.output[from];
                }
            }
        }
        truth_lse.extend_from_slice(&truth.lse);
        naive_lse.extend_from_slice(&naive.lse);
    }
    crate::record_output_hash(
        &format!("decode {case:?}"),
        &[
            (
                "O",
                &out.output.iter().map(|x| x.to_f32()).collect::<Vec<_>>(),
            ),
            ("LSE", out.lse.as_deref().unwrap_or(&[])),
        ],
    );
    let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    let mut outputs = vec![Output::forward(
        "O",
        out.output.iter().map(|x| f64::from(x.to_f32())).collect(),
        &truth_o,
        &naive_o,
    )];
    if let Some(lse) = &out.lse {
        outputs.push(
            Output::forward("LSE", wide(lse), &truth_lse, &naive_lse).slack_scaled_to_truth(),
        );
    }
    judge(case, outputs)
}

/// What the grids' cases vary from: f32, BHSD, 4 query heads over 2 kv heads, D=64, three
/// sequences of 300, 37 and 0 prefill tokens, one new token, a contiguous cache.
pub fn base_case() -> DecodeCase {
    DecodeCase {
        path: Path::F32,
        layout: Layout::Bhsd,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 64,
        value_dim: 64,
        capacity: 400,
        prefill: 300,
        lengths: vec![300, 37, 0],
        tokens: 1,
        splits: None,
        block_size: None,
        window: None,
        softcap: None,
        variant: Variant::Softmax,
        alibi: false,
        sinks: false,
        seed: 0xdec_0000,
    }
}

//! Decoding against a KV cache (`Engine::kv_cache`, `append_kv`, `decode_attention`): the
//! output and LSE of a few new queries per sequence equal the forward over that sequence's
//! cached keys (bottom-right causal), judged like the forward against the f64 reference, over
//! element types, layouts, GQA ratios, query tokens, split counts, head dims and ragged
//! lengths; a token-by-token generation loop equals one causal call; bad input is a typed
//! error before anything is dispatched.

use rand::SeedableRng;
use wflash::{
    DECODE_LANES, DECODE_MAX_KEYS_PER_LANE, DType, DecodeOptions, Element, Engine, Error, KvBlocks,
    KvCache, KvCacheShape, Layout, Shape, Tensor, Variant,
};
use wflash_conformance::{Output, Path, engine, judge, random};
use wflash_ref::{CausalAlign, Problem};

#[derive(Clone, Debug)]
struct DecodeCase {
    path: Path,
    layout: Layout,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    value_dim: usize,
    capacity: usize,
    /// Tokens appended first to every sequence, then each sequence cut to its length here
    /// (ragged), then `tokens` more appended and decoded.
    prefill: usize,
    lengths: Vec<usize>,
    tokens: usize,
    splits: Option<usize>,
    /// A paged cache of blocks of this many tokens (each sequence's blocks drawn at random
    /// from a pool with spare blocks), instead of a contiguous one.
    block_size: Option<usize>,
    /// A trailing window (keys before the diagonal) and a soft-cap.
    window: Option<usize>,
    softcap: Option<f32>,
    variant: Variant,
    /// ALiBi's standard slopes; a sink logit per head (`sinks`).
    alibi: bool,
    sinks: bool,
    seed: u64,
}

impl DecodeCase {
    fn alibi_slopes(&self) -> Option<Vec<f32>> {
        self.alibi.then(|| wflash::alibi_slopes(self.q_heads))
    }
    /// Sinks from 1.5 down, so some heads' sinks outweigh their keys and some do not.
    fn sinks(&self) -> Option<Vec<f32>> {
        self.sinks
            .then(|| (0..self.q_heads).map(|h| 1.5 - 0.7 * h as f32).collect())
    }
}

/// A cache for `case`: contiguous, or paged with shuffled block tables.
fn make_cache(
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
fn index(
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
fn rows_of(
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

fn upload<T: Element>(engine: &Engine, x: &[T]) -> Tensor {
    engine.upload(x).expect("upload")
}

fn run_case<T: Element>(
    engine: &Engine,
    case: &DecodeCase,
) -> Result<wflash_conformance::Verdict, String> {
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
            &upload(engine, &pk),
            &upload(engine, &pv),
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
            &upload(engine, &nk),
            &upload(engine, &nv),
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
        .decode_attention_blocking(&cache, &opts, case.layout, &q)
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

fn run(case: &DecodeCase) {
    let Some(engine) = engine(case.path) else {
        return;
    };
    let verdict = match case.path.dtype() {
        DType::F32 => run_case::<f32>(engine, case),
        DType::F16 => run_case::<half::f16>(engine, case),
        DType::Bf16 => run_case::<half::bf16>(engine, case),
    }
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{case:?}: ratio {:.3}", verdict.ratio);
}

/// What the grids' cases vary from: f32, BHSD, 4 query heads over 2 kv heads, D=64, three
/// sequences of 300, 37 and 0 prefill tokens, one new token, a contiguous cache.
fn base_case() -> DecodeCase {
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

/// The decode grid: every axis (element type and storage path, layout, GQA ratio up to rows
/// spread over two row blocks, query tokens 1..16, split count 1..16 and the planner's, head
/// dims 1..256 and value dim apart, ragged lengths down to a sequence holding only its new
/// tokens) in some case.
#[test]
fn decode_grid() {
    let base = base_case();
    let cases = [
        DecodeCase { ..base.clone() },
        DecodeCase {
            layout: Layout::Bshd,
            tokens: 3,
            splits: Some(3),
            seed: 0xdec_0001,
            ..base.clone()
        },
        DecodeCase {
            path: Path::F16Native,
            q_heads: 8,
            kv_heads: 1,
            tokens: 16,
            splits: Some(16),
            seed: 0xdec_0002,
            ..base.clone()
        },
        DecodeCase {
            path: Path::F16Packed,
            layout: Layout::Bshd,
            q_heads: 6,
            kv_heads: 3,
            tokens: 5,
            splits: Some(1),
            seed: 0xdec_0003,
            ..base.clone()
        },
        DecodeCase {
            path: Path::Bf16,
            q_heads: 32,
            kv_heads: 8,
            tokens: 2,
            seed: 0xdec_0004,
            ..base.clone()
        },
        // Rows of one kv head past 64: two row blocks.
        DecodeCase {
            q_heads: 8,
            kv_heads: 1,
            tokens: 9,
            head_dim: 128,
            value_dim: 96,
            splits: Some(7),
            seed: 0xdec_0005,
            ..base.clone()
        },
        DecodeCase {
            head_dim: 256,
            value_dim: 256,
            lengths: vec![5, 300],
            prefill: 300,
            seed: 0xdec_0006,
            ..base.clone()
        },
        DecodeCase {
            head_dim: 5,
            value_dim: 3,
            layout: Layout::Bshd,
            tokens: 4,
            capacity: 1100,
            prefill: 1090,
            lengths: vec![1090, 700, 1],
            seed: 0xdec_0007,
            ..base.clone()
        },
        // Decode modifiers: a trailing window (Mistral, gpt-oss) with split boundaries inside
        // it, a window wider than every sequence, soft-capping (Gemma 2), both.
        DecodeCase {
            window: Some(40),
            tokens: 4,
            splits: Some(5),
            seed: 0xdec_0008,
            ..base.clone()
        },
        DecodeCase {
            window: Some(100_000),
            layout: Layout::Bshd,
            seed: 0xdec_0009,
            ..base.clone()
        },
        DecodeCase {
            path: Path::Bf16,
            softcap: Some(5.0),
            q_heads: 8,
            kv_heads: 2,
            tokens: 2,
            seed: 0xdec_000a,
            ..base.clone()
        },
        DecodeCase {
            path: Path::F16Packed,
            window: Some(7),
            softcap: Some(30.0),
            tokens: 16,
            splits: Some(16),
            block_size: Some(16),
            seed: 0xdec_000b,
            ..base.clone()
        },
        // ALiBi from each query's diagonal (BLOOM, MPT) over folded GQA rows; sinks (gpt-oss)
        // with a sequence of only its new token and splits that see nothing; sigmoid with its
        // default bias per sequence and a window; sigmoid with a bias, ALiBi and a soft-cap;
        // everything at once.
        DecodeCase {
            alibi: true,
            q_heads: 8,
            kv_heads: 2,
            tokens: 3,
            splits: Some(4),
            seed: 0xdec_000c,
            ..base.clone()
        },
        DecodeCase {
            sinks: true,
            q_heads: 6,
            kv_heads: 3,
            splits: Some(5),
            seed: 0xdec_000d,
            ..base.clone()
        },
        DecodeCase {
            path: Path::F16Packed,
            variant: Variant::Sigmoid { bias: None },
            window: Some(50),
            tokens: 2,
            seed: 0xdec_000e,
            ..base.clone()
        },
        DecodeCase {
            path: Path::Bf16,
            variant: Variant::Sigmoid { bias: Some(-2.0) },
            alibi: true,
            softcap: Some(20.0),
            layout: Layout::Bshd,
            splits: Some(3),
            seed: 0xdec_000f,
            ..base.clone()
        },
        DecodeCase {
            path: Path::F16Native,
            alibi: true,
            sinks: true,
            window: Some(60),
            softcap: Some(15.0),
            q_heads: 8,
            kv_heads: 1,
            tokens: 4,
            splits: Some(7),
            seed: 0xdec_0010,
            ..base.clone()
        },
    ];
    for case in &cases {
        run(case);
    }
}

/// llvmpipe ends every loop of an invocation once they have run 65535 iterations in all
/// (gallivm's loop limiter), silently: a decode kernel whose lanes walked more than that
/// dropped the rest of their keys (a 32k-key cache in one split gave the mean of its first
/// ~4k keys). A sequence longer than one split may take (DECODE_LANES ×
/// DECODE_MAX_KEYS_PER_LANE keys) is read whole in the planner's splits and in two, against
/// the f64 truth; asking for one split is a typed error before dispatch.
#[test]
fn a_cache_longer_than_one_split_takes_is_read_whole() {
    let keys = DECODE_LANES * DECODE_MAX_KEYS_PER_LANE + 1000;
    let long = DecodeCase {
        q_heads: 2,
        kv_heads: 1,
        head_dim: 4,
        value_dim: 4,
        capacity: keys + 1,
        prefill: keys,
        lengths: vec![keys],
        seed: 0xdec_2000,
        ..base_case()
    };
    run(&long);
    run(&DecodeCase {
        splits: Some(2),
        seed: 0xdec_2001,
        ..long.clone()
    });
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let shape = KvCacheShape {
        batch: 1,
        kv_heads: 1,
        capacity: keys,
        head_dim: 4,
        value_dim: 4,
    };
    let mut cache = engine.kv_cache(shape, DType::F32).expect("cache");
    cache.set_lengths(&[keys]).expect("lengths");
    let q = upload(engine, &[0.5f32; 8]);
    let one_split = DecodeOptions {
        splits: Some(1),
        ..DecodeOptions::new(2)
    };
    assert!(matches!(
        engine.decode_attention_gpu(&cache, &one_split, Layout::Bhsd, &q),
        Err(Error::TooLarge {
            limit: "DECODE_MAX_KEYS_PER_LANE",
            ..
        })
    ));
}

/// The decode grid's axes again through paged caches (block sizes 1 to 256, shuffled block
/// tables over a pool with spare blocks, the last block of a sequence partly used).
#[test]
fn paged_decode_grid() {
    let base = DecodeCase {
        block_size: Some(16),
        seed: 0xdec_1000,
        ..base_case()
    };
    let cases = [
        DecodeCase { ..base.clone() },
        DecodeCase {
            block_size: Some(256),
            layout: Layout::Bshd,
            tokens: 3,
            splits: Some(3),
            seed: 0xdec_1001,
            ..base.clone()
        },
        DecodeCase {
            path: Path::F16Packed,
            block_size: Some(32),
            q_heads: 8,
            kv_heads: 1,
            tokens: 16,
            splits: Some(16),
            seed: 0xdec_1002,
            ..base.clone()
        },
        DecodeCase {
            path: Path::Bf16,
            block_size: Some(64),
            q_heads: 32,
            kv_heads: 8,
            tokens: 2,
            seed: 0xdec_1003,
            ..base.clone()
        },
        DecodeCase {
            block_size: Some(1),
            head_dim: 5,
            value_dim: 3,
            capacity: 60,
            prefill: 50,
            lengths: vec![50, 7],
            tokens: 4,
            seed: 0xdec_1004,
            ..base.clone()
        },
        DecodeCase {
            path: Path::F16Native,
            block_size: Some(128),
            head_dim: 128,
            value_dim: 96,
            capacity: 1100,
            prefill: 1090,
            lengths: vec![1090, 1],
            seed: 0xdec_1005,
            ..base.clone()
        },
        DecodeCase {
            block_size: Some(32),
            alibi: true,
            sinks: true,
            tokens: 2,
            splits: Some(6),
            seed: 0xdec_1006,
            ..base.clone()
        },
        DecodeCase {
            path: Path::F16Packed,
            block_size: Some(16),
            variant: Variant::Sigmoid { bias: None },
            q_heads: 8,
            kv_heads: 2,
            tokens: 16,
            splits: Some(16),
            seed: 0xdec_1007,
            ..base.clone()
        },
    ];
    for case in &cases {
        run(case);
    }
}

/// A paged cache gives bitwise the contiguous cache's outputs (same keys, same splits: the
/// same arithmetic, only the addresses differ).
#[test]
fn paged_and_contiguous_caches_agree_bitwise() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let shape = KvCacheShape {
        batch: 2,
        kv_heads: 2,
        capacity: 200,
        head_dim: 32,
        value_dim: 16,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xdec_2000);
    let k = random::<f32>(&mut rng, 2 * 2 * 150 * 32, 1.0).0;
    let v = random::<f32>(&mut rng, 2 * 2 * 150 * 16, 1.0).0;
    let q = random::<f32>(&mut rng, 2 * 4 * 2 * 32, 1.0).0;
    let opts = DecodeOptions {
        tokens: 2,
        splits: Some(3),
        ..DecodeOptions::new(4)
    };
    let mut outputs = Vec::new();
    for block_size in [None, Some(16), Some(7)] {
        let case = DecodeCase {
            path: Path::F32,
            layout: Layout::Bshd,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 32,
            value_dim: 16,
            capacity: 200,
            prefill: 150,
            lengths: vec![150, 150],
            tokens: 2,
            splits: Some(3),
            block_size,
            window: None,
            softcap: None,
            variant: Variant::Softmax,
            alibi: false,
            sinks: false,
            seed: 0,
        };
        let mut cache = make_cache(engine, &case, shape, DType::F32, &mut rng).expect("cache");
        engine
            .append_kv(
                &mut cache,
                Layout::Bshd,
                &upload(engine, &k),
                &upload(engine, &v),
                150,
            )
            .expect("append");
        if let Some(paging) = cache.paging() {
            // The pool's layout: token j of sequence b, kv head h at
            // ((table[b][j / block] · block + j % block) · kv_heads + h) · head_dim.
            let pool: Vec<f32> = engine.read_blocking(cache.tensors().0).expect("read");
            let bs = paging.block_size;
            for (b, j, h) in [(0, 0, 0), (1, 149, 1), (0, 77, 1), (1, 16, 0)] {
                let slot = (paging.tables[b][j / bs] as usize * bs + j % bs) * 2 + h;
                let src = ((b * 150 + j) * 2 + h) * 32;
                assert_eq!(pool[slot * 32..slot * 32 + 32], k[src..src + 32]);
            }
        }
        cache.set_lengths(&[150, 61]).expect("lengths");
        let out = engine
            .decode_attention_blocking(&cache, &opts, Layout::Bshd, &q)
            .expect("decode");
        let bits = |x: &[f32]| x.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
        outputs.push((bits(&out.output), bits(&out.lse.expect("lse"))));
    }
    assert!(
        outputs[1] == outputs[0],
        "blocks of 16 differ from the contiguous cache"
    );
    assert!(
        outputs[2] == outputs[0],
        "blocks of 7 differ from the contiguous cache"
    );
}

/// A sequence generated token by token through a paged cache (each step appends one token's K
/// and V and decodes its query) gives, step by step, the rows of one causal forward call over
/// the whole sequence.
#[test]
fn generation_token_by_token_through_a_paged_cache_equals_one_causal_call() {
    use wflash::{AttentionOptions, Causal};
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let (q_heads, kv_heads, dim, steps) = (4, 2, 32, 300);
    let shape = Shape {
        batch: 1,
        q_heads,
        kv_heads,
        q_len: steps,
        kv_len: steps,
        head_dim: dim,
        value_dim: dim,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xdec_0100);
    // BSHD: a token's rows are contiguous.
    let q = random::<f32>(&mut rng, shape.q_elems(), 1.0).0;
    let k = random::<f32>(&mut rng, shape.k_elems(), 1.0).0;
    let v = random::<f32>(&mut rng, shape.v_elems(), 1.0).0;
    let whole = engine
        .attention_blocking(
            &shape,
            Layout::Bshd,
            &AttentionOptions::softmax().with_causal(Causal::BottomRight),
            &q,
            &k,
            &v,
        )
        .expect("one call");
    let cache_shape = KvCacheShape {
        batch: 1,
        kv_heads,
        capacity: steps,
        head_dim: dim,
        value_dim: dim,
    };
    let mut cache = engine.kv_cache(cache_shape, DType::F32).expect("cache");
    let opts = DecodeOptions::new(q_heads);
    let (q_row, kv_row) = (q_heads * dim, kv_heads * dim);
    let mut worst = 0.0f32;
    for t in 0..steps {
        let (k_t, v_t) = (
            &k[t * kv_row..(t + 1) * kv_row],
            &v[t * kv_row..(t + 1) * kv_row],
        );
        engine
            .append_kv(
                &mut cache,
                Layout::Bshd,
                &upload(engine, k_t),
                &upload(engine, v_t),
                1,
            )
            .expect("append");
        let step = engine
            .decode_attention_blocking(&cache, &opts, Layout::Bshd, &q[t * q_row..(t + 1) * q_row])
            .expect("decode");
        let want = &whole.output[t * q_row..(t + 1) * q_row];
        for (a, b) in step.output.iter().zip(want) {
            worst = worst.max((a - b).abs());
        }
    }
    // Both are f32 attention over the same keys, summed in different orders.
    assert!(worst < 1e-5, "worst |decode - forward| {worst:e}");
    assert_eq!(cache.lengths(), [steps]);
}

/// Bad input is a typed error before anything is dispatched or written.
#[test]
fn bad_decode_input_is_a_typed_error() {
    let Some(engine) = engine(Path::F32) else {
        return;
    };
    let shape = KvCacheShape {
        batch: 2,
        kv_heads: 2,
        capacity: 8,
        head_dim: 4,
        value_dim: 4,
    };
    assert!(matches!(
        engine.kv_cache(
            KvCacheShape {
                capacity: 0,
                ..shape
            },
            DType::F32
        ),
        Err(Error::ZeroDimension { dim: "capacity" })
    ));
    assert!(matches!(
        engine.kv_cache(
            KvCacheShape {
                head_dim: 1000,
                ..shape
            },
            DType::F32
        ),
        Err(Error::HeadDimUnsupported { .. })
    ));
    assert!(matches!(
        engine.kv_cache(
            KvCacheShape {
                capacity: 1 << 40,
                ..shape
            },
            DType::F32
        ),
        Err(Error::TooLarge { .. })
    ));
    let mut cache = engine.kv_cache(shape, DType::F32).expect("cache");
    let tokens = |n: usize| upload(engine, &vec![0.5f32; 2 * 2 * n * 4]);
    // Past the capacity: nothing is written, the lengths stay.
    assert!(matches!(
        engine.append_kv(&mut cache, Layout::Bhsd, &tokens(9), &tokens(9), 9),
        Err(Error::CacheCapacity {
            sequence: 0,
            needed: 9,
            capacity: 8
        })
    ));
    assert_eq!(cache.lengths(), [0, 0]);
    engine
        .append_kv(&mut cache, Layout::Bhsd, &tokens(5), &tokens(5), 5)
        .expect("append");
    assert!(matches!(
        engine.append_kv(&mut cache, Layout::Bhsd, &tokens(4), &tokens(4), 4),
        Err(Error::CacheCapacity { needed: 9, .. })
    ));
    assert!(matches!(
        engine.append_kv(&mut cache, Layout::Bhsd, &tokens(2), &tokens(1), 2),
        Err(Error::LengthMismatch { tensor: "v", .. })
    ));
    assert!(matches!(
        engine.append_kv(&mut cache, Layout::Bhsd, &tokens(0), &tokens(0), 0),
        Err(Error::ZeroDimension { dim: "tokens" })
    ));
    let half = upload(engine, &[half::f16::ONE; 2 * 2 * 4]);
    assert!(matches!(
        engine.append_kv(&mut cache, Layout::Bhsd, &half, &tokens(1), 1),
        Err(Error::DTypeMismatch { tensor: "k", .. })
    ));
    assert!(matches!(
        cache.set_lengths(&[1]),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        cache.set_lengths(&[1, 9]),
        Err(Error::CacheCapacity {
            sequence: 1,
            needed: 9,
            capacity: 8
        })
    ));
    let q = vec![0.5f32; 2 * 4 * 4];
    let decode = |opts: DecodeOptions, q: &[f32]| {
        engine.decode_attention_blocking(&cache, &opts, Layout::Bhsd, q)
    };
    assert!(matches!(
        decode(DecodeOptions::new(3), &q),
        Err(Error::HeadsNotDivisible { .. })
    ));
    assert!(matches!(
        decode(DecodeOptions::new(4), &q[1..]),
        Err(Error::LengthMismatch { tensor: "q", .. })
    ));
    assert!(matches!(
        decode(
            DecodeOptions {
                tokens: 17,
                ..DecodeOptions::new(4)
            },
            &vec![0.5; 2 * 4 * 17 * 4]
        ),
        Err(Error::TooLarge {
            limit: "DECODE_MAX_TOKENS",
            ..
        })
    ));
    assert!(matches!(
        decode(
            DecodeOptions {
                splits: Some(0),
                ..DecodeOptions::new(4)
            },
            &q
        ),
        Err(Error::ZeroDimension { dim: "splits" })
    ));
    assert!(matches!(
        decode(
            DecodeOptions {
                scale: Some(f32::NAN),
                ..DecodeOptions::new(4)
            },
            &q
        ),
        Err(Error::InvalidScale { .. })
    ));
    for cap in [0.0, -1.0, f32::INFINITY, f32::NAN] {
        assert!(matches!(
            decode(
                DecodeOptions {
                    softcap: Some(cap),
                    ..DecodeOptions::new(4)
                },
                &q
            ),
            Err(Error::InvalidModifier {
                modifier: "softcap",
                ..
            })
        ));
    }
    // The forward's modifier rules: per-head values of the right length and finite, no sinks
    // with sigmoid, a finite sigmoid bias.
    let (three, four, nan) = ([0.5f32; 3], [0.5f32; 4], [0.5, f32::NAN, 0.5, 0.5]);
    assert!(matches!(
        decode(
            DecodeOptions {
                alibi_slopes: Some(&three),
                ..DecodeOptions::new(4)
            },
            &q
        ),
        Err(Error::LengthMismatch {
            tensor: "alibi_slopes",
            ..
        })
    ));
    assert!(matches!(
        decode(
            DecodeOptions {
                sinks: Some(&nan),
                ..DecodeOptions::new(4)
            },
            &q
        ),
        Err(Error::InvalidModifier {
            modifier: "sinks",
            ..
        })
    ));
    assert!(matches!(
        decode(
            DecodeOptions {
                sinks: Some(&four),
                variant: Variant::Sigmoid { bias: None },
                ..DecodeOptions::new(4)
            },
            &q
        ),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        decode(
            DecodeOptions {
                variant: Variant::Sigmoid {
                    bias: Some(f32::INFINITY)
                },
                ..DecodeOptions::new(4)
            },
            &q
        ),
        Err(Error::InvalidBias { .. })
    ));
    assert!(matches!(
        cache.set_block_tables(&[vec![0], vec![1]]),
        Err(Error::Unsupported { .. })
    ));
    let blocks = KvBlocks {
        block_size: 4,
        num_blocks: 3,
    };
    assert!(matches!(
        engine.paged_kv_cache(
            shape,
            KvBlocks {
                block_size: 0,
                ..blocks
            },
            DType::F32
        ),
        Err(Error::ZeroDimension { dim: "block_size" })
    ));
    assert!(matches!(
        engine.paged_kv_cache(
            shape,
            KvBlocks {
                block_size: 257,
                ..blocks
            },
            DType::F32
        ),
        Err(Error::TooLarge {
            limit: "DECODE_MAX_BLOCK_SIZE",
            ..
        })
    ));
    let mut paged = engine
        .paged_kv_cache(shape, blocks, DType::F32)
        .expect("paged");
    // No blocks yet: no room.
    assert!(matches!(
        engine.append_kv(&mut paged, Layout::Bhsd, &tokens(1), &tokens(1), 1),
        Err(Error::CacheCapacity {
            sequence: 0,
            needed: 1,
            capacity: 0
        })
    ));
    assert!(matches!(
        paged.set_block_tables(&[vec![0, 3], vec![1]]),
        Err(Error::CacheCapacity {
            sequence: 0,
            needed: 4,
            capacity: 3
        })
    ));
    assert!(matches!(
        paged.set_block_tables(&[vec![0, 1, 2], vec![1]]),
        Err(Error::CacheCapacity { sequence: 0, .. })
    ));
    assert!(matches!(
        paged.set_block_tables(&[vec![0]]),
        Err(Error::LengthMismatch { .. })
    ));
    paged
        .set_block_tables(&[vec![0, 1], vec![2]])
        .expect("tables");
    engine
        .append_kv(&mut paged, Layout::Bhsd, &tokens(3), &tokens(3), 3)
        .expect("append");
    // Sequence 1 has one block of 4 tokens.
    assert!(matches!(
        engine.append_kv(&mut paged, Layout::Bhsd, &tokens(2), &tokens(2), 2),
        Err(Error::CacheCapacity {
            sequence: 1,
            needed: 5,
            capacity: 4
        })
    ));
    // A table too short for what a sequence holds.
    assert!(matches!(
        paged.set_block_tables(&[vec![], vec![2]]),
        Err(Error::CacheCapacity {
            sequence: 0,
            needed: 3,
            ..
        })
    ));
    assert_eq!(paged.paging().expect("paged").tables, [vec![0, 1], vec![2]]);
    let q16 = vec![half::f16::ONE; 2 * 4 * 4];
    assert!(matches!(
        engine.decode_attention_blocking(&cache, &DecodeOptions::new(4), Layout::Bhsd, &q16),
        Err(Error::DTypeMismatch { tensor: "q", .. })
    ));
}

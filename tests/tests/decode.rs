//! Decoding against a KV cache (`Engine::kv_cache`, `append_kv`, `decode_attention`): the
//! output and LSE of a few new queries per sequence equal the forward over that sequence's
//! cached keys (bottom-right causal), judged like the forward against the f64 reference, over
//! element types, layouts, GQA ratios, query tokens, split counts, head dims and ragged
//! lengths; a token-by-token generation loop equals one causal call; bad input is a typed
//! error before anything is dispatched.

use rand::SeedableRng;
use wflash::{
    DECODE_LANES, DECODE_MAX_KEYS_PER_LANE, DType, DecodeOptions, Element, Engine, Error, KvBlocks,
    KvCacheShape, Layout, Shape, Tensor, Variant,
};
use wflash_conformance::decode::{DecodeCase, base_case, make_cache, run_decode_case};
use wflash_conformance::{Path, engine, random};

fn upload<T: Element>(engine: &Engine, x: &[T]) -> Tensor {
    engine.upload(x).expect("upload")
}

fn run(case: &DecodeCase) {
    let Some(engine) = engine(case.path) else {
        return;
    };
    let verdict = run_decode_case(engine, case).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{case:?}: ratio {:.3}", verdict.ratio);
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

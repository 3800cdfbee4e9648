//! Decoding against a KV cache (FlashDecoding; semantics: the forward over each sequence's
//! cached keys with bottom-right causal masking): a GPU-resident cache with per-sequence
//! lengths, an append of new tokens, and the split-KV attention of a few new queries per
//! sequence against it, whose partial results merge.wgsl combines. shaders/decode.wgsl.

mod dispatch;
mod plan;

pub use plan::{
    DECODE_LANES, DECODE_MAX_KEYS_PER_LANE, DECODE_MAX_SPLITS, DecodeParams, DecodePlan,
};

use crate::api::shape::{check_head_dims, check_nonzero};
use crate::{
    Attention, AttentionOptions, Causal, DType, Element, Engine, Error, GpuAttention, Layout,
    Result, Tensor, Variant,
};

/// The most query tokens per sequence of one decode call (speculative decoding's drafts).
pub const DECODE_MAX_TOKENS: usize = 16;

/// The sizes of a KV cache: K `[batch, kv_heads, capacity, head_dim]` and V `[batch, kv_heads,
/// capacity, value_dim]` when contiguous; a paged cache's `capacity` is the most tokens a
/// sequence's block table may cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvCacheShape {
    pub batch: usize,
    pub kv_heads: usize,
    /// Tokens each sequence can hold.
    pub capacity: usize,
    pub head_dim: usize,
    pub value_dim: usize,
}

/// A contiguous, GPU-resident KV cache of one element type, with the number of valid tokens
/// of each sequence (sequences of one batch may differ). Made by [`Engine::kv_cache`], filled
/// by [`Engine::append_kv`], read by [`Engine::decode_attention_gpu`].
#[derive(Clone, Debug)]
pub struct KvCache {
    pub(crate) shape: KvCacheShape,
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
    pub(crate) lengths: Vec<usize>,
    pub(crate) paging: Option<Paging>,
}

/// A paged cache's pool and block tables: K `[num_blocks, block_size, kv_heads, head_dim]` and
/// V, token `j` of sequence `b` in block `tables[b][j / block_size]` at slot `j % block_size`
/// (vLLM's and FlashAttention's paged KV cache).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paging {
    pub block_size: usize,
    pub num_blocks: usize,
    pub tables: Vec<Vec<u32>>,
}

/// The pool of a paged KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvBlocks {
    /// Tokens per block, 1..=[`DECODE_MAX_BLOCK_SIZE`].
    pub block_size: usize,
    pub num_blocks: usize,
}

/// The largest block of a paged cache.
pub const DECODE_MAX_BLOCK_SIZE: usize = 256;

impl KvCache {
    pub fn shape(&self) -> &KvCacheShape {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.k.dtype
    }
    /// Valid tokens of each sequence.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }
    /// The paged cache's pool and block tables; `None` for a contiguous cache.
    pub fn paging(&self) -> Option<&Paging> {
        self.paging.as_ref()
    }
    /// The tokens sequence `b` can hold: the capacity, or what its block table covers.
    pub fn capacity_of(&self, b: usize) -> usize {
        match &self.paging {
            None => self.shape.capacity,
            Some(p) => p.tables[b].len() * p.block_size,
        }
    }
    /// Gives each sequence of a paged cache its blocks, in token order (blocks may be shared
    /// between sequences, e.g. a common prefix: an append into a shared block writes it for
    /// all of them). Block ids past the pool, a table longer than the capacity, or a table too
    /// short for the sequence's length are typed errors, and nothing changes.
    pub fn set_block_tables(&mut self, tables: &[Vec<u32>]) -> Result<()> {
        let Some(paging) = &self.paging else {
            return Err(Error::Unsupported {
                combination: "block tables for a contiguous KV cache",
            });
        };
        crate::check_len("block tables", self.shape.batch, tables.len())?;
        for (sequence, table) in tables.iter().enumerate() {
            if let Some(&block) = table.iter().find(|&&b| b as usize >= paging.num_blocks) {
                return Err(Error::CacheCapacity {
                    sequence,
                    needed: block as usize + 1,
                    capacity: paging.num_blocks,
                });
            }
            let covered = table.len() * paging.block_size;
            if covered > self.shape.capacity.next_multiple_of(paging.block_size)
                || covered < self.lengths[sequence]
            {
                return Err(Error::CacheCapacity {
                    sequence,
                    needed: self.lengths[sequence].max(covered),
                    capacity: covered.min(self.shape.capacity),
                });
            }
        }
        if let Some(p) = &mut self.paging {
            p.tables = tables.to_vec();
        }
        Ok(())
    }
    /// Sets how many tokens of each sequence are valid (to drop rejected draft tokens, or to
    /// start sequences of one batch at different lengths); tokens past a length are ignored
    /// and overwritten by the next append. A slot never written by an append holds an
    /// unspecified value (the cache's memory is not cleared, as with `torch.empty`), so a length
    /// raised past what was appended reads such slots.
    pub fn set_lengths(&mut self, lengths: &[usize]) -> Result<()> {
        crate::check_len("kv cache lengths", self.shape.batch, lengths.len())?;
        if let Some((sequence, &needed)) =
            (lengths.iter().enumerate()).find(|&(_, &length)| length > self.shape.capacity)
        {
            return Err(Error::CacheCapacity {
                sequence,
                needed,
                capacity: self.shape.capacity,
            });
        }
        self.lengths = lengths.to_vec();
        Ok(())
    }
    /// The cache's K and V tensors (`[batch, kv_heads, capacity, dim]`, or the paged pool).
    pub fn tensors(&self) -> (&Tensor, &Tensor) {
        (&self.k, &self.v)
    }
}

/// How a decode call runs: the query side, the split count, and the forward's options that
/// decoding serves (each as in [`AttentionOptions`], over the sequence's cached keys with a
/// bottom-right causal mask).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeOptions<'a> {
    /// Query heads, a multiple of the cache's kv heads (GQA when larger).
    pub q_heads: usize,
    /// New query tokens per sequence, 1..=[`DECODE_MAX_TOKENS`]: the last `tokens` of each
    /// sequence's cached keys, masked bottom-right causal.
    pub tokens: usize,
    /// Multiplier of `q·k`; `None`: `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Splits of the keys, 1..=[`DECODE_MAX_SPLITS`]; `None`: the planner's choice from the
    /// longest sequence and the adapter. A split's keys are walked by
    /// [`DECODE_LANES`] invocations of at most [`DECODE_MAX_KEYS_PER_LANE`] keys each, which
    /// bounds the keys one split takes (a typed error past it).
    pub splits: Option<usize>,
    /// A trailing window (Mistral, gpt-oss): each query sees the `window` keys before its
    /// diagonal and the diagonal itself, as [`crate::Window::trailing`]`(window + 1)` in a
    /// forward call.
    pub window: Option<usize>,
    /// Soft-capping of the scores, `cap · tanh(s / cap)` (Gemma 2).
    pub softcap: Option<f32>,
    /// Softmax, or sigmoid attention (FlashSigmoid; a default bias of `-ln` of each sequence's
    /// length, as the forward's). Sigmoid returns no LSE.
    pub variant: Variant,
    /// ALiBi slope per query head, from each query's diagonal: see
    /// [`AttentionOptions::alibi_slopes`].
    pub alibi_slopes: Option<&'a [f32]>,
    /// Softmax only: a sink logit per query head (gpt-oss): see [`AttentionOptions::sinks`].
    pub sinks: Option<&'a [f32]>,
}

impl<'a> DecodeOptions<'a> {
    /// One new softmax token per sequence for `q_heads` query heads.
    pub fn new(q_heads: usize) -> DecodeOptions<'a> {
        DecodeOptions {
            q_heads,
            tokens: 1,
            scale: None,
            splits: None,
            window: None,
            softcap: None,
            variant: Variant::Softmax,
            alibi_slopes: None,
            sinks: None,
        }
    }

    /// The forward call's options this decode call computes (the window aside, which the
    /// forward counts with the diagonal): what validates the modifiers, one set of rules.
    pub fn attention_options(&self) -> AttentionOptions<'a> {
        AttentionOptions {
            variant: self.variant,
            scale: self.scale,
            causal: Some(Causal::BottomRight),
            softcap: self.softcap,
            alibi_slopes: self.alibi_slopes,
            sinks: self.sinks,
            ..AttentionOptions::default()
        }
    }
}

impl Engine {
    /// A KV cache of this shape and element type, every sequence empty.
    pub fn kv_cache(&self, shape: KvCacheShape, dtype: DType) -> Result<KvCache> {
        self.allocate_kv_cache(shape, shape, dtype, None)
    }

    /// A paged KV cache: a pool of `blocks.num_blocks` blocks of `blocks.block_size` tokens
    /// (K `[num_blocks, block_size, kv_heads, head_dim]`, V likewise), every sequence empty
    /// and without blocks until [`KvCache::set_block_tables`] gives it some. `shape.capacity`
    /// bounds a sequence's table.
    pub fn paged_kv_cache(
        &self,
        shape: KvCacheShape,
        blocks: KvBlocks,
        dtype: DType,
    ) -> Result<KvCache> {
        check_nonzero(&[
            ("batch", shape.batch),
            ("capacity", shape.capacity),
            ("block_size", blocks.block_size),
            ("num_blocks", blocks.num_blocks),
        ])?;
        if blocks.block_size > DECODE_MAX_BLOCK_SIZE {
            return Err(Error::TooLarge {
                limit: "DECODE_MAX_BLOCK_SIZE",
                needed: blocks.block_size as u64,
                max: DECODE_MAX_BLOCK_SIZE as u64,
                hint: " tokens per block",
            });
        }
        // The pool holds as many elements as a contiguous cache of one sequence per block.
        let pool = KvCacheShape {
            batch: blocks.num_blocks,
            capacity: blocks.block_size,
            ..shape
        };
        let paging = Paging {
            block_size: blocks.block_size,
            num_blocks: blocks.num_blocks,
            tables: vec![Vec::new(); shape.batch],
        };
        self.allocate_kv_cache(shape, pool, dtype, Some(paging))
    }

    /// A cache of `shape` whose K and V tensors hold what a contiguous cache of `storage`
    /// holds (the paged pool: one sequence per block), every sequence empty.
    fn allocate_kv_cache(
        &self,
        shape: KvCacheShape,
        storage: KvCacheShape,
        dtype: DType,
        paging: Option<Paging>,
    ) -> Result<KvCache> {
        self.check_kv_cache_shape(&storage, dtype)?;
        self.storage_for(dtype)?;
        let slots = storage.batch * storage.kv_heads * storage.capacity;
        Ok(KvCache {
            k: self.output_tensor(dtype, slots * storage.head_dim)?,
            v: self.output_tensor(dtype, slots * storage.value_dim)?,
            lengths: vec![0; shape.batch],
            shape,
            paging,
        })
    }

    /// Appends `tokens` new tokens to every sequence of `cache`, at each sequence's length:
    /// `k` `[batch, kv_heads, tokens, head_dim]` and `v` (`value_dim`) in `layout`, the cache's
    /// element type. A sequence that would pass the capacity is a typed error, before anything
    /// is written.
    pub fn append_kv(
        &self,
        cache: &mut KvCache,
        layout: Layout,
        k: &Tensor,
        v: &Tensor,
        tokens: usize,
    ) -> Result<()> {
        let plan = self.plan_append(cache, layout, k, v, tokens)?;
        self.run_append(cache, &plan, k, v)?;
        for length in &mut cache.lengths {
            *length += tokens;
        }
        Ok(())
    }

    /// Attention of `opts.tokens` new queries per sequence (`q` `[batch, q_heads, tokens,
    /// head_dim]` in `layout`, the cache's element type) against each sequence's cached keys,
    /// the last `tokens` of which are the queries' own (bottom-right causal). Returns the
    /// output (`[batch, q_heads, tokens, value_dim]` in `layout`) and the LSE. Submits and
    /// returns at once.
    pub fn decode_attention_gpu(
        &self,
        cache: &KvCache,
        opts: &DecodeOptions<'_>,
        layout: Layout,
        q: &Tensor,
    ) -> Result<GpuAttention> {
        let plan = self.plan_decode(cache, opts, layout, q)?;
        self.run_decode(cache, &plan, q)
    }

    /// [`Engine::decode_attention_gpu`] with queries from the host, the results read back.
    pub async fn decode_attention<T: Element>(
        &self,
        cache: &KvCache,
        opts: &DecodeOptions<'_>,
        layout: Layout,
        q: &[T],
    ) -> Result<Attention<T>> {
        if T::DTYPE != cache.dtype() {
            return Err(Error::DTypeMismatch {
                tensor: "q",
                expected: cache.dtype(),
                got: T::DTYPE,
            });
        }
        let q = self.upload(q)?;
        let out = self.decode_attention_gpu(cache, opts, layout, &q)?;
        self.read_attention(&out).await
    }

    #[cfg(not(target_arch = "wasm32"))]
    /// Blocking twin of [`Engine::decode_attention`].
    pub fn decode_attention_blocking<T: Element>(
        &self,
        cache: &KvCache,
        opts: &DecodeOptions<'_>,
        layout: Layout,
        q: &[T],
    ) -> Result<Attention<T>> {
        pollster::block_on(self.decode_attention(cache, opts, layout, q))
    }

    fn check_kv_cache_shape(&self, shape: &KvCacheShape, dtype: DType) -> Result<()> {
        check_nonzero(&[
            ("batch", shape.batch),
            ("kv_heads", shape.kv_heads),
            ("capacity", shape.capacity),
            ("head_dim", shape.head_dim),
            ("value_dim", shape.value_dim),
        ])?;
        check_head_dims(&[("head_dim", shape.head_dim), ("value_dim", shape.value_dim)])?;
        let slots = [shape.batch, shape.kv_heads, shape.capacity]
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        let needed = slots
            .and_then(|s| {
                s.checked_mul((shape.head_dim.max(shape.value_dim) * dtype.size_bytes()) as u64)
            })
            .unwrap_or(u64::MAX);
        self.inner.info.within_binding_limit(
            needed,
            " bytes of one cache tensor (a smaller capacity or batch)",
        )
    }
}

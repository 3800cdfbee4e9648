//! How an append or a decode call runs, every input and limit checked before the GPU is
//! touched: the uniform block, the grid, the split count and the merge's plan.

use super::{DECODE_MAX_TOKENS, DecodeOptions, KvCache};
use crate::api::options::resolve_scale;
use crate::kernels::{DecodeKey, DecodePass, Storage, max_decode_rows};
use crate::ops::merge::MergePlan;
use crate::{Engine, Error, Layout, OutputShape, Result, Shape, Tensor, Variant, check_len};

/// The uniform block of decode.wgsl (`struct DecodeParams`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DecodeParams {
    pub q_stride: [u32; 4],
    pub o_stride: [u32; 4],
    pub new_stride: [u32; 4],
    pub batch: u32,
    pub q_heads: u32,
    pub kv_heads: u32,
    pub group: u32,
    pub tokens: u32,
    pub capacity: u32,
    pub splits: u32,
    pub keys_per_split: u32,
    pub row_blocks: u32,
    /// What Q is multiplied by: scale · log2(e) (the kernel's logits are base 2).
    pub q_scale: f32,
    pub part_elems: u32,
    pub part_rows: u32,
    pub dim: u32,
    pub elems: u32,
    pub groups_x: u32,
    /// A paged cache's tokens per block and block-table width (entries per sequence).
    pub block_size: u32,
    pub table_width: u32,
    /// Keys before a query's diagonal it still sees (`u32::MAX`: no window).
    pub window: u32,
    /// `cap · tanh(s / cap)` on the scores, in the kernel's units (cap · score_unit; 0: none).
    pub softcap: f32,
    /// 1 when the heads have sinks.
    pub has_sinks: u32,
    /// log2(e) for softmax (base-2 logits), 1 for sigmoid.
    pub score_unit: f32,
    pub _pad2: u32,
    pub _pad3: u32,
    pub _pad4: u32,
}

/// One pass of decode.wgsl: its kernel, uniform block and grid (an append has one for K and
/// one for V); a decode's merge of its partial results.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodePlan {
    pub passes: Vec<(DecodeKey, DecodeParams, [u32; 3])>,
    /// Split-KV's merge: `None` for an append.
    pub merge: Option<MergePlan>,
    /// The split pass's per-sequence and per-head data, natural-log units: [sigmoid bias per
    /// sequence | ALiBi slope per query head (0 without ALiBi) | sink per query head (0
    /// without)]. Empty for an append.
    pub row_data: Vec<f32>,
}

/// The fewest keys per split the automatic split count gives a workgroup.
const MIN_KEYS_PER_SPLIT: usize = 256;
/// Workgroups the automatic split count aims to have in flight: a GPU wants hundreds; a CPU
/// adapter a few per core.
const TARGET_WORKGROUPS_GPU: usize = 256;
const TARGET_WORKGROUPS_CPU: usize = 8;
/// The most splits a decode call takes.
pub const DECODE_MAX_SPLITS: usize = 64;
/// Invocations of a split workgroup (decode.wgsl's LANES): each takes every LANES-th key.
pub const DECODE_LANES: usize = 8;
/// The most keys one invocation of the split pass walks. llvmpipe ends every loop of an
/// invocation once they have run 65535 iterations in all (gallivm's loop limiter), silently:
/// a longer split would drop keys. The key loop is the kernel's only loop, and this leaves
/// half the limit spare.
pub const DECODE_MAX_KEYS_PER_LANE: usize = 32768;

impl Engine {
    /// Checks an append and plans its two passes.
    pub fn plan_append(
        &self,
        cache: &KvCache,
        layout: Layout,
        k: &Tensor,
        v: &Tensor,
        tokens: usize,
    ) -> Result<DecodePlan> {
        let shape = &cache.shape;
        if tokens == 0 {
            return Err(Error::ZeroDimension { dim: "tokens" });
        }
        for (tensor, t) in [("k", k), ("v", v)] {
            if t.dtype != cache.dtype() {
                return Err(Error::DTypeMismatch {
                    tensor,
                    expected: cache.dtype(),
                    got: t.dtype,
                });
            }
        }
        let rows = shape.batch * shape.kv_heads * tokens;
        check_len("k", rows * shape.head_dim, k.len)?;
        check_len("v", rows * shape.value_dim, v.len)?;
        if let Some((sequence, &length)) = (cache.lengths.iter().enumerate())
            .find(|&(b, &length)| length + tokens > cache.capacity_of(b))
        {
            return Err(Error::CacheCapacity {
                sequence,
                needed: length + tokens,
                capacity: cache.capacity_of(sequence),
            });
        }
        let storage = self.storage_for(cache.dtype())?;
        let key = DecodeKey {
            pass: DecodePass::Append,
            storage,
            head_dim: 1,
            value_dim: 1,
            paged: cache.paging.is_some(),
            rows: 1,
            sigmoid: false,
        };
        let (block_size, table_width) = cache.table_geometry();
        let max_groups = self.inner.info.limits.max_compute_workgroups_per_dimension;
        let passes = [shape.head_dim, shape.value_dim]
            .into_iter()
            .map(|dim| {
                let elems = rows * dim;
                let [b, h, s] = layout.strides(shape.kv_heads, tokens, dim);
                let groups = (elems as u64).div_ceil(64);
                let groups_x = groups.min(u64::from(max_groups));
                let params = DecodeParams {
                    new_stride: [b as u32, h as u32, s as u32, 1],
                    batch: shape.batch as u32,
                    kv_heads: shape.kv_heads as u32,
                    tokens: tokens as u32,
                    capacity: shape.capacity as u32,
                    dim: dim as u32,
                    elems: elems as u32,
                    groups_x: groups_x as u32,
                    block_size,
                    table_width,
                    ..Default::default()
                };
                let grid = [groups_x as u32, groups.div_ceil(groups_x) as u32, 1];
                (key, params, grid)
            })
            .collect();
        Ok(DecodePlan {
            passes,
            merge: None,
            row_data: Vec::new(),
        })
    }

    /// Checks a decode call and plans its split pass and merge.
    pub fn plan_decode(
        &self,
        cache: &KvCache,
        opts: &DecodeOptions<'_>,
        layout: Layout,
        q: &Tensor,
    ) -> Result<DecodePlan> {
        let c = &cache.shape;
        let shape = Shape {
            batch: c.batch,
            q_heads: opts.q_heads,
            kv_heads: c.kv_heads,
            q_len: opts.tokens,
            kv_len: c.capacity,
            head_dim: c.head_dim,
            value_dim: c.value_dim,
        };
        shape.validate()?;
        if opts.tokens > DECODE_MAX_TOKENS {
            return Err(Error::TooLarge {
                limit: "DECODE_MAX_TOKENS",
                needed: opts.tokens as u64,
                max: DECODE_MAX_TOKENS as u64,
                hint: " query tokens per sequence in one decode call (use attention for a prefill)",
            });
        }
        if q.dtype != cache.dtype() {
            return Err(Error::DTypeMismatch {
                tensor: "q",
                expected: cache.dtype(),
                got: q.dtype,
            });
        }
        check_len("q", shape.q_elems(), q.len)?;
        if let Some((sequence, &length)) =
            (cache.lengths.iter().enumerate()).find(|&(_, &length)| length > c.capacity)
        {
            return Err(Error::CacheCapacity {
                sequence,
                needed: length,
                capacity: c.capacity,
            });
        }
        let scale = resolve_scale(opts.scale, &shape)?;
        let attention = opts.attention_options();
        attention.validate_modifiers(&shape)?;
        let sigmoid = matches!(opts.variant, Variant::Sigmoid { .. });
        // Each sequence's sigmoid bias: the forward's over its cached keys.
        let mut row_data = (cache.lengths.iter())
            .map(|&length| attention.resolved_sigmoid_bias(length))
            .collect::<Result<Vec<f32>>>()?;
        for values in [opts.alibi_slopes, opts.sinks] {
            match values {
                Some(values) => row_data.extend_from_slice(values),
                None => row_data.extend(std::iter::repeat_n(0.0, opts.q_heads)),
            }
        }
        let score_unit = if sigmoid {
            1.0
        } else {
            std::f32::consts::LOG2_E
        };
        let (block_size, table_width) = cache.table_geometry();
        let storage = self.storage_for(cache.dtype())?;
        let longest = cache.lengths.iter().copied().max().unwrap_or(0).max(1);
        let group = shape.q_heads / shape.kv_heads;
        let group_rows = group * opts.tokens;
        let rows = (group_rows.next_power_of_two() as u32)
            .min(max_decode_rows(c.head_dim as u32, c.value_dim as u32));
        let row_blocks = group_rows.div_ceil(rows as usize);
        // Splits: at least as many as keep every lane within DECODE_MAX_KEYS_PER_LANE keys;
        // the caller's, else as many as it takes to have the adapter's target of workgroups,
        // each with at least MIN_KEYS_PER_SPLIT keys.
        let fewest = longest.div_ceil(DECODE_LANES * DECODE_MAX_KEYS_PER_LANE);
        let splits = match opts.splits {
            Some(0) => return Err(Error::ZeroDimension { dim: "splits" }),
            Some(splits) if splits < fewest => {
                return Err(Error::TooLarge {
                    limit: "DECODE_MAX_KEYS_PER_LANE",
                    needed: longest.div_ceil(splits).div_ceil(DECODE_LANES) as u64,
                    max: DECODE_MAX_KEYS_PER_LANE as u64,
                    hint: " keys per invocation of one split: ask for more splits, or none",
                });
            }
            Some(splits) => splits.min(longest),
            None => {
                let target = match self.inner.info.device_type {
                    wgpu::DeviceType::Cpu => TARGET_WORKGROUPS_CPU,
                    _ => TARGET_WORKGROUPS_GPU,
                };
                let workgroups = c.batch * c.kv_heads * row_blocks;
                target
                    .div_ceil(workgroups)
                    .min(longest.div_ceil(MIN_KEYS_PER_SPLIT))
                    .max(fewest)
            }
        };
        if splits > DECODE_MAX_SPLITS {
            return Err(Error::TooLarge {
                limit: "DECODE_MAX_SPLITS",
                needed: splits as u64,
                max: DECODE_MAX_SPLITS as u64,
                hint: " splits of one decode call",
            });
        }
        let keys_per_split = longest.div_ceil(splits);
        let parts = splits * DECODE_LANES;
        let out = OutputShape {
            batch: c.batch,
            heads: opts.q_heads,
            len: opts.tokens,
            value_dim: c.value_dim,
        };
        let merge = self.plan_merge(&out, layout, parts, Storage::F32, storage, sigmoid)?;
        let max_groups = self.inner.info.limits.max_compute_workgroups_per_dimension as usize;
        if c.kv_heads * row_blocks > max_groups || c.batch > max_groups {
            return Err(Error::TooLarge {
                limit: "max_compute_workgroups_per_dimension",
                needed: (c.kv_heads * row_blocks).max(c.batch) as u64,
                max: max_groups as u64,
                hint: " (kv heads × row blocks and batch are dispatch dimensions)",
            });
        }
        let stride = |heads: usize, dim: usize| {
            let [b, h, s] = layout.strides(heads, opts.tokens, dim);
            [b as u32, h as u32, s as u32, 1]
        };
        let params = DecodeParams {
            q_stride: stride(opts.q_heads, c.head_dim),
            o_stride: stride(opts.q_heads, c.value_dim),
            batch: c.batch as u32,
            q_heads: opts.q_heads as u32,
            kv_heads: c.kv_heads as u32,
            group: group as u32,
            tokens: opts.tokens as u32,
            capacity: c.capacity as u32,
            splits: splits as u32,
            keys_per_split: keys_per_split as u32,
            row_blocks: row_blocks as u32,
            q_scale: scale * score_unit,
            part_elems: out.o_elems() as u32,
            part_rows: out.lse_elems() as u32,
            block_size,
            table_width,
            window: opts
                .window
                .map_or(u32::MAX, |w| w.min(i32::MAX as usize) as u32),
            softcap: opts.softcap.unwrap_or(0.0) * score_unit,
            has_sinks: u32::from(opts.sinks.is_some()),
            score_unit,
            ..Default::default()
        };
        let key = DecodeKey {
            pass: DecodePass::Split,
            storage,
            head_dim: c.head_dim as u32,
            value_dim: c.value_dim as u32,
            paged: cache.paging.is_some(),
            rows,
            sigmoid,
        };
        let grid = [
            splits as u32,
            (c.kv_heads * row_blocks) as u32,
            c.batch as u32,
        ];
        Ok(DecodePlan {
            passes: vec![(key, params, grid)],
            merge: Some(merge),
            row_data,
        })
    }
}

impl KvCache {
    /// A paged cache's block size and table width (the longest table, at least 1); (1, 1) for
    /// a contiguous cache, whose kernels ignore them.
    fn table_geometry(&self) -> (u32, u32) {
        match &self.paging {
            None => (1, 1),
            Some(p) => (
                p.block_size as u32,
                p.tables.iter().map(Vec::len).max().unwrap_or(0).max(1) as u32,
            ),
        }
    }

    /// The block tables as the kernels read them: `table_width` entries per sequence (unused
    /// entries 0, never read: a sequence's tokens lie in its table).
    pub(super) fn flat_tables(&self) -> Vec<u32> {
        let (_, width) = self.table_geometry();
        match &self.paging {
            None => vec![0],
            Some(p) => p
                .tables
                .iter()
                .flat_map(|t| {
                    t.iter()
                        .copied()
                        .chain(std::iter::repeat(0))
                        .take(width as usize)
                })
                .collect(),
        }
    }
}

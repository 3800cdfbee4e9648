// Decoding against a KV cache (FlashDecoding): a few new query tokens per sequence attend to
// the sequence's cached keys, split across workgroups so a long cache keeps the whole device
// busy; each split writes partial outputs and LSEs that merge.wgsl combines.
//
// The cache holds K `[batch, kv_heads, capacity, HEAD_DIM]` and V `[.., VALUE_DIM]` in the
// element type, or (PAGED) a pool `[blocks, block_size, kv_heads, dim]` that block tables map
// tokens into (`cache_row`); `lengths[b]` tokens of sequence b are valid.
//
//   decode_append: writes `tokens` new tokens of K or V (in their layout) at each sequence's
//                  length, one invocation per element.
//   decode_split:  workgroup (split, kv_head · row_blocks, batch) of LANES invocations. GQA
//                  folding: the rows are the query tokens of every query head that shares the
//                  kv head, and each invocation holds ROWS of them, so a key it reads serves
//                  them all and each key of the split is read by one invocation only. Lane l
//                  takes the split's keys l, l + LANES, ... and writes a partial of its own
//                  (partial split · LANES + l): the merge combines the lanes, exactly.
//
// Written for what a CPU driver does well (docs/PERF.md): every loop over rows and dims is
// written out by the host (`//#unroll`, as flash_fwd_unrolled.wgsl), so the private arrays are
// constant-indexed and the only loop is the one over keys, and K and V are read 16 bytes at a
// time (`k_unit`, `v_unit`: quads of elements). That also keeps a lane's loop iterations to its
// keys: llvmpipe stops every loop of an invocation once they total 65535 iterations, which
// the host's keys per lane stay far below (DECODE_MAX_KEYS_PER_LANE).
//
// Scores go through the forward's modifiers in its order: soft-capping (Gemma 2), ALiBi
// (s -= slope · |j − diagonal|), a bottom-right causal bound (query t of n sees keys
// j <= length - n + t, its diagonal) and a trailing window. Softmax takes base-2 logits (Q
// pre-scaled by scale · log2 e, so a weight is one exp2) and starts the first lane of the first
// split from the head's sink, a key of value 0 (gpt-oss), so the merged LSE counts it once; a
// partial that sees nothing writes LSE −∞. Sigmoid (SIGMOID) weighs each visible key by
// σ(s + b) with the sequence's bias and sums: its partials are sums the merge adds up.
//
// Host prelude: HEAD_DIM, VALUE_DIM, ROWS, D4, DV4 (quads per K and V row), KU, VU (units per
// K and V row) and KUQ, VUQ (quads per unit), PAGED, SIGMOID; `load_q` (binding q), `k_unit`
// and `v_unit` (the cache), `load_new` and `store_cache`
// (append) for the storage type.

//#import common/scores.wgsl

struct DecodeParams {
    // Q and O element strides (batch, head, token, 1) in the call's layout.
    q_stride: vec4<u32>,
    o_stride: vec4<u32>,
    // Append: the new tokens' strides (batch, head, token, 1), the dim of the tensor appended.
    new_stride: vec4<u32>,
    batch: u32,
    q_heads: u32,
    kv_heads: u32,
    group: u32,
    // Query tokens per sequence (append: new tokens).
    tokens: u32,
    capacity: u32,
    splits: u32,
    keys_per_split: u32,
    // Row blocks (of ROWS rows) per kv head.
    row_blocks: u32,
    // What Q is multiplied by: scale · log2(e).
    q_scale: f32,
    // Elements of one partial output, and rows (batch · q_heads · tokens) of one partial LSE.
    part_elems: u32,
    part_rows: u32,
    // Append: the dim of the tensor appended, elements to write.
    dim: u32,
    elems: u32,
    groups_x: u32,
    // A paged cache's tokens per block and block-table entries per sequence.
    block_size: u32,
    table_width: u32,
    // A trailing window: keys at most `window` before a query's diagonal (0xffffffff: none).
    window: u32,
    // Soft-capping of the scores, cap · tanh(s / cap), in the kernel's units (0: none).
    softcap: f32,
    // 1 when the heads have sinks (row_data).
    has_sinks: u32,
    // log2(e) for softmax, 1 for sigmoid: converts natural-log ALiBi slopes and sinks.
    score_unit: f32,
    _pad2: u32,
    _pad3: u32,
    _pad4: u32,
}

@group(0) @binding({binding.params}) var<uniform> params: DecodeParams;
@group(0) @binding({binding.decode_lengths}) var<storage, read> lengths: array<u32>;
// A paged cache's block tables, [batch, table_width] (a contiguous cache binds a word).
@group(0) @binding({binding.decode_blocks}) var<storage, read> blocks: array<u32>;
@group(0) @binding({binding.decode_partial_o}) var<storage, read_write> partial_o: array<f32>;
@group(0) @binding({binding.decode_partial_lse}) var<storage, read_write> partial_lse: array<f32>;
// Natural-log units: [sigmoid bias per sequence | ALiBi slope per q head (0: none) | sink per
// q head].
@group(0) @binding({binding.decode_row_data}) var<storage, read> row_data: array<f32>;

const LANES: u32 = 8u;

// The cache row (of HEAD_DIM or VALUE_DIM elements) of token `token` of kv head `kv_head` of
// sequence `batch`: contiguous [batch, kv_heads, capacity], or paged [block, slot, kv_heads]
// through the sequence's block table.
fn cache_row(batch: u32, kv_head: u32, token: u32) -> u32 {
    if PAGED {
        let block = blocks[batch * params.table_width + token / params.block_size];
        return (block * params.block_size + token % params.block_size) * params.kv_heads + kv_head;
    }
    return (batch * params.kv_heads + kv_head) * params.capacity + token;
}

@compute @workgroup_size(64)
fn decode_append(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wg.y * params.groups_x + wg.x) * 64u + lid;
    if i >= params.elems {
        return;
    }
    // Element i of the new tokens in [batch, kv_heads, tokens, dim] order.
    let d = i % params.dim;
    let token = (i / params.dim) % params.tokens;
    let head = (i / (params.dim * params.tokens)) % params.kv_heads;
    let batch = i / (params.dim * params.tokens * params.kv_heads);
    let src = batch * params.new_stride.x + head * params.new_stride.y + token * params.new_stride.z + d;
    let dst = cache_row(batch, head, lengths[batch] + token) * params.dim + d;
    store_cache(dst, load_new(src));
}

@compute @workgroup_size(LANES)
fn decode_split(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let split = wg.x;
    let kv_head = wg.y / params.row_blocks;
    let block_row0 = (wg.y % params.row_blocks) * ROWS;
    let batch = wg.z;
    let length = i32(lengths[batch]);
    let group_rows = params.group * params.tokens;

    var q = array<vec4<f32>, ROWS * D4>();
    var o = array<vec4<f32>, ROWS * DV4>();
    var row_max = array<f32, ROWS>();
    var row_sum = array<f32, ROWS>();
    var row_slope = array<f32, ROWS>();
    var row_diag = array<i32, ROWS>();
    // Each row's visible keys are [row_keys.x, row_keys.y): up to its diagonal
    // length - tokens + token (bottom-right causal), from `window` keys before it.
    var row_keys = array<vec2<u32>, ROWS>();
    // The keys any row of the block sees.
    var begin = 0xffffffffu;
    var end = 0u;
//#unroll r ROWS
    {
        let row = block_row0 + {r};
        let valid = row < group_rows;
        let head = kv_head * params.group + min(row, group_rows - 1u) / params.tokens;
        let token = row % params.tokens;
        let base = batch * params.q_stride.x + head * params.q_stride.y + token * params.q_stride.z;
//#unroll d D4
        q[{r} * D4 + {d}] = load_q4(valid, base, {d} * 4u) * params.q_scale;
//#end
//#unroll e DV4
        o[{r} * DV4 + {e}] = vec4<f32>(0.0);
//#end
        // The sink is one key of the whole row: the first lane of the first split holds it.
        let sink = params.has_sinks != 0u && split == 0u && lane == 0u;
        row_max[{r}] = select(NO_MAX, row_data[params.batch + params.q_heads + head] * params.score_unit, sink);
        row_sum[{r}] = select(0.0, 1.0, sink);
        row_slope[{r}] = row_data[params.batch + head] * params.score_unit;
        let diagonal = length - i32(params.tokens) + i32(token);
        row_diag[{r}] = diagonal;
        var first = 0;
        if params.window != 0xffffffffu {
            first = max(diagonal - i32(params.window), 0);
        }
        let keys = select(vec2<u32>(0u), vec2<u32>(u32(first), u32(max(diagonal + 1, 0))), valid);
        row_keys[{r}] = keys;
        if keys.x < keys.y {
            begin = min(begin, keys.x);
            end = max(end, keys.y);
        }
    }
//#end

    let sigmoid_bias = row_data[batch];
    let split_begin = split * params.keys_per_split;
    let lo = max(begin, split_begin);
    let hi = min(end, split_begin + params.keys_per_split);
    for (var j = lo + lane; j < hi; j += LANES) {
        let key_row = cache_row(batch, kv_head, j);
        // q·k for every row from one read of the key: four partial sums per row (one per
        // vec4 lane), independent add chains.
        var dot = array<vec4<f32>, ROWS>();
//#unroll u KU
        {
            let ku = k_unit(key_row, {u});
//#unroll c KUQ
//#unroll r ROWS
            dot[{r}] = fma(q[{r} * D4 + {u} * KUQ + {c}], ku[{c}], dot[{r}]);
//#end
//#end
        }
//#end
        var p = array<f32, ROWS>();
        var alpha = array<f32, ROWS>();
//#unroll r ROWS
        {
            var x = (dot[{r}].x + dot[{r}].y) + (dot[{r}].z + dot[{r}].w);
            if params.softcap > 0.0 {
                x = params.softcap * tanh_f32(x / params.softcap);
            }
            x -= row_slope[{r}] * f32(abs(i32(j) - row_diag[{r}]));
            let s = kept_score(x, j >= row_keys[{r}].x && j < row_keys[{r}].y);
            if SIGMOID {
                alpha[{r}] = 1.0;
                p[{r}] = kept_weight(s, 0.0, sigmoid_bias);
            } else {
                let new_max = max(row_max[{r}], s);
                alpha[{r}] = exp2(row_max[{r}] - new_max);
                p[{r}] = kept_weight(s, new_max, 0.0);
                row_sum[{r}] = row_sum[{r}] * alpha[{r}] + p[{r}];
                row_max[{r}] = new_max;
            }
        }
//#end
//#unroll u VU
        {
            let vu = v_unit(key_row, {u});
//#unroll c VUQ
//#unroll r ROWS
            o[{r} * DV4 + {u} * VUQ + {c}] = fma(vec4<f32>(p[{r}]), vu[{c}], o[{r} * DV4 + {u} * VUQ + {c}] * alpha[{r}]);
//#end
//#end
        }
//#end
    }

    let part = split * LANES + lane;
//#unroll r ROWS
    {
        let row = block_row0 + {r};
        if row < group_rows {
            let head = kv_head * params.group + row / params.tokens;
            let token = row % params.tokens;
            let base = part * params.part_elems + batch * params.o_stride.x + head * params.o_stride.y
                + token * params.o_stride.z;
            let seen = seen_any(row_sum[{r}]);
            let inv = select(select(0.0, 1.0 / row_sum[{r}], seen), 1.0, SIGMOID);
//#unroll e DV4
            store_partial4(base, {e} * 4u, o[{r} * DV4 + {e}] * inv);
//#end
            let lse_row = (batch * params.q_heads + head) * params.tokens + token;
            partial_lse[part * params.part_rows + lse_row] =
                select(neg_inf(), (row_max[{r}] + log2(row_sum[{r}])) * LN_2, seen);
        }
    }
//#end
}

// Elements [start, start + 4) of the query row at `base`, zero past HEAD_DIM or when `valid`
// is false.
fn load_q4(valid: bool, base: u32, start: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    if valid {
        for (var c = 0u; c < 4u; c++) {
            if start + c < HEAD_DIM {
                x[c] = load_q(base + start + c);
            }
        }
    }
    return x;
}

// Elements [start, start + 4) of a partial output row at `base`, those below VALUE_DIM.
fn store_partial4(base: u32, start: u32, x: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        if start + c < VALUE_DIM {
            partial_o[base + start + c] = x[c];
        }
    }
}

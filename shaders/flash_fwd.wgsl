// FlashAttention-2 forward (Algorithm 1) for softmax attention.
//
// A workgroup owns BLOCK_M query rows of one (batch, query head) and one slice of at most
// VALUE_SLICE output columns; each invocation owns one row, so the running max and sum never
// need a cross-invocation reduction (FA2's split-Q principle). Private arrays stay small (at most
// 64 floats each): large dynamically indexed private arrays are miscompiled by llvmpipe (Mesa
// 22.3; see docs/PERF.md), and on GPUs they would spill. So the query row is consumed in chunks of
// Q_CHUNK, and value dims above VALUE_SLICE are split across workgroups that each recompute the
// scores (the price is recomputing Q·Kᵀ once per extra slice).
// K/V tiles of BLOCK_N keys are staged through workgroup memory as vec4<f32> rows (zero-padded to
// a multiple of 4). Scores are kept in
// log2 units: Q is pre-multiplied by scale·log2(e) so each probability is one exp2. The output
// is divided by the row sum once, at the end, and the natural-log LSE of every row is written.
//
// Score modifiers go through modified_score (flash_common.wgsl); the bias and key mask are
// read from textures (`bias4` / `key_mask4`, zeros when absent).
//
// Dispatch: (ceil(longest q_len / BLOCK_M) · value_slices, q_heads, batch elements or sequences).
//
// Bindings (group 0):
//   0 params  uniform Params
//   1 q_buf   Q, 2 k_buf K, 3 v_buf V   (storage type chosen by the host prelude)
//   4 o_buf   O, same storage type
//   5 lse_buf LSE, f32 [batch, q_heads, q_len]
//
// The host prepends a prelude that defines the storage bindings 1-4 with their accessors
// load_q / load_k / load_v / store_o (f32, native f16, or f16/bf16 packed in u32 words), and
//   BLOCK_N   keys per K/V tile (a const: it sizes the private score array).
//
// llvmpipe (Mesa 22.3) stops every loop of an invocation once 65535 loop iterations have run in
// total (its "loop limiter" is shared by all loops and never reset). So every inner loop here has
// a small compile-time trip count that the compiler unrolls (at most 16 vec4 steps), and only
// loops over keys remain: the kernel stays correct up to roughly 20k keys per row on llvmpipe.
//
// Override constants:
//   BLOCK_M    query rows per workgroup (= workgroup size)
//   HEAD_DIM   length of q and k rows
//   VALUE_DIM  length of v and o rows
//   VALUE_SLICE output columns per workgroup (min(VALUE_DIM, 64))
//   CAUSAL     mask keys right of the diagonal (see visible_keys in flash_common.wgsl); with a
//              window, skip key tiles that no row of the block sees

//#import common/flash_common.wgsl

override BLOCK_M: u32 = 64u;
override HEAD_DIM: u32 = 64u;
override VALUE_DIM: u32 = 64u;
override VALUE_SLICE: u32 = 64u;
override CAUSAL: bool = false;

@group(0) @binding({binding.lse}) var<storage, read_write> lse_buf: array<f32>;

// Row lengths in vec4 units.
override HEAD_VEC4: u32 = (HEAD_DIM + 3u) / 4u;
override SLICE_VEC4: u32 = (VALUE_SLICE + 3u) / 4u;

var<workgroup> k_tile: array<vec4<f32>, BLOCK_N * HEAD_VEC4>;
var<workgroup> v_tile: array<vec4<f32>, BLOCK_N * SLICE_VEC4>;

// vec4 steps of the query row held in registers at once (64 floats).
const CHUNK_VEC4: u32 = 16u;
// Output accumulators, column-major so the invocations of a row block touch adjacent words.
var<workgroup> acc: array<f32, VALUE_SLICE * BLOCK_M>;
// This workgroup's sequence, read once and made uniform for the barriers in the key loop.
var<workgroup> wg_seq: Sequence;


@compute @workgroup_size(BLOCK_M)
fn flash_fwd(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let value_slices = (VALUE_DIM + VALUE_SLICE - 1u) / VALUE_SLICE;
    let query_tile = wg.x / value_slices;
    let v0 = (wg.x % value_slices) * VALUE_SLICE;
    let v_len = min(VALUE_SLICE, VALUE_DIM - v0);
    let head = wg.y;
    let batch = wg.z;
    if lid == 0u {
        wg_seq = sequences[batch];
    }
    let seq = workgroupUniformLoad(&wg_seq);
    let kv_head = head / (params.q_heads / params.kv_heads);
    let block_row0 = query_tile * BLOCK_M;
    let row = block_row0 + lid;
    let row_valid = row < seq.q_len;

    let q_base = batch * params.q_stride.x + head * params.q_stride.y + (seq.q_offset + row) * params.q_stride.z;
    let k_base = batch * params.k_stride.x + kv_head * params.k_stride.y + seq.kv_offset * params.k_stride.z;
    let v_base = batch * params.v_stride.x + kv_head * params.v_stride.y + seq.kv_offset * params.v_stride.z + v0;
    let q_scale = select(0.0, row_q_scale(row_index(seq, batch, head, row)), row_valid);
    let slope = alibi_slope(head);
    let diag = i32(row) + seq.diag_offset;
    let bias_row = batch * params.bias_batch_rows + head * params.bias_head_rows + row;

    // When the whole query row fits in one chunk it is loaded once, else chunk by chunk per tile.
    var q = array<vec4<f32>, CHUNK_VEC4>();
    if HEAD_VEC4 <= CHUNK_VEC4 {
        q = load_q_chunk(row_valid, q_base, 0u, q_scale);
    }
    var acc = array<vec4<f32>, CHUNK_VEC4>();
    let start = softmax_start(head);
    var row_max = start.x;
    var row_sum = start.y;

    // Keys outside [kv_begin, kv_end) are invisible to every row of this block (causal mask,
    // window, key mask span): their tiles are never loaded. Visible ranges only move right as
    // rows grow. A block past the sequence's rows loads nothing.
    var kv_begin = 0u;
    var kv_end = 0u;
    if block_row0 < seq.q_len {
        let last_row = min(block_row0 + BLOCK_M, seq.q_len) - 1u;
        kv_begin = visible_keys(seq, block_row0).x / BLOCK_N * BLOCK_N;
        kv_end = visible_keys(seq, last_row).y;
    }
    // This row's own visible keys, for the per-element mask.
    let row_keys = select(vec2<u32>(0u), visible_keys(seq, row), row_valid);

    var s = array<f32, BLOCK_N>();
    for (var key0 = kv_begin; key0 < kv_end; key0 += BLOCK_N) {
        // Stage the K tile and this slice of the V tile; elements past kv_len or past the row
        // length are zero so every lane does the same work.
        workgroupBarrier();
        for (var i = lid; i < BLOCK_N * HEAD_VEC4; i += BLOCK_M) {
            let key = key0 + i / HEAD_VEC4;
            let d = (i % HEAD_VEC4) * 4u;
            k_tile[i] = load_row4(key < seq.kv_len, k_base + key * params.k_stride.z, d, HEAD_DIM, 0u);
        }
        for (var i = lid; i < BLOCK_N * SLICE_VEC4; i += BLOCK_M) {
            let key = key0 + i / SLICE_VEC4;
            let e = (i % SLICE_VEC4) * 4u;
            v_tile[i] = load_row4(key < seq.kv_len, v_base + key * params.v_stride.z, e, v_len, 1u);
        }
        workgroupBarrier();

        // Base-2 logits of this tile, accumulated over chunks of the query row.
        for (var j = 0u; j < BLOCK_N; j++) {
            s[j] = 0.0;
        }
        for (var c0 = 0u; c0 < HEAD_VEC4; c0 += CHUNK_VEC4) {
            if HEAD_VEC4 > CHUNK_VEC4 {
                q = load_q_chunk(row_valid, q_base, c0 * 4u, q_scale);
            }
            for (var j = 0u; j < BLOCK_N; j++) {
                var dot = vec4<f32>(0.0);
                for (var c = 0u; c < CHUNK_VEC4; c++) {
                    if c0 + c < HEAD_VEC4 {
                        dot = fma(q[c], k_tile[j * HEAD_VEC4 + c0 + c], dot);
                    }
                }
                s[j] += (dot.x + dot.y) + (dot.z + dot.w);
            }
        }
        // Modifiers; invisible keys get NO_MAX and are excluded below.
        var tile_max = NO_MAX;
        for (var j = 0u; j < BLOCK_N; j++) {
            let key = key0 + j;
            let additive = key_mask4(batch, key & ~3u)[key & 3u] + bias4(bias_row, key & ~3u)[key & 3u];
            let x = modified_score(s[j], key, diag, slope, additive);
            s[j] = kept_score(x, key >= row_keys.x && key < row_keys.y);
            tile_max = max(tile_max, s[j]);
        }

        // Online softmax: rescale what has been accumulated so far to the new running max.
        // (Sigmoid keeps no max: alpha folds to 1.)
        let new_max = select(max(row_max, tile_max), NO_MAX, SIGMOID);
        let alpha = select(exp2(row_max - new_max), 1.0, SIGMOID);
        row_max = new_max;
        row_sum *= alpha;
        for (var c = 0u; c < CHUNK_VEC4; c++) {
            acc[c] *= alpha;
        }
        for (var j = 0u; j < BLOCK_N; j++) {
            let p = kept_weight(s[j], new_max, seq.sigmoid_bias);
            row_sum += p;
            for (var c = 0u; c < CHUNK_VEC4; c++) {
                if c < SLICE_VEC4 {
                    acc[c] = fma(vec4<f32>(p), v_tile[j * SLICE_VEC4 + c], acc[c]);
                }
            }
        }
    }

    // The only division, once per row (softmax). A row that saw no key has row_sum 0: O = 0,
    // LSE = -inf (a NaN row_sum is "seen": NaN reaches O and the LSE). Sigmoid is
    // unnormalised and has no LSE.
    if row_valid {
        let seen = seen_any(row_sum);
        let inv_sum = select(select(0.0, 1.0 / row_sum, seen), 1.0, SIGMOID);
        let o_base = batch * params.o_stride.x + head * params.o_stride.y + (seq.q_offset + row) * params.o_stride.z + v0;
        for (var c = 0u; c < CHUNK_VEC4; c++) {
            let out = acc[c] * inv_sum;
            for (var k = 0u; k < 4u; k++) {
                if c * 4u + k < v_len {
                    store_o(o_base + c * 4u + k, out[k]);
                }
            }
        }
        if v0 == 0u && !SIGMOID {
            lse_buf[row_index(seq, batch, head, row)] = select(neg_inf(), (row_max + log2(row_sum)) * LN_2, seen);
        }
    }
}

// Elements [start, start + 4) of a row at `base` (zero past `len` or when `valid` is false),
// from tensor 0 (K) or 1 (V).
fn load_row4(valid: bool, base: u32, start: u32, len: u32, tensor: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    if valid {
        for (var k = 0u; k < 4u; k++) {
            if start + k < len {
                x[k] = select(load_k(base + start + k), load_v(base + start + k), tensor == 1u);
            }
        }
    }
    return x;
}

// CHUNK_VEC4 vec4 steps of this invocation's query row from element `start`, times `scale`.
fn load_q_chunk(valid: bool, base: u32, start: u32, scale: f32) -> array<vec4<f32>, CHUNK_VEC4> {
    var q = array<vec4<f32>, CHUNK_VEC4>();
    if valid {
        for (var c = 0u; c < CHUNK_VEC4; c++) {
            for (var k = 0u; k < 4u; k++) {
                let d = start + c * 4u + k;
                if d < HEAD_DIM {
                    q[c][k] = load_q(base + d) * scale;
                }
            }
        }
    }
    return q;
}

// FlashAttention-2 forward (Algorithm 1) for softmax attention.
//
// A workgroup owns BLOCK_M query rows of one (batch, query head); each invocation owns one row,
// so the running max and sum never need a cross-invocation reduction (FA2's split-Q principle).
// K/V tiles of BLOCK_N keys are staged through workgroup memory as f32. Scores are kept in
// log2 units: Q is pre-multiplied by scale·log2(e) so each probability is one exp2. The output
// is divided by the row sum once, at the end, and the natural-log LSE of every row is written.
//
// Dispatch: (ceil(q_len / BLOCK_M), q_heads, batch).
//
// Bindings (group 0):
//   0 params  uniform Params
//   1 q_buf   Q, 2 k_buf K, 3 v_buf V   (storage type chosen by the host prelude)
//   4 o_buf   O, same storage type
//   5 lse_buf LSE, f32 [batch, q_heads, q_len]
//
// The host prepends a prelude that defines the storage bindings 1-4 with their accessors
// load_q / load_k / load_v / store_o (f32, native f16, or f16/bf16 packed in u32 words), and
// the constants that size private arrays, which WGSL requires to be const:
//   BLOCK_N        keys per K/V tile
//   HEAD_DIM_CAP   capacity of the private query row (>= HEAD_DIM)
//   VALUE_DIM_CAP  capacity of the private output accumulator (>= VALUE_DIM)
//
// Override constants:
//   BLOCK_M    query rows per workgroup (= workgroup size)
//   HEAD_DIM   length of q and k rows
//   VALUE_DIM  length of v and o rows
//   CAUSAL     mask keys j > i + causal_offset, and skip key tiles that no row of the block sees

override BLOCK_M: u32 = 64u;
override HEAD_DIM: u32 = 64u;
override VALUE_DIM: u32 = 64u;
override CAUSAL: bool = false;

// Element offsets are (batch, head, seq) strides; the innermost dimension is contiguous.
// This one struct covers both layouts (BHSD and BSHD) without a shader variant.
struct Params {
    q_heads: u32,
    kv_heads: u32,
    q_len: u32,
    kv_len: u32,
    q_stride: vec4<u32>,
    k_stride: vec4<u32>,
    v_stride: vec4<u32>,
    o_stride: vec4<u32>,
    // Key j is visible to query i iff j <= i + causal_offset (bottom-right: kv_len - q_len; top-left: 0).
    causal_offset: i32,
    // scale · log2(e): turns q·k into a base-2 logit.
    scale_log2: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(5) var<storage, read_write> lse_buf: array<f32>;

var<workgroup> k_tile: array<f32, BLOCK_N * HEAD_DIM>;
var<workgroup> v_tile: array<f32, BLOCK_N * VALUE_DIM>;

// Lower than any finite logit: marks "no visible key yet" without computing with infinities,
// which fast-math compilers (llvmpipe among them) may not honour.
const NO_MAX: f32 = -3.0e38;
const LN_2: f32 = 0.6931471805599453;

@compute @workgroup_size(BLOCK_M)
fn flash_fwd(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let head = wg.y;
    let batch = wg.z;
    let kv_head = head / (params.q_heads / params.kv_heads);
    let block_row0 = wg.x * BLOCK_M;
    let row = block_row0 + lid;
    let row_valid = row < params.q_len;

    let q_base = batch * params.q_stride.x + head * params.q_stride.y + row * params.q_stride.z;
    let k_base = batch * params.k_stride.x + kv_head * params.k_stride.y;
    let v_base = batch * params.v_stride.x + kv_head * params.v_stride.y;

    var q: array<f32, HEAD_DIM_CAP>;
    if row_valid {
        for (var d = 0u; d < HEAD_DIM; d++) {
            q[d] = load_q(q_base + d) * params.scale_log2;
        }
    }
    var acc: array<f32, VALUE_DIM_CAP>;
    for (var e = 0u; e < VALUE_DIM; e++) {
        acc[e] = 0.0;
    }
    var row_max = NO_MAX;
    var row_sum = 0.0;

    // Keys past kv_end are invisible to every row of this block: their tiles are never loaded.
    var kv_end = params.kv_len;
    if CAUSAL {
        let last_row = min(block_row0 + BLOCK_M, params.q_len) - 1u;
        kv_end = u32(clamp(i32(last_row) + params.causal_offset + 1, 0, i32(params.kv_len)));
    }
    // This row's own last visible key (exclusive), for the per-element mask.
    var row_end = params.kv_len;
    if CAUSAL {
        row_end = u32(clamp(i32(row) + params.causal_offset + 1, 0, i32(params.kv_len)));
    }

    var s: array<f32, BLOCK_N>;
    for (var key0 = 0u; key0 < kv_end; key0 += BLOCK_N) {
        // Stage the K and V tiles; keys past kv_len are zero so every lane does the same work.
        workgroupBarrier();
        for (var i = lid; i < BLOCK_N * HEAD_DIM; i += BLOCK_M) {
            let key = key0 + i / HEAD_DIM;
            var x = 0.0;
            if key < params.kv_len {
                x = load_k(k_base + key * params.k_stride.z + i % HEAD_DIM);
            }
            k_tile[i] = x;
        }
        for (var i = lid; i < BLOCK_N * VALUE_DIM; i += BLOCK_M) {
            let key = key0 + i / VALUE_DIM;
            var x = 0.0;
            if key < params.kv_len {
                x = load_v(v_base + key * params.v_stride.z + i % VALUE_DIM);
            }
            v_tile[i] = x;
        }
        workgroupBarrier();

        // Base-2 logits of this tile; invisible keys get NO_MAX and are excluded below.
        var tile_max = NO_MAX;
        for (var j = 0u; j < BLOCK_N; j++) {
            var dot = 0.0;
            for (var d = 0u; d < HEAD_DIM; d++) {
                dot = fma(q[d], k_tile[j * HEAD_DIM + d], dot);
            }
            let visible = key0 + j < row_end;
            s[j] = select(NO_MAX, dot, visible);
            tile_max = max(tile_max, s[j]);
        }

        // Online softmax: rescale what has been accumulated so far to the new running max.
        let new_max = max(row_max, tile_max);
        let alpha = exp2(row_max - new_max);
        row_max = new_max;
        row_sum *= alpha;
        for (var e = 0u; e < VALUE_DIM; e++) {
            acc[e] *= alpha;
        }
        for (var j = 0u; j < BLOCK_N; j++) {
            let p = select(0.0, exp2(s[j] - new_max), s[j] > NO_MAX);
            row_sum += p;
            for (var e = 0u; e < VALUE_DIM; e++) {
                acc[e] = fma(p, v_tile[j * VALUE_DIM + e], acc[e]);
            }
        }
    }

    if !row_valid {
        return;
    }
    // The only division, once per row. A row that saw no key has row_sum 0: O = 0, LSE = -inf.
    let seen = row_sum > 0.0;
    let inv_sum = select(0.0, 1.0 / row_sum, seen);
    let o_base = batch * params.o_stride.x + head * params.o_stride.y + row * params.o_stride.z;
    for (var e = 0u; e < VALUE_DIM; e++) {
        store_o(o_base + e, acc[e] * inv_sum);
    }
    let lse_index = (batch * params.q_heads + head) * params.q_len + row;
    lse_buf[lse_index] = select(bitcast<f32>(0xff800000u), (row_max + log2(row_sum)) * LN_2, seen);
}

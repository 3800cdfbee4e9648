// Decoding against a KV cache (FlashDecoding): a few new query tokens per sequence attend to
// the sequence's cached keys, split across workgroups so a long cache keeps the whole device
// busy; each split writes a partial output and LSE that merge.wgsl combines.
//
// The cache holds K `[batch, kv_heads, capacity, HEAD_DIM]` and V `[.., VALUE_DIM]` in the
// element type, or (PAGED) a pool `[blocks, block_size, kv_heads, dim]` that block tables map
// tokens into (`cache_row`); `lengths[b]` tokens of sequence b are valid.
//
//   decode_append: writes `tokens` new tokens of K or V (in their layout) at each sequence's
//                  length, one invocation per element.
//   decode_split:  workgroup (split, kv_head · row_blocks, batch). GQA folding: the rows of a
//                  workgroup are the query tokens of every query head that shares its kv head,
//                  so each key of the split is read by one workgroup only. The 64 invocations
//                  are rows × lanes: lane l takes the split's keys l, l + lanes, ..., and writes
//                  a partial of its own (partial split · lanes + l), which saves combining
//                  lanes in workgroup memory: the merge does it, exactly.
//
// Masking: bottom-right causal (query t of n sees keys j <= length - n + t), which is what a
// cache holding the new tokens needs, and an optional trailing window; scores optionally
// soft-capped (Gemma 2). A partial that sees no key writes LSE −∞.
//
// Host prelude: HEAD_DIM, VALUE_DIM, PAGED; `load_q` (binding q), `load_k`, `load_v` (the cache),
// `load_new` and `store_cache` (append) for the storage type.

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
    // Rows of one workgroup (≤ 64), lanes per row (64 / rows), row blocks per kv head.
    rows: u32,
    lanes: u32,
    row_blocks: u32,
    scale: f32,
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
    // Soft-capping of the scores, cap · tanh(s / cap) (0: none).
    softcap: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding({binding.params}) var<uniform> params: DecodeParams;
@group(0) @binding({binding.decode_lengths}) var<storage, read> lengths: array<u32>;
// A paged cache's block tables, [batch, table_width] (a contiguous cache binds a word).
@group(0) @binding({binding.decode_blocks}) var<storage, read> blocks: array<u32>;
@group(0) @binding({binding.decode_partial_o}) var<storage, read_write> partial_o: array<f32>;
@group(0) @binding({binding.decode_partial_lse}) var<storage, read_write> partial_lse: array<f32>;

const NEG_INF_BITS: u32 = 0xff800000u;

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

@compute @workgroup_size(64)
fn decode_split(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let split = wg.x;
    let kv_head = wg.y / params.row_blocks;
    let block = wg.y % params.row_blocks;
    let batch = wg.z;
    let lane = lid / params.rows;
    let row = block * params.rows + lid % params.rows;
    if lane >= params.lanes || row >= params.group * params.tokens {
        return;
    }
    let head = kv_head * params.group + row / params.tokens;
    let token = row % params.tokens;
    let length = lengths[batch];
    // Keys this query sees: j <= its diagonal length - tokens + token (bottom-right causal),
    // and with a window j >= diagonal - window.
    let diagonal = i32(length) - i32(params.tokens) + i32(token);
    let visible = max(diagonal + 1, 0);
    var first = 0;
    if params.window != 0xffffffffu {
        first = max(diagonal - i32(params.window), 0);
    }
    let start = max(split * params.keys_per_split, u32(first));
    let end = min(split * params.keys_per_split + params.keys_per_split, u32(visible));

    var q: array<f32, HEAD_DIM>;
    let q_base = batch * params.q_stride.x + head * params.q_stride.y + token * params.q_stride.z;
    for (var d = 0u; d < HEAD_DIM; d++) {
        q[d] = load_q(q_base + d) * params.scale;
    }
    var o: array<f32, VALUE_DIM>;
    var m = bitcast<f32>(NEG_INF_BITS);
    var l = 0.0;
    for (var j = start + lane; j < end; j += params.lanes) {
        let key_row = cache_row(batch, kv_head, j);
        let k_base = key_row * HEAD_DIM;
        var s = 0.0;
        for (var d = 0u; d < HEAD_DIM; d++) {
            s += q[d] * load_k(k_base + d);
        }
        if params.softcap > 0.0 {
            s = params.softcap * tanh(s / params.softcap);
        }
        let m_new = max(m, s);
        // exp(−∞) on llvmpipe is a clamped tiny number, not 0: the first key resets instead.
        let correction = select(exp(m - m_new), 0.0, bitcast<u32>(m) == NEG_INF_BITS);
        let p = exp(s - m_new);
        l = l * correction + p;
        let v_base = key_row * VALUE_DIM;
        for (var d = 0u; d < VALUE_DIM; d++) {
            o[d] = o[d] * correction + p * load_v(v_base + d);
        }
        m = m_new;
    }
    let part = split * params.lanes + lane;
    let o_base = part * params.part_elems + batch * params.o_stride.x + head * params.o_stride.y
        + token * params.o_stride.z;
    let seen = l > 0.0;
    let inv = select(0.0, 1.0 / l, seen);
    for (var d = 0u; d < VALUE_DIM; d++) {
        partial_o[o_base + d] = o[d] * inv;
    }
    let lse_row = (batch * params.q_heads + head) * params.tokens + token;
    partial_lse[part * params.part_rows + lse_row] = select(bitcast<f32>(NEG_INF_BITS), m + log(l), seen);
}

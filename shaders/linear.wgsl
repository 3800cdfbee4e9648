// Linear attention (TransNormer / Lightning Attention-2): O = scale · φ(Q) · state, in time
// linear in the sequence length. Semantics: wflash-ref's `linear` module (the f64 definition).
//
// Causal, with per-head decay λ (1 without), initial state S0 and optional normaliser z:
//     S_i = λ S_{i-1} + φ(k_i) v_iᵀ,  z_i = λ z_{i-1} + φ(k_i),  S_{-1} = S0, z_{-1} = z0
//     o_i = scale · φ(q_i)ᵀ S_i   [ / (scale · φ(q_i)·z_i + eps) ]
// Non-causal: S = Σ φ(k_j) v_jᵀ, z = Σ φ(k_j), every row reads the full S and z.
//
// Two algorithms, one file:
//   - Chunked (Lightning Attention-2, as three parallel passes in the style of
//     flash-linear-attention's chunk kernels): tokens fall in chunks of `params.chunk`.
//       1. linear_chunk_state  (parallel over chunks): each chunk's own decayed sum
//          ΔS_t = Σ_{j in t} λ^{end-1-j} φ(k_j) v_jᵀ;
//       2. linear_chunk_prefix (sequential over chunks, parallel over state columns): the
//          state before each chunk, S_before[t+1] = λ^{len_t} S_before[t] + ΔS_t, from S0;
//          the last one is the final state;
//       3. linear_chunk_output (parallel over tokens): o_i = scale · (Σ_{start<=j<=i}
//          λ^{i-j} φ(q_i)·φ(k_j) v_j + λ^{i-start+1} φ(q_i)ᵀ S_before[t]), the intra-chunk
//          quadratic part plus the carried state. Non-causal: no intra part, S = the total.
//     The normaliser z rides along as one more state column whose value is 1.
//   - Recurrent (linear_recurrent): one invocation per value column walks the tokens in order,
//     updating its column of S (and z) and writing o_i. One dispatch: for decoding a token or
//     a few, where the chunked passes would be mostly overhead.
//
// On CPU adapters a storage-buffer load in a loop costs ten texel loads (docs/PERF.md), so the
// chunked passes read K, V (packed by pack_rows.wgsl) and the per-chunk states (copied from
// `chunk_states`) from read-only rgba32float storage textures (whose loads llvmpipe inlines,
// where a sampled texture's fetch is a function call); inner loops over dims are written out by the host
// (`//#unroll`, kernel.rs).
//
// Host prelude: KEY_DIM, VALUE_DIM, D4 = ceil(KEY_DIM / 4), DV4, ROWS (pass 3's rows per
// invocation), FEATURE (0 identity, 1 elu+1, 2 relu), NORMALIZE, storage bindings 1 (`load_q`), 12 (`load_k`), 13 (`load_v`) and 4
// (`store_o`) for the tensors' storage type.

struct LinearParams {
    // (batch, head, seq, 1) element strides of Q, K, V and O.
    q_stride: vec4<u32>,
    k_stride: vec4<u32>,
    v_stride: vec4<u32>,
    o_stride: vec4<u32>,
    q_heads: u32,
    // Query heads per kv head (GQA).
    group: u32,
    len: u32,
    chunk: u32,
    chunks: u32,
    // State columns: VALUE_DIM, plus one for z when normalising.
    columns: u32,
    // Floats per row of `chunk_states` (a multiple of 64: the texture copy needs 256 B rows).
    pitch: u32,
    // Packed K/V rows per kv head and per texture line (pack_rows.wgsl).
    tex_rows_per_head: u32,
    tex_fold: u32,
    // `chunk_states` rows per line of the state texture.
    state_fold: u32,
    scale: f32,
    eps: f32,
    // Bit 0: an initial kv state is bound; bit 1: an initial z.
    has_initial: u32,
    causal: u32,
    // Entries per head of decay_powers.
    decay_stride: u32,
    // The chunk passes' heads: head_base .. head_base + state_heads (a call whose per-chunk
    // states would not fit one binding runs them in groups of heads; one group otherwise).
    head_base: u32,
    state_heads: u32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
}

@group(0) @binding({binding.params}) var<uniform> params: LinearParams;
@group(0) @binding({binding.k}) var k_tex: texture_storage_2d<rgba32float, read>;
@group(0) @binding({binding.v}) var v_tex: texture_storage_2d<rgba32float, read>;
// λ_h^n for n in 0..decay_stride, per query head h (all 1 without decay): computed on the host
// in f64, because a shader's exp2(n · log2 λ) is off by up to n · 2^-21 in the exponent
// (Vulkan's log2 precision near 1), far more than one rounding.
@group(0) @binding({binding.decay_powers}) var<storage, read> decay_powers: array<f32>;
// [batch · q_heads, chunks + 1, KEY_DIM, pitch / 4] texels of 4 columns: ΔS_t from pass 1,
// S_before[t] after pass 2.
@group(0) @binding({binding.chunk_states}) var<storage, read_write> chunk_states: array<vec4<f32>>;
// Initial and final states: kv [batch, q_heads, KEY_DIM, VALUE_DIM], z [batch, q_heads, KEY_DIM].
@group(0) @binding({binding.kv_in}) var<storage, read> kv_in: array<f32>;
@group(0) @binding({binding.z_in}) var<storage, read> z_in: array<f32>;
@group(0) @binding({binding.kv_out}) var<storage, read_write> kv_out: array<f32>;
@group(0) @binding({binding.z_out}) var<storage, read_write> z_out: array<f32>;
// `chunk_states` after pass 2, as texels: row r at ((r % state_fold) · pitch / 4, r / state_fold).
@group(0) @binding({binding.state_texture}) var state_tex: texture_storage_2d<rgba32float, read>;

const WORKGROUP: u32 = 64u;

fn phi(x: vec4<f32>) -> vec4<f32> {
    if FEATURE == 1u {
        // elu(x) + 1; exp of a large x may be inf, but select never takes it.
        return select(exp(x), x + 1.0, x > vec4<f32>(0.0));
    }
    if FEATURE == 2u {
        return max(x, vec4<f32>(0.0));
    }
    return x;
}

// φ of elements [4·d4, 4·d4 + 4) of a key or query row; 0 past KEY_DIM, where the row's
// padding zeros would otherwise become φ(0) (1 for elu + 1).
fn phi_at(x: vec4<f32>, d4: u32) -> vec4<f32> {
    let index = vec4<u32>(0u, 1u, 2u, 3u) + d4 * 4u;
    return select(vec4<f32>(0.0), phi(x), index < vec4<u32>(KEY_DIM));
}

// λ_head^n, n < decay_stride.
fn decay_pow(head: u32, n: u32) -> f32 {
    return decay_powers[head * params.decay_stride + n];
}

// Texel `d4` of packed row `row` of the K or V texture (pack_rows.wgsl). Two functions, since
// a storage texture passed as an argument does not translate to every backend (naga's MSL).
fn packed_k(row: u32, width4: u32, d4: u32) -> vec4<f32> {
    return textureLoad(k_tex, packed_texel(row, width4, d4));
}

fn packed_v(row: u32, width4: u32, d4: u32) -> vec4<f32> {
    return textureLoad(v_tex, packed_texel(row, width4, d4));
}

fn packed_texel(row: u32, width4: u32, d4: u32) -> vec2<u32> {
    return vec2<u32>((row % params.tex_fold) * width4 + d4, row / params.tex_fold);
}

// The packed row of token `token` of kv head `kv_head` of batch element `batch`: the packed
// textures hold the kv heads of this group of heads (params.head_base / params.group ..).
fn kv_row(batch: u32, kv_head: u32, token: u32) -> u32 {
    let group_kv_heads = params.state_heads / params.group;
    let local = kv_head - params.head_base / params.group;
    return (batch * group_kv_heads + local) * params.tex_rows_per_head + token;
}

// The first float of row `d` of slot `slot` of (batch, head) in chunk_states, which holds the
// heads of this group (params.head_base ..).
fn state_row(batch: u32, head: u32, slot: u32, d: u32) -> u32 {
    let bh = batch * params.state_heads + head - params.head_base;
    return (bh * (params.chunks + 1u) + slot) * KEY_DIM + d;
}

// Column `c` of the initial state (z when c == VALUE_DIM), element d of KEY_DIM.
// has_initial: bit 0 an initial kv state, bit 1 an initial z (each zero when absent).
fn initial(bh: u32, d: u32, c: u32) -> f32 {
    if d >= KEY_DIM {
        return 0.0;
    }
    if c == VALUE_DIM {
        if (params.has_initial & 2u) == 0u {
            return 0.0;
        }
        return z_in[bh * KEY_DIM + d];
    }
    if (params.has_initial & 1u) == 0u {
        return 0.0;
    }
    return kv_in[(bh * KEY_DIM + d) * VALUE_DIM + c];
}

// Pass 1: ΔS_t for chunk t, four state columns (4·c4 ..) per invocation, so each fetched key
// texel feeds four columns. Dispatch (chunks · ceil(column groups / 64), the group's heads, batch).
@compute @workgroup_size(WORKGROUP)
fn linear_chunk_state(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let groups = (params.columns + 3u) / 4u;
    let wg_per_chunk = (groups + WORKGROUP - 1u) / WORKGROUP;
    let t = wg.x / wg_per_chunk;
    let c4 = (wg.x % wg_per_chunk) * WORKGROUP + lid;
    if c4 >= groups || t >= params.chunks {
        return;
    }
    let head = wg.y + params.head_base;
    let batch = wg.z;
    let start = t * params.chunk;
    let end = min(start + params.chunk, params.len);
    let k_width4 = (KEY_DIM + 3u) / 4u;
    let v_width4 = (VALUE_DIM + 3u) / 4u;
    // Row d of this invocation's 4 columns is s[d].
    var s = array<vec4<f32>, D4 * 4u>();
//#unroll d D4
//#unroll x 4
    s[{d} * 4u + {x}] = vec4<f32>(0.0);
//#end
//#end
    for (var j = start; j < end; j++) {
        let row = kv_row(batch, head / params.group, j);
        var v = vec4<f32>(0.0);
        if c4 < v_width4 {
            v = packed_v(row, v_width4, c4);
        }
        // The z column's "value" is 1.
        if NORMALIZE && c4 == VALUE_DIM / 4u {
            v[VALUE_DIM % 4u] = 1.0;
        }
        // Decayed to the chunk's end: λ^(end - 1 - j).
        v *= decay_pow(head, end - 1u - j);
//#unroll d D4
        {
            let k = phi_at(packed_k(row, k_width4, {d}), {d});
//#unroll x 4
            s[{d} * 4u + {x}] += k[{x}] * v;
//#end
        }
//#end
    }
//#unroll d D4
//#unroll x 4
    if {d} * 4u + {x} < KEY_DIM {
        chunk_states[state_row(batch, head, t, {d} * 4u + {x}) * (params.pitch / 4u) + c4] = s[{d} * 4u + {x}];
    }
//#end
//#end
}

// Pass 2: S_before[t] for every chunk and the final state. One invocation per state row d and
// group of 4 columns: a scan over chunks of one vec4 (small code; llvmpipe compiles unrolled
// state rows slowly). Dispatch (ceil(KEY_DIM · column groups / 64), the group's heads, batch).
@compute @workgroup_size(WORKGROUP)
fn linear_chunk_prefix(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let groups = (params.columns + 3u) / 4u;
    let g = wg.x * WORKGROUP + lid;
    if g >= groups * KEY_DIM {
        return;
    }
    let c4 = g % groups;
    let d = g / groups;
    let head = wg.y + params.head_base;
    let batch = wg.z;
    let bh = batch * params.q_heads + head;
    let row4 = params.pitch / 4u;
    var s = initial4(bh, d, c4);
    for (var t = 0u; t < params.chunks; t++) {
        let carried = decay_pow(head, min(params.chunk, params.len - t * params.chunk));
        let at = state_row(batch, head, t, d) * row4 + c4;
        let own = chunk_states[at];
        chunk_states[at] = s;
        s = s * carried + own;
    }
    chunk_states[state_row(batch, head, params.chunks, d) * row4 + c4] = s;
    for (var y = 0u; y < 4u; y++) {
        let c = c4 * 4u + y;
        if c < VALUE_DIM {
            kv_out[(bh * KEY_DIM + d) * VALUE_DIM + c] = s[y];
        } else if NORMALIZE && c == VALUE_DIM {
            z_out[bh * KEY_DIM + d] = s[y];
        }
    }
}

// Columns 4·c4 .. 4·c4 + 4 of row d of the initial state (the z column at VALUE_DIM; zeros
// past it and without an initial state).
fn initial4(bh: u32, d: u32, c4: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var y = 0u; y < 4u; y++) {
        let c = c4 * 4u + y;
        if c <= VALUE_DIM {
            x[y] = initial(bh, d, c);
        }
    }
    return x;
}

// Texel e4 of row `d` of slot `slot` of the per-chunk states.
fn state_texel(batch: u32, head: u32, slot: u32, d: u32, e4: u32) -> vec4<f32> {
    let row = state_row(batch, head, slot, d);
    let x = (row % params.state_fold) * (params.pitch / 4u) + e4;
    return textureLoad(state_tex, vec2<u32>(x, row / params.state_fold));
}

// The unnormalised output rows (numerators) and denominators (without eps) of ROWS
// consecutive tokens from i0, all in one chunk: the intra-chunk quadratic part plus the
// carried state (see pass 3). Shared with the backward's readout pass (linear_bwd.wgsl).
struct OutputRows {
    o: array<vec4<f32>, ROWS * DV4>,
    den: array<f32, ROWS>,
}

fn output_rows(batch: u32, head: u32, i0: u32) -> OutputRows {
    let k_width4 = (KEY_DIM + 3u) / 4u;
    let v_width4 = (VALUE_DIM + 3u) / 4u;
    let causal = params.causal != 0u;
    let t = i0 / params.chunk;
    let start = t * params.chunk;
    // Row r is token i0 + r; rows past the end compute on the last token and are not stored.
    var q = array<vec4<f32>, ROWS * D4>();
    var o = array<vec4<f32>, ROWS * DV4>();
    var den = array<f32, ROWS>();
    var carried = array<f32, ROWS>();
//#unroll r ROWS
    {
        let i = min(i0 + {r}, params.len - 1u);
        let q_base = batch * params.q_stride.x + head * params.q_stride.y + i * params.q_stride.z;
//#unroll d D4
        q[{r} * D4 + {d}] = phi_at(load_q4(q_base, {d} * 4u), {d}) * params.scale;
//#end
//#unroll e DV4
        o[{r} * DV4 + {e}] = vec4<f32>(0.0);
//#end
        den[{r}] = 0.0;
        carried[{r}] = select(1.0, decay_pow(head, i - start + 1u), causal);
    }
//#end
    var slot = params.chunks;
    if causal {
        slot = t;
        // Keys of this chunk up to the last row; each row masks the keys after it.
        let last = min(i0 + ROWS, params.len);
        for (var j = start; j < last; j++) {
            let row = kv_row(batch, head / params.group, j);
            var k = array<vec4<f32>, D4>();
//#unroll d D4
            k[{d}] = phi_at(packed_k(row, k_width4, {d}), {d});
//#end
            var score = array<f32, ROWS>();
//#unroll r ROWS
            {
                var qk = 0.0;
//#unroll d D4
                qk += dot(q[{r} * D4 + {d}], k[{d}]);
//#end
                let i = i0 + {r};
                score[{r}] = select(0.0, qk * decay_pow(head, select(0u, i - j, j <= i)), j <= i);
                den[{r}] += score[{r}];
            }
//#end
//#unroll e DV4
            {
                let v = packed_v(row, v_width4, {e});
//#unroll r ROWS
                o[{r} * DV4 + {e}] += score[{r}] * v;
//#end
            }
//#end
        }
    }
    // The carried state: each row's q times S_before (KEY_DIM rows of the state texture). A
    // dynamic loop over d keeps the code small (llvmpipe compiles unrolled code slowly); the
    // price is ROWS dynamically indexed reads of q per d.
    let z4 = VALUE_DIM / 4u;
    let zx = VALUE_DIM % 4u;
    for (var d = 0u; d < KEY_DIM; d++) {
        var qd = array<f32, ROWS>();
//#unroll r ROWS
        qd[{r}] = q[{r} * D4 + d / 4u][d % 4u] * carried[{r}];
//#end
//#unroll e DV4
        {
            let s = state_texel(batch, head, slot, d, {e});
//#unroll r ROWS
            o[{r} * DV4 + {e}] += qd[{r}] * s;
//#end
        }
//#end
        if NORMALIZE {
            let z = state_texel(batch, head, slot, d, z4)[zx];
//#unroll r ROWS
            den[{r}] += qd[{r}] * z;
//#end
        }
    }
    return OutputRows(o, den);
}

// Pass 3: the output rows, ROWS consecutive tokens per invocation, all in one chunk (the chunk
// is a multiple of ROWS): every key, value and state texel fetched feeds ROWS rows.
// Dispatch (ceil(len / (64 · ROWS)), the group's heads, batch).
@compute @workgroup_size(WORKGROUP)
fn linear_chunk_output(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i0 = (wg.x * WORKGROUP + lid) * ROWS;
    if i0 >= params.len {
        return;
    }
    let head = wg.y + params.head_base;
    let batch = wg.z;
    let rows = output_rows(batch, head, i0);
//#unroll r ROWS
    if i0 + {r} < params.len {
        let o_base = batch * params.o_stride.x + head * params.o_stride.y + (i0 + {r}) * params.o_stride.z;
        let inv = select(1.0, 1.0 / (rows.den[{r}] + params.eps), NORMALIZE);
//#unroll e DV4
        store_o4(o_base, {e} * 4u, rows.o[{r} * DV4 + {e}] * inv);
//#end
    }
//#end
}

// The recurrence, one value column per invocation, every token in order. Dispatch
// (ceil(VALUE_DIM / 64), q_heads, batch).
@compute @workgroup_size(WORKGROUP)
fn linear_recurrent(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = wg.x * WORKGROUP + lid;
    if c >= VALUE_DIM {
        return;
    }
    let head = wg.y;
    let batch = wg.z;
    let bh = batch * params.q_heads + head;
    let kv_head = head / params.group;
    let lambda = decay_pow(head, 1u);
    var s = array<vec4<f32>, D4>();
    var z = array<vec4<f32>, D4>();
//#unroll d D4
    s[{d}] = vec4<f32>(initial(bh, {d} * 4u, c), initial(bh, {d} * 4u + 1u, c), initial(bh, {d} * 4u + 2u, c), initial(bh, {d} * 4u + 3u, c));
    z[{d}] = vec4<f32>(0.0);
    if NORMALIZE {
        z[{d}] = vec4<f32>(initial(bh, {d} * 4u, VALUE_DIM), initial(bh, {d} * 4u + 1u, VALUE_DIM), initial(bh, {d} * 4u + 2u, VALUE_DIM), initial(bh, {d} * 4u + 3u, VALUE_DIM));
    }
//#end
    for (var i = 0u; i < params.len; i++) {
        let k_base = batch * params.k_stride.x + kv_head * params.k_stride.y + i * params.k_stride.z;
        let q_base = batch * params.q_stride.x + head * params.q_stride.y + i * params.q_stride.z;
        let v = load_v(batch * params.v_stride.x + kv_head * params.v_stride.y + i * params.v_stride.z + c);
        var out = 0.0;
        var den = 0.0;
//#unroll d D4
        {
            let k = phi_at(load_k4(k_base, {d} * 4u), {d});
            let q = phi_at(load_q4(q_base, {d} * 4u), {d}) * params.scale;
            s[{d}] = s[{d}] * lambda + k * v;
            out += dot(q, s[{d}]);
            if NORMALIZE {
                z[{d}] = z[{d}] * lambda + k;
                den += dot(q, z[{d}]);
            }
        }
//#end
        if NORMALIZE {
            out /= den + params.eps;
        }
        store_o(batch * params.o_stride.x + head * params.o_stride.y + i * params.o_stride.z + c, out);
    }
//#unroll d D4
    for (var x = 0u; x < 4u; x++) {
        let d = {d} * 4u + x;
        if d < KEY_DIM {
            kv_out[(bh * KEY_DIM + d) * VALUE_DIM + c] = s[{d}][x];
            if NORMALIZE && c == 0u {
                z_out[bh * KEY_DIM + d] = z[{d}][x];
            }
        }
    }
//#end
}

// Elements [start, start + 4) of the Q row at `base` (zeros past KEY_DIM).
fn load_q4(base: u32, start: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        if start + c < KEY_DIM {
            x[c] = load_q(base + start + c);
        }
    }
    return x;
}

// Elements [start, start + 4) of the K row at `base` (zeros past KEY_DIM).
fn load_k4(base: u32, start: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        if start + c < KEY_DIM {
            x[c] = load_k(base + start + c);
        }
    }
    return x;
}

// Elements [start, start + 4) of the output row at `base`, those below VALUE_DIM.
fn store_o4(base: u32, start: u32, x: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        if start + c < VALUE_DIM {
            store_o(base + start + c, x[c]);
        }
    }
}

// FlashAttention-2 backward (Algorithm 2) without float atomics, in three passes:
//   flash_bwd_prep  per query row: D = rowsum(dO ∘ O), the row's statistics, dO packed for the
//                   key pass;
//   flash_bwd_dkdv  per key block: dK and dV, looping over every query row of every query head
//                   of the key's GQA group (so the group sum needs no atomics);
//   flash_bwd_dq    per query block: dQ (and the temperature's and the bias's gradients),
//                   looping over the key blocks, as the forward does;
//   flash_bwd_sinks (with sinks) each block of rows' share of the sinks' gradient.
// P is recomputed from Q, K and the forward's LSE in both loops; nothing N×N is stored (the
// bias gradient, when asked for, is N×N by nature).
//
// Gradients (natural-log units; s is the score after every modifier, x = scale·t·q·k before
// them, see flash_common.wgsl's modified_score):
//   softmax P = exp(s − LSE), dS = P ∘ (dP − D);  sigmoid P = σ(s + b), dS = dP ∘ σ'(s + b);
//   dP = dO·v, dV = Σ P dO, dx = dS · (1 − tanh²(x / cap)) with soft-capping, else dS;
//   dQ = scale·t · Σ dx k, dK = Σ scale·t · dx q, d_bias = dS, d_t = scale · Σ dx q·k,
//   d_sink = −Σ P_sink · D.
//
// Written for CPU adapters the way flash_fwd_unrolled.wgsl is (its header says why): rows held
// in private arrays indexed by constants only, every inner loop written out by the host
// (`//#unroll`), and what is read inside the loops comes from textures (packed Q, K, V, and dO
// with each row's statistics as one more texel). The kernels compute in f32 only; other element
// types are converted at their edges. Each invocation owns ROWS keys (dkdv) or query rows (dq),
// rows r·LANES + lane of its workgroup's block.
//
// The host prelude defines ROWS, D4, DV4, HEAD_DIM, VALUE_DIM, CAUSAL, SIGMOID, SOFTCAP, ALIBI,
// BIAS, KEY_MASK, BIAS_GRAD, KEYS (4: the dQ pass's keys per step) and `bias4` / `key_mask4`.
//
// Dispatch: prep (ceil(q rows per head / 64), q_heads, batch); dkdv (ceil(longest kv_len /
// (LANES·ROWS)), kv_heads, sequences); dq (ceil(longest q_len / (LANES·ROWS)), q_heads,
// sequences); sinks as prep; reduce_sum (ceil(outputs / 64) workgroups, folded into x and y).
//
// The file is in sections, `//#section pass NAME`: each kernel is the `common` section and its
// own (the reduction is its own alone).

//#section pass common
//#import common/flash_common.wgsl

// The backward's own uniforms (host twin: `BackwardParams`).
struct Backward {
    // Packed Q / dO rows per query head and per batch element (0 for varlen), and rows per
    // texture line of each: a packed dO row is DV4 texels of dO and one of statistics.
    q_rows_per_head: u32,
    q_rows_per_batch: u32,
    q_fold: u32,
    do_fold: u32,
    // Query rows per head of the call (varlen: every sequence's), and keys.
    q_len: u32,
    kv_len: u32,
    // Workgroups of the prep pass per (batch, head): the sinks' partial sums per head.
    prep_blocks: u32,
    _pad0: u32,
}

@group(0) @binding({binding.bwd}) var<uniform> bwd: Backward;

const LANES: u32 = 8u;
const PREP_ROWS: u32 = 64u;

// The packed texel of dims 0..3 of row `g` of a texture whose rows are `width4` texels wide.
fn row_texel(g: u32, fold: u32, width4: u32) -> vec2<u32> {
    return vec2<u32>((g % fold) * width4, g / fold);
}

// The texel of the next packed row after the one at `at`, for loops that walk rows in order:
// an add and a compare where row_texel divides (a CPU driver runs integer division per lane,
// tens of cycles each).
fn next_row_texel(at: vec2<u32>, fold: u32, width4: u32) -> vec2<u32> {
    let x = at.x + width4;
    return select(vec2<u32>(x, at.y), vec2<u32>(0u, at.y + 1u), x >= fold * width4);
}

// `1 − tanh²(x / cap)`, the soft-cap's slope at the unmodified score x (kernel units).
fn softcap_slope(x: f32) -> f32 {
    let t = tanh_f32(x / params.softcap);
    return 1.0 - t * t;
}

// dL/ds of a kept score (kept_score) from its recomputed weight p (recomputed_weight) and dP:
// softmax P (dP − D), `stats` the row's (LSE · score_unit, D, ...); sigmoid dP σ(1 − σ)
// (FlashSigmoid's form: no second exp or division; 1 − σ loses relative digits only where
// σ' is below f32's resolution of 1). Hidden keys (NO_MAX) give 0. Natural-log units.
fn score_grad(s: f32, p: f32, dp: f32, stats: vec4<f32>) -> f32 {
    if SIGMOID {
        return select(dp * p * (1.0 - p), 0.0, s == NO_MAX);
    }
    return select(p * (dp - stats.y), 0.0, s == NO_MAX);
}

// The recomputed weight of a kept score: exp2(s − LSE) for softmax, σ(s + b) for sigmoid; 0 for
// a hidden key.
fn recomputed_weight(s: f32, stats: vec4<f32>, sigmoid_bias: f32) -> f32 {
    if SIGMOID {
        return select(sigmoid(s + sigmoid_bias), 0.0, s == NO_MAX);
    }
    return select(exp2(s - stats.x), 0.0, s == NO_MAX);
}

//#section pass prep
@group(0) @binding({binding.bwd_o}) var<storage, read> o_in: array<f32>;
@group(0) @binding({binding.bwd_do}) var<storage, read> do_in: array<f32>;
@group(0) @binding({binding.lse}) var<storage, read> lse_in: array<f32>;
@group(0) @binding({binding.bwd_stats}) var<storage, read_write> stats_out: array<vec4<f32>>;
@group(0) @binding({binding.bwd_do_tex}) var do_packed: texture_storage_2d<rgba32float, write>;
@compute @workgroup_size(PREP_ROWS)
fn flash_bwd_prep(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let head = wg.y;
    let batch = wg.z;
    let row = wg.x * PREP_ROWS + lid;
    let g = batch * bwd.q_rows_per_batch + head * bwd.q_rows_per_head + row;
    let at = row_texel(g, bwd.do_fold, DV4 + 1u);
    // Rows past the call's (padding up to the packed rows per head) are zeros.
    let valid = row < bwd.q_len;
    let idx = batch * params.row_batch_stride + head * params.row_head_stride + row;
    let base = batch * params.o_stride.x + head * params.o_stride.y + row * params.o_stride.z;
    var d = 0.0;
//#unroll e DV4
    {
        var o = vec4<f32>(0.0);
        var g_o = vec4<f32>(0.0);
        if valid {
            for (var c = 0u; c < 4u; c++) {
                if {e} * 4u + c < VALUE_DIM {
                    // Sigmoid has no D: its O is not read (the host binds a stand-in).
                    if !SIGMOID {
                        o[c] = o_in[base + {e} * 4u + c];
                    }
                    g_o[c] = do_in[base + {e} * 4u + c];
                }
            }
        }
        d += dot(o, g_o);
        if row < bwd.q_rows_per_head {
            textureStore(do_packed, at + vec2<u32>({e}, 0u), g_o);
        }
    }
//#end
    var stats = vec4<f32>(0.0);
    if valid {
        // A row that saw nothing has LSE -inf: its weights are never used (every key hidden),
        // so any finite stand-in does.
        let lse = select(max(lse_in[idx] * params.score_unit, NO_MAX), 0.0, SIGMOID);
        stats = vec4<f32>(lse, d, row_q_scale(idx), 0.0);
        stats_out[idx] = stats;
    }
    if row < bwd.q_rows_per_head {
        textureStore(do_packed, at + vec2<u32>(DV4, 0u), stats);
    }
}

//#section pass sinks
@group(0) @binding({binding.bwd_stats}) var<storage, read> stats_in: array<vec4<f32>>;
@group(0) @binding({binding.bwd_sink_partials}) var<storage, read_write> sink_partials: array<f32>;

var<workgroup> sink_terms: array<f32, PREP_ROWS>;

// Each block of 64 query rows' share of d_sink[head] = −Σ P_sink · D, after the dQ pass: D is
// the row's Σ P dP as that pass saw it (statistics' w), not the prep pass's dO · O, whose
// storage-type rounding a sum over every row and batch element would gather.
@compute @workgroup_size(PREP_ROWS)
fn flash_bwd_sinks(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let head = wg.y;
    let batch = wg.z;
    let row = wg.x * PREP_ROWS + lid;
    var term = 0.0;
    if row < bwd.q_len {
        let stats = stats_in[batch * params.row_batch_stride + head * params.row_head_stride + row];
        let sink = row_data[params.q_heads + head] * params.score_unit;
        term = -exp2(sink - stats.x) * stats.w;
    }
    // Summed in a fixed order (deterministic).
    sink_terms[lid] = term;
    workgroupBarrier();
    if lid == 0u {
        var sum = 0.0;
        for (var i = 0u; i < PREP_ROWS; i++) {
            sum += sink_terms[i];
        }
        sink_partials[(batch * params.q_heads + head) * bwd.prep_blocks + wg.x] = sum;
    }
}

//#section pass dkdv
@group(0) @binding({binding.bwd_q_tex}) var q_packed: texture_storage_2d<rgba32float, read>;
@group(0) @binding({binding.bwd_do_tex}) var do_packed: texture_storage_2d<rgba32float, read>;
@group(0) @binding({binding.bwd_k}) var<storage, read> k_in: array<f32>;
@group(0) @binding({binding.bwd_v}) var<storage, read> v_in: array<f32>;
@group(0) @binding({binding.bwd_dk}) var<storage, read_write> dk_out: array<f32>;
@group(0) @binding({binding.bwd_dv}) var<storage, read_write> dv_out: array<f32>;

// The first row of `seq` in [lo, hi) whose visible keys (visible_keys) end after `key`
// (`after`) or begin at or after it (`!after`): both bounds only grow with the row, so a
// binary search finds where the condition starts to hold.
fn first_row(seq: Sequence, key: u32, after: bool) -> u32 {
    var lo = 0u;
    var hi = seq.q_len;
    while lo < hi {
        let mid = (lo + hi) / 2u;
        let keys = visible_keys(seq, mid);
        let holds = select(keys.x >= key, keys.y > key, after);
        if holds {
            hi = mid;
        } else {
            lo = mid + 1u;
        }
    }
    return lo;
}

@compute @workgroup_size(LANES)
fn flash_bwd_dkdv(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let kv_head = wg.y;
    let batch = wg.z;
    let seq = sequences[batch];
    let key0 = wg.x * (LANES * ROWS);
    let group = params.q_heads / params.kv_heads;
    let k_base = batch * params.k_stride.x + kv_head * params.k_stride.y + seq.kv_offset * params.k_stride.z;
    let v_base = batch * params.v_stride.x + kv_head * params.v_stride.y + seq.kv_offset * params.v_stride.z;

    var k = array<vec4<f32>, ROWS * D4>();
    var v = array<vec4<f32>, ROWS * DV4>();
    var dk = array<vec4<f32>, ROWS * D4>();
    var dv = array<vec4<f32>, ROWS * DV4>();
//#unroll r ROWS
    {
        let key = key0 + {r} * LANES + lane;
        let valid = key < seq.kv_len;
//#unroll d D4
        k[{r} * D4 + {d}] = load4(valid, k_base + key * params.k_stride.z, {d} * 4u, HEAD_DIM, 0u);
        dk[{r} * D4 + {d}] = vec4<f32>(0.0);
//#end
//#unroll e DV4
        v[{r} * DV4 + {e}] = load4(valid, v_base + key * params.v_stride.z, {e} * 4u, VALUE_DIM, 1u);
        dv[{r} * DV4 + {e}] = vec4<f32>(0.0);
//#end
    }
//#end

    // Rows that see any key of this block: from the first whose visible keys end after the
    // block's first key to the first whose visible keys begin after its last. A block past
    // the sequence's keys sees no row.
    let key_end = min(key0 + LANES * ROWS, seq.kv_len);
    var row_begin = 0u;
    var row_end = 0u;
    if key0 < key_end {
        row_begin = first_row(seq, key0, true) / 4u * 4u;
        row_end = first_row(seq, key_end, false);
    }
    let score_unit = params.score_unit;
    for (var hg = 0u; hg < group; hg++) {
        let head = kv_head * group + hg;
        let slope = alibi_slope(head);
        let q_row0 = batch * bwd.q_rows_per_batch + head * bwd.q_rows_per_head + seq.q_offset;
        var q_at = row_texel(q_row0 + row_begin, bwd.q_fold, D4);
        var do_at = row_texel(q_row0 + row_begin, bwd.do_fold, DV4 + 1u);
        for (var row0 = row_begin; row0 < row_end; row0 += 4u) {
//#unroll u 4
            {
                let row = row0 + {u};
                let keys = select(vec2<u32>(0u), visible_keys(seq, row), row < seq.q_len);
                let diag = i32(row) + seq.diag_offset;
                let stats = textureLoad(do_packed, do_at + vec2<u32>(DV4, 0u));
                let bias_row = batch * params.bias_batch_rows + head * params.bias_head_rows + row;
                // The row's Q and dO texels, fetched once and used by every key of the lane
                // twice (scores, then dK / dV).
                var qt = array<vec4<f32>, D4>();
                var gt = array<vec4<f32>, DV4>();
                var dot_qk = array<vec4<f32>, ROWS>();
                var dot_dv = array<vec4<f32>, ROWS>();
//#unroll d D4
                qt[{d}] = textureLoad(q_packed, q_at + vec2<u32>({d}, 0u));
//#unroll r ROWS
                dot_qk[{r}] = fma(qt[{d}], k[{r} * D4 + {d}], dot_qk[{r}]);
//#end
//#end
//#unroll e DV4
                gt[{e}] = textureLoad(do_packed, do_at + vec2<u32>({e}, 0u));
//#unroll r ROWS
                dot_dv[{r}] = fma(gt[{e}], v[{r} * DV4 + {e}], dot_dv[{r}]);
//#end
//#end
                var p = array<f32, ROWS>();
                var dx = array<f32, ROWS>();
//#unroll r ROWS
                {
                    let key = key0 + {r} * LANES + lane;
                    let x = ((dot_qk[{r}].x + dot_qk[{r}].y) + (dot_qk[{r}].z + dot_qk[{r}].w)) * stats.z;
                    let additive = key_mask4(batch, key & ~3u)[key & 3u] + bias4(bias_row, key & ~3u)[key & 3u];
                    let s = kept_score(modified_score(x, key, diag, slope, additive), key >= keys.x && key < keys.y);
                    let dp = (dot_dv[{r}].x + dot_dv[{r}].y) + (dot_dv[{r}].z + dot_dv[{r}].w);
                    p[{r}] = recomputed_weight(s, stats, seq.sigmoid_bias);
                    var ds = score_grad(s, p[{r}], dp, stats);
                    if SOFTCAP {
                        ds *= softcap_slope(x);
                    }
                    // dK takes scale·t·q: the row's q_scale without the score unit.
                    dx[{r}] = ds * stats.z / score_unit;
                }
//#end
//#unroll d D4
//#unroll r ROWS
                dk[{r} * D4 + {d}] = fma(vec4<f32>(dx[{r}]), qt[{d}], dk[{r} * D4 + {d}]);
//#end
//#end
//#unroll e DV4
//#unroll r ROWS
                dv[{r} * DV4 + {e}] = fma(vec4<f32>(p[{r}]), gt[{e}], dv[{r} * DV4 + {e}]);
//#end
//#end
                q_at = next_row_texel(q_at, bwd.q_fold, D4);
                do_at = next_row_texel(do_at, bwd.do_fold, DV4 + 1u);
            }
//#end
        }
    }

//#unroll r ROWS
    {
        let key = key0 + {r} * LANES + lane;
        if key < seq.kv_len {
            let dk_base = batch * params.k_stride.x + kv_head * params.k_stride.y + (seq.kv_offset + key) * params.k_stride.z;
            let dv_base = batch * params.v_stride.x + kv_head * params.v_stride.y + (seq.kv_offset + key) * params.v_stride.z;
//#unroll d D4
            store4(dk_base, {d} * 4u, HEAD_DIM, dk[{r} * D4 + {d}], 0u);
//#end
//#unroll e DV4
            store4(dv_base, {e} * 4u, VALUE_DIM, dv[{r} * DV4 + {e}], 1u);
//#end
        }
    }
//#end
}

// Elements [start, start + 4) of the row at `base` of K (0) or V (1), zero past `len` or when
// `valid` is false.
fn load4(valid: bool, base: u32, start: u32, len: u32, tensor: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    if valid {
        for (var c = 0u; c < 4u; c++) {
            if start + c < len {
                x[c] = select(k_in[base + start + c], v_in[base + start + c], tensor == 1u);
            }
        }
    }
    return x;
}

// Elements [start, start + 4) of the row at `base` of dK (0) or dV (1), those below `len`.
fn store4(base: u32, start: u32, len: u32, x: vec4<f32>, tensor: u32) {
    for (var c = 0u; c < 4u; c++) {
        if start + c < len {
            if tensor == 0u {
                dk_out[base + start + c] = x[c];
            } else {
                dv_out[base + start + c] = x[c];
            }
        }
    }
}

//#section pass dq
@group(0) @binding({binding.bwd_k_tex}) var k_packed: texture_storage_2d<rgba32float, read>;
@group(0) @binding({binding.bwd_v_tex}) var v_packed: texture_storage_2d<rgba32float, read>;
@group(0) @binding({binding.bwd_q}) var<storage, read> q_in: array<f32>;
@group(0) @binding({binding.bwd_do}) var<storage, read> do_in: array<f32>;
@group(0) @binding({binding.bwd_stats}) var<storage, read_write> stats_rows: array<vec4<f32>>;
@group(0) @binding({binding.bwd_dq}) var<storage, read_write> dq_out: array<f32>;
@group(0) @binding({binding.bwd_d_temperature}) var<storage, read_write> d_temperature: array<f32>;
@group(0) @binding({binding.bwd_d_bias}) var<storage, read_write> d_bias: array<f32>;

@compute @workgroup_size(LANES)
fn flash_bwd_dq(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let head = wg.y;
    let batch = wg.z;
    let seq = sequences[batch];
    let block_row0 = wg.x * (LANES * ROWS);
    let kv_head = head / (params.q_heads / params.kv_heads);
    let kv_row0 = batch * params.tex_rows_per_batch + kv_head * params.tex_rows_per_head + seq.kv_offset;
    let slope = alibi_slope(head);

    var q = array<vec4<f32>, ROWS * D4>();
    var g_o = array<vec4<f32>, ROWS * DV4>();
    var dq = array<vec4<f32>, ROWS * D4>();
    var stats = array<vec4<f32>, ROWS>();
    var row_keys = array<vec2<u32>, ROWS>();
    var row_diag = array<i32, ROWS>();
    var bias_row = array<u32, ROWS>();
    var d_t = array<f32, ROWS>();
    var d_t_b = array<f32, ROWS>();
    var d_exact = array<f32, ROWS>();
//#unroll r ROWS
    {
        let row = block_row0 + {r} * LANES + lane;
        let valid = row < seq.q_len;
        let at = seq.q_offset + row;
        let q_base = batch * params.q_stride.x + head * params.q_stride.y + at * params.q_stride.z;
        let o_base = batch * params.o_stride.x + head * params.o_stride.y + at * params.o_stride.z;
//#unroll d D4
        q[{r} * D4 + {d}] = load_row4(valid, q_base, {d} * 4u, HEAD_DIM, 0u);
        dq[{r} * D4 + {d}] = vec4<f32>(0.0);
//#end
//#unroll e DV4
        g_o[{r} * DV4 + {e}] = load_row4(valid, o_base, {e} * 4u, VALUE_DIM, 1u);
//#end
        stats[{r}] = select(vec4<f32>(0.0), stats_rows[row_index(seq, batch, head, row)], valid);
        row_keys[{r}] = select(vec2<u32>(0u), visible_keys(seq, row), valid);
        row_diag[{r}] = i32(row) + seq.diag_offset;
        bias_row[{r}] = batch * params.bias_batch_rows + head * params.bias_head_rows + row;
        d_t[{r}] = 0.0;
        d_t_b[{r}] = 0.0;
        d_exact[{r}] = 0.0;
    }
//#end

    // Keys no row of the block sees are never fetched (as in the forward).
    let has_rows = block_row0 < seq.q_len;
    let last_row = min(block_row0 + LANES * ROWS, seq.q_len) - 1u;
    let kv_begin = visible_keys(seq, block_row0).x / KEYS * KEYS;
    let kv_end = select(0u, visible_keys(seq, last_row).y, has_rows);
    let score_unit = params.score_unit;

    var kt = array<vec4<f32>, KEYS * D4>();
    var x = array<f32, ROWS * KEYS>();
    var dp = array<f32, ROWS * KEYS>();
    var k_at = row_texel(kv_row0 + kv_begin, params.tex_fold, D4);
    var v_at = row_texel(kv_row0 + kv_begin, params.tex_fold, DV4);
    for (var key0 = kv_begin; key0 < kv_end; key0 += KEYS) {
//#unroll j KEYS
        {
            let at = k_at;
            var dot_qk = array<vec4<f32>, ROWS>();
//#unroll d D4
            {
                let kd = textureLoad(k_packed, at + vec2<u32>({d}, 0u));
                kt[{j} * D4 + {d}] = kd;
//#unroll r ROWS
                dot_qk[{r}] = fma(q[{r} * D4 + {d}], kd, dot_qk[{r}]);
//#end
            }
//#end
            var dot_dv = array<vec4<f32>, ROWS>();
//#unroll e DV4
            {
                let vd = textureLoad(v_packed, v_at + vec2<u32>({e}, 0u));
//#unroll r ROWS
                dot_dv[{r}] = fma(g_o[{r} * DV4 + {e}], vd, dot_dv[{r}]);
//#end
            }
//#end
            k_at = next_row_texel(k_at, params.tex_fold, D4);
            v_at = next_row_texel(v_at, params.tex_fold, DV4);
//#unroll r ROWS
            x[{r} * KEYS + {j}] = (dot_qk[{r}].x + dot_qk[{r}].y) + (dot_qk[{r}].z + dot_qk[{r}].w);
            dp[{r} * KEYS + {j}] = (dot_dv[{r}].x + dot_dv[{r}].y) + (dot_dv[{r}].z + dot_dv[{r}].w);
//#end
        }
//#end

        let mask = key_mask4(batch, key0);
//#unroll r ROWS
        {
            let additive = mask + bias4(bias_row[{r}], key0);
            let row = block_row0 + {r} * LANES + lane;
            var dx = vec4<f32>(0.0);
//#unroll j KEYS
            {
                let key = key0 + {j};
                let dot = x[{r} * KEYS + {j}];
                let xs = dot * stats[{r}].z;
                let s = kept_score(modified_score(xs, key, row_diag[{r}], slope, additive[{j}]), key >= row_keys[{r}].x && key < row_keys[{r}].y);
                let p = recomputed_weight(s, stats[{r}], seq.sigmoid_bias);
                var ds = score_grad(s, p, dp[{r} * KEYS + {j}], stats[{r}]);
                if BIAS_GRAD {
                    if row < seq.q_len && key < seq.kv_len {
                        d_bias[((batch * params.q_heads + head) * bwd.q_len + row) * bwd.kv_len + key] = ds;
                    }
                }
                var slope_dot = dot;
                if SOFTCAP {
                    let cap_slope = softcap_slope(xs);
                    ds *= cap_slope;
                    slope_dot *= cap_slope;
                }
                dx[{j}] = ds;
                // The temperature's gradient, Σ dx · q·k: for softmax it is Σ P (dP − D) σ q·k
                // (σ the soft-cap's slope), kept as Σ P dP σ q·k and Σ P σ q·k with D taken
                // at the end as Σ P dP, which this loop sees exactly. The prep pass's D comes
                // from O in its storage type, whose rounding this sum over the row would
                // gather coherently.
                if SIGMOID {
                    d_t[{r}] += ds * dot;
                } else {
                    let w = p * slope_dot;
                    d_t[{r}] = fma(w, dp[{r} * KEYS + {j}], d_t[{r}]);
                    d_t_b[{r}] += w;
                    d_exact[{r}] = fma(p, dp[{r} * KEYS + {j}], d_exact[{r}]);
                }
            }
//#end
//#unroll d D4
            dq[{r} * D4 + {d}] = fma(vec4<f32>(dx[0]), kt[{d}], fma(vec4<f32>(dx[1]), kt[D4 + {d}], fma(vec4<f32>(dx[2]), kt[2u * D4 + {d}], fma(vec4<f32>(dx[3]), kt[3u * D4 + {d}], dq[{r} * D4 + {d}]))));
//#end
        }
//#end
    }

    // dQ = scale·t · Σ dx k: the row's q_scale without the score unit. d_t = scale · Σ dx q·k.
//#unroll r ROWS
    {
        let row = block_row0 + {r} * LANES + lane;
        if row < seq.q_len {
            let at = seq.q_offset + row;
            let base = batch * params.q_stride.x + head * params.q_stride.y + at * params.q_stride.z;
            let factor = stats[{r}].z / score_unit;
//#unroll d D4
            store_dq4(base, {d} * 4u, dq[{r} * D4 + {d}] * factor);
//#end
            if (params.flags & HAS_TEMPERATURE) != 0u {
                let sum = select(d_t[{r}] - d_exact[{r}] * d_t_b[{r}], d_t[{r}], SIGMOID);
                d_temperature[row_index(seq, batch, head, row)] = sum * params.q_scale / score_unit;
            }
            // The row's exact D for the sinks' gradient (flash_bwd_sinks).
            if (params.flags & HAS_SINKS) != 0u && !SIGMOID {
                stats_rows[row_index(seq, batch, head, row)].w = d_exact[{r}];
            }
        }
    }
//#end
}

// Elements [start, start + 4) of the row at `base` of Q (0) or dO (1), zero past `len` or when
// `valid` is false.
fn load_row4(valid: bool, base: u32, start: u32, len: u32, tensor: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    if valid {
        for (var c = 0u; c < 4u; c++) {
            if start + c < len {
                x[c] = select(q_in[base + start + c], do_in[base + start + c], tensor == 1u);
            }
        }
    }
    return x;
}

fn store_dq4(base: u32, start: u32, x: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        if start + c < HEAD_DIM {
            dq_out[base + start + c] = x[c];
        }
    }
}

//#section pass reduce
// out[o] = Σ_{a < count_a} Σ_{c < count_c} in[(o / inner) · outer + o % inner + a · stride_a +
// c · stride_c], in a fixed order: the sums over broadcast axes (the bias's gradient) and over
// the prep pass's per-block shares (the sinks'). One invocation per output element.
struct Reduce {
    outputs: u32,
    inner: u32,
    outer: u32,
    count_a: u32,
    stride_a: u32,
    count_c: u32,
    stride_c: u32,
    groups_x: u32,
}

@group(0) @binding({binding.params}) var<uniform> red: Reduce;
@group(0) @binding({binding.reduce_in}) var<storage, read> reduce_in: array<f32>;
@group(0) @binding({binding.reduce_out}) var<storage, read_write> reduce_out: array<f32>;

@compute @workgroup_size(64)
fn reduce_sum(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let o = (wg.y * red.groups_x + wg.x) * 64u + lid;
    if o >= red.outputs {
        return;
    }
    let base = (o / red.inner) * red.outer + o % red.inner;
    var sum = 0.0;
    for (var a = 0u; a < red.count_a; a++) {
        for (var c = 0u; c < red.count_c; c++) {
            sum += reduce_in[base + a * red.stride_a + c * red.stride_c];
        }
    }
    reduce_out[o] = sum;
}

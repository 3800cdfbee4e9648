// FlashAttention-2 forward for CPU adapters (llvmpipe, SwiftShader): register tiles, fully
// unrolled, fed from textures.
//
// A CPU Vulkan driver runs LANES invocations as the lanes of one SIMD register. What is cheap
// there is arithmetic on values the compiler can keep in registers or on the stack; what is
// dear (docs/PERF.md, measured on llvmpipe 22.3) is (1) any storage-buffer or workgroup-memory
// load inside a loop, which becomes a per-lane scalar loop, (2) dynamically indexed private
// arrays, which go to per-lane scratch memory, and (3) subgroup broadcasts. A texel load costs
// a tenth of a buffer load, and a read-only storage texture's load is inlined where a sampled
// texture's fetch is a call (1.27× for the whole kernel, docs/PERF.md). So:
//   - K and V arrive as read-only rgba32float storage textures (packed by pack_rows.wgsl), one
//     texel per 4 dims;
//   - each invocation owns ROWS query rows (rows r·LANES + lane of the block), held with their
//     output accumulators in private arrays that are only ever indexed by constants;
//   - keys are taken KEYS at a time; each fetched texel feeds ROWS rows, and each row's q·k
//     is four partial sums (vec4 lanes) so that its adds do not form one long dependent chain;
//   - every loop over rows, keys or dims is written out by the host: a line block between
//     `//#unroll NAME COUNT` and `//#end` is repeated COUNT times with `{NAME}` replaced by
//     0u, 1u, ... (kernel.rs, `expand_unrolls`). Only the loop over key tiles remains.
// Softmax is FlashAttention-2's: base-2 logits (Q pre-scaled by scale·log2 e), a running max
// and sum per row, one division at the end, natural-log LSE per row. Sigmoid (SIGMOID) weighs
// each visible score by σ(s + b) and sums; no max, no division, no LSE. Score modifiers go
// through modified_score (flash_common.wgsl); the bias and key mask arrive as storage textures, one
// texel per row per step of KEYS = 4 keys.
//
// The host prelude defines: ROWS, KEYS, D4 (= ceil(HEAD_DIM / 4)), DV4, HEAD_DIM, VALUE_DIM,
// CAUSAL, SIGMOID, SOFTCAP, ALIBI, BIAS, KEY_MASK, the storage bindings 1 (`q_buf`) and 4
// (`o_buf`) with `load_q` / `store_o`, and `bias4` / `key_mask4` (texel readers, or zeros);
// flash_common.wgsl brings `struct Params`, the sequences and `modified_score` / `weight`.
//
// Dispatch: (ceil(longest q_len / (LANES · ROWS)), q_heads, batch elements or sequences).

//#import common/flash_common.wgsl

@group(0) @binding({binding.k}) var k_tex: texture_storage_2d<rgba32float, read>;
@group(0) @binding({binding.v}) var v_tex: texture_storage_2d<rgba32float, read>;
@group(0) @binding({binding.lse}) var<storage, read_write> lse_buf: array<f32>;

const LANES: u32 = 8u;

@compute @workgroup_size(LANES)
fn flash_fwd(
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
    let start = softmax_start(head);

    var q = array<vec4<f32>, ROWS * D4>();
    var o = array<vec4<f32>, ROWS * DV4>();
    var row_max = array<f32, ROWS>();
    var row_sum = array<f32, ROWS>();
    // Each row's visible keys are [row_keys.x, row_keys.y); its diagonal key is row_diag.
    var row_keys = array<vec2<u32>, ROWS>();
    var row_diag = array<i32, ROWS>();
    // Each row's first texel row in the bias texture.
    var bias_row = array<u32, ROWS>();

//#unroll r ROWS
    {
        let row = block_row0 + {r} * LANES + lane;
        let valid = row < seq.q_len;
        let at = seq.q_offset + row;
        let base = batch * params.q_stride.x + head * params.q_stride.y + at * params.q_stride.z;
        let scale = select(0.0, row_q_scale(row_index(seq, batch, head, row)), valid);
//#unroll d D4
        q[{r} * D4 + {d}] = load_q4(valid, base, {d} * 4u) * scale;
//#end
//#unroll e DV4
        o[{r} * DV4 + {e}] = vec4<f32>(0.0);
//#end
        row_max[{r}] = start.x;
        row_sum[{r}] = start.y;
        row_keys[{r}] = select(vec2<u32>(0u), visible_keys(seq, row), valid);
        row_diag[{r}] = i32(row) + seq.diag_offset;
        bias_row[{r}] = batch * params.bias_batch_rows + head * params.bias_head_rows + row;
    }
//#end

    // Keys outside [kv_begin, kv_end) are invisible to every row of the block (causal mask,
    // window, key mask span): never fetched. Visible ranges only move right as rows grow. A
    // block past its sequence's rows (varlen) fetches nothing; no early return, which a CPU
    // driver would carry as a mask through the whole body.
    let has_rows = block_row0 < seq.q_len;
    let last_row = min(block_row0 + LANES * ROWS, seq.q_len) - 1u;
    let kv_begin = visible_keys(seq, block_row0).x / KEYS * KEYS;
    let kv_end = select(0u, visible_keys(seq, last_row).y, has_rows);

    var v = array<vec4<f32>, KEYS * DV4>();
    var s = array<f32, ROWS * KEYS>();
    var alpha = array<f32, ROWS>();
    for (var key0 = kv_begin; key0 < kv_end; key0 += KEYS) {
        // Logits, one key at a time: the key's texels are fetched, then used by every row
        // (8 independent sums), so only one key of K is live. Rows past kv_len are zero in
        // the packed texture.
//#unroll j KEYS
        {
            let at = packed_texel(kv_row0 + key0 + {j}, D4);
            // Four partial sums per row (one per vec4 lane): independent add chains, which a
            // CPU needs to overlap the adds' latency (one chain per row ran latency-bound).
            var dot = array<vec4<f32>, ROWS>();
//#unroll d D4
            {
                let kd = textureLoad(k_tex, at + vec2<u32>({d}, 0u));
//#unroll r ROWS
                dot[{r}] = fma(q[{r} * D4 + {d}], kd, dot[{r}]);
//#end
            }
//#end
//#unroll r ROWS
            s[{r} * KEYS + {j}] = (dot[{r}].x + dot[{r}].y) + (dot[{r}].z + dot[{r}].w);
//#end
        }
//#end

        // Modifiers and visibility; invisible keys get NO_MAX. The key mask is one texel for
        // the block, the bias one texel per row (both zeros when absent).
        let mask = key_mask4(batch, key0);
//#unroll r ROWS
        {
            let additive = mask + bias4(bias_row[{r}], key0);
//#unroll j KEYS
            {
                let x = modified_score(s[{r} * KEYS + {j}], key0 + {j}, row_diag[{r}], slope, additive[{j}]);
                s[{r} * KEYS + {j}] = kept_score(x, key0 + {j} >= row_keys[{r}].x && key0 + {j} < row_keys[{r}].y);
            }
//#end
        }
//#end

        // Online softmax: new running max, rescale factor, weights (in place of s).
//#unroll r ROWS
        {
            var new_max = row_max[{r}];
//#unroll j KEYS
            new_max = max(new_max, s[{r} * KEYS + {j}]);
//#end
            // Sigmoid keeps no running max: alpha folds to 1 and the rescale disappears.
            alpha[{r}] = select(exp2(row_max[{r}] - new_max), 1.0, SIGMOID);
            row_max[{r}] = new_max;
            var sum = row_sum[{r}] * alpha[{r}];
//#unroll j KEYS
            s[{r} * KEYS + {j}] = kept_weight(s[{r} * KEYS + {j}], new_max, seq.sigmoid_bias);
            sum += s[{r} * KEYS + {j}];
//#end
            row_sum[{r}] = sum;
        }
//#end

        // V tile, then O = alpha · O + P · V.
//#unroll j KEYS
        {
            let at = packed_texel(kv_row0 + key0 + {j}, DV4);
//#unroll e DV4
            v[{j} * DV4 + {e}] = textureLoad(v_tex, at + vec2<u32>({e}, 0u));
//#end
        }
//#end
//#unroll r ROWS
//#unroll e DV4
        {
            var acc = o[{r} * DV4 + {e}] * alpha[{r}];
//#unroll j KEYS
            acc = fma(vec4<f32>(s[{r} * KEYS + {j}]), v[{j} * DV4 + {e}], acc);
//#end
            o[{r} * DV4 + {e}] = acc;
        }
//#end
//#end
    }

    // The only division, once per row (softmax). A row that saw no key (and no sink) has
    // row_sum 0: O = 0, LSE = -inf (a NaN row_sum is "seen": NaN reaches O and the LSE). Sigmoid
    // is unnormalised and has no LSE.
//#unroll r ROWS
    {
        let row = block_row0 + {r} * LANES + lane;
        if row < seq.q_len {
            let seen = seen_any(row_sum[{r}]);
            let inv_sum = select(select(0.0, 1.0 / row_sum[{r}], seen), 1.0, SIGMOID);
            let base = batch * params.o_stride.x + head * params.o_stride.y + (seq.q_offset + row) * params.o_stride.z;
//#unroll e DV4
            store_o4(base, {e} * 4u, o[{r} * DV4 + {e}] * inv_sum);
//#end
            if !SIGMOID {
                lse_buf[row_index(seq, batch, head, row)] = select(neg_inf(), (row_max[{r}] + log2(row_sum[{r}])) * LN_2, seen);
            }
        }
    }
//#end
}

// Texel of dims 0..3 of packed K/V row `g` (see pack_rows.wgsl).
fn packed_texel(g: u32, width4: u32) -> vec2<u32> {
    return vec2<u32>((g % params.tex_fold) * width4, g / params.tex_fold);
}

// Elements [start, start + 4) of the query row at `base`, zero past HEAD_DIM or when `valid` is false.
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

// Elements [start, start + 4) of the output row at `base`, those below VALUE_DIM.
fn store_o4(base: u32, start: u32, x: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        if start + c < VALUE_DIM {
            store_o(base + start + c, x[c]);
        }
    }
}

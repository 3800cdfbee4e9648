// What the forward kernel families share: the uniform block (host twin: `FlashParams`), the
// per-sequence records, the masks, and the score-to-weight path of each variant and modifier.
//
// Element offsets are (batch, head, seq) strides; the innermost dimension is contiguous.
// This one struct covers both layouts (BHSD and BSHD) without a shader variant.
//#import common/scores.wgsl

struct Params {
    q_heads: u32,
    kv_heads: u32,
    // Texture-fed kernels only (see pack_rows.wgsl): packed K/V rows per kv head and per batch
    // element (0 for varlen, whose sequences share one packed batch), and rows per texture line.
    tex_rows_per_head: u32,
    tex_rows_per_batch: u32,
    q_stride: vec4<u32>,
    k_stride: vec4<u32>,
    v_stride: vec4<u32>,
    o_stride: vec4<u32>,
    // (batch, head) strides of per-query-row data: the LSE and the temperature.
    row_batch_stride: u32,
    row_head_stride: u32,
    tex_fold: u32,
    // HAS_SINKS | HAS_TEMPERATURE: modifiers that cost nothing per score, so no specialisation.
    flags: u32,
    // What Q is multiplied by: scale · log2(e) for softmax (base-2 logits, so each
    // probability is one exp2), scale for sigmoid.
    q_scale: f32,
    // log2(e) for softmax, 1 for sigmoid: converts natural-log additive terms (bias, ALiBi,
    // sinks) into the kernel's units.
    score_unit: f32,
    // Soft-capping bound in the kernel's units (cap · score_unit).
    softcap: f32,
    // Sliding window: keys at most window_left before / window_right after the diagonal; -1
    // means unbounded.
    window_left: i32,
    window_right: i32,
    // Bias texture: packed rows per batch element and per head (0 where the bias broadcasts),
    // rows per texture line, texels per row.
    bias_batch_rows: u32,
    bias_head_rows: u32,
    bias_fold: u32,
    bias_width4: u32,
    // Key-mask texture: rows (one per batch element) per texture line, texels per row.
    mask_fold: u32,
    mask_width4: u32,
    // Prefix-LM: keys before prefix_len are visible past the causal bound (0: none).
    prefix_len: u32,
    // Chunked local attention: a row sees only its diagonal's chunk of `chunk` keys (0: none).
    chunk: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// One batch element, or one packed sequence of a varlen call (host twin: `SequenceInfo`).
struct Sequence {
    // First query / key row of the sequence in its tensors (0 unless varlen).
    q_offset: u32,
    q_len: u32,
    kv_offset: u32,
    kv_len: u32,
    // Keys outside [key_lo, key_hi) are hidden from every row (key mask: its first and last
    // visible key), so the tiles there are skipped.
    key_lo: u32,
    key_hi: u32,
    // Query i's diagonal key is i + diag_offset (kv_len - q_len; 0 with top-left causal). The
    // causal mask, the window and ALiBi are measured from it.
    diag_offset: i32,
    // Sigmoid only: the scalar bias b of σ(s + b).
    sigmoid_bias: f32,
}

@group(0) @binding({binding.params}) var<uniform> params: Params;
// Per-head and per-row modifier data: [ALiBi slope per q head | sink per q head |
// temperature per (batch, head, row) when HAS_TEMPERATURE], natural-log units.
@group(0) @binding({binding.row_data}) var<storage, read> row_data: array<f32>;
@group(0) @binding({binding.sequences}) var<storage, read> sequences: array<Sequence>;

const HAS_SINKS: u32 = 1u;
const HAS_TEMPERATURE: u32 = 2u;


// Keys [x, y) that query `row` of `seq` sees: the causal bound (CAUSAL) widened by a
// prefix-LM prefix, the window, the chunk of chunked local attention, the key mask's span,
// and [0, kv_len). Both bounds only grow with `row`, which is what lets a block skip whole key
// tiles. A new mask is one more bound here.
fn visible_keys(seq: Sequence, row: u32) -> vec2<u32> {
    let diag = i32(row) + seq.diag_offset;
    var lo = i32(seq.key_lo);
    var hi = i32(seq.key_hi);
    if CAUSAL {
        hi = min(hi, max(diag + 1, i32(params.prefix_len)));
    }
    if params.chunk > 0u {
        // The chunk holding the diagonal key: diag rounded down (toward -inf) to a multiple,
        // dividing only non-negative numbers in u32: GLSL leaves `%` of a negative integer
        // undefined, and naga's GL output keeps WGSL's operator (llvmpipe GL got it wrong).
        let size = params.chunk;
        let left_of_zero = u32(max(-diag, 0)) + size - 1u;
        let start = select(
            i32(u32(max(diag, 0)) / size * size),
            -i32(left_of_zero / size * size),
            diag < 0
        );
        lo = max(lo, start);
        hi = min(hi, start + i32(size));
    }
    if params.window_left >= 0 {
        lo = max(lo, diag - params.window_left);
    }
    if params.window_right >= 0 {
        hi = min(hi, diag + params.window_right + 1);
    }
    lo = clamp(lo, 0, i32(seq.key_hi));
    hi = clamp(hi, lo, i32(seq.key_hi));
    return vec2<u32>(u32(lo), u32(hi));
}

// Index of query `row` of (batch, head) in per-row data (LSE, temperature).
fn row_index(seq: Sequence, batch: u32, head: u32, row: u32) -> u32 {
    return batch * params.row_batch_stride + head * params.row_head_stride + seq.q_offset + row;
}

// What Q of this row is multiplied by: the scale (in the kernel's units) times the row's
// inverse temperature.
fn row_q_scale(row_at: u32) -> f32 {
    if (params.flags & HAS_TEMPERATURE) != 0u {
        return params.q_scale * row_data[2u * params.q_heads + row_at];
    }
    return params.q_scale;
}

// ALiBi slope of query head `head` in the kernel's units.
fn alibi_slope(head: u32) -> f32 {
    return row_data[head] * params.score_unit;
}

// The online softmax's starting (max, sum): nothing seen, or the head's sink as a first key of
// weight exp2(sink - max) = 1 whose value is zero.
fn softmax_start(head: u32) -> vec2<f32> {
    if (params.flags & HAS_SINKS) != 0u {
        return vec2<f32>(row_data[params.q_heads + head] * params.score_unit, 1.0);
    }
    return vec2<f32>(NO_MAX, 0.0);
}

// The score of a visible key after the modifiers (SOFTCAP, ALIBI, BIAS / KEY_MASK), in the
// kernel's units; NO_MAX when the bias or key mask hides the key. `s` is q·k with Q already
// scaled (row_q_scale), `diag` the row's diagonal key, `slope` from alibi_slope, `additive` the
// bias plus the key mask (natural-log units, -inf hides). This is the one function a new score
// modifier changes.
fn modified_score(s: f32, key: u32, diag: i32, slope: f32, additive: f32) -> f32 {
    var x = s;
    if SOFTCAP {
        x = params.softcap * tanh_f32(x / params.softcap);
    }
    if ALIBI {
        x -= slope * f32(abs(i32(key) - diag));
    }
    if BIAS || KEY_MASK {
        let b = additive * params.score_unit;
        x = select(x + b, NO_MAX, b < NO_MAX);
    }
    return x;
}

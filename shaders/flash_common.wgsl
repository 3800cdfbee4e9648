// What the forward kernel families share: the uniform block (host twin: `FlashParams`) and
// the score-to-weight function of each variant.
//
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
    // Query i's diagonal key is i + diag_offset (kv_len - q_len; 0 with top-left causal). The
    // causal mask and the window are measured from it.
    diag_offset: i32,
    // What Q is multiplied by: scale · log2(e) for softmax (base-2 logits, so each
    // probability is one exp2), scale for sigmoid.
    q_scale: f32,
    // Texture-fed kernels only (see pack_rows.wgsl): K/V rows per (batch, kv head) in the
    // packed textures (kv_len rounded up to the key tile), and packed rows per texture line.
    tex_rows_per_head: u32,
    tex_fold: u32,
    // Sigmoid only: the scalar bias b of σ(s + b).
    sigmoid_bias: f32,
    // Sliding window: keys at most window_left before / window_right after the diagonal; -1
    // means unbounded.
    window_left: i32,
    window_right: i32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> params: Params;

// Lower than any finite logit: marks "no visible key" without computing with infinities,
// which fast-math compilers (llvmpipe among them) may not honour.
const NO_MAX: f32 = -3.0e38;
const LN_2: f32 = 0.6931471805599453;

// Keys [x, y) that query `row` sees: the causal bound (CAUSAL), the window, and [0, kv_len).
// Both bounds only grow with `row`, which is what lets a block skip whole key tiles.
fn visible_keys(row: u32) -> vec2<u32> {
    let diag = i32(row) + params.diag_offset;
    let kv_len = i32(params.kv_len);
    var lo = 0;
    var hi = kv_len;
    if CAUSAL {
        hi = min(hi, diag + 1);
    }
    if params.window_left >= 0 {
        lo = max(lo, diag - params.window_left);
    }
    if params.window_right >= 0 {
        hi = min(hi, diag + params.window_right + 1);
    }
    lo = clamp(lo, 0, kv_len);
    hi = clamp(hi, lo, kv_len);
    return vec2<u32>(u32(lo), u32(hi));
}

// The weight of a visible score `s` (already scaled, see `q_scale`): exp2(s - row_max) for
// softmax, whose caller normalises by the row sum at the end; σ(s + b) for sigmoid, final as is.
// This is the one function a new score-to-weight variant changes.
fn weight(s: f32, row_max: f32) -> f32 {
    if SIGMOID {
        return sigmoid(s + params.sigmoid_bias);
    }
    return exp2(s - row_max);
}

// The logistic function without overflow: exp of a non-positive number only.
fn sigmoid(x: f32) -> f32 {
    let e = exp(-abs(x));
    let r = 1.0 / (1.0 + e);
    return select(e * r, r, x >= 0.0);
}

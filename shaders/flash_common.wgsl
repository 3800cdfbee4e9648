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
    // Key j is visible to query i iff j <= i + causal_offset (bottom-right: kv_len - q_len; top-left: 0).
    causal_offset: i32,
    // What Q is multiplied by: scale · log2(e) for softmax (base-2 logits, so each
    // probability is one exp2), scale for sigmoid.
    q_scale: f32,
    // Texture-fed kernels only (see pack_rows.wgsl): K/V rows per (batch, kv head) in the
    // packed textures (kv_len rounded up to the key tile), and packed rows per texture line.
    tex_rows_per_head: u32,
    tex_fold: u32,
    // Sigmoid only: the scalar bias b of σ(s + b).
    sigmoid_bias: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;

// Lower than any finite logit: marks "no visible key" without computing with infinities,
// which fast-math compilers (llvmpipe among them) may not honour.
const NO_MAX: f32 = -3.0e38;
const LN_2: f32 = 0.6931471805599453;

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

// Naive materialised softmax attention, the benchmark's baseline (f32, BHSD only).
//
// Three entry points, dispatched in order in one submission:
//   scores        S[bh, i, j] = scale · q_i · k_j              one invocation per (i, j)
//   softmax_rows  S[bh, i, :] = softmax over visible keys       one invocation per row, in place
//   pv            O[bh, i, e] = Σ_j S[bh, i, j] · v[j, e]        one invocation per (i, e)
//
// S is a [batch · heads, q_len, kv_len] f32 buffer. Causal masks are bottom-right aligned: key j is
// visible to query i iff j <= i + kv_len - q_len; masked probabilities are written as 0, and a row
// that sees no key is all zeros (so its output is 0). Heads are MHA (q_heads == kv_heads).
//
// Dispatch (x, y, z):
//   scores        (ceil(kv_len / 16), ceil(q_len / 16), batch · heads), workgroup 16×16
//   softmax_rows  (ceil(q_len / 64), batch · heads, 1),                 workgroup 64
//   pv            (ceil(value_dim / 16), ceil(q_len / 16), batch · heads), workgroup 16×16

struct Params {
    q_len: u32,
    kv_len: u32,
    head_dim: u32,
    value_dim: u32,
    scale: f32,
    causal: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> s: array<f32>;
@group(0) @binding(5) var<storage, read_write> o: array<f32>;

fn visible(i: u32, j: u32) -> bool {
    if params.causal == 0u {
        return true;
    }
    return i32(j) <= i32(i) + i32(params.kv_len) - i32(params.q_len);
}

@compute @workgroup_size(16, 16, 1)
fn scores(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let i = gid.y;
    let bh = gid.z;
    if i >= params.q_len || j >= params.kv_len {
        return;
    }
    let q_row = (bh * params.q_len + i) * params.head_dim;
    let k_row = (bh * params.kv_len + j) * params.head_dim;
    var dot = 0.0;
    for (var d = 0u; d < params.head_dim; d++) {
        dot += q[q_row + d] * k[k_row + d];
    }
    s[(bh * params.q_len + i) * params.kv_len + j] = params.scale * dot;
}

@compute @workgroup_size(64, 1, 1)
fn softmax_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let bh = gid.y;
    if i >= params.q_len {
        return;
    }
    let row = (bh * params.q_len + i) * params.kv_len;
    var m = -3.0e38;
    var any = false;
    for (var j = 0u; j < params.kv_len; j++) {
        if visible(i, j) {
            m = max(m, s[row + j]);
            any = true;
        }
    }
    var sum = 0.0;
    for (var j = 0u; j < params.kv_len; j++) {
        var p = 0.0;
        if any && visible(i, j) {
            p = exp(s[row + j] - m);
        }
        s[row + j] = p;
        sum += p;
    }
    let inv = select(0.0, 1.0 / sum, sum > 0.0);
    for (var j = 0u; j < params.kv_len; j++) {
        s[row + j] *= inv;
    }
}

@compute @workgroup_size(16, 16, 1)
fn pv(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x;
    let i = gid.y;
    let bh = gid.z;
    if i >= params.q_len || e >= params.value_dim {
        return;
    }
    let row = (bh * params.q_len + i) * params.kv_len;
    let v_base = bh * params.kv_len * params.value_dim;
    var acc = 0.0;
    for (var j = 0u; j < params.kv_len; j++) {
        acc += s[row + j] * v[v_base + j * params.value_dim + e];
    }
    o[(bh * params.q_len + i) * params.value_dim + e] = acc;
}

// Packs a K or V tensor into an rgba32float texture for the texture-fed forward kernel.
//
// Why: on CPU adapters (llvmpipe) a storage-buffer or workgroup-memory load inside a loop runs
// a per-lane scalar loop with a branch per component, about ten times the cost of a texel fetch
// (docs/PERF.md). Packing costs one pass over K and V; attention then reads each row N times.
//
// Packed layout: row g = (batch · heads + head) · rows_per_head + seq holds the row of source
// head first_head + head as width4 texels (zero past `dim`); rows seq >= seq_len up to
// rows_per_head are zero, so the attention kernel can read whole key tiles. `fold` rows share
// one texture line:
// texel (x, y) = ((g % fold) · width4 + d4, g / fold).
//
// The host prelude declares binding 1 (`x_buf`) and its accessor `load_x` for the storage type.
//
// Dispatch: (groups_x, ceil(texels / 64 / groups_x), 1), one invocation per texel.

struct PackParams {
    // (batch, head, seq) element strides of the source; innermost contiguous.
    stride: vec4<u32>,
    heads: u32,
    seq_len: u32,
    dim: u32,
    width4: u32,
    rows_per_head: u32,
    fold: u32,
    texels: u32,
    groups_x: u32,
    // The source's head of packed head 0 (a group of heads packs heads first_head ..).
    first_head: u32,
}

@group(0) @binding({binding.params}) var<uniform> pack: PackParams;
@group(0) @binding({binding.pack_texture}) var packed: texture_storage_2d<rgba32float, write>;

@compute @workgroup_size(64)
fn pack_rows(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wg.y * pack.groups_x + wg.x) * 64u + lid;
    if i >= pack.texels {
        return;
    }
    let d4 = i % pack.width4;
    let g = i / pack.width4;
    let seq = g % pack.rows_per_head;
    let batch_head = g / pack.rows_per_head;
    var x = vec4<f32>(0.0);
    if seq < pack.seq_len {
        let base = (batch_head / pack.heads) * pack.stride.x + (batch_head % pack.heads + pack.first_head) * pack.stride.y
            + seq * pack.stride.z + d4 * 4u;
        for (var c = 0u; c < 4u; c++) {
            if d4 * 4u + c < pack.dim {
                x[c] = load_x(base + c);
            }
        }
    }
    textureStore(packed, vec2<u32>((g % pack.fold) * pack.width4 + d4, g / pack.fold), x);
}

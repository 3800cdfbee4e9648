// Typed access to a tensor in each storage type, so that one kernel body serves f32, native
// f16 and f16/bf16 packed two to a u32 word. The host (crates/wflash/src/kernels/wgsl.rs)
// instantiates a section per tensor: `{name}` is the tensor (q, k, v, o, x), `{binding}` its
// binding number. Sections are `//#section KIND STORAGE`; `//#import` lines pull in shared
// files once per kernel.

//#section load f32
@group(0) @binding({binding}) var<storage, read> {name}_buf: array<f32>;
fn load_{name}(i: u32) -> f32 {
    return {name}_buf[i];
}

//#section load f16
@group(0) @binding({binding}) var<storage, read> {name}_buf: array<f16>;
fn load_{name}(i: u32) -> f32 {
    return f32({name}_buf[i]);
}

//#section load f16packed
@group(0) @binding({binding}) var<storage, read> {name}_buf: array<u32>;
fn load_{name}(i: u32) -> f32 {
    return unpack2x16float({name}_buf[i >> 1u])[i & 1u];
}

// bf16 is the top half of an f32: move its 16 bits there.
//#section load bf16packed
@group(0) @binding({binding}) var<storage, read> {name}_buf: array<u32>;
fn load_{name}(i: u32) -> f32 {
    let w = {name}_buf[i >> 1u];
    return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (i & 1u) == 1u));
}

//#section store f32
@group(0) @binding({binding}) var<storage, read_write> {name}_buf: array<f32>;
fn store_{name}(i: u32, x: f32) {
    {name}_buf[i] = x;
}

//#section store f16
@group(0) @binding({binding}) var<storage, read_write> {name}_buf: array<f16>;
fn store_{name}(i: u32, x: f32) {
    {name}_buf[i] = f16(x);
}

// Packed types share a u32 word between two elements that another invocation (or workgroup)
// may own when rows have odd length, so they are written with atomics on their half only.
//#section store f16packed
@group(0) @binding({binding}) var<storage, read_write> {name}_buf: array<atomic<u32>>;
fn store_{name}(i: u32, x: f32) {
    store_half_{name}(i, pack2x16float(vec2<f32>(x, 0.0)) & 0xffffu);
}
fn store_half_{name}(i: u32, bits: u32) {
    let shift = (i & 1u) * 16u;
    atomicAnd(&{name}_buf[i >> 1u], ~(0xffffu << shift));
    atomicOr(&{name}_buf[i >> 1u], bits << shift);
}

//#section store bf16packed
//#import common/bf16.wgsl
@group(0) @binding({binding}) var<storage, read_write> {name}_buf: array<atomic<u32>>;
fn store_{name}(i: u32, x: f32) {
    store_half_{name}(i, f32_to_bf16_bits(x));
}
fn store_half_{name}(i: u32, bits: u32) {
    let shift = (i & 1u) * 16u;
    atomicAnd(&{name}_buf[i >> 1u], ~(0xffffu << shift));
    atomicOr(&{name}_buf[i >> 1u], bits << shift);
}

// Whole words of f32 `x` into storage `y`, for the conversion pass (convert.wgsl): one
// element, or one u32 word (two elements) for the packed types. Word w holds elements 2w (low
// half) and 2w + 1; a missing last one is 0.
//#section from_f32 f32
@group(0) @binding({binding}) var<storage, read_write> {name}: array<f32>;
fn convert_unit(i: u32) {
    {name}[i] = x[i];
}

//#section from_f32 f16
@group(0) @binding({binding}) var<storage, read_write> {name}: array<f16>;
fn convert_unit(i: u32) {
    {name}[i] = f16(x[i]);
}

//#section from_f32 f16packed
@group(0) @binding({binding}) var<storage, read_write> {name}: array<u32>;
fn convert_unit(i: u32) {
    let hi = select(0.0, x[min(2u * i + 1u, conv.len - 1u)], 2u * i + 1u < conv.len);
    {name}[i] = pack2x16float(vec2<f32>(x[2u * i], hi));
}

//#section from_f32 bf16packed
//#import common/bf16.wgsl
@group(0) @binding({binding}) var<storage, read_write> {name}: array<u32>;
fn convert_unit(i: u32) {
    let hi = select(0.0, x[min(2u * i + 1u, conv.len - 1u)], 2u * i + 1u < conv.len);
    {name}[i] = f32_to_bf16_bits(x[2u * i]) | (f32_to_bf16_bits(hi) << 16u);
}

// `fn {name}_unit(row: u32, u: u32) -> array<vec4<f32>, {unit_quads}>`: unit u of row `row` of
// a tensor of `{dim}`-element rows (a KV cache, decode.wgsl), as quads of elements. A CPU
// driver pays per load instruction, so units are as wide as a load goes: 16 bytes, one quad
// of f32 or two of packed f16 / bf16 (whose bits are the same whether the tensor is bound as
// `array<f16>` or as words). These need rows of whole units (`{dim}` a multiple of 4 for f32,
// of 8 for the 16-bit types; the host checks); `elements` reads any `{dim}` a quad at a time
// through `load_{name}`, zeros past it.
//#section unit f32
@group(0) @binding({binding}) var<storage, read> {name}_quads: array<vec4<f32>>;
fn {name}_unit(row: u32, u: u32) -> array<vec4<f32>, 1> {
    return array<vec4<f32>, 1>({name}_quads[row * {units}u + u]);
}

//#section unit f16
@group(0) @binding({binding}) var<storage, read> {name}_words: array<vec4<u32>>;
fn {name}_unit(row: u32, u: u32) -> array<vec4<f32>, 2> {
    let w = {name}_words[row * {units}u + u];
    return array<vec4<f32>, 2>(
        vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)),
        vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w)),
    );
}

//#section unit bf16
@group(0) @binding({binding}) var<storage, read> {name}_words: array<vec4<u32>>;
fn {name}_unit(row: u32, u: u32) -> array<vec4<f32>, 2> {
    let w = {name}_words[row * {units}u + u];
    return array<vec4<f32>, 2>(
        bitcast<vec4<f32>>(vec4<u32>(w.x << 16u, w.x & 0xffff0000u, w.y << 16u, w.y & 0xffff0000u)),
        bitcast<vec4<f32>>(vec4<u32>(w.z << 16u, w.z & 0xffff0000u, w.w << 16u, w.w & 0xffff0000u)),
    );
}

//#section unit elements
fn {name}_unit(row: u32, u: u32) -> array<vec4<f32>, 1> {
    let i = row * {dim}u + 4u * u;
    return array<vec4<f32>, 1>(vec4<f32>(
        load_{name}(i),
        select(0.0, load_{name}(i + 1u), 4u * u + 1u < {dim}u),
        select(0.0, load_{name}(i + 2u), 4u * u + 2u < {dim}u),
        select(0.0, load_{name}(i + 3u), 4u * u + 3u < {dim}u),
    ));
}

// `fn {name}(row: u32, key0: u32) -> vec4<f32>`: keys key0..key0 + 4 (key0 a multiple of 4) of
// packed row `row` of the texture `{prefix}_tex`, whose geometry is params.{prefix}_fold rows
// per line of params.{prefix}_width4 texels (pack_rows.wgsl). Without the modifier the function
// returns zeros and the binding does not exist.
//#section texture_rows present
@group(0) @binding({binding}) var {prefix}_tex: texture_storage_2d<rgba32float, read>;
fn {name}(row: u32, key0: u32) -> vec4<f32> {
    let texel = vec2<u32>((row % params.{prefix}_fold) * params.{prefix}_width4 + key0 / 4u, row / params.{prefix}_fold);
    return textureLoad({prefix}_tex, texel);
}

//#section texture_rows absent
fn {name}(row: u32, key0: u32) -> vec4<f32> {
    return vec4<f32>(0.0);
}

// The conversion pass's f32 source `{name}`, and its f32 destination filled from `load_x`.
//#section f32_source f32
@group(0) @binding({binding}) var<storage, read> {name}: array<f32>;

//#section to_f32 f32
@group(0) @binding({binding}) var<storage, read_write> {name}: array<f32>;
fn convert_unit(i: u32) {
    {name}[i] = load_x(i);
}

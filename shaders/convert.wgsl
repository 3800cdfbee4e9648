// Element-type conversion at the edges of the unrolled (CPU-adapter) forward family: Q to f32
// before attention, O from f32 after it.
//
// Why: the unrolled kernel then exists in f32 only. That is a quarter of the pipelines to
// compile (on llvmpipe a cold compile of one unrolled kernel takes 10-50 s), and none of the
// per-element atomics that a 16-bit store needs where two rows share a u32 word (hundreds of
// inlined atomic pairs, each a per-lane loop on a CPU driver). The price is one pass over Q
// and one over O, O(N·D) against attention's O(N²·D).
//
// The host prelude (kernel.rs, `convert_source`) declares bindings 1 (`x`, source) and 2
// (`y`, destination) and `fn convert_unit(unit: u32)`, which converts one element, or one u32
// word (two elements) for 16-bit types packed in words.
//
// Dispatch: (groups_x, ceil(units / 64 / groups_x), 1), one invocation per unit.

struct ConvertParams {
    // Elements in the tensor, and units (elements or words) to convert.
    len: u32,
    units: u32,
    groups_x: u32,
    _pad0: u32,
}

@group(0) @binding({binding.params}) var<uniform> conv: ConvertParams;

@compute @workgroup_size(64)
fn convert(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let unit = (wg.y * conv.groups_x + wg.x) * 64u + lid;
    if unit < conv.units {
        convert_unit(unit);
    }
}

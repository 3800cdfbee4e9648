// Merges partial softmax attention results over disjoint sets of keys (the splits of split-KV
// decoding, the shards of context or ring parallelism) into attention over all of them
// (semantics: wflash_ref::merge):
//
//   m = max_s lse_s,  lse = m + ln Σ_s exp(lse_s − m),  O = Σ_s exp(lse_s − lse) · O_s.
//
// A part whose row saw no key (lse_s = −∞) is skipped, whatever its output holds (an empty
// split's may be anything): its weight is exactly 0, which exp cannot promise on llvmpipe (it
// clamps its argument). A row no part saw gets O = 0 and lse = −∞. A NaN or +∞ LSE makes the row
// NaN.
//
// With SUM the parts are sums (sigmoid attention's split-KV partials, which no normaliser
// weighs): O = Σ_s O_s, and the LSE written is −∞ (sigmoid has none).
//
// Host prelude: `load_parts` (binding merge_parts: the parts' outputs stacked, part s from
// element s · part_stride) and `store_o` (binding merge_out) for the storage types, SUM.
//
// Dispatch: (groups_x, ceil(rows · value_dim / 64 / groups_x), 1), one invocation per output
// element; the invocation of column 0 also writes its row's LSE.

struct MergeParams {
    // The part count, for the record: the kernel reads it from the LSE binding's length.
    parts: u32,
    // Elements from one part's output to the next in the stacked buffer.
    part_stride: u32,
    // batch · heads · len, and the columns of a row.
    rows: u32,
    value_dim: u32,
    heads: u32,
    len: u32,
    // Output rows in [batch, len, heads] order (else [batch, heads, len], as the LSE).
    bshd: u32,
    groups_x: u32,
}

@group(0) @binding({binding.params}) var<uniform> params: MergeParams;
// [parts, batch, heads, len].
@group(0) @binding({binding.merge_lse}) var<storage, read> part_lse: array<f32>;
@group(0) @binding({binding.merge_lse_out}) var<storage, read_write> merged_lse: array<f32>;

// −∞ and NaN, read at run time: WGSL makes an infinite or NaN constant expression a
// shader-creation error (Chrome's Tint rejects them; naga lets them through), and the load of a
// private variable is not a constant expression.
var<private> NEG_INF_BITS: u32 = 0xff800000u;
var<private> NAN_BITS: u32 = 0x7fc00000u;

fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// The LSE index of output row `row` (output rows follow the layout; the LSE is [B, H, N]).
fn lse_index(row: u32) -> u32 {
    if params.bshd == 0u {
        return row;
    }
    let head = row % params.heads;
    let token = (row / params.heads) % params.len;
    let batch = row / (params.heads * params.len);
    return (batch * params.heads + head) * params.len + token;
}

@compute @workgroup_size(64)
fn merge(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wg.y * params.groups_x + wg.x) * 64u + lid;
    if i >= params.rows * params.value_dim {
        return;
    }
    let row = i / params.value_dim;
    let col = i % params.value_dim;
    let r = lse_index(row);
    // The part count comes from the LSE binding's length (the host binds exactly the parts'),
    // not the uniform block: lavapipe inlines a uniform that bounds a loop and recompiles the
    // kernel at every dispatch for as long as that unrolls the loop (docs/PERF.md), which
    // cost 4-90 ms per merge where the merge itself takes 0.3.
    let parts = arrayLength(&part_lse) / params.rows;
    if SUM {
        var total = 0.0;
        for (var s = 0u; s < parts; s++) {
            total += load_parts(s * params.part_stride + i);
        }
        store_o(i, total);
        if col == 0u {
            merged_lse[r] = bitcast<f32>(NEG_INF_BITS);
        }
        return;
    }
    var m = bitcast<f32>(NEG_INF_BITS);
    var nan = false;
    for (var s = 0u; s < parts; s++) {
        let l = part_lse[s * params.rows + r];
        nan = nan || is_nan(l);
        m = max(m, l);
    }
    var lse = bitcast<f32>(NEG_INF_BITS);
    var o = 0.0;
    // A +∞ LSE is no weight either (∞ − ∞): NaN, as in the reference.
    if nan || bitcast<u32>(m) == 0x7f800000u {
        lse = bitcast<f32>(NAN_BITS);
        o = lse;
    } else if bitcast<u32>(m) != NEG_INF_BITS {
        var sum = 0.0;
        for (var s = 0u; s < parts; s++) {
            let l = part_lse[s * params.rows + r];
            if bitcast<u32>(l) != NEG_INF_BITS {
                sum += exp(l - m);
            }
        }
        lse = m + log(sum);
        for (var s = 0u; s < parts; s++) {
            let l = part_lse[s * params.rows + r];
            if bitcast<u32>(l) != NEG_INF_BITS {
                o += exp(l - lse) * load_parts(s * params.part_stride + i);
            }
        }
    }
    store_o(i, o);
    if col == 0u {
        merged_lse[r] = lse;
    }
}

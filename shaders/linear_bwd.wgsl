// Linear attention's backward: the chunked form of wflash-ref's `linear::backward`, with no
// atomics (every gradient element is written by one invocation, in a fixed order), so it is
// deterministic. Composed after linear.wgsl, whose bindings, helpers and chunk passes it uses.
//
// The normaliser rides along as the state's extra column, as in the forward: with v̂ = [v, 1]
// and the readout r_i = scale · φ(q_i)ᵀ S_i = [numerator, denominator − eps], the gradient that
// reaches the readout is ĝ_i = [dO_i / δ_i, −dO_i·numerator_i / δ_i²] (just dO_i without the
// normaliser). Then, with D_i = ∂L/∂S_i (KEY_DIM × columns) and A[t] the part of
// D_{end−1} that comes from after chunk t (A[last] = d_final):
//     dφ(q_i) = scale · Σ_{j ≤ i in the chunk} λ^{i−j} (ĝ_i·v̂_j) φ(k_j) + scale · λ^{i−start+1} S_before ĝ_i
//     A[t−1] = ΔD_t + λ^{len_t} A[t],  ΔD_t = scale · Σ_{i in t} λ^{i−start+1} φ(q_i) ĝ_iᵀ
//     dφ(k_j) = scale · Σ_{i ≥ j in the chunk} λ^{i−j} (ĝ_i·v̂_j) φ(q_i) + λ^{end−1−j} A[t] v̂_j
//     dv_j    = scale · Σ_{i ≥ j in the chunk} λ^{i−j} (φ(q_i)·φ(k_j)) g_i + λ^{end−1−j} A[t]ᵀ φ(k_j)
// summed over the query heads that share k_j and v_j (GQA), and dS0 = A[−1] (S_i = λ S_{i−1}
// + …, so what reaches S_{start−1} from chunk t is λ D_start). Non-causal: no intra-chunk
// part; S and D are the totals (slot `chunks`).
//
// Passes, after the forward's chunk-state and prefix passes have rebuilt S_before:
//   1. linear_bwd_readout      (parallel over tokens): ĝ into a packed texture (the forward's
//                              output rows recomputed when normalising);
//   2. linear_bwd_chunk_dstate (parallel over chunks): ΔD_t, into `chunk_states`;
//   3. linear_bwd_chunk_dprefix (sequential over chunks, backwards): A[t] from d_final
//                              (`kv_in`, `z_in`), and dS0 (`kv_out`, `z_out`);
//   4. linear_bwd_dq           (parallel over tokens): dQ, reading S_before from `state_tex`;
//   5. linear_bwd_dkdv         (parallel over tokens of a kv head): dK and dV, reading
//                              A from `state_tex`.
//
// Host prelude: C4 = ceil(columns / 4) texels of a ĝ row, and the accessors `load_do` (binding
// linear_do) and `store_dq`, `store_dk`, `store_dv` for the storage type. Packed Q and ĝ rows
// are numbered per query head of the group (`q_row`), K and V rows per kv head of the group
// (`kv_row`), all with `params.tex_fold` rows per texture line.

@group(0) @binding({binding.linear_q_tex}) var q_tex: texture_storage_2d<rgba32float, read>;
@group(0) @binding({binding.linear_grad_tex}) var grad_tex: texture_storage_2d<rgba32float, read>;
@group(0) @binding({binding.linear_grad_out}) var grad_out: texture_storage_2d<rgba32float, write>;

// The packed row of token `token` of query head `head` of batch element `batch` (Q and ĝ,
// which hold the heads of this group, params.head_base ..).
fn q_row(batch: u32, head: u32, token: u32) -> u32 {
    return (batch * params.state_heads + head - params.head_base) * params.tex_rows_per_head + token;
}

fn packed_q(row: u32, d4: u32) -> vec4<f32> {
    return textureLoad(q_tex, packed_texel(row, D4, d4));
}

fn packed_grad(row: u32, c4: u32) -> vec4<f32> {
    return textureLoad(grad_tex, packed_texel(row, C4, c4));
}

// v̂_j = [v_j, 1] as C4 texels: the value row, and 1 in the normaliser's column.
fn v_hat(row: u32) -> array<vec4<f32>, C4> {
    var x = array<vec4<f32>, C4>();
//#unroll c C4
    if {c} < DV4 {
        x[{c}] = packed_v(row, DV4, {c});
    }
//#end
    // (min keeps the constant index in bounds where NORMALIZE is false and the branch dead.)
    if NORMALIZE {
        x[min(VALUE_DIM / 4u, C4 - 1u)][VALUE_DIM % 4u] = 1.0;
    }
    return x;
}

// φ'(x), elementwise (the branch φ takes: elu + 1's exp at or below zero, relu's 0 there).
fn phi_slope(x: vec4<f32>) -> vec4<f32> {
    if FEATURE == 1u {
        return select(exp(x), vec4<f32>(1.0), x > vec4<f32>(0.0));
    }
    if FEATURE == 2u {
        return select(vec4<f32>(0.0), vec4<f32>(1.0), x > vec4<f32>(0.0));
    }
    return vec4<f32>(1.0);
}

// Pass 1: ĝ of ROWS consecutive tokens per invocation. Dispatch (ceil(len / (64 · ROWS)),
// the group's heads, batch).
@compute @workgroup_size(WORKGROUP)
fn linear_bwd_readout(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i0 = (wg.x * WORKGROUP + lid) * ROWS;
    if i0 >= params.len {
        return;
    }
    let head = wg.y + params.head_base;
    let batch = wg.z;
    var rows = OutputRows();
    if NORMALIZE {
        rows = output_rows(batch, head, i0);
    }
//#unroll r ROWS
    if i0 + {r} < params.len {
        let i = i0 + {r};
        let do_base = batch * params.o_stride.x + head * params.o_stride.y + i * params.o_stride.z;
        let den = rows.den[{r}] + params.eps;
        var grad = array<vec4<f32>, C4>();
        var d_den = 0.0;
//#unroll e DV4
        {
            let d_o = load_do4(do_base, {e} * 4u);
            if NORMALIZE {
                grad[{e}] = d_o / den;
                d_den -= dot(d_o, rows.o[{r} * DV4 + {e}]);
            } else {
                grad[{e}] = d_o;
            }
        }
//#end
        if NORMALIZE {
            grad[min(VALUE_DIM / 4u, C4 - 1u)][VALUE_DIM % 4u] = d_den / (den * den);
        }
        let row = q_row(batch, head, i);
//#unroll c C4
        textureStore(grad_out, packed_texel(row, C4, {c}), grad[{c}]);
//#end
    }
//#end
}

// Pass 2: ΔD_t for chunk t, four state columns (4·c4 ..) per invocation. Dispatch
// (chunks · ceil(C4 / 64), the group's heads, batch).
@compute @workgroup_size(WORKGROUP)
fn linear_bwd_chunk_dstate(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let wg_per_chunk = (C4 + WORKGROUP - 1u) / WORKGROUP;
    let t = wg.x / wg_per_chunk;
    let c4 = (wg.x % wg_per_chunk) * WORKGROUP + lid;
    if c4 >= C4 || t >= params.chunks {
        return;
    }
    let head = wg.y + params.head_base;
    let batch = wg.z;
    let start = t * params.chunk;
    let end = min(start + params.chunk, params.len);
    var s = array<vec4<f32>, D4 * 4u>();
//#unroll d D4
//#unroll x 4
    s[{d} * 4u + {x}] = vec4<f32>(0.0);
//#end
//#end
    for (var i = start; i < end; i++) {
        let row = q_row(batch, head, i);
        // Decayed to the state before the chunk: λ^(i − start + 1).
        let g = packed_grad(row, c4) * (decay_pow(head, i - start + 1u) * params.scale);
//#unroll d D4
        {
            let q = phi_at(packed_q(row, {d}), {d});
//#unroll x 4
            s[{d} * 4u + {x}] += q[{x}] * g;
//#end
        }
//#end
    }
//#unroll d D4
//#unroll x 4
    if {d} * 4u + {x} < KEY_DIM {
        chunk_states[state_row(batch, head, t, {d} * 4u + {x}) * (params.pitch / 4u) + c4] = s[{d} * 4u + {x}];
    }
//#end
//#end
}

// Pass 3: A[t] for every chunk, last to first, from d_final (the initial state's bindings,
// `params.has_initial` its bits), and dS0 = A[−1] into the final state's bindings.
// Non-causal: the total Σ ΔD_t into slot `chunks`. One invocation per state row and group of
// 4 columns. Dispatch (ceil(KEY_DIM · C4 / 64), the group's heads, batch).
@compute @workgroup_size(WORKGROUP)
fn linear_bwd_chunk_dprefix(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = wg.x * WORKGROUP + lid;
    if g >= C4 * KEY_DIM {
        return;
    }
    let c4 = g % C4;
    let d = g / C4;
    let head = wg.y + params.head_base;
    let batch = wg.z;
    let bh = batch * params.q_heads + head;
    let row4 = params.pitch / 4u;
    if params.causal == 0u {
        var total = vec4<f32>(0.0);
        for (var t = 0u; t < params.chunks; t++) {
            total += chunk_states[state_row(batch, head, t, d) * row4 + c4];
        }
        chunk_states[state_row(batch, head, params.chunks, d) * row4 + c4] = total;
        return;
    }
    var s = initial4(bh, d, c4);
    for (var n = 0u; n < params.chunks; n++) {
        let t = params.chunks - 1u - n;
        let carried = decay_pow(head, min(params.chunk, params.len - t * params.chunk));
        let at = state_row(batch, head, t, d) * row4 + c4;
        let own = chunk_states[at];
        chunk_states[at] = s;
        s = s * carried + own;
    }
    for (var y = 0u; y < 4u; y++) {
        let c = c4 * 4u + y;
        if c < VALUE_DIM {
            kv_out[(bh * KEY_DIM + d) * VALUE_DIM + c] = s[y];
        } else if NORMALIZE && c == VALUE_DIM {
            z_out[bh * KEY_DIM + d] = s[y];
        }
    }
}

// Pass 4: dQ of ROWS consecutive tokens per invocation, all in one chunk. Dispatch
// (ceil(len / (64 · ROWS)), the group's heads, batch).
@compute @workgroup_size(WORKGROUP)
fn linear_bwd_dq(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i0 = (wg.x * WORKGROUP + lid) * ROWS;
    if i0 >= params.len {
        return;
    }
    let head = wg.y + params.head_base;
    let batch = wg.z;
    let causal = params.causal != 0u;
    let t = i0 / params.chunk;
    let start = t * params.chunk;
    // Row r is token i0 + r; rows past the end compute on the last token and are not stored.
    var grad = array<vec4<f32>, ROWS * C4>();
    var acc = array<vec4<f32>, ROWS * D4>();
    var carried = array<f32, ROWS>();
//#unroll r ROWS
    {
        let i = min(i0 + {r}, params.len - 1u);
        let row = q_row(batch, head, i);
//#unroll c C4
        grad[{r} * C4 + {c}] = packed_grad(row, {c});
//#end
//#unroll d D4
        acc[{r} * D4 + {d}] = vec4<f32>(0.0);
//#end
        carried[{r}] = select(1.0, decay_pow(head, i - start + 1u), causal);
    }
//#end
    var slot = params.chunks;
    if causal {
        slot = t;
        let last = min(i0 + ROWS, params.len);
        for (var j = start; j < last; j++) {
            let row = kv_row(batch, head / params.group, j);
            let v = v_hat(row);
            var weight = array<f32, ROWS>();
//#unroll r ROWS
            {
                var gv = 0.0;
//#unroll c C4
                gv += dot(grad[{r} * C4 + {c}], v[{c}]);
//#end
                let i = i0 + {r};
                weight[{r}] = select(0.0, gv * decay_pow(head, select(0u, i - j, j <= i)), j <= i);
            }
//#end
//#unroll d D4
            {
                let k = phi_at(packed_k(row, D4, {d}), {d});
//#unroll r ROWS
                acc[{r} * D4 + {d}] += weight[{r}] * k;
//#end
            }
//#end
        }
    }
    // The carried state: S_before ĝ_i, one state row d at a time (a dynamic loop, as the
    // forward's output pass), into an array of its own: a private array indexed dynamically
    // anywhere stays out of registers, and `acc` is updated for every key above.
    var from_state = array<vec4<f32>, ROWS * D4>();
    for (var d = 0u; d < KEY_DIM; d++) {
        var sg = array<f32, ROWS>();
//#unroll c C4
        {
            let s = state_texel(batch, head, slot, d, {c});
//#unroll r ROWS
            sg[{r}] += dot(s, grad[{r} * C4 + {c}]);
//#end
        }
//#end
//#unroll r ROWS
        from_state[{r} * D4 + d / 4u][d % 4u] = carried[{r}] * sg[{r}];
//#end
    }
//#unroll r ROWS
    if i0 + {r} < params.len {
        let q_base = batch * params.q_stride.x + head * params.q_stride.y + (i0 + {r}) * params.q_stride.z;
//#unroll d D4
        store_dq4(q_base, {d} * 4u, phi_slope(load_q4(q_base, {d} * 4u)) * (acc[{r} * D4 + {d}] + from_state[{r} * D4 + {d}]) * params.scale);
//#end
    }
//#end
}

// Pass 5: dK and dV of ROWS consecutive tokens of one kv head per invocation, all in one
// chunk, summed over the kv head's query heads in order. Dispatch (ceil(len / (64 · ROWS)),
// the group's kv heads, batch).
@compute @workgroup_size(WORKGROUP)
fn linear_bwd_dkdv(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j0 = (wg.x * WORKGROUP + lid) * ROWS;
    if j0 >= params.len {
        return;
    }
    let kv_head = wg.y + params.head_base / params.group;
    let batch = wg.z;
    let causal = params.causal != 0u;
    let t = j0 / params.chunk;
    let start = t * params.chunk;
    let end = min(start + params.chunk, params.len);
    // Row r is token j0 + r; rows past the end compute on the last token and are not stored.
    var k = array<vec4<f32>, ROWS * D4>();
    var v = array<vec4<f32>, ROWS * C4>();
    var dk = array<vec4<f32>, ROWS * D4>();
    var dv = array<vec4<f32>, ROWS * DV4>();
    // The state term's share of dK and a copy of φ(k) for it, apart from `dk` and `k`: the
    // state loop indexes them dynamically, and a private array indexed dynamically anywhere
    // stays out of registers (`dk` and `k` serve every (query, key) pair of the chunk).
    var dk_state = array<vec4<f32>, ROWS * D4>();
    var k_state = array<vec4<f32>, ROWS * D4>();
    // The rows' own k and v̂ come from storage (read once; the texture budget of a kernel,
    // 4 as WebGPU's default, goes to Q, ĝ and the state gradients).
//#unroll r ROWS
    {
        let j = min(j0 + {r}, params.len - 1u);
        let k_base = batch * params.k_stride.x + kv_head * params.k_stride.y + j * params.k_stride.z;
        let v_base = batch * params.v_stride.x + kv_head * params.v_stride.y + j * params.v_stride.z;
//#unroll c C4
        v[{r} * C4 + {c}] = load_v4(v_base, {c} * 4u);
//#end
        if NORMALIZE {
            v[{r} * C4 + min(VALUE_DIM / 4u, C4 - 1u)][VALUE_DIM % 4u] = 1.0;
        }
//#unroll d D4
        k[{r} * D4 + {d}] = phi_at(load_k4(k_base, {d} * 4u), {d});
        k_state[{r} * D4 + {d}] = k[{r} * D4 + {d}];
        dk[{r} * D4 + {d}] = vec4<f32>(0.0);
//#end
//#unroll e DV4
        dv[{r} * DV4 + {e}] = vec4<f32>(0.0);
//#end
    }
//#end
    for (var h = 0u; h < params.group; h++) {
        let head = kv_head * params.group + h;
        var slot = params.chunks;
        if causal {
            slot = t;
            // The queries of this chunk from the first row on; each row masks those before it.
            for (var i = j0; i < end; i++) {
                let row = q_row(batch, head, i);
                var q = array<vec4<f32>, D4>();
//#unroll d D4
                q[{d}] = phi_at(packed_q(row, {d}), {d});
//#end
                var g = array<vec4<f32>, C4>();
//#unroll c C4
                g[{c}] = packed_grad(row, {c});
//#end
//#unroll r ROWS
                {
                    let j = j0 + {r};
                    let weight = select(0.0, decay_pow(head, select(0u, i - j, i >= j)), i >= j) * params.scale;
                    var gv = 0.0;
//#unroll c C4
                    gv += dot(g[{c}], v[{r} * C4 + {c}]);
//#end
                    var qk = 0.0;
//#unroll d D4
                    qk += dot(q[{d}], k[{r} * D4 + {d}]);
//#end
                    let a = weight * gv;
                    let b = weight * qk;
//#unroll d D4
                    dk[{r} * D4 + {d}] += a * q[{d}];
//#end
//#unroll e DV4
                    dv[{r} * DV4 + {e}] += b * g[{e}];
//#end
                }
//#end
            }
        }
        // The state term: A[t] (the total D when non-causal; scale is in it), weighted
        // λ^(end − 1 − j).
        var carried = array<f32, ROWS>();
//#unroll r ROWS
        carried[{r}] = select(1.0, decay_pow(head, end - 1u - min(j0 + {r}, end - 1u)), causal);
//#end
        for (var d = 0u; d < KEY_DIM; d++) {
            // One dynamic read of φ(k)[d] and one dynamic write of dK[d] per row and state
            // row; the sums over the state's columns stay in registers.
            var kd = array<f32, ROWS>();
            var dkd = array<f32, ROWS>();
//#unroll r ROWS
            kd[{r}] = carried[{r}] * k_state[{r} * D4 + d / 4u][d % 4u];
//#end
//#unroll c C4
            {
                let s = state_texel(batch, head, slot, d, {c});
//#unroll r ROWS
                {
                    dkd[{r}] += dot(s, v[{r} * C4 + {c}]);
                    // Texels past DV4 hold only the normaliser's column, which has no dV
                    // (min keeps the constant index in bounds where the branch is dead).
                    if {c} < DV4 {
                        dv[{r} * DV4 + min({c}, DV4 - 1u)] += kd[{r}] * s;
                    }
                }
//#end
            }
//#end
//#unroll r ROWS
            dk_state[{r} * D4 + d / 4u][d % 4u] += carried[{r}] * dkd[{r}];
//#end
        }
    }
//#unroll r ROWS
    if j0 + {r} < params.len {
        let j = j0 + {r};
        let k_base = batch * params.k_stride.x + kv_head * params.k_stride.y + j * params.k_stride.z;
        let v_base = batch * params.v_stride.x + kv_head * params.v_stride.y + j * params.v_stride.z;
//#unroll d D4
        store_dk4(k_base, {d} * 4u, phi_slope(load_k4(k_base, {d} * 4u)) * (dk[{r} * D4 + {d}] + dk_state[{r} * D4 + {d}]));
//#end
//#unroll e DV4
        store_dv4(v_base, {e} * 4u, dv[{r} * DV4 + {e}]);
//#end
    }
//#end
}

// Elements [start, start + 4) of the V row at `base` (zeros past VALUE_DIM).
fn load_v4(base: u32, start: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        if start + c < VALUE_DIM {
            x[c] = load_v(base + start + c);
        }
    }
    return x;
}

// Elements [start, start + 4) of the dO row at `base` (zeros past VALUE_DIM).
fn load_do4(base: u32, start: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        if start + c < VALUE_DIM {
            x[c] = load_do(base + start + c);
        }
    }
    return x;
}

// Elements [start, start + 4) of a dQ or dK row at `base`, those below KEY_DIM.
fn store_dq4(base: u32, start: u32, x: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        if start + c < KEY_DIM {
            store_dq(base + start + c, x[c]);
        }
    }
}

fn store_dk4(base: u32, start: u32, x: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        if start + c < KEY_DIM {
            store_dk(base + start + c, x[c]);
        }
    }
}

// Elements [start, start + 4) of a dV row at `base`, those below VALUE_DIM.
fn store_dv4(base: u32, start: u32, x: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        if start + c < VALUE_DIM {
            store_dv(base + start + c, x[c]);
        }
    }
}

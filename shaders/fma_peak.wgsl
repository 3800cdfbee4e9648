// FMA peak probe for the benchmark: each invocation runs ITERATIONS steps of 32 independent
// vec4 fused multiply-adds (8 accumulators, body unrolled 4×), i.e. 256 FLOPs per step.
// Inputs come from a storage buffer so nothing folds at compile time, and the result is
// stored under a condition the compiler cannot decide (it never holds for the seeds the host
// passes), so nothing is eliminated and no memory traffic is timed. llvmpipe limits an invocation to 65535 loop
// iterations in total, so ITERATIONS stays well below that.

override ITERATIONS: u32 = 512u;

@group(0) @binding(0) var<storage, read> seed: array<vec4<f32>, 3>;
@group(0) @binding(1) var<storage, read_write> sink: array<vec4<f32>, 1>;

@compute @workgroup_size(64, 1, 1)
fn fma_peak(@builtin(global_invocation_id) gid: vec3<u32>) {
    let b = seed[0];
    let c = seed[1];
    let x = f32(gid.x & 7u) * 1.0e-3;
    var a0 = vec4<f32>(x + 0.1);
    var a1 = vec4<f32>(x + 0.2);
    var a2 = vec4<f32>(x + 0.3);
    var a3 = vec4<f32>(x + 0.4);
    var a4 = vec4<f32>(x + 0.5);
    var a5 = vec4<f32>(x + 0.6);
    var a6 = vec4<f32>(x + 0.7);
    var a7 = vec4<f32>(x + 0.8);
    for (var it = 0u; it < ITERATIONS; it++) {
        a0 = fma(a0, b, c); a1 = fma(a1, b, c); a2 = fma(a2, b, c); a3 = fma(a3, b, c);
        a4 = fma(a4, b, c); a5 = fma(a5, b, c); a6 = fma(a6, b, c); a7 = fma(a7, b, c);
        a0 = fma(a0, b, c); a1 = fma(a1, b, c); a2 = fma(a2, b, c); a3 = fma(a3, b, c);
        a4 = fma(a4, b, c); a5 = fma(a5, b, c); a6 = fma(a6, b, c); a7 = fma(a7, b, c);
        a0 = fma(a0, b, c); a1 = fma(a1, b, c); a2 = fma(a2, b, c); a3 = fma(a3, b, c);
        a4 = fma(a4, b, c); a5 = fma(a5, b, c); a6 = fma(a6, b, c); a7 = fma(a7, b, c);
        a0 = fma(a0, b, c); a1 = fma(a1, b, c); a2 = fma(a2, b, c); a3 = fma(a3, b, c);
        a4 = fma(a4, b, c); a5 = fma(a5, b, c); a6 = fma(a6, b, c); a7 = fma(a7, b, c);
    }
    let total = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
    if total.x == seed[2].x {
        sink[0] = total;
    }
}

// Shader read-bandwidth probe for the benchmark: the fastest way found to read a storage
// buffer from WGSL on llvmpipe (docs/PERF.md, 2026-12-02): invocations stride over the buffer
// eight vec4<u32> at a time (independent loads), so consecutive invocations read neighbouring
// bytes. What they read is folded into one word each and stored, so nothing is eliminated;
// the store is 1/2048 of the bytes read. A memory-bound kernel that reads a buffer once is
// measured against this (and against copy_buffer_to_buffer, which is not a shader).

@group(0) @binding(0) var<storage, read> source: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> sink: array<u32>;

@compute @workgroup_size(64, 1, 1)
fn read_peak(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let stride = groups.x * 64u * 8u;
    let n = arrayLength(&source);
    var x = vec4<u32>(0u);
    for (var i = gid.x * 8u; i + 8u <= n; i += stride) {
        x ^= source[i] ^ source[i + 1u] ^ source[i + 2u] ^ source[i + 3u] ^ source[i + 4u]
            ^ source[i + 5u] ^ source[i + 6u] ^ source[i + 7u];
    }
    sink[gid.x] = x.x ^ x.y ^ x.z ^ x.w;
}

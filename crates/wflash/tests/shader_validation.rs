//! Every kernel the engine can build ([`kernels::all_variants`]) is parsed and validated by
//! naga, specialised with its override constants, and translated to SPIR-V, MSL, HLSL and GLSL
//! (wgpu's GL backend). This is how Metal, DX12 and GL are covered on a Linux machine with no
//! GPU.

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use wflash::kernels::{self, Family, Kernel, KernelId, LinearKey, LinearPass, Storage, TileConfig};
use wflash::{FeatureMap, ModifierSet};

/// Head/value dims covering every private-array capacity (8..=256), odd and unequal pairs, and
/// the rows-per-invocation classes of the unrolled kernel.
const DIMS: [(u32, u32); 5] = [(1, 1), (16, 33), (59, 111), (128, 128), (200, 77)];

fn compile_everywhere(kernel: &KernelId) {
    let label = kernel.label();
    let source = kernel.source();
    let unexpanded = source.lines().any(|l| l.trim_start().starts_with("//#"));
    assert!(!unexpanded, "{label}: unexpanded marker");
    compile_source_everywhere(&label, &source, kernel.entry_point(), &kernel.constants());
}

fn compile_source_everywhere(
    label: &str,
    source: &str,
    entry_point: &str,
    constants: &[(&str, f64)],
) {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{label}: {}", e.emit_to_string(source)));
    let mut validator = Validator::new(ValidationFlags::all(), Capabilities::all());
    let info = validator
        .validate(&module)
        .unwrap_or_else(|e| panic!("{label}: {e:?}"));
    let constants: naga::back::PipelineConstants =
        constants.iter().map(|&(k, v)| (k.to_string(), v)).collect();
    let (module, info) =
        naga::back::pipeline_constants::process_overrides(&module, &info, None, &constants)
            .unwrap_or_else(|e| panic!("{label}: overrides: {e:?}"));
    let module = module.into_owned();
    let info = info.into_owned();

    let pipeline = spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: entry_point.into(),
    };
    spv::write_vec(&module, &info, &spv::Options::default(), Some(&pipeline))
        .unwrap_or_else(|e| panic!("{label}: SPIR-V: {e:?}"));

    let msl_pipeline = msl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, entry_point.into())),
        ..Default::default()
    };
    msl::write_string(&module, &info, &msl::Options::default(), &msl_pipeline)
        .unwrap_or_else(|e| panic!("{label}: MSL: {e:?}"));

    let mut hlsl_out = String::new();
    let hlsl_options = hlsl::Options {
        shader_model: hlsl::ShaderModel::V6_2,
        ..Default::default()
    };
    hlsl::Writer::new(
        &mut hlsl_out,
        &hlsl_options,
        &hlsl::PipelineOptions::default(),
    )
    .write(&module, &info, None)
    .unwrap_or_else(|e| panic!("{label}: HLSL: {e:?}"));

    // GLSL ES 3.10, what wgpu's GL backend asks for on compute (Mesa's llvmpipe GL among them).
    // GL has no 16-bit floats: the engine never builds native-f16 kernels there (no SHADER_F16).
    if source.contains("enable f16;") {
        return;
    }
    let mut glsl_out = String::new();
    let glsl_options = glsl::Options {
        version: glsl::Version::Embedded {
            version: 310,
            is_webgl: false,
        },
        ..Default::default()
    };
    let glsl_pipeline = glsl::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: entry_point.into(),
        multiview: None,
    };
    glsl::Writer::new(
        &mut glsl_out,
        &module,
        &info,
        &glsl_options,
        &glsl_pipeline,
        naga::proc::BoundsCheckPolicies::default(),
    )
    .and_then(|mut writer| writer.write().map(|_| ()))
    .unwrap_or_else(|e| panic!("{label}: GLSL: {e:?}"));
}

/// Compiles `kernels` on all cores (a plain loop takes minutes).
fn compile_all(kernels: &[KernelId]) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for chunk in kernels.chunks(kernels.len().div_ceil(threads).max(1)) {
            scope.spawn(move || chunk.iter().for_each(compile_everywhere));
        }
    });
}

/// Every tile the tuner may choose, every compiled-modifier subset, both variants and causal
/// settings, every storage type and pass: all of them, at DIMS.
#[test]
fn every_variant_validates_and_translates() {
    let kernels = kernels::all_variants(&DIMS);
    let forward = |family| {
        kernels
            .iter()
            .filter(|k| matches!(k, KernelId::Forward(f) if f.family == family))
            .count()
    };
    // Tiled: 4 storage types × every tile × 2 causal × 2 variants × every modifier subset.
    let subsets = ModifierSet::all_compiled().subsets().count();
    assert_eq!(subsets, 16);
    let tiled_tiles = kernels::TILED_BLOCK_MS.len() * kernels::TILED_BLOCK_NS.len();
    assert_eq!(
        forward(Family::Tiled),
        DIMS.len() * 4 * tiled_tiles * 4 * subsets
    );
    let unrolled_tiles: usize = DIMS
        .iter()
        .map(|&(d, dv)| kernels::unrolled_tiles(d, dv).len())
        .sum();
    assert_eq!(forward(Family::Unrolled), unrolled_tiles * 4 * subsets);
    let others: Vec<KernelId> = (kernels.into_iter())
        .filter(|k| !matches!(k, KernelId::Backward(_) | KernelId::Reduce(_)))
        .collect();
    compile_all(&others);
}

/// The backward passes (a test of their own, so the two run side by side): at DIMS, the prep
/// pass per variant, the dK/dV and dQ passes causal or not × variants × every modifier subset
/// (× the bias gradient with a bias), the sinks pass and the reduction.
#[test]
fn every_backward_variant_validates_and_translates() {
    let kernels: Vec<KernelId> = (kernels::all_variants(&DIMS).into_iter())
        .filter(|k| matches!(k, KernelId::Backward(_) | KernelId::Reduce(_)))
        .collect();
    // The reduction and the sinks pass; per dims and variant: one prep pass; dK/dV 2 causal ×
    // 16 subsets; dQ 2 × (16 + 8 with the bias gradient).
    assert_eq!(kernels.len(), 2 + DIMS.len() * 2 * (1 + 2 * 16 + 2 * 24));
    compile_all(&kernels);
}

#[test]
fn every_variant_the_planner_picks_is_among_all_variants() {
    let kernels = kernels::all_variants(&DIMS);
    for &(d, dv) in &DIMS {
        let tile = kernels::unrolled_tile(d, dv);
        assert!(kernels.iter().any(|k| matches!(k,
            KernelId::Forward(f) if f.family == Family::Unrolled && f.tile == tile && f.head_dim == d && f.value_dim == dv)));
        for pass in LinearPass::ALL {
            // The forward's output pass takes rows by its value width, the backward's passes
            // by the ĝ row's (value columns and the normaliser's).
            let (d, dv) = (d.min(128), dv.min(128));
            let rows = match pass {
                LinearPass::ChunkOutput => kernels::linear_rows(d, dv, 64),
                p if p.has_rows() => kernels::linear_rows(d, dv + 1, 64),
                _ => 1,
            };
            let key = LinearKey {
                pass,
                storage: Storage::Bf16Packed,
                key_dim: d,
                value_dim: dv,
                feature_map: FeatureMap::EluPlusOne,
                normalize: true,
                rows,
            };
            assert!(kernels.contains(&KernelId::Linear(key)), "{key:?}");
        }
    }
    let default_tiled = TileConfig {
        block_m: 64,
        block_n: 32,
    };
    assert!(kernels::tiled_tiles().contains(&default_tiled));
}

#[test]
fn unroll_markers_expand_nested_blocks() {
    let template = "a\n//#unroll i 2\nx{i}\n//#unroll j N\ny{i}{j}\n//#end\n//#end\nb\n";
    let out = kernels::expand_unrolls(template, &[("N", 3)]);
    assert_eq!(
        out,
        "a\nx0u\ny0u0u\ny0u1u\ny0u2u\nx1u\ny1u0u\ny1u1u\ny1u2u\nb\n"
    );
}

/// Member offsets of WGSL struct `name` in `source`, by member name.
fn wgsl_layout(source: &str, name: &str) -> (usize, Vec<(String, usize)>) {
    let module = naga::front::wgsl::parse_str(source).expect("parses");
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).expect("layout");
    let (handle, ty) = module
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("struct {name}"));
    let naga::TypeInner::Struct { members, span } = &ty.inner else {
        panic!("{name} is not a struct")
    };
    assert_eq!(layouter[handle].size, *span);
    let members = members
        .iter()
        .map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize))
        .collect();
    (*span as usize, members)
}

/// Asserts that a repr(C) Rust struct and a WGSL struct have the same size and the same offset
/// for every member, matched by name.
macro_rules! assert_same_layout {
    ($source:expr, $rust:ty, $wgsl:literal, [$($field:ident),* $(,)?]) => {{
        let (size, members) = wgsl_layout($source, $wgsl);
        assert_eq!(size, size_of::<$rust>(), "size of {}", $wgsl);
        let rust = [$((stringify!($field), std::mem::offset_of!($rust, $field))),*];
        assert_eq!(rust.len(), members.len(), "member count of {}", $wgsl);
        for ((name, offset), (wgsl_name, wgsl_offset)) in rust.iter().zip(&members) {
            assert_eq!(name, wgsl_name, "member order of {}", $wgsl);
            assert_eq!(offset, wgsl_offset, "offset of {}.{name}", $wgsl);
        }
    }};
}

#[test]
fn host_structs_match_wgsl_layout() {
    let flash = kernels::all_variants(&[(64, 64)])
        .into_iter()
        .find(|k| matches!(k, KernelId::Forward(f) if f.family == Family::Unrolled))
        .expect("an unrolled kernel")
        .source();
    assert_same_layout!(
        &flash,
        wflash::FlashParams,
        "Params",
        [
            q_heads,
            kv_heads,
            tex_rows_per_head,
            tex_rows_per_batch,
            q_stride,
            k_stride,
            v_stride,
            o_stride,
            row_batch_stride,
            row_head_stride,
            tex_fold,
            flags,
            q_scale,
            score_unit,
            softcap,
            window_left,
            window_right,
            bias_batch_rows,
            bias_head_rows,
            bias_fold,
            bias_width4,
            mask_fold,
            mask_width4,
            prefix_len,
            chunk,
            _pad0,
            _pad1,
            _pad2,
        ]
    );
    assert_same_layout!(
        &flash,
        wflash::SequenceInfo,
        "Sequence",
        [
            q_offset,
            q_len,
            kv_offset,
            kv_len,
            key_lo,
            key_hi,
            diag_offset,
            sigmoid_bias
        ]
    );
    let linear = LinearKey {
        pass: LinearPass::ChunkOutput,
        storage: Storage::F32,
        key_dim: 64,
        value_dim: 64,
        feature_map: FeatureMap::Identity,
        normalize: false,
        rows: 4,
    }
    .source();
    assert_same_layout!(
        &linear,
        wflash::LinearParams,
        "LinearParams",
        [
            q_stride,
            k_stride,
            v_stride,
            o_stride,
            q_heads,
            group,
            len,
            chunk,
            chunks,
            columns,
            pitch,
            tex_rows_per_head,
            tex_fold,
            state_fold,
            scale,
            eps,
            has_initial,
            causal,
            decay_stride,
            head_base,
            state_heads,
            _pad1,
            _pad2,
            _pad3,
        ]
    );
    let backward = kernels::all_variants(&[(64, 64)])
        .into_iter()
        .find(|k| matches!(k, KernelId::Backward(_)))
        .expect("a backward kernel")
        .source();
    assert_same_layout!(
        &backward,
        wflash::BackwardParams,
        "Backward",
        [
            q_rows_per_head,
            q_rows_per_batch,
            q_fold,
            do_fold,
            q_len,
            kv_len,
            prep_blocks,
            _pad0,
        ]
    );
    let decode = kernels::all_variants(&[(64, 64)])
        .into_iter()
        .find(|k| matches!(k, KernelId::Decode(_)))
        .expect("a decode kernel")
        .source();
    assert_same_layout!(
        &decode,
        wflash::DecodeParams,
        "DecodeParams",
        [
            q_stride,
            o_stride,
            new_stride,
            batch,
            q_heads,
            kv_heads,
            group,
            tokens,
            capacity,
            splits,
            keys_per_split,
            row_blocks,
            q_scale,
            part_elems,
            part_rows,
            dim,
            elems,
            groups_x,
            block_size,
            table_width,
            window,
            softcap,
            has_sinks,
            score_unit,
            _pad2,
            _pad3,
            _pad4,
        ]
    );
    let reduce = KernelId::Reduce(kernels::ReduceKernel).source();
    assert_same_layout!(
        &reduce,
        wflash::ReduceParams,
        "Reduce",
        [
            outputs, inner, outer, count_a, stride_a, count_c, stride_c, groups_x,
        ]
    );
}

/// Every kernel binds at most the storage buffers and textures the engine requires of an
/// adapter (`kernels::STORAGE_BUFFERS_PER_KERNEL`, `kernels::TEXTURES_PER_KERNEL`): an adapter
/// below them is refused when the engine is made, not when a kernel fails to build.
#[test]
fn every_kernel_fits_the_bindings_the_engine_requires() {
    let (mut buffers, mut textures) = (0, 0);
    // Bindings do not depend on the dims.
    for kernel in kernels::all_variants(&[(64, 64)]) {
        let source = kernel.source();
        let module = naga::front::wgsl::parse_str(&source).expect("parses");
        let info = Validator::new(ValidationFlags::all(), Capabilities::all())
            .validate(&module)
            .expect("validates");
        // What the kernel's entry point uses: wgpu lays out (and an adapter must offer) only
        // those bindings, whatever else the module declares for its other entry points.
        let entry = (module.entry_points.iter())
            .position(|e| e.name == kernel.entry_point())
            .expect("the kernel's entry point");
        let uses = info.get_entry_point(entry);
        let globals = || {
            (module.global_variables.iter())
                .filter(|&(handle, _)| !uses[handle].is_empty())
                .map(|(_, g)| g)
        };
        let storage = globals()
            .filter(|g| matches!(g.space, naga::AddressSpace::Storage { .. }))
            .count() as u32;
        let sampled = globals()
            .filter(|g| matches!(module.types[g.ty].inner, naga::TypeInner::Image { .. }))
            .count() as u32;
        assert!(
            storage <= kernels::STORAGE_BUFFERS_PER_KERNEL,
            "{}: {storage} storage buffers",
            kernel.label()
        );
        assert!(
            sampled <= kernels::TEXTURES_PER_KERNEL,
            "{}: {sampled} textures",
            kernel.label()
        );
        buffers = buffers.max(storage);
        textures = textures.max(sampled);
    }
    // The constants are the maxima, not loose bounds: an adapter is not refused for nothing.
    assert_eq!(buffers, kernels::STORAGE_BUFFERS_PER_KERNEL);
    assert_eq!(textures, kernels::TEXTURES_PER_KERNEL);
}

//! Every kernel variant the engine can build is parsed and validated by naga, specialised with
//! its override constants, and translated to SPIR-V, MSL and HLSL. This is how Metal and DX12
//! are covered on a Linux machine with no GPU.

use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use wflash::kernel::{self, Family, KernelKey, Storage, TileConfig};

/// Tile configurations the planner can choose: BLOCK_M 64, BLOCK_N halved from 32 as workgroup memory requires.
fn tiles() -> Vec<TileConfig> {
    [32, 16, 8, 4, 2, 1]
        .into_iter()
        .map(|block_n| TileConfig {
            block_m: 64,
            block_n,
        })
        .collect()
}

/// Head/value dims covering every private-array capacity (8..=256) and odd, unequal pairs.
const DIMS: [(u32, u32); 12] = [
    (1, 1),
    (8, 8),
    (16, 33),
    (32, 32),
    (40, 40),
    (59, 111),
    (64, 64),
    (96, 96),
    (111, 59),
    (128, 128),
    (200, 77),
    (256, 256),
];

fn compile_everywhere(key: &KernelKey) {
    compile_source_everywhere(&key.label(), &key.source(), "flash_fwd", &key.constants());
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
}

/// Compiles `keys` on all cores (a plain loop over the unrolled variants takes minutes).
fn compile_all(keys: &[KernelKey]) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for chunk in keys.chunks(keys.len().div_ceil(threads)) {
            scope.spawn(move || chunk.iter().for_each(compile_everywhere));
        }
    });
}

/// Storage types × causal × variant kinds.
const PER_DIMS_AND_TILE: usize = 4 * 2 * 2;

#[test]
fn every_tiled_variant_validates_and_translates() {
    let keys = kernel::variants(Family::Tiled, &DIMS, &tiles());
    assert_eq!(keys.len(), PER_DIMS_AND_TILE * DIMS.len() * tiles().len());
    compile_all(&keys);
}

#[test]
fn every_unrolled_variant_validates_and_translates() {
    let keys = kernel::variants(Family::Unrolled, &DIMS, &tiles());
    assert_eq!(keys.len(), PER_DIMS_AND_TILE * DIMS.len());
    for key in &keys {
        let source = key.source();
        let unexpanded = source.lines().any(|l| l.trim_start().starts_with("//#"));
        assert!(!unexpanded, "{}: unexpanded marker", key.label());
    }
    compile_all(&keys);
}

#[test]
fn every_pack_variant_validates_and_translates() {
    for storage in Storage::ALL {
        let label = format!("pack_rows {}", storage.name());
        compile_source_everywhere(&label, &kernel::pack_source(storage), "pack_rows", &[]);
    }
}

#[test]
fn unroll_markers_expand_nested_blocks() {
    let template = "a\n//#unroll i 2\nx{i}\n//#unroll j N\ny{i}{j}\n//#end\n//#end\nb\n";
    let out = kernel::expand_unrolls(template, &[("N", 3)]);
    assert_eq!(
        out,
        "a\nx0u\ny0u0u\ny0u1u\ny0u2u\nx1u\ny1u0u\ny1u1u\ny1u2u\nb\n"
    );
}

#[test]
fn params_struct_matches_wgsl_layout() {
    let key = kernel::variants(Family::Tiled, &[(64, 64)], &tiles())[0];
    let module = naga::front::wgsl::parse_str(&key.source()).expect("parses");
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).expect("layout");
    let (handle, ty) = module
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some("Params"))
        .expect("struct Params");
    let naga::TypeInner::Struct { members, span } = &ty.inner else {
        panic!("Params is not a struct")
    };
    assert_eq!(*span as usize, size_of::<wflash::FlashParams>(), "size");
    assert_eq!(
        layouter[handle].size as usize,
        size_of::<wflash::FlashParams>()
    );
    let offsets: Vec<(String, u32)> = members
        .iter()
        .map(|m| (m.name.clone().unwrap_or_default(), m.offset))
        .collect();
    let expected = [
        ("q_heads", 0),
        ("kv_heads", 4),
        ("q_len", 8),
        ("kv_len", 12),
        ("q_stride", 16),
        ("k_stride", 32),
        ("v_stride", 48),
        ("o_stride", 64),
        ("diag_offset", 80),
        ("q_scale", 84),
        ("tex_rows_per_head", 88),
        ("tex_fold", 92),
        ("sigmoid_bias", 96),
        ("window_left", 100),
        ("window_right", 104),
    ];
    for (name, offset) in expected {
        let found = offsets
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("member {name}"));
        assert_eq!(found.1, offset, "offset of {name}");
    }
    // Rust side, by construction of the repr(C) struct.
    let p = wflash::FlashParams {
        q_heads: 0,
        kv_heads: 0,
        q_len: 0,
        kv_len: 0,
        q_stride: [0; 4],
        k_stride: [0; 4],
        v_stride: [0; 4],
        o_stride: [0; 4],
        diag_offset: 0,
        q_scale: 0.0,
        tex_rows_per_head: 0,
        tex_fold: 0,
        sigmoid_bias: 0.0,
        window_left: 0,
        window_right: 0,
        _pad: 0,
    };
    let base = &p as *const _ as usize;
    assert_eq!(&p.diag_offset as *const _ as usize - base, 80);
    assert_eq!(&p.q_scale as *const _ as usize - base, 84);
    assert_eq!(&p.sigmoid_bias as *const _ as usize - base, 96);
    assert_eq!(&p.o_stride as *const _ as usize - base, 64);
}

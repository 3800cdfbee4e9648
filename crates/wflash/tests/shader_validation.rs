//! Every kernel variant the engine can build is parsed and validated by naga, specialised with
//! its override constants, and translated to SPIR-V, MSL and HLSL. This is how Metal and DX12
//! are covered on a Linux machine with no GPU.

use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use wflash::kernel::{self, KernelKey, TileConfig};

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
    let source = key.source();
    let module = naga::front::wgsl::parse_str(&source)
        .unwrap_or_else(|e| panic!("{}: {}", key.label(), e.emit_to_string(&source)));
    let mut validator = Validator::new(ValidationFlags::all(), Capabilities::all());
    let info = validator
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {e:?}", key.label()));
    let constants: naga::back::PipelineConstants = key
        .constants()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let (module, info) =
        naga::back::pipeline_constants::process_overrides(&module, &info, None, &constants)
            .unwrap_or_else(|e| panic!("{}: overrides: {e:?}", key.label()));
    let module = module.into_owned();
    let info = info.into_owned();

    let pipeline = spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: "flash_fwd".into(),
    };
    spv::write_vec(&module, &info, &spv::Options::default(), Some(&pipeline))
        .unwrap_or_else(|e| panic!("{}: SPIR-V: {e:?}", key.label()));

    let msl_pipeline = msl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, "flash_fwd".into())),
        ..Default::default()
    };
    msl::write_string(&module, &info, &msl::Options::default(), &msl_pipeline)
        .unwrap_or_else(|e| panic!("{}: MSL: {e:?}", key.label()));

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
    .unwrap_or_else(|e| panic!("{}: HLSL: {e:?}", key.label()));
}

#[test]
fn every_flash_fwd_variant_validates_and_translates() {
    let keys = kernel::variants(&DIMS, &tiles());
    assert_eq!(keys.len(), 4 * DIMS.len() * tiles().len() * 2);
    for key in &keys {
        compile_everywhere(key);
    }
}

#[test]
fn params_struct_matches_wgsl_layout() {
    let key = kernel::variants(&[(64, 64)], &tiles())[0];
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
        ("causal_offset", 80),
        ("scale_log2", 84),
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
        causal_offset: 0,
        scale_log2: 0.0,
        _pad: [0; 2],
    };
    let base = &p as *const _ as usize;
    assert_eq!(&p.causal_offset as *const _ as usize - base, 80);
    assert_eq!(&p.scale_log2 as *const _ as usize - base, 84);
    assert_eq!(&p.o_stride as *const _ as usize - base, 64);
}

//! Every kernel variant the engine can build is parsed and validated by naga, specialised with
//! its override constants, and translated to SPIR-V, MSL and HLSL. This is how Metal and DX12
//! are covered on a Linux machine with no GPU.

use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use wflash::kernel::{
    self, Conversion, Family, KernelKey, LinearKey, LinearPass, Storage, TileConfig,
};
use wflash::{FeatureMap, ModifierSet};

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

/// No score modifier, and all of them (each one's code is independent of the others').
fn mods() -> [ModifierSet; 2] {
    [ModifierSet::NONE, ModifierSet::all_compiled()]
}

#[test]
fn every_tiled_variant_validates_and_translates() {
    // Every tile without modifiers; the modifiers with the largest tile.
    let mut keys = kernel::variants(Family::Tiled, &DIMS, &tiles(), &mods()[..1]);
    keys.extend(kernel::variants(
        Family::Tiled,
        &DIMS,
        &tiles()[..1],
        &mods()[1..],
    ));
    assert_eq!(
        keys.len(),
        PER_DIMS_AND_TILE * DIMS.len() * (tiles().len() + 1)
    );
    compile_all(&keys);
}

#[test]
fn every_unrolled_variant_validates_and_translates() {
    let keys = kernel::variants(Family::Unrolled, &DIMS, &tiles(), &mods());
    // f32 only: other storage types are converted at the family's edges.
    assert_eq!(
        keys.len(),
        PER_DIMS_AND_TILE / 4 * DIMS.len() * mods().len()
    );
    for key in &keys {
        let source = key.source();
        let unexpanded = source.lines().any(|l| l.trim_start().starts_with("//#"));
        assert!(!unexpanded, "{}: unexpanded marker", key.label());
    }
    compile_all(&keys);
}

#[test]
fn every_pack_and_convert_variant_validates_and_translates() {
    for storage in Storage::ALL {
        let label = format!("pack_rows {}", storage.name());
        compile_source_everywhere(&label, &kernel::pack_source(storage), "pack_rows", &[]);
        for conversion in [Conversion::ToF32(storage), Conversion::FromF32(storage)] {
            compile_source_everywhere(&conversion.label(), &conversion.source(), "convert", &[]);
        }
    }
}

/// Every pass × storage type × dims (odd, unequal, the largest), without and with the
/// normaliser; every feature map at 64.
#[test]
fn every_linear_variant_validates_and_translates() {
    const LINEAR_DIMS: [(u32, u32); 6] = [(1, 1), (8, 8), (32, 59), (59, 32), (64, 64), (128, 128)];
    let mut keys = Vec::new();
    for pass in LinearPass::ALL {
        for storage in Storage::ALL {
            let key = |key_dim, value_dim, feature_map, normalize| LinearKey {
                pass,
                storage,
                key_dim,
                value_dim,
                feature_map,
                normalize,
                rows: 1,
            };
            for (key_dim, value_dim) in LINEAR_DIMS {
                for normalize in [false, true] {
                    keys.push(key(key_dim, value_dim, FeatureMap::Identity, normalize));
                    // The output pass with the rows the planner gives these dims.
                    let rows = kernel::linear_rows(key_dim, value_dim, 64);
                    if pass == LinearPass::ChunkOutput && rows > 1 {
                        keys.push(LinearKey {
                            rows,
                            ..key(key_dim, value_dim, FeatureMap::Identity, normalize)
                        });
                    }
                }
            }
            for feature_map in [FeatureMap::EluPlusOne, FeatureMap::Relu] {
                keys.push(key(64, 64, feature_map, true));
            }
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for chunk in keys.chunks(keys.len().div_ceil(threads)) {
            scope.spawn(move || {
                for key in chunk {
                    let source = key.source();
                    assert!(
                        !source.lines().any(|l| l.trim_start().starts_with("//#")),
                        "{}: unexpanded marker",
                        key.label()
                    );
                    compile_source_everywhere(&key.label(), &source, key.pass.entry_point(), &[]);
                }
            });
        }
    });
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
    let flash = kernel::variants(Family::Unrolled, &[(64, 64)], &tiles(), &mods()[1..])[0].source();
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
            _pad1,
        ]
    );
}

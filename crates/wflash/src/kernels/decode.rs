//! Decoding against a KV cache (decode.wgsl): the append pass and the split pass.

use super::binding;
use super::wgsl::{Storage, Wgsl, expand_unrolls, file, load_accessor, store_accessor};

/// decode.wgsl's entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DecodePass {
    /// New tokens of K or V into the cache.
    Append,
    /// One split of the keys: a partial output and LSE per lane.
    Split,
}

/// Everything that selects one compiled decode pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DecodeKey {
    pub pass: DecodePass,
    pub storage: Storage,
    pub head_dim: u32,
    pub value_dim: u32,
    /// Reads and writes a paged cache through block tables.
    pub paged: bool,
    /// Query rows each invocation of the split pass holds (1, 2, 4 or 8; 1 for the append).
    pub rows: u32,
    /// Sigmoid attention (weights σ(s + b), summed) instead of softmax.
    pub sigmoid: bool,
}

/// The most query rows one invocation of the split pass holds at these dims: its Q and O
/// tiles stay within 128 vec4s, as the unrolled forward's (a power of two, at most 8).
pub fn max_decode_rows(head_dim: u32, value_dim: u32) -> u32 {
    let quads = head_dim.max(value_dim).div_ceil(4);
    (1..=3)
        .map(|p| 1 << p)
        .filter(|r| r * quads <= 128)
        .max()
        .unwrap_or(1)
}

impl super::Kernel for DecodeKey {
    fn label(&self) -> String {
        format!(
            "{} {} d{} dv{} rows{}{}{}",
            self.entry_point(),
            self.storage.name(),
            self.head_dim,
            self.value_dim,
            self.rows,
            if self.paged { " paged" } else { "" },
            if self.sigmoid { " sigmoid" } else { "" }
        )
    }
    /// The accessors for the storage type and the dims, then decode.wgsl with its loops over
    /// rows and dims written out.
    fn source(&self) -> String {
        let mut src = Wgsl::new();
        if self.storage == Storage::F16Native {
            src.push("enable f16;");
        }
        load_accessor(&mut src, self.storage, binding::Q, "q");
        let (k_units, k_unit_quads) = cache_units(
            &mut src,
            self.storage,
            binding::DECODE_K,
            "k",
            self.head_dim,
        );
        let (v_units, v_unit_quads) = cache_units(
            &mut src,
            self.storage,
            binding::DECODE_V,
            "v",
            self.value_dim,
        );
        load_accessor(&mut src, self.storage, binding::DECODE_NEW, "new");
        store_accessor(&mut src, self.storage, binding::DECODE_CACHE, "cache");
        let counts = [
            ("ROWS", self.rows),
            ("D4", self.head_dim.div_ceil(4)),
            ("DV4", self.value_dim.div_ceil(4)),
            ("KU", k_units),
            ("KUQ", k_unit_quads),
            ("VU", v_units),
            ("VUQ", v_unit_quads),
        ];
        for (name, value) in counts {
            src.push(&format!("const {name}: u32 = {value}u;"));
        }
        src.push(&format!(
            "const HEAD_DIM: u32 = {}u;\nconst VALUE_DIM: u32 = {}u;\nconst PAGED: bool = {};\nconst SIGMOID: bool = {};",
            self.head_dim, self.value_dim, self.paged, self.sigmoid
        ));
        src.push(&expand_unrolls(file("decode.wgsl"), &counts));
        src.finish()
    }
    fn entry_point(&self) -> &'static str {
        match self.pass {
            DecodePass::Append => "decode_append",
            DecodePass::Split => "decode_split",
        }
    }
}

/// `fn {name}_unit(row, u)` over the cache tensor `name` of `dim`-element rows: 16-byte loads
/// where rows are whole ones, else element by element (storage.wgsl, `unit` sections). Returns
/// (units per row, quads per unit).
fn cache_units(src: &mut Wgsl, storage: Storage, binding: u32, name: &str, dim: u32) -> (u32, u32) {
    let (variant, unit_quads) = match storage {
        Storage::F32 if dim.is_multiple_of(4) => ("f32", 1),
        Storage::F16Native | Storage::F16Packed if dim.is_multiple_of(8) => ("f16", 2),
        Storage::Bf16Packed if dim.is_multiple_of(8) => ("bf16", 2),
        _ => {
            load_accessor(src, storage, binding, name);
            ("elements", 1)
        }
    };
    let units = dim.div_ceil(4 * unit_quads);
    let [dim, units_text, quads] = [dim, units, unit_quads].map(|n| n.to_string());
    let binding = binding.to_string();
    let args = [
        ("binding", binding.as_str()),
        ("name", name),
        ("dim", dim.as_str()),
        ("units", units_text.as_str()),
        ("unit_quads", quads.as_str()),
    ];
    src.section("common/storage.wgsl", "unit", variant, &args);
    (units, unit_quads)
}

/// Every decode kernel at these (head dim, value dim) pairs: both passes in every storage type,
/// contiguous and paged, the split pass at every row count, softmax and sigmoid.
/// The append pass compiles once per storage (its dims are runtime data): keyed at (1, 1).
pub(super) fn variants(dims: &[(u32, u32)]) -> Vec<DecodeKey> {
    let mut keys = Vec::new();
    for storage in Storage::ALL {
        for paged in [false, true] {
            keys.push(DecodeKey {
                pass: DecodePass::Append,
                storage,
                head_dim: 1,
                value_dim: 1,
                paged,
                rows: 1,
                sigmoid: false,
            });
            for &(head_dim, value_dim) in dims {
                let max_rows = max_decode_rows(head_dim, value_dim);
                let rows = (0..4).map(|p| 1 << p).filter(|&r| r <= max_rows);
                for (rows, sigmoid) in rows.flat_map(|r| [(r, false), (r, true)]) {
                    keys.push(DecodeKey {
                        pass: DecodePass::Split,
                        storage,
                        head_dim,
                        value_dim,
                        paged,
                        rows,
                        sigmoid,
                    });
                }
            }
        }
    }
    keys
}

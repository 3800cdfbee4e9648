//! Decoding against a KV cache (decode.wgsl): the append pass and the split pass.

use super::binding;
use super::wgsl::{Storage, Wgsl, load_accessor, store_accessor};

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
}

impl super::Kernel for DecodeKey {
    fn label(&self) -> String {
        format!(
            "{} {} d{} dv{}{}",
            self.entry_point(),
            self.storage.name(),
            self.head_dim,
            self.value_dim,
            if self.paged { " paged" } else { "" }
        )
    }
    /// The accessors for the storage type and the dims, then decode.wgsl.
    fn source(&self) -> String {
        let mut src = Wgsl::new();
        if self.storage == Storage::F16Native {
            src.push("enable f16;");
        }
        load_accessor(&mut src, self.storage, binding::Q, "q");
        load_accessor(&mut src, self.storage, binding::DECODE_K, "k");
        load_accessor(&mut src, self.storage, binding::DECODE_V, "v");
        load_accessor(&mut src, self.storage, binding::DECODE_NEW, "new");
        store_accessor(&mut src, self.storage, binding::DECODE_CACHE, "cache");
        src.push(&format!(
            "const HEAD_DIM: u32 = {}u;\nconst VALUE_DIM: u32 = {}u;\nconst PAGED: bool = {};",
            self.head_dim, self.value_dim, self.paged
        ));
        src.file("decode.wgsl");
        src.finish()
    }
    fn entry_point(&self) -> &'static str {
        match self.pass {
            DecodePass::Append => "decode_append",
            DecodePass::Split => "decode_split",
        }
    }
}

/// Every decode kernel at these (head dim, value dim) pairs: both passes in every storage type,
/// contiguous and paged.
/// The append pass compiles once per storage (its dims are runtime data): keyed at (0, 0).
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
            });
            for &(head_dim, value_dim) in dims {
                keys.push(DecodeKey {
                    pass: DecodePass::Split,
                    storage,
                    head_dim,
                    value_dim,
                    paged,
                });
            }
        }
    }
    keys
}

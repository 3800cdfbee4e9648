//! The small passes around the kernels: K/V packing (pack_rows.wgsl), element-type
//! conversion (convert.wgsl) and the merge of partial attention results (merge.wgsl).

use super::binding;
use super::wgsl::{Storage, Wgsl, load_accessor, storage_section, store_accessor};

/// An element-type conversion pass (convert.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Conversion {
    /// A tensor in this storage to f32.
    ToF32(Storage),
    /// f32 to a tensor in this storage.
    FromF32(Storage),
}

impl Conversion {
    pub fn label(self) -> String {
        match self {
            Conversion::ToF32(s) => format!("convert {} to f32", s.name()),
            Conversion::FromF32(s) => format!("convert f32 to {}", s.name()),
        }
    }

    /// Elements each invocation converts: two for a store into u32 words, else one.
    pub fn elements_per_unit(self) -> u32 {
        match self {
            Conversion::FromF32(Storage::F16Packed | Storage::Bf16Packed) => 2,
            _ => 1,
        }
    }

    /// The pass's WGSL: bindings and `convert_unit` for this conversion, then convert.wgsl.
    pub fn source(self) -> String {
        let mut src = Wgsl::new();
        let storage = match self {
            Conversion::ToF32(s) | Conversion::FromF32(s) => s,
        };
        if storage == Storage::F16Native {
            src.push("enable f16;");
        }
        let (from, to) = (binding::CONVERT_FROM, binding::CONVERT_TO);
        match self {
            Conversion::ToF32(storage) => {
                load_accessor(&mut src, storage, from, "x");
                storage_section(&mut src, "to_f32", Storage::F32, to, "y");
            }
            Conversion::FromF32(storage) => {
                storage_section(&mut src, "f32_source", Storage::F32, from, "x");
                storage_section(&mut src, "from_f32", storage, to, "y");
            }
        }
        src.file("convert.wgsl");
        src.finish()
    }
}

impl super::Kernel for Conversion {
    fn label(&self) -> String {
        Conversion::label(*self)
    }
    fn source(&self) -> String {
        Conversion::source(*self)
    }
    fn entry_point(&self) -> &'static str {
        "convert"
    }
}

/// The packing kernel (pack_rows.wgsl) for a tensor in this storage type: rows of it into an
/// rgba32float texture, converted to f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackKernel(pub Storage);

impl super::Kernel for PackKernel {
    fn label(&self) -> String {
        format!("pack_rows {}", self.0.name())
    }
    /// The `load_x` accessor for the storage type, then pack_rows.wgsl.
    fn source(&self) -> String {
        let mut src = Wgsl::new();
        if self.0 == Storage::F16Native {
            src.push("enable f16;");
        }
        load_accessor(&mut src, self.0, binding::PACK_SOURCE, "x");
        src.file("pack_rows.wgsl");
        src.finish()
    }
    fn entry_point(&self) -> &'static str {
        "pack_rows"
    }
}

/// The merge of partial attention results (merge.wgsl): parts stored as `parts`, the merged
/// output as `output` (the public merge: both the tensors' type; split-KV decoding: f32 parts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MergeKernel {
    pub parts: Storage,
    pub output: Storage,
    /// The parts are sums to add up (sigmoid's split-KV partials), not softmax results.
    pub sum: bool,
}

impl super::Kernel for MergeKernel {
    fn label(&self) -> String {
        format!(
            "merge {} to {}{}",
            self.parts.name(),
            self.output.name(),
            if self.sum { " (sum)" } else { "" }
        )
    }
    /// `load_parts` and `store_o` for the storage types, then merge.wgsl.
    fn source(&self) -> String {
        let mut src = Wgsl::new();
        if Storage::F16Native == self.parts || Storage::F16Native == self.output {
            src.push("enable f16;");
        }
        load_accessor(&mut src, self.parts, binding::MERGE_PARTS, "parts");
        store_accessor(&mut src, self.output, binding::MERGE_OUT, "o");
        src.push(&format!("const SUM: bool = {};", self.sum));
        src.file("merge.wgsl");
        src.finish()
    }
    fn entry_point(&self) -> &'static str {
        "merge"
    }
}

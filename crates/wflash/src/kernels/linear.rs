//! The linear-attention kernels (linear.wgsl's four entry points).

use super::binding;
use super::wgsl::{Storage, Wgsl, expand_unrolls, file, load_accessor, store_accessor};

/// One of linear.wgsl's entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearPass {
    /// Each chunk's own decayed state (parallel over chunks).
    ChunkState,
    /// The state before each chunk and the final state (sequential over chunks).
    ChunkPrefix,
    /// The output rows: intra-chunk quadratic part plus the carried state.
    ChunkOutput,
    /// The token-by-token recurrence, for decoding.
    Recurrent,
}

impl LinearPass {
    pub const ALL: [LinearPass; 4] = [
        LinearPass::ChunkState,
        LinearPass::ChunkPrefix,
        LinearPass::ChunkOutput,
        LinearPass::Recurrent,
    ];
    pub fn entry_point(self) -> &'static str {
        match self {
            LinearPass::ChunkState => "linear_chunk_state",
            LinearPass::ChunkPrefix => "linear_chunk_prefix",
            LinearPass::ChunkOutput => "linear_chunk_output",
            LinearPass::Recurrent => "linear_recurrent",
        }
    }
}

/// Rows per invocation of the chunked output pass for these dims and chunk: as many (4, 2 or 1)
/// as divide the chunk, with ROWS × max(D4, DV4) at most 32 vec4s per private array: more rows
/// save texel fetches but llvmpipe compiles their unrolled code slowly (docs/PERF.md).
pub fn linear_rows(key_dim: u32, value_dim: u32, chunk: u32) -> u32 {
    let widest = key_dim.max(value_dim).div_ceil(4).max(1);
    [4, 2, 1]
        .into_iter()
        .find(|&rows| chunk.is_multiple_of(rows) && rows * widest <= 32)
        .unwrap_or(1)
}

/// Everything that selects one compiled linear-attention pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinearKey {
    pub pass: LinearPass,
    pub storage: Storage,
    pub key_dim: u32,
    pub value_dim: u32,
    pub feature_map: crate::FeatureMap,
    pub normalize: bool,
    /// Tokens per invocation of [`LinearPass::ChunkOutput`] (1 for the other passes).
    pub rows: u32,
}

impl super::Kernel for LinearKey {
    fn label(&self) -> String {
        LinearKey::label(self)
    }
    fn source(&self) -> String {
        LinearKey::source(self)
    }
    fn entry_point(&self) -> &'static str {
        self.pass.entry_point()
    }
}

impl LinearKey {
    /// `linear_chunk_output f16 d64 dv64 elu+1 normalize`.
    pub fn label(&self) -> String {
        format!(
            "{} {} d{} dv{} rows{} {}{}",
            self.pass.entry_point(),
            self.storage.name(),
            self.key_dim,
            self.value_dim,
            self.rows,
            self.feature_map.name(),
            if self.normalize { " normalize" } else { "" }
        )
    }

    /// The prelude (accessors for the storage type, dims, feature map), then linear.wgsl with
    /// its dim loops written out.
    pub fn source(&self) -> String {
        let mut src = Wgsl::new();
        if self.storage == Storage::F16Native {
            src.push("enable f16;");
        }
        load_accessor(&mut src, self.storage, binding::Q, "q");
        load_accessor(&mut src, self.storage, binding::LINEAR_K, "k");
        load_accessor(&mut src, self.storage, binding::LINEAR_V, "v");
        store_accessor(&mut src, self.storage, binding::O, "o");
        let counts = [
            ("D4", self.key_dim.div_ceil(4)),
            ("DV4", self.value_dim.div_ceil(4)),
            ("ROWS", self.rows),
        ];
        for (name, value) in counts {
            src.push(&format!("const {name}: u32 = {value}u;"));
        }
        src.push(&format!(
            "const KEY_DIM: u32 = {}u;\nconst VALUE_DIM: u32 = {}u;\nconst FEATURE: u32 = {}u;\nconst NORMALIZE: bool = {};",
            self.key_dim,
            self.value_dim,
            self.feature_map.code(),
            self.normalize
        ));
        src.push(&expand_unrolls(file("linear.wgsl"), &counts));
        src.finish()
    }
}

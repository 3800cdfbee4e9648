//! The linear-attention kernels: linear.wgsl's four forward entry points and
//! linear_bwd.wgsl's five backward ones (composed after linear.wgsl, whose helpers they use).

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
    /// Backward: the gradient that reaches each readout row (ĝ), into a packed texture.
    BwdReadout,
    /// Backward: each chunk's own state gradient ΔD (parallel over chunks).
    BwdChunkDState,
    /// Backward: the state gradient after each chunk, scanned from the last (and dS0).
    BwdChunkDPrefix,
    /// Backward: dQ rows.
    BwdDq,
    /// Backward: dK and dV rows, summed over each kv head's query heads.
    BwdDkDv,
}

impl LinearPass {
    pub const ALL: [LinearPass; 9] = [
        LinearPass::ChunkState,
        LinearPass::ChunkPrefix,
        LinearPass::ChunkOutput,
        LinearPass::Recurrent,
        LinearPass::BwdReadout,
        LinearPass::BwdChunkDState,
        LinearPass::BwdChunkDPrefix,
        LinearPass::BwdDq,
        LinearPass::BwdDkDv,
    ];
    pub fn entry_point(self) -> &'static str {
        match self {
            LinearPass::ChunkState => "linear_chunk_state",
            LinearPass::ChunkPrefix => "linear_chunk_prefix",
            LinearPass::ChunkOutput => "linear_chunk_output",
            LinearPass::Recurrent => "linear_recurrent",
            LinearPass::BwdReadout => "linear_bwd_readout",
            LinearPass::BwdChunkDState => "linear_bwd_chunk_dstate",
            LinearPass::BwdChunkDPrefix => "linear_bwd_chunk_dprefix",
            LinearPass::BwdDq => "linear_bwd_dq",
            LinearPass::BwdDkDv => "linear_bwd_dkdv",
        }
    }

    /// Whether the pass is the backward's (linear_bwd.wgsl).
    pub fn is_backward(self) -> bool {
        matches!(
            self,
            LinearPass::BwdReadout
                | LinearPass::BwdChunkDState
                | LinearPass::BwdChunkDPrefix
                | LinearPass::BwdDq
                | LinearPass::BwdDkDv
        )
    }

    /// Whether the pass takes several tokens per invocation (`ROWS`; 1 for the others).
    pub fn has_rows(self) -> bool {
        matches!(
            self,
            LinearPass::ChunkOutput
                | LinearPass::BwdReadout
                | LinearPass::BwdDq
                | LinearPass::BwdDkDv
        )
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
    /// Tokens per invocation of the passes that take several ([`LinearPass::has_rows`]; 1 for
    /// the others).
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
        let backward = self.pass.is_backward();
        if backward {
            load_accessor(&mut src, self.storage, binding::LINEAR_D_O, "do");
            store_accessor(&mut src, self.storage, binding::LINEAR_DQ, "dq");
            store_accessor(&mut src, self.storage, binding::LINEAR_DK, "dk");
            store_accessor(&mut src, self.storage, binding::LINEAR_DV, "dv");
        }
        let mut counts = vec![
            ("D4", self.key_dim.div_ceil(4)),
            ("DV4", self.value_dim.div_ceil(4)),
            ("ROWS", self.rows),
        ];
        if backward {
            // Texels of a ĝ row: the value columns and the normaliser's.
            counts.push((
                "C4",
                (self.value_dim + u32::from(self.normalize)).div_ceil(4),
            ));
        }
        for &(name, value) in &counts {
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
        if backward {
            src.push(&expand_unrolls(file("linear_bwd.wgsl"), &counts));
        }
        src.finish()
    }
}

//! Every way a wflash call can fail, as values that carry the offending numbers.

use crate::DType;

/// The result type of every fallible wflash call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors returned by wflash. Input errors are found before anything is dispatched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No adapter matched the request (or none exists on this machine).
    #[error(
        "no GPU adapter found ({0}); on Linux without a GPU, install Mesa's software Vulkan \
         (`mesa-vulkan-drivers`), or choose a backend with WGPU_BACKEND"
    )]
    NoAdapter(String),
    /// The device's backend cannot run wflash's kernels: no compute shaders (WebGL2-class GL),
    /// or fewer storage buffers or textures per shader than the kernels bind.
    #[error(
        "the {backend:?} adapter `{adapter}` cannot run wflash: {reason}. Choose another \
         backend with WGPU_BACKEND (e.g. WGPU_BACKEND=vulkan); on Linux without a GPU, Mesa's \
         software Vulkan (lavapipe) is the `mesa-vulkan-drivers` package"
    )]
    BackendUnsupported {
        backend: wgpu::Backend,
        adapter: String,
        reason: String,
    },
    /// The adapter refused to create a device.
    #[error("could not create a device: {0}")]
    RequestDevice(#[from] wgpu::RequestDeviceError),

    /// A dimension of the shape is zero.
    #[error("shape dimension `{dim}` is zero; every dimension must be at least 1")]
    ZeroDimension { dim: &'static str },
    /// `q_heads` is not a multiple of `kv_heads`.
    #[error("q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads}) for GQA/MQA")]
    HeadsNotDivisible { q_heads: usize, kv_heads: usize },
    /// A head dimension outside what the kernels support.
    #[error("`{dim}` = {got} is not supported; supported range is 1..={max}")]
    HeadDimUnsupported {
        dim: &'static str,
        got: usize,
        max: usize,
    },
    /// A host slice or device tensor does not hold the number of elements the shape implies.
    #[error("tensor `{tensor}` has {got} elements but the shape needs {expected}")]
    LengthMismatch {
        tensor: &'static str,
        expected: usize,
        got: usize,
    },
    /// A device tensor of the wrong element type.
    #[error("tensor `{tensor}` holds {got:?} but this call needs {expected:?}")]
    DTypeMismatch {
        tensor: &'static str,
        expected: DType,
        got: DType,
    },
    /// The scale is NaN, infinite or zero.
    #[error("scale {scale} must be finite and non-zero")]
    InvalidScale { scale: f32 },
    /// The sigmoid bias is NaN or infinite.
    #[error("sigmoid bias {bias} must be finite")]
    InvalidBias { bias: f32 },
    /// A modifier's values or shape are wrong (lengths are [`Error::LengthMismatch`]).
    #[error("invalid `{modifier}`: {reason}")]
    InvalidModifier {
        modifier: &'static str,
        reason: String,
    },
    /// The backward of softmax attention needs the forward's LSE; sigmoid has none.
    #[error("{0}")]
    Lse(&'static str),
    /// A combination of options that has no meaning or no fused kernel; never run unfused.
    #[error("unsupported combination: {combination}")]
    Unsupported { combination: &'static str },
    /// The element type has no kernel path on this engine's adapter.
    #[error("{dtype:?} is not supported here: {reason}")]
    DTypeUnsupported { dtype: DType, reason: &'static str },
    /// The problem exceeds an adapter limit, even after splitting over batch.
    #[error("problem too large: needs {needed} but `{limit}` is {max}{hint}")]
    TooLarge {
        limit: &'static str,
        needed: u64,
        max: u64,
        hint: &'static str,
    },

    /// The tuning file (`cargo xtask bench --tune`) could not be read, parsed or written.
    #[error("tuning file {path}: {reason}")]
    TuningFile { path: String, reason: String },
    /// A tile configuration that the kernel family cannot run at these dims on this adapter.
    #[error(
        "tile {block_m}x{block_n} is not valid for the {family} kernel at head dim {head_dim}, value dim {value_dim}: {reason}"
    )]
    InvalidTile {
        family: &'static str,
        head_dim: u32,
        value_dim: u32,
        block_m: u32,
        block_n: u32,
        reason: &'static str,
    },

    /// A KV cache call would put a sequence past the cache's capacity, or names lengths the
    /// cache does not have.
    #[error("KV cache: sequence {sequence} would hold {needed} tokens, capacity {capacity}")]
    CacheCapacity {
        sequence: usize,
        needed: usize,
        capacity: usize,
    },

    /// A view of an application's buffer ([`crate::Engine::tensor_view`]) that the kernels
    /// cannot bind: misaligned, past the buffer's end, or without storage or copy usage.
    #[error("tensor view: {reason}")]
    InvalidView { reason: String },

    /// The device was lost (driver reset, `destroy`, or unplugged).
    #[error("the GPU device was lost: {0}")]
    DeviceLost(String),
    /// The device ran out of memory (the driver said so).
    #[error("the GPU ran out of memory: {0}")]
    OutOfMemory(String),
    /// The engine would hold more than [`crate::EngineOptions::memory_budget_bytes`]; nothing
    /// was created or dispatched. Dropping tensors frees their bytes.
    #[error(
        "memory budget exceeded: {needed} more bytes wanted, {in_use} held, budget {budget} (EngineOptions::memory_budget_bytes)"
    )]
    MemoryBudget {
        needed: u64,
        in_use: u64,
        budget: u64,
    },
    /// Reading results back did not finish in time.
    #[error(
        "reading results back from the GPU timed out after {timeout:?} (EngineOptions::readback_timeout)"
    )]
    ReadbackTimeout { timeout: std::time::Duration },
    /// wgpu reported an error that indicates a bug in wflash.
    #[error("internal GPU error (a wflash bug, please report): {0}")]
    Internal(String),
}

impl Error {
    /// Whether this is an out-of-memory error: the driver's, or the engine's budget.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::OutOfMemory(_) | Error::MemoryBudget { .. })
    }

    /// Classifies a wgpu error captured by an error scope.
    pub(crate) fn from_wgpu(err: wgpu::Error) -> Self {
        match err {
            wgpu::Error::OutOfMemory { source } => Error::OutOfMemory(source.to_string()),
            other => {
                // The Display of a wgpu error is a summary ("Validation Error"); the cause is
                // in its source chain.
                let mut text = other.to_string();
                let mut source = std::error::Error::source(&other);
                while let Some(cause) = source {
                    text.push_str(": ");
                    text.push_str(&cause.to_string());
                    source = cause.source();
                }
                let lower = text.to_lowercase();
                if lower.contains("lost") || lower.contains("destroyed") {
                    Error::DeviceLost(text)
                } else {
                    Error::Internal(text)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver's out-of-memory (which lavapipe never reports: it over-commits host memory)
    /// becomes `OutOfMemory`, and both kinds say so through `is_out_of_memory`.
    #[test]
    fn driver_out_of_memory_is_typed() {
        let err = Error::from_wgpu(wgpu::Error::OutOfMemory {
            source: "vkAllocateMemory: VK_ERROR_OUT_OF_DEVICE_MEMORY".into(),
        });
        assert!(matches!(err, Error::OutOfMemory(_)), "{err}");
        assert!(err.is_out_of_memory());
        let budget = Error::MemoryBudget {
            needed: 1,
            in_use: 2,
            budget: 2,
        };
        assert!(budget.is_out_of_memory());
        let timeout = std::time::Duration::from_secs(1);
        assert!(!Error::ReadbackTimeout { timeout }.is_out_of_memory());
    }
}

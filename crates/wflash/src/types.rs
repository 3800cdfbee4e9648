//! Shapes, layouts, options and element types: the vocabulary of an attention call.

use crate::{Error, Result};

/// The largest `head_dim` and `value_dim` the kernels accept.
pub const MAX_HEAD_DIM: usize = 256;

/// Sizes of one attention problem.
///
/// Q is `[batch, q_heads, q_len, head_dim]`, K is `[batch, kv_heads, kv_len, head_dim]`,
/// V is `[batch, kv_heads, kv_len, value_dim]` and O is `[batch, q_heads, q_len, value_dim]`,
/// each in the call's [`Layout`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub batch: usize,
    /// Query heads; a multiple of `kv_heads` (GQA when larger, MQA when `kv_heads == 1`).
    pub q_heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    /// Length of query and key rows, 1..=256.
    pub head_dim: usize,
    /// Length of value and output rows, 1..=256; need not equal `head_dim`.
    pub value_dim: usize,
}

impl Shape {
    /// Multi-head attention with equal query and key lengths and `value_dim == head_dim`.
    pub fn mha(batch: usize, heads: usize, seq: usize, head_dim: usize) -> Self {
        Shape {
            batch,
            q_heads: heads,
            kv_heads: heads,
            q_len: seq,
            kv_len: seq,
            head_dim,
            value_dim: head_dim,
        }
    }

    pub fn q_elems(&self) -> usize {
        self.batch * self.q_heads * self.q_len * self.head_dim
    }
    pub fn k_elems(&self) -> usize {
        self.batch * self.kv_heads * self.kv_len * self.head_dim
    }
    pub fn v_elems(&self) -> usize {
        self.batch * self.kv_heads * self.kv_len * self.value_dim
    }
    pub fn o_elems(&self) -> usize {
        self.batch * self.q_heads * self.q_len * self.value_dim
    }
    /// The LSE is `[batch, q_heads, q_len]` whatever the layout.
    pub fn lse_elems(&self) -> usize {
        self.batch * self.q_heads * self.q_len
    }

    /// Checks everything that does not depend on the adapter.
    pub fn validate(&self) -> Result<()> {
        for (dim, value) in [
            ("batch", self.batch),
            ("q_heads", self.q_heads),
            ("kv_heads", self.kv_heads),
            ("q_len", self.q_len),
            ("kv_len", self.kv_len),
            ("head_dim", self.head_dim),
            ("value_dim", self.value_dim),
        ] {
            if value == 0 {
                return Err(Error::ZeroDimension { dim });
            }
        }
        if !self.q_heads.is_multiple_of(self.kv_heads) {
            return Err(Error::HeadsNotDivisible {
                q_heads: self.q_heads,
                kv_heads: self.kv_heads,
            });
        }
        for (dim, got) in [("head_dim", self.head_dim), ("value_dim", self.value_dim)] {
            if got > MAX_HEAD_DIM {
                return Err(Error::HeadDimUnsupported {
                    dim,
                    got,
                    max: MAX_HEAD_DIM,
                });
            }
        }
        Ok(())
    }
}

/// Memory layout of Q, K, V and O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `[batch, heads, seq, dim]`.
    #[default]
    Bhsd,
    /// `[batch, seq, heads, dim]`, what most model code holds (no transpose needed).
    Bshd,
}

impl Layout {
    /// Element strides `(batch, head, seq)` of a tensor; the innermost dimension is contiguous.
    pub fn strides(self, heads: usize, seq: usize, dim: usize) -> [usize; 3] {
        match self {
            Layout::Bhsd => [heads * seq * dim, seq * dim, dim],
            Layout::Bshd => [seq * heads * dim, dim, heads * dim],
        }
    }
}

/// Alignment of the causal mask when `q_len != kv_len`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Causal {
    /// Key `j` is visible to query `i` iff `j <= i + kv_len - q_len`: the last query sees every
    /// key. FlashAttention >= 2.1's convention, and what KV-cache decoding needs.
    #[default]
    BottomRight,
    /// Key `j` is visible to query `i` iff `j <= i` (PyTorch's `is_causal`).
    TopLeft,
}

/// The attention function.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub enum Variant {
    /// `O = softmax(scale · Q Kᵀ) V`, with the natural-log LSE of every query row.
    #[default]
    Softmax,
    /// Sigmoid attention (FlashSigmoid): `O = σ(scale · Q Kᵀ + bias) V`, elementwise over the
    /// visible keys, with no normalisation and no LSE. `bias: None` means `-ln(kv_len)`;
    /// FlashSigmoid recommends `-ln(n)` for the *training* context length n, so models trained
    /// at a fixed length should pass that value here.
    Sigmoid { bias: Option<f32> },
}

/// Sliding-window (local) attention, FlashAttention's `window_size`: query `i` sees the keys
/// from `left` before to `right` after its diagonal key `i + kv_len - q_len` (bottom-right; `i`
/// when the causal mask is top-left). `None` leaves a side unbounded. With a causal mask the
/// right side is the causal bound already (`right: Some(0)` changes nothing). Key tiles outside
/// every row's window are skipped, so the cost is O(N · window), not O(N²).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Window {
    pub left: Option<usize>,
    pub right: Option<usize>,
}

impl Window {
    /// The `size` keys ending at the diagonal (Mistral / Gemma local attention): left `size - 1`, right 0.
    pub fn trailing(size: usize) -> Window {
        Window {
            left: Some(size.saturating_sub(1)),
            right: Some(0),
        }
    }
}

/// Options of an attention call. `Default` is non-causal softmax with `scale = 1/sqrt(head_dim)`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AttentionOptions {
    pub variant: Variant,
    /// Multiplier of `q·k`; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// `None` for full attention.
    pub causal: Option<Causal>,
    /// `None` for no window.
    pub window: Option<Window>,
}

impl AttentionOptions {
    pub fn softmax() -> Self {
        Self::default()
    }
    /// Sigmoid attention with the default bias `-ln(kv_len)`.
    pub fn sigmoid() -> Self {
        Self {
            variant: Variant::Sigmoid { bias: None },
            ..Self::default()
        }
    }
    /// Sigmoid attention with bias `bias`.
    pub fn sigmoid_with_bias(bias: f32) -> Self {
        Self {
            variant: Variant::Sigmoid { bias: Some(bias) },
            ..Self::default()
        }
    }
    pub fn with_causal(mut self, causal: Causal) -> Self {
        self.causal = Some(causal);
        self
    }
    pub fn with_window(mut self, window: Window) -> Self {
        self.window = Some(window);
        self
    }
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// The scale the kernel uses for `shape`, after validation.
    pub fn resolved_scale(&self, shape: &Shape) -> Result<f32> {
        let scale = self.scale.unwrap_or(1.0 / (shape.head_dim as f32).sqrt());
        if !scale.is_finite() || scale == 0.0 {
            return Err(Error::InvalidScale { scale });
        }
        Ok(scale)
    }

    /// The sigmoid bias the kernel uses for `shape` (0 for softmax), after validation.
    pub fn resolved_sigmoid_bias(&self, shape: &Shape) -> Result<f32> {
        match self.variant {
            Variant::Softmax => Ok(0.0),
            Variant::Sigmoid { bias } => {
                let bias = bias.unwrap_or(-(shape.kv_len as f32).ln());
                if !bias.is_finite() {
                    return Err(Error::InvalidBias { bias });
                }
                Ok(bias)
            }
        }
    }
}

/// Storage element types. Arithmetic is always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A host element type wflash reads and writes: `f32`, `half::f16` or `half::bf16`.
pub trait Element:
    sealed::Sealed + bytemuck::Pod + Send + Sync + std::fmt::Debug + 'static
{
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::Bf16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

/// The result of an attention call on host slices.
#[derive(Clone, Debug, PartialEq)]
pub struct Attention<T> {
    /// `[batch, q_heads, q_len, value_dim]` in the call's layout.
    pub output: Vec<T>,
    /// Natural-log logsumexp of the scaled scores per `(batch, q_head, query row)`, `[batch, q_heads, q_len]`;
    /// `-inf` for a row that sees no key. `Some` for softmax.
    pub lse: Option<Vec<f32>>,
}

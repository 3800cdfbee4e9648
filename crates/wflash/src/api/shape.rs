//! Shapes, layouts and element types: the sizes of a call.

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
        check_nonzero(&[
            ("batch", self.batch),
            ("q_heads", self.q_heads),
            ("kv_heads", self.kv_heads),
            ("q_len", self.q_len),
            ("kv_len", self.kv_len),
            ("head_dim", self.head_dim),
            ("value_dim", self.value_dim),
        ])?;
        if !self.q_heads.is_multiple_of(self.kv_heads) {
            return Err(Error::HeadsNotDivisible {
                q_heads: self.q_heads,
                kv_heads: self.kv_heads,
            });
        }
        check_head_dims(&[("head_dim", self.head_dim), ("value_dim", self.value_dim)])?;
        // Every element count (and the bias's q_len · kv_len) must be a usize: after this,
        // `q_elems()` and friends cannot overflow.
        let counts = [
            [
                self.batch,
                self.q_heads,
                self.q_len,
                self.head_dim.max(self.value_dim),
            ],
            [
                self.batch,
                self.kv_heads,
                self.kv_len,
                self.head_dim.max(self.value_dim),
            ],
            [self.batch, self.q_heads, self.q_len, self.kv_len],
        ];
        for dims in counts {
            if dims
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .is_none()
            {
                return Err(Error::TooLarge {
                    limit: "usize element count",
                    needed: u64::MAX,
                    max: usize::MAX as u64,
                    hint: " (the shape's element counts overflow)",
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

/// `LengthMismatch` unless a tensor holds the number of elements the call needs.
/// The query side of attention calls: outputs `[batch, heads, len, value_dim]` in a layout
/// and LSEs `[batch, heads, len]`. What [`crate::Engine::merge_attention`] merges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OutputShape {
    pub batch: usize,
    pub heads: usize,
    pub len: usize,
    pub value_dim: usize,
}

impl OutputShape {
    pub fn o_elems(&self) -> usize {
        self.batch * self.heads * self.len * self.value_dim
    }
    pub fn lse_elems(&self) -> usize {
        self.batch * self.heads * self.len
    }

    /// Checks the sizes: none zero, the value dim at most [`MAX_HEAD_DIM`], the element count
    /// a `usize`.
    pub fn validate(&self) -> Result<()> {
        check_nonzero(&[
            ("batch", self.batch),
            ("heads", self.heads),
            ("len", self.len),
            ("value_dim", self.value_dim),
        ])?;
        check_head_dims(&[("value_dim", self.value_dim)])?;
        [self.heads, self.len, self.value_dim]
            .iter()
            .try_fold(self.batch, |n, &d| n.checked_mul(d))
            .map(|_| ())
            .ok_or(Error::TooLarge {
                limit: "usize",
                needed: u64::MAX,
                max: usize::MAX as u64,
                hint: " output elements",
            })
    }
}

impl Shape {
    /// The query side of this call: what its output and LSE hold.
    pub fn output_shape(&self) -> OutputShape {
        OutputShape {
            batch: self.batch,
            heads: self.q_heads,
            len: self.q_len,
            value_dim: self.value_dim,
        }
    }
}

/// `Error::ZeroDimension` for the first of the named sizes that is zero.
pub(crate) fn check_nonzero(dims: &[(&'static str, usize)]) -> Result<()> {
    match dims.iter().find(|&&(_, value)| value == 0) {
        Some(&(dim, _)) => Err(Error::ZeroDimension { dim }),
        None => Ok(()),
    }
}

/// `Error::HeadDimUnsupported` for the first of the named row lengths past [`MAX_HEAD_DIM`].
pub(crate) fn check_head_dims(dims: &[(&'static str, usize)]) -> Result<()> {
    match dims.iter().find(|&&(_, got)| got > MAX_HEAD_DIM) {
        Some(&(dim, got)) => Err(Error::HeadDimUnsupported {
            dim,
            got,
            max: MAX_HEAD_DIM,
        }),
        None => Ok(()),
    }
}

pub(crate) fn check_len(tensor: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(Error::LengthMismatch {
            tensor,
            expected,
            got,
        });
    }
    Ok(())
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

/// The gradients of an attention call on host slices ([`crate::Engine::attention_backward`]):
/// of `Σ dO ∘ O` with respect to each input, each in the layout and (dQ, dK, dV) element type of
/// what it differentiates.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionGrads<T> {
    /// Like Q.
    pub dq: Vec<T>,
    /// Like K: summed over the query heads of each GQA group.
    pub dk: Vec<T>,
    /// Like V: summed over the query heads of each GQA group.
    pub dv: Vec<T>,
    /// f32, like the bias (`[batch | 1, heads | 1, q_len, kv_len]`, summed over the axes it
    /// broadcasts over). `Some` when the call has a bias and asks for its gradient
    /// ([`crate::AttentionOptions::with_bias_grad`]).
    pub d_bias: Option<Vec<f32>>,
    /// f32, one per query head (summed over batch and rows). `Some` with sinks.
    pub d_sinks: Option<Vec<f32>>,
    /// f32, like the temperature (`[batch, q_heads, q_len]`). `Some` with a temperature.
    pub d_temperature: Option<Vec<f32>>,
}

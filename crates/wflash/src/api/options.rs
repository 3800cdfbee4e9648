//! Options of an attention call: variant, masks and score modifiers, and their validation.

use crate::{DType, Error, Result, Shape, check_len};

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

/// An additive bias / mask over the scores (PyTorch SDPA's float `attn_mask`, T5/relative
/// position biases), `[batch, heads, q_len, kv_len]` row-major, where `batch` is 1 or the
/// call's batch and `heads` is 1 or its `q_heads`; a size of 1 broadcasts. `-inf` hides a key.
/// Added in natural-log units after soft-capping and ALiBi. Not available with [`Varlen`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bias<'a> {
    pub values: BiasValues<'a>,
    pub batch: usize,
    pub heads: usize,
}

/// Where a [`Bias`]'s values are, and their element type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BiasValues<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    /// In a GPU tensor of this element type (f32 or f16): the bias of the `GpuModifiers` that
    /// `Engine::attention_gpu_with` (or its backward) is given, which describes it so. Other
    /// calls refuse it.
    Resident(DType),
}

impl BiasValues<'_> {
    /// How many values a host bias holds; `None` for a resident one (its tensor is checked
    /// where it is given).
    pub fn host_len(&self) -> Option<usize> {
        match self {
            BiasValues::F32(v) => Some(v.len()),
            BiasValues::F16(v) => Some(v.len()),
            BiasValues::Resident(_) => None,
        }
    }
    pub fn dtype(&self) -> DType {
        match self {
            BiasValues::F32(_) => DType::F32,
            BiasValues::F16(_) => DType::F16,
            BiasValues::Resident(dtype) => *dtype,
        }
    }
}

impl<'a> Bias<'a> {
    /// An f32 bias of shape `[batch, heads, q_len, kv_len]` (`batch`, `heads`: 1 to broadcast).
    pub fn f32(values: &'a [f32], batch: usize, heads: usize) -> Self {
        Bias {
            values: BiasValues::F32(values),
            batch,
            heads,
        }
    }
    /// An f16 bias of shape `[batch, heads, q_len, kv_len]` (`batch`, `heads`: 1 to broadcast).
    pub fn f16(values: &'a [half::f16], batch: usize, heads: usize) -> Self {
        Bias {
            values: BiasValues::F16(values),
            batch,
            heads,
        }
    }
    /// A bias of shape `[batch, heads, q_len, kv_len]` whose `dtype` values are in a GPU tensor
    /// ([`BiasValues::Resident`]): what a GPU call given that tensor plans with.
    pub fn resident(dtype: DType, batch: usize, heads: usize) -> Self {
        Bias {
            values: BiasValues::Resident(dtype),
            batch,
            heads,
        }
    }
}

/// Packed variable-length sequences, FlashAttention's varlen interface: the call's shape has
/// `batch: 1`, `q_len` = total query rows and `kv_len` = total key rows (so Q is
/// `[total_q, q_heads, head_dim]` in BSHD, `[q_heads, total_q, head_dim]` in BHSD), and
/// sequence `s` owns query rows `cu_seqlens_q[s]..cu_seqlens_q[s + 1]` and key rows
/// `cu_seqlens_k[s]..cu_seqlens_k[s + 1]`. Each sequence attends only within itself, with its
/// own causal diagonal and its own default sigmoid bias, in one dispatch with no padding. The
/// LSE (and a per-query temperature) is `[q_heads, total_q]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Varlen<'a> {
    pub cu_seqlens_q: &'a [u32],
    pub cu_seqlens_k: &'a [u32],
}

impl Varlen<'_> {
    /// Number of sequences.
    pub fn sequences(&self) -> usize {
        self.cu_seqlens_q.len().saturating_sub(1)
    }
    /// `(q_start, q_len, kv_start, kv_len)` of each sequence (after validation).
    pub fn spans(&self) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        self.cu_seqlens_q
            .windows(2)
            .zip(self.cu_seqlens_k.windows(2))
            .map(|(q, k)| {
                let (q0, k0) = (q[0] as usize, k[0] as usize);
                (q0, q[1] as usize - q0, k0, k[1] as usize - k0)
            })
    }
}

/// Options of an attention call. `Default` is non-causal softmax with `scale = 1/sqrt(head_dim)`.
///
/// The score of query `i` and key `j` of query head `h` is, in this order:
/// `s = scale · temperature[i] · q·k`; `s = softcap · tanh(s / softcap)`;
/// `s -= alibi_slopes[h] · |j - diagonal(i)|`; `s += bias[i, j]`. A key is hidden by the causal
/// mask (which `prefix_len` widens), the window, `chunk`, `key_mask` or a bias of `-inf`.
/// [`crate::Modifier`] lists the modifiers. Every modifier works with softmax and with
/// sigmoid (where ALiBi and the bias apply in full), with each other and with causal masks and
/// windows, inside the fused kernel; the few combinations that have no meaning return
/// [`Error::Unsupported`](crate::Error::Unsupported).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AttentionOptions<'a> {
    pub variant: Variant,
    /// Multiplier of `q·k`; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// `None` for full attention.
    pub causal: Option<Causal>,
    /// `None` for no window.
    pub window: Option<Window>,
    /// Logit soft-capping `cap · tanh(s / cap)` (Gemma 2); finite and positive.
    pub softcap: Option<f32>,
    /// ALiBi slope per query head (`q_heads` values): `s -= slope · |j - diagonal(i)|`, with the
    /// diagonal of the causal mask (FlashAttention's `alibi_slopes`). See [`alibi_slopes`].
    pub alibi_slopes: Option<&'a [f32]>,
    /// An additive bias / mask tensor.
    pub bias: Option<Bias<'a>>,
    /// `[batch, kv_len]`: `true` where the key takes part (SDPA's and Hugging Face's
    /// convention; the opposite of `nn.MultiheadAttention`'s `key_padding_mask`). Key tiles
    /// before a row's first or after its last visible key are skipped.
    pub key_mask: Option<&'a [bool]>,
    /// Softmax only: a sink logit per query head (`q_heads` values) that joins every row's
    /// denominator as a key with a zero value (gpt-oss's attention sinks). The LSE includes it.
    pub sinks: Option<&'a [f32]>,
    /// Per-query inverse temperature `[batch, q_heads, q_len]` multiplying the scores
    /// (Selective Attention).
    pub temperature: Option<&'a [f32]>,
    /// Packed variable-length sequences.
    pub varlen: Option<Varlen<'a>>,
    /// Prefix-LM mask (PaliGemma, T5; FlexAttention's `prefix_lm`): keys `j < prefix_len` are
    /// visible to every query besides those the causal mask shows, so the prefix attends
    /// bidirectionally and the rest causally. Needs a causal mask (it widens one); the window
    /// and the other masks still apply. With varlen, per sequence.
    pub prefix_len: Option<usize>,
    /// Chunked local attention (Llama 4's `attention_chunk_size`): query `i` sees only the keys
    /// of its own chunk of `chunk` keys, `j / chunk == diagonal(i) / chunk` (rounded down;
    /// `diagonal(i)` as for the causal mask), and with a causal mask only those up to its
    /// diagonal. Key tiles outside the chunk are skipped. With varlen, per sequence.
    pub chunk: Option<usize>,
    /// The backward also returns the bias's gradient ([`crate::AttentionGrads::d_bias`]): off
    /// by default, since it is as large as the bias (`q_len × kv_len` per batch element and
    /// head it does not broadcast over). No effect on the forward.
    pub bias_grad: bool,
}

/// ALiBi's slopes for `heads` heads (Press et al.): `2^(-8 i / n)` for `i = 1..=n`, `n` the
/// largest power of two not above `heads`, followed when `heads` is not a power of two by the
/// odd-numbered slopes of `2n` heads — the reference recipe BLOOM and MPT use.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    fn power_of_two(n: usize) -> Vec<f32> {
        let start = 2f64.powf(-8.0 / n as f64);
        (1..=n).map(|i| start.powi(i as i32) as f32).collect()
    }
    if heads == 0 {
        return Vec::new();
    }
    let n = 1usize << heads.ilog2();
    let mut slopes = power_of_two(n);
    slopes.extend(power_of_two(2 * n).into_iter().step_by(2).take(heads - n));
    slopes
}

impl<'a> AttentionOptions<'a> {
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
    pub fn with_softcap(mut self, cap: f32) -> Self {
        self.softcap = Some(cap);
        self
    }
    pub fn with_alibi(mut self, slopes: &'a [f32]) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }
    pub fn with_bias(mut self, bias: Bias<'a>) -> Self {
        self.bias = Some(bias);
        self
    }
    pub fn with_key_mask(mut self, mask: &'a [bool]) -> Self {
        self.key_mask = Some(mask);
        self
    }
    pub fn with_sinks(mut self, sinks: &'a [f32]) -> Self {
        self.sinks = Some(sinks);
        self
    }
    pub fn with_temperature(mut self, temperature: &'a [f32]) -> Self {
        self.temperature = Some(temperature);
        self
    }
    pub fn with_varlen(mut self, varlen: Varlen<'a>) -> Self {
        self.varlen = Some(varlen);
        self
    }
    /// A prefix-LM mask over a causal one: see [`AttentionOptions::prefix_len`].
    pub fn with_prefix_lm(mut self, prefix_len: usize) -> Self {
        self.prefix_len = Some(prefix_len);
        self
    }
    /// Chunked local attention: see [`AttentionOptions::chunk`].
    pub fn with_chunked_local(mut self, chunk: usize) -> Self {
        self.chunk = Some(chunk);
        self
    }

    /// Asks the backward for the bias's gradient: see [`AttentionOptions::bias_grad`].
    pub fn with_bias_grad(mut self) -> Self {
        self.bias_grad = true;
        self
    }

    /// The scale the kernel uses for `shape`, after validation.
    pub fn resolved_scale(&self, shape: &Shape) -> Result<f32> {
        resolve_scale(self.scale, shape)
    }

    /// The sigmoid bias the kernel uses for a sequence of `kv_len` keys (0 for softmax), after
    /// validation. The default is `-ln(kv_len)` (0 for a varlen sequence without keys).
    pub fn resolved_sigmoid_bias(&self, kv_len: usize) -> Result<f32> {
        match self.variant {
            Variant::Softmax => Ok(0.0),
            Variant::Sigmoid { bias } => {
                let bias = bias.unwrap_or(-(kv_len.max(1) as f32).ln());
                if !bias.is_finite() {
                    return Err(Error::InvalidBias { bias });
                }
                Ok(bias)
            }
        }
    }

    /// Checks the modifiers against `shape`: lengths, values, and combinations.
    pub fn validate_modifiers(&self, shape: &Shape) -> Result<()> {
        shape.validate()?;
        let invalid = |modifier: &'static str, reason: String| {
            Err(Error::InvalidModifier { modifier, reason })
        };
        if let Some(cap) = self.softcap
            && !(cap.is_finite() && cap > 0.0)
        {
            return invalid("softcap", format!("{cap} must be finite and positive"));
        }
        let per_row = shape.batch * shape.q_heads * shape.q_len;
        for (modifier, values, len) in [
            ("alibi_slopes", self.alibi_slopes, shape.q_heads),
            ("sinks", self.sinks, shape.q_heads),
            ("temperature", self.temperature, per_row),
        ] {
            let Some(values) = values else { continue };
            if values.len() != len {
                return Err(Error::LengthMismatch {
                    tensor: modifier,
                    expected: len,
                    got: values.len(),
                });
            }
            if let Some(bad) = values.iter().find(|x| !x.is_finite()) {
                return invalid(modifier, format!("holds {bad}; every value must be finite"));
            }
        }
        if let Some(mask) = self.key_mask {
            check_len("key_mask", shape.batch * shape.kv_len, mask.len())?;
        }
        if let Some(bias) = self.bias {
            if bias.batch != 1 && bias.batch != shape.batch {
                return invalid(
                    "bias",
                    format!("batch {} must be 1 or {}", bias.batch, shape.batch),
                );
            }
            if bias.heads != 1 && bias.heads != shape.q_heads {
                return invalid(
                    "bias",
                    format!("heads {} must be 1 or {}", bias.heads, shape.q_heads),
                );
            }
            if let Some(got) = bias.values.host_len() {
                let len = bias.batch * bias.heads * shape.q_len * shape.kv_len;
                check_len("bias", len, got)?;
            }
            if !matches!(bias.values.dtype(), DType::F32 | DType::F16) {
                return Err(Error::DTypeUnsupported {
                    dtype: bias.values.dtype(),
                    reason: "a bias holds f32 or f16 values",
                });
            }
        }
        if self.prefix_len.is_some() && self.causal.is_none() {
            return Err(Error::Unsupported {
                combination: "a prefix-LM mask without a causal mask (prefix_len widens the causal mask; without one every key is visible already)",
            });
        }
        if self.chunk == Some(0) {
            return invalid("chunk", "must be at least 1 key".to_string());
        }
        if matches!(self.variant, Variant::Sigmoid { .. }) && self.sinks.is_some() {
            return Err(Error::Unsupported {
                combination: "attention sinks with sigmoid attention (a sink joins a softmax denominator; sigmoid has none)",
            });
        }
        if let Some(varlen) = self.varlen {
            if self.bias.is_some() {
                return Err(Error::Unsupported {
                    combination: "a bias tensor with varlen (its rows would follow the packed sequences; pad instead)",
                });
            }
            if self.key_mask.is_some() {
                return Err(Error::Unsupported {
                    combination: "a key mask with varlen (cu_seqlens_k already gives each sequence its keys)",
                });
            }
            if shape.batch != 1 {
                return invalid(
                    "varlen",
                    format!(
                        "needs batch 1 (sequences are packed along q_len / kv_len), got batch {}",
                        shape.batch
                    ),
                );
            }
            let (cq, ck) = (varlen.cu_seqlens_q, varlen.cu_seqlens_k);
            if cq.len() < 2 || cq.len() != ck.len() {
                return invalid(
                    "varlen",
                    format!(
                        "cu_seqlens_q and cu_seqlens_k need the same length, at least 2 (got {} and {})",
                        cq.len(),
                        ck.len()
                    ),
                );
            }
            for (name, cu, total) in [
                ("cu_seqlens_q", cq, shape.q_len),
                ("cu_seqlens_k", ck, shape.kv_len),
            ] {
                if cu[0] != 0
                    || cu[cu.len() - 1] as usize != total
                    || cu.windows(2).any(|w| w[1] < w[0])
                {
                    return invalid(
                        "varlen",
                        format!(
                            "{name} must rise from 0 to {total} without decreasing, got {:?}",
                            &cu[..cu.len().min(8)]
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

/// `scale`, or `1/sqrt(head_dim)` when absent; finite and non-zero or `InvalidScale`.
pub(crate) fn resolve_scale(scale: Option<f32>, shape: &Shape) -> Result<f32> {
    let scale = scale.unwrap_or(1.0 / (shape.head_dim as f32).sqrt());
    if !scale.is_finite() || scale == 0.0 {
        return Err(Error::InvalidScale { scale });
    }
    Ok(scale)
}

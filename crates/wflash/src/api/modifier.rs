//! The modifier table: every score and mask modifier of an attention call, in one enum.
//!
//! A modifier is one [`Modifier`] variant, its option in [`AttentionOptions`] (with its
//! validation), one WGSL function or term in `shaders/flash_common.wgsl` and one reference
//! function in `wflash-ref`. The kernel key holds the set of those that change a kernel's code
//! ([`Modifier::compiled`]); the others are runtime data. Tests, the bench and the hostile-input
//! generator walk [`Modifier::ALL`].

use crate::AttentionOptions;

/// One score or mask modifier of an attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Modifier {
    /// Logit soft-capping `cap · tanh(s / cap)` (Gemma 2): [`AttentionOptions::softcap`].
    Softcap,
    /// ALiBi slopes per query head: [`AttentionOptions::alibi_slopes`].
    Alibi,
    /// An additive bias / mask tensor: [`AttentionOptions::bias`].
    Bias,
    /// Keys that take part, per batch element: [`AttentionOptions::key_mask`].
    KeyMask,
    /// A sink logit per query head (gpt-oss): [`AttentionOptions::sinks`].
    Sinks,
    /// A per-query inverse temperature: [`AttentionOptions::temperature`].
    Temperature,
    /// Packed variable-length sequences: [`AttentionOptions::varlen`].
    Varlen,
    /// A prefix-LM mask (PaliGemma, T5): keys before `prefix_len` are visible to every query,
    /// causal after: [`AttentionOptions::prefix_len`].
    PrefixLm,
    /// Chunked local attention (Llama 4): a query sees only the keys of its own chunk:
    /// [`AttentionOptions::chunk`].
    ChunkedLocal,
}

impl Modifier {
    /// Every modifier, in the order the score applies them (see [`AttentionOptions`]).
    pub const ALL: [Modifier; 9] = [
        Modifier::Softcap,
        Modifier::Alibi,
        Modifier::Bias,
        Modifier::KeyMask,
        Modifier::Sinks,
        Modifier::Temperature,
        Modifier::Varlen,
        Modifier::PrefixLm,
        Modifier::ChunkedLocal,
    ];

    /// Its name in labels, bench cases and test output.
    pub fn name(self) -> &'static str {
        match self {
            Modifier::Softcap => "softcap",
            Modifier::Alibi => "alibi",
            Modifier::Bias => "bias",
            Modifier::KeyMask => "key_mask",
            Modifier::Sinks => "sinks",
            Modifier::Temperature => "temperature",
            Modifier::Varlen => "varlen",
            Modifier::PrefixLm => "prefix_lm",
            Modifier::ChunkedLocal => "chunked_local",
        }
    }

    /// The WGSL `const` that compiles it into a kernel, for the modifiers that cost work per
    /// score (a kernel without one must not pay for it). The others cost nothing per score
    /// (per-row data, or a change of each row's visible key range) and are runtime data: one
    /// pipeline serves calls with and without them.
    pub fn compiled(self) -> Option<&'static str> {
        match self {
            Modifier::Softcap => Some("SOFTCAP"),
            Modifier::Alibi => Some("ALIBI"),
            Modifier::Bias => Some("BIAS"),
            Modifier::KeyMask => Some("KEY_MASK"),
            Modifier::Sinks
            | Modifier::Temperature
            | Modifier::Varlen
            | Modifier::PrefixLm
            | Modifier::ChunkedLocal => None,
        }
    }

    /// Whether `opts` turns it on.
    pub fn is_on(self, opts: &AttentionOptions<'_>) -> bool {
        match self {
            Modifier::Softcap => opts.softcap.is_some(),
            Modifier::Alibi => opts.alibi_slopes.is_some(),
            Modifier::Bias => opts.bias.is_some(),
            Modifier::KeyMask => opts.key_mask.is_some(),
            Modifier::Sinks => opts.sinks.is_some(),
            Modifier::Temperature => opts.temperature.is_some(),
            Modifier::Varlen => opts.varlen.is_some(),
            Modifier::PrefixLm => opts.prefix_len.is_some(),
            Modifier::ChunkedLocal => opts.chunk.is_some(),
        }
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }
}

/// A set of [`Modifier`]s (the kernel key holds the compiled ones).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModifierSet(u16);

impl ModifierSet {
    /// No modifier.
    pub const NONE: ModifierSet = ModifierSet(0);

    /// The modifiers `opts` turns on.
    pub fn of(opts: &AttentionOptions<'_>) -> ModifierSet {
        Modifier::ALL
            .into_iter()
            .filter(|m| m.is_on(opts))
            .collect()
    }

    /// Every modifier that changes a kernel's code.
    pub fn all_compiled() -> ModifierSet {
        Self::compiled_of(Modifier::ALL.into_iter().collect())
    }

    /// The members of `set` that change a kernel's code.
    pub fn compiled_of(set: ModifierSet) -> ModifierSet {
        set.iter().filter(|m| m.compiled().is_some()).collect()
    }

    pub fn contains(self, modifier: Modifier) -> bool {
        self.0 & modifier.bit() != 0
    }

    pub fn with(self, modifier: Modifier) -> ModifierSet {
        ModifierSet(self.0 | modifier.bit())
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// The members, in [`Modifier::ALL`]'s order.
    pub fn iter(self) -> impl Iterator<Item = Modifier> {
        Modifier::ALL.into_iter().filter(move |m| self.contains(*m))
    }

    /// Every subset of `self` (the empty one first): the kernel variants of a family.
    pub fn subsets(self) -> impl Iterator<Item = ModifierSet> {
        let members: Vec<Modifier> = self.iter().collect();
        (0u32..1 << members.len()).map(move |mask| {
            members
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, m)| *m)
                .collect()
        })
    }
}

impl FromIterator<Modifier> for ModifierSet {
    fn from_iter<I: IntoIterator<Item = Modifier>>(iter: I) -> Self {
        iter.into_iter().fold(ModifierSet::NONE, ModifierSet::with)
    }
}

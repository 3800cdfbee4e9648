//! The backward kernels (flash_bwd.wgsl): the prep pass, the dK/dV pass, the dQ pass, and the
//! fixed-order reduction that sums gradients over broadcast axes.

use super::forward::{VariantKind, modifier_prelude};
use super::wgsl::{Wgsl, expand_unrolls, section_text};
use crate::{Modifier, ModifierSet};

/// One of flash_bwd.wgsl's attention passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackwardPass {
    /// Per query row: `D = rowsum(dO ∘ O)`, the row statistics, dO packed, the sinks' shares.
    Prep,
    /// Per key block: dK and dV, looping over the queries of the key's GQA group.
    KeyValue,
    /// Per query block: dQ, the temperature's and the bias's gradients.
    Query,
    /// Per block of query rows, after the dQ pass: the shares of the sinks' gradient.
    Sinks,
}

impl BackwardPass {
    pub const ALL: [BackwardPass; 4] = [
        BackwardPass::Prep,
        BackwardPass::KeyValue,
        BackwardPass::Query,
        BackwardPass::Sinks,
    ];
    /// Its section of flash_bwd.wgsl.
    fn section(self) -> &'static str {
        match self {
            BackwardPass::Prep => "prep",
            BackwardPass::KeyValue => "dkdv",
            BackwardPass::Query => "dq",
            BackwardPass::Sinks => "sinks",
        }
    }
    pub fn entry_point(self) -> &'static str {
        match self {
            BackwardPass::Prep => "flash_bwd_prep",
            BackwardPass::KeyValue => "flash_bwd_dkdv",
            BackwardPass::Query => "flash_bwd_dq",
            BackwardPass::Sinks => "flash_bwd_sinks",
        }
    }
}

/// The dK/dV and dQ passes keep 2·ROWS·(D4 + DV4) (dkdv) or ROWS·(2·D4 + DV4) (dq) vec4s per
/// invocation; this bounds ROWS × the widest row, as the forward's unrolled kernel does.
const BACKWARD_ROW_VEC4S: u32 = 64;
/// The most rows per invocation: the cap [`backward_rows`] takes on every adapter but a
/// browser's software one.
pub const BACKWARD_MAX_ROWS: u32 = 8;
/// The cap in a browser on a software adapter (Chromium's SwiftShader): built with 4 or 8 rows
/// (head dims up to 64), the dK/dV and dQ pipelines crashed Chromium's GPU process after
/// 100-120 s of compiling; with 2 they build (47 s at head dim 128) and pass.
pub const BACKWARD_MAX_ROWS_BROWSER_CPU: u32 = 2;
/// Keys per step of the dQ pass's loop.
const BACKWARD_KEYS: u32 = 4;

/// Rows (keys or queries) per invocation of the dK/dV and dQ passes at these dims: a power of
/// two from 1 to `max_rows` (a power of two).
pub fn backward_rows(head_dim: u32, value_dim: u32, max_rows: u32) -> u32 {
    let widest = head_dim.max(value_dim).div_ceil(4).max(1);
    let rows = (BACKWARD_ROW_VEC4S / widest).clamp(1, max_rows);
    1 << rows.ilog2()
}

/// Everything that selects one compiled backward pipeline. The prep pass depends only on the
/// value dim and the variant, the sinks pass on nothing (the planner leaves the other fields
/// at their defaults for them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackwardKey {
    pub pass: BackwardPass,
    pub head_dim: u32,
    pub value_dim: u32,
    /// Keys (dK/dV) or query rows (dQ) per invocation: [`backward_rows`].
    pub rows: u32,
    pub causal: bool,
    pub variant: VariantKind,
    /// The compiled modifiers ([`Modifier::compiled`]).
    pub mods: ModifierSet,
    /// The dQ pass writes the bias's gradient.
    pub bias_grad: bool,
}

impl BackwardKey {
    /// The prep pass's key for these dims and variant.
    pub fn prep(value_dim: u32, variant: VariantKind) -> BackwardKey {
        BackwardKey {
            pass: BackwardPass::Prep,
            head_dim: value_dim,
            value_dim,
            rows: 1,
            causal: false,
            variant,
            mods: ModifierSet::default(),
            bias_grad: false,
        }
    }

    /// The sinks pass's key (softmax only: sigmoid has no sinks).
    pub fn sinks() -> BackwardKey {
        BackwardKey {
            pass: BackwardPass::Sinks,
            ..BackwardKey::prep(1, VariantKind::Softmax)
        }
    }

    /// `flash_bwd_dq softmax d64 dv64 rows4 causal softcap bias_grad`.
    pub fn label(&self) -> String {
        let mut label = format!(
            "{} {} d{} dv{} rows{}{}",
            self.pass.entry_point(),
            self.variant.name(),
            self.head_dim,
            self.value_dim,
            self.rows,
            if self.causal { " causal" } else { "" }
        );
        for name in self.mods.iter().filter_map(Modifier::compiled) {
            label.push(' ');
            label.push_str(&name.to_lowercase());
        }
        if self.bias_grad {
            label.push_str(" bias_grad");
        }
        label
    }

    /// The prelude (dims, switches, the bias and key-mask readers), then the `common` section of
    /// flash_bwd.wgsl and the pass's own, with their loops written out.
    pub fn source(&self) -> String {
        let mut src = Wgsl::new();
        let counts = [
            ("ROWS", self.rows),
            ("D4", self.head_dim.div_ceil(4)),
            ("DV4", self.value_dim.div_ceil(4)),
            ("KEYS", BACKWARD_KEYS),
        ];
        for (name, value) in counts {
            src.push(&format!("const {name}: u32 = {value}u;"));
        }
        src.push(&format!(
            "const HEAD_DIM: u32 = {}u;\nconst VALUE_DIM: u32 = {}u;\nconst CAUSAL: bool = {};\nconst SIGMOID: bool = {};\nconst BIAS_GRAD: bool = {};",
            self.head_dim,
            self.value_dim,
            self.causal,
            self.variant == VariantKind::Sigmoid,
            self.bias_grad
        ));
        modifier_prelude(&mut src, self.mods);
        for section in ["common", self.pass.section()] {
            let text = section_text("flash_bwd.wgsl", "pass", section);
            src.push(&expand_unrolls(&text, &counts));
        }
        src.finish()
    }
}

impl super::Kernel for BackwardKey {
    fn label(&self) -> String {
        BackwardKey::label(self)
    }
    fn source(&self) -> String {
        BackwardKey::source(self)
    }
    fn entry_point(&self) -> &'static str {
        self.pass.entry_point()
    }
}

/// The fixed-order sum over strided slices (flash_bwd.wgsl's `reduce_sum`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReduceKernel;

impl super::Kernel for ReduceKernel {
    fn label(&self) -> String {
        "reduce_sum".to_string()
    }
    fn source(&self) -> String {
        let mut src = Wgsl::new();
        src.push(&section_text("flash_bwd.wgsl", "pass", "reduce"));
        src.finish()
    }
    fn entry_point(&self) -> &'static str {
        "reduce_sum"
    }
}

/// Every backward kernel at these dims: the prep pass per variant; the dK/dV and dQ passes
/// causal or not × variants × every subset of the compiled modifiers (× the bias gradient
/// where the bias is compiled in); the sinks pass and the reduction.
pub(super) fn variants(dims: &[(u32, u32)]) -> Vec<super::KernelId> {
    let mut kernels = vec![
        super::KernelId::Reduce(ReduceKernel),
        super::KernelId::Backward(BackwardKey::sinks()),
    ];
    for &(head_dim, value_dim) in dims {
        for variant in VariantKind::ALL {
            kernels.push(super::KernelId::Backward(BackwardKey::prep(
                value_dim, variant,
            )));
            for pass in [BackwardPass::KeyValue, BackwardPass::Query] {
                for causal in [false, true] {
                    for mods in ModifierSet::all_compiled().subsets() {
                        let bias_grads: &[bool] = match (pass, mods.contains(Modifier::Bias)) {
                            (BackwardPass::Query, true) => &[false, true],
                            _ => &[false],
                        };
                        for &bias_grad in bias_grads {
                            kernels.push(super::KernelId::Backward(BackwardKey {
                                pass,
                                head_dim,
                                value_dim,
                                rows: backward_rows(head_dim, value_dim, BACKWARD_MAX_ROWS),
                                causal,
                                variant,
                                mods,
                                bias_grad,
                            }));
                        }
                    }
                }
            }
        }
    }
    kernels
}

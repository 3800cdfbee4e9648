//! The one judge of every kernel output: FlashAttention's standard (DESIGN.md) over named
//! outputs. An output passes when its max abs error against the f64 truth is at most
//! `factor ×` that of a naive computation in the same storage precision, plus a small slack.
//! Attention's O and LSE, linear attention's O and state, and the gradients to come are all
//! judged here.

/// A tolerance in FlashAttention's form: `max_abs_err <= factor · baseline_err + slack`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub factor: f64,
    pub slack: f64,
}

impl Tolerance {
    /// The forward-pass contract of DESIGN.md.
    pub const FORWARD: Tolerance = Tolerance {
        factor: 2.0,
        slack: 1e-5,
    };
    /// The backward-pass contract of DESIGN.md (dQ, dK, dV and modifier gradients).
    pub const BACKWARD: Tolerance = Tolerance {
        factor: 3.0,
        slack: 1e-5,
    };
    pub fn bound(&self, baseline_err: f64) -> f64 {
        self.factor * baseline_err + self.slack
    }
}

/// One output of a call: the kernel's values, the f64 truth and the same-precision naive
/// baseline, all in one layout.
#[derive(Clone, Debug)]
pub struct Output<'a> {
    /// "O", "LSE", "state", "dQ", ...
    pub name: &'static str,
    pub got: Vec<f64>,
    pub truth: &'a [f64],
    pub naive: &'a [f64],
    pub tolerance: Tolerance,
    /// What the slack is multiplied by: 1, or for values of any magnitude (the LSE, which
    /// grows with the logits) the largest finite magnitude of the truth.
    pub slack_scale: f64,
}

impl<'a> Output<'a> {
    /// An output judged by the forward contract.
    pub fn forward(name: &'static str, got: Vec<f64>, truth: &'a [f64], naive: &'a [f64]) -> Self {
        Output {
            name,
            got,
            truth,
            naive,
            tolerance: Tolerance::FORWARD,
            slack_scale: 1.0,
        }
    }

    /// A gradient, judged by the backward contract.
    pub fn backward(name: &'static str, got: Vec<f64>, truth: &'a [f64], naive: &'a [f64]) -> Self {
        Output {
            tolerance: Tolerance::BACKWARD,
            ..Output::forward(name, got, truth, naive)
        }
    }

    /// Slack relative to the truth's largest finite magnitude (at least 1).
    pub fn slack_scaled_to_truth(mut self) -> Self {
        self.slack_scale = (self.truth.iter())
            .filter(|x| x.is_finite())
            .fold(1.0f64, |m, x| m.max(x.abs()));
        self
    }
}

/// How one output fared.
#[derive(Clone, Debug)]
pub struct Judged {
    pub name: &'static str,
    pub err: f64,
    pub naive_err: f64,
    pub bound: f64,
}

/// How a call fared: `ratio` is the worst `err / bound` over its outputs (pass ≤ 1).
#[derive(Clone, Debug)]
pub struct Verdict {
    pub ratio: f64,
    pub outputs: Vec<Judged>,
}

/// Judges every output of a call (`what` names the call in failures); the first that fails
/// is the error, with its worst element.
pub fn judge(what: &dyn std::fmt::Debug, outputs: Vec<Output<'_>>) -> Result<Verdict, String> {
    let mut verdict = Verdict {
        ratio: 0.0,
        outputs: Vec::new(),
    };
    for out in outputs {
        if out.got.len() != out.truth.len() || out.naive.len() != out.truth.len() {
            return Err(format!(
                "{what:?}\n  {}: {} values (naive {}), want {}",
                out.name,
                out.got.len(),
                out.naive.len(),
                out.truth.len()
            ));
        }
        let (err, worst) = max_abs_err(out.got.iter().copied(), out.truth);
        let (naive_err, _) = max_abs_err(out.naive.iter().copied(), out.truth);
        let bound = out.tolerance.factor * naive_err + out.tolerance.slack * out.slack_scale;
        let ratio = err / bound;
        // NaN fails too.
        if !ratio.partial_cmp(&1.0).is_some_and(|o| o.is_le()) {
            let (got, want) = (out.got[worst], out.truth[worst]);
            return Err(format!(
                "{what:?}\n  {}: max abs err {err:e} at flat index {worst} (got {got}, want {want}) \
                 > bound {bound:e} (naive {naive_err:e}); max rel {:e}",
                out.name,
                err / want.abs().max(1e-30),
            ));
        }
        verdict.ratio = verdict.ratio.max(ratio);
        verdict.outputs.push(Judged {
            name: out.name,
            err,
            naive_err,
            bound,
        });
    }
    Ok(verdict)
}

/// Max abs difference and where; NaN anywhere (or an infinity that differs) counts as infinite
/// error.
pub fn max_abs_err(got: impl IntoIterator<Item = f64>, truth: &[f64]) -> (f64, usize) {
    let mut worst = (0.0, 0);
    for (i, (g, t)) in got.into_iter().zip(truth).enumerate() {
        let err = if g == *t {
            0.0
        } else if g.is_nan() || t.is_nan() {
            f64::INFINITY
        } else {
            (g - t).abs()
        };
        if err > worst.0 || err.is_nan() {
            worst = (err, i);
        }
    }
    worst
}

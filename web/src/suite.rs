//! The conformance slice the browser runs: evenly spread samples of the native suite's grids
//! (forward, modifiers, backward, linear forward and backward) and decode cases, each judged
//! by the same harness and tolerance against the f64 reference compiled to wasm.

use serde::Serialize;
use wasm_bindgen::prelude::*;
use wflash::{Layout, Variant};
use wflash_conformance::decode::{DecodeCase, base_case, run_decode_case_async};
use wflash_conformance::linear::{self, LinearCase};
use wflash_conformance::{Case, Path, Verdict, grid};

use crate::engines::{engine, js_error};

/// How many cases of each grid the slice takes.
const FORWARD_CASES: usize = 16;
const MODIFIER_CASES: usize = 12;
const BACKWARD_CASES: usize = 8;
const LINEAR_CASES: usize = 6;
const LINEAR_BACKWARD_CASES: usize = 4;

/// One case of the slice.
#[derive(Debug)]
enum SliceCase {
    Forward(Case),
    Backward(Case),
    Linear(LinearCase),
    LinearBackward(LinearCase),
    Decode(DecodeCase),
}

impl SliceCase {
    fn path(&self) -> Path {
        match self {
            SliceCase::Forward(c) | SliceCase::Backward(c) => c.path,
            SliceCase::Linear(c) | SliceCase::LinearBackward(c) => c.path,
            SliceCase::Decode(c) => c.path,
        }
    }

    fn grid(&self) -> &'static str {
        match self {
            SliceCase::Forward(_) => "forward",
            SliceCase::Backward(_) => "backward",
            SliceCase::Linear(_) => "linear",
            SliceCase::LinearBackward(_) => "linear backward",
            SliceCase::Decode(_) => "decode",
        }
    }

    async fn run(&self, engine: &wflash::Engine) -> Result<Verdict, String> {
        use wflash_conformance::backward::run_backward_case_async;
        use wflash_conformance::linear::{run_linear_backward_case_async, run_linear_case_async};
        match self {
            SliceCase::Forward(c) => wflash_conformance::run_case_on_async(engine, c).await,
            SliceCase::Backward(c) => run_backward_case_async(engine, c).await,
            SliceCase::Linear(c) => run_linear_case_async(engine, c).await,
            SliceCase::LinearBackward(c) => run_linear_backward_case_async(engine, c).await,
            SliceCase::Decode(c) => run_decode_case_async(engine, c).await,
        }
    }
}

/// `n` cases spread evenly over `cases` (all of them when there are fewer).
fn spread<T: Clone>(cases: &[T], n: usize) -> Vec<T> {
    let n = n.min(cases.len());
    (0..n).map(|i| cases[i * cases.len() / n].clone()).collect()
}

/// The slice for an adapter with or without `SHADER_F16` (without it the native f16 path
/// does not exist: its cases are left out, and f16 runs packed).
fn slice(shader_f16: bool) -> Vec<SliceCase> {
    let runnable = |p: Path| shader_f16 || p != Path::F16Native;
    let keep = |cases: Vec<Case>| -> Vec<Case> {
        cases.into_iter().filter(|c| runnable(c.path)).collect()
    };
    let mut out = Vec::new();
    out.extend(
        spread(&keep(grid::cases()), FORWARD_CASES)
            .into_iter()
            .map(SliceCase::Forward),
    );
    out.extend(
        spread(&keep(grid::modifier_cases()), MODIFIER_CASES)
            .into_iter()
            .map(SliceCase::Forward),
    );
    out.extend(
        spread(&keep(grid::backward_cases()), BACKWARD_CASES)
            .into_iter()
            .map(SliceCase::Backward),
    );
    let linear: Vec<LinearCase> = linear::grid()
        .into_iter()
        .filter(|c| runnable(c.path))
        .collect();
    out.extend(
        spread(&linear, LINEAR_CASES)
            .into_iter()
            .map(SliceCase::Linear),
    );
    // The backward takes the cases between the forward's.
    let offset = linear.len() / (2 * LINEAR_CASES);
    out.extend(
        spread(&linear[offset..], LINEAR_BACKWARD_CASES)
            .into_iter()
            .map(SliceCase::LinearBackward),
    );
    out.extend(decode_cases().into_iter().map(SliceCase::Decode));
    out
}

/// Decode cases from the native grid's base case: split-KV with speculative tokens, a paged
/// cache, the 16-bit types, GQA with every modifier, sigmoid.
fn decode_cases() -> Vec<DecodeCase> {
    let base = base_case();
    vec![
        DecodeCase { ..base.clone() },
        DecodeCase {
            layout: Layout::Bshd,
            tokens: 3,
            splits: Some(3),
            seed: 0xdec_7001,
            ..base.clone()
        },
        DecodeCase {
            path: Path::F16Packed,
            block_size: Some(16),
            splits: Some(4),
            seed: 0xdec_7002,
            ..base.clone()
        },
        DecodeCase {
            path: Path::Bf16,
            q_heads: 8,
            kv_heads: 2,
            window: Some(100),
            softcap: Some(30.0),
            alibi: true,
            sinks: true,
            seed: 0xdec_7003,
            ..base.clone()
        },
        DecodeCase {
            variant: Variant::Sigmoid { bias: None },
            tokens: 2,
            seed: 0xdec_7004,
            ..base
        },
    ]
}

/// What the page shows when the slice is done.
#[derive(Debug, Serialize)]
struct SuiteSummary {
    adapter: String,
    cases: usize,
    failed: usize,
    /// Worst error / bound over the passing cases (a pass is at most 1).
    worst_ratio: f64,
    seconds: f64,
    /// Paths of the native suite this adapter cannot run.
    left_out: Vec<String>,
}

/// Runs the slice (its cases `first..first + count`, to chase one), calling `report` with one
/// line per case as it finishes; returns the summary as JSON.
#[wasm_bindgen]
pub async fn run_suite(
    report: js_sys::Function,
    first: usize,
    count: usize,
) -> Result<String, JsValue> {
    let start = web_time::Instant::now();
    let main = engine(Path::F32).await?;
    let shader_f16 = main.info().shader_f16;
    let say = |line: String| {
        let _ = report.call1(&JsValue::NULL, &JsValue::from_str(&line));
    };
    say(format!("adapter: {}", main.info()));
    let all = slice(shader_f16);
    let total = all.len();
    let cases: Vec<SliceCase> = all.into_iter().skip(first).take(count).collect();
    let mut summary = SuiteSummary {
        adapter: main.info().to_string(),
        cases: cases.len(),
        failed: 0,
        worst_ratio: 0.0,
        seconds: 0.0,
        left_out: if shader_f16 {
            Vec::new()
        } else {
            vec!["native f16 (no shader-f16; f16 runs on the packed path)".into()]
        },
    };
    for (i, case) in cases.iter().enumerate() {
        let engine = engine(case.path()).await?;
        let case_start = web_time::Instant::now();
        let outcome = case.run(&engine).await;
        let secs = case_start.elapsed().as_secs_f64();
        match outcome {
            Ok(verdict) => {
                summary.worst_ratio = summary.worst_ratio.max(verdict.ratio);
                say(format!(
                    "PASS {}/{total} {} ratio {:.3} ({secs:.1} s) {case:?}",
                    first + i + 1,
                    case.grid(),
                    verdict.ratio
                ));
            }
            Err(err) => {
                summary.failed += 1;
                say(format!(
                    "FAIL {}/{total} {} ({secs:.1} s) {err}",
                    first + i + 1,
                    case.grid()
                ));
            }
        }
    }
    summary.seconds = start.elapsed().as_secs_f64();
    serde_json::to_string(&summary).map_err(js_error)
}

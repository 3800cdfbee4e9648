//! The demo: one attention call of the visitor's choosing, judged against the f64 reference
//! by the conformance harness, then timed over a few runs.

use plotters::prelude::*;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;
use wflash::{Causal, Element, Engine, FeatureMap, Layout, LinearKernel, Shape, Variant};
use wflash_conformance::linear::{Feed, LinearCase, run_linear_case_async};
use wflash_conformance::{Case, Path, Verdict, random, run_case_on_async};

use crate::engines::{engine, js_error};

/// What the page asks for.
#[derive(Debug, Deserialize)]
struct DemoSpec {
    /// "softmax", "sigmoid" or "linear".
    variant: String,
    /// "f32", "f16" or "bf16".
    dtype: String,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    dim: usize,
    causal: bool,
    /// Timed runs after the judged one.
    runs: usize,
}

/// What the page shows.
#[derive(Debug, Serialize)]
struct DemoResult {
    adapter: String,
    case: String,
    /// The judged run: pipeline builds, upload, dispatch, readback.
    first_ms: f64,
    /// Each timed run: dispatch and readback of the output (inputs already on the GPU).
    times_ms: Vec<f64>,
    median_ms: f64,
    gflops: f64,
    outputs: Vec<JudgedOutput>,
    /// Worst error / bound over the outputs (a pass is at most 1).
    worst_ratio: f64,
    pass: bool,
    chart_svg: String,
}

#[derive(Debug, Serialize)]
struct JudgedOutput {
    name: &'static str,
    max_abs_err: f64,
    naive_err: f64,
    bound: f64,
}

/// The engine's adapter, as the engine describes it.
#[wasm_bindgen]
pub async fn adapter() -> Result<String, JsValue> {
    Ok(engine(Path::F32).await?.info().to_string())
}

/// Runs the call `spec` (JSON, see `DemoSpec`) describes: once judged against the f64
/// reference, then `runs` times timed. Returns the outcome as JSON; a bad spec or an engine
/// error rejects with its message.
#[wasm_bindgen]
pub async fn run_demo(spec: String) -> Result<String, JsValue> {
    let spec: DemoSpec = serde_json::from_str(&spec).map_err(js_error)?;
    if !(1..=50).contains(&spec.runs) {
        return Err(js_error("runs: 1 to 50"));
    }
    // The engine with the adapter's own f16 path: native f16 where the adapter has it.
    let engine = engine(Path::F32).await?;
    let path = match spec.dtype.as_str() {
        "f32" => Path::F32,
        "f16" if engine.info().shader_f16 => Path::F16Native,
        "f16" => Path::F16Packed,
        "bf16" => Path::Bf16,
        other => return Err(js_error(format!("unknown dtype `{other}`"))),
    };
    let seed = 0x00de_0000 + spec.seq as u64;
    let call = match spec.variant.as_str() {
        "softmax" | "sigmoid" => {
            let shape = Shape {
                kv_heads: spec.kv_heads,
                ..Shape::mha(spec.batch, spec.heads, spec.seq, spec.dim)
            };
            let mut case = Case::softmax(shape, path, seed);
            case.causal = spec.causal.then_some(Causal::BottomRight);
            if spec.variant == "sigmoid" {
                case.variant = Variant::Sigmoid { bias: None };
            }
            Call::Attention(case)
        }
        "linear" => Call::Linear(LinearCase {
            path,
            layout: Layout::Bhsd,
            batch: spec.batch,
            q_heads: spec.heads,
            kv_heads: spec.kv_heads,
            len: spec.seq,
            key_dim: spec.dim,
            value_dim: spec.dim,
            causal: spec.causal,
            feature_map: FeatureMap::Identity,
            decay: spec.causal,
            normalize: false,
            kernel: LinearKernel::Auto,
            chunk_size: None,
            initial: false,
            feed: Feed::OneCall,
            seed,
        }),
        other => return Err(js_error(format!("unknown variant `{other}`"))),
    };

    let start = web_time::Instant::now();
    let verdict = call.judge(&engine).await.map_err(js_error)?;
    let first_ms = start.elapsed().as_secs_f64() * 1e3;
    let times_ms = match path {
        Path::F32 => call.time::<f32>(&engine, spec.runs).await,
        Path::F16Native | Path::F16Packed => call.time::<half::f16>(&engine, spec.runs).await,
        Path::Bf16 => call.time::<half::bf16>(&engine, spec.runs).await,
    }
    .map_err(js_error)?;
    let mut sorted = times_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ms = sorted[sorted.len() / 2];
    let result = DemoResult {
        adapter: engine.info().to_string(),
        case: format!(
            "{} {} B={} H={}/{} N={} D={}{}",
            spec.variant,
            spec.dtype,
            spec.batch,
            spec.heads,
            spec.kv_heads,
            spec.seq,
            spec.dim,
            if spec.causal { " causal" } else { "" }
        ),
        first_ms,
        gflops: call.flops() / (median_ms * 1e-3) / 1e9,
        median_ms,
        chart_svg: chart(&times_ms).map_err(js_error)?,
        times_ms,
        outputs: (verdict.outputs.iter())
            .map(|o| JudgedOutput {
                name: o.name,
                max_abs_err: o.err,
                naive_err: o.naive_err,
                bound: o.bound,
            })
            .collect(),
        worst_ratio: verdict.ratio,
        pass: verdict.ratio <= 1.0,
    };
    serde_json::to_string(&result).map_err(js_error)
}

/// The call the demo runs: a conformance case of the harness's.
#[derive(Debug)]
enum Call {
    Attention(Case),
    Linear(LinearCase),
}

impl Call {
    async fn judge(&self, engine: &Engine) -> Result<Verdict, String> {
        match self {
            Call::Attention(case) => run_case_on_async(engine, case).await,
            Call::Linear(case) => run_linear_case_async(engine, case).await,
        }
    }

    /// FLOPs as the bench counts them: FlashAttention's 4·D per visible (query, key) pair;
    /// the recurrent form's 4·Dk·Dv per token and head for linear attention.
    fn flops(&self) -> f64 {
        match self {
            Call::Attention(case) => {
                let data = case.data();
                let p = wflash_conformance::reference_problem(
                    &case.shape,
                    case.layout,
                    &case.options(&data),
                );
                4.0 * case.shape.head_dim as f64 * p.visible_pairs_total() as f64
            }
            Call::Linear(c) => 4.0 * (c.key_dim * c.value_dim * c.batch * c.q_heads * c.len) as f64,
        }
    }

    /// Milliseconds of each of `runs` calls on inputs already on the GPU: dispatch, then the
    /// readback of the output (the only way a browser sees the work finish).
    async fn time<T: Element>(&self, engine: &Engine, runs: usize) -> wflash::Result<Vec<f64>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut upload = |n: usize| engine.upload(&random::<T>(&mut rng, n, 1.0).0);
        let mut times = Vec::with_capacity(runs);
        match self {
            Call::Attention(case) => {
                let data = case.data();
                let opts = case.options(&data);
                let s = &case.shape;
                let q = upload(s.q_elems())?;
                let k = upload(s.k_elems())?;
                let v = upload(s.v_elems())?;
                for _ in 0..runs {
                    let start = web_time::Instant::now();
                    let out = engine.attention_gpu(s, case.layout, &opts, &q, &k, &v)?;
                    engine.read::<T>(&out.output).await?;
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            Call::Linear(case) => {
                let decay = case.decays();
                let opts = case.options(decay.as_deref());
                let (s, p) = (case.shape(), case.problem(decay.as_deref()));
                let q = upload(p.q_elems())?;
                let k = upload(p.k_elems())?;
                let v = upload(p.v_elems())?;
                for _ in 0..runs {
                    let start = web_time::Instant::now();
                    let out =
                        engine.linear_attention_gpu(&s, case.layout, &opts, &q, &k, &v, None)?;
                    engine.read::<T>(&out.output).await?;
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        Ok(times)
    }
}

/// The runs' times as a small SVG line chart.
fn chart(times_ms: &[f64]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (480, 220)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let top = times_ms.iter().copied().fold(0.0, f64::max) * 1.15 + 1e-3;
        let mut chart = ChartBuilder::on(&root)
            .caption("time per call (ms)", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(28)
            .y_label_area_size(48)
            .build_cartesian_2d(0.5..times_ms.len() as f64 + 0.5, 0.0..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("run")
            .x_labels(times_ms.len() + 1)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .disable_x_mesh()
            .draw()
            .map_err(|e| e.to_string())?;
        let points = times_ms
            .iter()
            .enumerate()
            .map(|(i, &t)| ((i + 1) as f64, t));
        chart
            .draw_series(LineSeries::new(points.clone(), &BLUE))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(points.map(|p| Circle::new(p, 3, BLUE.filled())))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

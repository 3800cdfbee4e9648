//! `cargo xtask bench`: times wflash's fused attention against a naive materialised GPU attention
//! and the CPU reference, in one run on one adapter, and reports ms, GFLOP/s and % of the
//! adapter's measured FMA peak (see DESIGN.md, "Benchmark contract").
//!
//! GPU work is timed with GPU timestamp queries where the adapter has them, else wall clock
//! around submit + wait (see `timing`); every record says which in `"timing"`
//! (`"gpu-timestamp"` or `"wall-clock"`) and carries its wall-clock figures too. Warm-up runs
//! first, then the median and minimum of `--samples` runs. Inputs are seeded random normals.

mod chart;
mod decode;
mod naive;
mod timing;
mod tune;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use wflash::{
    AttentionOptions, Causal, DType, Element, Engine, EngineOptions, F16Path, Layout,
    LinearOptions, Modifier, Shape, Tensor, Window, wgpu,
};
use wflash_conformance::{ModData, Mods};
use wflash_ref::Problem;

use naive::{Naive, NaiveShape, Peak, PeakProbe};
use timing::{GpuTimer, Sample, Timing, TimingSource, time_submission};

#[derive(Parser, Debug)]
#[command(name = "wflash-bench", about = "Benchmarks wflash's attention kernels")]
struct Args {
    /// CI smoke run: fewer cases and samples (well under 3 minutes on lavapipe).
    #[arg(long)]
    quick: bool,
    /// Write the run as JSON to this file (device info, probes and records), and its chart
    /// beside it (the same path with `.svg`) unless `--chart` says where.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Write the SVG chart (GFLOP/s against sequence length, one line per variant) here.
    #[arg(long, value_name = "PATH")]
    chart: Option<PathBuf>,
    /// Time with wall clock even where the adapter has GPU timestamps.
    #[arg(long)]
    wall_clock: bool,
    /// Run only the cases whose name contains one of these comma-separated substrings, or
    /// equals one ending in `$`.
    #[arg(long, value_name = "SUBSTR,...")]
    filter: Option<String>,
    /// Print the adapter in use and exit.
    #[arg(long)]
    adapter: bool,
    /// Timed runs per measurement (default 7, or 3 with --quick).
    #[arg(long, value_name = "N")]
    samples: Option<usize>,
    /// Compare with the records of an earlier `--json` file (either format: a bare array of
    /// records, or the current object); flags cases more than 10% slower.
    #[arg(long, value_name = "PATH")]
    baseline: Option<PathBuf>,
    /// How f16 tensors travel: `auto` (native where the adapter has SHADER_F16), `packed` (u32
    /// words, as on adapters without it) or `native` (fail where unsupported).
    #[arg(long, value_name = "PATH", default_value = "auto")]
    f16_path: F16PathArg,
    /// Tokens per chunk of the chunked linear-attention kernel (default: the adapter's).
    #[arg(long, value_name = "N")]
    linear_chunk: Option<usize>,
    /// Time every tile the forward kernel can run at head dims 32, 64 and 128 and store the
    /// fastest in the tuning file, which engines on this adapter and driver then load.
    #[arg(long)]
    tune: bool,
    /// The tuning file `--tune` writes (default: `$WFLASH_TUNING`, else
    /// `~/.config/wflash/tuning.json`).
    #[arg(long, value_name = "PATH")]
    tune_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum F16PathArg {
    Auto,
    Packed,
    Native,
}

/// One measurement: the JSON record of DESIGN.md's benchmark contract.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    name: String,
    #[serde(rename = "impl")]
    implementation: String,
    variant: String,
    dtype: String,
    layout: String,
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    q_len: usize,
    kv_len: usize,
    head_dim: usize,
    value_dim: usize,
    causal: bool,
    /// Median and minimum of the source `timing` names.
    median_ms: f64,
    min_ms: f64,
    samples: usize,
    gflops: f64,
    pct_of_peak: Option<f64>,
    /// The FMA probe's GFLOP/s that `pct_of_peak` divides by: the probe run interleaved with the
    /// samples of the record's group (absent in older files, which divided by one probe per run).
    #[serde(default)]
    peak_gflops: Option<f64>,
    /// `"gpu-timestamp"` or `"wall-clock"` (files written before timestamps say `"wall"`).
    timing: String,
    /// Wall clock around submit + wait, whatever `timing` is (absent in older files).
    #[serde(default)]
    wall_median_ms: Option<f64>,
    #[serde(default)]
    wall_min_ms: Option<f64>,
    adapter: String,
    backend: String,
    /// Decode cases: bytes of K and V read per second (10⁹), its percentage of the copy probe,
    /// and the split count of the call (absent elsewhere and in older files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kv_gbps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pct_of_copy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    splits: Option<u32>,
}

/// What `--json` writes: the adapter, its probes, and the records.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    device: DeviceReport,
    records: Vec<Record>,
}

#[derive(Debug, Serialize, Deserialize)]
struct DeviceReport {
    adapter: String,
    backend: String,
    driver: String,
    /// Where the GPU records' figures come from: `"gpu-timestamp"` or `"wall-clock"`.
    timing: String,
    /// `Queue::get_timestamp_period`, where timestamps are used.
    timestamp_period_ns: Option<f64>,
    fma_peak_gflops: Option<f64>,
    /// Copy bandwidth, counting the bytes read and the bytes written (`copy_buffer_to_buffer`).
    copy_gbps: Option<f64>,
    copy_bytes: Option<u64>,
    /// The shader read probe (shaders/read_peak.wgsl): bytes a compute pass reads per second.
    #[serde(default)]
    read_gbps: Option<f64>,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    dtype: DType,
    seq: usize,
    head_dim: usize,
    causal: bool,
    sigmoid: bool,
    /// Linear attention (Lightning Attention-2: identity feature map, Lightning's per-head
    /// decay when causal) instead of softmax/sigmoid.
    linear: bool,
    /// The linear kernel's chunk size (`--linear-chunk`); `None` is the adapter's.
    linear_chunk: Option<usize>,
    /// A trailing window of this many keys ([`Window::trailing`]).
    window: Option<usize>,
    modifier: Option<Modifier>,
    /// The backward pass (all gradients) of the case's attention, from the forward's O and LSE
    /// and a random dO.
    backward: bool,
    /// Grouped-query attention: HEADS / GQA_GROUP kv heads instead of HEADS.
    gqa: bool,
}

/// Query heads per kv head of a `gqa` case.
const GQA_GROUP: usize = 4;

/// How a model uses each modifier ([`Modifier::ALL`]), the bench's one table of them (the
/// conformance harness sets the options from this data):
/// softcap 50 (Gemma 2); ALiBi's standard slopes; a dense f32 bias shared by all heads
/// (`[1, 1, N, N]`, e.g. a relative-position bias); the last quarter of the keys padding; a
/// sink logit per head; a per-query inverse temperature in [0.5, 2); four packed sequences of
/// N/4 (a quarter of the pairs of one of N); a prefix-LM prefix of N/4 (causal after it);
/// chunked local attention in chunks of 1024 keys, causal inside (Llama 4).
fn draw_modifier(modifier: Modifier, shape: &Shape, rng: &mut StdRng, data: &mut ModData) {
    let n = shape.kv_len;
    match modifier {
        Modifier::Softcap => data.softcap = 50.0,
        Modifier::Alibi => data.alibi_slopes = wflash::alibi_slopes(shape.q_heads),
        Modifier::Bias => data.bias_f32 = random_normals(rng, n * n),
        Modifier::KeyMask => {
            data.key_mask = (0..shape.batch * n).map(|j| j % n < n - n / 4).collect();
        }
        Modifier::Sinks => data.sinks = random_normals(rng, shape.q_heads),
        Modifier::Temperature => {
            data.temperature = (0..shape.lse_elems())
                .map(|_| rng.random_range(0.5..2.0))
                .collect();
        }
        Modifier::Varlen => {
            let cu: Vec<u32> = (0..=4).map(|s| (s * n / 4) as u32).collect();
            data.cu_seqlens_q = cu.clone();
            data.cu_seqlens_k = cu;
        }
        Modifier::PrefixLm => data.prefix_len = n / 4,
        Modifier::ChunkedLocal => data.chunk = 1024,
    }
}

const BATCH: usize = 1;
const HEADS: usize = 8;
/// The CPU reference is timed only up to this sequence length (it is O(N²·D) f64 loops);
/// `--quick` times it and the naive GPU baseline only up to QUICK_BASELINE_MAX_SEQ.
const CPU_REF_MAX_SEQ: usize = 1024;
const QUICK_BASELINE_MAX_SEQ: usize = 512;
/// The naive GPU baseline materialises N×N scores: above this length it is run once, no warm-up,
/// and not at all above NAIVE_MAX_SEQ.
const NAIVE_FULL_SAMPLES_MAX_SEQ: usize = 1024;
const NAIVE_MAX_SEQ: usize = 2048;
/// The longest a single timed GPU run may take before the case is reported as failed.
const GPU_TIMEOUT: Duration = Duration::from_secs(120);

impl Case {
    fn name(&self) -> String {
        format!(
            "{}_{}_{}_b{BATCH}_h{HEADS}{}_n{}_d{}{}{}",
            self.variant_name(),
            if self.backward { "bwd" } else { "fwd" },
            self.dtype.name(),
            if self.gqa {
                format!("_kv{}", HEADS / GQA_GROUP)
            } else {
                String::new()
            },
            self.seq,
            self.head_dim,
            if self.causal { "_causal" } else { "" },
            self.window.map_or(String::new(), |w| format!("_window{w}")),
        ) + &self
            .modifier
            .map_or(String::new(), |m| format!("_{}", m.name()))
    }
    fn shape(&self) -> Shape {
        Shape {
            kv_heads: if self.gqa { HEADS / GQA_GROUP } else { HEADS },
            ..Shape::mha(BATCH, HEADS, self.seq, self.head_dim)
        }
    }
    fn variant_name(&self) -> &'static str {
        match (self.linear, self.sigmoid) {
            (true, _) => "linear",
            (false, true) => "sigmoid",
            (false, false) => "softmax",
        }
    }
    /// Useful FLOPs: FlashAttention's 4·D per visible (query, key) pair (its backward 2.5 times
    /// that); for linear attention the recurrent form's 4·Dk·Dv per token and head (state
    /// update and read-out), its backward 8·Dk·Dv.
    fn flops(&self) -> f64 {
        let shape = self.shape();
        if self.linear {
            // The backward's recurrent form: dq (S g), the state gradient's update, dk (D v)
            // and dv (Dᵀ k), 8·Dk·Dv per token and head.
            let per_token = if self.backward { 8.0 } else { 4.0 };
            let per_token = per_token * (shape.head_dim * shape.value_dim) as f64;
            return per_token * (shape.batch * shape.q_heads * shape.q_len) as f64;
        }
        let problem = self.problem(&self.data());
        let forward = 4.0 * shape.head_dim as f64 * problem.visible_pairs_total() as f64;
        if self.backward {
            2.5 * forward
        } else {
            forward
        }
    }
    /// Cases of one group are timed with interleaved samples: attention cases by length (the
    /// ratios #3 states compare cases of one length), linear cases all together (its scaling
    /// over N is the ratio #4 states).
    fn group(&self) -> usize {
        if self.linear { usize::MAX } else { self.seq }
    }
    /// The decays of a linear case.
    fn decay(&self) -> Option<Vec<f32>> {
        (self.linear && self.causal).then(|| wflash::lightning_decay(HEADS))
    }
    fn linear_options<'a>(&self, decay: Option<&'a [f32]>) -> LinearOptions<'a> {
        LinearOptions {
            causal: self.causal,
            decay,
            chunk_size: self.linear_chunk,
            ..LinearOptions::default()
        }
    }
    fn linear_problem(&self) -> wflash_ref::linear::LinearProblem {
        let shape = self.shape();
        wflash_ref::linear::LinearProblem {
            causal: self.causal,
            decay: self
                .decay()
                .map(|d| d.iter().map(|&x| f64::from(x)).collect()),
            ..wflash_ref::linear::LinearProblem::new(
                shape.batch,
                shape.q_heads,
                shape.kv_heads,
                shape.q_len,
                shape.head_dim,
                shape.value_dim,
                wflash_ref::Layout::Bhsd,
            )
        }
    }
    /// The modifier's data for this case's shape.
    fn data(&self) -> ModData {
        let shape = self.shape();
        let mut rng = StdRng::seed_from_u64(self.seed() ^ 0x6d6f_6473);
        let mut data = ModData::default();
        if let Some(modifier) = self.modifier {
            draw_modifier(modifier, &shape, &mut rng, &mut data);
        }
        data
    }
    fn options<'a>(&self, data: &'a ModData) -> AttentionOptions<'a> {
        let mut opts = if self.sigmoid {
            AttentionOptions::sigmoid()
        } else {
            AttentionOptions::softmax()
        };
        if let Some(size) = self.window {
            opts = opts.with_window(Window::trailing(size));
        }
        if self.causal {
            opts = opts.with_causal(Causal::BottomRight);
        }
        // The harness sets each option from its data (a bias of the bench's form is f32 and
        // broadcast over batch and heads: the default form).
        let mods = Mods {
            on: self.modifier.into_iter().collect(),
            bias_form: Default::default(),
        };
        mods.apply(&self.shape(), data, &mut opts);
        opts
    }
    fn problem(&self, data: &ModData) -> Problem {
        wflash_conformance::reference_problem(&self.shape(), Layout::Bhsd, &self.options(data))
    }
    /// Seeded random normal Q, K and V.
    fn inputs(&self) -> [Vec<f32>; 3] {
        let shape = self.shape();
        let mut rng = StdRng::seed_from_u64(self.seed());
        [shape.q_elems(), shape.k_elems(), shape.v_elems()].map(|n| random_normals(&mut rng, n))
    }
    /// Seeded random normal dO of a backward case.
    fn d_o(&self) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(self.seed() ^ 0xd0);
        random_normals(&mut rng, self.shape().o_elems())
    }
    fn seed(&self) -> u64 {
        let dtype = match self.dtype {
            DType::F32 => 1,
            DType::F16 => 2,
            DType::Bf16 => 3,
        };
        0x5eed_0000 ^ ((self.seq as u64) << 4) ^ (dtype << 1) ^ u64::from(self.causal)
    }
    /// Whether the engine accepts the case's options (some modifiers do not go with sigmoid,
    /// or need a causal mask).
    fn accepted(&self) -> bool {
        let data = self.data();
        self.options(&data)
            .validate_modifiers(&self.shape())
            .is_ok()
    }
    /// Whether the naive three-dispatch baseline computes this case (plain softmax forward
    /// only).
    fn naive_applies(&self) -> bool {
        !self.linear
            && !self.sigmoid
            && !self.backward
            && !self.gqa
            && self.window.is_none()
            && self.modifier.is_none()
    }
}

fn cases(quick: bool) -> Vec<Case> {
    let case = |dtype, seq, head_dim, causal| Case {
        dtype,
        seq,
        head_dim,
        causal,
        sigmoid: false,
        linear: false,
        linear_chunk: None,
        window: None,
        modifier: None,
        backward: false,
        gqa: false,
    };
    let modified = |modifier, sigmoid| Case {
        modifier: Some(modifier),
        sigmoid,
        ..case(DType::F32, 2048, 64, false)
    };
    let sigmoid = |seq, causal| Case {
        sigmoid: true,
        ..case(DType::F32, seq, 64, causal)
    };
    let linear = |seq, causal| Case {
        linear: true,
        ..case(DType::F32, seq, 64, causal)
    };
    let backward = |case: Case| Case {
        backward: true,
        ..case
    };
    if quick {
        return vec![
            case(DType::F32, 512, 64, false),
            sigmoid(512, false),
            case(DType::F32, 1024, 64, false),
            case(DType::F32, 1024, 64, true),
            case(DType::F16, 1024, 64, false),
            case(DType::Bf16, 1024, 64, false),
            Case {
                seq: 512,
                ..modified(Modifier::Bias, false)
            },
            linear(1024, true),
            backward(case(DType::F32, 512, 64, false)),
        ];
    }
    let mut cases: Vec<Case> = [512, 1024, 2048, 4096]
        .into_iter()
        .flat_map(|n| {
            [
                case(DType::F32, n, 64, false),
                case(DType::F32, n, 64, true),
            ]
        })
        .collect();
    // Local attention against full attention at a length where the window is 1/32 of it.
    cases.push(case(DType::F32, 8192, 64, false));
    cases.push(Case {
        window: Some(256),
        ..case(DType::F32, 8192, 64, false)
    });
    cases.push(sigmoid(2048, false));
    cases.push(sigmoid(2048, true));
    cases.push(case(DType::F32, 2048, 128, false));
    cases.push(case(DType::F16, 2048, 64, false));
    cases.push(case(DType::Bf16, 2048, 64, false));
    // Linear attention over N (its time should grow linearly), causal and not.
    for n in [1024, 4096, 8192, 16384] {
        cases.push(linear(n, true));
    }
    cases.push(linear(4096, false));
    // Causal softmax at 8192 too, to compare with linear attention there.
    cases.push(case(DType::F32, 8192, 64, true));
    // The linear backward over N beside its forward (#20), and causal softmax's forward and
    // backward at 16384 to compare training steps with.
    cases.push(linear(65536, true));
    for n in [4096, 16384, 65536] {
        cases.push(backward(linear(n, true)));
    }
    cases.push(case(DType::F32, 16384, 64, true));
    cases.push(backward(case(DType::F32, 16384, 64, true)));
    // Each modifier at N=2048, to compare with plain softmax (and sigmoid) there; causal where
    // the modifier needs it or models use it so (prefix-LM, chunked local attention).
    for modifier in Modifier::ALL {
        for sigmoid in [false, true] {
            let mut case = modified(modifier, sigmoid);
            if !case.accepted() {
                case.causal = true;
            }
            if modifier == Modifier::ChunkedLocal {
                case.causal = true;
            }
            if case.accepted() {
                cases.push(case);
            }
        }
    }
    // The backward beside the forward at N=2048 (#19): softmax and sigmoid, causal, GQA, D=64
    // and 128, f32 and f16.
    for c in [
        case(DType::F32, 2048, 64, false),
        case(DType::F32, 2048, 64, true),
        sigmoid(2048, false),
        sigmoid(2048, true),
        Case {
            gqa: true,
            ..case(DType::F32, 2048, 64, false)
        },
        case(DType::F32, 2048, 128, false),
        case(DType::F16, 2048, 64, false),
    ] {
        cases.push(backward(c));
    }
    // Chunked local attention (chunks of 1024) against full causal attention at 8192.
    cases.push(Case {
        causal: true,
        ..modified(Modifier::ChunkedLocal, false)
    });
    cases.last_mut().expect("just pushed").seq = 8192;
    cases
}

/// Whether a case name matches `--filter`: contains one of its comma-separated parts, or
/// equals one written with a trailing `$`.
fn matches_filter(name: &str, filter: &str) -> bool {
    filter.split(',').any(|part| match part.strip_suffix('$') {
        Some(exact) => name == exact,
        None => name.contains(part),
    })
}

/// Waits (up to `GPU_TIMEOUT`) until everything submitted so far has finished.
fn wait(device: &wgpu::Device) -> Result<(), String> {
    device
        .poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: Some(GPU_TIMEOUT),
        })
        .map(|_| ())
        .map_err(|e| format!("waiting for the GPU: {e}"))
}

fn random_normals(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// One case's timing and (f32 only) its output, or why it failed.
type Timed = Result<(Timing, Option<Vec<f32>>), String>;

/// A case ready to time: its tensors uploaded and its pipelines compiled.
struct Prepared {
    case: Case,
    data: ModData,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// A backward case's O and LSE (from the forward on the GPU) and dO.
    backward: Option<BackwardInputs>,
}

struct BackwardInputs {
    /// The forward's output (attention; the linear backward recomputes what it needs).
    o: Option<Tensor>,
    lse: Option<Tensor>,
    d_o: Tensor,
}

impl Prepared {
    fn new<T: Element>(engine: &Engine, case: &Case, inputs: [&[f32]; 3]) -> Result<Self, String> {
        // The kernel key does not depend on sequence length: a small problem compiles the
        // pipelines, so compile time stays out of the warm-ups' first run too.
        let small_case = Case { seq: 64, ..*case };
        let small_shape = small_case.shape();
        let small_inputs = [
            &inputs[0][..small_shape.q_elems()],
            &inputs[1][..small_shape.k_elems()],
            &inputs[2][..small_shape.v_elems()],
        ];
        Self::upload::<T>(engine, &small_case, small_inputs)?.run(engine)?;
        Self::upload::<T>(engine, case, inputs)
    }

    fn upload<T: Element>(
        engine: &Engine,
        case: &Case,
        inputs: [&[f32]; 3],
    ) -> Result<Self, String> {
        let convert = |x: &[f32]| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
        let upload = |x: &[f32]| engine.upload(&convert(x)).map_err(|e| e.to_string());
        let mut prepared = Prepared {
            case: *case,
            data: case.data(),
            q: upload(inputs[0])?,
            k: upload(inputs[1])?,
            v: upload(inputs[2])?,
            backward: None,
        };
        if case.backward && case.linear {
            // The linear backward recomputes what it needs of the forward itself.
            let d_o = case.d_o();
            prepared.backward = Some(BackwardInputs {
                o: None,
                lse: None,
                d_o: upload(&d_o[..case.shape().o_elems()])?,
            });
        } else if case.backward {
            let forward = Case {
                backward: false,
                ..*case
            };
            let fwd = engine
                .attention_gpu(
                    &case.shape(),
                    Layout::Bhsd,
                    &forward.options(&prepared.data),
                    &prepared.q,
                    &prepared.k,
                    &prepared.v,
                )
                .map_err(|e| e.to_string())?;
            let d_o = case.d_o();
            prepared.backward = Some(BackwardInputs {
                o: Some(fwd.output),
                lse: fwd.lse,
                d_o: upload(&d_o[..case.shape().o_elems()])?,
            });
        }
        Ok(prepared)
    }

    /// One pass, waited for.
    fn run(&self, engine: &Engine) -> Result<Tensor, String> {
        let output = self.submit(engine)?;
        wait(engine.device())?;
        Ok(output)
    }

    /// One pass (forward, or backward: its dQ is the output), submitted and not waited for.
    fn submit(&self, engine: &Engine) -> Result<Tensor, String> {
        let shape = self.case.shape();
        let (q, k, v) = (&self.q, &self.k, &self.v);
        if self.case.linear {
            let decay = self.case.decay();
            let opts = self.case.linear_options(decay.as_deref());
            match &self.backward {
                Some(b) => engine
                    .linear_attention_backward_gpu(
                        &shape,
                        Layout::Bhsd,
                        &opts,
                        q,
                        k,
                        v,
                        None,
                        &b.d_o,
                        None,
                    )
                    .map(|grads| grads.dq),
                None => engine
                    .linear_attention_gpu(&shape, Layout::Bhsd, &opts, q, k, v, None)
                    .map(|out| out.output),
            }
        } else if let Some(b) = &self.backward {
            let opts = self.case.options(&self.data);
            let o =
                b.o.as_ref()
                    .ok_or("an attention backward case without its forward")?;
            engine
                .attention_backward_gpu(
                    &shape,
                    Layout::Bhsd,
                    &opts,
                    q,
                    k,
                    v,
                    o,
                    b.lse.as_ref(),
                    &b.d_o,
                )
                .map(|grads| grads.dq)
        } else {
            let opts = self.case.options(&self.data);
            engine
                .attention_gpu(&shape, Layout::Bhsd, &opts, q, k, v)
                .map(|out| out.output)
        }
        .map_err(|e| e.to_string())
    }
}

/// Times the cases of one group with their samples interleaved: sample `i` of every case runs
/// before sample `i + 1` of any, so a drift of the host's clock or load (this machine's FMA probe
/// moves 55-117 GFLOP/s between runs) falls on every case of the group alike and their ratios
/// stay meaningful. The FMA probe (where there is one) takes one run per timed round too, so each
/// case's % of peak divides by the peak measured alongside it. Returns each case's timing and
/// (f32 only) its output, in order, and the group's peak.
fn time_fused_group(
    engine: &Engine,
    timer: Option<&GpuTimer>,
    progress: &ProgressBar,
    prepared: &[Prepared],
    probe: Option<&PeakProbe>,
    warmups: usize,
    samples: usize,
) -> (Vec<Timed>, Option<Result<Peak, String>>) {
    let mut times: Vec<Result<Vec<Sample>, String>> =
        prepared.iter().map(|_| Ok(Vec::new())).collect();
    let mut last: Vec<Option<Tensor>> = prepared.iter().map(|_| None).collect();
    let mut probe_runs: Result<Vec<Sample>, String> = Ok(Vec::new());
    for round in 0..warmups + samples.max(1) {
        if let (Some(probe), Ok(runs)) = (probe, &mut probe_runs)
            && round >= warmups
        {
            progress.set_message("fma peak probe");
            match probe.sample(engine, timer) {
                Ok(sample) => runs.push(sample),
                Err(err) => probe_runs = Err(err),
            }
        }
        for (i, p) in prepared.iter().enumerate() {
            let Ok(case_times) = &mut times[i] else {
                continue;
            };
            progress.set_message(p.case.name());
            match time_submission(engine, timer, || p.submit(engine)) {
                Ok((out, sample)) => {
                    if round >= warmups {
                        case_times.push(sample);
                    }
                    last[i] = Some(out);
                }
                Err(err) => times[i] = Err(err),
            }
            progress.inc(1);
        }
    }
    let peak = probe.map(|probe| probe_runs.map(|runs| probe.peak(&runs)));
    let timed = times
        .into_iter()
        .zip(prepared.iter().zip(last))
        .map(|(t, (p, out))| {
            let timing = Timing::of(&t?);
            let output = match (p.case.dtype, out) {
                (DType::F32, Some(out)) => Some(
                    engine
                        .read_blocking::<f32>(&out)
                        .map_err(|e| e.to_string())?,
                ),
                _ => None,
            };
            Ok((timing, output))
        })
        .collect();
    (timed, peak)
}

/// Times the naive three-dispatch attention (f32) with `(warm-ups, samples)` runs. Returns the
/// timing and its output.
fn time_naive(
    engine: &Engine,
    timer: Option<&GpuTimer>,
    progress: &ProgressBar,
    naive: &Naive,
    case: &Case,
    inputs: [&[f32]; 3],
    (warmups, samples): (usize, usize),
) -> Result<(Timing, Vec<f32>), String> {
    let shape = case.shape();
    let naive_shape = NaiveShape {
        batch: shape.batch,
        heads: shape.q_heads,
        q_len: shape.q_len,
        kv_len: shape.kv_len,
        head_dim: shape.head_dim,
        value_dim: shape.value_dim,
        causal: case.causal,
    };
    Naive::check_limits(engine.device(), &naive_shape)?;
    let [q, k, v] = inputs.map(|x| engine.upload(x).map_err(|e| e.to_string()));
    let (q, k, v) = (q?, k?, v?);
    let scale = case
        .options(&ModData::default())
        .resolved_scale(&shape)
        .map_err(|e| e.to_string())?;
    let (device, queue) = (engine.device(), engine.queue());
    let run = naive.prepare(
        device,
        &naive_shape,
        scale,
        q.buffer(),
        k.buffer(),
        v.buffer(),
    )?;
    let mut runs = Vec::with_capacity(samples);
    for round in 0..warmups + samples.max(1) {
        let (_, sample) = time_submission(engine, timer, || {
            naive.submit(device, queue, &run);
            Ok(())
        })?;
        if round >= warmups {
            runs.push(sample);
        }
        progress.inc(1);
    }
    let output = naive::read_f32(device, queue, run.output())?;
    Ok((Timing::of(&runs), output))
}

fn max_abs_diff(a: &[f32], b: impl IntoIterator<Item = f64>) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, y)| (f64::from(x) - y).abs())
        .fold(0.0, f64::max)
}

struct Context<'a> {
    engine: &'a Engine,
    peak_gflops: Option<f64>,
}

impl Context<'_> {
    fn record(
        &self,
        case: &Case,
        implementation: &str,
        dtype: &str,
        flops: f64,
        timing: Timing,
    ) -> Record {
        let shape = case.shape();
        let info = self.engine.info();
        let stats = timing.stats;
        let gflops = flops / stats.median / 1e9;
        let on_gpu = implementation != "cpu-ref";
        Record {
            name: case.name(),
            implementation: implementation.into(),
            variant: case.variant_name().into(),
            dtype: dtype.into(),
            layout: "bhsd".into(),
            batch: shape.batch,
            q_heads: shape.q_heads,
            kv_heads: shape.kv_heads,
            q_len: shape.q_len,
            kv_len: shape.kv_len,
            head_dim: shape.head_dim,
            value_dim: shape.value_dim,
            causal: case.causal,
            median_ms: stats.median * 1e3,
            min_ms: stats.min * 1e3,
            samples: stats.samples,
            gflops,
            pct_of_peak: self
                .peak_gflops
                .filter(|_| on_gpu)
                .map(|peak| gflops / peak * 100.0),
            peak_gflops: self.peak_gflops.filter(|_| on_gpu),
            timing: timing.source.name().into(),
            wall_median_ms: Some(timing.wall.median * 1e3),
            wall_min_ms: Some(timing.wall.min * 1e3),
            adapter: if on_gpu {
                info.adapter_name.clone()
            } else {
                "host cpu".into()
            },
            backend: if on_gpu {
                format!("{:?}", info.backend)
            } else {
                "cpu".into()
            },
            kv_gbps: None,
            pct_of_copy: None,
            splits: None,
        }
    }
}

/// The table of records. `clock` is where median and min come from (`gpu`: timestamps, `wall`:
/// wall clock); `wall ms` is the wall-clock median beside them.
fn print_table(records: &[Record]) {
    println!();
    println!(
        "{:<40} {:<10} {:<5} {:>6} {:>6} {:>5} {:>11} {:>11} {:>11} {:>9} {:>7}",
        "name",
        "impl",
        "dtype",
        "N",
        "causal",
        "clock",
        "median ms",
        "min ms",
        "wall ms",
        "GFLOP/s",
        "% peak"
    );
    for r in records {
        let pct = r
            .pct_of_peak
            .map_or_else(|| "-".to_string(), |p| format!("{p:.1}"));
        let clock = if r.timing == TimingSource::GpuTimestamp.name() {
            "gpu"
        } else {
            "wall"
        };
        let wall = r
            .wall_median_ms
            .map_or_else(|| "-".to_string(), |ms| format!("{ms:.3}"));
        println!(
            "{:<40} {:<10} {:<5} {:>6} {:>6} {:>5} {:>11.3} {:>11.3} {:>11} {:>9.2} {:>7}",
            r.name,
            r.implementation,
            r.dtype,
            r.q_len,
            if r.causal { "yes" } else { "no" },
            clock,
            r.median_ms,
            r.min_ms,
            wall,
            r.gflops,
            pct
        );
    }
}

fn print_ratios(records: &[Record]) {
    println!();
    println!("fused vs naive-gpu (median time ratio fused/naive; < 1 means fused is faster):");
    let mut any = false;
    for fused in records.iter().filter(|r| r.implementation == "fused") {
        if let Some(naive) = records
            .iter()
            .find(|r| r.implementation == "naive-gpu" && r.name == fused.name)
        {
            let ratio = fused.median_ms / naive.median_ms;
            println!(
                "  {:<40} {ratio:>7.3}  (fused {:.2}x faster)",
                fused.name,
                1.0 / ratio
            );
            any = true;
        }
    }
    if !any {
        println!("  (no case has both)");
    }
}

/// A time ratio an issue states, checked on this run's records: `first`'s time over `second`'s
/// (each the sum of its cases: a training step is a forward and a backward).
struct Comparison {
    what: &'static str,
    first: Vec<Case>,
    second: Vec<Case>,
    needs: Needs,
}

#[derive(Clone, Copy)]
enum Needs {
    AtLeast(f64),
    AtMost(f64),
}

fn comparisons() -> Vec<Comparison> {
    let plain = |seq, causal| Case {
        dtype: DType::F32,
        seq,
        head_dim: 64,
        causal,
        sigmoid: false,
        linear: false,
        linear_chunk: None,
        window: None,
        modifier: None,
        backward: false,
        gqa: false,
    };
    let linear = |seq| Case {
        linear: true,
        ..plain(seq, true)
    };
    let backward = |case: Case| Case {
        backward: true,
        ..case
    };
    vec![
        Comparison {
            what: "softmax / sigmoid, N=2048 (#3)",
            first: vec![plain(2048, false)],
            second: vec![Case {
                sigmoid: true,
                ..plain(2048, false)
            }],
            needs: Needs::AtLeast(1.0),
        },
        Comparison {
            what: "non-causal / causal softmax, N=4096 (#3)",
            first: vec![plain(4096, false)],
            second: vec![plain(4096, true)],
            needs: Needs::AtLeast(1.6),
        },
        Comparison {
            what: "full / window 256, N=8192 (#3)",
            first: vec![plain(8192, false)],
            second: vec![Case {
                window: Some(256),
                ..plain(8192, false)
            }],
            needs: Needs::AtLeast(8.0),
        },
        Comparison {
            what: "causal / chunked local 1024 (causal), N=8192 (#15)",
            first: vec![plain(8192, true)],
            second: vec![Case {
                modifier: Some(Modifier::ChunkedLocal),
                ..plain(8192, true)
            }],
            needs: Needs::AtLeast(5.0),
        },
        Comparison {
            what: "softmax backward / forward, N=2048 (#19)",
            first: vec![Case {
                backward: true,
                ..plain(2048, false)
            }],
            second: vec![plain(2048, false)],
            needs: Needs::AtMost(4.0),
        },
        Comparison {
            what: "softmax / sigmoid backward, N=2048 (#19)",
            first: vec![Case {
                backward: true,
                ..plain(2048, false)
            }],
            second: vec![Case {
                backward: true,
                sigmoid: true,
                ..plain(2048, false)
            }],
            needs: Needs::AtLeast(1.0),
        },
        Comparison {
            what: "non-causal / causal softmax backward, N=2048 (#19)",
            first: vec![Case {
                backward: true,
                ..plain(2048, false)
            }],
            second: vec![Case {
                backward: true,
                ..plain(2048, true)
            }],
            needs: Needs::AtLeast(1.6),
        },
        Comparison {
            what: "causal linear N=16384 / N=4096 (#4)",
            first: vec![linear(16384)],
            second: vec![linear(4096)],
            needs: Needs::AtMost(4.5),
        },
        Comparison {
            what: "causal softmax / causal linear, N=4096 (#4)",
            first: vec![plain(4096, true)],
            second: vec![linear(4096)],
            needs: Needs::AtLeast(1.0),
        },
        Comparison {
            what: "causal linear backward N=65536 / N=16384 (#20)",
            first: vec![backward(linear(65536))],
            second: vec![backward(linear(16384))],
            needs: Needs::AtMost(4.5),
        },
        Comparison {
            what: "causal linear backward / forward, N=16384 (#20)",
            first: vec![backward(linear(16384))],
            second: vec![linear(16384)],
            needs: Needs::AtMost(3.0),
        },
        Comparison {
            what: "causal softmax / linear fwd+bwd, N=16384 (#20)",
            first: vec![plain(16384, true), backward(plain(16384, true))],
            second: vec![linear(16384), backward(linear(16384))],
            needs: Needs::AtLeast(5.0),
        },
        Comparison {
            what: "causal softmax / causal linear, N=8192 (#4)",
            first: vec![plain(8192, true)],
            second: vec![linear(8192)],
            needs: Needs::AtLeast(1.0),
        },
    ]
}

/// Prints each stated time ratio that this run measured both sides of: the ratio of medians
/// and of minima (samples of one group were interleaved, see `time_fused_group`).
fn print_comparisons(records: &[Record]) {
    let fused = |case: &Case| {
        let name = case.name();
        records
            .iter()
            .find(|r| r.implementation == "fused" && r.name == name)
    };
    println!();
    println!("stated ratios (time of the first / time of the second, same run):");
    let mut any = false;
    for c in comparisons() {
        // (median, min) of a side: the sums over its cases, if every one of them ran.
        let side = |cases: &[Case]| {
            cases.iter().try_fold((0.0, 0.0), |(median, min), case| {
                fused(case).map(|r| (median + r.median_ms, min + r.min_ms))
            })
        };
        let (Some(first), Some(second)) = (side(&c.first), side(&c.second)) else {
            continue;
        };
        any = true;
        let median = first.0 / second.0;
        let min = first.1 / second.1;
        let (relation, bound, met) = match c.needs {
            Needs::AtLeast(x) => (">=", x, median >= x),
            Needs::AtMost(x) => ("<=", x, median <= x),
        };
        println!(
            "  {:<46} {median:>6.2}x median, {min:>6.2}x min  (needs {relation} {bound}: {})",
            c.what,
            if met { "met" } else { "NOT MET" }
        );
    }
    if !any {
        println!("  (no case pair of them ran)");
    }
}

/// The records of a `--json` file: the current object, or the bare array of records that runs
/// wrote before it (docs/results/ holds such files).
fn load_records(path: &Path) -> Result<Vec<Record>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let parse_error = |e: serde_json::Error| format!("parsing {}: {e}", path.display());
    let value: serde_json::Value = serde_json::from_str(&text).map_err(parse_error)?;
    if value.is_array() {
        serde_json::from_value(value).map_err(parse_error)
    } else {
        serde_json::from_value::<Report>(value)
            .map(|report| report.records)
            .map_err(parse_error)
    }
}

/// The medians in ms of `new` and `old` by one clock: their own where both were timed alike,
/// else wall clock for both (records carry it whatever their source; older files are all wall
/// clock). `None` where one of them has no wall-clock figure.
fn comparable_medians_ms(new: &Record, old: &Record) -> Option<(f64, f64)> {
    let wall_median_ms = |r: &Record| {
        if r.timing == "wall" || r.timing == TimingSource::WallClock.name() {
            Some(r.median_ms)
        } else {
            r.wall_median_ms
        }
    };
    if new.timing == old.timing {
        Some((new.median_ms, old.median_ms))
    } else {
        wall_median_ms(new).zip(wall_median_ms(old))
    }
}

/// Prints new/old median ratios against a baseline file; returns the number of regressions.
fn compare_baseline(records: &[Record], path: &Path) -> Result<usize, String> {
    let old = load_records(path)?;
    println!();
    println!(
        "against baseline {} (median ratio new/old; > 1.10 is a regression; `wall`: timed by \
         different clocks, so both by wall clock):",
        path.display()
    );
    let mut regressions = 0;
    for r in records {
        let Some(o) = old
            .iter()
            .find(|o| o.name == r.name && o.implementation == r.implementation)
        else {
            println!(
                "  {:<40} {:<10} (not in baseline)",
                r.name, r.implementation
            );
            continue;
        };
        let Some((new_ms, old_ms)) = comparable_medians_ms(r, o) else {
            println!(
                "  {:<40} {:<10} (timed by {}, baseline by {}: not comparable)",
                r.name, r.implementation, r.timing, o.timing
            );
            continue;
        };
        let clock = if r.timing == o.timing { "" } else { ", wall" };
        // The peak probe sizes its dispatch per run: compare its throughput (by the clock
        // chosen), not its time.
        let ratio = if r.implementation == "probe" {
            (o.gflops * o.median_ms / old_ms) / (r.gflops * r.median_ms / new_ms)
        } else {
            new_ms / old_ms
        };
        let flag = if ratio > 1.10 {
            regressions += 1;
            "  REGRESSION"
        } else {
            ""
        };
        println!(
            "  {:<40} {:<10} {ratio:>7.3}  ({old_ms:.3} ms -> {new_ms:.3} ms{clock}){flag}",
            r.name, r.implementation
        );
    }
    if regressions > 0 {
        println!("  {regressions} regression(s) (> 10% slower)");
    }
    Ok(regressions)
}

/// How many runs each measurement makes in this bench run.
#[derive(Clone, Copy, Debug)]
struct RunCounts {
    warmups: usize,
    samples: usize,
    naive_samples: usize,
    /// The longest sequence the naive GPU baseline and the CPU reference are timed at.
    baseline_max_seq: usize,
}

impl RunCounts {
    /// The naive baseline's warm-ups and samples for `case`, or why it is not timed.
    fn naive(&self, case: &Case) -> Result<(usize, usize), String> {
        if case.dtype != DType::F32 || !case.naive_applies() {
            return Err("plain f32 softmax only".into());
        }
        let max_seq = self.baseline_max_seq.min(NAIVE_MAX_SEQ);
        if case.seq > max_seq {
            return Err(format!("N > {max_seq}"));
        }
        Ok(if case.seq > NAIVE_FULL_SAMPLES_MAX_SEQ {
            (0, 1)
        } else {
            (self.warmups, self.naive_samples)
        })
    }

    /// Whether the CPU reference is timed for `case`, or why not.
    fn cpu_ref(&self, case: &Case) -> Result<(), String> {
        let max_seq = self.baseline_max_seq.min(CPU_REF_MAX_SEQ);
        if case.dtype != DType::F32 {
            Err("f32 only".into())
        } else if case.seq > max_seq {
            Err(format!("N > {max_seq}: too slow"))
        } else {
            Ok(())
        }
    }

    /// Every run `case` is planned to make, fused, naive and CPU reference: the progress bar's
    /// unit.
    fn planned(&self, case: &Case) -> u64 {
        let fused = self.warmups + self.samples;
        let naive = self.naive(case).map_or(0, |(w, s)| w + s);
        let cpu_ref = usize::from(self.cpu_ref(case).is_ok());
        (fused + naive + cpu_ref) as u64
    }
}

/// A bar over every planned run, on stderr (hidden where stderr is not a terminal). Lines
/// printed while it is drawn go through `ProgressBar::suspend`, so they do not mix with it.
fn progress_bar(runs: u64) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] {pos}/{len} timed runs  {wide_msg}",
    )
    .map_or_else(
        |_| ProgressStyle::default_bar(),
        |s| s.progress_chars("=> "),
    );
    ProgressBar::new(runs).with_style(style)
}

/// The probe's record, so `--baseline` compares it and % of peak has its reference in the file.
fn peak_record(engine: &Engine, peak: &Peak) -> Record {
    let info = engine.info();
    Record {
        name: "fma_peak".into(),
        implementation: "probe".into(),
        variant: "fma".into(),
        dtype: "f32".into(),
        layout: "-".into(),
        batch: 0,
        q_heads: 0,
        kv_heads: 0,
        q_len: 0,
        kv_len: 0,
        head_dim: 0,
        value_dim: 0,
        causal: false,
        median_ms: peak.timing.stats.median * 1e3,
        min_ms: peak.timing.stats.min * 1e3,
        samples: peak.timing.stats.samples,
        gflops: peak.gflops,
        pct_of_peak: Some(100.0),
        peak_gflops: Some(peak.gflops),
        timing: peak.timing.source.name().into(),
        wall_median_ms: Some(peak.timing.wall.median * 1e3),
        wall_min_ms: Some(peak.timing.wall.min * 1e3),
        adapter: info.adapter_name.clone(),
        backend: format!("{:?}", info.backend),
        kv_gbps: None,
        pct_of_copy: None,
        splits: None,
    }
}

/// The record of a timed decode case.
fn decode_record(
    engine: &Engine,
    prepared: &decode::PreparedDecode,
    timing: Timing,
    peak_gflops: Option<f64>,
    copy_gbps: Option<f64>,
) -> Record {
    let info = engine.info();
    let case = &prepared.case;
    let stats = timing.stats;
    let gflops = case.flops() / stats.median / 1e9;
    let kv_gbps = case.kv_bytes() / stats.median / 1e9;
    Record {
        name: case.name(),
        implementation: "fused".into(),
        variant: "decode".into(),
        dtype: case.dtype.name().into(),
        layout: "bhsd".into(),
        batch: case.batch,
        q_heads: case.q_heads,
        kv_heads: case.kv_heads,
        q_len: 1,
        kv_len: case.cache_len,
        head_dim: case.head_dim,
        value_dim: case.head_dim,
        causal: true,
        median_ms: stats.median * 1e3,
        min_ms: stats.min * 1e3,
        samples: stats.samples,
        gflops,
        pct_of_peak: peak_gflops.map(|peak| gflops / peak * 100.0),
        peak_gflops,
        timing: timing.source.name().into(),
        wall_median_ms: Some(timing.wall.median * 1e3),
        wall_min_ms: Some(timing.wall.min * 1e3),
        adapter: info.adapter_name.clone(),
        backend: format!("{:?}", info.backend),
        kv_gbps: Some(kv_gbps),
        pct_of_copy: copy_gbps.map(|copy| kv_gbps / copy * 100.0),
        splits: Some(prepared.splits),
    }
}

/// The decode records: GB/s of K/V read against the probes, and #16's stated figures.
fn print_decode(records: &[Record], copy_gbps: Option<f64>, read_gbps: Option<f64>) {
    let decode: Vec<&Record> = records.iter().filter(|r| r.variant == "decode").collect();
    if decode.is_empty() {
        return;
    }
    println!();
    println!(
        "decode (one query token per sequence; GB/s of K/V read; copy probe {}, read probe \
         sampled alongside {}):",
        copy_gbps.map_or("-".into(), |g| format!("{g:.2} GB/s")),
        read_gbps.map_or("-".into(), |g| format!("{g:.2} GB/s")),
    );
    println!(
        "  {:<44} {:>6} {:>10} {:>8} {:>9} {:>9}",
        "case", "splits", "median ms", "GB/s", "% copy", "% read"
    );
    for r in &decode {
        let gbps = r.kv_gbps.unwrap_or(0.0);
        let pct =
            |probe: Option<f64>| probe.map_or("-".into(), |p| format!("{:.1}", gbps / p * 100.0));
        println!(
            "  {:<44} {:>6} {:>10.2} {:>8.2} {:>9} {:>9}",
            r.name,
            r.splits.map_or("-".into(), |s| s.to_string()),
            r.median_ms,
            gbps,
            pct(copy_gbps),
            pct(read_gbps),
        );
    }
    let find = |case: &decode::DecodeCase| decode.iter().find(|r| r.name == case.name());
    let base = decode::base_case();
    println!("stated figures (#16, same run):");
    if let Some(r) = find(&base) {
        let pct = r.pct_of_copy.unwrap_or(0.0);
        println!(
            "  {:<58} {pct:>6.1}%  (needs >= 50%: {})",
            "K/V read at B=1 Hq32 Hkv8 D128 32k f16 / copy probe",
            if pct >= 50.0 { "met" } else { "NOT MET" }
        );
    }
    let ratio = |what: &str, first: &decode::DecodeCase, second: &decode::DecodeCase, at_most| {
        if let (Some(a), Some(b)) = (find(first), find(second)) {
            let (median, min) = (a.median_ms / b.median_ms, a.min_ms / b.min_ms);
            println!(
                "  {what:<46} {median:>6.2}x median, {min:>6.2}x min  (needs <= {at_most}: {})",
                if median <= at_most { "met" } else { "NOT MET" }
            );
        }
    };
    ratio(
        "Hq32 / Hq8 (Hkv8, 32k f16)",
        &base,
        &decode::DecodeCase { q_heads: 8, ..base },
        1.3,
    );
    ratio(
        "paged (16) / contiguous (32k f16)",
        &decode::DecodeCase {
            block_size: Some(16),
            ..base
        },
        &base,
        1.1,
    );
    for r in &decode {
        if let Some(case) = decode::cases(false)
            .into_iter()
            .chain(decode::cases(true))
            .find(|c| c.name() == r.name && !c.one_split)
        {
            let one = decode::DecodeCase {
                one_split: true,
                ..case
            };
            if find(&one).is_some() {
                ratio(
                    &format!(
                        "split-KV / one split ({})",
                        r.name.trim_start_matches("decode_")
                    ),
                    &case,
                    &one,
                    1.05,
                );
            }
        }
    }
}

/// Writes `report` as pretty JSON to `path`, creating its directory.
fn write_json(path: &Path, report: &Report) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())? + "\n";
    std::fs::write(path, json).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let f16_path = match args.f16_path {
        F16PathArg::Auto => F16Path::Auto,
        F16PathArg::Packed => F16Path::Packed,
        F16PathArg::Native => F16Path::RequireNative,
    };
    let engine = match Engine::new_blocking(EngineOptions {
        f16_path,
        ..EngineOptions::default()
    }) {
        Ok(engine) => engine,
        Err(err) => {
            eprintln!("wflash-bench: no usable GPU adapter: {err}");
            return ExitCode::FAILURE;
        }
    };
    if args.adapter {
        println!("wflash adapter: {}", engine.info());
        return ExitCode::SUCCESS;
    }
    let timer = if args.wall_clock {
        None
    } else {
        GpuTimer::new(&engine)
    };
    let timer = timer.as_ref();
    if args.tune {
        println!("adapter: {}", engine.info());
        return match tune::tune(
            &engine,
            timer,
            args.tune_file.as_deref(),
            args.samples.unwrap_or(5),
        ) {
            Ok(path) => {
                println!("tuned tiles written to {}", path.display());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("wflash-bench: --tune: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let started = Instant::now();
    let samples = args
        .samples
        .unwrap_or(if args.quick { 3 } else { 7 })
        .max(1);
    let counts = RunCounts {
        // Every measurement first compiles its pipelines on a small problem; then full-size
        // warm-ups.
        warmups: if args.quick { 0 } else { 2 },
        samples,
        // The naive baseline is slow (it materialises N×N scores): one timed run in quick mode.
        naive_samples: if args.quick { 1 } else { samples },
        baseline_max_seq: if args.quick {
            QUICK_BASELINE_MAX_SEQ
        } else {
            usize::MAX
        },
    };
    println!("adapter: {}", engine.info());
    for (family, head_dim, value_dim, tile) in engine.tuned_tiles() {
        println!(
            "tuned tile: {} kernel, head dim {head_dim}, value dim {value_dim}: block_m {} block_n {}",
            family.name(),
            tile.block_m,
            tile.block_n
        );
    }
    let source = match timer {
        Some(timer) => format!(
            "GPU timestamps around each call ({} ns per tick), wall clock beside them",
            timer.ns_per_tick()
        ),
        None if args.wall_clock => "wall clock around submit + wait (--wall-clock)".into(),
        None => "wall clock around submit + wait (the device has no TIMESTAMP_QUERY and \
                 TIMESTAMP_QUERY_INSIDE_ENCODERS)"
            .into(),
    };
    println!(
        "timing: {source}; the CPU reference by wall clock; pipelines compiled on a small \
         problem, then {} full-size warm-up run(s); median of {samples} run(s) (naive-gpu: {})",
        counts.warmups, counts.naive_samples
    );

    let selected: Vec<Case> = cases(args.quick)
        .into_iter()
        .filter(|c| {
            args.filter
                .as_deref()
                .is_none_or(|f| matches_filter(&c.name(), f))
        })
        .map(|c| Case {
            linear_chunk: args.linear_chunk,
            ..c
        })
        .collect();
    let decode_selected: Vec<decode::DecodeCase> = decode::cases(args.quick)
        .into_iter()
        .filter(|c| {
            args.filter
                .as_deref()
                .is_none_or(|f| matches_filter(&c.name(), f))
        })
        .collect();
    if selected.is_empty() && decode_selected.is_empty() {
        eprintln!("wflash-bench: no case matches the filter");
        return ExitCode::FAILURE;
    }

    let mut records = Vec::new();
    let mut fused_failures = 0;
    let probe = match PeakProbe::new(&engine, timer) {
        Ok(probe) => Some(probe),
        Err(err) => {
            println!("fma peak probe failed ({err}); % of peak is not reported");
            None
        }
    };
    let peak = match probe.as_ref().map(|p| p.measure(&engine, timer, samples)) {
        None => None,
        Some(Ok(peak)) => {
            println!(
                "fma peak probe: {:.2} GFLOP/s ({:.2} GFLOP per run, median {:.3} ms, wall {:.3} ms)",
                peak.gflops,
                peak.flops / 1e9,
                peak.timing.stats.median * 1e3,
                peak.timing.wall.median * 1e3,
            );
            records.push(peak_record(&engine, &peak));
            Some(peak.gflops)
        }
        Some(Err(err)) => {
            println!("fma peak probe failed ({err}); % of peak is not reported");
            None
        }
    };
    let copy = match naive::copy_bandwidth(&engine, timer, samples) {
        Ok(copy) => {
            println!(
                "copy bandwidth probe: {:.2} GB/s, read + write bytes (copy_buffer_to_buffer of \
                 {} MiB, median {:.3} ms, wall {:.3} ms)",
                copy.gbps,
                copy.bytes >> 20,
                copy.timing.stats.median * 1e3,
                copy.timing.wall.median * 1e3,
            );
            Some(copy)
        }
        Err(err) => {
            println!("copy bandwidth probe failed ({err})");
            None
        }
    };
    let read_probe = match naive::ReadProbe::new(&engine, timer) {
        Ok(probe) => Some(probe),
        Err(err) => {
            println!("shader read probe failed ({err})");
            None
        }
    };
    let read = match read_probe
        .as_ref()
        .map(|p| p.measure(&engine, timer, samples))
    {
        None => None,
        Some(Ok(read)) => {
            println!(
                "shader read probe: {:.2} GB/s, bytes read (read_peak.wgsl over {} MiB, median \
                 {:.3} ms, wall {:.3} ms)",
                read.gbps,
                read.bytes >> 20,
                read.timing.stats.median * 1e3,
                read.timing.wall.median * 1e3,
            );
            Some(read)
        }
        Some(Err(err)) => {
            println!("shader read probe failed ({err})");
            None
        }
    };
    let naive = match Naive::new(engine.device()) {
        Ok(naive) => Some(naive),
        Err(err) => {
            println!("naive-gpu: building the pipelines failed ({err}); naive cases skipped");
            None
        }
    };

    // Cases of one sequence length are timed together, their samples interleaved (see
    // `time_fused_group`): the ratios the issues state compare cases of one length.
    let mut groups: Vec<Vec<Case>> = Vec::new();
    for case in &selected {
        match groups.iter_mut().find(|g| g[0].group() == case.group()) {
            Some(group) => group.push(*case),
            None => groups.push(vec![*case]),
        }
    }
    let progress = progress_bar(selected.iter().map(|c| counts.planned(c)).sum());
    let say = |line: String| progress.suspend(|| println!("{line}"));
    let mut runs_planned_so_far = 0;
    for group in &groups {
        let group_start = Instant::now();
        let inputs: Vec<[Vec<f32>; 3]> = group.iter().map(Case::inputs).collect();
        let mut prepared = Vec::new();
        let mut timed = Vec::new();
        for (case, [q, k, v]) in group.iter().zip(&inputs) {
            progress.set_message(format!("{} (compiling)", case.name()));
            let inputs = [q.as_slice(), k.as_slice(), v.as_slice()];
            let ready = match case.dtype {
                DType::F32 => Prepared::new::<f32>(&engine, case, inputs),
                DType::F16 => Prepared::new::<half::f16>(&engine, case, inputs),
                DType::Bf16 => Prepared::new::<half::bf16>(&engine, case, inputs),
            };
            match ready {
                Ok(ready) => {
                    prepared.push(ready);
                    timed.push(*case);
                }
                Err(err) => {
                    say(format!("{}: fused FAILED: {err}", case.name()));
                    fused_failures += 1;
                }
            }
        }
        let (results, group_peak) = time_fused_group(
            &engine,
            timer,
            &progress,
            &prepared,
            probe.as_ref().filter(|_| peak.is_some()),
            counts.warmups,
            samples,
        );
        drop(prepared);
        // % of peak divides by the probe of this group; by the run's first probe where it failed.
        let group_peak = match group_peak {
            Some(Ok(group_peak)) => Some(group_peak.gflops),
            Some(Err(err)) => {
                say(format!("fma peak probe failed in this group ({err})"));
                peak
            }
            None => peak,
        };
        let ctx = Context {
            engine: &engine,
            peak_gflops: group_peak,
        };
        say(format!(
            "{}: {} fused case(s) timed, interleaved with the FMA probe ({}), in {:.1} s",
            if group[0].linear {
                "linear".to_string()
            } else {
                format!("n={}", group[0].seq)
            },
            timed.len(),
            group_peak.map_or("none".into(), |p| format!("{p:.1} GFLOP/s")),
            group_start.elapsed().as_secs_f64()
        ));
        for (case, [q, k, v]) in group.iter().zip(&inputs) {
            let name = case.name();
            let case_start = Instant::now();
            let flops = case.flops();
            let inputs = [q.as_slice(), k.as_slice(), v.as_slice()];
            let mut notes = Vec::new();

            let fused = timed
                .iter()
                .position(|c| c.name() == name)
                .map(|i| &results[i]);
            let fused_out = match fused {
                Some(Ok((timing, out))) => {
                    records.push(ctx.record(case, "fused", case.dtype.name(), flops, *timing));
                    out.clone()
                }
                Some(Err(err)) => {
                    say(format!("{name}: fused FAILED: {err}"));
                    fused_failures += 1;
                    None
                }
                None => None,
            };

            if case.dtype == DType::F32 {
                progress.set_message(format!("{name} (naive-gpu)"));
                match (counts.naive(case), &naive) {
                    (Err(why), _) => say(format!("{name}: naive-gpu skipped ({why})")),
                    (Ok(_), None) => say(format!("{name}: naive-gpu skipped (no pipelines)")),
                    (Ok(runs), Some(naive)) => {
                        match time_naive(&engine, timer, &progress, naive, case, inputs, runs) {
                            Ok((timing, out)) => {
                                records.push(ctx.record(case, "naive-gpu", "f32", flops, timing));
                                if let Some(fused_out) = &fused_out {
                                    let diff =
                                        max_abs_diff(fused_out, out.iter().map(|&x| f64::from(x)));
                                    notes.push(format!("max|fused-naive| {diff:.2e}"));
                                }
                            }
                            Err(err) => say(format!("{name}: naive-gpu skipped: {err}")),
                        }
                    }
                }

                progress.set_message(format!("{name} (cpu-ref)"));
                match counts.cpu_ref(case) {
                    Err(why) => say(format!("{name}: cpu-ref skipped ({why})")),
                    Ok(()) => {
                        let to_f64 =
                            |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>();
                        let (q64, k64, v64) = (to_f64(q), to_f64(k), to_f64(v));
                        let start = Instant::now();
                        let reference = if case.linear && case.backward {
                            let p = case.linear_problem();
                            let d_o = to_f64(&case.d_o());
                            wflash_ref::linear::linear_backward(
                                &p, &q64, &k64, &v64, None, &d_o, None,
                            )
                            .dq
                        } else if case.linear {
                            let p = case.linear_problem();
                            wflash_ref::linear::linear_forward(&p, &q64, &k64, &v64, None).output
                        } else if case.backward {
                            let p = case.problem(&case.data());
                            wflash_ref::backward(&p, &q64, &k64, &v64, &to_f64(&case.d_o())).dq
                        } else {
                            wflash_ref::forward(&case.problem(&case.data()), &q64, &k64, &v64)
                                .output
                        };
                        let timing = Timing::wall_once(start.elapsed().as_secs_f64());
                        progress.inc(1);
                        records.push(ctx.record(case, "cpu-ref", "f64", flops, timing));
                        if let Some(fused_out) = &fused_out {
                            let diff = max_abs_diff(fused_out, reference.iter().copied());
                            notes.push(format!("max|fused-ref| {diff:.2e}"));
                        }
                    }
                }
            }
            say(format!(
                "{name}: done in {:.1} s {}",
                case_start.elapsed().as_secs_f64(),
                notes.join(", ")
            ));
        }
        // Runs that failed or were skipped never advanced the bar: catch it up.
        runs_planned_so_far += group.iter().map(|c| counts.planned(c)).sum::<u64>();
        progress.set_position(runs_planned_so_far);
    }
    progress.finish_and_clear();

    // Decode cases: every cache filled first, then their samples interleaved.
    let mut prepared_decode = Vec::new();
    for case in &decode_selected {
        let start = Instant::now();
        match decode::PreparedDecode::new(&engine, case) {
            Ok(ready) => {
                println!(
                    "{}: cache of {:.0} MiB filled in {:.1} s, {} split(s)",
                    case.name(),
                    case.kv_bytes() / f64::from(1 << 20),
                    start.elapsed().as_secs_f64(),
                    ready.splits
                );
                prepared_decode.push(ready);
            }
            Err(
                err @ wflash::Error::TooLarge {
                    limit: "max_storage_buffer_binding_size",
                    ..
                },
            ) => println!("{}: not run, beyond this adapter: {err}", case.name()),
            Err(err) => {
                println!("{}: fused FAILED: {err}", case.name());
                fused_failures += 1;
            }
        }
    }
    let (decode_timings, decode_read) = decode::time_group(
        &engine,
        timer,
        &prepared_decode,
        read_probe.as_ref().filter(|_| !prepared_decode.is_empty()),
        counts.warmups,
        samples,
    );
    // The decode table divides by the read probe taken alongside its samples.
    let decode_read_gbps = match (&read_probe, decode_read) {
        (Some(probe), Ok(runs)) if !runs.is_empty() => Some(probe.bandwidth(&runs).gbps),
        _ => read.map(|r| r.gbps),
    };
    for (ready, timing) in prepared_decode.iter().zip(decode_timings) {
        match timing {
            Ok(timing) => records.push(decode_record(
                &engine,
                ready,
                timing,
                peak,
                copy.map(|c| c.gbps),
            )),
            Err(err) => {
                println!("{}: fused FAILED: {err}", ready.case.name());
                fused_failures += 1;
            }
        }
    }
    drop(prepared_decode);

    print_table(&records);
    print_ratios(&records);
    print_comparisons(&records);
    print_decode(&records, copy.map(|c| c.gbps), decode_read_gbps);

    let mut ok = true;
    let info = engine.info();
    let report = Report {
        device: DeviceReport {
            adapter: info.adapter_name.clone(),
            backend: format!("{:?}", info.backend),
            driver: format!("{} {}", info.driver, info.driver_info),
            timing: if timer.is_some() {
                TimingSource::GpuTimestamp
            } else {
                TimingSource::WallClock
            }
            .name()
            .into(),
            timestamp_period_ns: timer.map(GpuTimer::ns_per_tick),
            fma_peak_gflops: peak,
            copy_gbps: copy.map(|c| c.gbps),
            copy_bytes: copy.map(|c| c.bytes),
            read_gbps: read.map(|r| r.gbps),
        },
        records,
    };
    if let Some(path) = &args.json {
        match write_json(path, &report) {
            Ok(()) => println!(
                "\nwrote {} records to {}",
                report.records.len(),
                path.display()
            ),
            Err(err) => {
                eprintln!("wflash-bench: writing {}: {err}", path.display());
                ok = false;
            }
        }
    }
    let chart_path = args
        .chart
        .clone()
        .or_else(|| args.json.as_ref().map(|json| json.with_extension("svg")));
    if let Some(path) = &chart_path {
        match chart::write_chart(path, &report.records, peak) {
            Ok(()) => println!("wrote the chart to {}", path.display()),
            Err(err) => {
                eprintln!("wflash-bench: chart {}: {err}", path.display());
                ok = false;
            }
        }
    }
    if let Some(path) = &args.baseline
        && let Err(err) = compare_baseline(&report.records, path)
    {
        eprintln!("wflash-bench: baseline: {err}");
        ok = false;
    }
    if fused_failures > 0 {
        eprintln!("wflash-bench: {fused_failures} fused case(s) failed (see above)");
        ok = false;
    }
    println!(
        "\nbench finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

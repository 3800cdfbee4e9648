//! Linear attention's conformance harness: GPU results (output and final state) judged against
//! `wflash_ref::linear::linear_forward` in f64 by the forward contract of DESIGN.md, with
//! `naive_linear_f32` in the storage precision as the baseline.
//!
//! A case can feed its sequence in one call, in pieces (each piece's final state is the next
//! piece's initial state, kept on the GPU), or token by token: all three are judged against
//! the same one-call truth.

use rand::{Rng, SeedableRng};
use wflash::{
    Element, Engine, FeatureMap, GpuLinearState, Layout, LinearKernel, LinearOptions, Shape,
};
use wflash_ref::linear::{self as reference, LinearProblem, LinearState};

use crate::grid::covering_rows;
use crate::{Output, Path, Verdict, judge, random};

/// How a case hands its sequence to the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    OneCall,
    /// This many calls of (nearly) equal length, the state carried from each to the next.
    Pieces(usize),
    /// One call per token (decoding).
    TokenByToken,
}

/// One linear-attention conformance case.
#[derive(Clone, Copy, Debug)]
pub struct LinearCase {
    pub path: Path,
    pub layout: Layout,
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub len: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub causal: bool,
    pub feature_map: FeatureMap,
    /// Lightning Attention's per-head decay.
    pub decay: bool,
    pub normalize: bool,
    pub kernel: LinearKernel,
    pub chunk_size: Option<usize>,
    /// Start from a random initial state.
    pub initial: bool,
    pub feed: Feed,
    pub seed: u64,
}

impl LinearCase {
    pub fn shape(&self) -> Shape {
        Shape {
            batch: self.batch,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            q_len: self.len,
            kv_len: self.len,
            head_dim: self.key_dim,
            value_dim: self.value_dim,
        }
    }

    /// The decays this case uses, if any.
    pub fn decays(&self) -> Option<Vec<f32>> {
        self.decay.then(|| wflash::lightning_decay(self.q_heads))
    }

    pub fn options<'a>(&self, decay: Option<&'a [f32]>) -> LinearOptions<'a> {
        LinearOptions {
            causal: self.causal,
            feature_map: self.feature_map,
            decay,
            normalize: self.normalize,
            kernel: self.kernel,
            chunk_size: self.chunk_size,
            ..LinearOptions::default()
        }
    }

    /// The reference problem for this case's whole sequence.
    pub fn problem(&self, decay: Option<&[f32]>) -> LinearProblem {
        LinearProblem {
            causal: self.causal,
            feature_map: reference_feature_map(self.feature_map),
            decay: decay.map(|d| d.iter().map(|&x| f64::from(x)).collect()),
            normalize: self.normalize,
            ..LinearProblem::new(
                self.batch,
                self.q_heads,
                self.kv_heads,
                self.len,
                self.key_dim,
                self.value_dim,
                ref_layout(self.layout),
            )
        }
    }

    /// The token ranges the case's calls cover, in order.
    pub fn pieces(&self) -> Vec<std::ops::Range<usize>> {
        let count = match self.feed {
            Feed::OneCall => 1,
            Feed::Pieces(n) => n.clamp(1, self.len),
            Feed::TokenByToken => self.len,
        };
        (0..count)
            .map(|p| p * self.len / count..(p + 1) * self.len / count)
            .collect()
    }
}

/// The reference crate's twin of a feature map.
pub fn reference_feature_map(map: FeatureMap) -> reference::FeatureMap {
    match map {
        FeatureMap::Identity => reference::FeatureMap::Identity,
        FeatureMap::EluPlusOne => reference::FeatureMap::EluPlusOne,
        FeatureMap::Relu => reference::FeatureMap::Relu,
        other => panic!("no reference for feature map {other:?}"),
    }
}

fn ref_layout(layout: Layout) -> wflash_ref::Layout {
    match layout {
        Layout::Bhsd => wflash_ref::Layout::Bhsd,
        Layout::Bshd => wflash_ref::Layout::Bshd,
    }
}

/// Tokens `range` of a `[batch, heads, len, dim]` tensor (or BSHD), as a tensor of that many
/// tokens in the same layout.
pub fn take_tokens<T: Copy>(
    x: &[T],
    layout: Layout,
    [batch, heads, len, dim]: [usize; 4],
    range: std::ops::Range<usize>,
) -> Vec<T> {
    let n = range.len();
    let mut out = Vec::with_capacity(batch * heads * n * dim);
    let [sb, sh, ss] = layout.strides(heads, len, dim);
    match layout {
        Layout::Bhsd => {
            for b in 0..batch {
                for h in 0..heads {
                    for s in range.clone() {
                        let at = b * sb + h * sh + s * ss;
                        out.extend_from_slice(&x[at..at + dim]);
                    }
                }
            }
        }
        Layout::Bshd => {
            for b in 0..batch {
                for s in range.clone() {
                    for h in 0..heads {
                        let at = b * sb + h * sh + s * ss;
                        out.extend_from_slice(&x[at..at + dim]);
                    }
                }
            }
        }
    }
    out
}

/// Writes `piece` (tokens `range`, laid out as [`take_tokens`] returns them) into `x`.
pub fn put_tokens<T: Copy>(
    x: &mut [T],
    piece: &[T],
    layout: Layout,
    [batch, heads, len, dim]: [usize; 4],
    range: std::ops::Range<usize>,
) {
    let [sb, sh, ss] = layout.strides(heads, len, dim);
    let mut rows = piece.chunks(dim);
    let mut put = |b: usize, h: usize, s: usize| {
        let at = b * sb + h * sh + s * ss;
        x[at..at + dim].copy_from_slice(rows.next().expect("a row per token"));
    };
    match layout {
        Layout::Bhsd => {
            for b in 0..batch {
                for h in 0..heads {
                    for s in range.clone() {
                        put(b, h, s);
                    }
                }
            }
        }
        Layout::Bshd => {
            for b in 0..batch {
                for s in range.clone() {
                    for h in 0..heads {
                        put(b, h, s);
                    }
                }
            }
        }
    }
}

/// Runs a case on `engine` and judges its output and final state.
#[cfg(not(target_arch = "wasm32"))]
pub fn run_linear_case(engine: &Engine, case: &LinearCase) -> Result<Verdict, String> {
    pollster::block_on(run_linear_case_async(engine, case))
}

/// [`run_linear_case`], awaited (a browser cannot block).
pub async fn run_linear_case_async(engine: &Engine, case: &LinearCase) -> Result<Verdict, String> {
    match case.path.dtype() {
        wflash::DType::F32 => judge_case::<f32>(engine, case).await,
        wflash::DType::F16 => judge_case::<half::f16>(engine, case).await,
        wflash::DType::Bf16 => judge_case::<half::bf16>(engine, case).await,
    }
}

/// A case's inputs: Q, K, V (in the storage type, and as the f32 values the kernel sees) and
/// the initial state, drawn from the case's seed.
struct Inputs<T> {
    q: (Vec<T>, Vec<f32>),
    k: (Vec<T>, Vec<f32>),
    v: (Vec<T>, Vec<f32>),
    initial: Option<wflash::LinearState>,
}

/// Random f32 states of `p`'s sizes (`z` when normalising, positive with a positive feature
/// map): the size a few hundred tokens leave behind, or their gradient.
fn random_state(
    rng: &mut rand::rngs::StdRng,
    p: &LinearProblem,
    case: &LinearCase,
) -> wflash::LinearState {
    let mut state = |n: usize, positive: bool| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let x: f32 = rng.sample(rand_distr::StandardNormal);
                if positive { 4.0 * x.abs() } else { 4.0 * x }
            })
            .collect()
    };
    let z_positive = case.feature_map != FeatureMap::Identity;
    wflash::LinearState {
        kv: state(p.state_elems(), false),
        z: if case.normalize {
            state(p.norm_state_elems(), z_positive)
        } else {
            Vec::new()
        },
    }
}

fn inputs<T: Element>(
    rng: &mut rand::rngs::StdRng,
    p: &LinearProblem,
    case: &LinearCase,
) -> Inputs<T> {
    let q = random::<T>(rng, p.q_elems(), 1.0);
    let k = random::<T>(rng, p.k_elems(), 1.0);
    let v = random::<T>(rng, p.v_elems(), 1.0);
    let initial = case.initial.then(|| random_state(rng, p, case));
    Inputs { q, k, v, initial }
}

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&a| f64::from(a)).collect()
}

fn reference_state(s: &wflash::LinearState) -> LinearState {
    LinearState {
        kv: wide(&s.kv),
        z: wide(&s.z),
    }
}

async fn judge_case<T: Element>(engine: &Engine, case: &LinearCase) -> Result<Verdict, String> {
    let decay = case.decays();
    let p = case.problem(decay.as_deref());
    let mut rng = rand::rngs::StdRng::seed_from_u64(case.seed);
    let Inputs {
        q: (q, q32),
        k: (k, k32),
        v: (v, v32),
        initial,
    } = inputs::<T>(&mut rng, &p, case);
    let ref_initial = initial.as_ref().map(reference_state);

    let shape = case.shape();
    let opts = case.options(decay.as_deref());
    let err = |e: wflash::Error| format!("{case:?}: engine error {e}");
    let q_dims = [case.batch, case.q_heads, case.len, case.key_dim];
    let k_dims = [case.batch, case.kv_heads, case.len, case.key_dim];
    let v_dims = [case.batch, case.kv_heads, case.len, case.value_dim];
    let o_dims = [case.batch, case.q_heads, case.len, case.value_dim];
    let mut output = vec![T::from_f32(f32::NAN); p.o_elems()];
    let mut state: Option<GpuLinearState> = match &initial {
        Some(s) => Some(GpuLinearState {
            kv: engine.upload(&s.kv).map_err(err)?,
            z: if s.z.is_empty() {
                None
            } else {
                Some(engine.upload(&s.z).map_err(err)?)
            },
        }),
        None => None,
    };
    for range in case.pieces() {
        let piece_shape = Shape {
            q_len: range.len(),
            kv_len: range.len(),
            ..shape
        };
        let upload =
            |x: &[T], dims| engine.upload(&take_tokens(x, case.layout, dims, range.clone()));
        let (qt, kt, vt) = (
            upload(&q, q_dims).map_err(err)?,
            upload(&k, k_dims).map_err(err)?,
            upload(&v, v_dims).map_err(err)?,
        );
        let out = engine
            .linear_attention_gpu(
                &piece_shape,
                case.layout,
                &opts,
                &qt,
                &kt,
                &vt,
                state.as_ref(),
            )
            .map_err(err)?;
        let piece: Vec<T> = engine.read(&out.output).await.map_err(err)?;
        put_tokens(&mut output, &piece, case.layout, o_dims, range);
        state = Some(out.state);
    }
    let state = state.expect("at least one piece");
    let kv: Vec<f32> = engine.read(&state.kv).await.map_err(err)?;
    let z: Vec<f32> = match &state.z {
        Some(z) => engine.read(z).await.map_err(err)?,
        None => Vec::new(),
    };
    if case.normalize == z.is_empty() {
        return Err(format!("{case:?}: z state present = {}", !z.is_empty()));
    }
    crate::record_output_hash(
        &format!("linear {case:?}"),
        &[
            ("O", &output.iter().map(|x| x.to_f32()).collect::<Vec<_>>()),
            ("state", &kv),
            ("z", &z),
        ],
    );

    let (truth, naive) = crate::side_by_side(
        || {
            reference::linear_forward(
                &p,
                &wide(&q32),
                &wide(&k32),
                &wide(&v32),
                ref_initial.as_ref(),
            )
        },
        || {
            let store = |x: f32| T::from_f32(x).to_f32();
            reference::naive_linear_f32(&p, &q32, &k32, &v32, ref_initial.as_ref(), &store)
        },
    );

    // The state is f32 on every path; its naive baseline accumulates it directly in f32.
    let mut got_state = kv.clone();
    got_state.extend(&z);
    let mut want_state = truth.state.kv.clone();
    want_state.extend(&truth.state.z);
    let mut naive_state = naive.state.kv.clone();
    naive_state.extend(&naive.state.z);
    judge(
        case,
        vec![
            Output::forward(
                "O",
                output.iter().map(|x| f64::from(x.to_f32())).collect(),
                &truth.output,
                &naive.output,
            ),
            Output::forward("state", wide(&got_state), &want_state, &naive_state),
        ],
    )
}

/// Runs a case's backward on `engine` (dO and, for causal cases of even seed, a `d_final`
/// drawn from its seed) and judges dQ, dK, dV and the initial state's gradient against
/// `wflash_ref::linear::linear_backward` by the backward contract, with
/// `naive_linear_backward_f32` as the baseline. A case fed in pieces trains its sequence in
/// pieces: the forward runs piece by piece for each piece's initial state, then the backward
/// runs from the last piece to the first, each piece's initial-state gradient the `d_final` of
/// the piece before it; the gradients are judged against the one-call truth.
#[cfg(not(target_arch = "wasm32"))]
pub fn run_linear_backward_case(engine: &Engine, case: &LinearCase) -> Result<Verdict, String> {
    pollster::block_on(run_linear_backward_case_async(engine, case))
}

/// [`run_linear_backward_case`], awaited (a browser cannot block).
pub async fn run_linear_backward_case_async(
    engine: &Engine,
    case: &LinearCase,
) -> Result<Verdict, String> {
    match case.path.dtype() {
        wflash::DType::F32 => judge_backward_case::<f32>(engine, case).await,
        wflash::DType::F16 => judge_backward_case::<half::f16>(engine, case).await,
        wflash::DType::Bf16 => judge_backward_case::<half::bf16>(engine, case).await,
    }
}

async fn judge_backward_case<T: Element>(
    engine: &Engine,
    case: &LinearCase,
) -> Result<Verdict, String> {
    let decay = case.decays();
    let p = case.problem(decay.as_deref());
    let mut rng = rand::rngs::StdRng::seed_from_u64(case.seed);
    let Inputs {
        q: (q, q32),
        k: (k, k32),
        v: (v, v32),
        initial,
    } = inputs::<T>(&mut rng, &p, case);
    let (d_o, do32) = random::<T>(&mut rng, p.o_elems(), 1.0);
    let d_final =
        (case.causal && case.seed.is_multiple_of(2)).then(|| random_state(&mut rng, &p, case));

    let shape = case.shape();
    let opts = case.options(decay.as_deref());
    let err = |e: wflash::Error| format!("{case:?}: engine error {e}");
    let q_dims = [case.batch, case.q_heads, case.len, case.key_dim];
    let k_dims = [case.batch, case.kv_heads, case.len, case.key_dim];
    let v_dims = [case.batch, case.kv_heads, case.len, case.value_dim];
    let o_dims = [case.batch, case.q_heads, case.len, case.value_dim];
    let upload_state = |s: &wflash::LinearState| -> Result<GpuLinearState, String> {
        Ok(GpuLinearState {
            kv: engine.upload(&s.kv).map_err(err)?,
            z: if s.z.is_empty() {
                None
            } else {
                Some(engine.upload(&s.z).map_err(err)?)
            },
        })
    };
    let pieces = case.pieces();
    let piece_shape = |range: &std::ops::Range<usize>| Shape {
        q_len: range.len(),
        kv_len: range.len(),
        ..shape
    };
    let upload = |x: &[T], dims, range: &std::ops::Range<usize>| {
        engine
            .upload(&take_tokens(x, case.layout, dims, range.clone()))
            .map_err(err)
    };
    // Each piece's initial state, from the forward run piece by piece.
    let mut starts = Vec::with_capacity(pieces.len());
    let mut state = initial.as_ref().map(upload_state).transpose()?;
    for range in &pieces {
        let out = engine
            .linear_attention_gpu(
                &piece_shape(range),
                case.layout,
                &opts,
                &upload(&q, q_dims, range)?,
                &upload(&k, k_dims, range)?,
                &upload(&v, v_dims, range)?,
                state.as_ref(),
            )
            .map_err(err)?;
        starts.push(state.replace(out.state));
    }
    let poison = || T::from_f32(f32::NAN);
    let mut dq = vec![poison(); p.q_elems()];
    let mut dk = vec![poison(); p.k_elems()];
    let mut dv = vec![poison(); p.v_elems()];
    let mut carried = d_final.as_ref().map(upload_state).transpose()?;
    for (range, start) in pieces.iter().zip(&starts).rev() {
        let grads = engine
            .linear_attention_backward_gpu(
                &piece_shape(range),
                case.layout,
                &opts,
                &upload(&q, q_dims, range)?,
                &upload(&k, k_dims, range)?,
                &upload(&v, v_dims, range)?,
                start.as_ref(),
                &upload(&d_o, o_dims, range)?,
                carried.as_ref(),
            )
            .map_err(err)?;
        if grads.d_initial.is_some() != start.is_some() {
            return Err(format!(
                "{case:?}: initial-state gradient present = {}",
                grads.d_initial.is_some()
            ));
        }
        for (all, dims, piece) in [
            (&mut dq, q_dims, &grads.dq),
            (&mut dk, k_dims, &grads.dk),
            (&mut dv, v_dims, &grads.dv),
        ] {
            let piece: Vec<T> = engine.read(piece).await.map_err(err)?;
            put_tokens(all, &piece, case.layout, dims, range.clone());
        }
        carried = grads.d_initial;
    }
    let d_initial = match (&initial, &carried) {
        (Some(_), Some(s)) => {
            let kv: Vec<f32> = engine.read(&s.kv).await.map_err(err)?;
            let z: Vec<f32> = match &s.z {
                Some(z) => engine.read(z).await.map_err(err)?,
                None => Vec::new(),
            };
            if case.normalize == z.is_empty() {
                return Err(format!("{case:?}: d_initial z present = {}", !z.is_empty()));
            }
            Some([kv, z].concat())
        }
        (None, None) => None,
        _ => {
            return Err(format!(
                "{case:?}: initial-state gradient without an initial state, or missing"
            ));
        }
    };
    let narrow = |x: &[T]| x.iter().map(|a| a.to_f32()).collect::<Vec<f32>>();
    let (dq, dk, dv) = (narrow(&dq), narrow(&dk), narrow(&dv));
    crate::record_output_hash(
        &format!("linear backward {case:?}"),
        &[
            ("dQ", &dq),
            ("dK", &dk),
            ("dV", &dv),
            ("d_initial", d_initial.as_deref().unwrap_or(&[])),
        ],
    );

    let ref_initial = initial.as_ref().map(reference_state);
    let ref_d_final = d_final.as_ref().map(reference_state);
    let (truth, naive) = crate::side_by_side(
        || {
            reference::linear_backward(
                &p,
                &wide(&q32),
                &wide(&k32),
                &wide(&v32),
                ref_initial.as_ref(),
                &wide(&do32),
                ref_d_final.as_ref(),
            )
        },
        || {
            let store = |x: f32| T::from_f32(x).to_f32();
            reference::naive_linear_backward_f32(
                &p,
                &q32,
                &k32,
                &v32,
                ref_initial.as_ref(),
                &do32,
                ref_d_final.as_ref(),
                &store,
            )
        },
    );
    let flat = |s: &Option<LinearState>| s.as_ref().map(|s| [s.kv.clone(), s.z.clone()].concat());
    let (truth_initial, naive_initial) = (flat(&truth.d_initial), flat(&naive.d_initial));
    let mut outputs = vec![
        Output::backward("dQ", wide(&dq), &truth.dq, &naive.dq),
        Output::backward("dK", wide(&dk), &truth.dk, &naive.dk),
        Output::backward("dV", wide(&dv), &truth.dv, &naive.dv),
    ];
    if let (Some(got), Some(truth), Some(naive)) = (&d_initial, &truth_initial, &naive_initial) {
        outputs.push(Output::backward("d_initial", wide(got), truth, naive));
    }
    judge(case, outputs)
}

// The grid.

const LAYOUTS: [Layout; 2] = [Layout::Bhsd, Layout::Bshd];
const HEADS: [(usize, usize); 3] = [(2, 2), (4, 2), (3, 1)];
const BATCHES: [usize; 2] = [1, 2];
/// Lengths around the chunk sizes below (16, 13, the default 64) and a single token.
const LENS: [usize; 5] = [1, 5, 64, 100, 257];
/// (key_dim, value_dim): equal, unequal both ways, odd, the largest.
const DIMS: [(usize, usize); 5] = [(64, 64), (32, 59), (59, 32), (128, 128), (8, 8)];
const CAUSAL: [bool; 2] = [true, false];
const FEATURE_MAPS: [FeatureMap; 3] = FeatureMap::ALL;
const FLAGS: [bool; 2] = [false, true];
const KERNELS: [(LinearKernel, Option<usize>); 5] = [
    (LinearKernel::Auto, None),
    (LinearKernel::Chunked, None),
    (LinearKernel::Chunked, Some(16)),
    (LinearKernel::Chunked, Some(13)),
    (LinearKernel::Recurrent, None),
];
const FEEDS: [Feed; 3] = [Feed::OneCall, Feed::Pieces(3), Feed::TokenByToken];

/// Axis order of a grid row.
pub const AXES: [usize; 13] = [
    Path::ALL.len(),
    LAYOUTS.len(),
    HEADS.len(),
    BATCHES.len(),
    LENS.len(),
    DIMS.len(),
    CAUSAL.len(),
    FEATURE_MAPS.len(),
    FLAGS.len(), // decay
    FLAGS.len(), // normalize
    KERNELS.len(),
    FLAGS.len(), // initial state
    FEEDS.len(),
];
const CAUSAL_AXIS: usize = 6;
const FEATURE_AXIS: usize = 7;
const DECAY_AXIS: usize = 8;
const NORMALIZE_AXIS: usize = 9;
const KERNEL_AXIS: usize = 10;
const INITIAL_AXIS: usize = 11;
const FEED_AXIS: usize = 12;

/// Pairs no case may hold: non-causal attention has no decay, no initial state, no
/// recurrent kernel and no pieces (every query sees every key); the normaliser is judged
/// only with positive feature maps (with the identity its denominator crosses zero).
pub fn allowed(a: usize, va: usize, b: usize, vb: usize) -> bool {
    let value = |axis: usize| {
        if a == axis {
            Some(va)
        } else if b == axis {
            Some(vb)
        } else {
            None
        }
    };
    if value(CAUSAL_AXIS) == Some(1) {
        let causal_only = value(DECAY_AXIS) == Some(1)
            || value(INITIAL_AXIS) == Some(1)
            || value(KERNEL_AXIS) == Some(4)
            || value(FEED_AXIS).is_some_and(|f| f != 0);
        if causal_only {
            return false;
        }
    }
    !(value(NORMALIZE_AXIS) == Some(1) && value(FEATURE_AXIS) == Some(0))
}

/// The linear conformance grid: a pairwise covering sample of every axis above (the native
/// suite runs it whole; the browser a slice of it).
pub fn grid() -> Vec<LinearCase> {
    covering_rows(AXES, 0x11ea7, allowed)
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let (q_heads, kv_heads) = HEADS[r[2]];
            let (key_dim, value_dim) = DIMS[r[5]];
            let (kernel, chunk_size) = KERNELS[r[KERNEL_AXIS]];
            LinearCase {
                path: Path::ALL[r[0]],
                layout: LAYOUTS[r[1]],
                batch: BATCHES[r[3]],
                q_heads,
                kv_heads,
                len: LENS[r[4]],
                key_dim,
                value_dim,
                causal: CAUSAL[r[CAUSAL_AXIS]],
                feature_map: FEATURE_MAPS[r[FEATURE_AXIS]],
                decay: FLAGS[r[DECAY_AXIS]],
                normalize: FLAGS[r[NORMALIZE_AXIS]],
                kernel,
                chunk_size,
                initial: FLAGS[r[INITIAL_AXIS]],
                feed: FEEDS[r[FEED_AXIS]],
                seed: 0x11_0000 + i as u64,
            }
        })
        .collect()
}

//! The conformance harness: GPU results judged against the f64 reference by FlashAttention's
//! standard (DESIGN.md): the kernel's max abs error must be at most twice that of a naive
//! computation in the same storage precision, plus 1e-5.
//!
//! Every case draws fresh random inputs from its own seed (printed on failure), and the engine
//! poisons output buffers with NaN so an element the kernel forgets to write fails the case.

#[cfg(not(target_arch = "wasm32"))]
use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use wflash::{
    AttentionOptions, Bias, BiasValues, Causal, DType, Element, Engine, EngineOptions, F16Path,
    Family, Layout, Modifier, ModifierSet, Shape, Variant, Varlen, Window,
};
use wflash_ref::{CausalAlign, Problem};

pub mod backward;
pub mod decode;
pub mod grid;
pub mod judge;
pub mod linear;
#[cfg(not(target_arch = "wasm32"))]
pub mod soak;

pub use judge::{Output, Tolerance, Verdict, judge, max_abs_err};

/// Which kernel path a case runs: the element type, and for f16 which storage path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    F32,
    /// Native `f16` storage (`SHADER_F16`).
    F16Native,
    /// f16 unpacked from u32 words, as on adapters without `SHADER_F16`.
    F16Packed,
    Bf16,
}

impl Path {
    pub const ALL: [Path; 4] = [Path::F32, Path::F16Native, Path::F16Packed, Path::Bf16];
    pub fn dtype(self) -> DType {
        match self {
            Path::F32 => DType::F32,
            Path::F16Native | Path::F16Packed => DType::F16,
            Path::Bf16 => DType::Bf16,
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn allow_no_gpu() -> bool {
    std::env::var("WFLASH_ALLOW_NO_GPU").is_ok_and(|v| v == "1")
}

/// The options of the harness's engines for `path` and kernel `family` (`None`: the
/// adapter's default): outputs poisoned, no tuning file.
pub fn harness_options(path: Path, family: Option<Family>) -> EngineOptions {
    EngineOptions {
        f16_path: match path {
            Path::F16Packed => F16Path::Packed,
            _ => F16Path::Auto,
        },
        family,
        poison_outputs: true,
        // The grid's shapes are chosen around the default tiles; tuned tiles have their own
        // test (api.rs).
        tuning: wflash::TuningSource::Off,
        ..Default::default()
    }
}

#[cfg(not(target_arch = "wasm32"))]
/// The shared engine for `path`, running the kernel family the adapter gets by default.
/// Output poisoning is on. No adapter is a failure unless a person has set
/// `WFLASH_ALLOW_NO_GPU=1`, in which case this returns `None` and says so.
pub fn engine(path: Path) -> Option<&'static Engine> {
    engine_with(path, None)
}

#[cfg(not(target_arch = "wasm32"))]
/// The shared engine for `path` running kernel `family` (`None`: the adapter's default).
pub fn engine_with(path: Path, family: Option<Family>) -> Option<&'static Engine> {
    // [default, tiled, unrolled] × [auto f16, packed f16]
    static ENGINES: [OnceLock<Option<Engine>>; 6] = [const { OnceLock::new() }; 6];
    let packed = usize::from(path == Path::F16Packed);
    let slot = match family {
        None => 0,
        Some(Family::Tiled) => 2,
        Some(Family::Unrolled) => 4,
    } + packed;
    let engine = ENGINES[slot].get_or_init(|| {
        let options = harness_options(path, family);
        match Engine::new_blocking(options) {
            Ok(engine) => {
                eprintln!("wflash conformance adapter: {}", engine.info());
                Some(engine)
            }
            Err(err) if allow_no_gpu() => {
                eprintln!("WFLASH_ALLOW_NO_GPU=1: skipping GPU checks ({err})");
                None
            }
            Err(err) => panic!(
                "no GPU adapter ({err}); set WFLASH_ALLOW_NO_GPU=1 only on a machine without any"
            ),
        }
    })
    .as_ref()?;
    if path == Path::F16Native && !engine.info().shader_f16 {
        native_f16_is_refused(engine);
        return None;
    }
    Some(engine)
}

#[cfg(not(target_arch = "wasm32"))]
/// On an adapter without `SHADER_F16` (GL, SwiftShader) the native f16 path does not exist:
/// its grids have nothing to run, and what a caller who requires it gets is a typed refusal.
/// Checks that refusal (once) and says so; the f16 grids run on the packed path.
fn native_f16_is_refused(engine: &Engine) {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let required = Engine::from_device(
            engine.device().clone(),
            engine.queue().clone(),
            EngineOptions {
                f16_path: F16Path::RequireNative,
                tuning: wflash::TuningSource::Off,
                ..Default::default()
            },
        )
        .expect("engine");
        let shape = Shape::mha(1, 1, 8, 8);
        let x = vec![half::f16::ONE; shape.q_elems()];
        let refused = required.attention_blocking(
            &shape,
            Layout::Bhsd,
            &AttentionOptions::softmax(),
            &x,
            &x,
            &x,
        );
        assert!(
            matches!(refused, Err(wflash::Error::DTypeUnsupported { .. })),
            "native f16 without SHADER_F16: {refused:?}"
        );
        eprintln!(
            "wflash conformance: the adapter has no SHADER_F16, so the native f16 grids have \
             nothing to run (a call that requires native f16 is refused with DTypeUnsupported: \
             checked); f16 runs on the packed path"
        );
    });
}

#[cfg(not(target_arch = "wasm32"))]
/// An engine on a fresh device with limits and features chosen by a test (e.g. lowered limits
/// that force splitting), wrapped with `Engine::from_device`.
pub fn custom_engine(
    limits: impl FnOnce(&mut wflash::wgpu::Limits),
    features: wflash::wgpu::Features,
    options: EngineOptions,
) -> Engine {
    custom_device_engine(limits, features, options).0
}

#[cfg(not(target_arch = "wasm32"))]
/// A poisoning engine on a fresh device without optional features, whose buffers and storage
/// bindings hold at most `bytes`: lowered limits that make calls split over batch.
pub fn buffer_limited_engine(bytes: u64) -> Engine {
    custom_engine(
        |l| {
            l.max_storage_buffer_binding_size = bytes;
            l.max_buffer_size = bytes;
        },
        wflash::wgpu::Features::empty(),
        EngineOptions {
            poison_outputs: true,
            ..Default::default()
        },
    )
}

#[cfg(not(target_arch = "wasm32"))]
/// [`custom_engine`], also returning the device (to destroy it in fault tests).
pub fn custom_device_engine(
    limits: impl FnOnce(&mut wflash::wgpu::Limits),
    features: wflash::wgpu::Features,
    options: EngineOptions,
) -> (Engine, wflash::wgpu::Device) {
    let (device, queue) = custom_device(limits, features);
    let engine = Engine::from_device(device.clone(), queue, options).expect("engine");
    (engine, device)
}

#[cfg(not(target_arch = "wasm32"))]
/// A fresh device and queue on the default adapter with limits and features chosen by a test.
pub fn custom_device(
    limits: impl FnOnce(&mut wflash::wgpu::Limits),
    features: wflash::wgpu::Features,
) -> (wflash::wgpu::Device, wflash::wgpu::Queue) {
    use wflash::wgpu;
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter =
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
            .expect("adapter");
    let mut required_limits = adapter.limits();
    limits(&mut required_limits);
    pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("wflash test device"),
        required_features: features,
        required_limits,
        ..Default::default()
    }))
    .expect("device")
}

/// One conformance case.
#[derive(Clone, Debug)]
pub struct Case {
    pub shape: Shape,
    pub layout: Layout,
    pub causal: Option<Causal>,
    pub window: Option<Window>,
    pub scale: Option<f32>,
    pub variant: Variant,
    pub path: Path,
    /// Standard deviation of the random inputs (1 for ordinary cases; large for big-logit cases).
    pub input_std: f32,
    /// Score modifiers; their data is drawn from `seed` ([`Case::data`]).
    pub mods: Mods,
    pub seed: u64,
}

/// The modifiers a case turns on ([`Modifier::ALL`] spans them); their data is drawn from the
/// case's seed by [`Case::data`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Mods {
    pub on: ModifierSet,
    /// The bias tensor's form, when `on` holds [`Modifier::Bias`].
    pub bias_form: BiasForm,
}

impl Mods {
    pub fn has(&self, modifier: Modifier) -> bool {
        self.on.contains(modifier)
    }

    /// The modifiers' data for `shape`, drawn from `seed`, each modifier's in
    /// [`Modifier::ALL`]'s order.
    pub fn draw(&self, shape: &Shape, seed: u64) -> ModData {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6d6f_6473);
        let mut data = ModData::default();
        for modifier in self.on.iter() {
            draw(modifier, shape, self.bias_form, &mut rng, &mut data);
        }
        data
    }

    /// Sets the modifiers' options from `data`.
    pub fn apply<'a>(&self, shape: &Shape, data: &'a ModData, opts: &mut AttentionOptions<'a>) {
        for modifier in self.on.iter() {
            apply(modifier, shape, self.bias_form, data, opts);
        }
    }
}

/// The soft-capping bound of every case with [`Modifier::Softcap`]: a cap of 2 bends most
/// scores (they are about N(0, 1)).
pub const SOFTCAP: f32 = 2.0;

/// The shape of a case's bias tensor: per batch element or broadcast, per head or broadcast,
/// f32 or f16. Random normal values, about one in ten `-inf`, and the first row all `-inf`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BiasForm {
    pub per_batch: bool,
    pub per_head: bool,
    pub f16: bool,
}

/// The modifier data of a case, drawn from its seed; [`Case::options`] borrows from it.
#[derive(Clone, Debug, Default)]
pub struct ModData {
    pub alibi_slopes: Vec<f32>,
    pub bias_f32: Vec<f32>,
    pub bias_f16: Vec<half::f16>,
    pub key_mask: Vec<bool>,
    pub sinks: Vec<f32>,
    pub temperature: Vec<f32>,
    pub cu_seqlens_q: Vec<u32>,
    pub cu_seqlens_k: Vec<u32>,
    pub prefix_len: usize,
    pub chunk: usize,
    /// The soft-capping bound.
    pub softcap: f32,
}

impl Case {
    /// Plain softmax attention of `shape` on `path`: BHSD, not causal, no window or modifier,
    /// default scale, unit-variance inputs drawn from `seed`. Tests change fields from here.
    pub fn softmax(shape: Shape, path: Path, seed: u64) -> Case {
        Case {
            shape,
            layout: Layout::Bhsd,
            causal: None,
            window: None,
            scale: None,
            variant: Variant::Softmax,
            path,
            input_std: 1.0,
            mods: Mods::default(),
            seed,
        }
    }

    /// Draws the case's modifier data, each modifier's in [`Modifier::ALL`]'s order.
    pub fn data(&self) -> ModData {
        self.mods.draw(&self.shape, self.seed)
    }

    /// The options the case calls the engine with.
    pub fn options<'a>(&self, data: &'a ModData) -> AttentionOptions<'a> {
        let mut opts = AttentionOptions {
            causal: self.causal,
            window: self.window,
            scale: self.scale,
            variant: self.variant,
            ..AttentionOptions::default()
        };
        self.mods.apply(&self.shape, data, &mut opts);
        opts
    }
}

/// The test data of one modifier: what [`Case::data`] draws for it. With [`apply`], the one
/// place the harness knows a modifier (the compiler points here when one is added).
fn draw(modifier: Modifier, s: &Shape, form: BiasForm, rng: &mut impl Rng, data: &mut ModData) {
    match modifier {
        Modifier::Softcap => data.softcap = SOFTCAP,
        Modifier::Alibi => data.alibi_slopes = wflash::alibi_slopes(s.q_heads),
        Modifier::Bias => {
            let batch = if form.per_batch { s.batch } else { 1 };
            let heads = if form.per_head { s.q_heads } else { 1 };
            let values: Vec<f32> = (0..batch * heads * s.q_len * s.kv_len)
                .map(|i| {
                    if i < s.kv_len || rng.random_bool(0.1) {
                        f32::NEG_INFINITY
                    } else {
                        rng.sample::<f32, _>(StandardNormal)
                    }
                })
                .collect();
            if form.f16 {
                data.bias_f16 = values.iter().map(|&x| half::f16::from_f32(x)).collect();
            } else {
                data.bias_f32 = values;
            }
        }
        Modifier::KeyMask => {
            for b in 0..s.batch {
                let lead = rng.random_range(0..=s.kv_len / 3);
                let trail = rng.random_range(0..=s.kv_len / 3);
                let no_keys = b == 1;
                data.key_mask.extend((0..s.kv_len).map(|j| {
                    !no_keys && j >= lead && j + trail < s.kv_len && rng.random_bool(0.8)
                }));
            }
        }
        Modifier::Sinks => {
            data.sinks = (0..s.q_heads)
                .map(|_| 2.0 * rng.sample::<f32, _>(StandardNormal))
                .collect();
        }
        Modifier::Temperature => {
            data.temperature = (0..s.batch * s.q_heads * s.q_len)
                .map(|_| rng.random_range(0.5..2.0))
                .collect();
        }
        Modifier::Varlen => {
            let mut cuts = |total: usize| {
                let mut cu = vec![
                    0,
                    rng.random_range(0..=total),
                    rng.random_range(0..=total),
                    total,
                ];
                cu.sort_unstable();
                cu.into_iter().map(|x| x as u32).collect::<Vec<u32>>()
            };
            data.cu_seqlens_q = cuts(s.q_len);
            data.cu_seqlens_k = cuts(s.kv_len);
        }
        // Up to the whole sequence (everything visible), often inside it.
        Modifier::PrefixLm => data.prefix_len = rng.random_range(0..=s.kv_len),
        // Chunks from one key to half the keys, so that rows see one chunk or straddle tiles.
        Modifier::ChunkedLocal => data.chunk = rng.random_range(1..=s.kv_len / 2 + 1),
    }
}

/// Sets `modifier`'s option from its data (the harness's draw, or the bench's).
fn apply<'a>(
    modifier: Modifier,
    s: &Shape,
    form: BiasForm,
    data: &'a ModData,
    opts: &mut AttentionOptions<'a>,
) {
    match modifier {
        Modifier::Softcap => opts.softcap = Some(data.softcap),
        Modifier::Alibi => opts.alibi_slopes = Some(&data.alibi_slopes),
        Modifier::Bias => {
            opts.bias = Some(Bias {
                values: if form.f16 {
                    BiasValues::F16(&data.bias_f16)
                } else {
                    BiasValues::F32(&data.bias_f32)
                },
                batch: if form.per_batch { s.batch } else { 1 },
                heads: if form.per_head { s.q_heads } else { 1 },
            });
        }
        Modifier::KeyMask => opts.key_mask = Some(&data.key_mask),
        Modifier::Sinks => opts.sinks = Some(&data.sinks),
        Modifier::Temperature => opts.temperature = Some(&data.temperature),
        Modifier::Varlen => {
            opts.varlen = Some(Varlen {
                cu_seqlens_q: &data.cu_seqlens_q,
                cu_seqlens_k: &data.cu_seqlens_k,
            });
        }
        Modifier::PrefixLm => opts.prefix_len = Some(data.prefix_len),
        Modifier::ChunkedLocal => opts.chunk = Some(data.chunk),
    }
}

impl Case {
    /// What the case computes, spelled the same way as long as the case is the same: the key
    /// of the output hashes (`record_output_hash`) that prove a refactor bitwise neutral.
    pub fn key(&self) -> String {
        let s = &self.shape;
        let b = self.mods.bias_form;
        let mods: Vec<String> = (self.mods.on.iter())
            .map(|m| match m {
                Modifier::Softcap => format!("softcap={SOFTCAP}"),
                Modifier::Bias => format!("bias({},{},{})", b.per_batch, b.per_head, b.f16),
                m => m.name().to_string(),
            })
            .collect();
        format!(
            "seed={} {:?} {:?} b{} h{}/{} n{}x{} d{} dv{} causal={:?} window={:?} scale={:?} {:?} std={} [{}]",
            self.seed,
            self.path,
            self.layout,
            s.batch,
            s.q_heads,
            s.kv_heads,
            s.q_len,
            s.kv_len,
            s.head_dim,
            s.value_dim,
            self.causal,
            self.window,
            self.scale,
            self.variant,
            self.input_std,
            mods.join(" ")
        )
    }
}

/// With `WFLASH_OUTPUT_HASHES=DIR` set, appends `key name=hash ...` (FNV-1a of each named
/// output's f32 bits) to `DIR/hashes.txt`: run the conformance suites before and after a
/// behaviour-preserving change and compare the sorted files (one write per line, so
/// concurrent tests do not interleave).
pub fn record_output_hash(key: &str, outputs: &[(&str, &[f32])]) {
    use std::io::Write;
    let Ok(dir) = std::env::var("WFLASH_OUTPUT_HASHES") else {
        return;
    };
    let mut line = key.to_string();
    for (name, values) in outputs {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for x in *values {
            for byte in x.to_bits().to_le_bytes() {
                hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        line.push_str(&format!(" {name}={hash:016x}"));
    }
    line.push('\n');
    let _ = std::fs::create_dir_all(&dir);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(std::path::Path::new(&dir).join("hashes.txt"));
    if let Ok(mut file) = file {
        let _ = file.write_all(line.as_bytes());
    }
}

/// The `wflash-ref` problem that an engine call with these arguments computes: the scale
/// exactly as the engine resolves it (in f32; invalid gives NaN), every modifier's data.
pub fn reference_problem(shape: &Shape, layout: Layout, opts: &AttentionOptions) -> Problem {
    let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    let modifiers = wflash_ref::Modifiers {
        softcap: opts.softcap.map(f64::from),
        alibi_slopes: opts.alibi_slopes.map(wide),
        bias: opts.bias.map(|b| wflash_ref::Bias {
            values: match b.values {
                BiasValues::F32(v) => wide(v),
                BiasValues::F16(v) => v.iter().map(|x| f64::from(x.to_f32())).collect(),
                BiasValues::Resident(_) => {
                    panic!("the reference reads a bias from the host: describe it with its values")
                }
            },
            batch: b.batch,
            heads: b.heads,
        }),
        key_mask: opts.key_mask.map(<[bool]>::to_vec),
        sinks: opts.sinks.map(wide),
        temperature: opts.temperature.map(wide),
        prefix_len: opts.prefix_len,
        chunk: opts.chunk,
    };
    let widen = |cu: &[u32]| cu.iter().map(|&x| x as usize).collect();
    Problem {
        batch: shape.batch,
        q_heads: shape.q_heads,
        kv_heads: shape.kv_heads,
        q_len: shape.q_len,
        kv_len: shape.kv_len,
        head_dim: shape.head_dim,
        value_dim: shape.value_dim,
        layout: match layout {
            Layout::Bhsd => wflash_ref::Layout::Bhsd,
            Layout::Bshd => wflash_ref::Layout::Bshd,
        },
        scale: f64::from(opts.resolved_scale(shape).unwrap_or(f32::NAN)),
        causal: opts.causal.map(|c| match c {
            Causal::BottomRight => CausalAlign::BottomRight,
            Causal::TopLeft => CausalAlign::TopLeft,
        }),
        window: opts.window.map(|w| wflash_ref::Window {
            left: w.left,
            right: w.right,
        }),
        variant: match opts.variant {
            Variant::Sigmoid { bias } => wflash_ref::Variant::Sigmoid {
                bias: bias.map(f64::from),
            },
            _ => wflash_ref::Variant::Softmax,
        },
        modifiers,
        varlen: opts.varlen.map(|v| wflash_ref::Varlen {
            cu_seqlens_q: widen(v.cu_seqlens_q),
            cu_seqlens_k: widen(v.cu_seqlens_k),
        }),
    }
}

/// `a()` and `b()`, side by side on two threads where there are threads (the f64 truth and
/// the naive baseline are the slow part of a case on a 2-core CI machine); one after the
/// other in a browser.
pub fn side_by_side<A: Send, B>(a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B) -> (A, B) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::thread::scope(|scope| {
            let a = scope.spawn(a);
            let b = b();
            (a.join().expect("reference thread"), b)
        })
    }
    #[cfg(target_arch = "wasm32")]
    {
        (a(), b())
    }
}

/// Random normals of the element type, and the exact values they hold as f32.
pub fn random<T: Element>(rng: &mut impl Rng, n: usize, std: f32) -> (Vec<T>, Vec<f32>) {
    let values: Vec<T> = (0..n)
        .map(|_| T::from_f32(rng.sample::<f32, _>(StandardNormal) * std))
        .collect();
    let exact = values.iter().map(|x| x.to_f32()).collect();
    (values, exact)
}

#[cfg(not(target_arch = "wasm32"))]
/// Runs a case on the GPU and judges it. `Ok(None)` when no GPU is allowed and none exists.
pub fn run_case(case: &Case) -> Result<Option<Verdict>, String> {
    run_case_with(case, None)
}

#[cfg(not(target_arch = "wasm32"))]
/// [`run_case`] on the shared engine running kernel `family`.
pub fn run_case_with(case: &Case, family: Option<Family>) -> Result<Option<Verdict>, String> {
    let Some(engine) = engine_with(case.path, family) else {
        return Ok(None);
    };
    run_case_on(engine, case).map(Some)
}

/// Runs a case on a given engine (e.g. one with lowered limits) and judges it.
#[cfg(not(target_arch = "wasm32"))]
pub fn run_case_on(engine: &Engine, case: &Case) -> Result<Verdict, String> {
    pollster::block_on(run_case_on_async(engine, case))
}

/// [`run_case_on`], awaited (a browser cannot block).
pub async fn run_case_on_async(engine: &Engine, case: &Case) -> Result<Verdict, String> {
    match case.path.dtype() {
        DType::F32 => judge_case::<f32>(engine, case).await,
        DType::F16 => judge_case::<half::f16>(engine, case).await,
        DType::Bf16 => judge_case::<half::bf16>(engine, case).await,
    }
}

async fn judge_case<T: Element>(engine: &Engine, case: &Case) -> Result<Verdict, String> {
    let data = case.data();
    let opts = case.options(&data);
    let p = reference_problem(&case.shape, case.layout, &opts);
    let mut rng = rand::rngs::StdRng::seed_from_u64(case.seed);
    let (q, q32) = random::<T>(&mut rng, p.q_elems(), case.input_std);
    let (k, k32) = random::<T>(&mut rng, p.k_elems(), case.input_std);
    let (v, v32) = random::<T>(&mut rng, p.v_elems(), 1.0);
    let gpu = engine
        .attention(&case.shape, case.layout, &opts, &q, &k, &v)
        .await
        .map_err(|e| format!("{case:?}: engine error {e}"))?;
    record_output_hash(
        &format!("{} {}", engine.family().name(), case.key()),
        &[
            (
                "O",
                &gpu.output.iter().map(|x| x.to_f32()).collect::<Vec<_>>(),
            ),
            ("LSE", gpu.lse.as_deref().unwrap_or(&[])),
        ],
    );

    let (truth, naive) = side_by_side(
        || {
            let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
            wflash_ref::forward(&p, &wide(&q32), &wide(&k32), &wide(&v32))
        },
        || {
            let store = |x: f32| T::from_f32(x).to_f32();
            wflash_ref::naive::forward_f32(&p, &q32, &k32, &v32, store)
        },
    );

    let gpu_lse = match (case.variant, gpu.lse) {
        (Variant::Softmax, Some(lse)) => lse,
        (Variant::Softmax, None) => return Err(format!("{case:?}: softmax returned no LSE")),
        (_, Some(_)) => return Err(format!("{case:?}: sigmoid returned an LSE")),
        (_, None) => Vec::new(),
    };
    let wide = |x: &[f32]| x.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    judge(
        case,
        vec![
            Output::forward(
                "O",
                gpu.output.iter().map(|x| f64::from(x.to_f32())).collect(),
                &truth.output,
                &naive.output,
            ),
            // The LSE is f32 in every path: judged against an f32 naive LSE, its slack scaled
            // to its magnitude.
            Output::forward("LSE", wide(&gpu_lse), &truth.lse, &naive.lse).slack_scaled_to_truth(),
        ],
    )
}

/// Asserts that the takes between two readings of one pool class (`Engine::pool_stats`,
/// `Engine::tensor_cache_stats`) reused kept resources: at least `reuses` hits and no new
/// resource.
pub fn assert_reused(before: wflash::PoolStats, after: wflash::PoolStats, reuses: u64) {
    assert!(
        after.hits >= before.hits + reuses,
        "repeated calls were not served from the pool: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.misses, before.misses,
        "repeated calls created new resources: {before:?} -> {after:?}"
    );
}

//! The engine: one wgpu device and queue, what they can do, and the compiled pipelines.

mod io;
mod pipelines;
mod tiles;
pub mod tuning;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::gpu::gate::DeviceGate;
use crate::gpu::memory::{Charge, Ledger};
use crate::gpu::pool::Class;
use crate::gpu::scopes::ScopeAnswers;
use crate::kernels::{
    Family, KernelId, STORAGE_BUFFERS_PER_KERNEL, Storage, TEXTURES_PER_KERNEL, TileConfig,
};
use crate::{DType, Error, Result};
use pipelines::{BuildHook, PipelineSlot};
use tuning::TuningFile;

/// How f16 tensors are read and written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum F16Path {
    /// Native `f16` where the adapter has `SHADER_F16`, else unpacked from u32 words.
    #[default]
    Auto,
    /// Always unpack from u32 words, as on adapters without `SHADER_F16` (e.g. SwiftShader).
    Packed,
    /// Native `f16` only; f16 calls fail with [`Error::DTypeUnsupported`] where the adapter lacks it.
    RequireNative,
}

/// How an engine picks and configures its device.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Backends to consider; `None` reads `WGPU_BACKEND` (e.g. `vulkan`, `metal`, `dx12`, `gl`),
    /// else the primary backends first and GL where they have no adapter (see [`Engine::new`]).
    pub backends: Option<wgpu::Backends>,
    /// Substring of the adapter name; `None` reads `WGPU_ADAPTER_NAME`, else the default adapter.
    pub adapter_name: Option<String>,
    /// Power preference for the default adapter; `None` reads `WGPU_POWER_PREF`.
    pub power_preference: Option<wgpu::PowerPreference>,
    /// Which f16 path to use (the switch that tests use to cover both paths on one adapter).
    pub f16_path: F16Path,
    /// Ask for subgroup operations where the adapter has them (reported in [`EngineInfo`]).
    pub use_subgroups: bool,
    /// Fill output buffers with NaN before each dispatch, so an element a kernel forgets to write
    /// shows up. Costs a buffer fill; the conformance tests turn it on.
    pub poison_outputs: bool,
    /// The longest a readback may wait for the GPU before failing with [`Error::ReadbackTimeout`].
    /// The GPU work goes on; a later read of the same tensor waits for it again. (wgpu's GL
    /// backend runs each submission to completion inside the submit, so there a readback has
    /// nothing left to wait for and this never fires.)
    pub readback_timeout: Duration,
    /// Which forward kernel to run; `None` picks by adapter: [`Family::Unrolled`] on native CPU
    /// drivers (llvmpipe, lavapipe), [`Family::Tiled`] on GPUs and in browsers (SwiftShader
    /// included: see [`Engine::family`]). Tests set it to cover both.
    pub family: Option<Family>,
    /// The most bytes of scratch textures and buffers the engine keeps between calls for reuse
    /// (packed K/V, linear attention's chunk states); least recently used first out. 0 keeps
    /// none. Linear attention runs a long call in groups of heads whose scratch fits this, so
    /// a smaller pool also means less scratch per call (and more, smaller groups).
    pub scratch_pool_bytes: u64,
    /// The most bytes of dropped tensors' buffers the engine keeps to back later tensors of
    /// the same size (uploads, outputs): a training step's gradients, a decode step's outputs
    /// reuse the last step's buffers instead of new ones the driver allocates and zero-fills.
    /// Least recently dropped first out; 0 keeps none. Like the scratch pool it counts against
    /// [`EngineOptions::memory_budget_bytes`] and is let go of before a charge past it fails.
    /// See [`Engine::tensor_cache_stats`] and [`Engine::release_cached`].
    pub tensor_cache_bytes: u64,
    /// Where measured tile choices come from (see [`crate::tuning`]).
    pub tuning: TuningSource,
    /// The most bytes of device memory the engine may hold at once: tensors it creates
    /// (uploads, outputs), readback staging, the scratch pool and the tensor cache (which count
    /// within it). A call or upload that would pass it fails with [`Error::MemoryBudget`] before
    /// anything is created or dispatched, after the scratch pool and the tensor cache have given
    /// back what they keep. `None`: no limit but the driver's, whose out-of-memory errors come
    /// back as [`Error::OutOfMemory`]. See [`Engine::memory_in_use`].
    pub memory_budget_bytes: Option<u64>,
}

/// Where an engine reads its tuned tiles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TuningSource {
    /// [`tuning::default_tuning_path`]: `$WFLASH_TUNING`, else the user's config folder.
    #[default]
    Default,
    /// This file.
    File(std::path::PathBuf),
    /// None: the planner's defaults only.
    Off,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            backends: None,
            adapter_name: None,
            power_preference: None,
            f16_path: F16Path::Auto,
            use_subgroups: true,
            poison_outputs: false,
            readback_timeout: Duration::from_secs(120),
            family: None,
            scratch_pool_bytes: 256 << 20,
            tensor_cache_bytes: 1 << 30,
            tuning: TuningSource::Default,
            memory_budget_bytes: None,
        }
    }
}

/// What the engine's adapter is and can do.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    pub adapter_name: String,
    /// The graphics API the engine runs on (Vulkan, Metal, DX12, GL, WebGPU); see
    /// [`Engine::new`] for how it is chosen.
    pub backend: wgpu::Backend,
    pub driver: String,
    pub driver_info: String,
    /// Discrete GPU, integrated GPU, CPU (software rasteriser), ...
    pub device_type: wgpu::DeviceType,
    /// Native f16 storage is enabled on the device and used for f16 tensors.
    pub shader_f16: bool,
    /// Subgroup operations are enabled on the device.
    pub subgroups: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    /// GPU timestamp queries are enabled (the bench times with them when true).
    pub timestamp_queries: bool,
    /// The device's limits.
    pub limits: wgpu::Limits,
}

impl std::fmt::Display for EngineInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (backend {:?}, device {:?}, driver {} {}; shader-f16 {}, subgroups {} [{}..{}], timestamps {}, workgroup memory {} B)",
            self.adapter_name,
            self.backend,
            self.device_type,
            self.driver,
            self.driver_info,
            yes_no(self.shader_f16),
            yes_no(self.subgroups),
            self.subgroup_min_size,
            self.subgroup_max_size,
            yes_no(self.timestamp_queries),
            self.limits.max_compute_workgroup_storage_size
        )
    }
}

impl EngineInfo {
    /// The most bytes a buffer bound for storage may hold: the storage-binding limit, or the
    /// buffer-size limit where that is lower.
    pub(crate) fn max_binding_bytes(&self) -> u64 {
        (self.limits.max_storage_buffer_binding_size).min(self.limits.max_buffer_size)
    }

    /// `TooLarge` naming the storage-binding limit when `bytes` do not fit one binding.
    pub(crate) fn within_binding_limit(&self, bytes: u64, hint: &'static str) -> Result<()> {
        let max = self.max_binding_bytes();
        if bytes > max {
            return Err(Error::TooLarge {
                limit: "max_storage_buffer_binding_size",
                needed: bytes,
                max,
                hint,
            });
        }
        Ok(())
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// A GPU attention engine. Cheap to clone; clones share one device, queue and pipeline cache,
/// so many threads or tasks can use it at once.
#[derive(Clone, Debug)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) info: EngineInfo,
    pub(crate) options: EngineOptions,
    /// One slot per pipeline: the map's lock is held only to find or add a slot, and a build
    /// holds only its own slot's, so a caller whose pipelines are cached never waits behind
    /// another caller's compile (10-25 s on llvmpipe), and a key is compiled once.
    pipelines: Mutex<HashMap<KernelId, PipelineSlot>>,
    /// Called on the building thread before each pipeline build (see `on_pipeline_build`).
    build_hook: RwLock<Option<BuildHook>>,
    /// Tiles chosen by measurement (tuning file, or [`Engine::set_tile`]) per family and dims.
    tuned: RwLock<HashMap<(Family, u32, u32), TileConfig>>,
    pub(crate) lost: Arc<AtomicBool>,
    pub(crate) pool: Arc<crate::gpu::pool::ScratchPool>,
    pub(crate) ledger: Arc<Ledger>,
    /// Serialises device work where the backend needs it (GL; see `gpu/gate.rs`).
    pub(crate) gate: DeviceGate,
    /// Error-scope answers not yet read (a browser's; see `gpu/scopes.rs`).
    pub(crate) scopes: ScopeAnswers,
}

impl Engine {
    /// Opens the adapter chosen by `options` (honouring `WGPU_BACKEND` and `WGPU_ADAPTER_NAME`).
    ///
    /// Without a backend chosen ([`EngineOptions::backends`] or `WGPU_BACKEND`), the primary
    /// backends (Vulkan, Metal, DX12, WebGPU) come first and GL only where none of them has an
    /// adapter: a Linux machine with a Vulkan driver (a GPU's, or Mesa's lavapipe) gets
    /// Vulkan, one without gets Mesa's GL. [`EngineInfo::backend`] says which it is.
    pub async fn new(options: EngineOptions) -> Result<Engine> {
        let tiers = match options.backends.or_else(wgpu::Backends::from_env) {
            Some(chosen) => vec![chosen],
            None => vec![wgpu::Backends::PRIMARY, wgpu::Backends::SECONDARY],
        };
        let mut adapter = Err(Error::NoAdapter("no backends".into()));
        let mut storage_textures_read = true;
        for backends in tiers {
            let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
            desc.backends = backends;
            let instance = wgpu::Instance::new(desc);
            adapter = select_adapter(&instance, backends, &options).await;
            if adapter.is_ok() {
                storage_textures_read = instance
                    .wgsl_language_features()
                    .contains(wgpu::WgslLanguageFeatures::ReadOnlyAndReadWriteStorageTextures);
                break;
            }
        }
        let adapter = adapter?;
        // A browser's WGSL may lack read-only storage textures, through which the kernels read
        // packed K/V, bias and masks (natively naga always has them).
        let info = adapter.get_info();
        if info.backend == wgpu::Backend::BrowserWebGpu && !storage_textures_read {
            return Err(Error::BackendUnsupported {
                backend: info.backend,
                adapter: info.name,
                reason: "its WGSL lacks read-only storage textures \
                         (readonly_and_readwrite_storage_textures), which the kernels read \
                         packed K/V, bias and masks through"
                    .into(),
            });
        }

        let adapter_features = adapter.features();
        let mut features = wgpu::Features::empty();
        // Timestamps inside encoders let a caller (the bench) bracket wflash's submissions.
        for wanted in [
            wgpu::Features::SHADER_F16,
            wgpu::Features::TIMESTAMP_QUERY,
            wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS,
        ] {
            if adapter_features.contains(wanted) {
                features |= wanted;
            }
        }
        if options.use_subgroups && adapter_features.contains(wgpu::Features::SUBGROUP) {
            features |= wgpu::Features::SUBGROUP;
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wflash"),
                required_features: features,
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await?;
        Self::from_device(device, queue, options)
    }

    #[cfg(not(target_arch = "wasm32"))]
    /// Blocking twin of [`Engine::new`].
    pub fn new_blocking(options: EngineOptions) -> Result<Engine> {
        pollster::block_on(Self::new(options))
    }

    /// Wraps an application's own device and queue, so wflash shares its GPU memory and
    /// command stream. Features the device was created without are simply not used.
    pub fn from_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        options: EngineOptions,
    ) -> Result<Engine> {
        let adapter = device.adapter_info();
        let features = device.features();
        let info = EngineInfo {
            adapter_name: adapter.name.clone(),
            backend: adapter.backend,
            driver: adapter.driver.clone(),
            driver_info: adapter.driver_info.clone(),
            device_type: adapter.device_type,
            shader_f16: features.contains(wgpu::Features::SHADER_F16)
                && options.f16_path != F16Path::Packed,
            subgroups: features.contains(wgpu::Features::SUBGROUP) && options.use_subgroups,
            subgroup_min_size: adapter.subgroup_min_size,
            subgroup_max_size: adapter.subgroup_max_size,
            timestamp_queries: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            limits: device.limits(),
        };
        check_capable(&info)?;
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        device
            .set_device_lost_callback(move |_reason, _message| flag.store(true, Ordering::SeqCst));
        // Errors are collected with error scopes around every operation; anything that escapes
        // them must not panic the application.
        device.on_uncaptured_error(Arc::new(|_err: wgpu::Error| {}));

        let tuning_path = match &options.tuning {
            TuningSource::Default => tuning::default_tuning_path(),
            TuningSource::File(path) => Some(path.clone()),
            TuningSource::Off => None,
        };
        let tuning = match &tuning_path {
            Some(path) => TuningFile::load(path)?,
            None => TuningFile::default(),
        };
        let ledger = Ledger::new(options.memory_budget_bytes);
        let gate = DeviceGate::for_device(&device, info.backend);
        let engine = Engine {
            inner: Arc::new(Inner {
                device,
                queue,
                pool: crate::gpu::pool::ScratchPool::new(
                    options.scratch_pool_bytes,
                    options.tensor_cache_bytes,
                    ledger.clone(),
                    gate.clone(),
                ),
                gate,
                ledger,
                options,
                pipelines: Mutex::new(HashMap::new()),
                build_hook: RwLock::new(None),
                tuned: RwLock::new(HashMap::new()),
                lost,
                info,
                scopes: ScopeAnswers::default(),
            }),
        };
        // Entries this adapter cannot run (a file from another version or hand-edited) are
        // skipped: the defaults stay. `tuned_tiles` shows what took effect.
        let info = &engine.inner.info;
        for tuned in tuning.tiles_for(&info.adapter_name, &info.driver, &info.driver_info) {
            let _ = engine.set_tile(
                tuned.family,
                tuned.head_dim,
                tuned.value_dim,
                Some(tuned.tile()),
            );
        }
        Ok(engine)
    }
}

impl Engine {
    /// The adapter and what it can do.
    pub fn info(&self) -> &EngineInfo {
        &self.inner.info
    }

    /// The engine's device, for applications and tools that dispatch their own work beside
    /// wflash (on other threads while wflash calls run, through [`Engine::with_device`]).
    pub fn device(&self) -> &wgpu::Device {
        &self.inner.device
    }

    /// The engine's queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.inner.queue
    }

    /// Runs `f` with the device and queue while no other thread of this engine (or of another
    /// engine on the same device) is inside wgpu. On GL, where wgpu's context lock panics
    /// after a few seconds of waiting, an application's own device work on other threads
    /// belongs in here while wflash calls run; elsewhere it costs nothing.
    pub fn with_device<R>(&self, f: impl FnOnce(&wgpu::Device, &wgpu::Queue) -> R) -> R {
        let _held = self.inner.gate.hold();
        f(&self.inner.device, &self.inner.queue)
    }

    /// The options the engine was created with.
    pub fn options(&self) -> &EngineOptions {
        &self.inner.options
    }

    /// The scratch pool's bytes held, cap, and takes served from it or not.
    pub fn pool_stats(&self) -> crate::PoolStats {
        self.inner.pool.stats(Class::Scratch)
    }

    /// The tensor cache's bytes held (buffers of dropped tensors kept for reuse), cap, and
    /// tensors it backed or not.
    pub fn tensor_cache_stats(&self) -> crate::PoolStats {
        self.inner.pool.stats(Class::Tensor)
    }

    /// Bytes kept for reuse, in the scratch pool and the tensor cache: what
    /// [`Engine::memory_in_use`] counts beyond live tensors and work in progress.
    pub fn cached_bytes(&self) -> u64 {
        self.pool_stats().bytes + self.tensor_cache_stats().bytes
    }

    /// Lets go of every resource kept for reuse (the scratch pool's and the tensor cache's), as
    /// PyTorch's `torch.cuda.empty_cache` does: for an application about to need the memory
    /// elsewhere. Live tensors are untouched.
    pub fn release_cached(&self) {
        self.inner.pool.clear();
    }

    /// Bytes of device memory the engine holds now (live tensors it created, staging, the
    /// scratch pool and the tensor cache), as counted against
    /// [`EngineOptions::memory_budget_bytes`].
    pub fn memory_in_use(&self) -> u64 {
        self.inner.ledger.in_use()
    }

    /// Charges `bytes` to the memory ledger, emptying the scratch pool and the tensor cache first
    /// if the budget needs it.
    pub(crate) fn charge(&self, bytes: u64) -> Result<Charge> {
        self.inner.pool.charge(bytes)
    }

    /// The storage path for `dtype` on this engine, or why there is none.
    pub fn storage_for(&self, dtype: DType) -> Result<Storage> {
        Ok(match dtype {
            DType::F32 => Storage::F32,
            DType::Bf16 => Storage::Bf16Packed,
            DType::F16 => match (self.inner.options.f16_path, self.inner.info.shader_f16) {
                (F16Path::Packed, _) | (F16Path::Auto, false) => Storage::F16Packed,
                (_, true) => Storage::F16Native,
                (F16Path::RequireNative, false) => {
                    return Err(Error::DTypeUnsupported {
                        dtype,
                        reason: "EngineOptions::f16_path is RequireNative but the device has no SHADER_F16",
                    });
                }
            },
        })
    }

    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.inner.lost.load(Ordering::SeqCst) {
            return Err(Error::DeviceLost(
                "the device was lost earlier; create a new Engine".into(),
            ));
        }
        Ok(())
    }

    /// Whether the adapter is a browser's software one (Chromium's SwiftShader under WebGPU),
    /// whose shader compiler takes some kernels shaped for native CPU drivers down with it.
    pub(crate) fn browser_cpu_adapter(&self) -> bool {
        self.inner.info.device_type == wgpu::DeviceType::Cpu
            && self.inner.info.backend == wgpu::Backend::BrowserWebGpu
    }

    /// The forward kernel family this engine runs: the option, else by adapter: unrolled on a
    /// native CPU driver (llvmpipe, lavapipe), tiled elsewhere. A browser's software adapter
    /// (Chromium's SwiftShader) gets the tiled family too: compiling an unrolled kernel there
    /// took two minutes and then crashed the browser's GPU process, while the tiled kernels
    /// build in about a second.
    pub fn family(&self) -> Family {
        let native_cpu =
            self.inner.info.device_type == wgpu::DeviceType::Cpu && !self.browser_cpu_adapter();
        (self.inner.options.family).unwrap_or(if native_cpu {
            Family::Unrolled
        } else {
            Family::Tiled
        })
    }
}

/// Refuses a device whose backend cannot run the kernels, before any of them is built.
fn check_capable(info: &EngineInfo) -> Result<()> {
    let limits = &info.limits;
    let reason = if limits.max_compute_workgroups_per_dimension == 0
        || limits.max_compute_invocations_per_workgroup == 0
    {
        "it has no compute shaders".to_string()
    } else if limits.max_storage_buffers_per_shader_stage < STORAGE_BUFFERS_PER_KERNEL {
        format!(
            "it allows {} storage buffers per shader stage; the kernels bind up to {}",
            limits.max_storage_buffers_per_shader_stage, STORAGE_BUFFERS_PER_KERNEL
        )
    } else if limits.max_storage_textures_per_shader_stage < TEXTURES_PER_KERNEL {
        format!(
            "it allows {} storage textures per shader stage; the kernels bind up to {}",
            limits.max_storage_textures_per_shader_stage, TEXTURES_PER_KERNEL
        )
    } else {
        return Ok(());
    };
    Err(Error::BackendUnsupported {
        backend: info.backend,
        adapter: info.adapter_name.clone(),
        reason,
    })
}

async fn select_adapter(
    instance: &wgpu::Instance,
    backends: wgpu::Backends,
    options: &EngineOptions,
) -> Result<wgpu::Adapter> {
    let wanted_name = options
        .adapter_name
        .clone()
        .or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok())
        .filter(|name| !name.is_empty());
    if let Some(name) = wanted_name {
        let adapters = instance.enumerate_adapters(backends).await;
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        return adapters
            .into_iter()
            .find(|a| {
                a.get_info()
                    .name
                    .to_lowercase()
                    .contains(&name.to_lowercase())
            })
            .ok_or_else(|| Error::NoAdapter(format!("none named like `{name}` among {names:?}")));
    }
    let power_preference = options
        .power_preference
        .or_else(wgpu::PowerPreference::from_env)
        .unwrap_or_default();
    instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::NoAdapter(format!("{e}; backends {backends:?}")))
}

//! The engine: one wgpu device and queue, what they can do, and the compiled pipelines.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::kernel::{self, Family, KernelKey, Storage, TileConfig};
use crate::memory::{Charge, Ledger};
use crate::tuning::TuningFile;
use crate::{DType, Error, Result};

/// Query rows per workgroup of the tiled kernel by default (one invocation owns one row), and
/// the other sizes a tuning may pick.
const TILED_BLOCK_M: u32 = 64;
const TILED_BLOCK_MS: [u32; 3] = [32, 64, 128];
/// The largest key tile of the tiled kernel by default; smaller when workgroup memory is short.
const TILED_MAX_BLOCK_N: u32 = 32;
const TILED_BLOCK_NS: [u32; 5] = [4, 8, 16, 32, 64];

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
    /// Backends to consider; `None` reads `WGPU_BACKEND` (e.g. `vulkan`, `metal`, `dx12`), else all.
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
    /// The GPU work goes on; a later read of the same tensor waits for it again.
    pub readback_timeout: Duration,
    /// Which forward kernel to run; `None` picks by adapter: [`Family::Unrolled`] on CPU
    /// adapters (llvmpipe, SwiftShader), [`Family::Tiled`] on GPUs. Tests set it to cover both.
    pub family: Option<Family>,
    /// The most bytes of scratch textures and buffers the engine keeps between calls for reuse
    /// (packed K/V, linear attention's chunk states); least recently used first out. 0 keeps
    /// none.
    pub scratch_pool_bytes: u64,
    /// Where measured tile choices come from (see [`crate::tuning`]).
    pub tuning: TuningSource,
    /// The most bytes of device memory the engine may hold at once: tensors it creates
    /// (uploads, outputs), readback staging and the scratch pool (which counts within it). A
    /// call or upload that would pass it fails with [`Error::MemoryBudget`] before anything is
    /// created or dispatched, after the scratch pool has given back what it keeps. `None`: no
    /// limit but the driver's, whose out-of-memory errors come back as [`Error::OutOfMemory`].
    /// See [`Engine::memory_in_use`].
    pub memory_budget_bytes: Option<u64>,
}

/// Where an engine reads its tuned tiles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TuningSource {
    /// [`crate::tuning::default_tuning_path`]: `$WFLASH_TUNING`, else the user's config folder.
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
            tuning: TuningSource::Default,
            memory_budget_bytes: None,
        }
    }
}

/// What the engine's adapter is and can do.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    pub adapter_name: String,
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
            "{} ({:?} {:?}, driver {} {}; shader-f16 {}, subgroups {} [{}..{}], timestamps {}, workgroup memory {} B)",
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
    pipelines: Mutex<HashMap<PipelineKey, PipelineSlot>>,
    /// Called on the building thread before each pipeline build (see `on_pipeline_build`).
    build_hook: RwLock<Option<BuildHook>>,
    /// Tiles chosen by measurement (tuning file, or [`Engine::set_tile`]) per family and dims.
    tuned: RwLock<HashMap<(Family, u32, u32), TileConfig>>,
    pub(crate) lost: Arc<AtomicBool>,
    pub(crate) pool: Arc<crate::pool::ScratchPool>,
    pub(crate) ledger: Arc<Ledger>,
}

impl Engine {
    /// Opens the adapter chosen by `options` (honouring `WGPU_BACKEND` and `WGPU_ADAPTER_NAME`).
    pub async fn new(options: EngineOptions) -> Result<Engine> {
        let backends = options
            .backends
            .or_else(wgpu::Backends::from_env)
            .unwrap_or(wgpu::Backends::all());
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        desc.backends = backends;
        let instance = wgpu::Instance::new(desc);
        let adapter = select_adapter(&instance, backends, &options).await?;

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
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        device
            .set_device_lost_callback(move |_reason, _message| flag.store(true, Ordering::SeqCst));
        // Errors are collected with error scopes around every operation; anything that escapes
        // them must not panic the application.
        device.on_uncaptured_error(Arc::new(|_err: wgpu::Error| {}));

        let tuning_path = match &options.tuning {
            TuningSource::Default => crate::tuning::default_tuning_path(),
            TuningSource::File(path) => Some(path.clone()),
            TuningSource::Off => None,
        };
        let tuning = match &tuning_path {
            Some(path) => TuningFile::load(path)?,
            None => TuningFile::default(),
        };
        let ledger = Ledger::new(options.memory_budget_bytes);
        let engine = Engine {
            inner: Arc::new(Inner {
                device,
                queue,
                pool: crate::pool::ScratchPool::new(options.scratch_pool_bytes, ledger.clone()),
                ledger,
                options,
                pipelines: Mutex::new(HashMap::new()),
                build_hook: RwLock::new(None),
                tuned: RwLock::new(HashMap::new()),
                lost,
                info,
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

    /// Every tile `family` can run at these dims on this adapter, the default first. These are
    /// what `cargo xtask bench --tune` times.
    pub fn tile_candidates(
        &self,
        family: Family,
        head_dim: u32,
        value_dim: u32,
    ) -> Vec<TileConfig> {
        let mut tiles = match family {
            Family::Unrolled => kernel::unrolled_tiles(head_dim, value_dim),
            Family::Tiled => {
                let mut tiles = Vec::new();
                for block_m in TILED_BLOCK_MS {
                    for block_n in TILED_BLOCK_NS {
                        tiles.push(TileConfig { block_m, block_n });
                    }
                }
                tiles
            }
        };
        tiles.retain(|&t| self.check_tile(family, head_dim, value_dim, t).is_ok());
        if let Ok(default) = self.default_tile(family, head_dim, value_dim) {
            tiles.retain(|&t| t != default);
            tiles.insert(0, default);
        }
        tiles
    }

    /// Makes `family` use `tile` at these dims (`None`: back to the default), after checking
    /// that it can run here ([`Error::InvalidTile`] otherwise). Affects later calls only.
    pub fn set_tile(
        &self,
        family: Family,
        head_dim: u32,
        value_dim: u32,
        tile: Option<TileConfig>,
    ) -> Result<()> {
        let mut tuned = self
            .inner
            .tuned
            .write()
            .map_err(|_| Error::Internal("tuned tiles poisoned".into()))?;
        match tile {
            Some(tile) => {
                self.check_tile(family, head_dim, value_dim, tile)?;
                tuned.insert((family, head_dim, value_dim), tile);
            }
            None => {
                tuned.remove(&(family, head_dim, value_dim));
            }
        }
        Ok(())
    }

    /// The tuned tiles in effect: (family, head dim, value dim, tile), sorted.
    pub fn tuned_tiles(&self) -> Vec<(Family, u32, u32, TileConfig)> {
        let mut tiles: Vec<_> = self
            .inner
            .tuned
            .read()
            .map(|t| {
                t.iter()
                    .map(|(&(f, d, dv), &tile)| (f, d, dv, tile))
                    .collect()
            })
            .unwrap_or_default();
        tiles.sort();
        tiles
    }

    /// The tile `family` runs at these dims: the tuned one, else the default.
    pub(crate) fn tile_for(
        &self,
        family: Family,
        head_dim: u32,
        value_dim: u32,
    ) -> Result<TileConfig> {
        let tuned = self
            .inner
            .tuned
            .read()
            .ok()
            .and_then(|t| t.get(&(family, head_dim, value_dim)).copied());
        match tuned {
            Some(tile) => Ok(tile),
            None => self.default_tile(family, head_dim, value_dim),
        }
    }

    /// The planner's tile from the adapter's limits: the unrolled kernel's most rows per
    /// invocation; the tiled kernel's 64 rows and the largest key tile that fits in workgroup
    /// memory.
    fn default_tile(&self, family: Family, head_dim: u32, value_dim: u32) -> Result<TileConfig> {
        if family == Family::Unrolled {
            return Ok(kernel::unrolled_tile(head_dim, value_dim));
        }
        let limits = &self.inner.info.limits;
        let block_m = TILED_BLOCK_M
            .min(limits.max_compute_invocations_per_workgroup)
            .min(limits.max_compute_workgroup_size_x);
        let tile_bytes = |block_n| kernel::workgroup_bytes(block_m, block_n, head_dim, value_dim);
        let mut block_n = TILED_MAX_BLOCK_N;
        while block_n > 1 && tile_bytes(block_n) > limits.max_compute_workgroup_storage_size {
            block_n /= 2;
        }
        if tile_bytes(block_n) > limits.max_compute_workgroup_storage_size {
            return Err(Error::TooLarge {
                limit: "max_compute_workgroup_storage_size",
                needed: u64::from(tile_bytes(1)),
                max: u64::from(limits.max_compute_workgroup_storage_size),
                hint: " (one key row of K and V does not fit)",
            });
        }
        Ok(TileConfig { block_m, block_n })
    }

    /// Whether `family` can run `tile` at these dims here.
    fn check_tile(
        &self,
        family: Family,
        head_dim: u32,
        value_dim: u32,
        tile: TileConfig,
    ) -> Result<()> {
        let invalid = |reason| Error::InvalidTile {
            family: family.name(),
            head_dim,
            value_dim,
            block_m: tile.block_m,
            block_n: tile.block_n,
            reason,
        };
        match family {
            Family::Unrolled => {
                if !kernel::unrolled_tiles(head_dim, value_dim).contains(&tile) {
                    return Err(invalid(
                        "the unrolled kernel takes 4 keys per step and 8 lanes times a power of two rows, within its register bound",
                    ));
                }
            }
            Family::Tiled => {
                let limits = &self.inner.info.limits;
                if self.inner.info.device_type == wgpu::DeviceType::Cpu {
                    // CPU drivers end an invocation's loops after 65535 iterations in all
                    // (docs/PERF.md), and the planner's key limit was measured on the default
                    // tile: fewer rows (more staging iterations each) or smaller key tiles (more
                    // tiles) could pass it.
                    let default = self.default_tile(family, head_dim, value_dim)?;
                    if tile.block_m < default.block_m || tile.block_n < default.block_n {
                        return Err(invalid(
                            "on CPU adapters the tiled kernel's tile may not be smaller than its default",
                        ));
                    }
                }
                if !TILED_BLOCK_MS.contains(&tile.block_m)
                    || !TILED_BLOCK_NS.contains(&tile.block_n)
                {
                    return Err(invalid(
                        "block_m must be 32, 64 or 128 and block_n 4, 8, 16, 32 or 64",
                    ));
                }
                if tile.block_m > limits.max_compute_invocations_per_workgroup
                    || tile.block_m > limits.max_compute_workgroup_size_x
                {
                    return Err(invalid(
                        "more invocations than the adapter allows per workgroup",
                    ));
                }
                if kernel::workgroup_bytes(tile.block_m, tile.block_n, head_dim, value_dim)
                    > limits.max_compute_workgroup_storage_size
                {
                    return Err(invalid("the K/V tiles do not fit in workgroup memory"));
                }
            }
        }
        Ok(())
    }

    /// The adapter and what it can do.
    pub fn info(&self) -> &EngineInfo {
        &self.inner.info
    }

    /// The engine's device, for applications and tools that dispatch their own work beside wflash.
    pub fn device(&self) -> &wgpu::Device {
        &self.inner.device
    }

    /// The engine's queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.inner.queue
    }

    /// The options the engine was created with.
    pub fn options(&self) -> &EngineOptions {
        &self.inner.options
    }

    /// The scratch pool's bytes held, cap, and takes served from it or not.
    pub fn pool_stats(&self) -> crate::PoolStats {
        self.inner.pool.stats()
    }

    /// Bytes of device memory the engine holds now (live tensors it created, staging, the
    /// scratch pool), as counted against [`EngineOptions::memory_budget_bytes`].
    pub fn memory_in_use(&self) -> u64 {
        self.inner.ledger.in_use()
    }

    /// Charges `bytes` to the memory ledger, emptying the scratch pool first if the budget needs it.
    pub(crate) fn charge(&self, bytes: u64) -> Result<Charge> {
        self.inner.pool.charge(bytes)
    }

    /// Number of compiled pipelines in the cache.
    pub fn cached_pipelines(&self) -> usize {
        let slots: Vec<PipelineSlot> = match self.inner.pipelines.lock() {
            Ok(map) => map.values().cloned().collect(),
            Err(_) => return 0,
        };
        // Slots whose build is under way are busy: they are not compiled yet.
        slots
            .iter()
            .filter(|slot| slot.try_lock().is_ok_and(|p| p.is_some()))
            .count()
    }

    /// Calls `hook` with each pipeline's label on the thread that builds it, before the build
    /// (replacing any earlier hook). For tools that show compile progress, and for tests that
    /// hold a build open.
    #[doc(hidden)]
    pub fn on_pipeline_build(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        if let Ok(mut slot) = self.inner.build_hook.write() {
            *slot = Some(BuildHook(Arc::new(hook)));
        }
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

    /// The forward kernel family this engine runs: the option, else by adapter type.
    pub fn family(&self) -> Family {
        self.inner.options.family.unwrap_or(
            if self.inner.info.device_type == wgpu::DeviceType::Cpu {
                Family::Unrolled
            } else {
                Family::Tiled
            },
        )
    }

    /// The compiled pipeline for `key`, built on first use. Its bind group layout is derived
    /// from the shader (`get_bind_group_layout(0)`).
    pub(crate) fn pipeline(&self, key: PipelineKey) -> Result<wgpu::ComputePipeline> {
        let poisoned = || Error::Internal("pipeline cache poisoned".into());
        let slot = self
            .inner
            .pipelines
            .lock()
            .map_err(|_| poisoned())?
            .entry(key)
            .or_default()
            .clone();
        // Callers of this key wait for its one build; nobody else does.
        let mut slot = slot.lock().map_err(|_| poisoned())?;
        if let Some(pipeline) = slot.as_ref() {
            return Ok(pipeline.clone());
        }
        let pipeline = self.build_pipeline(key)?;
        *slot = Some(pipeline.clone());
        Ok(pipeline)
    }

    fn build_pipeline(&self, key: PipelineKey) -> Result<wgpu::ComputePipeline> {
        let device = &self.inner.device;
        let (label, source, entry_point, constants) = match key {
            PipelineKey::Forward(k) => (k.label(), k.source(), "flash_fwd", k.constants()),
            PipelineKey::Pack(storage) => (
                format!("pack_rows {}", storage.name()),
                kernel::pack_source(storage),
                "pack_rows",
                Vec::new(),
            ),
            PipelineKey::Convert(c) => (c.label(), c.source(), "convert", Vec::new()),
            PipelineKey::Linear(k) => (k.label(), k.source(), k.pass.entry_point(), Vec::new()),
        };
        let hook = self.inner.build_hook.read().ok().and_then(|h| h.clone());
        if let Some(BuildHook(hook)) = hook {
            hook(&label);
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let t0 = std::time::Instant::now();
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some(entry_point),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                // Every workgroup variable is written before it is read.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::Internal(format!("building `{label}`: {err}")));
        }
        if std::env::var_os("WFLASH_LOG_COMPILE").is_some() {
            eprintln!("compiled {label} in {:.2} s", t0.elapsed().as_secs_f64());
        }
        Ok(pipeline)
    }
}

/// A cached pipeline, or `None` before its first build (or after a failed one).
type PipelineSlot = Arc<Mutex<Option<wgpu::ComputePipeline>>>;

/// What `Engine::on_pipeline_build` installs.
#[derive(Clone)]
struct BuildHook(Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for BuildHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BuildHook")
    }
}

/// Everything that selects one compiled pipeline; the pipeline cache is keyed by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum PipelineKey {
    Forward(KernelKey),
    /// The K/V packing kernel of the unrolled family, per storage type.
    Pack(Storage),
    /// Q and O conversions around the unrolled family.
    Convert(kernel::Conversion),
    /// A linear-attention pass.
    Linear(kernel::LinearKey),
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

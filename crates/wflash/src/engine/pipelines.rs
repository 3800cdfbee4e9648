//! The pipeline cache: every kernel compiled once per engine, on first use, without a lock
//! that other callers wait on.

use std::sync::{Arc, Mutex};

use crate::kernels::{Kernel, KernelId};
use crate::{Engine, Error, Result};

impl Engine {
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

    /// The compiled pipeline for `key`, built on first use. Its bind group layout is derived
    /// from the shader (`get_bind_group_layout(0)`).
    pub(crate) fn pipeline(&self, key: impl Into<KernelId>) -> Result<wgpu::ComputePipeline> {
        let key = key.into();
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

    fn build_pipeline(&self, key: KernelId) -> Result<wgpu::ComputePipeline> {
        let device = &self.inner.device;
        let label = key.label();
        let (source, entry_point, constants) = (key.source(), key.entry_point(), key.constants());
        let hook = self.inner.build_hook.read().ok().and_then(|h| h.clone());
        if let Some(BuildHook(hook)) = hook {
            hook(&label);
        }
        // Taken while holding only this key's slot (no gated path waits on a slot): on GL the
        // build holds the context for seconds, and other threads must wait here, not in wgpu.
        let _held = self.inner.gate.hold();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let t0 = web_time::Instant::now();
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
        if let Some(err) = self.inner.scopes.take(scope) {
            return Err(Error::Internal(format!("building `{label}`: {err}")));
        }
        if std::env::var_os("WFLASH_LOG_COMPILE").is_some() {
            eprintln!("compiled {label} in {:.2} s", t0.elapsed().as_secs_f64());
        }
        Ok(pipeline)
    }
}

/// A cached pipeline, or `None` before its first build (or after a failed one).
pub(super) type PipelineSlot = Arc<Mutex<Option<wgpu::ComputePipeline>>>;

/// What `Engine::on_pipeline_build` installs.
#[derive(Clone)]
pub(super) struct BuildHook(pub(super) Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for BuildHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BuildHook")
    }
}

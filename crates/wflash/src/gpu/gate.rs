//! The device gate: one thread at a time in wgpu for devices whose backend cannot take more.
//!
//! wgpu's GL backend guards its one GL context with a lock that gives up after a few seconds
//! and panics ("Could not lock adapter context. This is most-likely a deadlock.", wgpu-hal
//! `gles/egl.rs`). Mesa's llvmpipe holds that context for seconds: a pipeline build (0.1-2 s
//! for the backward's kernels at head dim 256), the submit of a pipeline's first dispatch
//! (llvmpipe compiles its shader variant there), a fence wait as long as the work runs. Any
//! second thread that touched the device meanwhile (an upload, a readback, a tensor dropped)
//! panicked inside the user's process. On GL every wgpu call the engine makes, and every drop of a device resource it
//! owns, goes through this gate first: the gate waits without a time limit, so wgpu's lock is
//! never contended by wflash itself. On Vulkan, Metal and DX12 the gate is open (no lock).
//!
//! The gate is re-entrant (an operation that holds it may drop a tensor, which takes it again)
//! and is taken before any of the engine's own locks, never while holding one, except a
//! pipeline's slot, whose holder takes it to build. Engines that wrap one device (through
//! [`crate::Engine::from_device`]) share its gate.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, Weak};

use parking_lot::{ReentrantMutex, ReentrantMutexGuard};

/// The gate of one device: `None` where its backend needs none.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeviceGate(Option<Arc<ReentrantMutex<()>>>);

/// Proof of holding a [`DeviceGate`] (nothing where the gate is open).
pub(crate) type Held<'a> = Option<ReentrantMutexGuard<'a, ()>>;

impl DeviceGate {
    /// The gate of `device` on `backend`: shared by every engine on that device under GL,
    /// open elsewhere.
    pub(crate) fn for_device(device: &wgpu::Device, backend: wgpu::Backend) -> DeviceGate {
        if backend != wgpu::Backend::Gl {
            return DeviceGate(None);
        }
        // Keyed by the device's hash (wgpu hashes its handle's identity); the map keeps no
        // device alive, and entries whose gate every engine has let go are swept here.
        static GATES: Mutex<Option<HashMap<u64, Weak<ReentrantMutex<()>>>>> = Mutex::new(None);
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        device.hash(&mut hasher);
        let key = hasher.finish();
        let mut gates = GATES.lock().unwrap_or_else(|e| e.into_inner());
        let gates = gates.get_or_insert_with(HashMap::new);
        gates.retain(|_, gate| gate.strong_count() > 0);
        let gate = gates
            .get(&key)
            .and_then(Weak::upgrade)
            .unwrap_or_else(|| Arc::new(ReentrantMutex::new(())));
        gates.insert(key, Arc::downgrade(&gate));
        DeviceGate(Some(gate))
    }

    /// Waits for the gate (no time limit) and holds it until the returned value drops.
    pub(crate) fn hold(&self) -> Held<'_> {
        self.0.as_ref().map(|gate| gate.lock())
    }

    /// Whether this gate serialises (the device's backend is GL).
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn is_closed(&self) -> bool {
        self.0.is_some()
    }
}

/// A value dropped inside its device's gate: device resources that may be the last handle to
/// a GL object (buffers, staging, textures), wherever the drop happens.
#[derive(Debug)]
pub(crate) struct DropInGate<T: Default> {
    value: T,
    gate: DeviceGate,
}

impl<T: Default> DropInGate<T> {
    pub(crate) fn new(value: T, gate: &DeviceGate) -> Self {
        DropInGate {
            value,
            gate: gate.clone(),
        }
    }
}

impl<T: Default> std::ops::Deref for DropInGate<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: Default> Drop for DropInGate<T> {
    fn drop(&mut self) {
        let _held = self.gate.hold();
        drop(std::mem::take(&mut self.value));
    }
}

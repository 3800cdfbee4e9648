//! The engine's pool of device resources kept for reuse, in two classes with a cap each:
//!
//! - **scratch**: textures and buffers a call needs only while it runs (packed K/V, bias and
//!   key-mask textures, linear attention's per-chunk states), taken from here and given back
//!   when the call has been submitted, instead of being created and zero-filled by the driver on
//!   every call;
//! - **tensors**: the buffers of the engine's own [`crate::Tensor`]s (uploads, outputs), given
//!   back when a tensor's last handle drops, so a training loop's gradients and a decode loop's
//!   outputs reuse last step's buffers of the same size (PyTorch's caching allocator does this
//!   for CUDA). A fresh buffer costs the driver an allocation and a zero-fill; on CPU drivers
//!   also the page faults of first touch, which made a 64k-token linear backward's three 134 MB
//!   gradients a large part of its time (docs/PERF.md).
//!
//! Giving a resource back right after `queue.submit` is safe: wgpu orders every later use of it
//! (a later submission, or a `write_buffer` before one) after the work already submitted. A
//! reused tensor buffer holds what it held before; every kernel writes its outputs whole (the
//! poisoned-output tests check it), and a poisoning engine poisons reused buffers too.
//!
//! Each class holds at most its cap ([`crate::EngineOptions::scratch_pool_bytes`],
//! [`crate::EngineOptions::tensor_cache_bytes`]); giving back past it evicts that class's least
//! recently given back first (a resource larger than the cap is not kept). Resources count
//! against the engine's memory budget (`crate::memory`) while they exist, on loan or kept; when
//! a new one would pass the budget, the pool first lets go of all it keeps.

use std::sync::{Arc, Mutex};

use crate::Result;
use crate::gpu::gate::DeviceGate;
use crate::gpu::memory::{Charge, Ledger};

/// What a pooled resource is: a take matches it exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScratchKey {
    Texture {
        width: u32,
        height: u32,
        format: wgpu::TextureFormat,
        usage: wgpu::TextureUsages,
    },
    Buffer {
        size: u64,
        usage: wgpu::BufferUsages,
    },
}

impl ScratchKey {
    fn bytes(&self) -> u64 {
        match *self {
            ScratchKey::Texture {
                width,
                height,
                format,
                ..
            } => {
                let texel = u64::from(format.block_copy_size(None).unwrap_or(16));
                u64::from(width) * u64::from(height) * texel
            }
            ScratchKey::Buffer { size, .. } => size,
        }
    }
}

/// Which cap and counts a resource falls under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    Scratch,
    Tensor,
}

impl Class {
    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug)]
enum Resource {
    Texture(wgpu::Texture),
    Buffer(wgpu::Buffer),
}

/// A pooled resource and the ledger charge for its bytes, which lives exactly as long as it.
#[derive(Debug)]
struct Held {
    resource: Resource,
    _charge: Charge,
}

#[derive(Debug)]
struct Free {
    class: Class,
    key: ScratchKey,
    held: Held,
    given_back: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    bytes: u64,
    hits: u64,
    misses: u64,
}

#[derive(Debug, Default)]
struct State {
    free: Vec<Free>,
    counts: [Counts; 2],
    clock: u64,
}

/// A capped pool of scratch resources and tensor buffers, shared by every clone of an engine.
#[derive(Debug)]
pub(crate) struct ScratchPool {
    /// Per [`Class`].
    caps: [u64; 2],
    state: Mutex<State>,
    ledger: Arc<Ledger>,
    /// Evicted resources are dropped inside it (see `gpu/gate.rs`).
    gate: DeviceGate,
}

/// Bytes held and how takes went, for one class of the pool: what tests and the soak report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes of free resources held now (kept for reuse, not in use).
    pub bytes: u64,
    /// The most the pool may hold.
    pub cap: u64,
    /// Takes served from the pool, and takes that created a new resource.
    pub hits: u64,
    pub misses: u64,
}

impl ScratchPool {
    pub(crate) fn new(
        scratch_cap: u64,
        tensor_cap: u64,
        ledger: Arc<Ledger>,
        gate: DeviceGate,
    ) -> Arc<ScratchPool> {
        Arc::new(ScratchPool {
            caps: [scratch_cap, tensor_cap],
            state: Mutex::new(State::default()),
            ledger,
            gate,
        })
    }

    /// Lets go of every resource the pool keeps (loans out stay out).
    pub(crate) fn clear(&self) {
        let free = {
            let mut state = self.lock();
            for counts in &mut state.counts {
                counts.bytes = 0;
            }
            std::mem::take(&mut state.free)
        };
        // Dropped outside the lock (dropping wgpu resources may take wgpu's own locks), in
        // the gate.
        let _held = self.gate.hold();
        drop(free);
    }

    /// The most scratch the pool keeps: the scratch a call may plan to find here again next
    /// time.
    pub(crate) fn scratch_cap(&self) -> u64 {
        self.caps[Class::Scratch.index()]
    }

    pub(crate) fn stats(&self, class: Class) -> PoolStats {
        let counts = self.lock().counts[class.index()];
        PoolStats {
            bytes: counts.bytes,
            cap: self.caps[class.index()],
            hits: counts.hits,
            misses: counts.misses,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the free list inconsistent (every
        // mutation is a push, a remove or a counter), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, class: Class, key: ScratchKey) -> Option<Held> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let found = state
            .free
            .iter()
            .position(|f| f.class == class && f.key == key);
        let counts = &mut state.counts[class.index()];
        match found {
            Some(i) => {
                counts.bytes -= key.bytes();
                counts.hits += 1;
                Some(state.free.swap_remove(i).held)
            }
            None => {
                counts.misses += 1;
                None
            }
        }
    }

    fn give(&self, class: Class, key: ScratchKey, held: Held) {
        // The gate before the pool's lock, as everywhere: evictions drop resources.
        let _gate = self.gate.hold();
        let (bytes, cap) = (key.bytes(), self.caps[class.index()]);
        if bytes > cap {
            // Let go here, inside the gate (a parameter would drop after it).
            drop(held);
            return;
        }
        let mut evicted = Vec::new();
        let mut state = self.lock();
        state.clock += 1;
        let given_back = state.clock;
        state.free.push(Free {
            class,
            key,
            held,
            given_back,
        });
        state.counts[class.index()].bytes += bytes;
        while state.counts[class.index()].bytes > cap {
            let oldest = state
                .free
                .iter()
                .enumerate()
                .filter(|(_, f)| f.class == class)
                .min_by_key(|(_, f)| f.given_back)
                .map(|(i, _)| i)
                .expect("bytes > 0 means an entry");
            let free = state.free.swap_remove(oldest);
            state.counts[class.index()].bytes -= free.key.bytes();
            evicted.push(free);
        }
        // The evicted resources drop after the pool's lock, inside the gate (as in `clear`).
        drop(state);
        drop(evicted);
    }

    /// Charges `bytes` to the engine's memory ledger; past the budget, lets go of everything the
    /// pool keeps and tries once more (a caching allocator's answer to pressure: what is cached
    /// is not needed).
    pub(crate) fn charge(&self, bytes: u64) -> Result<Charge> {
        self.ledger.charge(bytes).or_else(|_| {
            self.clear();
            self.ledger.charge(bytes)
        })
    }

    /// A resource for `key`: a kept one, else one `create` makes once its bytes are charged.
    fn take_or_create(
        self: &Arc<Self>,
        class: Class,
        key: ScratchKey,
        create: impl FnOnce() -> Result<Resource>,
    ) -> Result<Scratch> {
        let held = match self.take(class, key) {
            Some(held) => held,
            None => {
                let charge = self.charge(key.bytes())?;
                Held {
                    resource: create()?,
                    _charge: charge,
                }
            }
        };
        Ok(Scratch {
            class,
            key,
            held: Some(held),
            pool: Arc::clone(self),
        })
    }

    /// A 2D texture of this size, format and usage: from the pool, or new.
    pub(crate) fn texture(
        self: &Arc<Self>,
        device: &wgpu::Device,
        label: &str,
        size: wgpu::Extent3d,
        format: wgpu::TextureFormat,
        usage: wgpu::TextureUsages,
    ) -> Result<Scratch> {
        let key = ScratchKey::Texture {
            width: size.width,
            height: size.height,
            format,
            usage,
        };
        self.take_or_create(Class::Scratch, key, || {
            Ok(Resource::Texture(device.create_texture(
                &wgpu::TextureDescriptor {
                    label: Some(label),
                    size,
                    mip_level_count: 1,
                    sample_count: 1,
                    dimension: wgpu::TextureDimension::D2,
                    format,
                    usage,
                    view_formats: &[],
                },
            )))
        })
    }

    /// A scratch buffer of exactly `size` bytes with this usage: from the pool, or new.
    pub(crate) fn buffer(
        self: &Arc<Self>,
        device: &wgpu::Device,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<Scratch> {
        let key = ScratchKey::Buffer { size, usage };
        self.take_or_create(Class::Scratch, key, || {
            Ok(Resource::Buffer(device.create_buffer(
                &wgpu::BufferDescriptor {
                    label: Some(label),
                    size,
                    usage,
                    mapped_at_creation: false,
                },
            )))
        })
    }

    /// A buffer for a tensor, of exactly `size` bytes with this usage: from the pool's tensor
    /// class, or the one `create` makes (a buffer whose creation failed is never kept). Its
    /// contents are whatever it held last.
    pub(crate) fn tensor_buffer(
        self: &Arc<Self>,
        size: u64,
        usage: wgpu::BufferUsages,
        create: impl FnOnce() -> Result<wgpu::Buffer>,
    ) -> Result<Scratch> {
        let key = ScratchKey::Buffer { size, usage };
        self.take_or_create(Class::Tensor, key, || create().map(Resource::Buffer))
    }
}

/// A resource on loan from the pool; given back when dropped. Drop it only after the work
/// that uses it has been submitted.
#[derive(Debug)]
pub(crate) struct Scratch {
    class: Class,
    key: ScratchKey,
    held: Option<Held>,
    pool: Arc<ScratchPool>,
}

impl Scratch {
    pub(crate) fn texture(&self) -> &wgpu::Texture {
        match self.held.as_ref().map(|h| &h.resource) {
            Some(Resource::Texture(t)) => t,
            _ => unreachable!("a texture loan holds a texture"),
        }
    }
    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        match self.held.as_ref().map(|h| &h.resource) {
            Some(Resource::Buffer(b)) => b,
            _ => unreachable!("a buffer loan holds a buffer"),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            self.pool.give(self.class, self.key, held);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Taking and giving back need a device: tests/tests/api.rs checks them on one.
    use super::*;

    #[test]
    fn texture_bytes_count_texels() {
        let key = ScratchKey::Texture {
            width: 16,
            height: 4,
            format: wgpu::TextureFormat::Rgba32Float,
            usage: wgpu::TextureUsages::TEXTURE_BINDING,
        };
        assert_eq!(key.bytes(), 16 * 4 * 16);
    }
}

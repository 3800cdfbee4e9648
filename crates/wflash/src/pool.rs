//! The engine's scratch pool: textures and buffers a call needs only while it runs (packed K/V,
//! bias and key-mask textures, linear attention's per-chunk states) are taken from here and
//! given back when the call has been submitted, instead of being created and zero-filled by
//! the driver on every call.
//!
//! Giving a resource back right after `queue.submit` is safe: wgpu orders every later use of it
//! (a later submission, or a `write_buffer` before one) after the work already submitted.
//! Resources a call hands to its caller (output tensors) never come from the pool.
//!
//! The pool holds at most [`crate::EngineOptions::scratch_pool_bytes`]; giving back past that
//! evicts the least recently given back first (a resource larger than the cap is not kept).

use std::sync::{Arc, Mutex};

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

#[derive(Debug)]
enum Resource {
    Texture(wgpu::Texture),
    Buffer(wgpu::Buffer),
}

#[derive(Debug)]
struct Free {
    key: ScratchKey,
    resource: Resource,
    given_back: u64,
}

#[derive(Debug, Default)]
struct State {
    free: Vec<Free>,
    bytes: u64,
    clock: u64,
    hits: u64,
    misses: u64,
}

/// A capped pool of scratch resources, shared by every clone of an engine.
#[derive(Debug)]
pub(crate) struct ScratchPool {
    cap: u64,
    state: Mutex<State>,
}

/// Bytes held and how takes went: what tests and the soak report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes of free resources held now.
    pub bytes: u64,
    /// The most the pool may hold.
    pub cap: u64,
    /// Takes served from the pool, and takes that created a new resource.
    pub hits: u64,
    pub misses: u64,
}

impl ScratchPool {
    pub(crate) fn new(cap: u64) -> Arc<ScratchPool> {
        Arc::new(ScratchPool {
            cap,
            state: Mutex::new(State::default()),
        })
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let state = self.lock();
        PoolStats {
            bytes: state.bytes,
            cap: self.cap,
            hits: state.hits,
            misses: state.misses,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the free list inconsistent (every
        // mutation is a push, a remove or a counter), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, key: ScratchKey) -> Option<Resource> {
        let mut state = self.lock();
        match state.free.iter().position(|f| f.key == key) {
            Some(i) => {
                let free = state.free.swap_remove(i);
                state.bytes -= key.bytes();
                state.hits += 1;
                Some(free.resource)
            }
            None => {
                state.misses += 1;
                None
            }
        }
    }

    fn give(&self, key: ScratchKey, resource: Resource) {
        let bytes = key.bytes();
        if bytes > self.cap {
            return;
        }
        let mut state = self.lock();
        state.clock += 1;
        let given_back = state.clock;
        state.free.push(Free {
            key,
            resource,
            given_back,
        });
        state.bytes += bytes;
        while state.bytes > self.cap {
            let oldest = state
                .free
                .iter()
                .enumerate()
                .min_by_key(|(_, f)| f.given_back)
                .map(|(i, _)| i)
                .expect("bytes > 0 means an entry");
            let evicted = state.free.swap_remove(oldest);
            state.bytes -= evicted.key.bytes();
        }
    }

    /// A 2D texture of this size, format and usage: from the pool, or new.
    pub(crate) fn texture(
        self: &Arc<Self>,
        device: &wgpu::Device,
        label: &str,
        size: wgpu::Extent3d,
        format: wgpu::TextureFormat,
        usage: wgpu::TextureUsages,
    ) -> Scratch {
        let key = ScratchKey::Texture {
            width: size.width,
            height: size.height,
            format,
            usage,
        };
        let resource = self.take(key).unwrap_or_else(|| {
            Resource::Texture(device.create_texture(&wgpu::TextureDescriptor {
                label: Some(label),
                size,
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format,
                usage,
                view_formats: &[],
            }))
        });
        Scratch {
            key,
            resource: Some(resource),
            pool: Arc::clone(self),
        }
    }

    /// A buffer of exactly `size` bytes with this usage: from the pool, or new.
    pub(crate) fn buffer(
        self: &Arc<Self>,
        device: &wgpu::Device,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Scratch {
        let key = ScratchKey::Buffer { size, usage };
        let resource = self.take(key).unwrap_or_else(|| {
            Resource::Buffer(device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            }))
        });
        Scratch {
            key,
            resource: Some(resource),
            pool: Arc::clone(self),
        }
    }
}

/// A resource on loan from the pool; given back when dropped. Drop it only after the work
/// that uses it has been submitted.
#[derive(Debug)]
pub(crate) struct Scratch {
    key: ScratchKey,
    resource: Option<Resource>,
    pool: Arc<ScratchPool>,
}

impl Scratch {
    pub(crate) fn texture(&self) -> &wgpu::Texture {
        match &self.resource {
            Some(Resource::Texture(t)) => t,
            _ => unreachable!("a texture loan holds a texture"),
        }
    }
    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        match &self.resource {
            Some(Resource::Buffer(b)) => b,
            _ => unreachable!("a buffer loan holds a buffer"),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(resource) = self.resource.take() {
            self.pool.give(self.key, resource);
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

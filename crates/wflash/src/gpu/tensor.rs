//! Tensors that live on the GPU, so a model can chain calls without host round trips.

use std::num::NonZeroU64;
use std::sync::Arc;

use crate::DType;
use crate::gpu::gate::{DeviceGate, DropInGate};
use crate::gpu::pool::Scratch;

/// A flat array of `len` elements of `dtype` in a GPU storage buffer: the bytes of
/// [`Tensor::binding`].
///
/// 16-bit types are stored two per 4-byte word, little-endian, exactly as a `&[half::f16]`
/// is laid out in host memory; the tensor's bytes are padded to a multiple of 4.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub(crate) buffer: wgpu::Buffer,
    /// Where the tensor starts in `buffer`, in bytes: 0 for wflash's own tensors, any
    /// aligned offset for a view of an application's buffer ([`crate::Engine::tensor_view`]).
    pub(crate) offset: u64,
    /// The tensor's bytes (its elements, padded to 4). The engine's own buffers may be
    /// larger: they come in size classes, so that the tensor cache reuses them across shapes.
    pub(crate) size: NonZeroU64,
    pub(crate) dtype: DType,
    pub(crate) len: usize,
    /// Shared by clones of this handle. Declared after `buffer`, so this handle's clone of the
    /// buffer is gone first and the backing's is the last: it lets the buffer go in the gate.
    pub(crate) _backing: Arc<Backing>,
}

impl Tensor {
    /// The storage buffer that holds the tensor, at [`Tensor::offset`]; it may be larger
    /// than the tensor. To bind the tensor in an application's own pipelines, use
    /// [`Tensor::binding`].
    ///
    /// Valid for as long as a handle of this tensor lives: when the last one drops, the engine
    /// keeps the buffer for a later tensor of a similar size (its tensor cache; see
    /// [`crate::EngineOptions::tensor_cache_bytes`]), so a clone of it kept past that may see
    /// another tensor's contents.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Where the tensor starts in [`Tensor::buffer`], in bytes (0 unless it is a view).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// A bind-group entry for this tensor's bytes at `binding`.
    pub(crate) fn entry(&self, binding: u32) -> wgpu::BindGroupEntry<'_> {
        wgpu::BindGroupEntry {
            binding,
            resource: wgpu::BindingResource::Buffer(self.binding()),
        }
    }

    /// The tensor's bytes in [`Tensor::buffer`], as a binding for an application's own
    /// bind groups.
    pub fn binding(&self) -> wgpu::BufferBinding<'_> {
        wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: Some(self.size),
        }
    }

    /// The tensor's bytes: its elements, padded to a multiple of 4.
    pub(crate) fn byte_size(&self) -> u64 {
        self.size.get()
    }

    /// An owned handle to the bytes this tensor binds, for code that binds tensors and
    /// scratch buffers alike.
    pub(crate) fn region(&self) -> Region {
        Region {
            buffer: self.buffer.clone(),
            offset: self.offset,
            size: Some(self.size),
        }
    }
}

/// Bytes of a buffer to bind: a tensor's ([`Tensor::region`]) or a whole scratch buffer.
#[derive(Clone, Debug)]
pub(crate) struct Region {
    buffer: wgpu::Buffer,
    offset: u64,
    size: Option<NonZeroU64>,
}

impl Region {
    pub(crate) fn whole(buffer: wgpu::Buffer) -> Region {
        Region {
            buffer,
            offset: 0,
            size: None,
        }
    }

    pub(crate) fn entry(&self, binding: u32) -> wgpu::BindGroupEntry<'_> {
        wgpu::BindGroupEntry {
            binding,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.buffer,
                offset: self.offset,
                size: self.size,
            }),
        }
    }
}

/// What the last handle of a [`Tensor`] lets go.
#[derive(Debug)]
pub(crate) enum Backing {
    /// The engine's own buffer (an upload, an output), on loan from its pool's tensor class
    /// with its ledger charge: given back for reuse.
    Cached { _loan: Scratch },
    /// An application's buffer ([`crate::Engine::tensor_view`]): this handle to it is dropped
    /// inside the device gate (GL destroys a buffer under its context lock; see `gpu/gate.rs`).
    View {
        _buffer: DropInGate<Option<wgpu::Buffer>>,
    },
}

impl Backing {
    pub(crate) fn cached(loan: Scratch) -> Arc<Backing> {
        Arc::new(Backing::Cached { _loan: loan })
    }

    pub(crate) fn view(buffer: &wgpu::Buffer, gate: &DeviceGate) -> Arc<Backing> {
        Arc::new(Backing::View {
            _buffer: DropInGate::new(Some(buffer.clone()), gate),
        })
    }
}

/// Bytes a buffer of `len` elements of `dtype` occupies, padded to 4.
pub(crate) fn buffer_bytes(dtype: DType, len: usize) -> u64 {
    ((len * dtype.size_bytes()) as u64).div_ceil(4) * 4
}

/// Bytes a buffer holding `contents` takes: at least 4, a multiple of 4.
fn padded_size(contents: &[u8]) -> u64 {
    (contents.len() as u64).next_multiple_of(4).max(4)
}

/// A buffer holding `contents` (at least 4 bytes, zero-padded to a multiple of 4), written with
/// `queue.write_buffer`. Not `create_buffer_init`: its mapping panics inside wgpu when the
/// device has been lost, where this gives an error that the engine's error scopes catch.
pub(crate) fn buffer_with_contents(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    label: &str,
    contents: &[u8],
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: padded_size(contents),
        usage: usage | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    write_padded(queue, &buffer, contents);
    buffer
}

/// Writes `contents` at the start of `buffer`, zero-padded to the buffer's padded size.
pub(crate) fn write_padded(queue: &wgpu::Queue, buffer: &wgpu::Buffer, contents: &[u8]) {
    let size = padded_size(contents);
    if contents.len() as u64 == size {
        queue.write_buffer(buffer, 0, contents);
    } else {
        let mut padded = contents.to_vec();
        padded.resize(size as usize, 0);
        queue.write_buffer(buffer, 0, &padded);
    }
}

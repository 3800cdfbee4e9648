//! Tensors that live on the GPU, so a model can chain calls without host round trips.

use std::sync::{Arc, Mutex};

use crate::memory::Charge;
use crate::readback::wait_for;
use crate::{DType, Element, Engine, Error, Result};

/// A flat array of `len` elements of `dtype` in a GPU storage buffer.
///
/// 16-bit types are stored two per 4-byte word, little-endian, exactly as a `&[half::f16]`
/// is laid out in host memory; the buffer is padded to a multiple of 4 bytes.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) dtype: DType,
    pub(crate) len: usize,
    /// The buffer's bytes on the engine's memory ledger, shared by clones of this handle.
    _charge: Arc<Charge>,
}

impl Tensor {
    /// The storage buffer, to bind in an application's own pipelines.
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
}

/// Bytes a buffer of `len` elements of `dtype` occupies, padded to 4.
pub(crate) fn buffer_bytes(dtype: DType, len: usize) -> u64 {
    ((len * dtype.size_bytes()) as u64).div_ceil(4) * 4
}

const TENSOR_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl Engine {
    /// Copies host data into a new GPU tensor.
    pub fn upload<T: Element>(&self, data: &[T]) -> Result<Tensor> {
        self.check_alive()?;
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let limit = self.inner.info.limits.max_buffer_size;
        if bytes.len() as u64 > limit {
            return Err(Error::TooLarge {
                limit: "max_buffer_size",
                needed: bytes.len() as u64,
                max: limit,
                hint: "",
            });
        }
        let charge = self.charge(buffer_bytes(T::DTYPE, data.len()).max(4))?;
        let buffer = self.guarded(|device| {
            buffer_with_contents(
                device,
                &self.inner.queue,
                "wflash tensor",
                bytes,
                TENSOR_USAGE,
            )
        })?;
        Ok(Tensor {
            buffer,
            dtype: T::DTYPE,
            len: data.len(),
            _charge: Arc::new(charge),
        })
    }

    /// A new tensor for a kernel to write; NaN-filled when the engine poisons outputs.
    pub(crate) fn output_tensor(&self, dtype: DType, len: usize) -> Result<Tensor> {
        let size = buffer_bytes(dtype, len).max(4);
        let charge = self.charge(size)?;
        let buffer = if self.inner.options.poison_outputs {
            // All-ones bytes are NaN in f32, f16 and bf16 alike.
            let poison = vec![0xffu8; size as usize];
            self.guarded(|device| {
                buffer_with_contents(
                    device,
                    &self.inner.queue,
                    "wflash output",
                    &poison,
                    TENSOR_USAGE,
                )
            })?
        } else {
            self.guarded(|device| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("wflash output"),
                    size,
                    usage: TENSOR_USAGE,
                    mapped_at_creation: false,
                })
            })?
        };
        Ok(Tensor {
            buffer,
            dtype,
            len,
            _charge: Arc::new(charge),
        })
    }

    /// Copies a tensor back to the host.
    pub async fn read<T: Element>(&self, tensor: &Tensor) -> Result<Vec<T>> {
        let mut out = self.read_many::<T>(&[tensor]).await?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Blocking twin of [`Engine::read`].
    pub fn read_blocking<T: Element>(&self, tensor: &Tensor) -> Result<Vec<T>> {
        pollster::block_on(self.read(tensor))
    }

    /// Copies several tensors of one element type back with a single wait.
    pub(crate) async fn read_many<T: Element>(&self, tensors: &[&Tensor]) -> Result<Vec<Vec<T>>> {
        self.check_alive()?;
        for t in tensors {
            if t.dtype != T::DTYPE {
                return Err(Error::DTypeMismatch {
                    tensor: "read",
                    expected: T::DTYPE,
                    got: t.dtype,
                });
            }
        }
        let staging_bytes = tensors.iter().map(|t| t.buffer.size()).sum();
        let _staging_charge = self.charge(staging_bytes)?;
        let (staging, submission) = self.guarded(|device| {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("wflash readback"),
            });
            let staging: Vec<wgpu::Buffer> = tensors
                .iter()
                .map(|t| {
                    let size = t.buffer.size();
                    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("wflash staging"),
                        size,
                        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    });
                    encoder.copy_buffer_to_buffer(&t.buffer, 0, &buffer, 0, size);
                    buffer
                })
                .collect();
            let submission = self.inner.queue.submit([encoder.finish()]);
            (staging, submission)
        })?;
        let statuses: Vec<Arc<Mutex<Option<bool>>>> = staging
            .iter()
            .map(|buffer| {
                let status = Arc::new(Mutex::new(None));
                let done = status.clone();
                buffer.map_async(wgpu::MapMode::Read, .., move |r| {
                    *done.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.is_ok());
                });
                status
            })
            .collect();
        let pending = statuses.clone();
        let lost = self.inner.lost.clone();
        wait_for(
            &self.inner.device,
            submission,
            self.inner.options.readback_timeout,
            // Every callback has run (or the device is gone and none will).
            move || {
                lost.load(std::sync::atomic::Ordering::SeqCst)
                    || pending
                        .iter()
                        .all(|s| s.lock().unwrap_or_else(|e| e.into_inner()).is_some())
            },
        )
        .await?;
        let mut out = Vec::with_capacity(tensors.len());
        for ((tensor, buffer), status) in tensors.iter().zip(&staging).zip(&statuses) {
            let mapped = *status.lock().unwrap_or_else(|e| e.into_inner());
            if mapped != Some(true) {
                self.check_alive()?;
                return Err(Error::DeviceLost(format!(
                    "mapping a readback buffer failed ({mapped:?})"
                )));
            }
            let view = buffer
                .get_mapped_range(..)
                .map_err(|e| Error::Internal(format!("reading a mapped buffer: {e}")))?;
            let bytes = &view[..tensor.len * T::DTYPE.size_bytes()];
            // The staging copy is 4-byte aligned but `T` may need no more than that; copy by value.
            out.push(bytemuck::pod_collect_to_vec::<u8, T>(bytes));
            drop(view);
            buffer.unmap();
        }
        Ok(out)
    }

    /// Runs `f` inside validation and out-of-memory error scopes and turns what they catch into errors.
    pub(crate) fn guarded<R>(&self, f: impl FnOnce(&wgpu::Device) -> R) -> Result<R> {
        let device = &self.inner.device;
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f(device);
        let validation = pollster::block_on(validation.pop());
        let oom = pollster::block_on(oom.pop());
        if let Some(err) = oom.or(validation) {
            // A lost device shows first as validation errors on everything; a poll lets its
            // lost callback run, so the error says what really happened.
            let _ = device.poll(wgpu::PollType::Poll);
            self.check_alive()?;
            return Err(Error::from_wgpu(err));
        }
        Ok(value)
    }
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
    let size = (contents.len() as u64).next_multiple_of(4).max(4);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage: usage | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    if contents.len() as u64 == size {
        queue.write_buffer(&buffer, 0, contents);
    } else {
        let mut padded = contents.to_vec();
        padded.resize(size as usize, 0);
        queue.write_buffer(&buffer, 0, &padded);
    }
    buffer
}

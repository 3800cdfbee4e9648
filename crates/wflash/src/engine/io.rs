//! Moving data: uploads, output tensors, readback, and the error scopes every wgpu call runs in.

use std::sync::{Arc, Mutex};

use crate::gpu::gate::DropInGate;
use crate::gpu::pool::Scratch;
use crate::gpu::readback::wait_for;
use crate::gpu::tensor::{Backing, buffer_bytes, write_padded};
use crate::{DType, Element, Engine, Error, Result, Tensor};

/// The bytes of the buffer that backs a tensor of `bytes`: rounded up to a quarter of the power
/// of two below it (at most 25% more; 256-byte steps up to 4 KiB), so the tensor cache reuses
/// buffers across shapes that differ a little (a decode's growing outputs, a soak's random
/// shapes), not only across equal ones. Never past the device's `max_buffer_size`.
fn size_class(bytes: u64, max_buffer_size: u64) -> u64 {
    let step = if bytes <= 4096 {
        256
    } else {
        (1u64 << bytes.ilog2()) / 4
    };
    let class = bytes.next_multiple_of(step);
    if class > max_buffer_size {
        bytes
    } else {
        class
    }
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
        let loan = self.tensor_buffer(T::DTYPE, data.len())?;
        self.guarded(|_| write_padded(&self.inner.queue, loan.buffer(), bytes))?;
        Ok(Self::cached_tensor(loan, T::DTYPE, data.len()))
    }

    /// A buffer for a tensor of `len` elements of `dtype`, from the tensor cache or new
    /// (charged to the memory ledger either way), of the tensor's size class.
    fn tensor_buffer(&self, dtype: DType, len: usize) -> Result<Scratch> {
        let size = size_class(
            buffer_bytes(dtype, len).max(4),
            self.inner.info.limits.max_buffer_size,
        );
        self.inner.pool.tensor_buffer(size, TENSOR_USAGE, || {
            self.guarded(|device| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("wflash tensor"),
                    size,
                    usage: TENSOR_USAGE,
                    mapped_at_creation: false,
                })
            })
        })
    }

    fn cached_tensor(loan: Scratch, dtype: DType, len: usize) -> Tensor {
        let bytes = buffer_bytes(dtype, len).max(4);
        Tensor {
            buffer: loan.buffer().clone(),
            _backing: Backing::cached(loan),
            offset: 0,
            size: std::num::NonZeroU64::new(bytes).expect("at least 4 bytes"),
            dtype,
            len,
        }
    }

    /// A tensor over `len` elements of `dtype` at byte `offset` of `buffer`, an application's
    /// buffer on this engine's device (a framework's sub-allocated tensor, say): the kernels
    /// bind those bytes in place, with no copy. The offset must be a multiple of the device's
    /// `min_storage_buffer_offset_alignment`, the buffer must have `STORAGE` and `COPY_SRC`
    /// usage, and the tensor's bytes (padded to 4) must lie inside it.
    ///
    /// The view keeps a handle to the buffer but not the application's allocation inside it:
    /// the application keeps those bytes alive, and unchanged while wflash work that reads
    /// them is queued (work submitted later on the same queue runs later).
    pub fn tensor_view(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        dtype: DType,
        len: usize,
    ) -> Result<Tensor> {
        self.check_alive()?;
        let invalid = |reason: String| Err(Error::InvalidView { reason });
        let needed = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        if !buffer.usage().contains(needed) {
            return invalid(format!(
                "the buffer's usage {:?} lacks STORAGE or COPY_SRC",
                buffer.usage()
            ));
        }
        let limits = &self.inner.info.limits;
        let align = u64::from(limits.min_storage_buffer_offset_alignment);
        if !offset.is_multiple_of(align) {
            return invalid(format!(
                "offset {offset} is not a multiple of the device's storage offset alignment {align}"
            ));
        }
        let bytes = buffer_bytes(dtype, len).max(4);
        if offset
            .checked_add(bytes)
            .is_none_or(|end| end > buffer.size())
        {
            return invalid(format!(
                "{bytes} bytes at offset {offset} pass the buffer's end ({} bytes)",
                buffer.size()
            ));
        }
        if bytes > limits.max_storage_buffer_binding_size {
            return Err(Error::TooLarge {
                limit: "max_storage_buffer_binding_size",
                needed: bytes,
                max: limits.max_storage_buffer_binding_size,
                hint: "",
            });
        }
        Ok(Tensor {
            _backing: Backing::view(buffer, &self.inner.gate),
            buffer: buffer.clone(),
            offset,
            size: std::num::NonZeroU64::new(bytes).expect("at least 4 bytes"),
            dtype,
            len,
        })
    }

    /// Copies `src` into `dst` on the device (a result into an application's buffer through a
    /// [`Engine::tensor_view`], say); submitted before this returns, ordered after the work
    /// submitted before it. Both hold the same element type and count.
    pub fn copy_into(&self, src: &Tensor, dst: &Tensor) -> Result<()> {
        self.check_alive()?;
        if src.dtype != dst.dtype {
            return Err(Error::DTypeMismatch {
                tensor: "copy destination",
                expected: src.dtype,
                got: dst.dtype,
            });
        }
        crate::check_len("copy destination", src.len, dst.len)?;
        let bytes = buffer_bytes(src.dtype, src.len);
        self.guarded(|device| {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("wflash copy"),
            });
            encoder.copy_buffer_to_buffer(&src.buffer, src.offset, &dst.buffer, dst.offset, bytes);
            self.inner.queue.submit([encoder.finish()]);
        })
    }

    /// A tensor for a kernel to write, its contents unspecified (a reused buffer holds what it
    /// held); NaN-filled when the engine poisons outputs.
    pub(crate) fn output_tensor(&self, dtype: DType, len: usize) -> Result<Tensor> {
        let loan = self.tensor_buffer(dtype, len)?;
        if self.inner.options.poison_outputs {
            // All-ones bytes are NaN in f32, f16 and bf16 alike.
            let poison = vec![0xffu8; loan.buffer().size() as usize];
            self.guarded(|_| self.inner.queue.write_buffer(loan.buffer(), 0, &poison))?;
        }
        Ok(Self::cached_tensor(loan, dtype, len))
    }

    /// Copies an attention result (output, and LSE where there is one) back to the host.
    pub(crate) async fn read_attention<T: Element>(
        &self,
        out: &crate::GpuAttention,
    ) -> Result<crate::Attention<T>> {
        Ok(crate::Attention {
            output: self.read(&out.output).await?,
            lse: match &out.lse {
                Some(lse) => Some(self.read(lse).await?),
                None => None,
            },
        })
    }

    /// Copies a tensor back to the host.
    pub async fn read<T: Element>(&self, tensor: &Tensor) -> Result<Vec<T>> {
        let mut out = self.read_many::<T>(&[tensor]).await?;
        Ok(out.pop().unwrap_or_default())
    }

    #[cfg(not(target_arch = "wasm32"))]
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
        let staging_bytes = tensors.iter().map(|t| t.byte_size()).sum();
        let _staging_charge = self.charge(staging_bytes)?;
        let (staging, submission) = self.guarded(|device| {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("wflash readback"),
            });
            let staging: Vec<wgpu::Buffer> = tensors
                .iter()
                .map(|t| {
                    let size = t.byte_size();
                    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("wflash staging"),
                        size,
                        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    });
                    encoder.copy_buffer_to_buffer(&t.buffer, t.offset, &buffer, 0, size);
                    buffer
                })
                .collect();
            let submission = self.inner.queue.submit([encoder.finish()]);
            (staging, submission)
        })?;
        let gate = &self.inner.gate;
        // Dropped in the gate however this ends (a timeout, a lost device, the read).
        let staging = DropInGate::new(staging, gate);
        let held = gate.hold();
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
        drop(held);
        let pending = statuses.clone();
        let lost = self.inner.lost.clone();
        wait_for(
            &self.inner.device,
            gate,
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
        if let Some(err) = self.inner.scopes.first_deferred().await {
            self.check_alive()?;
            return Err(Error::from_wgpu(err));
        }
        let _held = gate.hold();
        let mut out = Vec::with_capacity(tensors.len());
        for ((tensor, buffer), status) in tensors.iter().zip(staging.iter()).zip(&statuses) {
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
    /// Holds the device gate throughout (see `gpu/gate.rs`): whatever `f` creates and drops,
    /// and its result if the scopes report an error, is dropped inside it.
    pub(crate) fn guarded<R>(&self, f: impl FnOnce(&wgpu::Device) -> R) -> Result<R> {
        let _held = self.inner.gate.hold();
        let device = &self.inner.device;
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f(device);
        let validation = self.inner.scopes.take(validation);
        let oom = self.inner.scopes.take(oom);
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

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_the_size_with_at_most_a_quarter_more() {
        for bytes in (4..1 << 22).step_by(4).chain([(1 << 30) + 4, 3 << 29]) {
            let class = size_class(bytes, u64::MAX);
            assert!(
                class >= bytes && class.is_multiple_of(4),
                "{bytes} -> {class}"
            );
            assert!(class - bytes <= (bytes / 4).max(252), "{bytes} -> {class}");
        }
        assert_eq!(size_class(4, u64::MAX), 256);
        assert_eq!(size_class(5000, u64::MAX), 5120);
        assert_eq!(size_class(1 << 20, u64::MAX), 1 << 20);
        assert_eq!(size_class((1 << 20) + 4, u64::MAX), 5 << 18);
        // Past the device's largest buffer: exact.
        assert_eq!(size_class((1 << 20) + 4, 1 << 20 | 8), (1 << 20) + 4);
    }
}

//! burn's tensors as wflash's and back: views of burn's buffers (at their sub-allocation
//! offsets) for the inputs, device-side copies into new burn tensors for the outputs.
//!
//! Ordering: burn records its work into an encoder that it submits in batches, on the same
//! wgpu queue wflash submits to. Flushing burn's client before wflash submits puts every burn
//! write of an input ahead of wflash's reads; burn work that reads an output, or reuses an
//! input's memory, is submitted after the copies, so the queue orders it after them.

use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl::server::Handle;
use burn_cubecl::cubecl::wgpu::{AutoCompiler, WgpuServer};
use burn_cubecl::tensor::CubeTensor;

use wflash::wgpu;

use crate::{Error, Result};

type Server = WgpuServer<AutoCompiler>;

/// The element type wflash uses for a burn dtype.
pub(crate) fn wflash_dtype(tensor: &'static str, dtype: DType) -> Result<wflash::DType> {
    Ok(match dtype {
        DType::F32 => wflash::DType::F32,
        DType::F16 => wflash::DType::F16,
        DType::BF16 => wflash::DType::Bf16,
        other => {
            return Err(Error::NotWgpu {
                tensor,
                reason: format!("its dtype {other:?} is not f32, f16 or bf16"),
            });
        }
    })
}

/// burn allocations pinned while wflash work that touches them is recorded and submitted:
/// a pinned allocation is not freed, moved or handed out again.
#[derive(Default)]
pub(crate) struct Pins(Vec<Box<dyn std::any::Any>>);

impl Pins {
    /// Pins `t`'s allocation; its buffer and byte offset.
    fn pin(
        &mut self,
        tensor: &'static str,
        t: &CubeTensor,
        handle: Handle,
    ) -> Result<(wgpu::Buffer, u64)> {
        let pinned = t
            .client
            .get_resource::<Server>(handle)
            .map_err(|e| Error::NotWgpu {
                tensor,
                reason: format!("{e:?}"),
            })?;
        let resource = pinned.resource();
        let place = (resource.buffer.clone(), resource.offset);
        self.0.push(Box::new(pinned));
        Ok(place)
    }
}

/// A contiguous row-major tensor (burn's `into_contiguous` where it is not one already).
pub(crate) fn contiguous(t: CubeTensor) -> CubeTensor {
    burn_cubecl::kernel::into_contiguous(t)
}

/// A wflash view of a contiguous burn tensor's bytes, in place.
pub(crate) fn view(
    engine: &wflash::Engine,
    pins: &mut Pins,
    tensor: &'static str,
    t: &CubeTensor,
) -> Result<wflash::Tensor> {
    let dtype = wflash_dtype(tensor, t.dtype)?;
    let len = t.meta.shape().num_elements();
    let (buffer, offset) = pins.pin(tensor, t, t.handle.clone())?;
    Ok(engine.tensor_view(&buffer, offset, dtype, len)?)
}

/// Submits burn's recorded work, so that the queue runs it before what wflash submits next.
pub(crate) fn flush(t: &CubeTensor) -> Result<()> {
    t.client
        .flush()
        .map_err(|e| Error::Runtime(format!("flushing burn's work: {e:?}")))
}

/// A new contiguous burn tensor of `shape` on `like`'s device holding a copy of wflash's
/// `src` (of `like`'s dtype); the copy is submitted before this returns.
pub(crate) fn to_burn(
    engine: &wflash::Engine,
    like: &CubeTensor,
    shape: Shape,
    src: &wflash::Tensor,
) -> Result<CubeTensor> {
    let bytes = shape.num_elements() * like.dtype.size();
    let handle = like.client.empty(bytes);
    let out = CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        handle,
        like.dtype,
    );
    let mut pins = Pins::default();
    let dst = view(engine, &mut pins, "output", &out)?;
    engine.copy_into(src, &dst)?;
    Ok(out)
}

//! Recording helpers every operation shares: K/V (and bias, key-mask) packing into textures,
//! element-type conversions, bind-group entries, and the GPU-resident Q/K/V check.

use crate::engine::Inner;
use crate::gpu::pool::Scratch;
use crate::gpu::tensor::buffer_with_contents;
use crate::kernels::{Conversion, binding};
use crate::{DType, Error, Result, Shape, Tensor, check_len};

/// The uniform block of `pack_rows.wgsl` (`struct PackParams`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PackParams {
    pub stride: [u32; 4],
    pub heads: u32,
    pub seq_len: u32,
    pub dim: u32,
    pub width4: u32,
    pub rows_per_head: u32,
    pub fold: u32,
    pub texels: u32,
    pub groups_x: u32,
    pub first_head: u32,
    pub _pad: [u32; 3],
}

/// What `pack_rows` needs to know about one tensor it packs (K, V, the bias, the key mask).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackShape {
    /// Element strides (batch, head, row, 1) of the tensor.
    pub stride: [u32; 4],
    /// The heads packed: `first_head .. first_head + heads` of the tensor's heads (a group
    /// of heads packs only its own), as rows `0 ..` of the texture.
    pub first_head: usize,
    pub heads: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub rows_per_head: usize,
    pub dim: usize,
    /// Packed rows per texture line.
    pub fold: u32,
    pub max_groups: u32,
}

/// Records the packing of `tensor` into an rgba32float texture from the scratch pool (layout in
/// pack_rows.wgsl) and returns the loan and its view; keep the loan until after the submit.
/// The plan has checked that the texture fits the adapter's limits.
pub(crate) fn pack_rows(
    engine: &Inner,
    encoder: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    tensor: &Tensor,
    shape: PackShape,
    label: &str,
) -> Result<(Scratch, wgpu::TextureView)> {
    let (texture, view) = packed_texture(engine, shape, label)?;
    pack_into(engine, encoder, pipeline, tensor, shape, &view, label);
    Ok((texture, view))
}

/// An rgba32float texture from the scratch pool for the rows `shape` packs, and its view.
pub(crate) fn packed_texture(
    engine: &Inner,
    shape: PackShape,
    label: &str,
) -> Result<(Scratch, wgpu::TextureView)> {
    let width4 = shape.dim.div_ceil(4) as u32;
    let rows = (shape.batch * shape.heads * shape.rows_per_head) as u32;
    let size = wgpu::Extent3d {
        width: shape.fold * width4,
        height: rows.div_ceil(shape.fold),
        depth_or_array_layers: 1,
    };
    let texture = engine.pool.texture(
        &engine.device,
        label,
        size,
        wgpu::TextureFormat::Rgba32Float,
        wgpu::TextureUsages::STORAGE_BINDING,
    )?;
    let view = texture
        .texture()
        .create_view(&wgpu::TextureViewDescriptor::default());
    Ok((texture, view))
}

/// Records the packing of `tensor`'s rows that `shape` names into `view`, a texture with room
/// for them (from [`packed_texture`] for this shape or one with more heads).
pub(crate) fn pack_into(
    engine: &Inner,
    encoder: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    tensor: &Tensor,
    shape: PackShape,
    view: &wgpu::TextureView,
    label: &str,
) {
    let width4 = shape.dim.div_ceil(4) as u32;
    let rows = (shape.batch * shape.heads * shape.rows_per_head) as u32;
    let (device, queue) = (&engine.device, &engine.queue);
    let texels = rows * width4;
    let groups = texels.div_ceil(64);
    let groups_x = groups.min(shape.max_groups);
    let params = PackParams {
        stride: shape.stride,
        heads: shape.heads as u32,
        seq_len: shape.seq_len as u32,
        dim: shape.dim as u32,
        width4,
        rows_per_head: shape.rows_per_head as u32,
        fold: shape.fold,
        texels,
        groups_x,
        first_head: shape.first_head as u32,
        _pad: [0; 3],
    };
    let uniform = buffer_with_contents(
        device,
        queue,
        "pack_rows params",
        bytemuck::bytes_of(&params),
        wgpu::BufferUsages::UNIFORM,
    );
    let entries = [
        entry(binding::PARAMS, &uniform),
        tensor.entry(binding::PACK_SOURCE),
        texture_entry(binding::PACK_TEXTURE, view),
    ];
    let grid = [groups_x, groups.div_ceil(groups_x), 1];
    record_pass(device, encoder, pipeline, &entries, grid, label);
}

/// The uniform block of `convert.wgsl` (`struct ConvertParams`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ConvertParams {
    pub len: u32,
    pub units: u32,
    pub groups_x: u32,
    pub _pad0: u32,
}

/// Records `conversion` of every element of `src` into `dst` (same length).
#[expect(
    clippy::too_many_arguments,
    reason = "device, queue, encoder, pipeline, what, from, to, limit: one pass; private"
)]
pub(crate) fn convert_pass(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    encoder: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    conversion: Conversion,
    src: &Tensor,
    dst: &Tensor,
    max_groups: u32,
) {
    let len = src.len as u32;
    let units = len.div_ceil(conversion.elements_per_unit());
    let groups = units.div_ceil(64).max(1);
    let groups_x = groups.min(max_groups);
    let params = ConvertParams {
        len,
        units,
        groups_x,
        _pad0: 0,
    };
    let uniform = buffer_with_contents(
        device,
        queue,
        "convert params",
        bytemuck::bytes_of(&params),
        wgpu::BufferUsages::UNIFORM,
    );
    let entries = [
        entry(binding::PARAMS, &uniform),
        src.entry(binding::CONVERT_FROM),
        dst.entry(binding::CONVERT_TO),
    ];
    let grid = [groups_x, groups.div_ceil(groups_x), 1];
    record_pass(
        device,
        encoder,
        pipeline,
        &entries,
        grid,
        &conversion.label(),
    );
}

/// Records one compute pass of `pipeline` over `grid` workgroups with a bind group of `entries`
/// (group 0, its layout derived from the shader).
pub(crate) fn record_pass(
    device: &wgpu::Device,
    encoder: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    entries: &[wgpu::BindGroupEntry<'_>],
    grid: [u32; 3],
    label: &str,
) {
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout: &pipeline.get_bind_group_layout(0),
        entries,
    });
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: None,
    });
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, &bind_group, &[]);
    pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
}

/// A bind-group entry for a texture view.
pub(crate) fn texture_entry(binding: u32, view: &wgpu::TextureView) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: wgpu::BindingResource::TextureView(view),
    }
}

/// Checks that GPU tensors Q, K and V share one element type and have the shape's lengths
/// (the shape already validated); returns their element type.
pub(crate) fn check_qkv(shape: &Shape, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<DType> {
    let dtype = q.dtype;
    for (name, t, expected) in [
        ("q", q, shape.q_elems()),
        ("k", k, shape.k_elems()),
        ("v", v, shape.v_elems()),
    ] {
        if t.dtype != dtype {
            return Err(Error::DTypeMismatch {
                tensor: name,
                expected: dtype,
                got: t.dtype,
            });
        }
        check_len(name, expected, t.len)?;
    }
    Ok(dtype)
}

pub(crate) fn entry(binding: u32, buffer: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: buffer.as_entire_binding(),
    }
}

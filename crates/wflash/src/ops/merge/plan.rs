//! How a merge runs: the parts checked, the stacked buffers' sizes and the kernel's uniform
//! block, every limit checked before anything touches the GPU.

use crate::gpu::tensor::buffer_bytes;
use crate::kernels::{MergeKernel, Storage};
use crate::{DType, Engine, Error, Layout, OutputShape, Result};

/// The uniform block of merge.wgsl (`struct MergeParams`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MergeParams {
    pub parts: u32,
    pub part_stride: u32,
    pub rows: u32,
    pub value_dim: u32,
    pub heads: u32,
    pub len: u32,
    pub bshd: u32,
    pub groups_x: u32,
}

/// How one merge runs: its kernel, the bytes of one part's output and LSE in the stacked
/// buffers, the uniform block and the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergePlan {
    pub shape: OutputShape,
    pub kernel: MergeKernel,
    /// Bytes from one part's output (a whole number of 4-byte words) or LSE to the next.
    pub part_bytes: u64,
    pub lse_bytes: u64,
    pub params: MergeParams,
    pub grid: [u32; 3],
}

/// The most parts one merge takes. An invocation walks the parts three times, and llvmpipe
/// ends every loop of an invocation once they have run 65535 iterations in all, silently (a
/// merge of 30000 parts returned 0.18 where every part said 1: docs/PERF.md).
pub const MERGE_MAX_PARTS: usize = 16384;

impl Engine {
    /// Checks a merge of `parts` parts stored as `parts_storage` into an output stored as
    /// `output`, and decides how it runs. `sum`: the parts are sums to add up (sigmoid
    /// attention's split-KV partials), not softmax results to weigh by their LSEs.
    pub fn plan_merge(
        &self,
        shape: &OutputShape,
        layout: Layout,
        parts: usize,
        parts_storage: Storage,
        output: Storage,
        sum: bool,
    ) -> Result<MergePlan> {
        shape.validate()?;
        if parts == 0 {
            return Err(Error::ZeroDimension { dim: "parts" });
        }
        if parts > MERGE_MAX_PARTS {
            return Err(Error::TooLarge {
                limit: "MERGE_MAX_PARTS",
                needed: parts as u64,
                max: MERGE_MAX_PARTS as u64,
                hint: " parts of one merge (merge them in rounds)",
            });
        }
        let limits = &self.inner.info.limits;
        let dtype = parts_storage.dtype();
        let part_bytes = buffer_bytes(dtype, shape.o_elems()).max(4);
        let lse_bytes = buffer_bytes(DType::F32, shape.lse_elems());
        let count = parts as u64;
        for (needed, hint) in [
            (
                part_bytes * count,
                " bytes of stacked part outputs (merge fewer parts at a time)",
            ),
            (
                lse_bytes * count,
                " bytes of stacked part LSEs (merge fewer parts at a time)",
            ),
        ] {
            self.inner.info.within_binding_limit(needed, hint)?;
        }
        let groups = (shape.o_elems() as u64).div_ceil(64);
        let max_groups = u64::from(limits.max_compute_workgroups_per_dimension);
        let groups_x = groups.min(max_groups);
        if groups.div_ceil(groups_x) > max_groups {
            return Err(Error::TooLarge {
                limit: "max_compute_workgroups_per_dimension",
                needed: groups.div_ceil(groups_x),
                max: max_groups,
                hint: " workgroups along y for the merge",
            });
        }
        Ok(MergePlan {
            shape: *shape,
            kernel: MergeKernel {
                parts: parts_storage,
                output,
                sum,
            },
            part_bytes,
            lse_bytes,
            params: MergeParams {
                parts: parts as u32,
                // Elements from one part's output to the next (16-bit outputs of odd length
                // are padded to a word).
                part_stride: (part_bytes / dtype.size_bytes() as u64) as u32,
                rows: shape.lse_elems() as u32,
                value_dim: shape.value_dim as u32,
                heads: shape.heads as u32,
                len: shape.len as u32,
                bshd: u32::from(layout == Layout::Bshd),
                groups_x: groups_x as u32,
            },
            grid: [groups_x as u32, groups.div_ceil(groups_x) as u32, 1],
        })
    }
}

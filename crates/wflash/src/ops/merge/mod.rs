//! Merging partial softmax attention results (semantics: `wflash_ref::merge`): attention over
//! keys split into disjoint parts — by context or ring parallelism across devices, by a
//! caller's own split of a KV cache — recovered from each part's output and LSE.
//! shaders/merge.wgsl; the parts are copied into one stacked buffer so one kernel takes any
//! number of them.

mod dispatch;
mod plan;

pub use plan::{MERGE_MAX_PARTS, MergeParams, MergePlan};

use crate::{
    Attention, DType, Element, Engine, Error, GpuAttention, Layout, OutputShape, Result, Tensor,
    check_len,
};

impl Engine {
    /// Merges partial softmax attention results over disjoint sets of keys into the result of
    /// attention over all of them: each part is an attention call's `(output, lse)` with the
    /// same queries (`shape`, outputs in `layout`), the merge
    /// `lse = m + ln Σ exp(lse_s − m)`, `O = Σ exp(lse_s − lse) O_s`. A part whose row saw no
    /// key (`lse = −∞`) counts for nothing, whatever its output holds; a row no part saw gets
    /// `O = 0`, `lse = −∞`. Sigmoid attention needs no merge: its parts add.
    pub async fn merge_attention<T: Element>(
        &self,
        shape: &OutputShape,
        layout: Layout,
        parts: &[(&[T], &[f32])],
    ) -> Result<Attention<T>> {
        shape.validate()?;
        if parts.is_empty() {
            return Err(Error::ZeroDimension { dim: "parts" });
        }
        for (output, lse) in parts {
            check_len("merge part output", shape.o_elems(), output.len())?;
            check_len("merge part lse", shape.lse_elems(), lse.len())?;
        }
        let uploaded = parts
            .iter()
            .map(|(o, lse)| Ok((self.upload(o)?, self.upload(lse)?)))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<(&Tensor, &Tensor)> = uploaded.iter().map(|(o, l)| (o, l)).collect();
        let merged = self.merge_attention_gpu(shape, layout, &refs)?;
        self.read_attention(&merged).await
    }

    #[cfg(not(target_arch = "wasm32"))]
    /// Blocking twin of [`Engine::merge_attention`].
    pub fn merge_attention_blocking<T: Element>(
        &self,
        shape: &OutputShape,
        layout: Layout,
        parts: &[(&[T], &[f32])],
    ) -> Result<Attention<T>> {
        pollster::block_on(self.merge_attention(shape, layout, parts))
    }

    /// [`Engine::merge_attention`] on GPU tensors (outputs of one element type, f32 LSEs, as
    /// [`Engine::attention_gpu`] returns them). Submits the work and returns at once.
    pub fn merge_attention_gpu(
        &self,
        shape: &OutputShape,
        layout: Layout,
        parts: &[(&Tensor, &Tensor)],
    ) -> Result<GpuAttention> {
        shape.validate()?;
        let Some(&(first, _)) = parts.first() else {
            return Err(Error::ZeroDimension { dim: "parts" });
        };
        let dtype = first.dtype;
        for &(output, lse) in parts {
            for (tensor, got, expected) in [
                ("merge part output", output.dtype, dtype),
                ("merge part lse", lse.dtype, DType::F32),
            ] {
                if got != expected {
                    return Err(Error::DTypeMismatch {
                        tensor,
                        expected,
                        got,
                    });
                }
            }
            check_len("merge part output", shape.o_elems(), output.len)?;
            check_len("merge part lse", shape.lse_elems(), lse.len)?;
        }
        let storage = self.storage_for(dtype)?;
        let plan = self.plan_merge(shape, layout, parts.len(), storage, storage, false)?;
        self.run_merge(&plan, parts)
    }
}

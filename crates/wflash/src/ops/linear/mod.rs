//! Linear attention's calls (semantics: [`crate::linear`]): the host and GPU-resident entry
//! points. [`plan`] decides how a call runs, [`dispatch`] records it.

mod dispatch;
mod plan;

pub use plan::{ChunkPlan, LinearParams, LinearPlan};

use crate::ops::passes::check_qkv;
use crate::{
    DType, Element, Engine, Error, Layout, LinearAttention, LinearOptions, LinearState, Result,
    Shape, Tensor, check_len,
};

/// A linear-attention state on the GPU (f32 tensors, layouts as [`LinearState`]).
#[derive(Clone, Debug)]
pub struct GpuLinearState {
    pub kv: Tensor,
    /// `Some` when the call normalises.
    pub z: Option<Tensor>,
}

/// Results of [`Engine::linear_attention_gpu`], still on the GPU.
#[derive(Clone, Debug)]
pub struct GpuLinearAttention {
    pub output: Tensor,
    pub state: GpuLinearState,
}

impl Engine {
    /// Linear attention on host slices: uploads, runs, reads back the output and final state.
    ///
    /// `q`, `k`, `v` hold `[batch, heads, len, dim]` (or `[batch, len, heads, dim]` for
    /// [`Layout::Bshd`]) elements; `shape.q_len == shape.kv_len`. `initial` continues a
    /// sequence from an earlier call's [`LinearAttention::state`].
    #[expect(
        clippy::too_many_arguments,
        reason = "the attention call's arguments plus the state"
    )]
    pub async fn linear_attention<T: Element>(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &LinearOptions<'_>,
        q: &[T],
        k: &[T],
        v: &[T],
        initial: Option<&LinearState>,
    ) -> Result<LinearAttention<T>> {
        let sizes = initial.map(|s| (s.kv.len(), (!s.z.is_empty()).then_some(s.z.len())));
        let plan = self.plan_linear(shape, layout, opts, T::DTYPE, sizes)?;
        check_len("q", shape.q_elems(), q.len())?;
        check_len("k", shape.k_elems(), k.len())?;
        check_len("v", shape.v_elems(), v.len())?;
        let initial = match initial {
            Some(state) => Some(GpuLinearState {
                kv: self.upload(&state.kv)?,
                z: if state.z.is_empty() {
                    None
                } else {
                    Some(self.upload(&state.z)?)
                },
            }),
            None => None,
        };
        let (q, k, v) = (self.upload(q)?, self.upload(k)?, self.upload(v)?);
        let out = self.run_linear(&plan, opts, &q, &k, &v, initial.as_ref())?;
        let output = self.read::<T>(&out.output).await?;
        let kv = self.read::<f32>(&out.state.kv).await?;
        let z = match &out.state.z {
            Some(z) => self.read::<f32>(z).await?,
            None => Vec::new(),
        };
        Ok(LinearAttention {
            output,
            state: LinearState { kv, z },
        })
    }

    /// Blocking twin of [`Engine::linear_attention`].
    #[expect(
        clippy::too_many_arguments,
        reason = "the attention call's arguments plus the state"
    )]
    pub fn linear_attention_blocking<T: Element>(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &LinearOptions<'_>,
        q: &[T],
        k: &[T],
        v: &[T],
        initial: Option<&LinearState>,
    ) -> Result<LinearAttention<T>> {
        pollster::block_on(self.linear_attention(shape, layout, opts, q, k, v, initial))
    }

    /// Linear attention on GPU-resident tensors. Submits the work and returns at once; the
    /// output and the final state stay on the GPU (a decode loop passes the state straight
    /// to its next call).
    #[expect(
        clippy::too_many_arguments,
        reason = "the attention call's arguments plus the state"
    )]
    pub fn linear_attention_gpu(
        &self,
        shape: &Shape,
        layout: Layout,
        opts: &LinearOptions<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        initial: Option<&GpuLinearState>,
    ) -> Result<GpuLinearAttention> {
        let sizes = initial.map(|s| (s.kv.len, s.z.as_ref().map(|z| z.len)));
        let plan = self.plan_linear(shape, layout, opts, q.dtype, sizes)?;
        check_qkv(shape, q, k, v)?;
        if let Some(state) = initial {
            for (name, t) in [
                ("initial kv state", Some(&state.kv)),
                ("initial z state", state.z.as_ref()),
            ] {
                if let Some(t) = t
                    && t.dtype != DType::F32
                {
                    return Err(Error::DTypeMismatch {
                        tensor: name,
                        expected: DType::F32,
                        got: t.dtype,
                    });
                }
            }
        }
        self.run_linear(&plan, opts, q, k, v, initial)
    }
}

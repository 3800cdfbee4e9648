//! Linear attention's calls (semantics: [`crate::linear`]): the host and GPU-resident entry
//! points. [`plan`] decides how a call runs, [`dispatch`] records it.

mod backward;
mod dispatch;
mod plan;

pub use backward::{GpuLinearGrads, LinearBackwardPlan};
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

/// The `(kv, z)` element counts of a host state (`z` `None` when empty), as
/// [`Engine::plan_linear`] and [`Engine::plan_linear_backward`] take them.
fn host_state_sizes(s: &LinearState) -> (usize, Option<usize>) {
    (s.kv.len(), (!s.z.is_empty()).then_some(s.z.len()))
}

/// The `(kv, z)` element counts of a GPU state.
fn gpu_state_sizes(s: &GpuLinearState) -> (usize, Option<usize>) {
    (s.kv.len, s.z.as_ref().map(|z| z.len))
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
        let sizes = initial.map(host_state_sizes);
        let plan = self.plan_linear(shape, layout, opts, T::DTYPE, sizes)?;
        check_len("q", shape.q_elems(), q.len())?;
        check_len("k", shape.k_elems(), k.len())?;
        check_len("v", shape.v_elems(), v.len())?;
        let initial = initial.map(|s| self.upload_state(s)).transpose()?;
        let (q, k, v) = (self.upload(q)?, self.upload(k)?, self.upload(v)?);
        let out = self.run_linear(&plan, opts, &q, &k, &v, initial.as_ref())?;
        Ok(LinearAttention {
            output: self.read::<T>(&out.output).await?,
            state: self.read_state(&out.state).await?,
        })
    }

    /// Blocking twin of [`Engine::linear_attention`].
    #[expect(
        clippy::too_many_arguments,
        reason = "the attention call's arguments plus the state"
    )]
    #[cfg(not(target_arch = "wasm32"))]
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
        let sizes = initial.map(gpu_state_sizes);
        let plan = self.plan_linear(shape, layout, opts, q.dtype, sizes)?;
        check_qkv(shape, q, k, v)?;
        check_state_dtype(initial, "initial kv state", "initial z state")?;
        self.run_linear(&plan, opts, q, k, v, initial)
    }

    /// A host state on the GPU (`z` absent when empty).
    fn upload_state(&self, state: &LinearState) -> Result<GpuLinearState> {
        Ok(GpuLinearState {
            kv: self.upload(&state.kv)?,
            z: if state.z.is_empty() {
                None
            } else {
                Some(self.upload(&state.z)?)
            },
        })
    }

    /// A GPU state read back (`z` empty when absent).
    async fn read_state(&self, state: &GpuLinearState) -> Result<LinearState> {
        Ok(LinearState {
            kv: self.read::<f32>(&state.kv).await?,
            z: match &state.z {
                Some(z) => self.read::<f32>(z).await?,
                None => Vec::new(),
            },
        })
    }
}

/// States are f32 on every path: `kv` and `z` of `state` (named `kv_name`, `z_name` in the
/// error) must be.
fn check_state_dtype(
    state: Option<&GpuLinearState>,
    kv_name: &'static str,
    z_name: &'static str,
) -> Result<()> {
    let Some(state) = state else {
        return Ok(());
    };
    for (name, t) in [(kv_name, Some(&state.kv)), (z_name, state.z.as_ref())] {
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
    Ok(())
}

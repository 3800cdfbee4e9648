//! The answers of wgpu's error scopes, which every device operation runs inside.
//!
//! Natively a scope's answer is awaited on the spot, so the operation that caused an error
//! returns it. In a browser (wasm32) the answer comes from the event loop and nothing may
//! block: the answers are kept and awaited at the next readback, which returns the first error
//! any earlier operation caused (work is only ever observed through a readback).

#[cfg(target_arch = "wasm32")]
use std::{future::Future, pin::Pin, sync::Mutex};

/// A popped scope's answer, not yet awaited.
#[cfg(target_arch = "wasm32")]
type Answer = Pin<Box<dyn Future<Output = Option<wgpu::Error>> + Send>>;

/// Scope answers waiting to be read (only ever non-empty in a browser).
#[derive(Default)]
pub(crate) struct ScopeAnswers {
    #[cfg(target_arch = "wasm32")]
    pending: Mutex<Vec<Answer>>,
}

impl std::fmt::Debug for ScopeAnswers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScopeAnswers")
    }
}

impl ScopeAnswers {
    /// The error `scope` caught, where it can be known now (natively); in a browser `None`,
    /// and the answer is kept for [`ScopeAnswers::first_deferred`].
    pub(crate) fn take(&self, scope: wgpu::ErrorScopeGuard) -> Option<wgpu::Error> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            pollster::block_on(scope.pop())
        }
        #[cfg(target_arch = "wasm32")]
        {
            let answer: Answer = Box::pin(scope.pop());
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(answer);
            None
        }
    }

    /// The first error among the answers kept since the last call (always `None` natively).
    pub(crate) async fn first_deferred(&self) -> Option<wgpu::Error> {
        #[cfg(target_arch = "wasm32")]
        {
            let answers =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
            let mut first = None;
            for answer in answers {
                let caught = answer.await;
                first = first.or(caught);
            }
            first
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            None
        }
    }
}

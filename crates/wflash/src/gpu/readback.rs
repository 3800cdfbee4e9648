//! Waiting for the GPU without blocking an async executor, and without waiting forever.
//!
//! Natively a helper thread polls the device; in a browser (wasm32) nothing may block, and the
//! browser runs map callbacks from its own event loop, so the wait yields to that loop.

use std::time::Duration;

use crate::gpu::gate::DeviceGate;
use crate::{Error, Result};

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use native::wait_for;
#[cfg(target_arch = "wasm32")]
pub(crate) use web::wait_for;

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    use super::{DeviceGate, GATED_WAIT_SLICE, Result, finish};

    #[derive(Debug)]
    struct Slot<T> {
        value: Option<T>,
        waker: Option<Waker>,
    }

    /// A value produced on another thread, awaited here.
    #[derive(Debug)]
    struct Pending<T>(Arc<Mutex<Slot<T>>>);

    impl<T> Future for Pending<T> {
        type Output = T;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
            // A poisoned lock means the producer panicked; its value is still the right answer.
            let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
            match slot.value.take() {
                Some(value) => Poll::Ready(value),
                None => {
                    slot.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }
    }

    /// Runs `work` on a fresh thread and awaits its result.
    fn off_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Pending<T> {
        let shared = Arc::new(Mutex::new(Slot {
            value: None,
            waker: None,
        }));
        let producer = shared.clone();
        std::thread::spawn(move || {
            let value = work();
            let mut slot = producer.lock().unwrap_or_else(|e| e.into_inner());
            slot.value = Some(value);
            if let Some(waker) = slot.waker.take() {
                waker.wake();
            }
        });
        Pending(shared)
    }

    /// Waits (off the caller's thread) until `submission` has finished on `device` and `ready()`
    /// holds, for at most `timeout` in all.
    ///
    /// `ready` is how the caller sees its map callbacks: when several threads poll one device, the
    /// thread whose poll completes a submission runs the callbacks of every buffer it unblocks,
    /// so this thread's own `poll(Wait)` can return before another thread has finished running
    /// this thread's callbacks. Until `ready()`, keep polling.
    ///
    /// Behind a closed gate (GL) the wait goes in short slices, each inside the gate, so other
    /// threads' device work runs between them instead of waiting out the whole GPU job.
    pub(crate) async fn wait_for(
        device: &wgpu::Device,
        gate: &DeviceGate,
        submission: wgpu::SubmissionIndex,
        timeout: Duration,
        ready: impl Fn() -> bool + Send + 'static,
    ) -> Result<()> {
        let device = device.clone();
        let gate = gate.clone();
        let outcome = off_thread(move || {
            let start = std::time::Instant::now();
            let slice = if gate.is_closed() {
                GATED_WAIT_SLICE
            } else {
                timeout
            };
            loop {
                let left = timeout.saturating_sub(start.elapsed());
                let _held = gate.hold();
                match device.poll(wgpu::PollType::Wait {
                    submission_index: Some(submission.clone()),
                    timeout: Some(slice.min(left)),
                }) {
                    Ok(_) => break,
                    Err(wgpu::PollError::Timeout) if !left.is_zero() => continue,
                    Err(err) => return Err(err),
                }
            }
            while !ready() {
                if start.elapsed() > timeout {
                    return Err(wgpu::PollError::Timeout);
                }
                {
                    let _held = gate.hold();
                    device.poll(wgpu::PollType::Poll)?;
                }
                std::thread::yield_now();
            }
            Ok(())
        })
        .await;
        finish(outcome, timeout)
    }
}

#[cfg(target_arch = "wasm32")]
mod web {
    use std::time::Duration;

    use super::{DeviceGate, Result, finish};

    /// Waits until `ready()` holds, for at most `timeout`: the browser completes `submission` and
    /// runs the map callbacks between this future's polls (`poll(Wait)` does nothing there).
    pub(crate) async fn wait_for(
        device: &wgpu::Device,
        _gate: &DeviceGate,
        _submission: wgpu::SubmissionIndex,
        timeout: Duration,
        ready: impl Fn() -> bool,
    ) -> Result<()> {
        let start = web_time::Instant::now();
        let outcome = loop {
            if ready() {
                break Ok(());
            }
            if start.elapsed() > timeout {
                break Err(wgpu::PollError::Timeout);
            }
            if let Err(err) = device.poll(wgpu::PollType::Poll) {
                break Err(err);
            }
            // A macrotask, so the browser's event loop runs (and with it the map callbacks).
            gloo_timers::future::TimeoutFuture::new(1).await;
        };
        finish(outcome, timeout)
    }
}

fn finish(outcome: std::result::Result<(), wgpu::PollError>, timeout: Duration) -> Result<()> {
    match outcome {
        Ok(()) => Ok(()),
        Err(wgpu::PollError::Timeout) => Err(Error::ReadbackTimeout { timeout }),
        Err(other) => Err(Error::Internal(format!("waiting for the GPU: {other}"))),
    }
}

/// The longest one gated wait holds the device (GL), so others' uploads and calls interleave.
#[cfg(not(target_arch = "wasm32"))]
const GATED_WAIT_SLICE: Duration = Duration::from_millis(20);

//! Waiting for the GPU without blocking an async executor, and without waiting forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::{Error, Result};

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

/// Waits (off the caller's thread) until `submission` has finished on `device`, for at most `timeout`.
/// Map callbacks registered before the call have run when it returns `Ok`.
pub(crate) async fn wait_for(
    device: &wgpu::Device,
    submission: wgpu::SubmissionIndex,
    timeout: Duration,
) -> Result<()> {
    let device = device.clone();
    let outcome = off_thread(move || {
        device.poll(wgpu::PollType::Wait {
            submission_index: Some(submission),
            timeout: Some(timeout),
        })
    })
    .await;
    match outcome {
        Ok(_) => Ok(()),
        Err(wgpu::PollError::Timeout) => Err(Error::ReadbackTimeout {
            seconds: timeout.as_secs(),
        }),
        Err(other) => Err(Error::Internal(format!("waiting for the GPU: {other}"))),
    }
}

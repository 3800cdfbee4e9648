//! The engine's memory ledger: the bytes of device buffers and textures it holds, held against
//! [`crate::EngineOptions::memory_budget_bytes`].
//!
//! Every tensor the engine creates (uploads, outputs, the f32 copies around converted calls),
//! every readback staging buffer and every scratch-pool resource carries a [`Charge`] for its
//! bytes; dropping the resource drops the charge. A charge that would take the total past the
//! budget fails with [`Error::MemoryBudget`] before anything is created, so an application can
//! bound wflash's footprint the way PyTorch's `set_per_process_memory_fraction` does, and so
//! out-of-memory handling can be exercised on drivers that never report it (lavapipe
//! over-commits host memory: a real exhaustion there ends in the host's OOM killer, not an error).
//!
//! Not counted: uniform parameter blocks and per-query-row tables (tens of bytes per row), and
//! memory the driver keeps for work still in flight after the engine has let a resource go.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

#[derive(Debug)]
pub(crate) struct Ledger {
    budget: Option<u64>,
    in_use: AtomicU64,
}

impl Ledger {
    pub(crate) fn new(budget: Option<u64>) -> Arc<Ledger> {
        Arc::new(Ledger {
            budget,
            in_use: AtomicU64::new(0),
        })
    }

    pub(crate) fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Acquire)
    }

    /// Records `bytes` as held, or fails without recording anything when that would pass the
    /// budget. Concurrent charges cannot overshoot together: each one claims its bytes with a
    /// compare-and-swap on the total.
    pub(crate) fn charge(self: &Arc<Self>, bytes: u64) -> Result<Charge> {
        let mut current = self.in_use.load(Ordering::Acquire);
        loop {
            let next = current.saturating_add(bytes);
            if let Some(budget) = self.budget
                && next > budget
            {
                return Err(Error::MemoryBudget {
                    needed: bytes,
                    in_use: current,
                    budget,
                });
            }
            match self.in_use.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(Charge {
                        ledger: Arc::clone(self),
                        bytes,
                    });
                }
                Err(actual) => current = actual,
            }
        }
    }
}

/// Bytes held on the ledger for as long as this lives.
#[derive(Debug)]
pub(crate) struct Charge {
    ledger: Arc<Ledger>,
    bytes: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.ledger.in_use.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_past_the_budget_fail_and_dropped_charges_free_their_bytes() {
        let ledger = Ledger::new(Some(100));
        let a = ledger.charge(60).unwrap();
        let err = ledger.charge(41).unwrap_err();
        assert!(
            matches!(
                err,
                Error::MemoryBudget {
                    needed: 41,
                    in_use: 60,
                    budget: 100
                }
            ),
            "{err}"
        );
        assert_eq!(ledger.in_use(), 60, "a refused charge records nothing");
        let b = ledger.charge(40).unwrap();
        assert_eq!(ledger.in_use(), 100);
        drop(a);
        drop(b);
        assert_eq!(ledger.in_use(), 0);
    }

    #[test]
    fn concurrent_charges_never_pass_the_budget() {
        let ledger = Ledger::new(Some(1000));
        let held: Vec<Vec<Charge>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        let mut charges = Vec::new();
                        while let Ok(c) = ledger.charge(7) {
                            charges.push(c);
                            assert!(ledger.in_use() <= 1000);
                        }
                        charges
                    })
                })
                .collect();
            // Every thread's charges stay alive until all have joined, so none frees room
            // for another.
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(held.iter().map(Vec::len).sum::<usize>(), 1000 / 7);
        drop(held);
        assert_eq!(ledger.in_use(), 0);
    }

    #[test]
    fn no_budget_means_no_limit() {
        let ledger = Ledger::new(None);
        let _a = ledger.charge(u64::MAX / 2).unwrap();
        let _b = ledger.charge(u64::MAX / 2).unwrap();
    }
}

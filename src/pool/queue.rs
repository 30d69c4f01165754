//! The wait queue: a checkout that finds no connection waits here in FIFO order, up to
//! `query_wait_timeout`, and leaves it at once however the wait ends.

use std::sync::atomic::Ordering;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{CheckoutError, Lease, Pool, PoolSettings, PoolState};

/// One checkout's place in the wait queue. However the wait ends (answered, timed out,
/// or the checkout future dropped because the client disconnected), the entry leaves
/// the queue at once. Left in place until the next check-in, a dead entry counted as a
/// waiting client, kept `try_checkout` from handing out idle connections, and made
/// `trim_and_fill` open connections for nobody.
struct QueueSlot<'a> {
    pool: &'a Pool,
    rx: oneshot::Receiver<Result<Lease, CheckoutError>>,
    /// The sender was taken off the queue and answered; nothing to clean up.
    answered: bool,
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.rx.close();
        // A connection handed over just before the waiter left goes back to the pool
        // instead of being closed.
        if let Ok(Ok(lease)) = self.rx.try_recv() {
            lease.release();
        }
        self.pool.forget_abandoned_waiters();
    }
}

impl Pool {
    pub(super) fn push_waiter(
        st: &mut PoolState,
        front: bool,
    ) -> oneshot::Receiver<Result<Lease, CheckoutError>> {
        let (tx, rx) = oneshot::channel();
        if front {
            st.waiters.push_front(tx);
        } else {
            st.waiters.push_back(tx);
        }
        rx
    }

    pub(super) fn enqueue(&self, front: bool) -> oneshot::Receiver<Result<Lease, CheckoutError>> {
        Self::push_waiter(&mut self.state.lock(), front)
    }

    /// Waits in the queue until `deadline`.
    pub(super) async fn wait(
        &self,
        rx: oneshot::Receiver<Result<Lease, CheckoutError>>,
        deadline: Instant,
        settings: &PoolSettings,
    ) -> Result<Lease, CheckoutError> {
        self.stats.waits.fetch_add(1, Ordering::Relaxed);
        let mut slot = QueueSlot {
            pool: self,
            rx,
            answered: false,
        };
        match tokio::time::timeout_at(deadline, &mut slot.rx).await {
            Ok(Ok(r)) => {
                slot.answered = true;
                r
            }
            Ok(Err(_)) => {
                slot.answered = true;
                Err(CheckoutError::Closed)
            }
            Err(_) => {
                // A connection may have been handed over just as the timer fired.
                slot.rx.close();
                match slot.rx.try_recv() {
                    Ok(r) => {
                        slot.answered = true;
                        r
                    }
                    Err(_) if self.breaker_open() => Err(self.unavailable()),
                    Err(_) if self.is_paused() => Err(CheckoutError::Paused {
                        waited: settings.query_wait_timeout,
                    }),
                    Err(_) => {
                        self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                        self.m.checkout_timeouts.inc();
                        let size = Self::limit(&self.state.lock(), settings);
                        Err(CheckoutError::Timeout {
                            waited: settings.query_wait_timeout,
                            size,
                        })
                    }
                }
            }
        }
    }

    /// Drops wait-queue entries whose waiter is gone (timed out, or its client left).
    fn forget_abandoned_waiters(&self) {
        self.state.lock().waiters.retain(|w| !w.is_closed());
    }
}

//! The wait queue: a checkout that finds no connection waits here in FIFO order, with a
//! deadline the pool's maintenance tick enforces (see `Waiter`), and leaves it at once
//! however the wait ends.

use std::sync::atomic::Ordering;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{CheckoutError, Lease, Pool, PoolSettings, PoolState, Waiter};

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
        deadline: Instant,
    ) -> oneshot::Receiver<Result<Lease, CheckoutError>> {
        let (tx, rx) = oneshot::channel();
        let w = Waiter { tx, deadline };
        if front {
            st.waiters.push_front(w);
        } else {
            st.waiters.push_back(w);
        }
        rx
    }

    pub(super) fn enqueue(
        &self,
        front: bool,
        deadline: Instant,
    ) -> oneshot::Receiver<Result<Lease, CheckoutError>> {
        Self::push_waiter(&mut self.state.lock(), front, deadline)
    }

    /// Waits in the queue until answered: a connection, or an error (the pool's tick
    /// answers a waiter past its deadline, see `Waiter`).
    pub(super) async fn wait(
        &self,
        rx: oneshot::Receiver<Result<Lease, CheckoutError>>,
    ) -> Result<Lease, CheckoutError> {
        self.stats.waits.fetch_add(1, Ordering::Relaxed);
        let mut slot = QueueSlot {
            pool: self,
            rx,
            answered: false,
        };
        let r = (&mut slot.rx).await;
        slot.answered = true;
        r.unwrap_or(Err(CheckoutError::Closed))
    }

    /// Answers every waiter past its deadline with the reason it got nothing: the
    /// breaker, a pause, or (counted as a timeout) a pool that stayed full.
    pub(super) fn expire_waiters(&self, settings: &PoolSettings, now: Instant) {
        let mut expired = Vec::new();
        let size = {
            let mut st = self.state.lock();
            if st.waiters.iter().all(|w| w.deadline > now) {
                return;
            }
            let mut i = 0;
            while i < st.waiters.len() {
                if st.waiters[i].deadline <= now {
                    expired.extend(st.waiters.remove(i));
                } else {
                    i += 1;
                }
            }
            Self::limit(&st, settings)
        };
        let waited = settings.query_wait_timeout;
        for w in expired {
            let e = if self.breaker_open() {
                self.unavailable()
            } else if self.is_paused() {
                CheckoutError::Paused { waited }
            } else {
                CheckoutError::Timeout { waited, size }
            };
            let timeout = matches!(e, CheckoutError::Timeout { .. });
            // A waiter that already left is not counted.
            if w.tx.send(Err(e)).is_ok() && timeout {
                self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                self.m.checkout_timeouts.inc();
            }
        }
    }

    /// Drops wait-queue entries whose waiter is gone (timed out, or its client left).
    fn forget_abandoned_waiters(&self) {
        self.state.lock().waiters.retain(|w| !w.tx.is_closed());
    }
}

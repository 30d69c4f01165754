//! A session's own counters, and the pool gauges it keeps right.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;

use crate::pool::Pool;

/// Counted locally and added to the shared metrics at transaction boundaries, so the
/// per-message path touches no shared cache lines.
#[derive(Default)]
pub(super) struct SessionStats {
    pub(super) msgs_c2s: u64,
    pub(super) msgs_s2c: u64,
    pub(super) bytes_c2s: u64,
    pub(super) bytes_s2c: u64,
    /// Start of each Query/Sync in flight, answered in order by ReadyForQuery.
    pub(super) query_starts: std::collections::VecDeque<Instant>,
    /// Start of the current transaction (first request after idle).
    pub(super) txn_start: Option<Instant>,
    /// The time of this relay turn, read on first use: one clock read serves every
    /// timestamp a transaction takes in one turn (request start, checkout, check-in).
    pub(super) clock: Option<Instant>,
}

impl SessionStats {
    pub(super) fn now(&mut self) -> Instant {
        *self.clock.get_or_insert_with(Instant::now)
    }
}

/// Keeps the pool's client gauges right however the session ends.
pub(super) struct PoolClientGuard {
    pub(super) pool: Arc<Pool>,
    pub(super) active: bool,
}

impl Drop for PoolClientGuard {
    fn drop(&mut self) {
        self.pool.clients.fetch_sub(1, Ordering::Relaxed);
        if self.active {
            self.pool.clients_active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

//! Check-in: a connection back from a client goes to the oldest waiter or the idle list,
//! a dirty or broken one is closed, and the pool trims itself to its limit and opens
//! connections for waiters after anything that changed what it may hold.

use std::sync::Arc;

use tokio::time::Instant;

use super::CloseReason;
use super::{drop_later, Idle, Lease, Pool, PoolSettings, MAX_CONN_ERRORS};
use crate::server::ServerConn;

impl Pool {
    /// Returns a connection after a transaction: to the oldest waiter, else idle.
    pub(super) fn checkin(self: Arc<Self>, mut conn: ServerConn, now: Instant) {
        let settings = self.settings();
        conn.last_used = now;
        if conn.errors > MAX_CONN_ERRORS {
            tracing::warn!(pool = %self.name, server = conn.id, errors = conn.errors, "retiring a server connection that keeps failing");
            self.discarded(conn, CloseReason::Errors);
            return;
        }
        if super::past_lifetime(&conn, &settings, now) {
            self.discarded(conn, CloseReason::Lifetime);
            return;
        }
        // Just used cleanly: known good.
        self.put_back(conn, now, &settings);
    }

    /// Hands a good connection to the oldest waiter, else to the idle list (kept in
    /// last-use order), unless the pool is over its limit. A headroom sample wanted by a
    /// contended pool (which has no idle connection to run it on) takes it first.
    pub(super) fn put_back(
        self: &Arc<Self>,
        conn: ServerConn,
        checked: Instant,
        settings: &Arc<PoolSettings>,
    ) {
        let mut st = self.state.lock();
        st.last_good = Some(checked);
        let limit = Self::limit(&st, settings);
        if st.sample_at_checkin && !st.closed && st.open <= limit {
            st.sample_at_checkin = false;
            st.sampling = true;
            st.testing += 1;
            drop(st);
            self.start_sample(conn, settings);
            return;
        }
        if st.closed || st.open > limit {
            st.open -= 1;
            let closed = st.closed;
            drop(st);
            self.closed_metric(if closed {
                CloseReason::Closed
            } else if limit < settings.max_size {
                CloseReason::Congestion
            } else {
                CloseReason::Resize
            });
            drop_later(conn);
            return;
        }
        let mut conn = conn;
        if !st.paused && !st.waiters.is_empty() {
            // A lease only for a waiter: the usual check-in goes straight to the idle list.
            let mut lease = self.lease(conn);
            while let Some(w) = st.waiters.pop_front() {
                match w.send(Ok(lease)) {
                    Ok(()) => return,
                    // That waiter gave up (timeout or client gone): try the next one.
                    Err(Ok(back)) => lease = back,
                    Err(Err(_)) => return,
                }
            }
            match lease.conn.take() {
                Some(c) => conn = c,
                None => return,
            }
        }
        let at = st
            .idle
            .iter()
            .rposition(|i| i.conn.last_used <= conn.last_used)
            .map_or(0, |p| p + 1);
        st.idle.insert(at, Idle { conn, checked });
    }

    /// Accounts for a connection that is closed rather than returned.
    pub(super) fn discarded(self: Arc<Self>, conn: ServerConn, reason: CloseReason) {
        tracing::debug!(pool = %self.key, server = conn.id, %reason, "closing server connection");
        self.closed_metric(reason);
        self.state.lock().open -= 1;
        drop_later(conn);
        self.trim_and_fill();
    }

    /// Closes idle connections above the limit, hands idle ones to waiters (after a
    /// resume), and opens connections for waiters while under the limit. Opens nothing
    /// while the breaker is not closed: recovery is the probe's job.
    pub(super) fn trim_and_fill(self: &Arc<Self>) {
        let settings = self.settings();
        let breaker_closed = !self.breaker_open();
        let now = Instant::now();
        let mut st = self.state.lock();
        let limit = Self::limit(&st, &settings);
        while st.open > limit && !st.idle.is_empty() {
            // Least recently used first.
            let idle = st.idle.remove(0);
            st.open -= 1;
            self.closed_metric(if limit < settings.max_size {
                CloseReason::Congestion
            } else {
                CloseReason::Resize
            });
            drop_later(idle.conn);
        }
        if st.paused || st.closed {
            return;
        }
        while !st.waiters.is_empty() {
            let Some(idle) = st.idle.pop() else { break };
            let idle_for = now.duration_since(idle.checked);
            if let Some(reason) = Self::unusable(&idle, now, idle_for, &settings) {
                self.close_unusable(&mut st, idle, reason);
                continue;
            }
            let mut lease = self.lease(idle.conn);
            while let Some(w) = st.waiters.pop_front() {
                match w.send(Ok(lease)) {
                    Ok(()) => {
                        lease = Lease::empty(self.clone());
                        break;
                    }
                    Err(Ok(back)) => lease = back,
                    Err(Err(_)) => {
                        lease = Lease::empty(self.clone());
                        break;
                    }
                }
            }
            if let Some(conn) = lease.conn.take() {
                st.idle.push(Idle { conn, checked: now });
                break;
            }
        }
        let congested = st.congested_until.is_some_and(|t| now < t);
        let wanted = st.waiters.len().min(limit.saturating_sub(st.open));
        if wanted == 0 || congested || !breaker_closed {
            return;
        }
        st.open += wanted;
        st.connecting += wanted;
        drop(st);
        self.spawn_connects(wanted, &settings, true);
    }
}

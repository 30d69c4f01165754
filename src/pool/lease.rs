//! A leased server connection: counted while out, and given back, retired or counted
//! as closed whichever way it ends, so no code path can leak a pool slot.

use super::CloseReason;
use super::*;

/// Exclusive use of one server connection. Release it to return it to the pool; dropping
/// it closes the connection.
pub struct Lease {
    pub(super) conn: Option<ServerConn>,
    pub(super) pool: Arc<Pool>,
    /// Handed to a client and counted in `Pool::leased` (not a lease in transit to a
    /// waiter or a check).
    pub(super) counted: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("conn", &self.conn).finish()
    }
}

impl Lease {
    pub(super) fn empty(pool: Arc<Pool>) -> Lease {
        Lease {
            conn: None,
            pool,
            counted: false,
        }
    }

    /// The lease reaches its client: it counts as demand until released.
    pub(super) fn count(&mut self) {
        if !self.counted {
            self.counted = true;
            let n = self.pool.leased.fetch_add(1, Ordering::Relaxed) + 1;
            // A plain load first: the peak rarely moves, and fetch_max is a CAS loop.
            if self.pool.peak_leased.load(Ordering::Relaxed) < n {
                self.pool.peak_leased.fetch_max(n, Ordering::Relaxed);
            }
        }
    }

    pub(super) fn uncount(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.pool.leased.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn conn(&mut self) -> &mut ServerConn {
        // `conn` is only None inside release/drop, never while the lease is usable.
        self.conn.as_mut().unwrap_or_else(|| unreachable!())
    }

    pub fn conn_ref(&self) -> &ServerConn {
        self.conn.as_ref().unwrap_or_else(|| unreachable!())
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Counts an I/O or protocol error on this connection that did not end it; one with
    /// more than `MAX_CONN_ERRORS` is retired when released.
    pub fn note_error(&mut self) {
        if let Some(c) = self.conn.as_mut() {
            c.errors += 1;
        }
    }

    /// The server refused a write as read-only (25006). On a pool that needs a
    /// primary, its host has failed over or been demoted: the host's role is checked
    /// again at the next connect (others are tried first), and this connection is
    /// retired when released.
    pub fn note_read_only(&mut self) {
        let Some(c) = self.conn.as_mut() else { return };
        let hosts = &self.pool.settings().identity.hosts;
        if !hosts.attrs.accepts(crate::server::hosts::Role {
            in_recovery: false,
            read_only: true,
        }) {
            tracing::warn!(pool = %self.pool.name, host = %hosts.get(c.host_index), "the server refused a write as read-only; checking the upstream's roles again");
            hosts.suspect(c.host_index);
            c.errors = MAX_CONN_ERRORS + 1;
        }
    }

    /// Returns a clean connection (ReadyForQuery 'I', nothing in flight) to the pool.
    pub fn release(self) {
        self.release_at(Instant::now());
    }

    /// Returns the connection, last used at `now` (the caller's clock reading).
    pub fn release_at(mut self, now: Instant) {
        self.uncount();
        if let Some(conn) = self.conn.take() {
            self.pool.clone().checkin(conn, now);
        }
    }

    /// Closes the connection instead of returning it (broken or dirty state).
    pub fn discard(mut self, reason: CloseReason) {
        self.uncount();
        if let Some(conn) = self.conn.take() {
            self.pool.clone().discarded(conn, reason);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.uncount();
        if let Some(conn) = self.conn.take() {
            self.pool.clone().discarded(conn, CloseReason::Dropped);
        }
    }
}

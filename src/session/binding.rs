//! Binding a server to the session: waiting for one in the pool queue (while watching
//! the client), attaching it, and giving it back at a transaction boundary.

use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::tracker::Req;
use super::{ReadReady, Session};
use crate::cancel::CancelTarget;
use crate::clients::ClientPhase;
use crate::config::PoolMode;
use crate::pool::CloseReason;
use crate::pool::{Lease, Pool};
use crate::protocol::messages;
use crate::server::params::{self, sync_sql};

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    /// Takes a server for the pending request, watching the client meanwhile so one
    /// that disconnects leaves the queue. Returns false if the client went away.
    pub(super) async fn acquire(&mut self) -> bool {
        let pool = self.pool.clone();
        pool.clients_waiting.fetch_add(1, Ordering::Relaxed);
        // The wait is timed from this turn's clock reading: the request's arrival.
        let now = self.stats.now();
        if let Some(info) = self.entry.as_ref().map(|e| &e.info) {
            info.set_phase(ClientPhase::Waiting);
            info.start_wait(now);
        }
        let _waiting = WaitingGuard(&pool);
        let checkout = pool.checkout_since(now);
        tokio::pin!(checkout);
        let result = loop {
            tokio::select! {
                r = &mut checkout => break r,
                gone = poll_fn(|cx| self.poll_client_while_waiting(cx)) => {
                    if gone {
                        self.end_wait();
                        return false;
                    }
                }
            }
        };
        self.end_wait();
        // The turn's clock reading is from before the wait.
        self.stats.clock = None;
        match result {
            Ok(lease) => {
                self.attach(lease);
                true
            }
            Err(e) => {
                let err = self.pool.client_error(&e);
                self.shared.metrics.error("proxy", err.code);
                self.pool.m.error("proxy");
                if let Some(info) = self.entry.as_ref().map(|e| &e.info) {
                    info.set_phase(ClientPhase::Idle);
                }
                tracing::info!(error = %err, "checkout failed");
                self.answer_locally(err);
                true
            }
        }
    }

    fn end_wait(&self) {
        if let Some(e) = &self.entry {
            e.info.end_wait();
        }
    }

    /// Reads from the client while it waits for a server. Ready(true): it went away (or
    /// was killed from the console).
    pub(super) fn poll_client_while_waiting(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        // KILL wakes the session through its entry's waker.
        if let Some(e) = &self.entry {
            e.info.waker.register(cx.waker());
        }
        if self.killed() {
            return Poll::Ready(true);
        }
        if let Poll::Ready(Err(_)) = self.s_in.poll_drain(cx, &mut self.client) {
            return Poll::Ready(true);
        }
        loop {
            if !self.c_in.wants_read() {
                return Poll::Pending;
            }
            match self.c_in.poll_fill(cx, &mut self.client) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(true),
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Binds a server: resets tracking, points the cancel key at it and queues the SETs
    /// that give it this client's settings.
    pub(super) fn attach(&mut self, mut lease: Lease) {
        let now = self.stats.now();
        if let Some(info) = self.entry.as_ref().map(|e| &e.info) {
            info.set_phase(ClientPhase::Active);
            info.bind_server(lease.conn().backend_pid, lease.conn().created, now);
        }
        if let Some(g) = self.gauge.as_mut() {
            if !g.active {
                g.active = true;
                self.pool.clients_active.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.tracker.reset();
        self.s_in.new_source();
        self.server_fatal = false;
        self.server_eof = false;
        let conn = lease.conn();
        if self.mode == PoolMode::Session {
            conn.dirty = true;
        }
        self.cancel.slot.set(Some(CancelTarget {
            host: conn.host.clone(),
            port: conn.port,
            pid: conn.backend_pid,
            secret: conn.backend_secret,
        }));
        // Servers last used by a client with the same settings (the common case) need
        // no comparison at all.
        let (sync, raw_sql) = if conn.params_fp == self.wanted_fp {
            (None, String::new())
        } else {
            (
                sync_sql(&self.wanted, &conn.params, &conn.original_params),
                params::sync_raw_sql(super::settings::raw(&self.sql_sets), &mut conn.raw_settings),
            )
        };
        conn.params_fp = self.wanted_fp;
        let sync = match (sync, raw_sql.is_empty()) {
            (Some((sql, changes)), _) => Some((sql + &raw_sql, changes)),
            (None, false) => Some((raw_sql, Vec::new())),
            (None, true) => None,
        };
        if let Some((sql, changes)) = sync {
            for (k, v) in changes {
                match v {
                    Some(v) => {
                        conn.params.insert(k, v);
                    }
                    None => match conn.original_params.get(&k).cloned() {
                        Some(o) => {
                            conn.params.insert(k, o);
                        }
                        None => {
                            conn.params.remove(&k);
                        }
                    },
                }
            }
            let mut q = BytesMut::with_capacity(sql.len() + 6);
            messages::fe_query(&mut q, &sql);
            self.c_in.push_own(&q);
            self.tracker
                .push(Req::Injected, &mut self.emit, &mut self.fx);
        }
        self.server = Some(lease);
    }

    /// Returns the server to the pool at a transaction boundary.
    pub(super) fn release(&mut self) {
        self.cancel.slot.set(None);
        self.flush_stats();
        self.set_inactive();
        let Some(lease) = self.server.take() else {
            return;
        };
        // After a query_timeout cancel the server is not reused: a cancel that arrives
        // late must not hit another client's query.
        if !self.s_in.unscanned().is_empty()
            || self.tracker.injected_failed
            || std::mem::take(&mut self.timers.discard_server)
        {
            // Bytes after the final ReadyForQuery, or a failed state sync: not clean.
            self.s_in.drop_unscanned();
            lease.discard(CloseReason::UncleanAtRelease);
            if let Some(e) = self.tracker.injected_error.take() {
                // The client's settings cannot be applied on this server: end the
                // session with PostgreSQL's words rather than discard a server (and
                // open another) on every transaction.
                self.unusable_settings = Some(e);
            }
        } else if self.cancel.slot.in_flight() > 0 {
            // A cancel for this client's last query is still on its way: the server
            // joins the pool only after it was delivered.
            let slot = self.cancel.slot.clone();
            tokio::spawn(async move {
                slot.wait_delivered(Duration::from_secs(5)).await;
                lease.release();
            });
        } else {
            lease.release_at(self.stats.now());
        }
        self.tracker.reset();
    }

    pub(super) fn set_inactive(&mut self) {
        if let Some(info) = self.entry.as_ref().map(|e| &e.info) {
            info.set_phase(ClientPhase::Idle);
            info.server_pid.store(0, Ordering::Relaxed);
        }
        if let Some(g) = self.gauge.as_mut() {
            if g.active {
                g.active = false;
                self.pool.clients_active.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// Takes the client out of the waiting gauge when its checkout ends, however it ends.
struct WaitingGuard<'a>(&'a Arc<Pool>);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.clients_waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

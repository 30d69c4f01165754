//! One client's session: opening and login, then the relay loop that binds server
//! connections from the pool (for the whole session, or per transaction) and forwards
//! frames between the two sides.

mod admission;
mod backend;
mod binding;
mod ending;
pub mod frontend;
pub mod handshake;
mod named;
mod opening;
mod pinning;
mod ready;
pub mod relay;
pub mod sessionstate;
pub mod setstmt;
mod settings;
mod shared;
mod start;
mod stats;
pub mod timers;
pub mod tracker;
mod validate;

use crate::server::params::Settings;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::cancel::CancelGuard;
use crate::clients::ClientEntry;
use crate::config::PoolMode;
use crate::error::{sqlstate, ClientError};
use crate::lifecycle::Phase;
use crate::pool::CloseReason;
use crate::pool::{Lease, Pool};
use crate::protocol::framing::frontend_header;
use crate::protocol::messages;
use named::ClientStmts;
pub use opening::{serve, Accepted};
pub use ready::ReadReady;
use relay::{BodyMode, Inbound};
pub use shared::{ClientStream, Console, Shared};
use stats::{PoolClientGuard, SessionStats};
use tracker::{Effects, Tracker, TxnStatus};

/// What the relay loop stopped for.
#[derive(Debug)]
pub(crate) enum Step {
    /// Client data waits and no server is bound (transaction mode).
    NeedServer,
    /// The transaction ended cleanly; the server can go back to the pool.
    Release,
    ClientGone,
    ClientProtocol(ClientError),
    ServerGone(String),
    /// The proxy is draining and this client is at a transaction boundary.
    Shutdown,
    /// The drain deadline passed.
    ForceShutdown,
    /// The admin console's KILL for this client's database.
    Killed,
    /// A `limits.*_timeout` expired.
    Timeout(timers::Expired),
}

pub struct Session<C> {
    client: C,
    #[allow(dead_code)] // metrics and lifecycle hooks read it
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    mode: PoolMode,
    /// At most 1 GiB (validated): u32 keeps every idle session smaller.
    max_message: u32,
    c_in: Inbound,
    s_in: Inbound,
    /// A lease is two pointers (the server connection itself is boxed).
    server: Option<Lease>,
    tracker: Tracker,
    /// The client's named statements (transaction mode), by the client's name.
    stmts: ClientStmts,
    /// Settings from the startup packet: what RESET ALL / DISCARD ALL go back to.
    /// Shared with `wanted` until the client changes a setting (copy on write).
    startup_settings: Arc<Settings>,
    /// Settings this client expects on whatever server it runs on.
    wanted: Arc<Settings>,
    /// Settings changed with SQL SET (None until the first one).
    sql_sets: Option<Box<settings::SqlSets>>,
    /// Fingerprint of `wanted` and the SQL-set settings, recomputed when they change.
    wanted_fp: u64,
    /// Requests (Query/Sync) sent and answered, to match pending SETs to their answers.
    requests_sent: u64,
    requests_answered: u64,
    /// The current transaction saw an error or ended with ROLLBACK.
    txn_failed: bool,
    cancel: CancelGuard,
    /// Drop client messages up to Sync (after the proxy answered an error itself).
    skip_until_sync: bool,
    /// A failed checkout was reported; the next Sync is answered locally.
    local_sync_owed: bool,
    /// Extended-protocol messages were forwarded since the last Sync.
    batch_open: bool,
    /// The server sent a FATAL error (it is about to close).
    server_fatal: bool,
    server_eof: bool,
    emit: BytesMut,
    fx: Effects,
    stats: SessionStats,
    gauge: Option<PoolClientGuard>,
    draining: bool,
    /// The settings sync failed on a server (SQLSTATE, message): the session ends at
    /// this transaction boundary.
    unusable_settings: Option<Box<(String, String)>>,
    /// This client's entry in the admin console's client list (removed on drop).
    entry: Option<ClientEntry>,
    /// Idle, idle-in-transaction and query timeouts.
    timers: timers::Timers,
    /// Transaction mode: what to do about statements that leave session state.
    state_policy: crate::config::SessionStatePolicy,
    /// Session state this client may hold on its server (None for nearly every client).
    pin: Option<Box<pinning::PinState>>,
}

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    /// Relays until the session ends, then closes the client side: close_notify (and
    /// what TLS buffered) for TLS, FIN for plain TCP.
    async fn run_to_end(&mut self) {
        let client_closed = self.run().await;
        if client_closed && !self.client.close_needs_shutdown() {
            // Nothing left to say and nothing unread: dropping the socket sends the FIN,
            // without a shutdown() call per connection (connection churn).
            return;
        }
        let _ = Box::pin(tokio::time::timeout(
            Duration::from_secs(1),
            self.client.shutdown(),
        ))
        .await;
    }

    /// The relay loop. Everything but the byte pump is boxed on demand, so the future
    /// an idle client parks in stays small (RSS per idle client).
    /// Returns whether the session ended because the client closed (or said Terminate).
    async fn run(&mut self) -> bool {
        loop {
            let step = poll_fn(|cx| self.poll_step(cx)).await;
            if !matches!(step, Step::Release) {
                let client_closed = matches!(step, Step::ClientGone);
                if Box::pin(self.handle(step)).await {
                    return client_closed;
                }
                continue;
            }
            // Moved out before the next await, so the future keeps no room for a Step
            // (it is most of this future's size, which every idle client's task holds).
            drop(step);
            // Nearly every client holds no session state: no future to box.
            if self.pin.is_some() && Box::pin(self.keep_server()).await {
                // Pinned: the server stays with this client for the next transaction.
                continue;
            }
            self.release();
            if let Some(e) = self.unusable_settings.take() {
                Box::pin(self.end_unusable_settings(e)).await;
                return false;
            }
        }
    }

    /// Handles a step that needs waiting; true when the session is over.
    async fn handle(&mut self, step: Step) -> bool {
        {
            match step {
                Step::NeedServer => {
                    if !self.acquire().await {
                        if self.killed() {
                            self.end_killed().await;
                        } else {
                            self.finish_client_gone().await;
                        }
                        return true;
                    }
                }
                Step::Release => self.release(),
                Step::ClientGone => {
                    self.finish_client_gone().await;
                    return true;
                }
                Step::ClientProtocol(e) => {
                    self.shared.metrics.error("client", e.code);
                    self.pool.m.error("client");
                    tracing::info!(error = %e, "closing client after protocol error");
                    let _ = self.flush_client().await;
                    let _ = self.client.write_all(&e.to_bytes()).await;
                    self.finish_client_gone().await;
                    return true;
                }
                Step::Shutdown => {
                    let _ = self.flush_client().await;
                    self.finish_client_gone().await;
                    self.shared.metrics.shutdown_clients_closed.inc();
                    let e = ClientError::fatal(
                        sqlstate::ADMIN_SHUTDOWN,
                        "pgsidecar is shutting down; reconnect to continue",
                    );
                    let _ = self.client.write_all(&e.to_bytes()).await;
                    return true;
                }
                Step::Timeout(what) => {
                    self.on_timeout(what).await;
                    return true;
                }
                Step::Killed => {
                    self.end_killed().await;
                    return true;
                }
                Step::ForceShutdown => {
                    if let Some(lease) = self.server.take() {
                        lease.discard(CloseReason::Shutdown);
                    }
                    self.set_inactive();
                    let _ = self.flush_client().await;
                    self.shared.metrics.shutdown_clients_closed.inc();
                    let e = ClientError::fatal(
                        sqlstate::ADMIN_SHUTDOWN,
                        "terminating connection: pgsidecar shutdown_timeout reached before this transaction finished",
                    );
                    let _ = self.client.write_all(&e.to_bytes()).await;
                    return true;
                }
                Step::ServerGone(reason) => {
                    let host = self.server.as_ref().map(|l| {
                        let c = l.conn_ref();
                        format!("{}:{}", c.host, c.port)
                    });
                    tracing::warn!(%reason, pool = %self.pool.key, host = host.as_deref().unwrap_or("?"), "server connection lost");
                    if let Some(lease) = self.server.take() {
                        lease.discard(CloseReason::ServerLost);
                    }
                    let _ = self.flush_client().await;
                    if !self.server_fatal {
                        let e = ClientError::fatal(
                            sqlstate::CONNECTION_FAILURE,
                            format!(
                                "pgsidecar: the server connection{} was lost while this client was using it (the database restarted, failed over or became unreachable); any open transaction was rolled back",
                                host.map(|h| format!(" to {h}")).unwrap_or_default()
                            ),
                        )
                        .with_hint("reconnect and retry the transaction: new connections go to a host that works");
                        let _ = self.client.write_all(&e.to_bytes()).await;
                    }
                    return true;
                }
            }
        }
        false
    }

    /// Writes everything queued for the client (best effort, bounded in time).
    async fn flush_client(&mut self) -> std::io::Result<()> {
        let fut = poll_fn(|cx| {
            let Session { s_in, client, .. } = self;
            s_in.poll_drain(cx, client)
        });
        match tokio::time::timeout(Duration::from_secs(5), fut).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Answers the pending request with `err` without a server: a Query gets the error
    /// and ReadyForQuery; an extended batch gets the error now and ReadyForQuery at Sync.
    fn answer_locally(&mut self, err: ClientError) {
        let mut out = BytesMut::new();
        err.encode(&mut out);
        match frontend_header(self.c_in.unscanned(), self.max_message as usize) {
            Ok(Some(h)) if h.tag == b'Q' || h.tag == b'F' => {
                self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
                messages::ready_for_query(&mut out, b'I');
            }
            _ => self.local_sync_owed = true,
        }
        self.s_in.push_own(&out);
    }

    /// Adds the locally counted traffic to the shared metrics.
    fn flush_stats(&mut self) {
        let m = &self.shared.metrics;
        let s = &mut self.stats;
        if s.msgs_c2s > 0 {
            m.messages_c2s.inc_by(std::mem::take(&mut s.msgs_c2s));
            self.pool.m.bytes_received.inc_by(s.bytes_c2s);
            m.bytes_c2s.inc_by(std::mem::take(&mut s.bytes_c2s));
        }
        if s.msgs_s2c > 0 {
            m.messages_s2c.inc_by(std::mem::take(&mut s.msgs_s2c));
            self.pool.m.bytes_sent.inc_by(s.bytes_s2c);
            m.bytes_s2c.inc_by(std::mem::take(&mut s.bytes_s2c));
        }
        s.query_starts.clear();
    }

    /// At a transaction boundary: a draining proxy may close this client here.
    fn at_boundary(&self) -> bool {
        let quiet_input = self.c_in.unscanned().is_empty() && !self.local_sync_owed;
        match self.mode {
            // A pinned client holds its server between transactions, as in session mode.
            PoolMode::Transaction if !self.pinned() => self.server.is_none() && quiet_input,
            _ => {
                quiet_input
                    && self.tracker.is_empty()
                    && self.tracker.status == TxnStatus::Idle
                    && !self.batch_open
                    && self.c_in.body_left == 0
            }
        }
    }

    /// Checks the drain: Some(step) when this session must end now. The waker is
    /// registered first, so a drain that starts after the check still wakes this task.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Option<Step> {
        if let Some(e) = &self.entry {
            e.info.waker.register(cx.waker());
            if e.info.killed.load(std::sync::atomic::Ordering::Relaxed) {
                return Some(Step::Killed);
            }
        }
        match self.shared.lifecycle.phase() {
            Phase::Running | Phase::Unready => None,
            Phase::Drain => {
                self.draining = true;
                self.at_boundary().then_some(Step::Shutdown)
            }
            Phase::Force => Some(if self.at_boundary() {
                Step::Shutdown
            } else {
                Step::ForceShutdown
            }),
        }
    }

    /// Moves bytes both ways until something needs the session's attention.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        self.stats.clock = None;
        // Registering for the shutdown signal once per wake-up is enough; the boundary
        // check inside the loop catches the moment a draining client becomes idle.
        if let Some(step) = self.poll_shutdown(cx) {
            return Poll::Ready(step);
        }
        loop {
            if self.draining && self.at_boundary() {
                return Poll::Ready(Step::Shutdown);
            }
            let mut progress = false;
            if let Some(lease) = self.server.as_mut() {
                if let Poll::Ready(Err(e)) = self.c_in.poll_drain(cx, &mut lease.conn().stream) {
                    return Poll::Ready(Step::ServerGone(e.to_string()));
                }
            }
            if let Poll::Ready(Err(_)) = self.s_in.poll_drain(cx, &mut self.client) {
                return Poll::Ready(Step::ClientGone);
            }
            if self.server.is_none() && self.c_in.has_output() {
                // Nothing queued towards a server may wait for one: it would hold the
                // buffer (and the client) until the next checkout.
                self.c_in.discard_output();
            }
            // An idle client holds no read buffer: poll_fill takes one only when there
            // is something to read.
            if self.c_in.wants_read() {
                match self.c_in.poll_fill(cx, &mut self.client) {
                    Poll::Ready(Ok(_)) => progress = true,
                    Poll::Ready(Err(_)) => return Poll::Ready(Step::ClientGone),
                    Poll::Pending => {}
                }
            }
            let client_msgs = match self.scan_client() {
                Ok((p, None)) => {
                    progress |= p;
                    p
                }
                Ok((_, Some(step))) => return Poll::Ready(step),
                Err(e) => return Poll::Ready(Step::ClientProtocol(e)),
            };
            if self.server.is_some() && self.s_in.wants_read() {
                if let Some(lease) = self.server.as_mut() {
                    match self.s_in.poll_fill(cx, &mut lease.conn().stream) {
                        Poll::Ready(Ok(0)) => {
                            self.server_eof = true;
                            progress = true;
                        }
                        Poll::Ready(Ok(_)) => progress = true,
                        Poll::Ready(Err(e)) => return Poll::Ready(Step::ServerGone(e.to_string())),
                        Poll::Pending => {}
                    }
                }
            }
            match self.scan_server() {
                Ok((p, None)) => progress |= p,
                Ok((_, Some(step))) => return Poll::Ready(step),
                Err(reason) => return Poll::Ready(Step::ServerGone(reason)),
            }
            self.update_timer(client_msgs);
            if self.server_eof {
                return Poll::Ready(Step::ServerGone("server closed the connection".into()));
            }
            // At end of input, bytes the scan could not use are a message cut short:
            // nothing can complete it, so waiting would pin the server forever.
            if self.c_in.eof && (self.c_in.unscanned().is_empty() || !client_msgs) {
                return Poll::Ready(Step::ClientGone);
            }
            if self.c_in.eof && self.server.is_none() {
                return Poll::Ready(Step::ClientGone);
            }
            if !progress {
                if let Some(step) = self.poll_timer(cx) {
                    return Poll::Ready(step);
                }
                if self.server.is_none() {
                    self.s_in.recycle();
                    if self.c_in.unscanned().is_empty() && self.c_in.body_left == 0 {
                        self.c_in.recycle();
                    }
                }
                return Poll::Pending;
            }
        }
    }

    /// Applies what the tracker learned, and queues its synthetic answers.
    fn apply_effects(&mut self) {
        if !self.emit.is_empty() {
            self.s_in.push_own(&self.emit);
            self.emit.clear();
        }
        let Some(fx) = self.fx.take() else {
            return;
        };
        if let Some(lease) = self.server.as_mut() {
            for &id in &fx.unprepared {
                lease.conn().prepared.remove(id);
            }
        }
        for name in &fx.forget {
            self.stmts.remove(name);
        }
    }
}

#[cfg(test)]
mod size_tests;

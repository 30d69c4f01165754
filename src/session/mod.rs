//! One client's session: opening and login, then the relay loop that binds server
//! connections from the pool (for the whole session, or per transaction) and forwards
//! frames between the two sides.

pub mod frontend;
pub mod handshake;
pub mod relay;
pub mod setstmt;
pub mod timers;
pub mod tracker;

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::cancel::{CancelGuard, CancelTarget};
use crate::clients::{self, ClientInfo};
use crate::config::PoolMode;
use crate::error::{sqlstate, ClientError, Severity};
use crate::pool::{Lease, Pool, PoolKey};
use crate::protocol::framing::{backend_header, be, frontend_header, FrameError};
use crate::protocol::messages;
use crate::proxy::Shared;
use crate::server::params::{self, sync_sql};
use crate::server::prepared::StmtDef;
use handshake::{Login, Opening};
use relay::{BodyMode, Inbound};
use tracker::{Effects, Req, Tracker};

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
    /// A `limits.*_timeout` expired.
    Timeout(timers::Expired),
}

pub struct Session<C> {
    client: C,
    #[allow(dead_code)] // metrics and lifecycle hooks read it
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    mode: PoolMode,
    max_message: usize,
    c_in: Inbound,
    s_in: Inbound,
    /// Boxed: a Lease holds a whole server connection, and idle clients hold none.
    server: Option<Box<Lease>>,
    tracker: Tracker,
    /// The client's named statements (transaction mode), by the client's name.
    stmts: HashMap<Box<[u8]>, Arc<StmtDef>>,
    /// Settings from the startup packet: what RESET ALL / DISCARD ALL go back to.
    startup_settings: HashMap<String, String>,
    /// Settings this client expects on whatever server it runs on.
    wanted: HashMap<String, String>,
    /// Settings changed with SQL SET that the server does not report (transaction mode).
    wanted_raw: params::RawSettings,
    /// Fingerprint of `wanted` and `wanted_raw`, recomputed when they change.
    wanted_fp: u64,
    /// SET/RESET statements sent in the current transaction, applied to `wanted_raw`
    /// when it ends without error or rollback. Tagged with the request they came in.
    pending_sets: Vec<(u64, setstmt::SetOp)>,
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
    user: String,
    database: String,
    stats: SessionStats,
    gauge: Option<PoolClientGuard>,
    /// Resolves when the proxy starts draining, then (re-armed) when draining times out.
    shutdown_wait: Pin<Box<WaitForCancellationFutureOwned>>,
    draining: bool,
    /// This client's entry in the admin console's client list.
    info: Option<Arc<ClientInfo>>,
    /// Idle, idle-in-transaction and query timeouts.
    timers: timers::Timers,
}

/// Counted locally and added to the shared metrics at transaction boundaries, so the
/// per-message path touches no shared cache lines.
#[derive(Default)]
struct SessionStats {
    msgs_c2s: u64,
    msgs_s2c: u64,
    bytes_c2s: u64,
    bytes_s2c: u64,
    /// Start of each Query/Sync in flight, answered in order by ReadyForQuery.
    query_starts: std::collections::VecDeque<Instant>,
    /// Start of the current transaction (first request after idle).
    txn_start: Option<Instant>,
}

/// Keeps the pool's client gauges right however the session ends.
struct PoolClientGuard {
    pool: Arc<Pool>,
    active: bool,
}

impl Drop for PoolClientGuard {
    fn drop(&mut self) {
        self.pool.clients.fetch_sub(1, Ordering::Relaxed);
        if self.active {
            self.pool.clients_active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Serves one accepted client connection to the end.
/// Streams that can say whether a read would find data without a buffer to read into,
/// so idle sessions need not hold one. The default says "read now".
pub trait ReadReady {
    fn poll_read_ready_hint(&self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready_hint(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

impl<S: ReadReady> ReadReady for crate::tls::MaybeTls<S> {
    fn poll_read_ready_hint(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            crate::tls::MaybeTls::Plain(s) => s.poll_read_ready_hint(cx),
            // TLS may hold decrypted bytes the socket no longer shows: always read.
            _ => Poll::Ready(Ok(())),
        }
    }
}

pub async fn serve<C>(client: C, shared: Arc<Shared>, peer: String)
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    // Plain until the opening negotiates TLS; the settings are those at connect time.
    let mut client = crate::tls::MaybeTls::Plain(client);
    let tls = shared.tls.current();
    let peer_ip = peer.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
    let config = shared.registry.config();
    let mut leftover = BytesMut::new();
    let login_timeout = config.limits.client_login_timeout;
    let opening = Box::pin(tokio::time::timeout(login_timeout, async {
        let opening = handshake::read_opening(&mut client, &mut leftover, &tls, peer_ip).await?;
        if let Opening::Login(login) = &opening {
            handshake::authenticate(&mut client, &config, &login.user, &mut leftover).await?;
        }
        Ok::<_, handshake::OpeningError>(opening)
    }))
    .await;
    let login = match opening {
        Ok(Ok(Opening::Login(l))) => l,
        Ok(Ok(Opening::Cancel { pid, secret })) => {
            // As PostgreSQL: the requester's connection closes only after the signal was
            // delivered (libpq waits for that EOF before its next command, so a late
            // cancel cannot hit that command). The key space (31-bit pid, 32-bit secret)
            // makes the timing of a valid key useless to a guesser.
            Box::pin(shared.cancels.cancel(pid, &secret)).await;
            drop(client);
            return;
        }
        Ok(Err(Some(e))) => {
            tracing::info!(%peer, error = %e, "client login refused");
            Box::pin(refuse(&mut client, &e)).await;
            return;
        }
        Ok(Err(None)) => return,
        Err(_) => {
            let e = ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("pgsidecar: login not completed within client_login_timeout ({login_timeout:?})"),
            );
            Box::pin(refuse(&mut client, &e)).await;
            return;
        }
    };
    if login.database == crate::admin::console::DATABASE {
        let is_admin = config.find_user(&login.user).is_some_and(|u| u.admin);
        if !is_admin {
            let e = ClientError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                format!(
                    "user \"{}\" is not an admin of pgsidecar (set admin: true on the user)",
                    login.user
                ),
            );
            let _ = Box::pin(client.write_all(&e.to_bytes())).await;
            return;
        }
        let _entry =
            shared
                .client_list
                .register(&peer, &login.user, &login.database, "admin console");
        Box::pin(crate::admin::console::serve(&mut client, shared, leftover)).await;
        return;
    }
    // Counted from here until the session ends, however it ends.
    let _cap = match shared
        .client_caps
        .admit(&login.database, &login.user, &config.limits)
    {
        Ok(g) => g,
        Err(e) => {
            tracing::info!(%peer, error = %e, "client refused by a connection cap");
            Box::pin(refuse(&mut client, &e)).await;
            return;
        }
    };
    let app = login
        .params
        .iter()
        .find(|(k, _)| k == "application_name")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let entry = shared
        .client_list
        .register(&peer, &login.user, &login.database, app);
    let span =
        tracing::info_span!("client", %peer, user = %login.user, db = %login.database, app = %app);
    let fut = async move {
        let mut session = match Box::pin(Session::start(client, shared, login, leftover)).await {
            Ok(s) => s,
            Err((mut client, e)) => {
                Box::pin(refuse(&mut client, &e)).await;
                return;
            }
        };
        if let Some(lease) = session.server.as_mut() {
            entry.info.state.store(clients::ACTIVE, Ordering::Relaxed);
            entry
                .info
                .server_pid
                .store(lease.conn().backend_pid, Ordering::Relaxed);
        }
        session.info = Some(entry.info.clone());
        session.run().await;
        // Ends TLS with close_notify (and flushes what it buffered); FIN for plain TCP.
        let _ = Box::pin(tokio::time::timeout(
            Duration::from_secs(1),
            session.client.shutdown(),
        ))
        .await;
        drop(entry);
    };
    tracing::Instrument::instrument(fut, span).await;
}

/// Sends a FATAL error and closes the connection cleanly (bounded in time).
async fn refuse<S: AsyncWrite + Unpin>(client: &mut S, e: &ClientError) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = client.write_all(&e.to_bytes()).await;
        let _ = client.shutdown().await;
    })
    .await;
}

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    /// Completes login: checks the database, picks the pool, sends parameters and the
    /// proxy's cancel key.
    async fn start(
        client: C,
        shared: Arc<Shared>,
        login: Login,
        leftover: BytesMut,
    ) -> Result<Box<Self>, (C, ClientError)> {
        let config = shared.registry.config();
        if !config.databases.is_empty() && config.find_database(&login.database).is_none() {
            return Err((
                client,
                ClientError::fatal(
                    sqlstate::INVALID_CATALOG_NAME,
                    format!("database \"{}\" does not exist", login.database),
                ),
            ));
        }
        let key = PoolKey {
            database: login.database.clone(),
            user: login.user.clone(),
        };
        let pool = shared.registry.get(&key);
        let settings = pool.settings();
        let startup_settings = params::startup_settings(&login.params);
        let cancel = shared.cancels.register();
        let shared_drain = shared.lifecycle.drain.clone();
        let mut c_in = Inbound::default();
        c_in.buf = leftover;
        let mut session = Session {
            client,
            shared,
            pool,
            mode: settings.mode,
            max_message: config.limits.max_message_size,
            c_in,
            s_in: Inbound::default(),
            server: None,
            tracker: Tracker::default(),
            stmts: HashMap::new(),
            wanted_fp: params::fingerprint(&startup_settings, &params::RawSettings::new()),
            wanted_raw: params::RawSettings::new(),
            pending_sets: Vec::new(),
            requests_sent: 0,
            requests_answered: 0,
            txn_failed: false,
            wanted: startup_settings.clone(),
            startup_settings,
            cancel,
            skip_until_sync: false,
            local_sync_owed: false,
            batch_open: false,
            server_fatal: false,
            server_eof: false,
            emit: BytesMut::new(),
            fx: Effects::default(),
            user: login.user,
            database: login.database,
            stats: SessionStats::default(),
            gauge: None,
            shutdown_wait: Box::pin(shared_drain.cancelled_owned()),
            draining: false,
            info: None,
            timers: timers::Timers::new(&config.limits),
        };
        // The first login to a pool (and every session-mode login) needs a server: to
        // learn the parameters clients are told, and to surface upstream errors
        // (bad database, refused role) at login, where drivers expect them.
        if session.mode == PoolMode::Session || session.pool.startup_params().is_none() {
            match session.pool.checkout().await {
                Ok(lease) => {
                    if session.mode == PoolMode::Session {
                        session.attach(lease);
                    } else {
                        lease.release();
                    }
                }
                Err(e) => {
                    let mut err = e.to_client_error(&session.pool.key);
                    err.severity = Severity::Fatal;
                    session.shared.registry.forget_if_unused(&session.pool.key);
                    return Err((session.client, err));
                }
            }
        }
        let mut out = BytesMut::with_capacity(512);
        if let Some(ps) = session.pool.startup_params() {
            for (k, v) in ps.iter() {
                let v = session.wanted.get(k).unwrap_or(v);
                messages::parameter_status(&mut out, k, v);
            }
        }
        messages::backend_key_data(&mut out, session.cancel.pid, session.cancel.secret);
        messages::ready_for_query(&mut out, b'I');
        if session.client.write_all(&out).await.is_err() {
            return Err((
                session.client,
                ClientError::fatal(sqlstate::CONNECTION_FAILURE, "client went away"),
            ));
        }
        tracing::debug!(user = %session.user, db = %session.database, mode = %session.mode, "client logged in");
        session.pool.clients.fetch_add(1, Ordering::Relaxed);
        let active = session.server.is_some();
        if active {
            session.pool.clients_active.fetch_add(1, Ordering::Relaxed);
        }
        session.gauge = Some(PoolClientGuard {
            pool: session.pool.clone(),
            active,
        });
        session
            .shared
            .metrics
            .client_connections
            .with_label_values(&["accepted"])
            .inc();
        Ok(Box::new(session))
    }

    /// The relay loop. Everything but the byte pump is boxed on demand, so the future
    /// an idle client parks in stays small (RSS per idle client).
    async fn run(&mut self) {
        loop {
            let step = poll_fn(|cx| self.poll_step(cx)).await;
            match step {
                Step::Release => self.release(),
                other => {
                    if Box::pin(self.handle(other)).await {
                        return;
                    }
                }
            }
        }
    }

    /// Handles a step that needs waiting; true when the session is over.
    async fn handle(&mut self, step: Step) -> bool {
        {
            match step {
                Step::NeedServer => {
                    if !self.acquire().await {
                        self.finish_client_gone().await;
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
                Step::ForceShutdown => {
                    if let Some(lease) = self.server.take() {
                        lease.discard("shutdown");
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
                    tracing::warn!(%reason, pool = %self.pool.key, "server connection lost");
                    if let Some(lease) = self.server.take() {
                        lease.discard("server lost");
                    }
                    let _ = self.flush_client().await;
                    if !self.server_fatal {
                        let e = ClientError::fatal(
                            sqlstate::CONNECTION_FAILURE,
                            "pgsidecar: the server connection was lost while this client was using it; any open transaction was rolled back",
                        )
                        .with_hint("reconnect and retry the transaction");
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

    /// Takes a server for the pending request, watching the client meanwhile so one
    /// that disconnects leaves the queue. Returns false if the client went away.
    async fn acquire(&mut self) -> bool {
        let pool = self.pool.clone();
        pool.clients_waiting.fetch_add(1, Ordering::Relaxed);
        if let Some(info) = &self.info {
            info.state.store(clients::WAITING, Ordering::Relaxed);
        }
        let _waiting = WaitingGuard(&pool);
        let checkout = pool.checkout();
        tokio::pin!(checkout);
        let result = loop {
            tokio::select! {
                r = &mut checkout => break r,
                gone = poll_fn(|cx| self.poll_client_while_waiting(cx)) => {
                    if gone {
                        return false;
                    }
                }
            }
        };
        match result {
            Ok(lease) => {
                self.attach(lease);
                true
            }
            Err(e) => {
                let err = e.to_client_error(&self.pool.key);
                self.shared.metrics.error("proxy", err.code);
                if let Some(info) = &self.info {
                    info.state.store(clients::IDLE, Ordering::Relaxed);
                }
                tracing::info!(error = %err, "checkout failed");
                self.answer_locally(err);
                true
            }
        }
    }

    /// Reads from the client while it waits for a server. Ready(true): it went away.
    fn poll_client_while_waiting(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
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
    fn attach(&mut self, mut lease: Lease) {
        if let Some(info) = &self.info {
            info.state.store(clients::ACTIVE, Ordering::Relaxed);
            info.server_pid
                .store(lease.conn().backend_pid, Ordering::Relaxed);
        }
        if let Some(g) = self.gauge.as_mut() {
            if !g.active {
                g.active = true;
                self.pool.clients_active.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.tracker.reset();
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
                params::sync_raw_sql(&self.wanted_raw, &mut conn.raw_settings),
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
        self.server = Some(Box::new(lease));
    }

    /// Returns the server to the pool at a transaction boundary.
    fn release(&mut self) {
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
            lease.discard("unclean at release");
        } else if self.cancel.slot.in_flight() > 0 {
            // A cancel for this client's last query is still on its way: the server
            // joins the pool only after it was delivered.
            let slot = self.cancel.slot.clone();
            tokio::spawn(async move {
                slot.wait_delivered(Duration::from_secs(5)).await;
                lease.release();
            });
        } else {
            lease.release();
        }
        self.tracker.reset();
    }

    /// Answers the pending request with `err` without a server: a Query gets the error
    /// and ReadyForQuery; an extended batch gets the error now and ReadyForQuery at Sync.
    fn answer_locally(&mut self, err: ClientError) {
        let mut out = BytesMut::new();
        err.encode(&mut out);
        match frontend_header(self.c_in.unscanned(), self.max_message) {
            Ok(Some(h)) if h.tag == b'Q' || h.tag == b'F' => {
                self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
                messages::ready_for_query(&mut out, b'I');
            }
            _ => self.local_sync_owed = true,
        }
        self.s_in.push_own(&out);
    }

    /// After the client left: return the server clean, roll back, or close it.
    async fn finish_client_gone(&mut self) {
        self.cancel.slot.set(None);
        self.flush_stats();
        self.set_inactive();
        let Some(mut lease) = self.server.take() else {
            return;
        };
        let quiet = self.tracker.is_empty()
            && !self.batch_open
            && self.c_in.body_left == 0
            && !self.c_in.has_output()
            && self.s_in.unscanned().is_empty()
            && !self.server_fatal
            && !self.timers.discard_server;
        if !quiet {
            // Something is in flight (a query, a COPY, a partial batch): the connection's
            // state is unknown, so it is closed rather than reused.
            lease.discard("client left mid-request");
            return;
        }
        let limit = Duration::from_secs(5);
        if self.tracker.status != b'I' {
            if let Err(e) = lease.conn().run_quiet("ROLLBACK", limit).await {
                tracing::debug!(error = %e, "rollback after client left failed");
                lease.discard("rollback failed");
                return;
            }
        }
        if self.mode == PoolMode::Session {
            let reset = lease.pool().settings().reset_query.clone();
            if !reset.is_empty() && lease.conn_ref().dirty {
                if let Err(e) = lease.conn().run_quiet(&reset, limit).await {
                    tracing::debug!(error = %e, "reset query failed");
                    lease.discard("reset failed");
                    return;
                }
                let conn = lease.conn();
                conn.params = conn.original_params.clone();
                conn.dirty = false;
            }
        }
        self.cancel
            .slot
            .wait_delivered(Duration::from_secs(5))
            .await;
        lease.release();
    }

    fn set_inactive(&mut self) {
        if let Some(info) = &self.info {
            info.state.store(clients::IDLE, Ordering::Relaxed);
            info.server_pid.store(0, Ordering::Relaxed);
        }
        if let Some(g) = self.gauge.as_mut() {
            if g.active {
                g.active = false;
                self.pool.clients_active.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Adds the locally counted traffic to the shared metrics.
    fn flush_stats(&mut self) {
        let m = &self.shared.metrics;
        let s = &mut self.stats;
        if s.msgs_c2s > 0 {
            m.messages_c2s.inc_by(std::mem::take(&mut s.msgs_c2s));
            m.bytes_c2s.inc_by(std::mem::take(&mut s.bytes_c2s));
        }
        if s.msgs_s2c > 0 {
            m.messages_s2c.inc_by(std::mem::take(&mut s.msgs_s2c));
            m.bytes_s2c.inc_by(std::mem::take(&mut s.bytes_s2c));
        }
        s.query_starts.clear();
    }

    /// At a transaction boundary: a draining proxy may close this client here.
    fn at_boundary(&self) -> bool {
        let quiet_input = self.c_in.unscanned().is_empty() && !self.local_sync_owed;
        match self.mode {
            PoolMode::Transaction => self.server.is_none() && quiet_input,
            PoolMode::Session => {
                quiet_input
                    && self.tracker.is_empty()
                    && self.tracker.status == b'I'
                    && !self.batch_open
                    && self.c_in.body_left == 0
            }
        }
    }

    /// Polls the shutdown signals: Some(step) when this session must end now.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Option<Step> {
        if self.shutdown_wait.as_mut().poll(cx).is_ready() {
            if self.draining {
                return Some(Step::ForceShutdown);
            }
            self.draining = true;
            self.shutdown_wait = Box::pin(self.shared.lifecycle.force.clone().cancelled_owned());
            if self.shutdown_wait.as_mut().poll(cx).is_ready() {
                return Some(Step::ForceShutdown);
            }
        }
        (self.draining && self.at_boundary()).then_some(Step::Shutdown)
    }

    /// Moves bytes both ways until something needs the session's attention.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
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
            // An idle client holds no read buffer: wait for readability first, and take
            // a buffer only when there is something to read.
            let may_read = self.c_in.buf.capacity() > 0
                || match self.client.poll_read_ready_hint(cx) {
                    Poll::Ready(Ok(())) => true,
                    Poll::Ready(Err(_)) => return Poll::Ready(Step::ClientGone),
                    Poll::Pending => false,
                };
            if may_read && self.c_in.wants_read() {
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

    /// Classifies server messages: updates tracking and forwards or swallows each.
    fn scan_server(&mut self) -> Result<(bool, Option<Step>), String> {
        let mut progress = false;
        while self.server.is_some() {
            if self.s_in.body_left > 0 {
                let before = self.s_in.scanned;
                self.s_in.continue_body();
                progress |= self.s_in.scanned != before;
                if self.s_in.body_left > 0 {
                    break;
                }
                continue;
            }
            let avail_len = self.s_in.unscanned().len();
            let h = match backend_header(self.s_in.unscanned(), self.max_message.max(1 << 30)) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Err(format!("malformed message from server: {e}")),
            };
            // Rows and COPY data stream through; everything else is small and read whole
            // so that answers the proxy adds can never land inside a message.
            let streamed = matches!(
                h.tag,
                be::DATA_ROW
                    | be::COPY_DATA
                    | be::FUNCTION_CALL_RESPONSE
                    | be::PARAMETER_DESCRIPTION
            );
            if !streamed && h.len > crate::protocol::framing::BACKEND_WHOLE_MESSAGE_LIMIT {
                // Only rows and COPY data can be large; a server announcing a huge
                // message of another kind is broken or hostile, and buffering it whole
                // would let it make the proxy hold up to 1 GiB per connection.
                return Err(format!(
                    "server sent a message of type {} of {} bytes, over the {} bytes allowed for it",
                    h.tag as char,
                    h.len,
                    crate::protocol::framing::BACKEND_WHOLE_MESSAGE_LIMIT
                ));
            }
            if !streamed && avail_len < h.frame_len() {
                self.s_in.need = h.frame_len();
                break;
            }
            self.s_in.need = 0;
            let body: &[u8] = if streamed {
                &[]
            } else {
                &self.s_in.buf[self.s_in.scanned + 5..self.s_in.scanned + h.frame_len()]
            };
            let mut forget: Option<bool> = None;
            match h.tag {
                be::PARAMETER_STATUS => {
                    if let Some((k, v)) = messages::parse_parameter_status(body) {
                        // A change the client made is now part of what it expects; during
                        // the proxy's own SETs only the server's spelling of a value the
                        // client asked for is adopted.
                        let ours = self.tracker.head_is_injected();
                        if params::is_carried(&k)
                            && (!ours || self.wanted.contains_key(&k))
                            && self.wanted.get(&k) != Some(&v)
                        {
                            self.wanted.insert(k.clone(), v.clone());
                            self.wanted_fp = params::fingerprint(&self.wanted, &self.wanted_raw);
                        }
                        if let Some(lease) = self.server.as_mut() {
                            let conn = lease.conn();
                            conn.params.insert(k, v);
                            conn.params_fp = self.wanted_fp;
                        }
                    }
                }
                be::COMMAND_COMPLETE => {
                    if !self.pending_sets.is_empty() && body.starts_with(b"ROLLBACK") {
                        self.txn_failed = true;
                    }
                    // Whichever protocol carried them, these really dropped the server's
                    // statements (and DISCARD ALL its settings): forget them here too.
                    if body.starts_with(b"DISCARD ALL\0") {
                        forget = Some(true);
                    } else if body.starts_with(b"DEALLOCATE ALL\0") {
                        forget = Some(false);
                    }
                }
                be::ERROR_RESPONSE => {
                    let (code, _msg, severity) = messages::error_fields(body);
                    if !self.tracker.head_is_injected() {
                        self.txn_failed = true;
                        self.shared
                            .metrics
                            .error("server", code.as_deref().unwrap_or("??"));
                    }
                    if matches!(severity.as_deref(), Some("FATAL") | Some("PANIC")) {
                        self.server_fatal = true;
                    }
                    tracing::trace!(code = ?code, "server error");
                }
                _ => {}
            }
            let forward = self
                .tracker
                .on_server(h.tag, body, &mut self.emit, &mut self.fx);
            if let Some(settings_too) = forget {
                self.forget_server_state(settings_too);
            }
            self.s_in.take_frame(
                h.frame_len(),
                if forward {
                    BodyMode::Forward
                } else {
                    BodyMode::Skip
                },
            );
            self.stats.msgs_s2c += 1;
            self.stats.bytes_s2c += h.frame_len() as u64;
            progress = true;
            self.apply_effects();
            if h.tag == be::READY_FOR_QUERY && forward {
                self.observe_ready();
                self.requests_answered += 1;
                if self.tracker.status == b'I' {
                    self.settle_sets();
                }
            }
            if h.tag == be::READY_FOR_QUERY
                && self.mode == PoolMode::Transaction
                && self.tracker.is_empty()
                && self.tracker.status == b'I'
                && !self.batch_open
                && self.c_in.body_left == 0
            {
                return Ok((true, Some(Step::Release)));
            }
        }
        Ok((progress, None))
    }

    /// A ReadyForQuery reached the client: time the request it answers and, when the
    /// session is idle again, the transaction.
    fn observe_ready(&mut self) {
        let now = Instant::now();
        if let Some(t) = self.stats.query_starts.pop_front() {
            self.pool.m.query_duration.observe((now - t).as_secs_f64());
        }
        if self.tracker.status == b'I' && self.tracker.is_empty() {
            if let Some(t) = self.stats.txn_start.take() {
                self.pool
                    .m
                    .transaction_duration
                    .observe((now - t).as_secs_f64());
            }
        }
    }

    /// After DISCARD ALL / DEALLOCATE ALL ran on the server: the client's statements are
    /// gone, the server's cache is empty, and (DISCARD) settings are back to defaults.
    pub(super) fn forget_server_state(&mut self, settings_too: bool) {
        self.stmts.clear();
        if let Some(lease) = self.server.as_mut() {
            lease.conn().prepared.clear();
        }
        if settings_too {
            self.reset_settings();
        }
    }

    /// The client's settings go back to its startup values and the bound server's to
    /// its own defaults (DISCARD ALL, RESET ALL); the next checkout re-applies them.
    pub(super) fn reset_settings(&mut self) {
        self.wanted = self.startup_settings.clone();
        self.wanted_raw.clear();
        self.pending_sets.clear();
        self.wanted_fp = params::fingerprint(&self.wanted, &self.wanted_raw);
        if let Some(lease) = self.server.as_mut() {
            let conn = lease.conn();
            conn.params = conn.original_params.clone();
            conn.raw_settings.clear();
            conn.params_fp = 0;
        }
    }

    /// A transaction ended: SETs it made stick unless it failed or rolled back.
    fn settle_sets(&mut self) {
        if !self.pending_sets.is_empty() {
            let answered = self.requests_answered;
            let failed = self.txn_failed;
            let mut changed = false;
            self.pending_sets.retain(|(seq, op)| {
                if *seq > answered {
                    return true; // sent in a later request, not answered yet
                }
                if !failed {
                    match &op.value {
                        Some(v) => self.wanted_raw.insert(op.name.clone(), v.clone()),
                        None => self.wanted_raw.remove(&op.name),
                    };
                    changed = true;
                }
                false
            });
            if changed {
                self.wanted_fp = params::fingerprint(&self.wanted, &self.wanted_raw);
                if let Some(lease) = self.server.as_mut() {
                    let conn = lease.conn();
                    conn.raw_settings = self.wanted_raw.clone();
                    conn.params_fp = self.wanted_fp;
                }
            }
        }
        self.txn_failed = false;
    }

    /// Notes a Query or Sync sent to the server, for the duration histograms.
    pub(super) fn note_request(&mut self) {
        self.requests_sent += 1;
        let now = Instant::now();
        if self.stats.txn_start.is_none() {
            self.stats.txn_start = Some(now);
        }
        self.stats.query_starts.push_back(now);
    }

    /// Applies what the tracker learned, and queues its synthetic answers.
    fn apply_effects(&mut self) {
        if !self.emit.is_empty() {
            self.s_in.push_own(&self.emit);
            self.emit.clear();
        }
        if self.fx.unprepared.is_empty() && self.fx.forget.is_empty() {
            return;
        }
        if let Some(lease) = self.server.as_mut() {
            for id in self.fx.unprepared.drain(..) {
                lease.conn().prepared.remove(id);
            }
        }
        self.fx.unprepared.clear();
        for name in self.fx.forget.drain(..) {
            self.stmts.remove(&name);
        }
    }

    /// Classifies client messages; see `frontend.rs`.
    fn scan_client(&mut self) -> Result<(bool, Option<Step>), ClientError> {
        let mut progress = false;
        loop {
            if self.c_in.body_left > 0 {
                let before = self.c_in.scanned;
                self.c_in.continue_body();
                progress |= self.c_in.scanned != before;
                if self.c_in.body_left > 0 {
                    break;
                }
                continue;
            }
            let h = match frontend_header(self.c_in.unscanned(), self.max_message) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Err(frame_error(e)),
            };
            match self.on_client_message(h)? {
                frontend::Outcome::Continue => progress = true,
                frontend::Outcome::NeedMore => break,
                frontend::Outcome::Stop(step) => return Ok((progress, Some(step))),
            }
        }
        Ok((progress, None))
    }
}

/// Takes the client out of the waiting gauge when its checkout ends, however it ends.
struct WaitingGuard<'a>(&'a Arc<Pool>);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.clients_waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

fn frame_error(e: FrameError) -> ClientError {
    match e {
        FrameError::TooLong { .. } => {
            ClientError::fatal(sqlstate::PROGRAM_LIMIT_EXCEEDED, format!("pgsidecar: {e}"))
                .with_hint("raise limits.max_message_size if this message is legitimate")
        }
        _ => ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("pgsidecar: {e}")),
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    impl ReadReady for tokio::io::DuplexStream {}

    /// Every idle client parks in this future: keep it small (RSS per idle client).
    #[tokio::test]
    async fn idle_session_state_stays_small() {
        let cfg = crate::config::Config::with_upstream(crate::config::UpstreamConfig::new(
            "127.0.0.1".into(),
            1,
        ));
        let shared = crate::proxy::Shared::new(Arc::new(cfg));
        let (a, _b) = tokio::io::duplex(64);
        let fut = serve(a, shared, "x".into());
        let future = std::mem::size_of_val(&fut);
        let session = std::mem::size_of::<Session<crate::tls::MaybeTls<tokio::io::DuplexStream>>>();
        assert!(future <= 1024, "serve future grew to {future} bytes");
        assert!(session <= 1024, "Session grew to {session} bytes");
    }
}

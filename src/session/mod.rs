//! One client's session: opening and login, then the relay loop that binds server
//! connections from the pool (for the whole session, or per transaction) and forwards
//! frames between the two sides.

pub mod frontend;
pub mod handshake;
pub mod relay;
pub mod tracker;

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::cancel::{CancelGuard, CancelTarget};
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
    server: Option<Lease>,
    tracker: Tracker,
    /// The client's named statements (transaction mode), by the client's name.
    stmts: HashMap<Box<[u8]>, Arc<StmtDef>>,
    /// Settings from the startup packet: what RESET ALL / DISCARD ALL go back to.
    startup_settings: HashMap<String, String>,
    /// Settings this client expects on whatever server it runs on.
    wanted: HashMap<String, String>,
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
}

/// Serves one accepted client connection to the end.
pub async fn serve<C>(mut client: C, shared: Arc<Shared>, peer: String)
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let config = shared.registry.config();
    let mut leftover = BytesMut::new();
    let login_timeout = config.limits.client_login_timeout;
    let opening = tokio::time::timeout(login_timeout, async {
        let opening = handshake::read_opening(&mut client, &mut leftover).await?;
        if let Opening::Login(login) = &opening {
            handshake::authenticate(&mut client, &config, &login.user, &mut leftover).await?;
        }
        Ok::<_, handshake::OpeningError>(opening)
    })
    .await;
    let login = match opening {
        Ok(Ok(Opening::Login(l))) => l,
        Ok(Ok(Opening::Cancel { pid, secret })) => {
            shared.cancels.cancel(pid, &secret).await;
            return;
        }
        Ok(Err(Some(e))) => {
            tracing::info!(%peer, error = %e, "client login refused");
            let _ = client.write_all(&e.to_bytes()).await;
            return;
        }
        Ok(Err(None)) => return,
        Err(_) => {
            let e = ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("pgsidecar: login not completed within client_login_timeout ({login_timeout:?})"),
            );
            let _ = client.write_all(&e.to_bytes()).await;
            return;
        }
    };
    let span = tracing::info_span!("client", %peer, user = %login.user, db = %login.database);
    let _enter = span.enter();
    drop(_enter);
    let mut session = match Session::start(client, shared, login, leftover).await {
        Ok(s) => s,
        Err((mut client, e)) => {
            let _ = client.write_all(&e.to_bytes()).await;
            return;
        }
    };
    session.run().await;
}

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Completes login: checks the database, picks the pool, sends parameters and the
    /// proxy's cancel key.
    async fn start(
        client: C,
        shared: Arc<Shared>,
        login: Login,
        leftover: BytesMut,
    ) -> Result<Self, (C, ClientError)> {
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
        Ok(session)
    }

    async fn run(&mut self) {
        loop {
            let step = poll_fn(|cx| self.poll_step(cx)).await;
            match step {
                Step::NeedServer => {
                    if !self.acquire().await {
                        self.finish_client_gone().await;
                        return;
                    }
                }
                Step::Release => self.release(),
                Step::ClientGone => {
                    self.finish_client_gone().await;
                    return;
                }
                Step::ClientProtocol(e) => {
                    tracing::info!(error = %e, "closing client after protocol error");
                    let _ = self.flush_client().await;
                    let _ = self.client.write_all(&e.to_bytes()).await;
                    self.finish_client_gone().await;
                    return;
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
                    return;
                }
            }
        }
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
        if let Some((sql, changes)) = sync_sql(&self.wanted, &conn.params, &conn.original_params) {
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
    fn release(&mut self) {
        self.cancel.slot.set(None);
        let Some(lease) = self.server.take() else {
            return;
        };
        if !self.s_in.unscanned().is_empty() || self.tracker.injected_failed {
            // Bytes after the final ReadyForQuery, or a failed state sync: not clean.
            self.s_in.drop_unscanned();
            lease.discard("unclean at release");
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
        let Some(mut lease) = self.server.take() else {
            return;
        };
        let quiet = self.tracker.is_empty()
            && !self.batch_open
            && self.c_in.body_left == 0
            && !self.c_in.has_output()
            && self.s_in.unscanned().is_empty()
            && !self.server_fatal;
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
        lease.release();
    }

    /// Moves bytes both ways until something needs the session's attention.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        loop {
            let mut progress = false;
            if let Some(lease) = self.server.as_mut() {
                if let Poll::Ready(Err(e)) = self.c_in.poll_drain(cx, &mut lease.conn().stream) {
                    return Poll::Ready(Step::ServerGone(e.to_string()));
                }
            }
            if let Poll::Ready(Err(_)) = self.s_in.poll_drain(cx, &mut self.client) {
                return Poll::Ready(Step::ClientGone);
            }
            if self.c_in.wants_read() {
                match self.c_in.poll_fill(cx, &mut self.client) {
                    Poll::Ready(Ok(_)) => progress = true,
                    Poll::Ready(Err(_)) => return Poll::Ready(Step::ClientGone),
                    Poll::Pending => {}
                }
            }
            match self.scan_client() {
                Ok((p, None)) => progress |= p,
                Ok((_, Some(step))) => return Poll::Ready(step),
                Err(e) => return Poll::Ready(Step::ClientProtocol(e)),
            }
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
            if self.server_eof {
                return Poll::Ready(Step::ServerGone("server closed the connection".into()));
            }
            if self.c_in.eof && self.c_in.unscanned().is_empty() {
                return Poll::Ready(Step::ClientGone);
            }
            if self.c_in.eof && self.server.is_none() {
                return Poll::Ready(Step::ClientGone);
            }
            if !progress {
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
            match h.tag {
                be::PARAMETER_STATUS => {
                    if let Some((k, v)) = messages::parse_parameter_status(body) {
                        // A change the client made is now part of what it expects; during
                        // the proxy's own SETs only the server's spelling of a value the
                        // client asked for is adopted.
                        let ours = self.tracker.head_is_injected();
                        if params::is_carried(&k) && (!ours || self.wanted.contains_key(&k)) {
                            self.wanted.insert(k.clone(), v.clone());
                        }
                        if let Some(lease) = self.server.as_mut() {
                            lease.conn().params.insert(k, v);
                        }
                    }
                }
                be::ERROR_RESPONSE => {
                    let (code, _msg, severity) = messages::error_fields(body);
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
            self.s_in.take_frame(
                h.frame_len(),
                if forward {
                    BodyMode::Forward
                } else {
                    BodyMode::Skip
                },
            );
            progress = true;
            self.apply_effects();
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

fn frame_error(e: FrameError) -> ClientError {
    match e {
        FrameError::TooLong { .. } => {
            ClientError::fatal(sqlstate::PROGRAM_LIMIT_EXCEEDED, format!("pgsidecar: {e}"))
                .with_hint("raise limits.max_message_size if this message is legitimate")
        }
        _ => ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("pgsidecar: {e}")),
    }
}

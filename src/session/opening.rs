//! A client's way in: the opening (TLS, startup, authentication) and the start of its
//! session, then the session's run to the end.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::handshake::{self, Login, Opening};
use super::relay::Inbound;
use super::timers;
use super::tracker::{Effects, Tracker};
use super::{admission, validate};
use super::{ClientStmts, PoolClientGuard, ReadReady, Session, SessionStats};
use crate::clients;
use crate::config::PoolMode;
use crate::error::{sqlstate, ClientError, Severity};
use crate::metrics::LoginResult;
use crate::pool::PoolKey;
use crate::protocol::messages;
use crate::proxy::Shared;
use crate::server::params;

/// An accepted client connection, before the opening.
pub struct Accepted<C> {
    pub client: C,
    pub peer: SocketAddr,
    pub shared: Arc<Shared>,
}

/// Serves one accepted client connection to the end.
///
/// Login runs in its own boxed future, dropped once the client is in: the task an idle
/// client parks in then holds just a pointer to its boxed session (RSS per idle client).
pub async fn serve<C>(accepted: Box<Accepted<C>>)
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    let Some((mut session, _slot)) = Box::pin(open(accepted)).await else {
        return;
    };
    if tracing::enabled!(tracing::Level::DEBUG) {
        Box::pin(run_in_span(session)).await;
    } else {
        session.run_to_end().await;
    }
}

/// With debug logging on, every log line of the session says which client it is about.
/// At the default level there is no span: no allocation per client, no enter per poll.
async fn run_in_span<C>(mut session: Box<Session<crate::tls::MaybeTls<C>>>)
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    let span = match session.entry.as_ref().map(|e| e.info.clone()) {
        Some(i) => {
            tracing::debug_span!("client", peer = %i.addr, user = %i.user, db = %i.database, app = %i.application_name)
        }
        None => tracing::Span::none(),
    };
    tracing::Instrument::instrument(session.run_to_end(), span).await;
}

type Opened<C> = (Box<Session<crate::tls::MaybeTls<C>>>, admission::LoginSlot);

/// The opening, login and session start; `None` when the connection ended there.
async fn open<C>(accepted: Box<Accepted<C>>) -> Option<Opened<C>>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    let Accepted {
        client,
        peer,
        shared,
    } = *accepted;
    // Plain until the opening negotiates TLS; the settings are those at connect time.
    let mut client = crate::tls::MaybeTls::Plain(client);
    let config = shared.registry.config();
    let mut leftover = BytesMut::new();
    let login_timeout = config.limits.client_login_timeout;
    let started = tokio::time::Instant::now();
    let login = Box::pin(startup(&mut client, &mut leftover, &shared, peer)).await?;
    let slot = match admission::admit(&shared) {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%peer, error = %e, "client refused: at limits.max_client_conn");
            Box::pin(refused(
                &shared,
                &mut client,
                peer,
                BytesMut::new(),
                Some(e),
            ))
            .await;
            return None;
        }
    };
    let left = login_timeout.saturating_sub(started.elapsed());
    let auth = Box::pin(tokio::time::timeout(
        left,
        handshake::authenticate(&mut client, &config, &login.user, &mut leftover),
    ))
    .await;
    // `greeting` is AuthenticationOk, not sent yet: it goes out with what follows it.
    let greeting = match auth {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => {
            Box::pin(refused(&shared, &mut client, peer, BytesMut::new(), e)).await;
            return None;
        }
        Err(_) => {
            let e = ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("pgsidecar: login not completed within client_login_timeout ({login_timeout:?})"),
            );
            shared.metrics.login(LoginResult::Timeout);
            Box::pin(refuse(&mut client, BytesMut::new(), &e)).await;
            return None;
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
            shared.metrics.login(LoginResult::of_refusal(e.code));
            Box::pin(refuse(&mut client, greeting, &e)).await;
            return None;
        }
        shared.metrics.login(LoginResult::Accepted);
        let _entry = shared.client_list.register(
            peer,
            login.user.as_str().into(),
            login.database.as_str().into(),
            "admin console",
        );
        if Box::pin(client.write_all(&greeting)).await.is_err() {
            return None;
        }
        Box::pin(crate::admin::console::serve(&mut client, shared, leftover)).await;
        return None;
    }
    // Counted from here until the session ends, however it ends.
    let cap = match shared
        .client_caps
        .admit(&login.database, &login.user, &config.limits)
    {
        Ok(g) => g,
        Err(e) => {
            tracing::info!(%peer, error = %e, "client refused by a connection cap");
            shared.metrics.login(LoginResult::Limit);
            Box::pin(refuse(&mut client, greeting, &e)).await;
            return None;
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
        .register(peer, cap.user.clone(), cap.database.clone(), app);
    let mut session =
        match Box::pin(Session::start(client, shared, login, leftover, greeting)).await {
            Ok(s) => s,
            Err((mut client, greeting, e)) => {
                Box::pin(refuse(&mut client, greeting, &e)).await;
                return None;
            }
        };
    if let Some(lease) = session.server.as_mut() {
        entry.info.state.store(clients::ACTIVE, Ordering::Relaxed);
        entry
            .info
            .server_pid
            .store(lease.conn().backend_pid, Ordering::Relaxed);
    }
    let mut entry = entry;
    let logging = &session.shared.registry.config().logging;
    if logging.log_connections {
        tracing::info!(
            client = %peer,
            user = %cap.user,
            database = %cap.database,
            application_name = %entry.info.application_name,
            "client logged in"
        );
    }
    entry.log_disconnect = logging.log_disconnections;
    session.entry = Some(entry);
    session.cap = Some(cap);
    Some((session, slot))
}

/// The opening up to the startup packet (SSL negotiation included): the login to go on
/// with, or `None` when the connection ended there (a cancel served, a refusal sent,
/// silence past `client_startup_timeout`).
async fn startup<C>(
    client: &mut crate::tls::MaybeTls<C>,
    leftover: &mut BytesMut,
    shared: &Arc<Shared>,
    peer: SocketAddr,
) -> Option<Login>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let config = shared.registry.config();
    let tls = shared.tls.current();
    let login_timeout = config.limits.client_login_timeout;
    // Until its startup packet a connection holds no place under max_client_conn, and
    // has a shorter time to send it.
    let startup_timeout = config.limits.client_startup_timeout.min(login_timeout);
    let opening = Box::pin(tokio::time::timeout(
        startup_timeout,
        handshake::read_opening(client, leftover, &tls, Some(peer.ip())),
    ))
    .await;
    match opening {
        Ok(Ok(Opening::Login(l))) => Some(l),
        Ok(Ok(Opening::Cancel { pid, secret })) => {
            // As PostgreSQL: the requester's connection closes only after the signal was
            // delivered (libpq waits for that EOF before its next command, so a late
            // cancel cannot hit that command). The key space (31-bit pid, 32-bit secret)
            // makes the timing of a valid key useless to a guesser. Served at the cap.
            shared.metrics.login(LoginResult::Cancel);
            let limit = &shared.cancel_limit;
            Box::pin(limit.serve(&shared.cancels, peer.ip(), pid, &secret)).await;
            None
        }
        Ok(Err(e)) => {
            Box::pin(refused(shared, client, peer, BytesMut::new(), e)).await;
            None
        }
        Err(_) => {
            // No startup packet: there is no protocol state to report an error in.
            tracing::debug!(%peer, timeout = ?startup_timeout, "no startup packet in time; closing");
            shared.metrics.login(LoginResult::Timeout);
            None
        }
    }
}

/// Counts and answers an opening the proxy refused (`None`: the client went away or
/// the opening ended without a channel to report on).
async fn refused<S: AsyncWrite + Unpin>(
    shared: &Shared,
    client: &mut S,
    peer: SocketAddr,
    greeting: BytesMut,
    e: Option<ClientError>,
) {
    let Some(e) = e else {
        shared.metrics.login(LoginResult::Abandoned);
        return;
    };
    tracing::info!(%peer, error = %e, "client login refused");
    shared.metrics.login(LoginResult::of_refusal(e.code));
    refuse(client, greeting, &e).await;
}

/// Sends a FATAL error, after what login still owes the client (AuthenticationOk, when
/// authentication passed), in one write, and closes the connection cleanly (bounded in
/// time).
async fn refuse<S: AsyncWrite + Unpin>(client: &mut S, mut greeting: BytesMut, e: &ClientError) {
    greeting.extend_from_slice(&e.to_bytes());
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = client.write_all(&greeting).await;
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
    pub(super) async fn start(
        client: C,
        shared: Arc<Shared>,
        login: Login,
        leftover: BytesMut,
        greeting: BytesMut,
    ) -> Result<Box<Self>, (C, BytesMut, ClientError)> {
        let config = shared.registry.config();
        if !config.databases.is_empty() && config.find_database(&login.database).is_none() {
            shared.metrics.login(LoginResult::UnknownDatabase);
            return Err((
                client,
                greeting,
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
        let pool = match shared.registry.try_get(&key) {
            Ok(p) => p,
            Err(e) => {
                shared.metrics.login(LoginResult::Limit);
                return Err((client, greeting, e));
            }
        };
        let settings = pool.settings();
        let startup_settings = pool
            .client_settings
            .intern(params::startup_settings(&login.params));
        let cancel = shared.cancels.register();
        let mut c_in = Inbound::default();
        // An idle client holds no buffer: the opening's read buffer goes unless it holds
        // messages the client sent ahead.
        if !leftover.is_empty() {
            c_in.buf = leftover;
        }
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
            stmts: ClientStmts::default(),
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
            stats: SessionStats::default(),
            gauge: None,
            draining: false,
            unusable_settings: None,
            entry: None,
            cap: None,
            timers: timers::Timers::new(&config.limits),
            state_policy: settings.session_state,
            pin: None,
        };
        // The first login to a pool (and every session-mode login) needs a server: to
        // learn the parameters clients are told, and to surface upstream errors
        // (bad database, refused role) at login, where drivers expect them.
        // Startup settings not seen before on this pool are tried on that server first.
        let checked = validate::to_check(&session.startup_settings);
        // How PostgreSQL spells these settings, once a check found them good.
        let mut spelled = checked
            .as_ref()
            .and_then(|(_, fp)| validate::known_good(&session.pool, *fp));
        let to_check = checked.filter(|_| spelled.is_none());
        if session.mode == PoolMode::Session
            || session.pool.startup_params().is_none()
            || to_check.is_some()
        {
            match session.pool.checkout().await {
                Ok(mut lease) if to_check.is_some() => {
                    let (settings, fp) = to_check.unwrap_or_default();
                    match validate::check(&session.pool, lease.conn(), &settings, fp).await {
                        Ok(_) if session.mode == PoolMode::Session => {
                            if let Err(e) = session.settle_settings(&mut lease).await {
                                lease.discard("settings_check_failed");
                                session.shared.metrics.login(LoginResult::InvalidSettings);
                                return Err((session.client, greeting, e));
                            }
                            session.attach(lease)
                        }
                        Ok(sp) => {
                            spelled = Some(sp);
                            lease.release()
                        }
                        Err(e) => {
                            if e.is_some() {
                                // PostgreSQL answered and the check's transaction ended.
                                lease.release();
                            } else {
                                lease.discard("settings_check_failed");
                            }
                            if let Some(e) = e {
                                session.shared.metrics.login(LoginResult::InvalidSettings);
                                return Err((session.client, greeting, e));
                            }
                        }
                    }
                }
                Ok(mut lease) => {
                    if session.mode == PoolMode::Session {
                        if let Err(e) = session.settle_settings(&mut lease).await {
                            lease.discard("settings_check_failed");
                            session.shared.metrics.login(LoginResult::InvalidSettings);
                            return Err((session.client, greeting, e));
                        }
                        session.attach(lease);
                    } else {
                        lease.release();
                    }
                }
                Err(e) => {
                    let mut err = session.pool.client_error(&e);
                    err.severity = Severity::Fatal;
                    let result = match err.code {
                        _ if session.pool.login_failure().is_some() => {
                            LoginResult::UpstreamAuthFailed
                        }
                        sqlstate::INVALID_CATALOG_NAME => LoginResult::UnknownDatabase,
                        sqlstate::TOO_MANY_CONNECTIONS => LoginResult::Limit,
                        _ => LoginResult::UpstreamFailed,
                    };
                    session.shared.metrics.login(result);
                    session.shared.registry.forget_if_unused(&session.pool.key);
                    return Err((session.client, greeting, err));
                }
            }
        }
        if session.mode == PoolMode::Session {
            if let Some(pid) = session.server.as_mut().map(|l| l.conn().backend_pid) {
                let cancels = session.shared.cancels.clone();
                cancels.rekey(&mut session.cancel, pid);
            }
        }
        if session.mode == PoolMode::Transaction {
            session.adopt_spelling(spelled);
        }
        // AuthenticationOk, the parameters, the cancel key and ReadyForQuery: one write.
        let mut out = greeting;
        out.reserve(512);
        if let Some(ps) = session.pool.startup_params() {
            ps.write(&mut out, &session.wanted);
        }
        messages::backend_key_data(&mut out, session.cancel.pid, session.cancel.secret);
        messages::ready_for_query(&mut out, b'I');
        if session.client.write_all(&out).await.is_err() {
            session.shared.metrics.login(LoginResult::Abandoned);
            return Err((
                session.client,
                BytesMut::new(),
                ClientError::fatal(sqlstate::CONNECTION_FAILURE, "client went away"),
            ));
        }
        tracing::debug!(pool = %session.pool.key, mode = %session.mode, "client logged in");
        session.pool.clients.fetch_add(1, Ordering::Relaxed);
        let active = session.server.is_some();
        if active {
            session.pool.clients_active.fetch_add(1, Ordering::Relaxed);
        }
        session.gauge = Some(PoolClientGuard {
            pool: session.pool.clone(),
            active,
        });
        session.shared.metrics.login(LoginResult::Accepted);
        Ok(Box::new(session))
    }
}

/// How long the session-mode settings sync at login may take.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    /// Session mode: applies the client's startup settings on its server before login
    /// completes, and adopts the server's spelling of each value it reports, so the
    /// client is told what PostgreSQL would tell it (`client_encoding=utf8` is
    /// reported as `UTF8`, `euc_jp` as `EUC_JP`).
    async fn settle_settings(&mut self, lease: &mut crate::pool::Lease) -> Result<(), ClientError> {
        let conn = lease.conn();
        let Some((sql, changes)) =
            params::sync_sql(&self.wanted, &conn.params, &conn.original_params)
        else {
            return Ok(());
        };
        for (k, v) in changes {
            // A reported setting is updated by the server's ParameterStatus, with its
            // spelling; none comes when the value did not change (`utf8` on a UTF8
            // server), and then the current value is already the server's.
            if conn.original_params.contains_key(&k) {
                continue;
            }
            match v {
                Some(v) => {
                    conn.params.insert(k, v);
                }
                None => {
                    conn.params.remove(&k);
                }
            }
        }
        // The ParameterStatus answers update conn.params with the server's spelling.
        match conn.query_row(&sql, SETTLE_TIMEOUT).await {
            Ok(crate::server::QueryOutcome::Rows(_)) => {}
            Ok(crate::server::QueryOutcome::ServerError(text)) => {
                let (code, message) = text.split_once(": ").unwrap_or(("", text.as_str()));
                return Err(ClientError::fatal(
                    crate::server::leak_code_or(code, sqlstate::INVALID_PARAMETER_VALUE),
                    message.to_string(),
                ));
            }
            Err(e) => {
                return Err(ClientError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    format!("pgsidecar: the server failed while applying the connection's settings: {e}"),
                ));
            }
        }
        let spelled: Vec<(String, String)> = self
            .wanted
            .iter()
            .filter_map(|(k, v)| {
                let now = conn.params.get(k)?;
                (now != v).then(|| (k.clone(), now.clone()))
            })
            .collect();
        if !spelled.is_empty() {
            let wanted = Arc::make_mut(&mut self.wanted);
            for (k, v) in spelled {
                wanted.insert(k, v);
            }
        }
        self.wanted_fp = params::fingerprint(&self.wanted, &self.wanted_raw);
        conn.params_fp = self.wanted_fp;
        Ok(())
    }
}

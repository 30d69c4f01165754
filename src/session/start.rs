//! The end of login: the database and pool are picked, the first server (when one is
//! needed) checked, and the client told its parameters and cancel key.

use crate::server::params::Settings;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::handshake::Login;
use super::relay::Inbound;
use super::timers;
use super::tracker::{Effects, Tracker};
use super::validate;
use super::Shared;
use super::{ClientStmts, PoolClientGuard, ReadReady, Session, SessionStats};
use crate::config::PoolMode;
use crate::error::{sqlstate, ClientError, Severity};
use crate::metrics::LoginResult;
use crate::pool::CloseReason;
use crate::pool::PoolKey;
use crate::protocol::messages;
use crate::server::params;

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
        // The login is consumed here: its names move into the key.
        let key = PoolKey {
            database: login.database,
            user: login.user,
        };
        let pool = match shared.registry.try_get(&key) {
            Ok(p) => p,
            Err(e) => {
                shared.metrics.login(LoginResult::Limit);
                return Err((client, greeting, e));
            }
        };
        let (startup_settings, startup_fp) = pool.client_settings.intern(&login.params);
        let cancel = shared.cancels.register();
        let mut c_in = Inbound::default();
        // An idle client holds no buffer: the opening's read buffer goes unless it holds
        // messages the client sent ahead.
        if !leftover.is_empty() {
            c_in.buf = leftover;
        }
        // Boxed now, not at the end: the session is not part of this future's state.
        let mut session = Box::new(Self::fresh(
            client,
            shared,
            pool,
            &config,
            (startup_settings, startup_fp),
            cancel,
            c_in,
        ));
        let spelled = match session.first_server().await {
            Ok(s) => s,
            Err(e) => return Err((session.client, greeting, e)),
        };
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
        Ok(session)
    }

    /// The first login to a pool (and every session-mode login) needs a server: to
    /// learn the parameters clients are told, and to surface upstream errors (bad
    /// database, refused role) at login, where drivers expect them. Startup settings not
    /// seen before on this pool are tried on that server first.
    /// Returns how PostgreSQL spells the startup settings, once a check found them good.
    async fn first_server(&mut self) -> Result<Option<validate::Spelled>, ClientError> {
        let checked = validate::to_check(&self.startup_settings);
        let spelled = checked
            .as_ref()
            .and_then(|(_, fp)| validate::known_good(&self.pool, *fp));
        let to_check = checked.filter(|_| spelled.is_none());
        if self.mode == PoolMode::Session
            || self.pool.startup_params().is_none()
            || to_check.is_some()
        {
            // Boxed: the checkout is most of this future's size, and most
            // transaction-mode logins skip it.
            return Box::pin(self.checkout_first(spelled, to_check)).await;
        }
        Ok(spelled)
    }

    /// `first_server`'s checkout: `spelled` is what is known of the startup settings'
    /// spelling, `to_check` the settings to try on the server first.
    async fn checkout_first(
        &mut self,
        mut spelled: Option<validate::Spelled>,
        to_check: Option<(Settings, u64)>,
    ) -> Result<Option<validate::Spelled>, ClientError> {
        match self.pool.checkout().await {
            Ok(mut lease) if to_check.is_some() => {
                let (settings, fp) = to_check.unwrap_or_default();
                match validate::check(&self.pool, lease.conn(), &settings, fp).await {
                    Ok(_) if self.mode == PoolMode::Session => {
                        if let Err(e) = self.settle_settings(&mut lease).await {
                            lease.discard(CloseReason::SettingsCheckFailed);
                            self.shared.metrics.login(LoginResult::InvalidSettings);
                            return Err(e);
                        }
                        self.attach(lease)
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
                            lease.discard(CloseReason::SettingsCheckFailed);
                        }
                        if let Some(e) = e {
                            self.shared.metrics.login(LoginResult::InvalidSettings);
                            return Err(e);
                        }
                    }
                }
            }
            Ok(mut lease) => {
                if self.mode == PoolMode::Session {
                    if let Err(e) = self.settle_settings(&mut lease).await {
                        lease.discard(CloseReason::SettingsCheckFailed);
                        self.shared.metrics.login(LoginResult::InvalidSettings);
                        return Err(e);
                    }
                    self.attach(lease);
                } else {
                    lease.release();
                }
            }
            Err(e) => {
                let mut err = self.pool.client_error(&e);
                err.severity = Severity::Fatal;
                let result = match err.code {
                    _ if self.pool.login_failure().is_some() => LoginResult::UpstreamAuthFailed,
                    sqlstate::INVALID_CATALOG_NAME => LoginResult::UnknownDatabase,
                    sqlstate::TOO_MANY_CONNECTIONS => LoginResult::Limit,
                    _ => LoginResult::UpstreamFailed,
                };
                self.shared.metrics.login(result);
                self.shared.registry.forget_if_unused(&self.pool.key);
                return Err(err);
            }
        }
        Ok(spelled)
    }

    /// A session just logged in, before its first server.
    fn fresh(
        client: C,
        shared: Arc<Shared>,
        pool: Arc<crate::pool::Pool>,
        config: &crate::config::Config,
        // The client's startup settings and their fingerprint.
        (startup_settings, startup_fp): (Arc<Settings>, u64),
        cancel: crate::cancel::CancelGuard,
        c_in: Inbound,
    ) -> Self {
        let settings = pool.settings();
        Session {
            client,
            shared,
            pool,
            mode: settings.mode,
            max_message: config.limits.max_message_size as u32,
            c_in,
            s_in: Inbound::default(),
            server: None,
            tracker: Tracker::default(),
            stmts: ClientStmts::default(),
            wanted_fp: startup_fp,
            sql_sets: None,
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
            timers: timers::Timers::new(&config.limits),
            state_policy: settings.session_state,
            pin: None,
        }
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
        self.wanted_fp = self.settings_fp();
        conn.params_fp = self.wanted_fp;
        Ok(())
    }
}

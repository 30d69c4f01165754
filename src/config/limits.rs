//! `limits:`, `admin:` and `logging:` in proxy.yaml: caps and timeouts on clients, the
//! admin port's behaviour, and logging.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most client connections at once; more get FATAL 53300. Default `10000`.
    pub max_client_conn: usize,
    /// Largest Query/Parse/Bind/CopyData/FunctionCall message, in bytes. Default 128 MiB;
    /// at most 1 GiB - 1 (PostgreSQL's own limit).
    pub max_message_size: usize,
    /// Time a client has to complete startup, TLS and authentication; then FATAL 08P01.
    /// Default `60s`.
    #[serde(with = "humantime_serde")]
    pub client_login_timeout: Duration,
    /// Most pools for databases not listed under `databases:` (with no list: all
    /// pools); a login that would create one more gets FATAL 53300. Default `100`.
    pub max_dynamic_pools: usize,
    /// Time a new connection has to send its startup packet (after any TLS
    /// handshake); then it is closed. It does not count against `max_client_conn`
    /// until then, so silent sockets cannot lock logins out. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub client_startup_timeout: Duration,
    /// Most logged-in clients per database name; more get FATAL 53300. Unset: no cap.
    pub max_db_client_connections: Option<usize>,
    /// Most logged-in clients per user name; more get FATAL 53300. Unset: no cap.
    pub max_user_client_connections: Option<usize>,
    /// A client idle inside a transaction this long gets FATAL 25P03; its server is
    /// rolled back and returned to the pool. Unset: no limit.
    #[serde(with = "humantime_serde")]
    pub idle_transaction_timeout: Option<Duration>,
    /// A request (query, extended batch, COPY) running this long is cancelled on the
    /// server, and the client gets PostgreSQL's ERROR 57014. Only while something is in
    /// flight. If the server does not answer the cancel within 5s more, the client gets
    /// FATAL 57014 and the server connection is closed. Unset: no limit.
    #[serde(with = "humantime_serde")]
    pub query_timeout: Option<Duration>,
    /// A transaction (or a single request outside one) lasting this long, busy or idle,
    /// ends with FATAL 25P04: an idle transaction's server is rolled back and reused,
    /// one with a request still running is closed. Unset: no limit.
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Option<Duration>,
    /// A client idle outside a transaction this long gets FATAL 57P05. Unset: no limit.
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Option<Duration>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_client_conn: 10_000,
            // 128 MiB: a message is held whole while it is read, so this bounds the
            // memory one client can make the proxy use (the Kubernetes limits are
            // derived from it).
            max_message_size: 128 << 20,
            client_login_timeout: Duration::from_secs(60),
            max_dynamic_pools: 100,
            client_startup_timeout: Duration::from_secs(10),
            max_db_client_connections: None,
            max_user_client_connections: None,
            idle_transaction_timeout: None,
            query_timeout: None,
            transaction_timeout: None,
            client_idle_timeout: None,
        }
    }
}

// Debug is written by hand in `redact.rs`: it must not print secrets.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token required by mutating admin endpoints (`${ENV}` recommended).
    #[serde(skip_serializing)]
    pub token: Option<String>,
    /// Whether an open circuit breaker makes `/readyz` fail. Default `false`.
    pub unready_when_breaker_open: bool,
    /// Whether `/readyz` fails while PostgreSQL refuses the proxy's own login for a
    /// pool (wrong upstream password, say). Default `false`.
    pub unready_when_upstream_login_fails: bool,
    /// How long PAUSE (console or `POST /api/pools/{name}/pause`) waits for
    /// transactions in flight to finish; the pools stay paused after it. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub pause_timeout: Duration,
    /// Grace period after which `/startupz` succeeds even without an upstream connection.
    /// Default `60s`.
    #[serde(with = "humantime_serde")]
    pub startup_grace: Duration,
    /// After SIGTERM, keep accepting for this long so endpoints can be removed. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// After the delay, wait this long for transactions to finish. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// `text` (default) or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `pgsidecar=debug`. Default `info`.
    pub level: String,
    /// An info line when a client has logged in (PgBouncer's log_connections). Default `true`.
    pub log_connections: bool,
    /// An info line when a logged-in client leaves, with how long it stayed
    /// (PgBouncer's log_disconnections). Default `true`.
    pub log_disconnections: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token: None,
            unready_when_breaker_open: false,
            unready_when_upstream_login_fails: false,
            pause_timeout: Duration::from_secs(30),
            startup_grace: Duration::from_secs(60),
            shutdown_delay: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            format: "text".into(),
            level: "info".into(),
            log_connections: true,
            log_disconnections: true,
        }
    }
}

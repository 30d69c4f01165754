//! `proxy.yaml`: typed configuration with documented defaults, `${VAR}` expansion,
//! unknown-key rejection and semantic validation before any socket is bound.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::Secret;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// A value of the wrong type or shape: `key` is its dotted path (`pool.size`).
    #[error("{key}: {message}")]
    Yaml { key: String, message: String },
    /// Not YAML at all, at a position of the text.
    #[error("invalid YAML at line {line} column {column}: {message}")]
    YamlSyntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("environment variable {0} is not set (use ${{{0}:-default}} to give a default)")]
    MissingEnv(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Longest duration any setting may have.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// How server connections are shared between clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection is bound to a client for its whole session.
    Session,
    /// A server connection is bound only for the duration of a transaction.
    #[default]
    Transaction,
}

/// Transaction mode: what happens to a client whose statement leaves state on its server
/// connection past the transaction (session advisory lock, temp table, SQL PREPARE,
/// LISTEN, WITH HOLD cursor, session characteristics, SET ROLE, LOAD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatePolicy {
    /// The client keeps its server until the state is gone (or it leaves, when the
    /// server is cleaned before anyone else gets it). Costs pool capacity while held.
    #[default]
    Pin,
    /// The statement is refused with SQLSTATE 0A000.
    Reject,
    /// Forwarded as is: the state stays on the server for whoever gets it next.
    Allow,
}

impl std::str::FromStr for PoolMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "session" => Ok(PoolMode::Session),
            "transaction" => Ok(PoolMode::Transaction),
            _ => Err(format!(
                "pool mode must be session or transaction, not {s:?}"
            )),
        }
    }
}

impl std::fmt::Display for PoolMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        })
    }
}

/// How clients prove who they are to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum AuthMethod {
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "md5")]
    Md5,
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address clients connect to. Default `127.0.0.1:6432`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address of the HTTP admin port (metrics, probes, control). Default `127.0.0.1:9930`.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// Default pool mode for all users. Default `transaction`.
    #[serde(default)]
    pub pool_mode: PoolMode,
    /// Threads that run client sessions. `1` (default) runs everything on one
    /// event-loop thread, which costs the least CPU per transaction on small machines
    /// where the proxy shares cores with PostgreSQL; more spreads sessions over a
    /// work-stealing pool. Read at start only.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    /// Users allowed to connect. Empty with `auth.method: trust` admits any user name and
    /// connects upstream with `upstream.user` (or the client's name).
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// Databases clients may ask for. Empty admits any database name.
    #[serde(default)]
    pub databases: Vec<DatabaseConfig>,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Health checks of server connections and of the upstream.
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
    /// TLS between clients and the proxy (see `tls.rs`).
    #[serde(default)]
    pub tls: crate::tls::ClientTlsConfig,
}

// Debug is written by hand in `redact.rs`: it must not print secrets.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Host name or IP of the PostgreSQL server, or several (`[a, b:5433]` or
    /// `"a,b:5433"`, libpq style; see `server::hosts`). Default `127.0.0.1`.
    #[serde(default = "default_host", deserialize_with = "host_list")]
    pub host: String,
    /// Port of hosts listed without one. Default `5432`.
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// What a server connection must be connected to, as libpq's: `read-write`
    /// (default), `primary`, `read-only`, `standby`, `prefer-standby`, `any`.
    #[serde(default)]
    pub target_session_attrs: crate::server::hosts::TargetSessionAttrs,
    /// `disable` (hosts in the order listed) or `random`.
    #[serde(default)]
    pub load_balance_hosts: crate::server::hosts::LoadBalanceHosts,
    /// Unacknowledged data older than this aborts a server connection (TCP_USER_TIMEOUT);
    /// `0s` leaves the kernel's default (about 15 minutes). Default `10s`.
    #[serde(default = "default_tcp_user_timeout", with = "humantime_serde")]
    pub tcp_user_timeout: Duration,
    /// TCP keepalive on server connections: first probe after this much idle time, then
    /// every `keepalives_interval`, `keepalives_count` unanswered ones end it. Defaults
    /// `10s`, `5s`, `3`: a vanished server is found within 25 s, not 2 hours.
    #[serde(default = "default_keepalives_idle", with = "humantime_serde")]
    pub keepalives_idle: Duration,
    #[serde(default = "default_keepalives_interval", with = "humantime_serde")]
    pub keepalives_interval: Duration,
    #[serde(default = "default_keepalives_count")]
    pub keepalives_count: u32,
    /// Role the proxy logs in as upstream, unless a user entry sets `server_user`.
    /// Unset: the client's user name.
    #[serde(default)]
    pub user: Option<String>,
    /// Password for `user` (plaintext; `${ENV}` recommended). Unset: the client's
    /// configured plaintext password, else none (trust upstream).
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    /// Time allowed for TCP connect plus authentication. Default `5s`.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TLS to PostgreSQL with libpq's sslmode semantics. Default `sslmode: prefer`.
    #[serde(default)]
    pub tls: crate::tls::UpstreamTlsConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `trust`, `md5` or `scram-sha-256` (default).
    #[serde(default)]
    pub method: AuthMethod,
}

// Debug is written by hand in `redact.rs`: it must not print secrets.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plaintext, `md5<hex>` or a `SCRAM-SHA-256$...` verifier as in pg_authid.
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    /// Role used upstream for this user (default: `upstream.user`, else `name`).
    #[serde(default)]
    pub server_user: Option<String>,
    /// Password used upstream for this user (default: `upstream.password`, else the
    /// plaintext `password`).
    #[serde(default, skip_serializing)]
    pub server_password: Option<String>,
    /// Pool mode for this user's pools (default: the global `pool_mode`).
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    /// May connect to the virtual `pgsidecar` admin database.
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub name: String,
    /// Real database name upstream (default: `name`).
    #[serde(default)]
    pub server_database: Option<String>,
    /// Pool size for this database's pools (default: `pool.size`).
    #[serde(default)]
    pub pool_size: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Most server connections per (database, user) pool (alias `max_size`). Default `20`.
    #[serde(default = "default_pool_size", alias = "max_size")]
    pub size: u32,
    /// Connections kept open even when idle. Default `0`.
    #[serde(default)]
    pub min_size: u32,
    /// How long a client waits for a server connection before it gets an error
    /// (SQLSTATE 53300). Default `30s`.
    #[serde(default = "default_query_wait_timeout", with = "humantime_serde")]
    pub query_wait_timeout: Duration,
    /// Run when a session-mode server is released, if the session changed state.
    /// Empty disables it. Default `DISCARD ALL`.
    #[serde(default = "default_reset_query")]
    pub reset_query: String,
    /// Statements cached per server connection in transaction mode (LRU). Default `256`.
    #[serde(default = "default_max_prepared")]
    pub max_prepared_statements: usize,
    /// Close server connections idle longer than this (jittered). Default `10m`.
    #[serde(default = "default_server_idle_timeout", with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    /// Close server connections older than this when released (jittered). Default `1h`.
    #[serde(default = "default_server_lifetime", with = "humantime_serde")]
    pub server_lifetime: Duration,
    /// Fraction of open connections the sizing controller aims to keep busy; it opens
    /// connections ahead of demand above it and closes idle ones below it. In (0, 1].
    /// Default `0.8`.
    #[serde(default = "default_target_utilization")]
    pub target_utilization: f64,
    /// How long load must stay below the target before idle connections are closed
    /// (down to `min_size`). Default `30s`.
    #[serde(default = "default_shrink_delay", with = "humantime_serde")]
    pub shrink_delay: Duration,
    /// Congestion control: when PostgreSQL refuses a connection with 53300 (or connecting
    /// gets sharply slower), halve the pool's ceiling and let clients wait for a released
    /// connection; raise it by one per `aimd_interval`. Sidecars sharing a database
    /// converge to a fair share of its max_connections. Default `true`.
    #[serde(default = "default_true")]
    pub aimd: bool,
    /// AIMD additive-increase period. Default `1s`.
    #[serde(default = "default_aimd_interval", with = "humantime_serde")]
    pub aimd_interval: Duration,
    /// Transaction mode: `pin` (default), `reject` or `allow` statements that leave
    /// session state on a server connection.
    #[serde(default)]
    pub session_state: SessionStatePolicy,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Query that tests a server connection; empty sends an empty query (one round trip,
    /// no parsing). Default empty.
    #[serde(default)]
    pub check_query: String,
    /// Time a check query has to answer. Default `2s`.
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub check_timeout: Duration,
    /// A connection unverified (idle) for longer is checked before it is handed out.
    /// `0s` checks before every use. Default `30s`.
    #[serde(default = "default_server_check_delay", with = "humantime_serde")]
    pub server_check_delay: Duration,
    /// Idle connections unverified this long are checked in the background; `0s`
    /// disables it. Default `30s`.
    #[serde(default = "default_idle_check_interval", with = "humantime_serde")]
    pub idle_check_interval: Duration,
    /// How often each pool probes the upstream with a fresh connection (connect, login,
    /// check query); `0s` probes only to recover from an open breaker. Default `10s`.
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Time a probe has for all of it. Default `5s`.
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub probe_timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            check_query: String::new(),
            check_timeout: default_check_timeout(),
            server_check_delay: default_server_check_delay(),
            idle_check_interval: default_idle_check_interval(),
            probe_interval: default_probe_interval(),
            probe_timeout: default_probe_timeout(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_target_utilization() -> f64 {
    0.8
}
fn default_shrink_delay() -> Duration {
    Duration::from_secs(30)
}
fn default_aimd_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_server_check_delay() -> Duration {
    Duration::from_secs(30)
}
fn default_idle_check_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_probe_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(5)
}

/// What checkouts do while the circuit breaker is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BreakerOnOpen {
    /// Fail at once with SQLSTATE 08006, saying since when and when the next try is.
    #[default]
    FailFast,
    /// Keep clients queued (up to `pool.query_wait_timeout`) to ride out short outages.
    Queue,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most client connections at once; more get FATAL 53300. Default `10000`.
    #[serde(default = "default_max_client_conn")]
    pub max_client_conn: usize,
    /// Largest Query/Parse/Bind/CopyData/FunctionCall message, in bytes. Default 128 MiB;
    /// at most 1 GiB - 1 (PostgreSQL's own limit).
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// Time a client has to complete startup, TLS and authentication; then FATAL 08P01.
    /// Default `60s`.
    #[serde(default = "default_client_login_timeout", with = "humantime_serde")]
    pub client_login_timeout: Duration,
    /// Most pools for databases not listed under `databases:` (with no list: all
    /// pools); a login that would create one more gets FATAL 53300. Default `100`.
    #[serde(default = "default_max_dynamic_pools")]
    pub max_dynamic_pools: usize,
    /// Time a new connection has to send its startup packet (after any TLS
    /// handshake); then it is closed. It does not count against `max_client_conn`
    /// until then, so silent sockets cannot lock logins out. Default `10s`.
    #[serde(default = "default_client_startup_timeout", with = "humantime_serde")]
    pub client_startup_timeout: Duration,
    /// Most logged-in clients per database name; more get FATAL 53300. Unset: no cap.
    #[serde(default)]
    pub max_db_client_connections: Option<usize>,
    /// Most logged-in clients per user name; more get FATAL 53300. Unset: no cap.
    #[serde(default)]
    pub max_user_client_connections: Option<usize>,
    /// A client idle inside a transaction this long gets FATAL 25P03; its server is
    /// rolled back and returned to the pool. Unset: no limit.
    #[serde(default, with = "humantime_serde")]
    pub idle_transaction_timeout: Option<Duration>,
    /// A request (query, extended batch, COPY) running this long is cancelled on the
    /// server, and the client gets PostgreSQL's ERROR 57014. Only while something is in
    /// flight. If the server does not answer the cancel within 5s more, the client gets
    /// FATAL 57014 and the server connection is closed. Unset: no limit.
    #[serde(default, with = "humantime_serde")]
    pub query_timeout: Option<Duration>,
    /// A transaction (or a single request outside one) lasting this long, busy or idle,
    /// ends with FATAL 25P04: an idle transaction's server is rolled back and reused,
    /// one with a request still running is closed. Unset: no limit.
    #[serde(default, with = "humantime_serde")]
    pub transaction_timeout: Option<Duration>,
    /// A client idle outside a transaction this long gets FATAL 57P05. Unset: no limit.
    #[serde(default, with = "humantime_serde")]
    pub client_idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive connect/authentication/health failures that open the breaker. Default `3`.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// First wait before a trial connection; doubles per consecutive opening. Default `500ms`.
    #[serde(default = "default_backoff_base", with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest wait between trials. Default `30s`.
    #[serde(default = "default_backoff_cap", with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// `fail_fast` (default) or `queue`: what a checkout does while the breaker is open.
    #[serde(default)]
    pub on_open: BreakerOnOpen,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: default_failure_threshold(),
            backoff_base: default_backoff_base(),
            backoff_cap: default_backoff_cap(),
            on_open: BreakerOnOpen::default(),
        }
    }
}

fn default_failure_threshold() -> u32 {
    3
}
fn default_backoff_base() -> Duration {
    Duration::from_millis(500)
}
fn default_backoff_cap() -> Duration {
    Duration::from_secs(30)
}

// Debug is written by hand in `redact.rs`: it must not print secrets.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token required by mutating admin endpoints (`${ENV}` recommended).
    #[serde(default, skip_serializing)]
    pub token: Option<String>,
    /// Whether an open circuit breaker makes `/readyz` fail. Default `false`.
    #[serde(default)]
    pub unready_when_breaker_open: bool,
    /// Whether `/readyz` fails while PostgreSQL refuses the proxy's own login for a
    /// pool (wrong upstream password, say). Default `false`.
    #[serde(default)]
    pub unready_when_upstream_login_fails: bool,
    /// How long PAUSE (console or `POST /api/pools/{name}/pause`) waits for
    /// transactions in flight to finish; the pools stay paused after it. Default `30s`.
    #[serde(default = "default_pause_timeout", with = "humantime_serde")]
    pub pause_timeout: Duration,
    /// Grace period after which `/startupz` succeeds even without an upstream connection.
    /// Default `60s`.
    #[serde(default = "default_startup_grace", with = "humantime_serde")]
    pub startup_grace: Duration,
    /// After SIGTERM, keep accepting for this long so endpoints can be removed. Default `5s`.
    #[serde(default = "default_shutdown_delay", with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// After the delay, wait this long for transactions to finish. Default `30s`.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// `text` (default) or `json`.
    #[serde(default = "default_log_format")]
    pub format: String,
    /// A tracing filter, e.g. `info` or `pgsidecar=debug`. Default `info`.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// An info line when a client has logged in (PgBouncer's log_connections). Default `true`.
    #[serde(default = "default_true")]
    pub log_connections: bool,
    /// An info line when a logged-in client leaves, with how long it stayed
    /// (PgBouncer's log_disconnections). Default `true`.
    #[serde(default = "default_true")]
    pub log_disconnections: bool,
}

fn default_listen() -> String {
    "127.0.0.1:6432".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9930".into()
}
fn default_worker_threads() -> usize {
    1
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_tcp_user_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_keepalives_idle() -> Duration {
    Duration::from_secs(10)
}
fn default_keepalives_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_keepalives_count() -> u32 {
    3
}

/// `upstream.host` as a string (`"a,b"`) or a list of strings, kept as `"a,b"`.
fn host_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s,
        OneOrMany::Many(v) => v.join(","),
    })
}
fn default_pg_port() -> u16 {
    5432
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_pool_size() -> u32 {
    20
}
fn default_query_wait_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_reset_query() -> String {
    "DISCARD ALL".into()
}
fn default_max_prepared() -> usize {
    256
}
fn default_server_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_server_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_client_conn() -> usize {
    10_000
}
/// 128 MiB: a message is held whole while it is read, so this bounds the memory one
/// client can make the proxy use (the Kubernetes limits are derived from it).
fn default_max_message_size() -> usize {
    128 << 20
}
fn default_pause_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_dynamic_pools() -> usize {
    100
}
fn default_client_startup_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_client_login_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_startup_grace() -> Duration {
    Duration::from_secs(60)
}
fn default_shutdown_delay() -> Duration {
    Duration::from_secs(5)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_log_format() -> String {
    "text".into()
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: default_pool_size(),
            min_size: 0,
            query_wait_timeout: default_query_wait_timeout(),
            reset_query: default_reset_query(),
            max_prepared_statements: default_max_prepared(),
            server_idle_timeout: default_server_idle_timeout(),
            server_lifetime: default_server_lifetime(),
            target_utilization: default_target_utilization(),
            shrink_delay: default_shrink_delay(),
            aimd: true,
            aimd_interval: default_aimd_interval(),
            session_state: SessionStatePolicy::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_client_conn: default_max_client_conn(),
            max_message_size: default_max_message_size(),
            client_login_timeout: default_client_login_timeout(),
            max_dynamic_pools: default_max_dynamic_pools(),
            client_startup_timeout: default_client_startup_timeout(),
            max_db_client_connections: None,
            max_user_client_connections: None,
            idle_transaction_timeout: None,
            query_timeout: None,
            transaction_timeout: None,
            client_idle_timeout: None,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token: None,
            unready_when_breaker_open: false,
            unready_when_upstream_login_fails: false,
            pause_timeout: default_pause_timeout(),
            startup_grace: default_startup_grace(),
            shutdown_delay: default_shutdown_delay(),
            shutdown_timeout: default_shutdown_timeout(),
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            format: default_log_format(),
            level: default_log_level(),
            log_connections: true,
            log_disconnections: true,
        }
    }
}

impl UpstreamConfig {
    pub fn new(host: String, port: u16) -> Self {
        UpstreamConfig {
            host,
            port,
            target_session_attrs: Default::default(),
            load_balance_hosts: Default::default(),
            tcp_user_timeout: default_tcp_user_timeout(),
            keepalives_idle: default_keepalives_idle(),
            keepalives_interval: default_keepalives_interval(),
            keepalives_count: default_keepalives_count(),
            user: None,
            password: None,
            connect_timeout: default_connect_timeout(),
            tls: Default::default(),
        }
    }

    /// The hosts to try, each with its port.
    pub fn hosts(&self) -> Result<Vec<crate::server::hosts::HostAddr>, String> {
        crate::server::hosts::parse_hosts(&self.host, self.port)
            .map_err(|e| format!("upstream.host: {e}"))
    }
}

impl Config {
    /// A configuration with defaults everywhere and the given upstream.
    pub fn with_upstream(upstream: UpstreamConfig) -> Self {
        Config {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            pool_mode: PoolMode::default(),
            worker_threads: default_worker_threads(),
            upstream,
            auth: AuthConfig::default(),
            users: Vec::new(),
            databases: Vec::new(),
            pool: PoolConfig::default(),
            limits: LimitsConfig::default(),
            breaker: BreakerConfig::default(),
            health: HealthConfig::default(),
            admin: AdminConfig::default(),
            logging: LoggingConfig::default(),
            tls: Default::default(),
        }
    }

    /// Reads, expands and parses a file (not yet validated).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &|k| std::env::var(k).ok())
    }

    /// Parses YAML text, expanding `${VAR}` / `${VAR:-default}` in string values with
    /// `env`. Expansion happens after YAML parsing so a secret's characters can never
    /// change the document's structure.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            ConfigError::YamlSyntax {
                line,
                column,
                message: e.to_string(),
            }
        })?;
        expand_value(&mut value, env)?;
        // The path of the value that failed (`pool.size`), which serde_yaml's own error
        // does not name once the document is a Value.
        serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Yaml {
            key: e.path().to_string(),
            message: e.inner().to_string(),
        })
    }

    /// Every duration at most `MAX_DURATION`: time arithmetic with absurd values
    /// (`1000000000000years`) would overflow at run time.
    fn check_durations(&self) -> Result<(), ConfigError> {
        let (u, p, h, l, b, a) = (
            &self.upstream,
            &self.pool,
            &self.health,
            &self.limits,
            &self.breaker,
            &self.admin,
        );
        let all = [
            ("upstream.connect_timeout", Some(u.connect_timeout)),
            ("upstream.tcp_user_timeout", Some(u.tcp_user_timeout)),
            ("upstream.keepalives_idle", Some(u.keepalives_idle)),
            ("upstream.keepalives_interval", Some(u.keepalives_interval)),
            ("pool.query_wait_timeout", Some(p.query_wait_timeout)),
            ("pool.server_idle_timeout", Some(p.server_idle_timeout)),
            ("pool.server_lifetime", Some(p.server_lifetime)),
            ("pool.shrink_delay", Some(p.shrink_delay)),
            ("pool.aimd_interval", Some(p.aimd_interval)),
            ("health.check_timeout", Some(h.check_timeout)),
            ("health.server_check_delay", Some(h.server_check_delay)),
            ("health.idle_check_interval", Some(h.idle_check_interval)),
            ("health.probe_interval", Some(h.probe_interval)),
            ("health.probe_timeout", Some(h.probe_timeout)),
            ("limits.client_login_timeout", Some(l.client_login_timeout)),
            (
                "limits.client_startup_timeout",
                Some(l.client_startup_timeout),
            ),
            (
                "limits.idle_transaction_timeout",
                l.idle_transaction_timeout,
            ),
            ("limits.query_timeout", l.query_timeout),
            ("limits.client_idle_timeout", l.client_idle_timeout),
            ("breaker.backoff_base", Some(b.backoff_base)),
            ("breaker.backoff_cap", Some(b.backoff_cap)),
            ("admin.pause_timeout", Some(a.pause_timeout)),
            ("admin.startup_grace", Some(a.startup_grace)),
            ("admin.shutdown_delay", Some(a.shutdown_delay)),
            ("admin.shutdown_timeout", Some(a.shutdown_timeout)),
        ];
        for (key, d) in all {
            if d.is_some_and(|d| d > MAX_DURATION) {
                return Err(ConfigError::Invalid(format!(
                    "{key} is longer than the most allowed, 365 days"
                )));
            }
        }
        Ok(())
    }

    pub fn find_user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn find_database(&self, name: &str) -> Option<&DatabaseConfig> {
        self.databases.iter().find(|d| d.name == name)
    }

    /// Semantic checks that serde cannot express. Run before binding any socket.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.listen.parse::<SocketAddr>().is_err() {
            return bad(format!(
                "listen: {:?} is not an IP:port address",
                self.listen
            ));
        }
        if self.admin_listen.parse::<SocketAddr>().is_err() {
            return bad(format!(
                "admin_listen: {:?} is not an IP:port address",
                self.admin_listen
            ));
        }
        if self.worker_threads == 0 || self.worker_threads > 256 {
            return bad("worker_threads must be between 1 and 256".into());
        }
        if self.upstream.host.is_empty() {
            return bad("upstream.host must not be empty".into());
        }
        if self.upstream.port == 0 {
            return bad("upstream.port must not be 0".into());
        }
        if self.pool.size == 0 {
            return bad("pool.size must be at least 1".into());
        }
        if self.pool.min_size > self.pool.size {
            return bad(format!(
                "pool.min_size ({}) is larger than pool.size ({})",
                self.pool.min_size, self.pool.size
            ));
        }
        for (name, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("pool.query_wait_timeout", self.pool.query_wait_timeout),
            (
                "limits.client_login_timeout",
                self.limits.client_login_timeout,
            ),
            (
                "limits.client_startup_timeout",
                self.limits.client_startup_timeout,
            ),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be greater than 0"));
            }
        }
        if !(self.pool.target_utilization > 0.0 && self.pool.target_utilization <= 1.0) {
            return bad(format!(
                "pool.target_utilization must be in (0, 1], not {}",
                self.pool.target_utilization
            ));
        }
        for (name, d) in [
            ("pool.aimd_interval", self.pool.aimd_interval),
            ("health.check_timeout", self.health.check_timeout),
            ("health.probe_timeout", self.health.probe_timeout),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be greater than 0"));
            }
        }
        if self.breaker.failure_threshold == 0 {
            return bad("breaker.failure_threshold must be at least 1".into());
        }
        if self.breaker.backoff_base.is_zero()
            || self.breaker.backoff_cap < self.breaker.backoff_base
        {
            return bad(
                "breaker.backoff_base must be > 0 and not above breaker.backoff_cap".into(),
            );
        }
        if self.limits.max_dynamic_pools == 0 {
            return bad("limits.max_dynamic_pools must be at least 1".into());
        }
        if self.limits.max_client_conn == 0 {
            return bad("limits.max_client_conn must be at least 1".into());
        }
        for (name, cap) in [
            (
                "limits.max_db_client_connections",
                self.limits.max_db_client_connections,
            ),
            (
                "limits.max_user_client_connections",
                self.limits.max_user_client_connections,
            ),
        ] {
            if cap == Some(0) {
                return bad(format!(
                    "{name} must be at least 1 (leave it unset for no cap)"
                ));
            }
        }
        for (name, d) in [
            (
                "limits.idle_transaction_timeout",
                self.limits.idle_transaction_timeout,
            ),
            ("limits.query_timeout", self.limits.query_timeout),
            (
                "limits.transaction_timeout",
                self.limits.transaction_timeout,
            ),
            (
                "limits.client_idle_timeout",
                self.limits.client_idle_timeout,
            ),
        ] {
            if d.is_some_and(|d| d.is_zero()) {
                return bad(format!(
                    "{name} must be greater than 0 (leave it unset for no limit)"
                ));
            }
        }
        self.tls.validate().map_err(ConfigError::Invalid)?;
        self.upstream.tls.validate().map_err(ConfigError::Invalid)?;
        self.upstream.hosts().map_err(ConfigError::Invalid)?;
        if self.upstream.keepalives_idle.is_zero()
            || self.upstream.keepalives_interval.is_zero()
            || self.upstream.keepalives_count == 0
        {
            return bad("upstream.keepalives_idle, keepalives_interval and keepalives_count must be greater than 0".into());
        }
        if self.limits.max_message_size < 1024 || self.limits.max_message_size > 0x3fff_ffff {
            return bad("limits.max_message_size must be between 1024 and 1073741823".into());
        }
        checks::log_level(&self.logging.level).map_err(ConfigError::Invalid)?;
        self.check_durations()?;
        if !matches!(self.logging.format.as_str(), "text" | "json") {
            return bad(format!(
                "logging.format must be text or json, not {:?}",
                self.logging.format
            ));
        }
        let mut seen = HashSet::new();
        for u in &self.users {
            if u.name.is_empty() {
                return bad("users: a user has an empty name".into());
            }
            if !seen.insert(u.name.as_str()) {
                return bad(format!("users: {:?} is listed twice", u.name));
            }
            if self.auth.method != AuthMethod::Trust && u.password.is_none() {
                return bad(format!(
                    "users: {:?} has no password but auth.method is {:?}; set a password or use auth.method: trust",
                    u.name, self.auth.method
                ));
            }
            for (what, p) in [
                ("password", &u.password),
                ("server_password", &u.server_password),
            ] {
                if let Some(Err(e)) = p.as_deref().map(Secret::parse_strict) {
                    return bad(format!("users: {:?} has a {what} that {e}", u.name));
                }
            }
            if self.auth.method == AuthMethod::Md5 {
                if let Some(Secret::Scram(_)) = u.password.as_deref().map(Secret::parse) {
                    return bad(format!(
                        "users: {:?} has a SCRAM verifier, which cannot check md5 logins; use auth.method: scram-sha-256",
                        u.name
                    ));
                }
            }
        }
        if self.auth.method != AuthMethod::Trust && self.users.is_empty() {
            return bad("auth.method requires passwords but no users are configured".into());
        }
        let mut seen = HashSet::new();
        for d in &self.databases {
            if !seen.insert(d.name.as_str()) {
                return bad(format!("databases: {:?} is listed twice", d.name));
            }
            if d.pool_size == Some(0) {
                return bad(format!("databases: {:?} has pool_size 0", d.name));
            }
        }
        Ok(())
    }
}

/// Expands `${VAR}` and `${VAR:-default}` in every string of the document. A string that
/// is exactly one expression is re-read as a YAML scalar so `port: ${PGPORT}` stays a number.
fn expand_value(
    v: &mut serde_yaml::Value,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match v {
        serde_yaml::Value::String(s) => {
            if !s.contains("${") {
                return Ok(());
            }
            let whole = s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
            let expanded = expand_str(s, env)?;
            if whole {
                if let Ok(scalar @ (serde_yaml::Value::Number(_) | serde_yaml::Value::Bool(_))) =
                    serde_yaml::from_str::<serde_yaml::Value>(&expanded)
                {
                    *v = scalar;
                    return Ok(());
                }
            }
            *v = serde_yaml::Value::String(expanded);
        }
        serde_yaml::Value::Sequence(seq) => {
            for item in seq {
                expand_value(item, env)?;
            }
        }
        serde_yaml::Value::Mapping(map) => {
            for (_, item) in map.iter_mut() {
                expand_value(item, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Expands one string; `$${` is a literal `${`.
pub fn expand_str(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(stripped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix("${") {
            let Some(end) = inner.find('}') else {
                return Err(ConfigError::Invalid(format!(
                    "unterminated ${{ in {:?}",
                    redact_hint(s)
                )));
            };
            let expr = &inner[..end];
            let (name, default) = match expr.find(":-") {
                Some(j) => (&expr[..j], Some(&expr[j + 2..])),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ConfigError::Invalid(format!(
                    "invalid variable name {name:?}"
                )));
            }
            match (env(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => return Err(ConfigError::MissingEnv(name.to_string())),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

// Strings with unterminated expressions may hold secrets; show only their start.
fn redact_hint(s: &str) -> String {
    let prefix: String = s.chars().take(8).collect();
    format!("{prefix}...")
}

pub mod checks;
mod redact;
#[cfg(test)]
mod tests;

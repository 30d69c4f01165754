//! `proxy.yaml`: typed configuration with documented defaults, `${VAR}` expansion,
//! unknown-key rejection and semantic validation before any socket is bound.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod checks;
mod env;
pub mod hosts;
mod limits;
mod load;
mod pool;
mod redact;
pub mod tls;
mod upstream;
mod validate;

pub use env::expand_str;
pub use limits::{AdminConfig, LimitsConfig, LoggingConfig};
pub use pool::{BreakerConfig, BreakerOnOpen, HealthConfig, PoolConfig};
pub use upstream::UpstreamConfig;

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
    pub tls: tls::ClientTlsConfig,
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

fn default_listen() -> String {
    "127.0.0.1:6432".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9930".into()
}
fn default_worker_threads() -> usize {
    1
}

#[cfg(test)]
mod tests;

//! A connection from the proxy to PostgreSQL: connect, authenticate, learn the server's
//! parameters and cancel key, then hand the socket to the data path.

mod codes;
mod connect;
pub mod hosts;
mod login;
pub mod params;
pub mod prepared;
mod query;
mod tcp;

pub use tcp::{set_client_options, TcpSettings, LISTENER_OPTIONS_INHERITED};

pub(crate) use codes::{leak_code, leak_code_or, refused_code_in};

use crate::server::params::Settings;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::error::{sqlstate, ClientError, Severity};
use crate::protocol::messages;
use prepared::PreparedCache;

/// Where and as whom a pool's server connections log in.
#[derive(Clone)]
pub struct ServerIdentity {
    /// The upstream's hosts and what is known of them (shared by its pools).
    pub hosts: std::sync::Arc<hosts::Hosts>,
    pub tcp: TcpSettings,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub connect_timeout: Duration,
    /// TLS to the server, built from `upstream.tls` with its files read.
    pub tls: std::sync::Arc<crate::tls::UpstreamTls>,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("hosts", &self.hosts.list())
            .field("user", &self.user)
            .field("database", &self.database)
            .field("sslmode", &self.tls.mode)
            .finish_non_exhaustive()
    }
}

/// Why a server connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not connect to {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out after {0:?} connecting to {1}")]
    Timeout(Duration, String),
    /// PostgreSQL refused the login; its own error is passed on to the client.
    #[error("server refused the login: {code} {message}")]
    Server {
        code: String,
        message: String,
        fatal: bool,
    },
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("TLS to {addr}: {source}")]
    Tls {
        addr: String,
        source: crate::tls::upstream::UpstreamTlsError,
    },
    /// Several hosts, none usable now (down, or of another role: a failover).
    #[error("no upstream host is usable for target_session_attrs={attrs} ({tried})")]
    NoSuitableHost { attrs: String, tried: String },
}

impl ConnectError {
    /// Whether this failure says something about the upstream's health (for the breaker):
    /// an authentication refusal is a configuration problem, not an outage.
    pub fn is_refused_login(&self) -> bool {
        matches!(self, ConnectError::Server { code, .. } if code.starts_with("28"))
    }

    pub fn sqlstate(&self) -> &str {
        match self {
            ConnectError::Server { code, .. } => code,
            _ => sqlstate::CONNECTION_FAILURE,
        }
    }

    pub fn to_client_error(&self) -> ClientError {
        match self {
            ConnectError::Server { code, message, .. } => {
                // Pass PostgreSQL's own verdict through (e.g. 28P01, 3D000, 53300).
                let code = leak_code(code);
                ClientError {
                    severity: Severity::Error,
                    code,
                    message: message.clone(),
                    hint: None,
                }
            }
            ConnectError::NoSuitableHost { .. } => ClientError::error(
                sqlstate::CONNECTION_FAILURE,
                format!("pgsidecar: {self}"),
            )
            .with_hint("a failover may be in progress, or upstream.target_session_attrs does not match any host; the request can be retried"),
            other => ClientError::error(
                sqlstate::CONNECTION_FAILURE,
                format!("pgsidecar: the database is unreachable: {other}"),
            )
            .with_hint("check that PostgreSQL is running and upstream.host/port are right; the request can be retried"),
        }
    }
}

pub(super) static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The connection to PostgreSQL.
pub type ServerStream = crate::tls::MaybeTls<TcpStream>;

/// One authenticated connection to PostgreSQL.
/// A server connection. Boxed: it moves between the pool's idle list, leases and
/// sessions on every transaction, and a pointer moves for free (no copy, no allocation
/// per checkout).
#[derive(Debug)]
pub struct ServerConn(Box<ServerConnState>);

impl std::ops::Deref for ServerConn {
    type Target = ServerConnState;
    fn deref(&self) -> &ServerConnState {
        &self.0
    }
}

impl std::ops::DerefMut for ServerConn {
    fn deref_mut(&mut self) -> &mut ServerConnState {
        &mut self.0
    }
}

pub struct ServerConnState {
    /// Plain TCP or TLS, as `upstream.tls.sslmode` and the server decided.
    pub stream: ServerStream,
    pub id: u64,
    /// The server's own cancel key, used to forward a client's CancelRequest.
    pub backend_pid: i32,
    pub backend_secret: i32,
    /// Shared with the cancel target set at every checkout (no copy per transaction).
    pub host: std::sync::Arc<str>,
    pub port: u16,
    /// Which of the upstream's hosts (`ServerIdentity::hosts`) this is.
    pub host_index: usize,
    /// A second handle on the socket, kept by the host list too (`Hosts::sever`).
    pub sever: Option<std::sync::Arc<socket2::Socket>>,
    /// Parameters as the server reported them at startup (its defaults).
    pub original_params: Settings,
    /// Parameters as they are now, kept up to date from ParameterStatus and our own SETs.
    pub params: Settings,
    /// Fingerprint of the client settings `params` was last made to match (0: unknown);
    /// equal to a client's own fingerprint means no SET is needed at checkout.
    pub params_fp: u64,
    /// Settings a client set with SQL `SET` that the server does not report.
    pub raw_settings: params::RawSettings,
    pub created: Instant,
    /// When it is past `server_lifetime`, for the lifetime setting it was worked out
    /// from (None: not yet; a reload changes the setting): checkout and check-in then
    /// compare two instants instead of working out the spread lifetime each time.
    pub retire: std::cell::Cell<Option<(Duration, Option<Instant>)>>,
    pub last_used: Instant,
    /// Statements prepared on this connection under proxy-wide names (transaction mode).
    pub prepared: PreparedCache,
    /// The session changed state that a reset query should clear (session mode).
    pub dirty: bool,
    /// I/O or protocol errors seen on this connection; too many retire it.
    pub errors: u32,
}

impl std::fmt::Debug for ServerConnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("id", &self.id)
            .field("backend_pid", &self.backend_pid)
            .finish_non_exhaustive()
    }
}

/// How one of the proxy's own queries went on a connection that is still usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryOutcome {
    /// The first row's columns as text (None: SQL NULL); empty if there was no row.
    Rows(Vec<Option<String>>),
    /// The server answered with an error and the connection is idle.
    ServerError(String),
}

/// Largest message accepted during server startup (auth exchanges and parameters are small).
pub(super) const STARTUP_MESSAGE_LIMIT: usize = 1 << 20;

impl ServerConn {
    /// Sends Terminate so PostgreSQL logs a clean disconnect; errors are irrelevant here.
    pub async fn close(mut self) {
        let mut buf = BytesMut::new();
        messages::fe_terminate(&mut buf);
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            let _ = self.stream.write_all(&buf).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

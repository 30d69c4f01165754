//! Shared integration-test harness.
//!
//! Every test binary that needs a real PostgreSQL server does
//!
//! ```ignore
//! mod common;
//! use common::{connect, PgCluster};
//! ```
//!
//! Each `PgCluster` is a throw-away cluster in its own temp dir on its own
//! port; dropping it kills the server and deletes the directory.
#![allow(dead_code)]
#![allow(unused_imports)]

pub mod cluster;
pub mod proxy;
pub mod raw;

pub use cluster::{
    free_port, process_alive, ClusterAuth, ClusterOptions, PgCluster, APP_PASSWORD, APP_USER,
    SUPERUSER, SUPERUSER_PASSWORD,
};
pub use proxy::{
    bounded, code_of, connect_abortable, connect_with_messages, message_of, proxy_config,
    proxy_url, proxy_url_pw, rss_kib, shared_cluster, simple_col, simple_one, start_proxy,
    wait_until, within, TEST_LIMIT,
};

use std::time::Duration;

/// Error returned by [`try_connect`].
#[derive(Debug)]
pub enum TryConnectError {
    /// The connect (including authentication) did not finish in time.
    Timeout,
    /// The server (or the network) returned an error.
    Pg(tokio_postgres::Error),
}

impl std::fmt::Display for TryConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TryConnectError::Timeout => write!(f, "connect timed out"),
            TryConnectError::Pg(e) => write!(f, "{e}"),
        }
    }
}

impl TryConnectError {
    /// SQLSTATE of the server error, if it was one (e.g. `28P01` for a bad password).
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            TryConnectError::Timeout => None,
            TryConnectError::Pg(e) => e.code(),
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, TryConnectError::Timeout)
    }
}

/// Connect with `NoTls`, bounded by `timeout`; on success the connection task
/// is spawned on the current tokio runtime.
pub async fn try_connect(
    url: &str,
    timeout: Duration,
) -> Result<tokio_postgres::Client, TryConnectError> {
    match tokio::time::timeout(timeout, tokio_postgres::connect(url, tokio_postgres::NoTls)).await {
        Err(_) => Err(TryConnectError::Timeout),
        Ok(Err(e)) => Err(TryConnectError::Pg(e)),
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    eprintln!("[test harness] tokio-postgres connection ended with error: {e}");
                }
            });
            Ok(client)
        }
    }
}

/// Connect with `NoTls` (10 s timeout), spawn the connection task and return
/// the client. Panics with a descriptive message on failure.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    match try_connect(url, Duration::from_secs(10)).await {
        Ok(c) => c,
        Err(TryConnectError::Timeout) => {
            panic!("connect to {url} timed out after 10s")
        }
        Err(TryConnectError::Pg(e)) => panic!("connect to {url} failed: {e} ({e:?})"),
    }
}

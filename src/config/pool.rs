//! `pool:`, `health:` and `breaker:` in proxy.yaml: how each pool sizes, checks and
//! protects its server connections.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::SessionStatePolicy;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Most server connections per (database, user) pool (alias `max_size`). Default `20`.
    #[serde(alias = "max_size")]
    pub size: u32,
    /// Connections kept open even when idle. Default `0`.
    pub min_size: u32,
    /// How long a client waits for a server connection before it gets an error
    /// (SQLSTATE 53300). Default `30s`.
    #[serde(with = "humantime_serde")]
    pub query_wait_timeout: Duration,
    /// Run when a session-mode server is released, if the session changed state.
    /// Empty disables it. Default `DISCARD ALL`.
    pub reset_query: String,
    /// Statements cached per server connection in transaction mode (LRU). Default `256`.
    pub max_prepared_statements: usize,
    /// Close server connections idle longer than this (jittered). Default `10m`.
    #[serde(with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    /// Close server connections older than this when released (jittered). Default `1h`.
    #[serde(with = "humantime_serde")]
    pub server_lifetime: Duration,
    /// Fraction of open connections the sizing controller aims to keep busy; it opens
    /// connections ahead of demand above it and closes idle ones below it. In (0, 1].
    /// Default `0.8`.
    pub target_utilization: f64,
    /// How long load must stay below the target before idle connections are closed
    /// (down to `min_size`). Default `30s`.
    #[serde(with = "humantime_serde")]
    pub shrink_delay: Duration,
    /// Congestion control: when PostgreSQL refuses a connection with 53300 (or connecting
    /// gets sharply slower), halve the pool's ceiling and let clients wait for a released
    /// connection; raise it by one per `aimd_interval`. Sidecars sharing a database
    /// converge to a fair share of its max_connections. Default `true`.
    pub aimd: bool,
    /// AIMD additive-increase period. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub aimd_interval: Duration,
    /// Transaction mode: `pin` (default), `reject` or `allow` statements that leave
    /// session state on a server connection.
    pub session_state: SessionStatePolicy,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Query that tests a server connection; empty sends an empty query (one round trip,
    /// no parsing). Default empty.
    pub check_query: String,
    /// Time a check query has to answer. Default `2s`.
    #[serde(with = "humantime_serde")]
    pub check_timeout: Duration,
    /// A connection unverified (idle) for longer is checked before it is handed out.
    /// `0s` checks before every use. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub server_check_delay: Duration,
    /// Idle connections unverified this long are checked in the background; `0s`
    /// disables it. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub idle_check_interval: Duration,
    /// How often each pool probes the upstream with a fresh connection (connect, login,
    /// check query); `0s` probes only to recover from an open breaker. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Time a probe has for all of it. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: 20,
            min_size: 0,
            query_wait_timeout: Duration::from_secs(30),
            reset_query: "DISCARD ALL".into(),
            max_prepared_statements: 256,
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            target_utilization: 0.8,
            shrink_delay: Duration::from_secs(30),
            aimd: true,
            aimd_interval: Duration::from_secs(1),
            session_state: SessionStatePolicy::default(),
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            check_query: String::new(),
            check_timeout: Duration::from_secs(2),
            server_check_delay: Duration::from_secs(30),
            idle_check_interval: Duration::from_secs(30),
            probe_interval: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(5),
        }
    }
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
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive connect/authentication/health failures that open the breaker. Default `3`.
    pub failure_threshold: u32,
    /// First wait before a trial connection; doubles per consecutive opening. Default `500ms`.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest wait between trials. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// `fail_fast` (default) or `queue`: what a checkout does while the breaker is open.
    pub on_open: BreakerOnOpen,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 3,
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            on_open: BreakerOnOpen::default(),
        }
    }
}

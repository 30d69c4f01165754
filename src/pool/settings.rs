//! What a pool is configured with (derived from the config by `registry`), and why a
//! checkout fails.

use super::*;

/// Settings a pool reads on every checkout; replaced as a whole on reload.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub mode: PoolMode,
    pub max_size: usize,
    pub min_size: usize,
    pub query_wait_timeout: Duration,
    pub reset_query: String,
    pub max_prepared: usize,
    pub server_idle_timeout: Duration,
    pub server_lifetime: Duration,
    pub identity: ServerIdentity,
    pub breaker: BreakerSettings,
    /// What checkouts do while the breaker is open.
    pub on_open: BreakerOnOpen,
    /// Busy / open fraction the sizing controller aims for.
    pub target_utilization: f64,
    /// How long load must stay below the target before idle connections are closed.
    pub shrink_delay: Duration,
    /// Congestion control on 53300 refusals and connect-latency spikes.
    pub aimd: bool,
    /// AIMD additive-increase period.
    pub aimd_interval: Duration,
    /// Transaction mode: what sessions do about statements that leave session state.
    pub session_state: crate::config::SessionStatePolicy,
    pub health: crate::config::HealthConfig,
}

impl PoolSettings {
    /// Clients wait (up to `query_wait_timeout`) rather than fail while no server can
    /// be had: with `breaker.on_open: queue`, and always with several upstream hosts,
    /// where "down" usually means a failover in progress.
    pub fn queues_while_down(&self) -> bool {
        self.on_open == BreakerOnOpen::Queue || self.identity.hosts.list().len() > 1
    }

    pub(super) fn aimd_config(&self) -> AimdConfig {
        AimdConfig {
            enabled: self.aimd,
            max: self.max_size,
            floor: self.min_size.max(1).min(self.max_size),
            interval: self.aimd_interval,
        }
    }
}

#[derive(Debug)]
pub enum CheckoutError {
    /// No connection became free within `query_wait_timeout`.
    Timeout { waited: Duration, size: usize },
    /// Opening a connection failed.
    Connect(Arc<ConnectError>),
    /// The circuit breaker is open: the upstream failed repeatedly.
    Unavailable {
        down_for: Duration,
        retry_in: Duration,
        last_error: String,
    },
    /// The pool is paused (PAUSE) and was not resumed within `query_wait_timeout`.
    Paused { waited: Duration },
    /// The pool is shutting down.
    Closed,
}

impl CheckoutError {
    pub fn to_client_error(&self, key: &PoolKey) -> ClientError {
        match self {
            CheckoutError::Timeout { waited, size } => ClientError::error(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "pgsidecar: no server connection for pool {key} became free within query_wait_timeout ({waited:?}); all {size} are busy"
                ),
            )
            .with_hint("shorten transactions, raise pool.size, or raise pool.query_wait_timeout; the request can be retried"),
            CheckoutError::Connect(e) => e.to_client_error(),
            CheckoutError::Unavailable {
                down_for,
                retry_in,
                last_error,
            } => ClientError::error(
                sqlstate::CONNECTION_FAILURE,
                format!(
                    "pgsidecar: the database for pool {key} is unreachable (failing for {:.1}s; last error: {last_error}); next connection attempt in {:.1}s",
                    down_for.as_secs_f64(),
                    retry_in.as_secs_f64()
                ),
            )
            .with_hint("the request failed fast instead of queueing; retry after the time given"),
            CheckoutError::Paused { waited } => ClientError::error(
                sqlstate::CANNOT_CONNECT_NOW,
                format!(
                    "pgsidecar: pool {key} is paused (PAUSE on the admin console or POST /api/pools/.../pause) and was not resumed within query_wait_timeout ({waited:?})"
                ),
            )
            .with_hint("the request can be retried once the pool is resumed (RESUME)"),
            CheckoutError::Closed => ClientError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "pgsidecar: the pool is shutting down",
            ),
        }
    }
}

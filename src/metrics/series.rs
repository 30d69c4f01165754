//! Metric series registered as groups, one constructor each.

use prometheus::{GaugeVec, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::{counter, gauge, histogram, CONNECT_BUCKETS, QUERY_BUCKETS, WAIT_BUCKETS};

/// Series of client and server connections, errors, prepared statements and reloads, registered together.
pub(super) struct ConnectionSeries {
    pub(super) client_connections: IntCounterVec,
    pub(super) clients: IntGaugeVec,
    pub(super) server_connections: IntGaugeVec,
    pub(super) server_opened: IntCounterVec,
    pub(super) server_closed: IntCounterVec,
    pub(super) errors: IntCounterVec,
    pub(super) prepared: IntCounterVec,
    pub(super) reloads: IntCounterVec,
}

impl ConnectionSeries {
    pub(super) fn register(r: &Registry) -> Self {
        ConnectionSeries {
        client_connections: counter(
            r,
            "pgsidecar_client_connections_total",
            "Client connections by outcome: accepted (logged in), auth_failed, unknown_database, protocol_error, limit (a connection or pool cap), upstream_auth_failed (the proxy's own login to PostgreSQL failed), upstream_failed, timeout, abandoned (closed before logging in), cancel (a CancelRequest), invalid_settings (startup options PostgreSQL refuses), refused (other).",
            &["result"],
        ),
        clients: gauge(
            r,
            "pgsidecar_clients",
            "Connected clients by pool and state (active: bound to a server, waiting: queued for one, idle).",
            &["pool", "state"],
        ),
        server_connections: gauge(
            r,
            "pgsidecar_server_connections",
            "Server connections by pool and state (active, idle, connecting, testing).",
            &["pool", "state"],
        ),
        server_opened: counter(
            r,
            "pgsidecar_server_connections_opened_total",
            "Server connections opened.",
            &["pool"],
        ),
        server_closed: counter(
            r,
            "pgsidecar_server_connections_closed_total",
            "Server connections closed, by reason.",
            &["pool", "reason"],
        ),
        errors: counter(
            r,
            "pgsidecar_errors_total",
            "Errors sent to clients, by origin (server, proxy, client) and SQLSTATE class.",
            &["origin", "class"],
        ),
        prepared: counter(
            r,
            "pgsidecar_prepared_statements_total",
            "Prepared-statement cache events in transaction mode (hit, miss, eviction).",
            &["event"],
        ),
        reloads: counter(
            r,
            "pgsidecar_config_reloads_total",
            "Configuration reloads, by result (ok, failed).",
            &["result"],
        ),
        }
    }
}

/// Series of pool sizes and latencies, registered together.
pub(super) struct PoolSeries {
    pub(super) pool_min: IntGaugeVec,
    pub(super) pool_max: IntGaugeVec,
    pub(super) pool_target: IntGaugeVec,
    pub(super) pool_current: IntGaugeVec,
    pub(super) pool_paused: IntGaugeVec,
    pub(super) server_age_max: GaugeVec,
    pub(super) checkout_wait: HistogramVec,
    pub(super) transaction_duration: HistogramVec,
    pub(super) query_duration: HistogramVec,
    pub(super) connect_duration: HistogramVec,
}

impl PoolSeries {
    pub(super) fn register(r: &Registry) -> Self {
        PoolSeries {
            pool_min: gauge(
                r,
                "pgsidecar_pool_min_connections",
                "Configured minimum pool size.",
                &["pool"],
            ),
            pool_max: gauge(
                r,
                "pgsidecar_pool_max_connections",
                "Configured maximum pool size.",
                &["pool"],
            ),
            pool_target: gauge(
                r,
                "pgsidecar_pool_target_connections",
                "Pool size the elastic sizing controller aims for.",
                &["pool"],
            ),
            pool_current: gauge(
                r,
                "pgsidecar_pool_connections",
                "Open server connections (all states).",
                &["pool"],
            ),
            pool_paused: gauge(
                r,
                "pgsidecar_pool_paused",
                "1 when the pool is paused.",
                &["pool"],
            ),
            server_age_max: GaugeVec::new(
                Opts::new(
                    "pgsidecar_server_connection_age_max_seconds",
                    "Age of the oldest idle server connection.",
                ),
                &["pool"],
            )
            .inspect(|g| {
                let _ = r.register(Box::new(g.clone()));
            })
            .unwrap_or_else(|e| unreachable!("static metric: {e}")),
            checkout_wait: histogram(
                r,
                "pgsidecar_checkout_wait_seconds",
                "Time a client waited for a server connection.",
                &["pool"],
                WAIT_BUCKETS,
            ),
            transaction_duration: histogram(
                r,
                "pgsidecar_transaction_duration_seconds",
                "Time from a transaction's first message to its final ReadyForQuery (idle).",
                &["pool"],
                QUERY_BUCKETS,
            ),
            query_duration: histogram(
                r,
                "pgsidecar_query_duration_seconds",
                "Time from a Query or Sync to its ReadyForQuery.",
                &["pool"],
                QUERY_BUCKETS,
            ),
            connect_duration: histogram(
                r,
                "pgsidecar_server_connect_seconds",
                "Time to open and authenticate a server connection.",
                &["pool"],
                CONNECT_BUCKETS,
            ),
        }
    }
}

/// Series of pool waits, errors, traffic and pinning, registered together.
pub(super) struct PoolUseSeries {
    pub(super) checkout_timeouts: IntCounterVec,
    pub(super) aimd_ceiling: IntGaugeVec,
    pub(super) pool_maxwait: GaugeVec,
    pub(super) pool_errors: IntCounterVec,
    pub(super) pool_bytes: IntCounterVec,
    pub(super) pinned_clients: IntGaugeVec,
    pub(super) pins: IntCounterVec,
    pub(super) pinned_duration: HistogramVec,
}

impl PoolUseSeries {
    pub(super) fn register(r: &Registry) -> Self {
        PoolUseSeries {
        pinned_clients: gauge(
            r,
            "pgsidecar_pinned_clients",
            "Transaction-mode clients holding their server connection for session state (advisory lock, temp table, SQL PREPARE, LISTEN, WITH HOLD cursor, session characteristics).",
            &["pool"],
        ),
        pins: counter(
            r,
            "pgsidecar_pins_total",
            "Transaction-mode clients that started holding their server connection, by the kind of session state that made them.",
            &["pool", "reason"],
        ),
        pinned_duration: histogram(
            r,
            "pgsidecar_pinned_duration_seconds",
            "How long transaction-mode clients held their server connection for session state.",
            &["pool"],
            &[0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0],
        ),
        checkout_timeouts: counter(
            r,
            "pgsidecar_checkout_timeouts_total",
            "Checkouts that hit query_wait_timeout.",
            &["pool"],
        ),
        aimd_ceiling: gauge(
            r,
            "pgsidecar_pool_ceiling_connections",
            "Pool ceiling after congestion control (AIMD); equals max when unconstrained.",
            &["pool"],
        ),
        pool_maxwait: GaugeVec::new(
            Opts::new(
                "pgsidecar_pool_client_maxwait_seconds",
                "How long the oldest client now queued for a server connection has been waiting (0: none waiting).",
            ),
            &["pool"],
        )
        .inspect(|g| {
            let _ = r.register(Box::new(g.clone()));
        })
        .unwrap_or_else(|e| unreachable!("static metric: {e}")),
        pool_errors: counter(
            r,
            "pgsidecar_pool_errors_total",
            "Errors sent to clients, by pool and origin (server, proxy, client); SQLSTATE classes are in pgsidecar_errors_total.",
            &["pool", "origin"],
        ),
        pool_bytes: counter(
            r,
            "pgsidecar_pool_bytes_total",
            "Bytes forwarded for a pool's clients, by direction (received from clients, sent to clients).",
            &["pool", "direction"],
        ),
        }
    }
}

/// Series of health checks, breakers and upstream hosts, registered together.
pub(super) struct HealthSeries {
    pub(super) breaker_state: IntGaugeVec,
    pub(super) breaker_transitions: IntCounterVec,
    pub(super) health_checks: IntCounterVec,
    pub(super) health_check_duration: HistogramVec,
    pub(super) upstream_host_up: IntGaugeVec,
    pub(super) upstream_host_role: IntGaugeVec,
    pub(super) upstream_login_failures: IntCounterVec,
}

impl HealthSeries {
    pub(super) fn register(r: &Registry) -> Self {
        HealthSeries {
        breaker_state: gauge(
            r,
            "pgsidecar_breaker_state",
            "Circuit breaker state per upstream pool: 0 closed, 1 half-open, 2 open.",
            &["pool"],
        ),
        breaker_transitions: counter(
            r,
            "pgsidecar_breaker_transitions_total",
            "Circuit breaker transitions, by target state.",
            &["pool", "to"],
        ),
        health_checks: counter(
            r,
            "pgsidecar_health_checks_total",
            "Health checks, by kind (idle, probe) and result (ok, failed).",
            &["pool", "kind", "result"],
        ),
        health_check_duration: histogram(
            r,
            "pgsidecar_health_check_seconds",
            "Health check latency.",
            &["pool", "kind"],
            CONNECT_BUCKETS,
        ),
        upstream_host_up: gauge(
            r,
            "pgsidecar_upstream_host_up",
            "1 while the upstream host answered its last connect, 0 while it fails (it is then tried last).",
            &["host"],
        ),
        upstream_host_role: gauge(
            r,
            "pgsidecar_upstream_host_role",
            "1 for the role the upstream host reported last (primary, standby, read-only primary, unknown).",
            &["host", "role"],
        ),
        upstream_login_failures: counter(
            r,
            "pgsidecar_upstream_login_failures_total",
            "Logins of the proxy to PostgreSQL that the server refused, by pool and SQLSTATE (28P01: wrong upstream password).",
            &["pool", "sqlstate"],
        ),
        }
    }
}

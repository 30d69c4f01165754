//! Prometheus metrics: names are `pgsidecar_<thing>_<unit>`, labels are bounded (pool,
//! state, reason, SQLSTATE class, origin; never query text or unauthenticated input).
//!
//! Counters and histograms are updated where things happen; gauges that describe state
//! (clients and servers by state, pool sizes, breaker state) are refreshed from the pools
//! at scrape time, so they cannot drift from the truth.
//!
//! Histogram buckets (seconds):
//! - checkout wait: 100 µs to 120 s, dense below 10 ms where a healthy pool lives and
//!   reaching `query_wait_timeout` territory;
//! - query and transaction duration: 100 µs to 60 s, roughly 1-2.5-5 per decade;
//! - backend connect and health-check latency: 1 ms to 15 s.

mod login;
mod series;

pub use login::LoginResult;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub const WAIT_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0,
];
pub const QUERY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];
pub const CONNECT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0,
];

pub struct Metrics {
    pub registry: Registry,
    pub client_connections: IntCounterVec,
    pub clients: IntGaugeVec,
    pub server_connections: IntGaugeVec,
    pub server_opened: IntCounterVec,
    pub server_closed: IntCounterVec,
    pub pool_min: IntGaugeVec,
    pub pool_max: IntGaugeVec,
    pub pool_target: IntGaugeVec,
    pub pool_current: IntGaugeVec,
    pub pool_paused: IntGaugeVec,
    pub server_age_max: GaugeVec,
    pub checkout_wait: HistogramVec,
    pub transaction_duration: HistogramVec,
    pub query_duration: HistogramVec,
    pub connect_duration: HistogramVec,
    pub bytes: IntCounterVec,
    pub messages: IntCounterVec,
    pub errors: IntCounterVec,
    pub breaker_state: IntGaugeVec,
    pub breaker_transitions: IntCounterVec,
    pub health_checks: IntCounterVec,
    pub health_check_duration: HistogramVec,
    pub prepared: IntCounterVec,
    /// `prepared` by event, resolved once: every named Bind counts one.
    pub prepared_hit: IntCounter,
    pub prepared_miss: IntCounter,
    pub prepared_eviction: IntCounter,
    pub reloads: IntCounterVec,
    pub checkout_timeouts: IntCounterVec,
    pub aimd_ceiling: IntGaugeVec,
    /// Per upstream host (bounded: the configured list): reachable, and its role.
    pub upstream_host_up: IntGaugeVec,
    pub upstream_host_role: IntGaugeVec,
    pub upstream_login_failures: IntCounterVec,
    /// Age of the oldest client queued for a server, per pool (set at scrape time from
    /// the client list, so a queue that never moves is visible before any wait ends).
    pub pool_maxwait: GaugeVec,
    pub pool_errors: IntCounterVec,
    pub pool_bytes: IntCounterVec,
    pub shutdown_clients_closed: IntCounter,
    pub bytes_c2s: IntCounter,
    pub bytes_s2c: IntCounter,
    pub messages_c2s: IntCounter,
    pub messages_s2c: IntCounter,
    pub pinned_clients: IntGaugeVec,
    pub pins: IntCounterVec,
    pub pinned_duration: HistogramVec,
}

/// Per-pool handles, resolved once so the hot path does no label lookups.
#[derive(Clone)]
pub struct PoolMetrics {
    pub checkout_wait: prometheus::Histogram,
    pub transaction_duration: prometheus::Histogram,
    pub query_duration: prometheus::Histogram,
    pub connect_duration: prometheus::Histogram,
    pub opened: prometheus::IntCounter,
    pub checkout_timeouts: prometheus::IntCounter,
    /// Errors sent to this pool's clients, by origin: server, proxy, client.
    pub errors: [prometheus::IntCounter; 3],
    pub bytes_received: prometheus::IntCounter,
    pub bytes_sent: prometheus::IntCounter,
    /// Transaction-mode clients holding their server for session state.
    pub pinned: prometheus::IntGauge,
    pub pinned_duration: prometheus::Histogram,
}

/// The origins of `pgsidecar_pool_errors_total`, in the order of `PoolMetrics::errors`.
pub const ERROR_ORIGINS: [&str; 3] = ["server", "proxy", "client"];

impl PoolMetrics {
    /// Counts an error a client of this pool received (`origin`: server, proxy, client).
    pub fn error(&self, origin: &str) {
        let i = ERROR_ORIGINS.iter().position(|o| *o == origin).unwrap_or(1);
        self.errors[i].inc();
    }
}

pub(super) fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
    let _ = r.register(Box::new(c.clone()));
    c
}

pub(super) fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
    let _ = r.register(Box::new(g.clone()));
    g
}

pub(super) fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    b: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(b.to_vec()), labels)
        .unwrap_or_else(|e| unreachable!("static metric {name}: {e}"));
    let _ = r.register(Box::new(h.clone()));
    h
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        // process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ...
        // (Linux /proc), what memory-limit and fd alerts are written against.
        #[cfg(target_os = "linux")]
        let _ = r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        let build = gauge(
            &r,
            "pgsidecar_build_info",
            "Build information; the value is always 1.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let shutdown_clients_closed = IntCounter::new(
            "pgsidecar_shutdown_clients_closed_total",
            "Clients closed by a graceful shutdown.",
        )
        .unwrap_or_else(|e| unreachable!("static metric: {e}"));
        let _ = r.register(Box::new(shutdown_clients_closed.clone()));
        let bytes = counter(
            &r,
            "pgsidecar_bytes_total",
            "Bytes forwarded, by direction (client_to_server, server_to_client).",
            &["direction"],
        );
        let messages = counter(
            &r,
            "pgsidecar_messages_total",
            "Protocol messages relayed, by direction (client_to_server, server_to_client).",
            &["direction"],
        );
        let conn = series::ConnectionSeries::register(&r);
        let pools = series::PoolSeries::register(&r);
        let used = series::PoolUseSeries::register(&r);
        let health = series::HealthSeries::register(&r);
        Metrics {
            bytes_c2s: bytes.with_label_values(&["client_to_server"]),
            bytes_s2c: bytes.with_label_values(&["server_to_client"]),
            messages_c2s: messages.with_label_values(&["client_to_server"]),
            messages_s2c: messages.with_label_values(&["server_to_client"]),
            bytes,
            messages,
            shutdown_clients_closed,
            registry: r,
            client_connections: conn.client_connections,
            clients: conn.clients,
            server_connections: conn.server_connections,
            server_opened: conn.server_opened,
            server_closed: conn.server_closed,
            errors: conn.errors,
            prepared_hit: conn.prepared.with_label_values(&["hit"]),
            prepared_miss: conn.prepared.with_label_values(&["miss"]),
            prepared_eviction: conn.prepared.with_label_values(&["eviction"]),
            prepared: conn.prepared,
            reloads: conn.reloads,
            pool_min: pools.pool_min,
            pool_max: pools.pool_max,
            pool_target: pools.pool_target,
            pool_current: pools.pool_current,
            pool_paused: pools.pool_paused,
            server_age_max: pools.server_age_max,
            checkout_wait: pools.checkout_wait,
            transaction_duration: pools.transaction_duration,
            query_duration: pools.query_duration,
            connect_duration: pools.connect_duration,
            checkout_timeouts: used.checkout_timeouts,
            aimd_ceiling: used.aimd_ceiling,
            pool_maxwait: used.pool_maxwait,
            pool_errors: used.pool_errors,
            pool_bytes: used.pool_bytes,
            pinned_clients: used.pinned_clients,
            pins: used.pins,
            pinned_duration: used.pinned_duration,
            breaker_state: health.breaker_state,
            breaker_transitions: health.breaker_transitions,
            health_checks: health.health_checks,
            health_check_duration: health.health_check_duration,
            upstream_host_up: health.upstream_host_up,
            upstream_host_role: health.upstream_host_role,
            upstream_login_failures: health.upstream_login_failures,
        }
        .with_series()
    }

    pub fn for_pool(&self, pool: &str) -> PoolMetrics {
        PoolMetrics {
            checkout_wait: self.checkout_wait.with_label_values(&[pool]),
            transaction_duration: self.transaction_duration.with_label_values(&[pool]),
            query_duration: self.query_duration.with_label_values(&[pool]),
            connect_duration: self.connect_duration.with_label_values(&[pool]),
            opened: self.server_opened.with_label_values(&[pool]),
            checkout_timeouts: self.checkout_timeouts.with_label_values(&[pool]),
            errors: ERROR_ORIGINS.map(|o| self.pool_errors.with_label_values(&[pool, o])),
            bytes_received: self.pool_bytes.with_label_values(&[pool, "received"]),
            bytes_sent: self.pool_bytes.with_label_values(&[pool, "sent"]),
            pinned: self.pinned_clients.with_label_values(&[pool]),
            pinned_duration: self.pinned_duration.with_label_values(&[pool]),
        }
    }

    /// Creates series that alerts compute `increase()` over, so the first event counts.
    fn init_series(&self) {
        for r in ["ok", "failed"] {
            self.reloads.with_label_values(&[r]);
        }
        for r in LoginResult::ALL {
            self.client_connections.with_label_values(&[r.label()]);
        }
    }

    /// Text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Counts an error a client received; `code` is a SQLSTATE (only its class is kept).
    pub fn error(&self, origin: &str, code: &str) {
        let class = code
            .get(..2)
            .filter(|c| c.bytes().all(|b| b.is_ascii_alphanumeric()));
        self.errors
            .with_label_values(&[origin, class.unwrap_or("??")])
            .inc();
    }
}

impl Metrics {
    /// Counts how a client connection's opening ended.
    pub fn login(&self, result: LoginResult) {
        self.client_connections
            .with_label_values(&[result.label()])
            .inc();
    }

    /// Counts a login to PostgreSQL that the server refused (SQLSTATEs are five
    /// characters from PostgreSQL's fixed list; anything else is folded into "?????").
    pub fn upstream_login_failed(&self, pool: &str, code: &str) {
        let ok = code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric());
        self.upstream_login_failures
            .with_label_values(&[pool, if ok { code } else { "?????" }])
            .inc();
    }

    /// Removes every series labelled with a pool that is gone, so pools that come and go
    /// (logins to random database names) leave nothing behind.
    pub fn remove_pool(&self, pool: &str) {
        fn drop_from<T: prometheus::core::MetricVecBuilder>(
            v: &prometheus::core::MetricVec<T>,
            pool: &str,
        ) {
            use prometheus::core::Collector;
            for family in v.collect() {
                for m in family.get_metric() {
                    let labels: std::collections::HashMap<&str, &str> = m
                        .get_label()
                        .iter()
                        .map(|l| (l.name(), l.value()))
                        .collect();
                    if labels.get("pool") == Some(&pool) {
                        let _ = v.remove(&labels);
                    }
                }
            }
        }
        for v in [
            &self.server_opened,
            &self.server_closed,
            &self.breaker_transitions,
            &self.health_checks,
            &self.checkout_timeouts,
            &self.upstream_login_failures,
            &self.pool_errors,
            &self.pool_bytes,
            &self.pins,
        ] {
            drop_from(v, pool);
        }
        for v in [
            &self.clients,
            &self.server_connections,
            &self.pool_min,
            &self.pool_max,
            &self.pool_target,
            &self.pool_current,
            &self.pool_paused,
            &self.aimd_ceiling,
            &self.breaker_state,
            &self.pinned_clients,
        ] {
            drop_from(v, pool);
        }
        for v in [
            &self.checkout_wait,
            &self.transaction_duration,
            &self.query_duration,
            &self.connect_duration,
            &self.health_check_duration,
            &self.pinned_duration,
        ] {
            drop_from(v, pool);
        }
        drop_from(&self.server_age_max, pool);
        drop_from(&self.pool_maxwait, pool);
    }
}

impl Metrics {
    fn with_series(self) -> Self {
        self.init_series();
        self
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests;

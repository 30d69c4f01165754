//! The boundary of the admin surfaces (the HTTP API and the console): [`Stats`] reads
//! the running proxy, [`Control`] acts on it. Each action is written once, here, so the
//! two surfaces cannot drift apart, and neither reaches into pool or session internals.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::clients::ClientInfo;
use crate::config::Config;
use crate::error::{sqlstate, ClientError};
use crate::pool::breaker::BreakerView;
use crate::pool::upstream_login::LoginFailureView;
use crate::pool::{Pool, PoolKey, PoolSnapshot, ServerView};
use crate::server::hosts::Hosts;
use crate::session::Shared;

/// Read access to the running proxy.
#[derive(Clone)]
pub struct Stats {
    shared: Arc<Shared>,
}

/// One pool, read only.
#[derive(Clone)]
pub struct PoolView(Arc<Pool>);

/// One connected client, read only.
#[derive(Clone)]
pub struct ClientView(Arc<ClientInfo>);

/// A pool's traffic since it was created; times in microseconds, as PgBouncer
/// reports them.
#[derive(Clone, Copy, Default, Debug)]
pub struct Totals {
    pub server_assignment_count: u64,
    pub xact_count: u64,
    pub query_count: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
    pub server_closed_count: u64,
}

impl Stats {
    pub fn new(shared: Arc<Shared>) -> Self {
        Stats { shared }
    }

    pub fn config(&self) -> Arc<Config> {
        self.shared.registry.config()
    }

    pub fn pools(&self) -> Vec<PoolView> {
        self.shared
            .registry
            .all()
            .into_iter()
            .map(PoolView)
            .collect()
    }

    pub fn clients(&self) -> Vec<ClientView> {
        let all = self.shared.client_list.all();
        all.into_iter().map(ClientView).collect()
    }

    pub fn hosts(&self) -> Arc<Hosts> {
        self.shared.registry.hosts()
    }

    /// Clients past their startup packet (what `limits.max_client_conn` caps).
    pub fn logins(&self) -> usize {
        self.shared.logins.load(Ordering::Relaxed)
    }

    pub fn draining(&self) -> bool {
        self.shared.lifecycle.is_draining()
    }

    pub fn upstream_seen(&self) -> bool {
        self.shared.lifecycle.upstream_seen.load(Ordering::Relaxed)
    }

    pub fn started(&self) -> Instant {
        self.shared.lifecycle.started
    }

    /// The oldest current wait for a server, per pool name (pools with nobody
    /// waiting are absent).
    pub fn max_waits(&self) -> BTreeMap<String, Duration> {
        let waits = self.shared.client_list.max_waits();
        self.pools()
            .into_iter()
            .filter_map(|p| {
                let k = (
                    Arc::<str>::from(p.key().database.as_str()),
                    Arc::<str>::from(p.key().user.as_str()),
                );
                waits.get(&k).map(|w| (p.name().to_string(), *w))
            })
            .collect()
    }

    /// Brings the gauges that are sampled rather than counted up to date, then renders
    /// every metric in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        self.shared.registry.refresh_metrics();
        let waits = self.max_waits();
        let g = &self.shared.metrics.pool_maxwait;
        g.reset();
        for p in self.pools() {
            let w = waits.get(p.name()).copied().unwrap_or_default();
            g.with_label_values(&[p.name()]).set(w.as_secs_f64());
        }
        self.shared.metrics.render()
    }
}

impl PoolView {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn key(&self) -> &PoolKey {
        &self.0.key
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        self.0.snapshot()
    }

    pub fn breaker_open(&self) -> bool {
        self.0.breaker_open()
    }

    pub fn breaker_view(&self) -> BreakerView {
        self.0.breaker_view()
    }

    pub fn login_failure(&self) -> Option<LoginFailureView> {
        self.0.login_failure()
    }

    pub fn idle_servers(&self) -> Vec<ServerView> {
        self.0.idle_servers()
    }

    pub fn totals(&self) -> Totals {
        let (p, micros) = (&self.0, |s: f64| (s * 1e6) as u64);
        Totals {
            server_assignment_count: p.stats.checkouts.load(Ordering::Relaxed),
            xact_count: p.m.transaction_duration.get_sample_count(),
            query_count: p.m.query_duration.get_sample_count(),
            received: p.m.bytes_received.get(),
            sent: p.m.bytes_sent.get(),
            xact_time: micros(p.m.transaction_duration.get_sample_sum()),
            query_time: micros(p.m.query_duration.get_sample_sum()),
            wait_time: p.stats.wait_micros_total.load(Ordering::Relaxed),
            server_closed_count: p.stats.closed.load(Ordering::Relaxed),
        }
    }
}

impl ClientView {
    pub fn id(&self) -> u64 {
        self.0.id
    }
    pub fn user(&self) -> &str {
        self.0.user()
    }
    pub fn database(&self) -> &str {
        self.0.database()
    }
    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }
    pub fn application_name(&self) -> &str {
        &self.0.application_name
    }
    pub fn connected(&self) -> Instant {
        self.0.connected
    }
    pub fn state_name(&self) -> &'static str {
        self.0.state_name()
    }
    /// The backend pid of the server it holds now; 0 for none.
    pub fn server_pid(&self) -> i32 {
        self.0.server_pid.load(Ordering::Relaxed)
    }
    /// Transaction mode: holds its server for session state.
    pub fn pinned(&self) -> bool {
        self.0.pinned.load(Ordering::Relaxed)
    }
    /// (server age, time bound to this client) for the server it holds, if any.
    pub fn server_times(&self, now: Instant) -> Option<(Duration, Duration)> {
        self.0.server_times(now)
    }
}

/// The actions of the admin surfaces.
#[derive(Clone)]
pub struct Control {
    shared: Arc<Shared>,
}

impl Control {
    pub fn new(shared: Arc<Shared>) -> Self {
        Control { shared }
    }

    /// The pools `name` selects (a pool name or a database name; all without one);
    /// 3D000 when a name selects nothing.
    fn select(&self, name: Option<&str>) -> Result<Vec<Arc<Pool>>, ClientError> {
        let pools: Vec<_> = self
            .shared
            .registry
            .all()
            .into_iter()
            .filter(|p| name.is_none_or(|n| p.name == n || p.key.database == n))
            .collect();
        match name {
            Some(n) if pools.is_empty() => Err(ClientError::error(
                sqlstate::INVALID_CATALOG_NAME,
                format!("no pool named {n:?} and no pool for a database of that name"),
            )),
            _ => Ok(pools),
        }
    }

    fn names(pools: &[Arc<Pool>]) -> Vec<String> {
        pools.iter().map(|p| p.name.clone()).collect()
    }

    /// PAUSE as PgBouncer does it: new checkouts queue, and this returns once the
    /// transactions in flight have given their servers back, within
    /// `admin.pause_timeout` (57014 after it; the pools stay paused).
    pub async fn pause(&self, name: Option<&str>) -> Result<Vec<String>, ClientError> {
        let pools = self.select(name)?;
        for p in &pools {
            p.pause();
        }
        let timeout = self.shared.registry.config().admin.pause_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let busy: usize = pools.iter().map(|p| p.snapshot().active_servers).sum();
            if busy == 0 {
                return Ok(Self::names(&pools));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::error(
                    sqlstate::QUERY_CANCELED,
                    format!(
                        "pgsidecar: PAUSE gave up waiting after admin.pause_timeout ({timeout:?}): {busy} server connections are still in use; the pools stay paused"
                    ),
                )
                .with_hint("run PAUSE again to keep waiting, or RESUME"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Undoes PAUSE, SUSPEND and KILL; refused (57P01) while shutting down.
    pub fn resume(&self, name: Option<&str>) -> Result<Vec<String>, ClientError> {
        if self.shared.lifecycle.is_draining() {
            return Err(ClientError::error(
                sqlstate::ADMIN_SHUTDOWN,
                "cannot RESUME while shutting down",
            ));
        }
        let pools = self.select(name)?;
        for p in &pools {
            p.resume();
        }
        Ok(Self::names(&pools))
    }

    /// Closes idle server connections and retires the busy ones when they come back.
    pub fn reconnect(&self, name: Option<&str>) -> Result<Vec<String>, ClientError> {
        let pools = self.select(name)?;
        for p in &pools {
            p.reconnect();
        }
        Ok(Self::names(&pools))
    }

    /// Pauses every pool without waiting: clients finish their transactions and new
    /// ones wait for RESUME.
    pub fn suspend(&self) {
        for p in self.shared.registry.all() {
            p.pause();
        }
    }

    /// Pauses the database's pools (all without one), closes their idle servers and
    /// ends every client of it at once; returns how many clients were ended.
    pub fn kill(&self, db: Option<&str>) -> Result<usize, ClientError> {
        let pools: Vec<_> = self
            .shared
            .registry
            .all()
            .into_iter()
            .filter(|p| db.is_none_or(|d| p.key.database == d))
            .collect();
        let clients: Vec<_> = self
            .shared
            .client_list
            .all()
            .into_iter()
            .filter(|c| db.is_none_or(|d| &**c.database() == d))
            .collect();
        if let Some(d) = db.filter(|_| pools.is_empty() && clients.is_empty()) {
            return Err(ClientError::error(
                sqlstate::INVALID_CATALOG_NAME,
                format!("no pool or client for database {d:?}"),
            ));
        }
        for p in &pools {
            p.pause();
            p.reconnect();
        }
        for c in &clients {
            c.kill();
        }
        Ok(clients.len())
    }

    /// Re-reads the configuration file; an invalid one changes nothing.
    pub fn reload(&self) -> Result<(), String> {
        self.shared.lifecycle.reload()
    }

    /// The graceful shutdown SIGTERM starts.
    pub fn shutdown(&self) {
        self.shared.lifecycle.request_shutdown();
    }
}

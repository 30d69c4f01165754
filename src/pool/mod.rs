//! A pool of server connections for one (database, user), with a fair FIFO wait queue.
//!
//! Checkout takes the most recently used idle connection (warm caches) after making sure
//! it is alive, else opens a new one while under the limit, else queues. Check-in hands
//! the connection straight to the longest waiter. A `Lease` that is dropped without being
//! released counts the connection as closed, so no code path can leak a slot.
//!
//! The pool manages itself:
//! - `checkout`: checkout, check-in, the wait queue, replacing dead connections;
//! - `health`: peeks, check queries and the upstream probe;
//! - `breaker`: the circuit breaker's effects on the pool, and metrics;
//! - `sizing`: the pure sizing controller;
//! - `congestion`: the pure congestion controller (AIMD ceiling, headroom verdicts);
//! - `headroom`: samples PostgreSQL's free connection slots and acts on them;
//! - `maintain`: the per-pool task that runs checks, probes and the controllers.
//!
//! Locks: `state` may be held while taking `breaker` (never the other way round), and
//! nothing that can change the breaker's state is called with `state` held, because a
//! transition to Open closes idle connections (which takes `state`).

mod breaker;
mod checkin;
mod checkout;
pub mod congestion;
mod headroom;
pub mod health;
mod maintain;
pub mod registry;
mod reported;
mod ride_out;
pub mod sizing;
pub mod upstream_login;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::circuit::{Breaker, BreakerSettings};
use crate::config::{BreakerOnOpen, PoolMode};
use crate::error::{sqlstate, ClientError};
use crate::metrics::{Metrics, PoolMetrics};
use crate::server::{ConnectError, ServerConn, ServerIdentity};
use congestion::{Aimd, AimdConfig, Headroom};
use sizing::Sizer;

/// A connection with more I/O or protocol errors than this is retired.
pub const MAX_CONN_ERRORS: u32 = 3;

/// Everything the admin API and metrics report about a pool.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolSnapshot {
    pub name: String,
    pub database: String,
    pub user: String,
    pub mode: String,
    pub min_size: usize,
    pub max_size: usize,
    /// What the sizing controller aims for (between min_size and ceiling).
    pub target_size: usize,
    /// The congestion-control ceiling (max_size unless the upstream refused connections).
    pub ceiling: usize,
    pub open: usize,
    pub idle: usize,
    pub connecting: usize,
    /// Taken out of the idle list for a health check.
    pub testing: usize,
    pub active_servers: usize,
    pub waiting_in_queue: usize,
    pub clients: usize,
    pub clients_waiting: usize,
    pub clients_active: usize,
    pub clients_idle: usize,
    pub paused: bool,
    pub oldest_idle_secs: f64,
    /// Connect + login + check query time of the last successful upstream probe.
    pub probe_latency_secs: Option<f64>,
    /// Last headroom sample: connections the pool's role may hold on the server in all,
    /// and client backends connected there (every application's), with its age.
    pub server_slots: Option<usize>,
    pub server_slots_used: Option<usize>,
    pub headroom_age_secs: Option<f64>,
    /// Most connections leased to clients at once since the last maintenance tick.
    pub peak_leased: usize,
    pub checkouts: u64,
    pub wait_timeouts: u64,
    pub connects: u64,
    pub connect_failures: u64,
    pub closed: u64,
    pub wait_seconds_total: f64,
}

/// One idle server connection as the admin console shows it.
#[derive(Debug, Clone)]
pub struct ServerView {
    pub backend_pid: i32,
    pub age_secs: f64,
    pub idle_secs: f64,
}

/// Pools are keyed by the database and user a client asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.database, self.user)
    }
}

/// How server connections and the upstream are checked (`health:` in the config).
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// Sent to test a connection; empty sends an empty Query (cheapest round trip).
    pub check_query: String,
    pub check_timeout: Duration,
    /// A connection idle (unverified) longer than this is checked before reuse.
    pub server_check_delay: Duration,
    /// Idle connections unverified for this long are checked in the background (0: off).
    pub idle_check_interval: Duration,
    /// How often the upstream is probed with a fresh connection (0: only to recover).
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            check_query: String::new(),
            check_timeout: Duration::from_secs(2),
            server_check_delay: Duration::from_secs(30),
            idle_check_interval: Duration::from_secs(30),
            probe_interval: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(5),
        }
    }
}

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
    pub health: HealthSettings,
}

impl PoolSettings {
    /// Clients wait (up to `query_wait_timeout`) rather than fail while no server can
    /// be had: with `breaker.on_open: queue`, and always with several upstream hosts,
    /// where "down" usually means a failover in progress.
    pub fn queues_while_down(&self) -> bool {
        self.on_open == BreakerOnOpen::Queue || self.identity.hosts.list().len() > 1
    }

    fn aimd_config(&self) -> AimdConfig {
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

/// Server parameters reported to clients at login, sorted by name.
pub type StartupParams = Arc<ReportedParams>;

pub use reported::ReportedParams;

type Waiter = oneshot::Sender<Result<Lease, CheckoutError>>;

/// An idle connection and when it was last known to work.
struct Idle {
    conn: ServerConn,
    /// Last clean release or passed health check; a pre-use check is due once this is
    /// older than `server_check_delay`.
    checked: Instant,
}

struct PoolState {
    /// Idle connections, most recently used last.
    idle: Vec<Idle>,
    /// Open or opening connections (idle + leased + connecting + testing).
    open: usize,
    /// Clients waiting for a connection, oldest first.
    waiters: VecDeque<Waiter>,
    /// Connections being opened (counted in `open`).
    connecting: usize,
    /// Connections out for a health check (counted in `open`).
    testing: usize,
    /// Paused pools hand out nothing; checkouts queue until resume.
    paused: bool,
    closed: bool,
    sizer: Sizer,
    aimd: Aimd,
    /// After a 53300 refusal (with AIMD on): no new connection attempts before this;
    /// clients wait for a connection to be released instead.
    congested_until: Option<Instant>,
    probe_running: bool,
    last_probe: Option<Instant>,
    probe_latency: Option<Duration>,
    /// Last maintenance tick that saw clients queued: a pool under contention probes
    /// every aimd_interval, so one that already holds its max still learns that the
    /// upstream is full (the signal for giving others their share).
    last_contended: Option<Instant>,
    /// Last connection known good (clean check-in, passed check, adopted connection):
    /// traffic proves the upstream, so a busy pool needs no probe.
    last_good: Option<Instant>,
    /// Last headroom sample and when it was taken.
    headroom: Option<(Headroom, Instant)>,
    /// When the last sample was started; one runs at a time.
    last_sample: Option<Instant>,
    sampling: bool,
    /// A contended pool has no idle connection to sample on: take the next one released.
    sample_at_checkin: bool,
}

/// Counters for observability; plain atomics so the hot path takes no extra lock.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub checkouts: AtomicU64,
    pub waits: AtomicU64,
    pub wait_timeouts: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub closed: AtomicU64,
    pub wait_micros_total: AtomicU64,
}

pub struct Pool {
    pub key: PoolKey,
    /// `database/user`, the `pool` label in metrics and the name in the admin API.
    pub name: String,
    pub metrics: Arc<Metrics>,
    pub m: PoolMetrics,
    /// Connections leased to clients now, and the most at once since the last tick:
    /// demand that a 100 ms snapshot would miss (kept exactly by checkout and release).
    leased: AtomicUsize,
    peak_leased: AtomicUsize,
    /// Clients logged in to this pool, and how many of them wait or hold a server.
    pub clients: AtomicUsize,
    pub clients_waiting: AtomicUsize,
    pub clients_active: AtomicUsize,
    settings: Mutex<Arc<PoolSettings>>,
    state: Mutex<PoolState>,
    pub stats: PoolStats,
    breaker: Mutex<Breaker>,
    /// ParameterStatus values of the first server, sent to clients at login.
    startup_params: Mutex<Option<StartupParams>>,
    /// Clients' startup settings, one shared copy per distinct set.
    pub client_settings: crate::server::params::SettingsCache,
    /// The current run of logins PostgreSQL refused (`upstream_login`).
    login_failure: Mutex<Option<upstream_login::LoginFailure>>,
    /// Fingerprints of clients' startup settings PostgreSQL accepted, with the values it
    /// spells differently (session::validate).
    pub validated_settings:
        Mutex<std::collections::HashMap<u64, Arc<std::collections::HashMap<String, String>>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("key", &self.key).finish()
    }
}

/// Exclusive use of one server connection. Release it to return it to the pool; dropping
/// it closes the connection.
pub struct Lease {
    conn: Option<ServerConn>,
    pool: Arc<Pool>,
    /// Handed to a client and counted in `Pool::leased` (not a lease in transit to a
    /// waiter or a check).
    counted: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("conn", &self.conn).finish()
    }
}

impl Lease {
    fn empty(pool: Arc<Pool>) -> Lease {
        Lease {
            conn: None,
            pool,
            counted: false,
        }
    }

    /// The lease reaches its client: it counts as demand until released.
    fn count(&mut self) {
        if !self.counted {
            self.counted = true;
            let n = self.pool.leased.fetch_add(1, Ordering::Relaxed) + 1;
            self.pool.peak_leased.fetch_max(n, Ordering::Relaxed);
        }
    }

    fn uncount(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.pool.leased.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn conn(&mut self) -> &mut ServerConn {
        // `conn` is only None inside release/drop, never while the lease is usable.
        self.conn.as_mut().unwrap_or_else(|| unreachable!())
    }

    pub fn conn_ref(&self) -> &ServerConn {
        self.conn.as_ref().unwrap_or_else(|| unreachable!())
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Counts an I/O or protocol error on this connection that did not end it; one with
    /// more than `MAX_CONN_ERRORS` is retired when released.
    pub fn note_error(&mut self) {
        if let Some(c) = self.conn.as_mut() {
            c.errors += 1;
        }
    }

    /// The server refused a write as read-only (25006). On a pool that needs a
    /// primary, its host has failed over or been demoted: the host's role is checked
    /// again at the next connect (others are tried first), and this connection is
    /// retired when released.
    pub fn note_read_only(&mut self) {
        let Some(c) = self.conn.as_mut() else { return };
        let hosts = &self.pool.settings().identity.hosts;
        if !hosts.attrs.accepts(crate::server::hosts::Role {
            in_recovery: false,
            read_only: true,
        }) {
            tracing::warn!(pool = %self.pool.name, host = %hosts.get(c.host_index), "the server refused a write as read-only; checking the upstream's roles again");
            hosts.suspect(c.host_index);
            c.errors = MAX_CONN_ERRORS + 1;
        }
    }

    /// Returns a clean connection (ReadyForQuery 'I', nothing in flight) to the pool.
    pub fn release(mut self) {
        self.uncount();
        if let Some(conn) = self.conn.take() {
            self.pool.clone().checkin(conn);
        }
    }

    /// Closes the connection instead of returning it (broken or dirty state).
    pub fn discard(mut self, reason: &'static str) {
        self.uncount();
        if let Some(conn) = self.conn.take() {
            self.pool.clone().discarded(conn, reason);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.uncount();
        if let Some(conn) = self.conn.take() {
            self.pool.clone().discarded(conn, "dropped");
        }
    }
}

impl Pool {
    pub fn new(key: PoolKey, settings: PoolSettings, metrics: Arc<Metrics>) -> Arc<Pool> {
        let name = key.to_string();
        let pool = Arc::new(Pool {
            m: metrics.for_pool(&name),
            name,
            metrics,
            leased: AtomicUsize::new(0),
            peak_leased: AtomicUsize::new(0),
            clients: AtomicUsize::new(0),
            clients_waiting: AtomicUsize::new(0),
            clients_active: AtomicUsize::new(0),
            key,
            breaker: Mutex::new(Breaker::new(settings.breaker.clone())),
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
                waiters: VecDeque::new(),
                connecting: 0,
                testing: 0,
                paused: false,
                closed: false,
                sizer: Sizer::new(settings.min_size),
                aimd: Aimd::new(settings.max_size),
                congested_until: None,
                probe_running: false,
                last_probe: None,
                probe_latency: None,
                last_contended: None,
                last_good: None,
                headroom: None,
                last_sample: None,
                sampling: false,
                sample_at_checkin: false,
            }),
            settings: Mutex::new(Arc::new(settings)),
            client_settings: Default::default(),
            stats: PoolStats::default(),
            startup_params: Mutex::new(None),
            login_failure: Mutex::new(None),
            validated_settings: Mutex::default(),
        });
        maintain::spawn(&pool);
        pool
    }

    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings.lock().clone()
    }

    /// Applies new settings; a larger size serves waiters at once, a smaller one closes
    /// idle connections above it (leased ones close when they come back).
    pub fn update_settings(self: &Arc<Self>, settings: PoolSettings) {
        self.breaker.lock().settings = settings.breaker.clone();
        *self.settings.lock() = Arc::new(settings);
        self.trim_and_fill();
    }

    pub fn startup_params(&self) -> Option<StartupParams> {
        self.startup_params.lock().clone()
    }

    /// (idle, open, waiting)
    pub fn counts(&self) -> (usize, usize, usize) {
        let st = self.state.lock();
        (st.idle.len(), st.open, st.waiters.len())
    }

    /// Most connections the pool may hold now: max_size, lowered by congestion control.
    fn limit(st: &PoolState, settings: &PoolSettings) -> usize {
        settings.max_size.min(st.aimd.ceiling())
    }

    fn lease(self: &Arc<Self>, conn: ServerConn) -> Lease {
        Lease {
            conn: Some(conn),
            pool: self.clone(),
            counted: false,
        }
    }

    pub fn pause(self: &Arc<Self>) {
        self.state.lock().paused = true;
    }

    pub fn resume(self: &Arc<Self>) {
        self.state.lock().paused = false;
        self.trim_and_fill();
    }

    pub fn is_paused(&self) -> bool {
        self.state.lock().paused
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// A snapshot for metrics and the admin API.
    pub fn snapshot(&self) -> PoolSnapshot {
        let settings = self.settings();
        let now = Instant::now();
        let st = self.state.lock();
        let oldest = st
            .idle
            .iter()
            .map(|i| now.duration_since(i.conn.created))
            .max()
            .unwrap_or_default();
        let clients = self.clients.load(Ordering::Relaxed);
        let waiting = self.clients_waiting.load(Ordering::Relaxed);
        let active = self.clients_active.load(Ordering::Relaxed);
        PoolSnapshot {
            name: self.name.clone(),
            database: self.key.database.clone(),
            user: self.key.user.clone(),
            mode: settings.mode.to_string(),
            min_size: settings.min_size,
            max_size: settings.max_size,
            target_size: st.sizer.target(),
            ceiling: Self::limit(&st, &settings),
            open: st.open,
            idle: st.idle.len(),
            connecting: st.connecting,
            testing: st.testing,
            active_servers: st
                .open
                .saturating_sub(st.idle.len() + st.connecting + st.testing),
            waiting_in_queue: st.waiters.len(),
            clients,
            clients_waiting: waiting,
            clients_active: active,
            clients_idle: clients.saturating_sub(waiting + active),
            paused: st.paused,
            oldest_idle_secs: oldest.as_secs_f64(),
            probe_latency_secs: st.probe_latency.map(|d| d.as_secs_f64()),
            server_slots: st.headroom.map(|(h, _)| h.limit),
            server_slots_used: st.headroom.map(|(h, _)| h.used),
            headroom_age_secs: st
                .headroom
                .map(|(_, at)| now.duration_since(at).as_secs_f64()),
            peak_leased: self.peak_leased.load(Ordering::Relaxed),
            checkouts: self.stats.checkouts.load(Ordering::Relaxed),
            wait_timeouts: self.stats.wait_timeouts.load(Ordering::Relaxed),
            connects: self.stats.connects.load(Ordering::Relaxed),
            connect_failures: self.stats.connect_failures.load(Ordering::Relaxed),
            closed: self.stats.closed.load(Ordering::Relaxed),
            wait_seconds_total: self.stats.wait_micros_total.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }

    /// Idle connections for the admin console's SHOW SERVERS.
    pub fn idle_servers(&self) -> Vec<ServerView> {
        let now = Instant::now();
        self.state
            .lock()
            .idle
            .iter()
            .map(|i| ServerView {
                backend_pid: i.conn.backend_pid,
                age_secs: now.duration_since(i.conn.created).as_secs_f64(),
                idle_secs: now.duration_since(i.conn.last_used).as_secs_f64(),
            })
            .collect()
    }

    /// Closes idle connections past their idle timeout (down to min_size) or lifetime;
    /// returns how many. The pool's own maintenance task calls this every tick.
    pub fn reap_idle(&self) -> usize {
        self.reap(&self.settings(), Instant::now())
    }

    /// Closes every idle connection and refuses new checkouts.
    pub fn close(&self) {
        let mut st = self.state.lock();
        st.closed = true;
        let idle = std::mem::take(&mut st.idle);
        st.open -= idle.len();
        st.waiters.clear();
        drop(st);
        for i in idle {
            self.closed_metric("closed");
            drop_later(i.conn);
        }
    }

    /// Closes idle connections so that new ones are opened (after a password change etc.).
    pub fn reconnect(&self) {
        self.close_idle("reconnect");
    }
}

/// 53300 (too_many_connections): the server is full, not down.
fn is_congestion(e: &ConnectError) -> bool {
    matches!(e, ConnectError::Server { code, .. } if code == sqlstate::TOO_MANY_CONNECTIONS)
}

/// Spreads a per-connection limit over -10%..0, so connections opened or idle together
/// are not all closed (and reopened) together. Derived from the connection id, so it is
/// stable for a connection's life without storing it, and follows a reloaded setting.
fn spread(id: u64, base: Duration) -> Duration {
    // splitmix64: a good spread from sequential ids.
    let mut z = id.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    base.mul_f64(0.9 + (z % 1000) as f64 / 10_000.0)
}

/// Past `server_lifetime` as the settings say now (a reload applies to open connections).
fn past_lifetime(conn: &ServerConn, settings: &PoolSettings, now: Instant) -> bool {
    // Another salt than the idle timeout's, so the two spreads are independent.
    now.duration_since(conn.created) > spread(conn.id ^ 0x5bd1_e995, settings.server_lifetime)
}

/// Sends Terminate in the background; callers may hold a lock.
fn drop_later(conn: ServerConn) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(conn.close());
    }
}

#[cfg(test)]
mod spread_tests {
    use super::*;

    #[test]
    fn spread_stays_within_ten_percent_and_spreads() {
        let base = Duration::from_secs(100);
        let v: Vec<Duration> = (1..200).map(|id| spread(id, base)).collect();
        assert!(v
            .iter()
            .all(|d| *d >= Duration::from_secs(90) && *d <= base));
        let distinct: std::collections::HashSet<_> = v.iter().map(|d| d.as_millis()).collect();
        assert!(distinct.len() > 100, "spread: {}", distinct.len());
    }
}

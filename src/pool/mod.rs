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

pub mod breaker;
mod checkin;
mod checkout;
mod close;
pub mod congestion;
mod headroom;
pub mod health;
mod lease;
mod maintain;
mod queue;
pub mod registry;
mod reported;
mod ride_out;
mod settings;
pub mod sizing;
pub mod upstream_login;
mod views;

pub use close::CloseReason;
pub use lease::Lease;
pub use settings::{CheckoutError, PoolSettings};
pub use views::{PoolSnapshot, ServerView};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::{BreakerOnOpen, PoolMode};
use crate::error::{sqlstate, ClientError};
use crate::metrics::{Metrics, PoolMetrics};
use crate::server::{ConnectError, ServerConn, ServerIdentity};
use breaker::{Breaker, BreakerSettings};
use congestion::{Aimd, AimdConfig, Headroom};
use sizing::Sizer;

/// A connection with more I/O or protocol errors than this is retired.
pub const MAX_CONN_ERRORS: u32 = 3;

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
    /// Last maintenance tick that found every established connection leased at once
    /// since the one before, with nobody queued (`congestion::Demand::Saturated`).
    last_saturated: Option<Instant>,
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
        Mutex<std::collections::HashMap<u64, Arc<crate::server::params::Settings>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("key", &self.key).finish()
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
                last_saturated: None,
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
            self.closed_metric(CloseReason::Closed);
            drop_later(i.conn);
        }
    }

    /// Closes idle connections so that new ones are opened (after a password change etc.).
    pub fn reconnect(&self) {
        self.close_idle(CloseReason::Reconnect);
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
    // In 64-bit milliseconds: this runs at every checkout and check-in, and u128
    // division costs more than the rest of a checkout. Saturates past 58,000 years.
    let ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(ms.saturating_mul(9_000 + z % 1000) / 10_000)
}

/// Past `server_lifetime` as the settings say now (a reload applies to open connections).
fn past_lifetime(conn: &ServerConn, settings: &PoolSettings, now: Instant) -> bool {
    let base = settings.server_lifetime;
    let at = match conn.retire.get() {
        Some((b, at)) if b == base => at,
        _ => {
            // Another salt than the idle timeout's, so the two spreads are independent.
            let at = conn
                .created
                .checked_add(spread(conn.id ^ 0x5bd1_e995, base));
            conn.retire.set(Some((base, at)));
            at
        }
    };
    // None: so far off that it cannot be represented, never.
    at.is_some_and(|at| now > at)
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

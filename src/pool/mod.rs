//! A pool of server connections for one (database, user), with a fair FIFO wait queue.
//!
//! Checkout takes the most recently used idle connection (warm caches), else opens a new
//! one while under the size limit, else queues. Check-in hands the connection straight to
//! the longest waiter. A `Lease` that is dropped without being released counts the
//! connection as closed, so no code path can leak a slot.

pub mod registry;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::circuit::{Admit, Breaker, BreakerSettings, BreakerView, Event};
use crate::config::PoolMode;
use crate::error::{sqlstate, ClientError};
use crate::metrics::{Metrics, PoolMetrics};
use crate::server::{ConnectError, ServerConn, ServerIdentity};

/// Everything the admin API and metrics report about a pool.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolSnapshot {
    pub name: String,
    pub database: String,
    pub user: String,
    pub mode: String,
    pub min_size: usize,
    pub max_size: usize,
    pub target_size: usize,
    pub open: usize,
    pub idle: usize,
    pub connecting: usize,
    pub active_servers: usize,
    pub waiting_in_queue: usize,
    pub clients: usize,
    pub clients_waiting: usize,
    pub clients_active: usize,
    pub clients_idle: usize,
    pub paused: bool,
    pub oldest_idle_secs: f64,
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
            CheckoutError::Closed => ClientError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "pgsidecar: the pool is shutting down",
            ),
        }
    }
}

/// Server parameters reported to clients at login, sorted by name.
pub type StartupParams = Arc<Vec<(String, String)>>;

type Waiter = oneshot::Sender<Result<Lease, CheckoutError>>;

/// One checkout's place in the wait queue. However the wait ends (answered, timed out,
/// or the checkout future dropped because the client disconnected), the entry leaves
/// the queue at once. Left in place until the next check-in, a dead entry counted as a
/// waiting client, kept `try_checkout` from handing out idle connections, and made
/// `trim_and_fill` open connections for nobody.
struct QueueSlot<'a> {
    pool: &'a Pool,
    rx: oneshot::Receiver<Result<Lease, CheckoutError>>,
    /// The sender was taken off the queue and answered; nothing to clean up.
    answered: bool,
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.rx.close();
        // A connection handed over just before the waiter left goes back to the pool
        // instead of being closed.
        if let Ok(Ok(lease)) = self.rx.try_recv() {
            lease.release();
        }
        self.pool.forget_abandoned_waiters();
    }
}

struct PoolState {
    /// Idle connections, most recently used last.
    idle: Vec<ServerConn>,
    /// Open or opening connections (idle + leased + connecting).
    open: usize,
    /// Clients waiting for a connection, oldest first.
    waiters: VecDeque<Waiter>,
    /// Connections being opened (counted in `open`).
    connecting: usize,
    /// Paused pools hand out nothing; checkouts queue until resume.
    paused: bool,
    closed: bool,
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
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("conn", &self.conn).finish()
    }
}

impl Lease {
    fn empty(pool: Arc<Pool>) -> Lease {
        Lease { conn: None, pool }
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

    /// Returns a clean connection (ReadyForQuery 'I', nothing in flight) to the pool.
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.clone().checkin(conn);
        }
    }

    /// Closes the connection instead of returning it (broken or dirty state).
    pub fn discard(mut self, reason: &'static str) {
        if let Some(conn) = self.conn.take() {
            self.pool.clone().discarded(conn, reason);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.clone().discarded(conn, "dropped");
        }
    }
}

impl Pool {
    pub fn new(key: PoolKey, settings: PoolSettings, metrics: Arc<Metrics>) -> Arc<Pool> {
        let name = key.to_string();
        Arc::new(Pool {
            m: metrics.for_pool(&name),
            name,
            metrics,
            clients: AtomicUsize::new(0),
            clients_waiting: AtomicUsize::new(0),
            clients_active: AtomicUsize::new(0),
            key,
            breaker: Mutex::new(Breaker::new(settings.breaker.clone())),
            settings: Mutex::new(Arc::new(settings)),
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
                waiters: VecDeque::new(),
                connecting: 0,
                paused: false,
                closed: false,
            }),
            stats: PoolStats::default(),
            startup_params: Mutex::new(None),
        })
    }

    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings.lock().clone()
    }

    /// Applies new settings; a larger size serves waiters at once, a smaller one closes
    /// idle connections above it (leased ones close when they come back).
    pub fn update_settings(self: &Arc<Self>, settings: PoolSettings) {
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

    /// Takes an idle connection if one is free right now (never waits, never connects).
    pub fn try_checkout(self: &Arc<Self>) -> Option<Lease> {
        let settings = self.settings();
        let now = Instant::now();
        let mut st = self.state.lock();
        if st.closed || st.paused || !st.waiters.is_empty() {
            // Waiters are first in line.
            return None;
        }
        while let Some(conn) = st.idle.pop() {
            if expired(&conn, &settings, now) {
                st.open -= 1;
                self.stats.closed.fetch_add(1, Ordering::Relaxed);
                drop_later(conn);
                continue;
            }
            drop(st);
            self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
            return Some(self.lease(conn));
        }
        None
    }

    /// Takes a connection, waiting up to `query_wait_timeout` in FIFO order.
    pub async fn checkout(self: &Arc<Self>) -> Result<Lease, CheckoutError> {
        let settings = self.settings();
        let started = Instant::now();
        let rx = {
            let mut st = self.state.lock();
            if st.closed {
                return Err(CheckoutError::Closed);
            }
            let now = Instant::now();
            while let Some(conn) = (!st.paused).then(|| st.idle.pop()).flatten() {
                if expired(&conn, &settings, now) {
                    st.open -= 1;
                    self.closed_metric("lifetime");
                    drop_later(conn);
                    continue;
                }
                drop(st);
                self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
                self.m
                    .checkout_wait
                    .observe(started.elapsed().as_secs_f64());
                return Ok(self.lease(conn));
            }
            if !st.paused && st.open < settings.max_size {
                st.open += 1;
                st.connecting += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                st.waiters.push_back(tx);
                Some(rx)
            }
        };
        let Some(rx) = rx else {
            if let Err(e) = self.admit() {
                let mut st = self.state.lock();
                st.open -= 1;
                st.connecting -= 1;
                return Err(e);
            }
            return match self.open_new(&settings).await {
                Ok(conn) => {
                    self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
                    self.m
                        .checkout_wait
                        .observe(started.elapsed().as_secs_f64());
                    Ok(self.lease(conn))
                }
                Err(e) => Err(CheckoutError::Connect(e)),
            };
        };
        let mut slot = QueueSlot {
            pool: self,
            rx,
            answered: false,
        };
        self.stats.waits.fetch_add(1, Ordering::Relaxed);
        let deadline = started + settings.query_wait_timeout;
        let result = match tokio::time::timeout_at(deadline, &mut slot.rx).await {
            Ok(Ok(r)) => {
                slot.answered = true;
                r
            }
            Ok(Err(_)) => {
                slot.answered = true;
                Err(CheckoutError::Closed)
            }
            Err(_) => {
                // A connection may have been handed over just as the timer fired.
                slot.rx.close();
                match slot.rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => {
                        self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                        self.m.checkout_timeouts.inc();
                        Err(CheckoutError::Timeout {
                            waited: settings.query_wait_timeout,
                            size: settings.max_size,
                        })
                    }
                }
            }
        };
        self.stats
            .wait_micros_total
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if result.is_ok() {
            self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        }
        self.m
            .checkout_wait
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Drops wait-queue entries whose waiter is gone (timed out, or its client left).
    fn forget_abandoned_waiters(&self) {
        self.state.lock().waiters.retain(|w| !w.is_closed());
    }

    fn lease(self: &Arc<Self>, conn: ServerConn) -> Lease {
        Lease {
            conn: Some(conn),
            pool: self.clone(),
        }
    }

    /// Opens a connection for a slot already counted in `open`.
    async fn open_new(
        self: &Arc<Self>,
        settings: &PoolSettings,
    ) -> Result<ServerConn, Arc<ConnectError>> {
        let lifetime = jitter(settings.server_lifetime);
        let started = Instant::now();
        let r = ServerConn::connect(
            &settings.identity,
            "pgsidecar",
            settings.max_prepared,
            lifetime,
        )
        .await;
        self.state.lock().connecting -= 1;
        self.m
            .connect_duration
            .observe(started.elapsed().as_secs_f64());
        match r {
            Ok(conn) => {
                self.stats.connects.fetch_add(1, Ordering::Relaxed);
                self.m.opened.inc();
                self.breaker_event(Event::Success);
                let mut sp = self.startup_params.lock();
                if sp.is_none() {
                    let mut v: Vec<_> = conn
                        .original_params
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    v.sort();
                    *sp = Some(Arc::new(v));
                }
                Ok(conn)
            }
            Err(e) => {
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(pool = %self.key, error = %e, "server connection failed");
                self.state.lock().open -= 1;
                if let Some(crate::circuit::State::Open) =
                    self.breaker_event(Event::Failure(e.to_string()))
                {
                    // Everyone queued would only wait out their timeout: fail them now.
                    self.fail_all_waiters();
                }
                let e = Arc::new(e);
                // Waiters would otherwise sit out their whole timeout: tell the oldest one
                // why, and try again for the rest (one attempt per waiter, no herd).
                self.fail_one_waiter(&e);
                Err(e)
            }
        }
    }

    /// Feeds the breaker; records and logs a transition. Returns the new state if changed.
    pub fn breaker_event(&self, ev: Event) -> Option<crate::circuit::State> {
        let changed = self.breaker.lock().on(ev, Instant::now());
        if let Some(to) = changed {
            self.on_breaker_transition(to);
        }
        changed
    }

    fn on_breaker_transition(&self, to: crate::circuit::State) {
        self.metrics
            .breaker_transitions
            .with_label_values(&[&self.name, to.as_str()])
            .inc();
        match to {
            crate::circuit::State::Open => {
                tracing::error!(pool = %self.name, "circuit breaker open: upstream unreachable")
            }
            crate::circuit::State::HalfOpen => {
                tracing::info!(pool = %self.name, "circuit breaker half-open: trying the upstream")
            }
            crate::circuit::State::Closed => {
                tracing::info!(pool = %self.name, "circuit breaker closed: upstream reachable")
            }
        }
    }

    /// May a new connection be opened now?
    fn admit(&self) -> Result<(), CheckoutError> {
        let (admit, changed) = self.breaker.lock().admit(Instant::now());
        if let Some(to) = changed {
            self.on_breaker_transition(to);
        }
        match admit {
            Admit::Yes | Admit::Trial => Ok(()),
            Admit::No {
                down_for,
                retry_in,
                last_error,
            } => Err(CheckoutError::Unavailable {
                down_for,
                retry_in,
                last_error,
            }),
        }
    }

    pub fn breaker_open(&self) -> bool {
        self.breaker.lock().state != crate::circuit::State::Closed
    }

    pub fn breaker_view(&self) -> BreakerView {
        self.breaker.lock().view(Instant::now())
    }

    fn fail_all_waiters(&self) {
        let waiters = std::mem::take(&mut self.state.lock().waiters);
        let view = self.breaker_view();
        for w in waiters {
            let _ = w.send(Err(CheckoutError::Unavailable {
                down_for: Duration::from_secs_f64(view.down_for_secs.unwrap_or(0.0)),
                retry_in: Duration::from_secs_f64(view.retry_in_secs.unwrap_or(0.0)),
                last_error: view.last_error.clone().unwrap_or_default(),
            }));
        }
    }

    fn fail_one_waiter(self: &Arc<Self>, e: &Arc<ConnectError>) {
        let waiter = self.state.lock().waiters.pop_front();
        if let Some(w) = waiter {
            let _ = w.send(Err(CheckoutError::Connect(e.clone())));
        }
        self.trim_and_fill();
    }

    /// Returns a connection: to the oldest waiter, else to the idle stack.
    fn checkin(self: Arc<Self>, mut conn: ServerConn) {
        let settings = self.settings();
        let now = Instant::now();
        conn.last_used = now;
        if conn.errors > 3 {
            self.discarded(conn, "errors");
            return;
        }
        if expired(&conn, &settings, now) {
            self.discarded(conn, "lifetime");
            return;
        }
        let mut st = self.state.lock();
        if st.closed || st.open > settings.max_size {
            st.open -= 1;
            drop(st);
            self.closed_metric(if settings.max_size == 0 {
                "closed"
            } else {
                "resize"
            });
            drop_later(conn);
            return;
        }
        let mut lease = self.lease(conn);
        while let Some(w) = (!st.paused).then(|| st.waiters.pop_front()).flatten() {
            match w.send(Ok(lease)) {
                Ok(()) => return,
                // That waiter gave up (timeout or client gone): try the next one.
                Err(Ok(back)) => lease = back,
                Err(Err(_)) => return,
            }
        }
        if let Some(conn) = lease.conn.take() {
            st.idle.push(conn);
        }
    }

    /// Accounts for a connection that is closed rather than returned.
    fn discarded(self: Arc<Self>, conn: ServerConn, reason: &'static str) {
        tracing::debug!(pool = %self.key, server = conn.id, reason, "closing server connection");
        self.closed_metric(reason);
        self.state.lock().open -= 1;
        drop_later(conn);
        self.trim_and_fill();
    }

    fn closed_metric(&self, reason: &str) {
        self.stats.closed.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .server_closed
            .with_label_values(&[&self.name, reason])
            .inc();
    }

    /// Opens connections for waiters while under the limit and closes idle connections
    /// above it.
    fn trim_and_fill(self: &Arc<Self>) {
        let settings = self.settings();
        let mut st = self.state.lock();
        while st.open > settings.max_size {
            match st.idle.pop() {
                Some(c) => {
                    st.open -= 1;
                    self.closed_metric("resize");
                    drop_later(c);
                }
                None => break,
            }
        }
        if st.paused || st.closed {
            return;
        }
        // Idle connections go to waiters first (after a resume).
        while !st.waiters.is_empty() {
            let Some(conn) = st.idle.pop() else { break };
            let mut lease = self.lease(conn);
            while let Some(w) = st.waiters.pop_front() {
                match w.send(Ok(lease)) {
                    Ok(()) => {
                        lease = Lease::empty(self.clone());
                        break;
                    }
                    Err(Ok(back)) => lease = back,
                    Err(Err(_)) => {
                        lease = Lease::empty(self.clone());
                        break;
                    }
                }
            }
            if let Some(c) = lease.conn.take() {
                st.idle.push(c);
                break;
            }
        }
        let mut wanted = st
            .waiters
            .len()
            .min(settings.max_size.saturating_sub(st.open));
        if wanted == 0 {
            return;
        }
        if self.breaker_open() {
            // One trial at a time while the upstream is considered down.
            match self.admit() {
                Ok(()) => wanted = 1,
                Err(_) => return,
            }
        }
        st.open += wanted;
        st.connecting += wanted;
        drop(st);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            let mut st = self.state.lock();
            st.open -= wanted;
            st.connecting -= wanted;
            return;
        };
        for _ in 0..wanted {
            let pool = self.clone();
            let settings = settings.clone();
            rt.spawn(async move {
                if let Ok(conn) = pool.open_new(&settings).await {
                    pool.checkin(conn);
                }
            });
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

    /// A snapshot for metrics and the admin API.
    pub fn snapshot(&self) -> PoolSnapshot {
        let settings = self.settings();
        let now = Instant::now();
        let st = self.state.lock();
        let oldest = st
            .idle
            .iter()
            .map(|c| now.duration_since(c.created))
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
            target_size: settings.max_size,
            open: st.open,
            idle: st.idle.len(),
            connecting: st.connecting,
            active_servers: st.open.saturating_sub(st.idle.len() + st.connecting),
            waiting_in_queue: st.waiters.len(),
            clients,
            clients_waiting: waiting,
            clients_active: active,
            clients_idle: clients.saturating_sub(waiting + active),
            paused: st.paused,
            oldest_idle_secs: oldest.as_secs_f64(),
            checkouts: self.stats.checkouts.load(Ordering::Relaxed),
            wait_timeouts: self.stats.wait_timeouts.load(Ordering::Relaxed),
            connects: self.stats.connects.load(Ordering::Relaxed),
            connect_failures: self.stats.connect_failures.load(Ordering::Relaxed),
            closed: self.stats.closed.load(Ordering::Relaxed),
            wait_seconds_total: self.stats.wait_micros_total.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }

    /// Closes idle connections past their idle timeout or lifetime; returns how many.
    /// Idle connections for the admin console's SHOW SERVERS.
    pub fn idle_servers(&self) -> Vec<ServerView> {
        let now = Instant::now();
        self.state
            .lock()
            .idle
            .iter()
            .map(|c| ServerView {
                backend_pid: c.backend_pid,
                age_secs: now.duration_since(c.created).as_secs_f64(),
                idle_secs: now.duration_since(c.last_used).as_secs_f64(),
            })
            .collect()
    }

    pub fn reap_idle(&self) -> usize {
        let settings = self.settings();
        let now = Instant::now();
        let mut st = self.state.lock();
        let before = st.idle.len();
        let min = settings.min_size;
        let mut keep = Vec::with_capacity(st.idle.len());
        let mut open = st.open;
        for c in st.idle.drain(..) {
            let idle_too_long = now.duration_since(c.last_used) > settings.server_idle_timeout;
            if (expired(&c, &settings, now) || idle_too_long) && open > min {
                open -= 1;
                drop_later(c);
            } else {
                keep.push(c);
            }
        }
        st.idle = keep;
        st.open = open;
        before - st.idle.len()
    }

    /// Closes every idle connection and refuses new checkouts.
    pub fn close(&self) {
        let mut st = self.state.lock();
        st.closed = true;
        let idle = std::mem::take(&mut st.idle);
        st.open -= idle.len();
        st.waiters.clear();
        drop(st);
        for c in idle {
            drop_later(c);
        }
    }

    /// Closes idle connections so that new ones are opened (after a password change etc.).
    pub fn reconnect(&self) {
        let mut st = self.state.lock();
        let idle = std::mem::take(&mut st.idle);
        st.open -= idle.len();
        drop(st);
        for c in idle {
            drop_later(c);
        }
    }
}

fn expired(conn: &ServerConn, settings: &PoolSettings, now: Instant) -> bool {
    now.duration_since(conn.created) > conn.lifetime
        || now.duration_since(conn.last_used) > settings.server_idle_timeout
}

/// Up to -10% so connections opened together do not all expire at once.
fn jitter(d: Duration) -> Duration {
    let f = 0.9 + rand::random::<f64>() * 0.1;
    d.mul_f64(f)
}

/// Sends Terminate in the background; callers may hold a lock.
fn drop_later(conn: ServerConn) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(conn.close());
    }
}

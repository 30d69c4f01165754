//! A pool of server connections for one (database, user), with a fair FIFO wait queue.
//!
//! Checkout takes the most recently used idle connection (warm caches), else opens a new
//! one while under the size limit, else queues. Check-in hands the connection straight to
//! the longest waiter. A `Lease` that is dropped without being released counts the
//! connection as closed, so no code path can leak a slot.

pub mod registry;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::PoolMode;
use crate::error::{sqlstate, ClientError};
use crate::server::{ConnectError, ServerConn, ServerIdentity};

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
}

#[derive(Debug)]
pub enum CheckoutError {
    /// No connection became free within `query_wait_timeout`.
    Timeout { waited: Duration, size: usize },
    /// Opening a connection failed.
    Connect(Arc<ConnectError>),
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

struct PoolState {
    /// Idle connections, most recently used last.
    idle: Vec<ServerConn>,
    /// Open or opening connections (idle + leased + connecting).
    open: usize,
    /// Clients waiting for a connection, oldest first.
    waiters: VecDeque<Waiter>,
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
    settings: Mutex<Arc<PoolSettings>>,
    state: Mutex<PoolState>,
    pub stats: PoolStats,
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
    pub fn new(key: PoolKey, settings: PoolSettings) -> Arc<Pool> {
        Arc::new(Pool {
            key,
            settings: Mutex::new(Arc::new(settings)),
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
                waiters: VecDeque::new(),
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
        if st.closed || !st.waiters.is_empty() {
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
            while let Some(conn) = st.idle.pop() {
                if expired(&conn, &settings, now) {
                    st.open -= 1;
                    self.stats.closed.fetch_add(1, Ordering::Relaxed);
                    drop_later(conn);
                    continue;
                }
                drop(st);
                self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
                return Ok(self.lease(conn));
            }
            if st.open < settings.max_size {
                st.open += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                st.waiters.push_back(tx);
                Some(rx)
            }
        };
        let Some(mut rx) = rx else {
            return match self.open_new(&settings).await {
                Ok(conn) => {
                    self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
                    Ok(self.lease(conn))
                }
                Err(e) => Err(CheckoutError::Connect(e)),
            };
        };
        self.stats.waits.fetch_add(1, Ordering::Relaxed);
        let deadline = started + settings.query_wait_timeout;
        let result = match tokio::time::timeout_at(deadline, &mut rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CheckoutError::Closed),
            Err(_) => {
                // A connection may have been handed over just as the timer fired.
                rx.close();
                match rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => {
                        self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
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
        result
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
        let r = ServerConn::connect(
            &settings.identity,
            "pgsidecar",
            settings.max_prepared,
            lifetime,
        )
        .await;
        match r {
            Ok(conn) => {
                self.stats.connects.fetch_add(1, Ordering::Relaxed);
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
                let e = Arc::new(e);
                // Waiters would otherwise sit out their whole timeout: tell the oldest one
                // why, and try again for the rest (one attempt per waiter, no herd).
                self.fail_one_waiter(&e);
                Err(e)
            }
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
        if expired(&conn, &settings, now) || conn.errors > 3 {
            self.discarded(conn, "lifetime");
            return;
        }
        let mut st = self.state.lock();
        if st.closed || st.open > settings.max_size {
            st.open -= 1;
            drop(st);
            self.stats.closed.fetch_add(1, Ordering::Relaxed);
            drop_later(conn);
            return;
        }
        let mut lease = self.lease(conn);
        while let Some(w) = st.waiters.pop_front() {
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
        self.stats.closed.fetch_add(1, Ordering::Relaxed);
        self.state.lock().open -= 1;
        drop_later(conn);
        self.trim_and_fill();
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
                    drop_later(c);
                }
                None => break,
            }
        }
        let wanted = st
            .waiters
            .len()
            .min(settings.max_size.saturating_sub(st.open));
        if wanted == 0 || st.closed {
            return;
        }
        st.open += wanted;
        drop(st);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.state.lock().open -= wanted;
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

    /// Closes idle connections past their idle timeout or lifetime; returns how many.
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

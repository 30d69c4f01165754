//! Checkout and check-in: the FIFO wait queue, dead-connection replacement before a
//! client's bytes are sent, connects that survive a client leaving, and the bookkeeping
//! that keeps `open` equal to what PostgreSQL sees.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::breaker::Event;
use super::health::{self, CheckOutcome, Testing};
use super::CloseReason;
use super::{
    drop_later, is_congestion, CheckoutError, Idle, Lease, Pool, PoolSettings, PoolState,
    MAX_CONN_ERRORS,
};
use crate::server::{ConnectError, ServerConn};

/// Idle connections last known good more recently than this are not peeked.
const PEEK_AFTER: Duration = Duration::from_millis(100);

/// What a checkout does next, decided under the state lock.
enum Next {
    Ready(ServerConn),
    /// Run a pre-use check first (counted in `testing`).
    Check(ServerConn),
    /// A slot is reserved (counted in `open` and `connecting`).
    Connect,
    Wait(oneshot::Receiver<Result<Lease, CheckoutError>>),
    Fail(CheckoutError),
}

impl Pool {
    /// Takes an idle connection if one is free right now and needs no pre-use check
    /// (never waits, never connects).
    pub fn try_checkout(self: &Arc<Self>, now: Instant) -> Option<Lease> {
        let settings = self.settings();
        let mut st = self.state.lock();
        if st.closed || st.paused || !st.waiters.is_empty() {
            // Waiters are first in line.
            return None;
        }
        while let Some(idle) = st.idle.pop() {
            let idle_for = now.duration_since(idle.checked);
            if let Some(reason) = Self::unusable(&idle, now, idle_for, &settings) {
                self.close_unusable(&mut st, idle, reason);
                continue;
            }
            if idle_for >= settings.health.server_check_delay {
                // Needs a check: that is async, so leave it to `checkout`.
                st.idle.push(idle);
                return None;
            }
            drop(st);
            self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
            // An immediate checkout is a zero wait: counting it keeps the wait
            // percentiles honest (most checkouts of a healthy pool are these).
            self.m.checkout_wait.observe(0.0);
            let mut lease = self.lease(idle.conn);
            lease.count();
            return Some(lease);
        }
        None
    }

    /// Takes a connection, waiting up to `query_wait_timeout` in FIFO order.
    ///
    /// A connection that proves dead before anything of the client's was sent (closed
    /// while idle, failed pre-use check) is replaced here, so the client never notices.
    /// With congestion control on, a connection attempt refused with 53300 puts the
    /// client back at the head of the queue to wait for a released connection.
    pub async fn checkout(self: &Arc<Self>) -> Result<Lease, CheckoutError> {
        self.checkout_since(Instant::now()).await
    }

    /// `checkout`, timed from `started` (a clock reading the caller already took).
    pub async fn checkout_since(
        self: &Arc<Self>,
        started: Instant,
    ) -> Result<Lease, CheckoutError> {
        let settings = self.settings();
        let deadline = started + settings.query_wait_timeout;
        let mut front = false;
        // After a check timed out the upstream may be hung: test no more idle
        // connections in this checkout (each would cost check_timeout).
        let mut no_checks = false;
        // The first step reuses the start's clock reading; a step that loops reads anew.
        let mut now = started;
        let mut result = loop {
            match self.next(&settings, front, no_checks, now) {
                Next::Ready(conn) => break Ok(self.lease(conn)),
                Next::Fail(e) => break Err(e),
                Next::Wait(rx) => break self.wait(rx, deadline, &settings).await,
                Next::Check(conn) => match self.pre_use_check(conn, &settings).await {
                    Ok(conn) => break Ok(self.lease(conn)),
                    Err(timed_out) => no_checks |= timed_out,
                },
                Next::Connect => {
                    if let Err(e) = self.admit() {
                        self.unreserve();
                        if !settings.queues_while_down() {
                            break Err(e);
                        }
                        let rx = self.enqueue(front);
                        break self.wait(rx, deadline, &settings).await;
                    }
                    match self.connect_for_client(&settings).await {
                        Ok(conn) => break Ok(self.lease(conn)),
                        Err(e) if settings.aimd && is_congestion(&e) => front = true,
                        Err(e)
                            if self.rides_out(&settings, &e)
                                && Instant::now() + super::ride_out::RETRY_AFTER < deadline =>
                        {
                            tokio::time::sleep(super::ride_out::RETRY_AFTER).await;
                            front = true;
                        }
                        Err(e) => break Err(CheckoutError::Connect(e)),
                    }
                }
            }
            now = Instant::now();
        };
        if let Ok(lease) = &mut result {
            lease.count();
            self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        }
        let waited = started.elapsed();
        self.stats
            .wait_micros_total
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        self.m.checkout_wait.observe(waited.as_secs_f64());
        result
    }

    /// Decides the next checkout step under the state lock.
    fn next(&self, settings: &PoolSettings, front: bool, no_checks: bool, now: Instant) -> Next {
        let breaker_closed = !self.breaker_open();
        let mut st = self.state.lock();
        if st.closed {
            return Next::Fail(CheckoutError::Closed);
        }
        if !st.paused {
            while let Some(idle) = st.idle.pop() {
                let idle_for = now.duration_since(idle.checked);
                if let Some(reason) = Self::unusable(&idle, now, idle_for, settings) {
                    self.close_unusable(&mut st, idle, reason);
                    continue;
                }
                if idle_for >= settings.health.server_check_delay {
                    if no_checks {
                        st.idle.push(idle);
                        break;
                    }
                    st.testing += 1;
                    return Next::Check(idle.conn);
                }
                return Next::Ready(idle.conn);
            }
            let congested = st.congested_until.is_some_and(|t| now < t);
            if st.open < Self::limit(&st, settings) && !congested {
                st.open += 1;
                st.connecting += 1;
                return Next::Connect;
            }
            if !breaker_closed && !settings.queues_while_down() {
                drop(st);
                return Next::Fail(self.unavailable());
            }
        }
        Next::Wait(Self::push_waiter(&mut st, front))
    }

    /// Gives back a connect slot reserved by `next`.
    fn unreserve(&self) {
        let mut st = self.state.lock();
        st.open -= 1;
        st.connecting -= 1;
    }

    /// Runs the pre-use check on a connection taken by `next`. Err(true): it timed out.
    async fn pre_use_check(
        self: &Arc<Self>,
        conn: ServerConn,
        settings: &PoolSettings,
    ) -> Result<ServerConn, bool> {
        let mut t = Testing::new(self.clone(), conn);
        let started = Instant::now();
        let h = &settings.health;
        let outcome = health::check(t.conn(), &h.check_query, h.check_timeout).await;
        self.record_check("reuse", outcome.is_ok(), Some(started.elapsed()));
        match outcome {
            CheckOutcome::Ok => Ok(t.passed()),
            CheckOutcome::ServerError(e) => {
                // The server answered and is idle: usable, but count it against the
                // connection (and retire it if it keeps failing).
                tracing::warn!(pool = %self.name, error = %e, "pre-use check query failed");
                t.conn().errors += 1;
                if t.conn().errors > MAX_CONN_ERRORS {
                    t.failed(CloseReason::Errors);
                    return Err(false);
                }
                Ok(t.passed())
            }
            CheckOutcome::Broken(e) => {
                tracing::info!(pool = %self.name, error = %e, "pre-use check: connection broken; replacing it");
                t.failed(CloseReason::HealthCheckFailed);
                Err(false)
            }
            CheckOutcome::TimedOut(d) => {
                tracing::warn!(pool = %self.name, timeout = ?d, "pre-use check got no answer; closing the connection");
                t.failed(CloseReason::HealthCheckTimeout);
                self.breaker_event(Event::Failure(format!(
                    "health check got no answer within {d:?}"
                )));
                Err(true)
            }
        }
    }

    /// Opens a connection for a client in its own task, so a client that leaves while
    /// it connects neither leaks the slot nor wastes the connection.
    async fn connect_for_client(
        self: &Arc<Self>,
        settings: &Arc<PoolSettings>,
    ) -> Result<ServerConn, Arc<ConnectError>> {
        let (tx, rx) = oneshot::channel();
        let pool = self.clone();
        let settings = settings.clone();
        tokio::spawn(async move {
            let r = pool.open_new(&settings).await;
            if let Err(Ok(conn)) = tx.send(r) {
                pool.checkin(conn, Instant::now());
            }
        });
        rx.await.unwrap_or_else(|_| {
            Err(Arc::new(ConnectError::Protocol(
                "the connect task ended without an answer".into(),
            )))
        })
    }

    /// Opens a connection for a slot already counted in `open` and `connecting`, and
    /// feeds the outcome to the breaker and to congestion control.
    async fn open_new(
        self: &Arc<Self>,
        settings: &PoolSettings,
    ) -> Result<ServerConn, Arc<ConnectError>> {
        let started = Instant::now();
        let r = ServerConn::connect(&settings.identity, "pgsidecar", settings.max_prepared).await;
        let took = started.elapsed();
        let now = Instant::now();
        self.m.connect_duration.observe(took.as_secs_f64());
        let aimd = settings.aimd_config();
        match r {
            Ok(conn) => {
                let change = {
                    let mut st = self.state.lock();
                    st.connecting -= 1;
                    let established = st.open - st.connecting;
                    st.aimd.on_connected(&aimd, took, established, now)
                };
                if let Some(ch) = change {
                    self.log_ceiling(ch, &format!("connecting took {took:?}"));
                }
                self.stats.connects.fetch_add(1, Ordering::Relaxed);
                self.note_login(Ok(()));
                self.m.opened.inc();
                self.breaker_event(Event::Success);
                let mut sp = self.startup_params.lock();
                if sp.is_none() {
                    let v: Vec<_> = conn
                        .original_params
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    *sp = Some(Arc::new(super::ReportedParams::new(v)));
                }
                Ok(conn)
            }
            Err(e) => {
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                self.note_login(Err(&e));
                let congestion = is_congestion(&e);
                let change = {
                    let mut st = self.state.lock();
                    st.connecting -= 1;
                    st.open -= 1;
                    if congestion && settings.aimd {
                        // Retry after a quarter interval: soon enough for waiters, slow
                        // enough not to hammer a full server.
                        let pause = (settings.aimd_interval / 4)
                            .clamp(Duration::from_millis(50), Duration::from_secs(1));
                        st.congested_until = Some(now + pause);
                        let established = st.open - st.connecting;
                        st.aimd.on_refused(&aimd, established, now)
                    } else {
                        None
                    }
                };
                if congestion {
                    tracing::info!(pool = %self.name, error = %e, "upstream refused a connection: too many connections");
                    if let Some(ch) = change {
                        self.log_ceiling(ch, "the upstream refused a connection (53300)");
                    }
                    // The server answered: congestion, not an outage. This also ends a
                    // HalfOpen trial that met a full server.
                    self.breaker_event(Event::Success);
                } else {
                    tracing::warn!(pool = %self.name, error = %e, "server connection failed");
                    self.breaker_event(Event::Failure(e.to_string()));
                }
                Err(Arc::new(e))
            }
        }
    }

    /// Opens `n` connections (slots already reserved) in the background; each goes to
    /// the oldest waiter or the idle list. `for_waiters`: a failure is reported to the
    /// oldest waiter (one attempt per waiter, no herd), unless it is congestion that the
    /// waiter should sit out.
    pub(super) fn spawn_connects(
        self: &Arc<Self>,
        n: usize,
        settings: &Arc<PoolSettings>,
        for_waiters: bool,
    ) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            let mut st = self.state.lock();
            st.open -= n;
            st.connecting -= n;
            return;
        };
        for _ in 0..n {
            let pool = self.clone();
            let settings = settings.clone();
            rt.spawn(async move {
                match pool.open_new(&settings).await {
                    Ok(conn) => pool.checkin(conn, Instant::now()),
                    Err(e) if for_waiters && pool.rides_out(&settings, &e) => {
                        pool.retry_for_waiters()
                    }
                    Err(e) if for_waiters && !(settings.aimd && is_congestion(&e)) => {
                        pool.fail_one_waiter(&e)
                    }
                    Err(_) => {}
                }
            });
        }
    }

    /// Closes every idle connection (breaker opened, reconnect requested).
    pub(super) fn close_idle(&self, reason: CloseReason) {
        let idle = {
            let mut st = self.state.lock();
            let idle = std::mem::take(&mut st.idle);
            st.open -= idle.len();
            idle
        };
        for i in idle {
            self.closed_metric(reason);
            drop_later(i.conn);
        }
    }

    /// Why an idle connection must not be handed out (found dead or too old), if so.
    ///
    /// The peek is skipped for a connection known good within `PEEK_AFTER`: under load
    /// that is nearly every checkout (one syscall saved per transaction), and one that
    /// died within that window is about as likely to die right after a peek.
    /// `idle_for`: since it was last known good (the caller's clock reading, which it
    /// reuses for the pre-use check).
    pub(super) fn unusable(
        idle: &Idle,
        now: Instant,
        idle_for: Duration,
        settings: &PoolSettings,
    ) -> Option<CloseReason> {
        if super::past_lifetime(&idle.conn, settings, now) {
            return Some(CloseReason::Lifetime);
        }
        // Its host is known to have another role now (a failover): never hand it out.
        let hosts = &settings.identity.hosts;
        if hosts.attrs.needs_role() && !hosts.fits(idle.conn.host_index) {
            return Some(CloseReason::Role);
        }
        if idle_for < PEEK_AFTER {
            return None;
        }
        health::peek_dead(&idle.conn.stream).map(|_| CloseReason::Broken)
    }

    /// Closes an idle connection found unusable (state lock held by the caller).
    pub(super) fn close_unusable(&self, st: &mut PoolState, idle: Idle, reason: CloseReason) {
        st.open -= 1;
        if reason == CloseReason::Broken {
            tracing::info!(pool = %self.name, server = idle.conn.id, backend_pid = idle.conn.backend_pid,
                "idle server connection was closed by the server; replacing it");
            self.record_check("peek", false, None);
        }
        self.closed_metric(reason);
        drop_later(idle.conn);
    }
}

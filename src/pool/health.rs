//! Health of server connections and of the upstream, cheapest check first:
//!
//! - **peek**: every idle connection handed out is first peeked without blocking. An idle
//!   server has nothing to say, so readable data (PostgreSQL's FATAL on
//!   `pg_terminate_backend` or shutdown) or EOF means it is gone. One syscall, no round
//!   trip; it catches most dead connections before any of the client's bytes are sent.
//! - **check query** (`health.check_query`, empty by default: an empty Query answered
//!   by EmptyQueryResponse + ReadyForQuery): before reuse of a connection unverified for
//!   `server_check_delay`, and in the background for idle connections unverified for
//!   `idle_check_interval`. A check that gets no answer in `check_timeout` means a hung
//!   upstream and counts as a breaker failure; a connection that is merely closed does
//!   not (one terminated backend is not an outage; the failed reconnect would be).
//! - **probe**: a fresh connection (connect, login, check query, close) within
//!   `probe_timeout`, every `probe_interval` per pool. It measures reachability and
//!   latency, feeds the breaker and congestion control, and is the HalfOpen trial that
//!   lets an Open breaker recover without client traffic.

use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::breaker::{Event, State};
use super::CloseReason;
use super::{PoolSettings, MAX_CONN_ERRORS};
use crate::server::{QueryOutcome, ServerConn, ServerIdentity, ServerStream};
use crate::tls::MaybeTls;

use super::Pool;

/// How a check query went.
#[derive(Debug)]
pub enum CheckOutcome {
    Ok,
    /// The server answered with an error but the connection is idle and usable.
    ServerError(String),
    /// The connection is unusable (closed, reset, FATAL, protocol violation).
    Broken(String),
    /// No answer in time: the upstream may be hung; the connection is unusable.
    TimedOut(Duration),
}

impl CheckOutcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, CheckOutcome::Ok)
    }
}

/// The TCP socket under a server stream, TLS or not.
fn raw_tcp(s: &ServerStream) -> Option<&TcpStream> {
    match s {
        MaybeTls::Plain(t) => Some(t),
        MaybeTls::Tls(t) => Some(t.get_ref().0),
        MaybeTls::Broken => None,
    }
}

/// Whether an idle connection is known dead, without blocking: Some(why) if the socket
/// has data (an idle server sends nothing, so it is an error or a TLS alert), EOF, or an
/// error. Works under TLS too, since it looks at the socket, not the session.
pub fn peek_dead(stream: &ServerStream) -> Option<&'static str> {
    let Some(tcp) = raw_tcp(stream) else {
        return Some("stream unusable");
    };
    let mut buf = [MaybeUninit::<u8>::uninit(); 1];
    // The socket is non-blocking (tokio), so an empty receive queue is WouldBlock.
    match socket2::SockRef::from(tcp).peek(&mut buf) {
        Ok(0) => Some("closed by the server"),
        Ok(_) => Some("unexpected data from the server while idle"),
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::Interrupted =>
        {
            None
        }
        Err(_) => Some("socket error"),
    }
}

/// Runs the check query on an idle connection within `limit`.
pub async fn check(conn: &mut ServerConn, query: &str, limit: Duration) -> CheckOutcome {
    match tokio::time::timeout(limit, conn.simple(query)).await {
        Err(_) => CheckOutcome::TimedOut(limit),
        Ok(Err(e)) => CheckOutcome::Broken(e),
        Ok(Ok(QueryOutcome::ServerError(e))) => CheckOutcome::ServerError(e),
        Ok(Ok(QueryOutcome::Rows(_))) => CheckOutcome::Ok,
    }
}

/// How a probe went.
#[derive(Debug)]
pub enum ProbeOutcome {
    /// Connected, logged in and answered; `connect` is the connect + login part. The
    /// connection is returned so the pool can keep it.
    Up {
        connect: Duration,
        conn: ServerConn,
    },
    /// The server refused the login as too many connections (53300): up but full.
    Full(String),
    Down(String),
}

/// Connects, logs in and runs the check query within `limit`.
pub async fn probe(settings: &PoolSettings) -> ProbeOutcome {
    let limit = settings.health.probe_timeout;
    let started = Instant::now();
    let mut ident: ServerIdentity = settings.identity.clone();
    ident.connect_timeout = ident.connect_timeout.min(limit);
    let connected = ServerConn::connect(&ident, "pgsidecar", settings.max_prepared).await;
    let mut conn = match connected {
        Ok(c) => c,
        Err(e) if super::is_congestion(&e) => return ProbeOutcome::Full(e.to_string()),
        Err(e) => return ProbeOutcome::Down(e.to_string()),
    };
    let connect = started.elapsed();
    let left = limit.saturating_sub(connect).max(Duration::from_millis(1));
    match check(&mut conn, &settings.health.check_query, left).await {
        // A check query that errors is a configuration problem the idle checks report;
        // the server answered, so it is up.
        CheckOutcome::Ok | CheckOutcome::ServerError(_) => ProbeOutcome::Up { connect, conn },
        CheckOutcome::Broken(e) => ProbeOutcome::Down(e),
        CheckOutcome::TimedOut(d) => {
            ProbeOutcome::Down(format!("probe got no answer within {d:?}"))
        }
    }
}

/// A connection taken out of the idle list for a check; counted in `testing`. Dropped
/// unfinished (the checking task was cancelled), it closes the connection.
pub(super) struct Testing {
    conn: Option<ServerConn>,
    pool: Arc<Pool>,
}

impl Testing {
    /// `conn` must already be counted in `testing` (and `open`).
    pub(super) fn new(pool: Arc<Pool>, conn: ServerConn) -> Testing {
        Testing {
            conn: Some(conn),
            pool,
        }
    }

    pub(super) fn conn(&mut self) -> &mut ServerConn {
        // Only None after passed/failed, which consume self.
        self.conn.as_mut().unwrap_or_else(|| unreachable!())
    }

    pub(super) fn passed(mut self) -> ServerConn {
        self.pool.state.lock().testing -= 1;
        self.conn.take().unwrap_or_else(|| unreachable!())
    }

    pub(super) fn failed(mut self, reason: CloseReason) {
        if let Some(c) = self.conn.take() {
            self.pool.state.lock().testing -= 1;
            self.pool.clone().discarded(c, reason);
        }
    }
}

impl Drop for Testing {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            {
                let mut st = self.pool.state.lock();
                st.testing -= 1;
                st.open -= 1;
            }
            self.pool.closed_metric(CloseReason::CheckCancelled);
            super::drop_later(c);
        }
    }
}

impl Pool {
    /// Takes idle connections unverified for `idle_check_interval` out for a background
    /// check: at most half the idle list per tick, so arrivals still find some.
    pub(super) fn start_idle_checks(self: &Arc<Self>, settings: &Arc<PoolSettings>, now: Instant) {
        let every = settings.health.idle_check_interval;
        if every.is_zero() {
            return;
        }
        let batch: Vec<ServerConn> = {
            let mut st = self.state.lock();
            if st.paused || st.closed {
                return;
            }
            let most = (st.idle.len() / 2).max(1);
            let mut taken = Vec::new();
            let mut i = 0;
            while i < st.idle.len() && taken.len() < most {
                if now.duration_since(st.idle[i].checked) >= every {
                    taken.push(st.idle.remove(i).conn);
                } else {
                    i += 1;
                }
            }
            st.testing += taken.len();
            taken
        };
        for conn in batch {
            let t = Testing::new(self.clone(), conn);
            let pool = self.clone();
            let settings = settings.clone();
            tokio::spawn(async move { pool.idle_check(t, &settings).await });
        }
    }

    async fn idle_check(self: Arc<Self>, mut t: Testing, settings: &Arc<PoolSettings>) {
        let h = &settings.health;
        let started = Instant::now();
        let outcome = check(t.conn(), &h.check_query, h.check_timeout).await;
        self.record_check("idle", outcome.is_ok(), Some(started.elapsed()));
        match outcome {
            CheckOutcome::Ok => {
                let conn = t.passed();
                self.put_back(conn, Instant::now(), settings);
            }
            CheckOutcome::ServerError(e) => {
                tracing::warn!(pool = %self.name, error = %e, "idle check query failed");
                t.conn().errors += 1;
                if t.conn().errors > MAX_CONN_ERRORS {
                    t.failed(CloseReason::Errors);
                } else {
                    let conn = t.passed();
                    self.put_back(conn, Instant::now(), settings);
                }
            }
            CheckOutcome::Broken(e) => {
                tracing::info!(pool = %self.name, error = %e, "idle check: connection broken; closing it");
                t.failed(CloseReason::HealthCheckFailed);
            }
            CheckOutcome::TimedOut(d) => {
                tracing::warn!(pool = %self.name, timeout = ?d, "idle check got no answer; closing the connection");
                t.failed(CloseReason::HealthCheckTimeout);
                self.breaker_event(Event::Failure(format!(
                    "health check got no answer within {d:?}"
                )));
            }
        }
    }

    /// Starts a probe when one is due: as the HalfOpen trial of an Open breaker whose
    /// backoff has expired, or while closed every `probe_interval` without other proof
    /// that the upstream works (a clean check-in, a passed check), for a pool that has
    /// connected at least once (so a login to a database that does not exist is not
    /// probed forever). A busy pool never probes: its traffic is the proof, and a probe
    /// would fork a backend for nothing.
    ///
    /// A probe takes a pool slot, so the pool never holds more than its size upstream;
    /// a pool at its limit skips it.
    pub(super) fn maybe_probe(self: &Arc<Self>, settings: &Arc<PoolSettings>, now: Instant) {
        // +-20% so pools and sidecars do not act in lockstep.
        let jittered = |d: Duration| d.mul_f64(0.8 + rand::random::<f64>() * 0.4);
        {
            let mut st = self.state.lock();
            if st.probe_running || st.closed {
                return;
            }
            let limit = Self::limit(&st, settings);
            if self.breaker.lock().state == State::Closed {
                let every = settings.health.probe_interval;
                let proof = st.last_probe.max(st.last_good);
                let due = proof.is_none_or(|t| now.duration_since(t) >= jittered(every));
                if every.is_zero() || !due || self.startup_params().is_none() {
                    return;
                }
            }
            if st.open >= limit {
                return;
            }
            // Reserve the slot before asking the breaker: an admitted trial must run.
            st.open += 1;
            st.testing += 1;
            st.probe_running = true;
        }
        // Closed: Yes. Open with the backoff expired: the single trial. Otherwise No.
        if self.admit().is_err() {
            let mut st = self.state.lock();
            st.open -= 1;
            st.testing -= 1;
            st.probe_running = false;
            return;
        }
        self.state.lock().last_probe = Some(now);
        let pool = self.clone();
        let settings = settings.clone();
        tokio::spawn(async move { pool.run_probe(&settings).await });
    }

    async fn run_probe(self: Arc<Self>, settings: &Arc<PoolSettings>) {
        let started = Instant::now();
        let outcome = probe(settings).await;
        let took = started.elapsed();
        let now = Instant::now();
        let aimd = settings.aimd_config();
        self.record_check(
            "probe",
            !matches!(outcome, ProbeOutcome::Down(_)),
            Some(took),
        );
        let (change, adopt) = {
            let mut st = self.state.lock();
            st.probe_running = false;
            st.testing -= 1;
            let established = st.open - st.connecting - 1;
            match &outcome {
                ProbeOutcome::Up { connect, .. } => {
                    st.probe_latency = Some(took);
                    let change = st.aimd.on_connected(&aimd, *connect, established, now);
                    // Keep the connection if the pool wants one more; else close it.
                    let adopt = st.open <= st.sizer.target().max(settings.min_size) && !st.closed;
                    if !adopt {
                        st.open -= 1;
                    }
                    (change, adopt)
                }
                ProbeOutcome::Full(_) => {
                    st.open -= 1;
                    (st.aimd.on_refused(&aimd, established, now), false)
                }
                ProbeOutcome::Down(_) => {
                    st.open -= 1;
                    (None, false)
                }
            }
        };
        if let Some(ch) = change {
            self.log_ceiling(ch, "probe");
        }
        match outcome {
            ProbeOutcome::Up { conn, .. } => {
                tracing::debug!(pool = %self.name, latency = ?took, "upstream probe ok");
                self.breaker_event(Event::Success);
                if adopt {
                    self.stats
                        .connects
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.m.opened.inc();
                    self.put_back(conn, Instant::now(), settings);
                } else {
                    super::drop_later(conn);
                }
            }
            ProbeOutcome::Full(e) => {
                tracing::info!(pool = %self.name, error = %e, "upstream probe: server full");
                self.breaker_event(Event::Success);
            }
            ProbeOutcome::Down(e) => {
                self.note_probe_down(&e);
                tracing::warn!(pool = %self.name, error = %e, latency = ?took, "upstream probe failed");
                self.breaker_event(Event::Failure(e));
            }
        }
    }
}

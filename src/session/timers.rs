//! Session timeouts: `client_idle_timeout` (57P05), `idle_transaction_timeout` (25P03),
//! `query_timeout` (cancel, then 57014) and `transaction_timeout` (25P04).
//!
//! One optional timer per session, boxed and allocated on first use, so an idle client
//! with no limits configured carries one pointer. Which limit applies is derived from
//! the session's state after each pass of the relay loop; the deadline is only moved
//! when that state changes (a request starts, a transaction ends, a pipelined request
//! is answered), never per message. Nothing fires while the session waits for a server
//! (that is `pool.query_wait_timeout`'s job) because the relay loop is not polled then.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use super::tracker::TxnStatus;
use super::{ReadReady, Session, Step};
use crate::cancel::CancelTarget;
use crate::config::LimitsConfig;
use crate::error::{sqlstate, ClientError};
use crate::pool::CloseReason;

/// How long the server gets to answer a cancel sent for `query_timeout` before its
/// connection is closed.
pub const CANCEL_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Off,
    /// Idle outside a transaction.
    ClientIdle,
    /// Idle inside a transaction (the server waits for the client).
    IdleInTransaction,
    /// A request is in flight on the server.
    Query,
    /// The query was cancelled; waiting for the server to answer.
    CancelGrace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    ClientIdle,
    IdleInTransaction,
    /// The server did not answer the cancel sent at `query_timeout`.
    QueryUnanswered,
    /// A transaction (or a request outside one) lasted longer than `transaction_timeout`.
    Transaction,
}

pub(super) struct Timers {
    kind: Kind,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Requests in flight when the query deadline was last set.
    query_pending: u32,
    /// The three limits in milliseconds, 0 for none: compact, since every idle client
    /// carries them.
    client_idle_ms: u32,
    idle_transaction_ms: u32,
    query_ms: u32,
    transaction_ms: u32,
    /// `transaction_timeout` runs from the start of a transaction whatever the session
    /// does meanwhile, so it has its own deadline beside the one above.
    txn_sleep: Option<Pin<Box<Sleep>>>,
    txn_armed: bool,
    /// A cancel was sent: the server goes back to the pool only after its answer, and
    /// is then closed rather than reused (a late cancel must not hit another client).
    pub(super) discard_server: bool,
}

/// A configured limit in whole milliseconds (at least 1, at most ~49 days), 0 for none.
fn to_ms(d: Option<Duration>) -> u32 {
    d.map_or(0, |d| d.as_millis().clamp(1, u32::MAX as u128) as u32)
}

fn from_ms(ms: u32) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms.into()))
}

impl Timers {
    fn client_idle(&self) -> Option<Duration> {
        from_ms(self.client_idle_ms)
    }

    fn idle_transaction(&self) -> Option<Duration> {
        from_ms(self.idle_transaction_ms)
    }

    fn query(&self) -> Option<Duration> {
        from_ms(self.query_ms)
    }

    fn transaction(&self) -> Option<Duration> {
        from_ms(self.transaction_ms)
    }

    pub(super) fn new(limits: &LimitsConfig) -> Self {
        Timers {
            kind: Kind::Off,
            sleep: None,
            query_pending: 0,
            client_idle_ms: to_ms(limits.client_idle_timeout),
            idle_transaction_ms: to_ms(limits.idle_transaction_timeout),
            query_ms: to_ms(limits.query_timeout),
            transaction_ms: to_ms(limits.transaction_timeout),
            txn_sleep: None,
            txn_armed: false,
            discard_server: false,
        }
    }

    fn enabled(&self) -> bool {
        self.client_idle_ms > 0
            || self.idle_transaction_ms > 0
            || self.query_ms > 0
            || self.transaction_ms > 0
    }

    /// `transaction_timeout`: armed when the session starts holding a server for a
    /// request or a transaction, dropped when it is back to idle outside one.
    fn track_transaction(&mut self, busy: bool) {
        let Some(limit) = self.transaction() else {
            return;
        };
        if !busy {
            self.txn_armed = false;
        } else if !self.txn_armed {
            self.txn_armed = true;
            let deadline = Instant::now() + limit;
            match self.txn_sleep.as_mut() {
                Some(s) => s.as_mut().reset(deadline),
                None => self.txn_sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
    }

    fn transaction_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.txn_armed
            && self
                .txn_sleep
                .as_mut()
                .is_some_and(|s| s.as_mut().poll(cx).is_ready())
    }

    fn arm(&mut self, kind: Kind, deadline: Instant) {
        self.kind = kind;
        match self.sleep.as_mut() {
            Some(s) => s.as_mut().reset(deadline),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }
}

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    /// Moves the timer to what the session's state calls for. `client_progress`: a
    /// client message was consumed in this pass (restarts an idle deadline).
    pub(super) fn update_timer(&mut self, client_progress: bool) {
        if !self.timers.enabled() {
            return;
        }
        let in_flight = self.server.is_some() && !self.tracker.is_empty();
        let in_transaction = self.server.is_some() && self.tracker.status != TxnStatus::Idle;
        let t = &mut self.timers;
        t.track_transaction(in_flight || in_transaction);
        if in_flight {
            if t.kind == Kind::CancelGrace {
                return;
            }
            let Some(limit) = t.query() else {
                t.kind = Kind::Off;
                return;
            };
            // Each request is timed from when the server could start on it: its own
            // start, or the answer to the one before it in a pipeline, so a pipeline of
            // short queries is not cancelled for its total length.
            let pending = u32::try_from(self.stats.query_starts.len()).unwrap_or(u32::MAX);
            if t.kind != Kind::Query {
                let start = self.stats.query_starts.front().copied();
                t.arm(Kind::Query, start.unwrap_or_else(Instant::now) + limit);
            } else if pending < t.query_pending {
                t.arm(Kind::Query, Instant::now() + limit);
            }
            t.query_pending = pending;
            return;
        }
        let (kind, limit) = if in_transaction {
            (Kind::IdleInTransaction, t.idle_transaction())
        } else {
            (Kind::ClientIdle, t.client_idle())
        };
        let Some(limit) = limit else {
            t.kind = Kind::Off;
            return;
        };
        if t.kind != kind || client_progress {
            t.arm(kind, Instant::now() + limit);
        }
    }

    /// Polls the timer; Some(step) when the session must end.
    pub(super) fn poll_timer(&mut self, cx: &mut Context<'_>) -> Option<Step> {
        if self.timers.transaction_expired(cx) {
            return Some(Step::Timeout(Expired::Transaction));
        }
        if self.timers.kind == Kind::Off {
            return None;
        }
        let sleep = self.timers.sleep.as_mut()?;
        if sleep.as_mut().poll(cx).is_pending() {
            return None;
        }
        match self.timers.kind {
            Kind::Off => None,
            Kind::ClientIdle => Some(Step::Timeout(Expired::ClientIdle)),
            Kind::IdleInTransaction => Some(Step::Timeout(Expired::IdleInTransaction)),
            Kind::CancelGrace => Some(Step::Timeout(Expired::QueryUnanswered)),
            Kind::Query => {
                self.cancel_for_timeout();
                self.timers
                    .arm(Kind::CancelGrace, Instant::now() + CANCEL_GRACE);
                // Registers the waker for the new deadline.
                if let Some(s) = self.timers.sleep.as_mut() {
                    let _ = s.as_mut().poll(cx);
                }
                None
            }
        }
    }

    /// `query_timeout`: asks PostgreSQL to cancel the running request, as a client's own
    /// CancelRequest would. The client then gets PostgreSQL's ERROR 57014.
    fn cancel_for_timeout(&mut self) {
        let Some(pid) = self.cancel_on_server() else {
            return;
        };
        self.timers.discard_server = true;
        tracing::info!(
            limit = ?self.timers.query(),
            backend_pid = pid,
            "query_timeout reached: cancelling the request on the server"
        );
        self.shared.metrics.error("proxy", sqlstate::QUERY_CANCELED);
        self.pool.m.error("proxy");
    }

    /// Sends a CancelRequest for the server's running request; its backend PID.
    fn cancel_on_server(&self) -> Option<i32> {
        let conn = self.server.as_ref()?.conn_ref();
        let target = CancelTarget {
            host: conn.host.clone(),
            port: conn.port,
            pid: conn.backend_pid,
            secret: conn.backend_secret,
        };
        let pid = target.pid;
        tokio::spawn(async move {
            crate::cancel::send_cancel(&target).await;
        });
        Some(pid)
    }

    /// Ends the session for an expired timer: tells the client why, then returns the
    /// server (rolled back, for an idle transaction) or closes it.
    pub(super) async fn on_timeout(&mut self, what: Expired) {
        let err = match what {
            Expired::ClientIdle => ClientError::fatal(
                sqlstate::IDLE_SESSION_TIMEOUT,
                format!(
                    "terminating connection due to idle-session timeout (pgsidecar limits.client_idle_timeout = {:?})",
                    self.timers.client_idle().unwrap_or_default()
                ),
            ),
            Expired::IdleInTransaction => ClientError::fatal(
                sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                format!(
                    "terminating connection due to idle-in-transaction timeout (pgsidecar limits.idle_transaction_timeout = {:?})",
                    self.timers.idle_transaction().unwrap_or_default()
                ),
            ),
            Expired::QueryUnanswered => ClientError::fatal(
                sqlstate::QUERY_CANCELED,
                format!(
                    "canceling statement due to statement timeout (pgsidecar limits.query_timeout = {:?}); the server did not answer the cancel, so its connection was closed",
                    self.timers.query().unwrap_or_default()
                ),
            ),
            Expired::Transaction => ClientError::fatal(
                sqlstate::TRANSACTION_TIMEOUT,
                format!(
                    "terminating connection due to transaction timeout (pgsidecar limits.transaction_timeout = {:?}); the transaction was rolled back, reconnect and retry it in less time",
                    self.timers.transaction().unwrap_or_default()
                ),
            ),
        };
        tracing::info!(error = %err, "closing client on timeout");
        self.shared.metrics.error("proxy", err.code);
        self.pool.m.error("proxy");
        let discard = match what {
            Expired::QueryUnanswered => Some(CloseReason::QueryTimeout),
            // A request still running: its connection's state is unknown (PostgreSQL
            // itself ends the backend here), so it is closed, not reused.
            Expired::Transaction if !self.tracker.is_empty() => {
                Some(CloseReason::TransactionTimeout)
            }
            _ => None,
        };
        if let Some(reason) = discard {
            if reason == CloseReason::TransactionTimeout {
                // A closed socket goes unnoticed by a backend busy in a long statement:
                // cancel it, so its locks and snapshot go now, not when it finishes.
                self.cancel_on_server();
            }
            if let Some(lease) = self.server.take() {
                lease.discard(reason);
            }
        }
        let _ = self.flush_client().await;
        // Only at a message boundary: a half-forwarded row must not be followed by an
        // error frame the client would misread.
        if self.s_in.body_left == 0 {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = self.client.write_all(&err.to_bytes()).await;
                let _ = self.client.flush().await;
            })
            .await;
        }
        // Rolls back an open transaction and returns the server to the pool.
        self.finish_client_gone().await;
    }
}

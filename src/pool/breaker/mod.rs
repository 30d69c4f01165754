//! The pool's side of the circuit breaker (transitions, admission, what waiters are told)
//! and the metrics every state change is recorded in.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub mod circuit;

use super::{congestion, CheckoutError, CloseReason, Pool};
use crate::server::ConnectError;
pub use circuit::{Admit, Breaker, BreakerSettings, BreakerView, Event, State};

impl Pool {
    /// Logs a congestion-control change. Every cut lowers a limit clients may meet, so
    /// it is logged with its reason: a refusal or an overloaded server at warn, a cut for
    /// fair shares at info. Raises are routine (debug); the return to max_size after a
    /// cut is logged by the maintenance task.
    pub(super) fn log_ceiling(&self, (from, to): congestion::Change, why: &str) {
        if to < from && why == congestion::SHARE {
            tracing::info!(pool = %self.name, from, to, reason = why, "congestion control lowered the pool ceiling");
        } else if to < from {
            tracing::warn!(pool = %self.name, from, to, reason = why, "congestion control lowered the pool ceiling");
        } else {
            tracing::debug!(pool = %self.name, from, to, reason = why, "pool ceiling raised");
        }
    }

    /// Feeds the breaker; records and logs a transition. Returns the new state if changed.
    pub fn breaker_event(self: &Arc<Self>, ev: Event) -> Option<State> {
        if matches!(ev, Event::Success) {
            // A probe's login (or any other) went through: the refusal is history.
            self.note_login(Ok(()));
        }
        let changed = self.breaker.lock().on(ev, Instant::now());
        if let Some(to) = changed {
            self.note_transition(to);
            match to {
                State::Open => {
                    // The upstream is down: idle connections are dead or hung. Close them
                    // so checkouts fail fast instead of trying each.
                    self.close_idle(CloseReason::BreakerOpen);
                    if !self.settings().queues_while_down() {
                        // Everyone queued would only wait out their timeout: fail them now.
                        self.fail_all_waiters();
                    }
                }
                State::Closed => self.trim_and_fill(),
                State::HalfOpen => {}
            }
        }
        changed
    }

    pub(super) fn note_transition(&self, to: State) {
        self.metrics
            .breaker_transitions
            .with_label_values(&[&self.name, to.as_str()])
            .inc();
        match to {
            State::Open => {
                let v = self.breaker_view();
                tracing::error!(pool = %self.name, last_error = v.last_error.as_deref().unwrap_or(""),
                    retry_in_secs = v.retry_in_secs.unwrap_or(0.0), "circuit breaker open: upstream unreachable")
            }
            State::HalfOpen => {
                tracing::info!(pool = %self.name, "circuit breaker half-open: trying the upstream")
            }
            State::Closed => {
                tracing::info!(pool = %self.name, "circuit breaker closed: upstream reachable")
            }
        }
    }

    /// May a new connection be opened now? (A HalfOpen breaker admits one trial.)
    pub(super) fn admit(&self) -> Result<(), CheckoutError> {
        let (admit, changed) = self.breaker.lock().admit(Instant::now());
        if let Some(to) = changed {
            // admit() only moves Open to HalfOpen, which needs no pool action.
            self.note_transition(to);
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

    pub(super) fn unavailable(&self) -> CheckoutError {
        let view = self.breaker_view();
        CheckoutError::Unavailable {
            down_for: Duration::from_secs_f64(view.down_for_secs.unwrap_or(0.0)),
            retry_in: Duration::from_secs_f64(view.retry_in_secs.unwrap_or(0.0)),
            last_error: view.last_error.unwrap_or_default(),
        }
    }

    pub fn breaker_open(&self) -> bool {
        self.breaker.lock().state != State::Closed
    }

    pub fn breaker_view(&self) -> BreakerView {
        self.breaker.lock().view(Instant::now())
    }

    pub(super) fn fail_all_waiters(&self) {
        let waiters = std::mem::take(&mut self.state.lock().waiters);
        for w in waiters {
            let _ = w.send(Err(self.unavailable()));
        }
    }

    pub(super) fn fail_one_waiter(self: &Arc<Self>, e: &Arc<ConnectError>) {
        let waiter = self.state.lock().waiters.pop_front();
        if let Some(w) = waiter {
            let _ = w.send(Err(CheckoutError::Connect(e.clone())));
        }
        self.trim_and_fill();
    }

    pub(super) fn closed_metric(&self, reason: CloseReason) {
        self.stats.closed.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .server_closed
            .with_label_values(&[&self.name, reason.label()])
            .inc();
    }

    /// Counts a health check (`kind`: peek, reuse, idle, probe).
    pub(super) fn record_check(&self, kind: &str, ok: bool, took: Option<Duration>) {
        let result = if ok { "ok" } else { "failed" };
        self.metrics
            .health_checks
            .with_label_values(&[&self.name, kind, result])
            .inc();
        if let Some(d) = took {
            self.metrics
                .health_check_duration
                .with_label_values(&[&self.name, kind])
                .observe(d.as_secs_f64());
        }
    }
}

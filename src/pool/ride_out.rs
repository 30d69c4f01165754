//! Queue mode (`breaker.on_open: queue`) rides out the start of an outage and a
//! PostgreSQL restart: a connect that fails for a reason that passes (refused or timed
//! out, or PostgreSQL's 57P03 "the database system is starting up / shutting down")
//! is retried after a short pause instead of failing the client, until the breaker
//! opens (then clients queue as usual) or the client's `query_wait_timeout` runs out.

use std::sync::Arc;
use std::time::Duration;

use super::{Pool, PoolSettings};
use crate::error::sqlstate;
use crate::server::ConnectError;

/// Pause before trying again: short next to a restart, long next to a connect.
pub(super) const RETRY_AFTER: Duration = Duration::from_millis(100);

/// A failure that says the server is not there *yet*, not that the request is wrong.
fn passes(e: &ConnectError) -> bool {
    match e {
        ConnectError::Io { .. }
        | ConnectError::Timeout(..)
        | ConnectError::NoSuitableHost { .. } => true,
        ConnectError::Server { code, .. } => {
            code == sqlstate::CANNOT_CONNECT_NOW || code == sqlstate::ADMIN_SHUTDOWN
        }
        ConnectError::Protocol(_) | ConnectError::Tls { .. } => false,
    }
}

impl Pool {
    /// Whether this failed connect is to be ridden out rather than reported.
    pub(super) fn rides_out(&self, settings: &PoolSettings, e: &ConnectError) -> bool {
        settings.queues_while_down() && passes(e)
    }

    /// After a ridden-out failure of a connect made for waiters: try again shortly
    /// (the breaker decides whether a connect may start).
    pub(super) fn retry_for_waiters(self: &Arc<Self>) {
        let pool = self.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(RETRY_AFTER).await;
                pool.trim_and_fill();
            });
        }
    }
}

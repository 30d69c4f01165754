//! Headroom samples: how many connection slots PostgreSQL has left, read with one small
//! query on one of the pool's own idle connections, and what the pool does about it.
//!
//! A sample is taken (with congestion control on, at most one at a time) when it can
//! change something:
//! - every half `aimd_interval` while the pool is contended at its limit (clients
//!   queued, every connection busy), so that the yield rule's own pace (see
//!   `Aimd::on_headroom`) decides. There is no idle connection then, so the next
//!   connection released runs it before going to a waiter (one round trip);
//! - every `aimd_interval` while every connection is in use but nobody queues (the
//!   load fits below the ceiling), unless a share cut given up that way waits for its
//!   backoff (`congestion::Demand::Saturated`);
//! - every `aimd_interval` while the pool holds spare idle connections (unused for
//!   2 x `aimd_interval`), which another sidecar could use if the server is (nearly) full.
//!
//! The verdicts are pure (`congestion::Aimd::on_headroom`): free slots raise a cut
//! ceiling; a full server whose other connections are busy makes a contended pool cut
//! its share; and a pool that is not contended gives its spare idle connections back
//! when the server is nearly full, so that the sidecars that are starved can connect.

use std::sync::Arc;

use tokio::time::Instant;

use super::congestion::{Demand, Headroom};
use super::health::Testing;
use super::CloseReason;
use super::{drop_later, Pool, PoolSettings, PoolState};
use crate::server::{QueryOutcome, ServerConn};

/// Slots the pool's role may use; client backends of every application; and those of
/// them busy now or within the last second. A superuser may also take the reserved
/// slots; `reserved_connections` exists from PostgreSQL 16 (`current_setting(.., true)`
/// is NULL before). A backend whose state the role may not see counts as busy. Other
/// sidecars' samples (marked by the leading comment) do not: an idle sidecar samples
/// every interval, and would otherwise look like a busy neighbour.
const SAMPLE_SQL: &str =
    "/* pgsidecar headroom */ select current_setting('max_connections')::int - \
case when current_setting('is_superuser') = 'on' then 0 else \
current_setting('superuser_reserved_connections')::int + \
coalesce(current_setting('reserved_connections', true)::int, 0) end, \
count(*), count(*) filter (where (state is distinct from 'idle' \
or state_change > now() - interval '1 second') \
and coalesce(query, '') not like '/* pgsidecar headroom */%') \
from pg_stat_activity where backend_type = 'client backend'";

/// Spare idle connections are those unused for this many `aimd_interval`s.
const SPARE_AFTER: u32 = 2;

impl Pool {
    /// Starts a headroom sample if one is due (see the module comment).
    pub(super) fn maybe_sample(self: &Arc<Self>, settings: &Arc<PoolSettings>, now: Instant) {
        if !settings.aimd || self.breaker_open() || self.startup_params().is_none() {
            return;
        }
        let interval = settings.aimd_interval;
        let conn = {
            let mut st = self.state.lock();
            if st.sampling || st.sample_at_checkin || st.closed || st.paused {
                return;
            }
            let contended = !st.waiters.is_empty() && st.open >= Self::limit(&st, settings);
            let saturated = !contended && Self::demand(&st, settings, now) == Demand::Saturated;
            let spare = st.open > settings.min_size
                && st.idle.first().is_some_and(|i| {
                    now.duration_since(i.conn.last_used) >= interval * SPARE_AFTER
                });
            let every = if contended { interval / 2 } else { interval };
            let jitter = 0.8 + rand::random::<f64>() * 0.4;
            let due = st
                .last_sample
                .is_none_or(|t| now.duration_since(t) >= every.mul_f64(jitter));
            if !(contended || saturated || spare) || !due {
                return;
            }
            st.last_sample = Some(now);
            if st.idle.is_empty() {
                // Contended: every connection is busy; the next one released runs it.
                st.sample_at_checkin = true;
                return;
            }
            // Least recently used: the one the load is least likely to want next.
            let idle = st.idle.remove(0);
            st.testing += 1;
            st.sampling = true;
            idle.conn
        };
        self.start_sample(conn, settings);
    }

    /// Runs a sample on `conn` (already counted in `testing`, with `sampling` set) in
    /// its own task; the connection goes back to the pool afterwards.
    pub(super) fn start_sample(self: &Arc<Self>, conn: ServerConn, settings: &Arc<PoolSettings>) {
        let pool = self.clone();
        let settings = settings.clone();
        let t = Testing::new(self.clone(), conn);
        tokio::spawn(async move { pool.run_sample(t, &settings).await });
    }

    async fn run_sample(self: Arc<Self>, mut t: Testing, settings: &Arc<PoolSettings>) {
        let limit = settings.health.check_timeout;
        let outcome = t.conn().query_row(SAMPLE_SQL, limit).await;
        self.state.lock().sampling = false;
        match outcome {
            Ok(QueryOutcome::Rows(row)) => {
                let conn = t.passed();
                self.put_back(conn, Instant::now(), settings);
                match parse_sample(&row) {
                    Some(h) => self.on_headroom(h, settings),
                    None => {
                        tracing::debug!(pool = %self.name, ?row, "headroom sample: unexpected row")
                    }
                }
            }
            Ok(QueryOutcome::ServerError(e)) => {
                tracing::debug!(pool = %self.name, error = %e, "headroom sample failed on the server");
                let conn = t.passed();
                self.put_back(conn, Instant::now(), settings);
            }
            Err(e) => {
                tracing::info!(pool = %self.name, error = %e, "headroom sample: connection broken; closing it");
                t.failed(CloseReason::HealthCheckFailed);
            }
        }
    }

    /// Acts on a sample: the ceiling verdict, and spare idle connections given back
    /// when the server is nearly full, others are busy and this pool is not contended.
    fn on_headroom(self: &Arc<Self>, h: Headroom, settings: &Arc<PoolSettings>) {
        let now = Instant::now();
        let interval = settings.aimd_interval;
        let mut released = Vec::new();
        let change = {
            let mut st = self.state.lock();
            st.headroom = Some((h, now));
            let own = st.open - st.connecting;
            let demand = Self::demand(&st, settings, now);
            let contended = demand == Demand::Queued;
            let change = st
                .aimd
                .on_headroom(&settings.aimd_config(), h, own, demand, now);
            // Our busy connections now: the leased ones and the one that ran the sample.
            let own_busy = self.leased.load(std::sync::atomic::Ordering::Relaxed) + 1;
            if !contended && st.waiters.is_empty() && h.pressed(own_busy) {
                while st.open > settings.min_size
                    && st.idle.first().is_some_and(|i| {
                        now.duration_since(i.conn.last_used) >= interval * SPARE_AFTER
                    })
                {
                    let idle = st.idle.remove(0);
                    st.open -= 1;
                    released.push(idle.conn);
                }
                if !released.is_empty() {
                    // Do not reopen them for a target set by an earlier burst.
                    let open = st.open;
                    st.sizer.lower_to(open.max(settings.min_size));
                }
            }
            change
        };
        if let Some(ch) = change {
            let why = if ch.1 > ch.0 {
                format!("the server has {} free connection slots", h.free())
            } else {
                super::congestion::SHARE.to_string()
            };
            self.log_ceiling(ch, &why);
            if ch.1 > ch.0 {
                self.trim_and_fill();
            }
        }
        if !released.is_empty() {
            tracing::info!(pool = %self.name, closing = released.len(), server_slots = h.limit, used = h.used, busy = h.busy,
                "the server is full and other applications are busy: closing idle connections this pool does not use");
            for conn in released {
                self.closed_metric(CloseReason::Yield);
                drop_later(conn);
            }
        }
    }
}

impl Pool {
    /// What the load wants of the pool now: queued at its limit (now or at a tick within
    /// the last interval), every connection in use with nobody queued, or less.
    fn demand(st: &PoolState, settings: &PoolSettings, now: Instant) -> Demand {
        let interval = settings.aimd_interval;
        let recently = |t: Option<Instant>| t.is_some_and(|t| now.duration_since(t) <= interval);
        let at_limit = st.open >= Self::limit(st, settings);
        if at_limit && (!st.waiters.is_empty() || recently(st.last_contended)) {
            Demand::Queued
        } else if st.waiters.is_empty() && recently(st.last_saturated) {
            Demand::Saturated
        } else {
            Demand::Met
        }
    }
}

/// (slots, used) from the sample's row.
fn parse_sample(row: &[Option<String>]) -> Option<Headroom> {
    let int = |i: usize| -> Option<usize> {
        let v: i64 = row.get(i)?.as_deref()?.trim().parse().ok()?;
        usize::try_from(v.max(0)).ok()
    };
    Some(Headroom {
        limit: int(0)?,
        used: int(1)?,
        busy: int(2)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_sample_row() {
        let row = |v: &[Option<&str>]| v.iter().map(|x| x.map(String::from)).collect::<Vec<_>>();
        let want = Headroom {
            limit: 12,
            used: 15,
            busy: 3,
        };
        assert_eq!(
            parse_sample(&row(&[Some("12"), Some("15"), Some("3")])),
            Some(want)
        );
        assert_eq!(parse_sample(&row(&[Some("x"), Some("1"), Some("1")])), None);
        assert_eq!(parse_sample(&row(&[Some("3"), None, Some("1")])), None);
        assert_eq!(parse_sample(&row(&[Some("3"), Some("1")])), None);
        let neg = parse_sample(&row(&[Some("-2"), Some("1"), Some("0")]));
        assert_eq!(neg.map(|h| h.limit), Some(0));
    }
}

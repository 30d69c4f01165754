//! The task that manages one pool: every `TICK` it probes the upstream when due (and
//! lets an Open breaker recover), closes idle connections past their lifetime or idle
//! timeout, starts background checks of idle connections, runs congestion control and
//! the sizing controller, and serves waiters that a congestion pause or a breaker held
//! back. It ends when the pool is closed or dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::sizing::{Load, SizingConfig};
use super::CloseReason;
use super::{drop_later, Pool, PoolSettings};

/// Short enough that growth and recovery react within a blink, long enough that an idle
/// pool costs nothing measurable.
pub const TICK: Duration = Duration::from_millis(100);

/// Starts the pool's maintenance task (if there is a runtime: unit tests of the data
/// structures may build pools without one).
pub(super) fn spawn(pool: &Arc<Pool>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak = Arc::downgrade(pool);
    rt.spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = weak.upgrade() else { return };
            if pool.is_closed() {
                return;
            }
            pool.tick();
        }
    });
}

impl Pool {
    fn tick(self: &Arc<Self>) {
        let settings = self.settings();
        let now = Instant::now();
        self.maybe_probe(&settings, now);
        self.reap(&settings, now);
        self.start_idle_checks(&settings, now);
        self.maybe_sample(&settings, now);
        self.watch_hosts(&settings, now);
        self.resize(&settings, now);
        self.trim_and_fill();
    }

    /// With several upstream hosts, checks every host's role each `probe_interval` (one
    /// pool per upstream does it), so a standby promoted or a primary demoted while no
    /// connection went there is known before a connection is needed; connections to a
    /// host whose role no longer fits are then never handed out.
    fn watch_hosts(&self, settings: &Arc<PoolSettings>, now: Instant) {
        let hosts = &settings.identity.hosts;
        if self.startup_params().is_none() || !hosts.watch_due(settings.health.probe_interval, now)
        {
            return;
        }
        let settings = settings.clone();
        tokio::spawn(async move {
            let ident = &settings.identity;
            for i in 0..ident.hosts.list().len() {
                crate::server::ServerConn::check_host(ident, i, settings.health.probe_timeout)
                    .await;
            }
        });
    }

    /// Closes idle connections past their lifetime (always; the sizing controller
    /// reopens up to min_size) or idle longer than their jittered `server_idle_timeout`
    /// (only above min_size and the sizing target). Oldest-used first.
    pub(super) fn reap(&self, settings: &PoolSettings, now: Instant) -> usize {
        let mut closed = Vec::new();
        {
            let mut st = self.state.lock();
            // Not below the sizing target either: the controller would reopen what the
            // idle timeout closed (it shrinks the target itself once load stays low).
            let keep = settings.min_size.max(st.sizer.target());
            let mut i = 0;
            while i < st.idle.len() {
                let c = &st.idle[i].conn;
                let reason = if super::past_lifetime(c, settings, now) {
                    Some(CloseReason::Lifetime)
                } else if st.open > keep
                    && now.duration_since(c.last_used)
                        > super::spread(c.id, settings.server_idle_timeout)
                {
                    Some(CloseReason::IdleTimeout)
                } else {
                    None
                };
                match reason {
                    Some(r) => {
                        let idle = st.idle.remove(i);
                        st.open -= 1;
                        closed.push((idle.conn, r));
                    }
                    None => i += 1,
                }
            }
        }
        let n = closed.len();
        for (conn, reason) in closed {
            tracing::debug!(pool = %self.name, server = conn.id, %reason, "closing idle server connection");
            self.closed_metric(reason);
            drop_later(conn);
        }
        n
    }

    /// Runs congestion control's additive increase and the sizing controller, then
    /// closes idle connections above the target or opens connections up to it.
    fn resize(self: &Arc<Self>, settings: &Arc<PoolSettings>, now: Instant) {
        // Warm-up waits for the first successful connection, so a pool for a database
        // that does not exist is not filled with failing attempts.
        let may_open = !self.breaker_open() && self.startup_params().is_some();
        let cfg = SizingConfig {
            min: settings.min_size,
            max: settings.max_size,
            target_utilization: settings.target_utilization,
            shrink_delay: settings.shrink_delay,
        };
        let mut shrunk = Vec::new();
        let (aimd_change, recovered, target_change, to_open) = {
            let mut st = self.state.lock();
            st.waiters.retain(|w| !w.is_closed());
            if !st.waiters.is_empty() {
                st.last_contended = Some(now);
            }
            let aimd_change = st.aimd.tick(&settings.aimd_config(), now);
            let recovered = st.aimd.take_recovered(settings.max_size);
            let before = st.sizer.target();
            let busy = st
                .open
                .saturating_sub(st.idle.len() + st.connecting + st.testing);
            // The peak since the last tick, and a new window from what is leased now.
            let now_leased = self.leased.load(Ordering::Relaxed);
            let peak = self.peak_leased.swap(now_leased, Ordering::Relaxed);
            let established = st.open.saturating_sub(st.connecting);
            if st.waiters.is_empty() && established > 0 && peak + st.testing >= established {
                st.last_saturated = Some(now);
            }
            let load = Load {
                open: st.open,
                idle: st.idle.len(),
                busy,
                peak,
                waiting: st.waiters.len(),
                ceiling: st.aimd.ceiling(),
            };
            let plan = st.sizer.step(&cfg, load, now);
            // Least recently used first, and only connections nobody used for
            // shrink_delay: a light load keeps the connection it uses.
            for _ in 0..plan.close.min(st.idle.len()) {
                if now.duration_since(st.idle[0].conn.last_used) < settings.shrink_delay {
                    break;
                }
                let idle = st.idle.remove(0);
                st.open -= 1;
                shrunk.push(idle.conn);
            }
            let congested = st.congested_until.is_some_and(|t| now < t);
            let limit = Self::limit(&st, settings);
            let n = if may_open && !congested && !st.paused && !st.closed {
                plan.open.min(limit.saturating_sub(st.open))
            } else {
                0
            };
            st.open += n;
            st.connecting += n;
            let target_change = (plan.target != before).then_some((before, plan.target));
            (aimd_change, recovered, target_change, n)
        };
        if let Some(ch) = aimd_change {
            self.log_ceiling(ch, "no refusals for an interval");
        }
        if recovered {
            tracing::info!(pool = %self.name, ceiling = settings.max_size, "pool ceiling back at max_size: no more refusals");
        }
        if let Some((from, to)) = target_change {
            tracing::debug!(pool = %self.name, from, to, "pool target size changed");
        }
        if !shrunk.is_empty() {
            tracing::debug!(pool = %self.name, closing = shrunk.len(), "shrinking the pool: load stayed below the target");
        }
        for conn in shrunk {
            self.closed_metric(CloseReason::Shrink);
            drop_later(conn);
        }
        if to_open > 0 {
            tracing::debug!(pool = %self.name, opening = to_open, "growing the pool toward its target");
            self.spawn_connects(to_open, settings, false);
        }
    }
}

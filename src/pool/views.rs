//! What the admin surfaces and metrics read of a pool: snapshots, not its state.

use super::*;

/// Everything the admin API and metrics report about a pool.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolSnapshot {
    pub name: String,
    pub database: String,
    pub user: String,
    pub mode: String,
    pub min_size: usize,
    pub max_size: usize,
    /// What the sizing controller aims for (between min_size and ceiling).
    pub target_size: usize,
    /// The congestion-control ceiling (max_size unless the upstream refused connections).
    pub ceiling: usize,
    pub open: usize,
    pub idle: usize,
    pub connecting: usize,
    /// Taken out of the idle list for a health check.
    pub testing: usize,
    pub active_servers: usize,
    pub waiting_in_queue: usize,
    pub clients: usize,
    pub clients_waiting: usize,
    pub clients_active: usize,
    pub clients_idle: usize,
    pub paused: bool,
    pub oldest_idle_secs: f64,
    /// Connect + login + check query time of the last successful upstream probe.
    pub probe_latency_secs: Option<f64>,
    /// Last headroom sample: connections the pool's role may hold on the server in all,
    /// and client backends connected there (every application's), with its age.
    pub server_slots: Option<usize>,
    pub server_slots_used: Option<usize>,
    pub headroom_age_secs: Option<f64>,
    /// Most connections leased to clients at once since the last maintenance tick.
    pub peak_leased: usize,
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

impl Pool {
    /// A snapshot for metrics and the admin API.
    pub fn snapshot(&self) -> PoolSnapshot {
        let settings = self.settings();
        let now = Instant::now();
        let st = self.state.lock();
        let oldest = st
            .idle
            .iter()
            .map(|i| now.duration_since(i.conn.created))
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
            target_size: st.sizer.target(),
            ceiling: Self::limit(&st, &settings),
            open: st.open,
            idle: st.idle.len(),
            connecting: st.connecting,
            testing: st.testing,
            active_servers: st
                .open
                .saturating_sub(st.idle.len() + st.connecting + st.testing),
            waiting_in_queue: st.waiters.len(),
            clients,
            clients_waiting: waiting,
            clients_active: active,
            clients_idle: clients.saturating_sub(waiting + active),
            paused: st.paused,
            oldest_idle_secs: oldest.as_secs_f64(),
            probe_latency_secs: st.probe_latency.map(|d| d.as_secs_f64()),
            server_slots: st.headroom.map(|(h, _)| h.limit),
            server_slots_used: st.headroom.map(|(h, _)| h.used),
            headroom_age_secs: st
                .headroom
                .map(|(_, at)| now.duration_since(at).as_secs_f64()),
            peak_leased: self.peak_leased.load(Ordering::Relaxed),
            checkouts: self.stats.checkouts.load(Ordering::Relaxed),
            wait_timeouts: self.stats.wait_timeouts.load(Ordering::Relaxed),
            connects: self.stats.connects.load(Ordering::Relaxed),
            connect_failures: self.stats.connect_failures.load(Ordering::Relaxed),
            closed: self.stats.closed.load(Ordering::Relaxed),
            wait_seconds_total: self.stats.wait_micros_total.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }

    /// Idle connections for the admin console's SHOW SERVERS.
    pub fn idle_servers(&self) -> Vec<ServerView> {
        let now = Instant::now();
        self.state
            .lock()
            .idle
            .iter()
            .map(|i| ServerView {
                backend_pid: i.conn.backend_pid,
                age_secs: now.duration_since(i.conn.created).as_secs_f64(),
                idle_secs: now.duration_since(i.conn.last_used).as_secs_f64(),
            })
            .collect()
    }
}

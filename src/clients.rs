//! Who is connected: a small registry for the admin console's SHOW CLIENTS / SERVERS.
//! Sessions update their entry with relaxed atomic stores at state changes only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use atomic_waker::AtomicWaker;
use parking_lot::Mutex;
use tokio::time::Instant;

/// What a client is doing, as SHOW CLIENTS and the `pgsidecar_clients` gauge say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientPhase {
    /// Holds no server (between transactions in transaction mode).
    Idle,
    /// Queued for a server.
    Waiting,
    /// Bound to a server.
    Active,
}

impl ClientPhase {
    pub fn name(self) -> &'static str {
        match self {
            ClientPhase::Idle => "idle",
            ClientPhase::Waiting => "waiting",
            ClientPhase::Active => "active",
        }
    }

    fn from_u8(v: u8) -> ClientPhase {
        match v {
            1 => ClientPhase::Waiting,
            2 => ClientPhase::Active,
            _ => ClientPhase::Idle,
        }
    }
}

pub struct ClientInfo {
    pub id: u64,
    pub addr: SocketAddr,
    pub user: Arc<str>,
    pub database: Arc<str>,
    pub application_name: Box<str>,
    pub connected: Instant,
    /// A `ClientPhase`, written by the session only through `set_phase`.
    state: AtomicU8,
    /// Backend pid of the server this client holds now (0: none).
    pub server_pid: AtomicI32,
    /// Transaction mode: the client holds its server for session state.
    pub pinned: AtomicBool,
    /// The session task's waker, for the drain to wake idle clients (cheaper per
    /// client, and per wake-up, than a cancellation future each).
    pub waker: AtomicWaker,
    /// When this client joined its pool's queue, in microseconds after `connected`,
    /// plus one (0: not waiting). For SHOW POOLS maxwait and the max-wait gauge.
    wait_since: AtomicU64,
    /// When the current server was bound (microseconds after `connected`, plus one),
    /// and that server's age then: SHOW SERVERS ages for servers in use.
    server_bound: AtomicU64,
    server_age_at_bind: AtomicU64,
    /// Set by the console's KILL: the session ends at its next wake-up.
    pub killed: AtomicBool,
}

impl ClientInfo {
    pub fn phase(&self) -> ClientPhase {
        ClientPhase::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// The one way a session changes its phase.
    pub fn set_phase(&self, phase: ClientPhase) {
        self.state.store(phase as u8, Ordering::Relaxed);
    }

    pub fn state_name(&self) -> &'static str {
        self.phase().name()
    }

    /// Marks the start of a wait for a server connection.
    pub fn start_wait(&self) {
        let us = self.connected.elapsed().as_micros() as u64;
        self.wait_since.store(us + 1, Ordering::Relaxed);
    }

    pub fn end_wait(&self) {
        self.wait_since.store(0, Ordering::Relaxed);
    }

    /// How long this client has been queued for a server, if it is.
    pub fn waiting_for(&self, now: Instant) -> Option<Duration> {
        match self.wait_since.load(Ordering::Relaxed) {
            0 => None,
            t => {
                let since = self.connected + Duration::from_micros(t - 1);
                Some(now.saturating_duration_since(since))
            }
        }
    }

    /// Records the server this client now holds.
    pub fn bind_server(&self, backend_pid: i32, server_created: Instant, now: Instant) {
        let at = now.saturating_duration_since(self.connected).as_micros() as u64;
        let age = now.saturating_duration_since(server_created).as_micros() as u64;
        self.server_age_at_bind.store(age, Ordering::Relaxed);
        self.server_bound.store(at + 1, Ordering::Relaxed);
        self.server_pid.store(backend_pid, Ordering::Relaxed);
    }

    /// (server age, time bound to this client) for the server held now, if any.
    pub fn server_times(&self, now: Instant) -> Option<(Duration, Duration)> {
        if self.server_pid.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let t = self.server_bound.load(Ordering::Relaxed);
        let bound_at = self.connected + Duration::from_micros(t.saturating_sub(1));
        let bound = now.saturating_duration_since(bound_at);
        let age = Duration::from_micros(self.server_age_at_bind.load(Ordering::Relaxed)) + bound;
        Some((age, bound))
    }

    /// Asks the session to close its client now (KILL), and wakes it.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Relaxed);
        self.waker.wake();
    }
}

#[derive(Default)]
pub struct ClientList {
    next: std::sync::atomic::AtomicU64,
    map: Mutex<BTreeMap<u64, Arc<ClientInfo>>>,
}

/// Removes the entry when the session ends (and logs the departure when asked to).
pub struct ClientEntry {
    list: Arc<ClientList>,
    pub info: Arc<ClientInfo>,
    /// `logging.log_disconnections`, set once the session has started.
    pub log_disconnect: bool,
}

impl Drop for ClientEntry {
    fn drop(&mut self) {
        self.list.map.lock().remove(&self.info.id);
        if self.log_disconnect {
            let i = &self.info;
            tracing::info!(
                client = %i.addr,
                user = %i.user,
                database = %i.database,
                application_name = %i.application_name,
                duration_secs = format!("{:.3}", i.connected.elapsed().as_secs_f64()),
                killed = i.killed.load(Ordering::Relaxed),
                "client disconnected"
            );
        }
    }
}

impl ClientList {
    pub fn register(
        self: &Arc<Self>,
        addr: SocketAddr,
        user: Arc<str>,
        database: Arc<str>,
        application_name: &str,
    ) -> ClientEntry {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(ClientInfo {
            id,
            addr,
            user,
            database,
            application_name: application_name.into(),
            connected: Instant::now(),
            state: AtomicU8::new(ClientPhase::Idle as u8),
            server_pid: AtomicI32::new(0),
            pinned: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            wait_since: AtomicU64::new(0),
            server_bound: AtomicU64::new(0),
            server_age_at_bind: AtomicU64::new(0),
            killed: AtomicBool::new(false),
        });
        self.map.lock().insert(id, info.clone());
        ClientEntry {
            list: self.clone(),
            info,
            log_disconnect: false,
        }
    }

    /// Wakes every session (they then look at the lifecycle phase).
    pub fn wake_all(&self) {
        for c in self.all() {
            c.waker.wake();
        }
    }

    /// The longest current wait per (database, user), for pools with a client queued.
    pub fn max_waits(&self) -> BTreeMap<(Arc<str>, Arc<str>), Duration> {
        let now = Instant::now();
        let mut out: BTreeMap<(Arc<str>, Arc<str>), Duration> = BTreeMap::new();
        for c in self.map.lock().values() {
            if let Some(w) = c.waiting_for(now) {
                let e = out.entry((c.database.clone(), c.user.clone())).or_default();
                *e = (*e).max(w);
            }
        }
        out
    }

    pub fn all(&self) -> Vec<Arc<ClientInfo>> {
        self.map.lock().values().cloned().collect()
    }
}

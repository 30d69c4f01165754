//! Who is connected: a small registry for the admin console's SHOW CLIENTS / SERVERS.
//! Sessions update their entry with relaxed atomic stores at state changes only.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use atomic_waker::AtomicWaker;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::limits::CapGuard;

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
    /// Its user and database, and its place under the connection caps: held here, so
    /// the session carries no copy of the names (RSS per idle client).
    place: CapGuard,
    /// Shared by the clients that give the same name (RSS per idle client).
    pub application_name: Arc<str>,
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
    pub fn user(&self) -> &Arc<str> {
        &self.place.user
    }

    pub fn database(&self) -> &Arc<str> {
        &self.place.database
    }

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

    /// Marks the start of a wait for a server connection (`now`: the caller's clock
    /// reading).
    pub fn start_wait(&self, now: Instant) {
        let us = now.saturating_duration_since(self.connected).as_micros() as u64;
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
    /// Application names in use, one copy each: clients of one application (its pool
    /// of workers) nearly always give the same name. Only names of connected clients
    /// stay here, so random names cannot grow it.
    /// foldhash (seeded per process): looked up at every login.
    names: Mutex<HashSet<Arc<str>, foldhash::fast::RandomState>>,
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
        self.list.release_name(&self.info.application_name);
        if self.log_disconnect {
            let i = &self.info;
            tracing::info!(
                client = %i.addr,
                user = %i.user(),
                database = %i.database(),
                application_name = %i.application_name,
                duration_secs = format!("{:.3}", i.connected.elapsed().as_secs_f64()),
                killed = i.killed.load(Ordering::Relaxed),
                "client disconnected"
            );
        }
    }
}

impl ClientList {
    fn intern(&self, name: &str) -> Arc<str> {
        let mut names = self.names.lock();
        if let Some(shared) = names.get(name) {
            return shared.clone();
        }
        // A name whose last client left while the admin console held that client's
        // info stays behind: sweep those now and then (amortized O(1) per login).
        if names.len() >= 1024 && names.len().is_power_of_two() {
            names.retain(|n| Arc::strong_count(n) > 1);
        }
        let shared: Arc<str> = Arc::from(name);
        names.insert(shared.clone());
        shared
    }

    /// A client with this name is leaving: the name goes when no other client has it
    /// (held by the set and by the leaving client's info only).
    fn release_name(&self, name: &Arc<str>) {
        let mut names = self.names.lock();
        if Arc::strong_count(name) <= 2 {
            names.remove(name);
        }
    }

    pub fn register(
        self: &Arc<Self>,
        addr: SocketAddr,
        place: CapGuard,
        application_name: &str,
    ) -> ClientEntry {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(ClientInfo {
            id,
            addr,
            place,
            application_name: self.intern(application_name),
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
                let e = out
                    .entry((c.database().clone(), c.user().clone()))
                    .or_default();
                *e = (*e).max(w);
            }
        }
        out
    }

    pub fn all(&self) -> Vec<Arc<ClientInfo>> {
        self.map.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place() -> CapGuard {
        CapGuard::uncounted("db".into(), "user".into())
    }

    #[test]
    fn clients_share_their_application_name_until_the_last_leaves() {
        let list = Arc::new(ClientList::default());
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let a = list.register(addr, place(), "importer");
        let b = list.register(addr, place(), "importer");
        let c = list.register(addr, place(), "other");
        assert!(Arc::ptr_eq(
            &a.info.application_name,
            &b.info.application_name
        ));
        assert_eq!(list.names.lock().len(), 2);
        drop(c);
        assert_eq!(
            list.names.lock().len(),
            1,
            "a name no client has is dropped"
        );
        drop(a);
        assert_eq!(list.names.lock().len(), 1, "b still has it");
        drop(b);
        assert!(list.names.lock().is_empty());
    }
}

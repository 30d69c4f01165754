//! Who is connected: a small registry for the admin console's SHOW CLIENTS / SERVERS.
//! Sessions update their entry with relaxed atomic stores at state changes only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::Arc;

use atomic_waker::AtomicWaker;
use parking_lot::Mutex;
use tokio::time::Instant;

pub const IDLE: u8 = 0;
pub const WAITING: u8 = 1;
pub const ACTIVE: u8 = 2;

pub struct ClientInfo {
    pub id: u64,
    pub addr: SocketAddr,
    pub user: Arc<str>,
    pub database: Arc<str>,
    pub application_name: Box<str>,
    pub connected: Instant,
    pub state: AtomicU8,
    /// Backend pid of the server this client holds now (0: none).
    pub server_pid: AtomicI32,
    /// Transaction mode: the client holds its server for session state.
    pub pinned: AtomicBool,
    /// The session task's waker, for the drain to wake idle clients (cheaper per
    /// client, and per wake-up, than a cancellation future each).
    pub waker: AtomicWaker,
}

impl ClientInfo {
    pub fn state_name(&self) -> &'static str {
        match self.state.load(Ordering::Relaxed) {
            ACTIVE => "active",
            WAITING => "waiting",
            _ => "idle",
        }
    }
}

#[derive(Default)]
pub struct ClientList {
    next: std::sync::atomic::AtomicU64,
    map: Mutex<BTreeMap<u64, Arc<ClientInfo>>>,
}

/// Removes the entry when the session ends.
pub struct ClientEntry {
    list: Arc<ClientList>,
    pub info: Arc<ClientInfo>,
}

impl Drop for ClientEntry {
    fn drop(&mut self) {
        self.list.map.lock().remove(&self.info.id);
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
            state: AtomicU8::new(IDLE),
            server_pid: AtomicI32::new(0),
            pinned: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        self.map.lock().insert(id, info.clone());
        ClientEntry {
            list: self.clone(),
            info,
        }
    }

    /// Wakes every session (they then look at the lifecycle phase).
    pub fn wake_all(&self) {
        for c in self.all() {
            c.waker.wake();
        }
    }

    pub fn all(&self) -> Vec<Arc<ClientInfo>> {
        self.map.lock().values().cloned().collect()
    }
}

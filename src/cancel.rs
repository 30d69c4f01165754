//! Cancel keys: the proxy gives each client a random key of its own and forwards a valid
//! CancelRequest to the server currently running that client's query, with that server's
//! real key. A server that went back to the pool is no longer reachable through the key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::auth::constant_time_eq;

/// The server a client's query is running on right now.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub host: std::sync::Arc<str>,
    pub port: u16,
    pub pid: i32,
    pub secret: i32,
}

pub struct CancelSlot {
    secret: i32,
    target: Mutex<Option<CancelTarget>>,
    /// Cancels forwarded to the current target and not yet delivered. The server is not
    /// handed to another client until this is 0, so a late signal cannot cancel
    /// someone else's query.
    in_flight: AtomicUsize,
    delivered: Notify,
}

impl CancelSlot {
    pub fn set(&self, target: Option<CancelTarget>) {
        *self.target.lock() = target;
    }

    /// Cancels still on their way to the server this client held.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Waits (bounded) until every forwarded cancel was delivered.
    pub async fn wait_delivered(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.in_flight() > 0 {
            let notified = self.delivered.notified();
            if self.in_flight() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    /// foldhash: a lookup at every login and logout, keys are random pids.
    slots: Mutex<HashMap<i32, Arc<CancelSlot>, foldhash::fast::RandomState>>,
}

/// Removes the client's key when its session ends.
pub struct CancelGuard {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.registry.slots.lock().remove(&self.pid);
    }
}

impl CancelRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(CancelRegistry::default())
    }

    /// Mints a random (pid, secret) pair unique among live clients.
    pub fn register(self: &Arc<Self>) -> CancelGuard {
        let mut slots = self.slots.lock();
        loop {
            // Positive pids look like real backend pids to clients that print them.
            let pid = (rand::random::<u32>() >> 1) as i32;
            if pid == 0 || slots.contains_key(&pid) {
                continue;
            }
            let secret = rand::random::<i32>();
            let slot = Arc::new(CancelSlot {
                secret,
                target: Mutex::new(None),
                in_flight: AtomicUsize::new(0),
                delivered: Notify::new(),
            });
            slots.insert(pid, slot.clone());
            return CancelGuard {
                registry: self.clone(),
                pid,
                secret,
                slot,
            };
        }
    }

    /// Gives the client the server's real backend pid as its key's pid (session mode,
    /// where one server serves the whole session: `pg_terminate_backend(pid)` and a
    /// NOTIFY's sender pid then mean what they mean on PostgreSQL). The secret stays
    /// the proxy's own random one, so knowing the pid alone cannot cancel. False (the
    /// key is left as it was) when another live client already holds that pid, as
    /// servers on different upstream hosts can share one.
    pub fn rekey(&self, guard: &mut CancelGuard, pid: i32) -> bool {
        if pid == guard.pid {
            return true;
        }
        let mut slots = self.slots.lock();
        if pid == 0 || slots.contains_key(&pid) {
            return false;
        }
        slots.remove(&guard.pid);
        slots.insert(pid, guard.slot.clone());
        guard.pid = pid;
        true
    }

    /// Forwards a cancel if the key matches a client with a query in flight, and returns
    /// once PostgreSQL has delivered it (it closes the cancel connection after signalling
    /// the backend), so the requester may close its own cancel connection only then, as
    /// libpq expects. A wrong key does nothing and reveals nothing.
    pub async fn cancel(&self, pid: i32, secret: &[u8]) -> bool {
        let (slot, target) = {
            let slots = self.slots.lock();
            let Some(slot) = slots.get(&pid) else {
                return false;
            };
            if !constant_time_eq(&slot.secret.to_be_bytes(), secret) {
                return false;
            }
            // Counted under the target lock: a session that clears the target afterwards
            // is sure to see this cancel in flight.
            let guard = slot.target.lock();
            let t = guard.clone();
            if t.is_some() {
                slot.in_flight.fetch_add(1, Ordering::AcqRel);
            }
            drop(guard);
            (slot.clone(), t)
        };
        let Some(t) = target else {
            return false;
        };
        let ok = send_cancel(&t).await;
        slot.in_flight.fetch_sub(1, Ordering::AcqRel);
        slot.delivered.notify_waiters();
        ok
    }
}

/// Sends PostgreSQL's CancelRequest for `t` over a new plain TCP connection (PostgreSQL
/// reads cancel requests before any TLS or pg_hba check, as libpq's PQcancel relies on).
pub async fn send_cancel(t: &CancelTarget) -> bool {
    {
        let send = async {
            let mut s = TcpStream::connect((&*t.host, t.port)).await?;
            let mut buf = BytesMut::new();
            postgres_protocol::message::frontend::cancel_request(t.pid, t.secret, &mut buf);
            s.write_all(&buf).await?;
            // PostgreSQL closes the connection once the backend has been signalled.
            let mut sink = [0u8; 64];
            while s.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        };
        // The cancel path has its own deadline so a hung upstream cannot pin tasks.
        matches!(
            tokio::time::timeout(Duration::from_secs(5), send).await,
            Ok(Ok(()))
        )
    }
}

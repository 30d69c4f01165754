//! Cancel keys: the proxy gives each client a random key of its own and forwards a valid
//! CancelRequest to the server currently running that client's query, with that server's
//! real key. A server that went back to the pool is no longer reachable through the key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::auth::constant_time_eq;

/// The server a client's query is running on right now.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub host: String,
    pub port: u16,
    pub pid: i32,
    pub secret: i32,
}

pub struct CancelSlot {
    secret: i32,
    target: Mutex<Option<CancelTarget>>,
}

impl CancelSlot {
    pub fn set(&self, target: Option<CancelTarget>) {
        *self.target.lock() = target;
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<i32, Arc<CancelSlot>>>,
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

    /// Forwards a cancel if the key matches a client with a query in flight. A wrong key
    /// does nothing and, as in PostgreSQL, the requester learns nothing either way.
    pub async fn cancel(&self, pid: i32, secret: &[u8]) -> bool {
        let target = {
            let slots = self.slots.lock();
            let Some(slot) = slots.get(&pid) else {
                return false;
            };
            if !constant_time_eq(&slot.secret.to_be_bytes(), secret) {
                return false;
            }
            let t = slot.target.lock().clone();
            t
        };
        let Some(t) = target else {
            return false;
        };
        send_cancel(&t).await
    }
}

/// Sends PostgreSQL's CancelRequest for `t` over a new plain TCP connection (PostgreSQL
/// reads cancel requests before any TLS or pg_hba check, as libpq's PQcancel relies on).
pub async fn send_cancel(t: &CancelTarget) -> bool {
    {
        let send = async {
            let mut s = TcpStream::connect((t.host.as_str(), t.port)).await?;
            let mut buf = BytesMut::new();
            postgres_protocol::message::frontend::cancel_request(t.pid, t.secret, &mut buf);
            s.write_all(&buf).await?;
            s.shutdown().await?;
            Ok::<_, std::io::Error>(())
        };
        // The cancel path has its own deadline so a hung upstream cannot pin tasks.
        matches!(
            tokio::time::timeout(Duration::from_secs(5), send).await,
            Ok(Ok(()))
        )
    }
}

//! Per-database and per-user client caps (`limits.max_db_client_connections`,
//! `limits.max_user_client_connections`).
//!
//! A client is counted once it has authenticated, so unauthenticated connections cannot
//! use up a user's quota, and uncounted when its session ends however it ends (a login
//! that then fails upstream included), through [`CapGuard`]'s drop.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::LimitsConfig;
use crate::error::{sqlstate, ClientError};

#[derive(Default)]
pub struct ClientCaps {
    /// (per database, per user). One lock so check-and-count is atomic for both.
    /// Keys are shared with the guards (and the client list): no allocation per client.
    counts: Mutex<(Counts, Counts)>,
}

/// Clients per name; the keys are shared with the guards. Hashed at every login and
/// logout: foldhash (seeded per process) costs a fraction of SipHash.
type Counts = HashMap<Arc<str>, usize, foldhash::fast::RandomState>;

/// Holds one client's place under the caps (none for an uncounted one).
pub struct CapGuard {
    caps: Option<Arc<ClientCaps>>,
    pub database: Arc<str>,
    pub user: Arc<str>,
}

impl CapGuard {
    /// The names of a client the caps do not count (the admin console's).
    pub fn uncounted(database: Arc<str>, user: Arc<str>) -> CapGuard {
        CapGuard {
            caps: None,
            database,
            user,
        }
    }
}

impl Drop for CapGuard {
    fn drop(&mut self) {
        let Some(caps) = &self.caps else {
            return;
        };
        let mut c = caps.counts.lock();
        let (dbs, users) = &mut *c;
        decrement(dbs, &self.database);
        decrement(users, &self.user);
    }
}

fn decrement(map: &mut Counts, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            // Entries exist only for connected clients, so random names cannot grow it.
            map.remove(key);
        }
    }
}

impl ClientCaps {
    /// Counts a logged-in client, or refuses it with FATAL 53300 as PostgreSQL does
    /// (`too many connections for database/role`).
    pub fn admit(
        self: &Arc<Self>,
        database: &str,
        user: &str,
        limits: &LimitsConfig,
    ) -> Result<CapGuard, ClientError> {
        let mut c = self.counts.lock();
        let (dbs, users) = &mut *c;
        let db_now = dbs.get(database).copied().unwrap_or(0);
        let user_now = users.get(user).copied().unwrap_or(0);
        if let Some(max) = limits.max_db_client_connections {
            if db_now >= max {
                return Err(ClientError::fatal(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    format!("too many connections for database \"{database}\" (limits.max_db_client_connections = {max})"),
                ));
            }
        }
        if let Some(max) = limits.max_user_client_connections {
            if user_now >= max {
                return Err(ClientError::fatal(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    format!("too many connections for role \"{user}\" (limits.max_user_client_connections = {max})"),
                ));
            }
        }
        let database = count_in(dbs, database);
        let user = count_in(users, user);
        Ok(CapGuard {
            caps: Some(self.clone()),
            database,
            user,
        })
    }

    /// Clients counted now for a database and a user (for tests and the admin views).
    pub fn counts(&self, database: &str, user: &str) -> (usize, usize) {
        let c = self.counts.lock();
        (
            c.0.get(database).copied().unwrap_or(0),
            c.1.get(user).copied().unwrap_or(0),
        )
    }
}

/// Adds one to `key`'s count and returns the map's shared copy of the key.
fn count_in(map: &mut Counts, key: &str) -> Arc<str> {
    if let Some((k, n)) = map.get_key_value(key) {
        let (k, n) = (k.clone(), *n);
        map.insert(k.clone(), n + 1);
        return k;
    }
    let k: Arc<str> = key.into();
    map.insert(k.clone(), 1);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_and_release() {
        let caps = Arc::new(ClientCaps::default());
        let limits = LimitsConfig {
            max_db_client_connections: Some(2),
            max_user_client_connections: Some(1),
            ..LimitsConfig::default()
        };
        let a = caps.admit("db", "u1", &limits).expect("first");
        let e = caps.admit("db", "u1", &limits).err().expect("user cap");
        assert_eq!(e.code, "53300");
        assert!(e.message.contains("role \"u1\""));
        let b = caps.admit("db", "u2", &limits).expect("second user");
        let e = caps.admit("db", "u3", &limits).err().expect("db cap");
        assert!(e.message.contains("database \"db\""));
        assert_eq!(caps.counts("db", "u1"), (2, 1));
        drop(a);
        drop(b);
        assert_eq!(caps.counts("db", "u1"), (0, 0));
        assert!(caps.counts.lock().0.is_empty(), "no entries left behind");
    }
}

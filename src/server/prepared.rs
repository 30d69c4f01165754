//! Named prepared statements in transaction mode.
//!
//! Each distinct statement (query text + parameter types) gets a proxy-wide server-side
//! name derived from its content, so any client's statement can be prepared on any server
//! and shared by every client that prepared the same text. Each server connection keeps a
//! bounded LRU set of the statements it holds.
//!
//! A statement PostgreSQL prepared can outlive what it refers to: its parameter types
//! are fixed at Parse, so after the type it names is dropped (or created in a
//! transaction that rolled back) and made again, Bind fails with "cache lookup failed
//! for type". A client sees this never directly (psycopg, for one, deallocates its
//! statements after a ROLLBACK or a DROP), so the proxy does not reuse such statements:
//! those parsed in a transaction that rolled back are closed on that server, and after
//! any DROP every server closes and re-parses what it holds at its next use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

pub type StmtId = u128;

/// Statement ids are SHA-256 digests already, so hashing them again (SipHash) only costs:
/// it was a tenth of the proxy's work per statement in a pipeline of named Binds. A
/// client that grinds texts into one bucket slows only a map bounded by
/// `max_prepared_statements`.
#[derive(Default)]
struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64 ^ (n >> 64) as u64;
    }
}

type DigestMap<V> = HashMap<StmtId, V, std::hash::BuildHasherDefault<DigestHasher>>;

/// A statement as a client defined it, under the name servers know it by.
#[derive(Debug)]
pub struct StmtDef {
    pub id: StmtId,
    pub server_name: Box<[u8]>,
    pub query: Bytes,
    pub param_types: Bytes,
}

impl StmtDef {
    pub fn new(query: &[u8], param_types: &[u8]) -> Arc<StmtDef> {
        // A cryptographic digest: a client must not be able to craft a collision that
        // would run its text under another client's statement name.
        let mut h = Sha256::new();
        h.update((param_types.len() as u32).to_be_bytes());
        h.update(param_types);
        h.update(query);
        let digest = h.finalize();
        let mut id_bytes = [0u8; 16];
        id_bytes.copy_from_slice(&digest[..16]);
        let id = u128::from_be_bytes(id_bytes);
        Arc::new(StmtDef {
            id,
            server_name: server_name(id),
            query: Bytes::copy_from_slice(query),
            param_types: Bytes::copy_from_slice(param_types),
        })
    }
}

/// The name a statement has on servers: `pgsc_` and 32 hex digits (under NAMEDATALEN).
pub fn server_name(id: StmtId) -> Box<[u8]> {
    format!("pgsc_{id:032x}").into_bytes().into_boxed_slice()
}

/// Counts DROP commands seen on any server (proxy-wide: a committed DROP reaches every
/// server's statements). A cache from an older count re-parses what it holds.
static DROPS: AtomicU64 = AtomicU64::new(0);

/// The statements one server connection holds, bounded, least recently used evicted.
#[derive(Debug)]
pub struct PreparedCache {
    capacity: usize,
    tick: u64,
    used: DigestMap<u64>,
    /// Parsed since the server was last idle: a ROLLBACK makes them suspect.
    fresh: Vec<StmtId>,
    /// Still prepared on the server but not to be used again: Closed before the next
    /// statement is looked up.
    to_close: Vec<StmtId>,
    /// `DROPS` when `used` was last known good.
    drops: u64,
    /// A DROP ran in the server's current transaction: counted again when it ends
    /// (its commit), so a server that re-parsed in between re-parses once more.
    drop_pending: bool,
}

impl PreparedCache {
    pub fn new(capacity: usize) -> Self {
        PreparedCache {
            capacity: capacity.max(1),
            tick: 0,
            used: DigestMap::default(),
            fresh: Vec::new(),
            to_close: Vec::new(),
            drops: DROPS.load(Ordering::Acquire),
            drop_pending: false,
        }
    }

    /// Whether the server holds `id` (and may use it); marks it as recently used.
    pub fn touch(&mut self, id: StmtId) -> bool {
        let drops = DROPS.load(Ordering::Acquire);
        if drops != self.drops {
            self.drops = drops;
            self.to_close.extend(self.used.drain().map(|(id, _)| id));
            self.fresh.clear();
        }
        self.tick += 1;
        match self.used.get_mut(&id) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records `id` as prepared; returns the statement evicted to make room, which the
    /// caller must Close on the server.
    pub fn insert(&mut self, id: StmtId) -> Option<StmtId> {
        self.tick += 1;
        let mut evicted = None;
        if !self.used.contains_key(&id) && self.used.len() >= self.capacity {
            // Linear scan: the cache is small and eviction is rare next to lookups.
            if let Some((&old, _)) = self.used.iter().min_by_key(|(_, &t)| t) {
                self.used.remove(&old);
                evicted = Some(old);
            }
        }
        self.used.insert(id, self.tick);
        self.fresh.push(id);
        if self.fresh.len() > 4 * self.capacity {
            // A long transaction of many distinct statements: only held ones matter.
            let used = &self.used;
            self.fresh.retain(|id| used.contains_key(id));
        }
        evicted
    }

    pub fn remove(&mut self, id: StmtId) {
        self.used.remove(&id);
    }

    /// The server emptied itself (DISCARD ALL, DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.used.clear();
        self.fresh.clear();
        self.to_close.clear();
    }

    /// The server said ROLLBACK (also a failed COMMIT's, and ROLLBACK TO SAVEPOINT): the
    /// statements parsed in its transaction may name objects that are gone.
    pub fn rolled_back(&mut self) {
        for id in self.fresh.drain(..) {
            if self.used.remove(&id).is_some() {
                self.to_close.push(id);
            }
        }
    }

    /// The server ran a DROP: every server's statements are suspect.
    pub fn dropped(&mut self) {
        DROPS.fetch_add(1, Ordering::AcqRel);
        self.drop_pending = true;
    }

    /// The server is idle (ReadyForQuery 'I'): its transaction's statements stay.
    pub fn settled(&mut self) {
        self.fresh.clear();
        if std::mem::take(&mut self.drop_pending) {
            DROPS.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Statements to Close on the server before it is used again.
    pub fn take_to_close(&mut self) -> Vec<StmtId> {
        std::mem::take(&mut self.to_close)
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_same_name_different_types_different_name() {
        let a = StmtDef::new(b"select $1", &[0, 1, 0, 0, 0, 23]);
        let b = StmtDef::new(b"select $1", &[0, 1, 0, 0, 0, 23]);
        let c = StmtDef::new(b"select $1", &[0, 1, 0, 0, 0, 25]);
        assert_eq!(a.server_name, b.server_name);
        assert_ne!(a.server_name, c.server_name);
        assert!(a.server_name.len() < 64);
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut c = PreparedCache::new(2);
        assert_eq!(c.insert(1), None);
        assert_eq!(c.insert(2), None);
        assert!(c.touch(1));
        assert_eq!(c.insert(3), Some(2));
        assert!(c.touch(1) && c.touch(3) && !c.touch(2));
    }

    #[test]
    fn statements_of_a_rolled_back_transaction_are_closed_and_reparsed() {
        let mut c = PreparedCache::new(8);
        c.insert(1);
        c.settled();
        c.insert(2);
        c.rolled_back();
        c.settled();
        assert!(c.touch(1), "committed before the transaction: kept");
        assert!(
            !c.touch(2),
            "parsed in the rolled-back transaction: parsed again"
        );
        assert_eq!(c.take_to_close(), vec![2]);
        assert!(c.take_to_close().is_empty());
    }
}

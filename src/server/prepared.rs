//! Named prepared statements in transaction mode.
//!
//! Each distinct statement (query text + parameter types) gets a proxy-wide server-side
//! name derived from its content, so any client's statement can be prepared on any server
//! and shared by every client that prepared the same text. Each server connection keeps a
//! bounded LRU set of the statements it holds.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

pub type StmtId = u128;

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

/// The statements one server connection holds, bounded, least recently used evicted.
#[derive(Debug)]
pub struct PreparedCache {
    capacity: usize,
    tick: u64,
    used: HashMap<StmtId, u64>,
}

impl PreparedCache {
    pub fn new(capacity: usize) -> Self {
        PreparedCache {
            capacity: capacity.max(1),
            tick: 0,
            used: HashMap::new(),
        }
    }

    /// Whether the server holds `id`; marks it as recently used.
    pub fn touch(&mut self, id: StmtId) -> bool {
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
        evicted
    }

    pub fn remove(&mut self, id: StmtId) {
        self.used.remove(&id);
    }

    pub fn clear(&mut self) {
        self.used.clear();
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
}

//! Named prepared statements in transaction mode: a client's Parse, Bind, Describe and
//! Close name its own statements, which the proxy maps to content-named statements on
//! whichever server the client has now, preparing them there first when needed.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::frontend::malformed;
use super::pinning::Verdict;
use super::relay::BodyMode;
use super::tracker::{synthetic_close_complete, synthetic_parse_complete, Req};
use super::{ReadReady, Session};
use crate::error::{sqlstate, ClientError};
use crate::protocol::framing::Header;
use crate::protocol::messages;
use crate::server::prepared::{server_name, StmtDef};

/// A client's named statements: allocated on first use, so clients that never name one
/// (simple query, unnamed statements) carry a pointer instead of an empty map.
#[derive(Default)]
pub(super) struct ClientStmts(Option<Box<StmtMap>>);

/// Keyed by client-chosen names: foldhash's seeded hash, random per process, is fast
/// and not predictable from outside.
type StmtMap = HashMap<Box<[u8]>, Arc<StmtDef>, foldhash::fast::RandomState>;

impl ClientStmts {
    pub(super) fn map_mut(&mut self) -> &mut StmtMap {
        self.0.get_or_insert_with(Default::default)
    }
    pub(super) fn get(&self, name: &[u8]) -> Option<&Arc<StmtDef>> {
        self.0.as_ref()?.get(name)
    }
    pub(super) fn contains_key(&self, name: &[u8]) -> bool {
        self.get(name).is_some()
    }
    pub(super) fn insert(&mut self, name: Box<[u8]>, def: Arc<StmtDef>) {
        self.map_mut().insert(name, def);
    }
    pub(super) fn remove(&mut self, name: &[u8]) -> Option<Arc<StmtDef>> {
        self.0.as_mut()?.remove(name)
    }
    pub(super) fn clear(&mut self) {
        self.0 = None;
    }
}

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    /// Makes sure the bound server holds `def`, injecting a Parse (and a Close for an
    /// evicted statement) ahead of the current message.
    pub(super) fn ensure_prepared(&mut self, def: &Arc<StmtDef>) {
        self.prepare_on_server(def, None);
    }

    /// Queues a Parse of `def` on the bound server unless it already holds it (then
    /// returns false). `client_name` is set when this answers the client's own Parse;
    /// otherwise the Parse is the proxy's and its ParseComplete is swallowed. A statement
    /// evicted to make room is closed on the server first.
    pub(super) fn prepare_on_server(
        &mut self,
        def: &Arc<StmtDef>,
        client_name: Option<Box<[u8]>>,
    ) -> bool {
        let Some(lease) = self.server.as_mut() else {
            return false;
        };
        let conn = lease.conn();
        let m = &self.shared.metrics;
        let hit = conn.prepared.touch(def.id);
        // Statements that may name dropped objects (see `server/prepared.rs`) go first.
        let mut closes = conn.prepared.take_to_close();
        if hit {
            m.prepared_hit.inc();
        } else {
            m.prepared_miss.inc();
            if let Some(old) = conn.prepared.insert(def.id) {
                m.prepared_eviction.inc();
                closes.push(old);
            }
        }
        for old in closes {
            let mut close = BytesMut::new();
            messages::fe_close_statement(&mut close, &server_name(old));
            self.c_in.push_own_buf(close);
            self.push(Req::Close { injected: true });
        }
        if hit {
            return false;
        }
        let mut parse = BytesMut::new();
        messages::fe_parse(&mut parse, &def.server_name, &def.query, &def.param_types);
        self.c_in.push_own_buf(parse);
        let injected = client_name.is_none();
        self.push(Req::Parse {
            stmt: Some(def.id),
            client_name,
            injected,
        });
        true
    }

    pub(super) fn parse_named(&mut self, h: Header) -> Result<(), ClientError> {
        let (name, def, noted) = {
            let p = messages::parse_parse(self.frame(h)).ok_or_else(|| malformed("Parse"))?;
            let noted = self.sql_to_note(p.query);
            let name: Box<[u8]> = p.name.into();
            let def = if name.is_empty() || self.stmts.contains_key(&name) {
                None
            } else {
                Some(StmtDef::new(p.query, p.param_types))
            };
            (name, def, noted)
        };
        if let Some(sql) = noted {
            if let Verdict::Reject(err) = self.note_sql(&sql, Some(&name)) {
                // As PostgreSQL refusing a Parse: the batch is skipped up to Sync.
                self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
                self.skip_until_sync = true;
                self.push(Req::Synthetic(err.to_bytes()));
                return Ok(());
            }
        }
        if name.is_empty() {
            self.push(Req::Parse {
                stmt: None,
                client_name: None,
                injected: false,
            });
            self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            return Ok(());
        }
        let Some(def) = def else {
            // As PostgreSQL: the name is taken in this client's namespace.
            let err = ClientError::error(
                sqlstate::DUPLICATE_PREPARED_STATEMENT,
                format!(
                    "prepared statement \"{}\" already exists",
                    String::from_utf8_lossy(&name)
                ),
            );
            self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
            self.skip_until_sync = true;
            self.push(Req::Synthetic(err.to_bytes()));
            return Ok(());
        };
        self.stmts.insert(name.clone(), def.clone());
        self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
        if !self.prepare_on_server(&def, Some(name)) {
            // The server already holds it: answer in PostgreSQL's place.
            self.push(synthetic_parse_complete());
        }
        Ok(())
    }

    pub(super) fn bind_named(&mut self, h: Header) -> Result<(), ClientError> {
        let body = self.frame(h);
        let (_, stmt, _) = messages::parse_bind(body).ok_or_else(|| malformed("Bind"))?;
        let def = if stmt.is_empty() {
            None
        } else {
            self.stmts.get(stmt).cloned()
        };
        if self.pin.is_some() && !stmt.is_empty() {
            let stmt = stmt.to_vec();
            self.note_bind(&stmt);
        }
        let Some(def) = def else {
            // Unnamed, or unknown to this client: PostgreSQL answers (26000 for unknown).
            self.push(Req::Bind);
            self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            return Ok(());
        };
        self.ensure_prepared(&def);
        let mut out = BytesMut::with_capacity(h.frame_len() + 48);
        {
            let body = self.frame(h);
            let (portal, _, rest) = messages::parse_bind(body).ok_or_else(|| malformed("Bind"))?;
            messages::rebuild_bind(&mut out, body, portal, &def.server_name, rest);
        }
        self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
        self.c_in.push_own_buf(out);
        self.push(Req::Bind);
        Ok(())
    }

    pub(super) fn describe_named(&mut self, h: Header) -> Result<(), ClientError> {
        let body = self.frame(h);
        let (kind, name) = messages::parse_target(body).ok_or_else(|| malformed("Describe"))?;
        let def = if kind == b'S' && !name.is_empty() {
            self.stmts.get(name).cloned()
        } else {
            None
        };
        let Some(def) = def else {
            self.push(Req::DescribeStatement);
            self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            return Ok(());
        };
        self.ensure_prepared(&def);
        let mut out = BytesMut::new();
        messages::rebuild_describe_statement(&mut out, &def.server_name);
        self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
        self.c_in.push_own_buf(out);
        self.push(Req::DescribeStatement);
        Ok(())
    }

    pub(super) fn close_named(&mut self, h: Header) -> Result<(), ClientError> {
        let body = self.frame(h);
        let (kind, name) = messages::parse_target(body).ok_or_else(|| malformed("Close"))?;
        if kind == b'S' && !name.is_empty() {
            // Only this client's name goes; the server keeps the statement for others.
            let name: Box<[u8]> = name.into();
            self.stmts.remove(&name);
            self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
            self.push(synthetic_close_complete());
            return Ok(());
        }
        self.push(Req::Close { injected: false });
        self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
        Ok(())
    }
}

/// `DEALLOCATE [PREPARE] name|ALL` as one statement: Some(None) for ALL, Some(Some(name))
/// for a name (unquoted names fold to lower case, as PostgreSQL does).
pub(super) fn deallocate_target(text: &[u8]) -> Option<Option<String>> {
    let text = std::str::from_utf8(text).ok()?;
    let text = text.trim().trim_end_matches(';').trim_end();
    if text.contains(';') {
        return None;
    }
    let mut words = text.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("deallocate") {
        return None;
    }
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case("prepare") {
        name = words.next()?;
    }
    if words.next().is_some() {
        return None;
    }
    if name.eq_ignore_ascii_case("all") {
        return Some(None);
    }
    match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) if !quoted.contains('"') => Some(Some(quoted.to_string())),
        Some(_) => None,
        None => Some(Some(name.to_ascii_lowercase())),
    }
}

#[cfg(test)]
mod tests {
    use super::deallocate_target;

    #[test]
    fn deallocate_forms() {
        assert_eq!(
            deallocate_target(b"DEALLOCATE _pg3_0"),
            Some(Some("_pg3_0".into()))
        );
        assert_eq!(
            deallocate_target(b"deallocate prepare S1;"),
            Some(Some("s1".into()))
        );
        assert_eq!(
            deallocate_target(b"DEALLOCATE \"S1\""),
            Some(Some("S1".into()))
        );
        assert_eq!(deallocate_target(b"DEALLOCATE ALL"), Some(None));
        assert_eq!(deallocate_target(b"DEALLOCATE a; SELECT 1"), None);
        assert_eq!(deallocate_target(b"DEALLOCATE"), None);
    }
}

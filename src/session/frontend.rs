//! Client messages: which ones need a server, what each one owes in answers, and the
//! rewriting of named prepared statements in transaction mode.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::pinning::Verdict;
use super::relay::BodyMode;
use super::tracker::{synthetic_close_complete, synthetic_parse_complete, Req};
use super::{ReadReady, Session, Step};
use crate::config::PoolMode;
use crate::error::{sqlstate, ClientError};
use crate::protocol::framing::{fe, Header};
use crate::protocol::messages;
use crate::server::prepared::{server_name, StmtDef};

pub(super) enum Outcome {
    Continue,
    NeedMore,
    Stop(Step),
}

fn malformed(what: &str) -> ClientError {
    ClientError::fatal(
        sqlstate::PROTOCOL_VIOLATION,
        format!("pgsidecar: malformed {what} message"),
    )
}

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    /// Handles the client message whose header is at the front of the unscanned input.
    pub(super) fn on_client_message(&mut self, h: Header) -> Result<Outcome, ClientError> {
        let txn = self.mode == PoolMode::Transaction;
        let avail = self.c_in.unscanned().len();
        let whole = avail >= h.frame_len();

        if h.tag == fe::TERMINATE {
            return Ok(Outcome::Stop(Step::ClientGone));
        }
        if h.tag == fe::PASSWORD {
            return Err(ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "pgsidecar: unexpected password message after authentication",
            ));
        }
        if self.server.is_none() {
            return Ok(self.without_server(h));
        }
        if self.skip_until_sync {
            if h.tag == fe::SYNC {
                self.skip_until_sync = false;
            } else {
                self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
                return Ok(Outcome::Continue);
            }
        }
        // Messages whose body must be read: names to rewrite in transaction mode.
        let inspect = txn
            && matches!(
                h.tag,
                fe::PARSE | fe::BIND | fe::DESCRIBE | fe::CLOSE | fe::QUERY
            );
        if inspect && !whole {
            self.c_in.need = h.frame_len();
            return Ok(Outcome::NeedMore);
        }
        self.c_in.need = 0;
        self.stats.msgs_c2s += 1;
        self.stats.bytes_c2s += h.frame_len() as u64;
        match h.tag {
            fe::QUERY | fe::FUNCTION_CALL => {
                if inspect && h.tag == fe::QUERY {
                    if let Some(sql) = self.sql_to_note(self.query_text(h)) {
                        if let Verdict::Reject(err) = self.note_sql(&sql, None) {
                            self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
                            self.push(Req::LocalError(err.to_bytes()));
                            return Ok(self.released_if_idle());
                        }
                    }
                    if let Some(tag) = self.inspect_query(h) {
                        // Answered by the proxy (DEALLOCATE of proxy-named statements).
                        self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
                        self.push(Req::LocalCommand(tag));
                        return Ok(self.released_if_idle());
                    }
                }
                self.note_request();
                self.push(Req::Query);
                self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            }
            fe::SYNC => {
                // In COPY FROM STDIN mode PostgreSQL ignores Sync: no ReadyForQuery
                // answers it and the batch goes on.
                if !self.tracker.in_copy_in() {
                    self.batch_open = false;
                    self.note_request();
                    self.push(Req::Sync);
                }
                self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            }
            fe::COPY_DONE | fe::COPY_FAIL => {
                if self.tracker.client_copy_end() {
                    self.push(Req::CopyEnd);
                }
                self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            }
            fe::EXECUTE => {
                self.batch_open = true;
                self.push(Req::Execute);
                self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            }
            fe::PARSE if inspect => {
                self.batch_open = true;
                self.parse_named(h)?;
            }
            fe::BIND if inspect => {
                self.batch_open = true;
                self.bind_named(h)?;
            }
            fe::DESCRIBE if inspect => {
                self.batch_open = true;
                self.describe_named(h)?;
            }
            fe::CLOSE if inspect => {
                self.batch_open = true;
                self.close_named(h)?;
            }
            fe::PARSE => {
                self.batch_open = true;
                self.push(Req::Parse {
                    stmt: None,
                    client_name: None,
                    injected: false,
                });
                self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            }
            fe::BIND => {
                self.batch_open = true;
                self.push(Req::Bind);
                self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            }
            fe::DESCRIBE => {
                self.batch_open = true;
                self.push(Req::DescribeStatement);
                self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            }
            fe::CLOSE => {
                self.batch_open = true;
                self.push(Req::Close { injected: false });
                self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            }
            // Flush and COPY traffic owe no answer of their own.
            _ => self.c_in.take_frame(h.frame_len(), BodyMode::Forward),
        }
        Ok(Outcome::Continue)
    }

    /// After a query the proxy answered itself: with nothing else in flight the server
    /// is free again.
    fn released_if_idle(&self) -> Outcome {
        if self.tracker.is_empty() && self.tracker.status == b'I' && !self.batch_open {
            Outcome::Stop(Step::Release)
        } else {
            Outcome::Continue
        }
    }

    /// With no server bound: a lone Sync or Flush is answered here; after a failed
    /// checkout the rest of the batch is dropped; anything else needs a server.
    fn without_server(&mut self, h: Header) -> Outcome {
        match h.tag {
            fe::SYNC if self.tracker.is_empty() => {
                self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
                self.local_sync_owed = false;
                self.skip_until_sync = false;
                self.batch_open = false;
                let mut out = BytesMut::with_capacity(6);
                messages::ready_for_query(&mut out, b'I');
                self.s_in.push_own(&out);
                Outcome::Continue
            }
            // COPY traffic with no server bound belongs to a COPY the server already
            // ended with an error (and released): PostgreSQL would ignore it too.
            fe::FLUSH | fe::COPY_DATA | fe::COPY_DONE | fe::COPY_FAIL => {
                self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
                Outcome::Continue
            }
            _ if self.local_sync_owed || self.skip_until_sync => {
                self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
                Outcome::Continue
            }
            fe::QUERY
                if self.mode == PoolMode::Transaction
                    && self.c_in.unscanned().len() >= h.frame_len() =>
            {
                // A DEALLOCATE of this client's statements needs no server at all.
                if let Some(tag) = self.inspect_query(h) {
                    self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
                    let mut out = BytesMut::with_capacity(32);
                    messages::command_complete(&mut out, tag);
                    messages::ready_for_query(&mut out, b'I');
                    self.s_in.push_own(&out);
                    return Outcome::Continue;
                }
                self.checkout_now_or_stop(h)
            }
            _ => self.checkout_now_or_stop(h),
        }
    }

    /// Binds an idle server at once if there is one; otherwise the session must wait.
    fn checkout_now_or_stop(&mut self, h: Header) -> Outcome {
        if let Some(lease) = self.pool.try_checkout() {
            self.attach(lease);
            return Outcome::Continue;
        }
        if self.mode == PoolMode::Transaction && h.tag == fe::PARSE {
            if let Some(outcome) = self.prepare_locally(h) {
                return outcome;
            }
        }
        Outcome::Stop(Step::NeedServer)
    }

    /// A lone `Parse(name)` + `Sync` (libpq's PQprepare) while every server is busy is
    /// answered here and prepared on a server when first used. Waiting for a server
    /// instead would deadlock single-threaded clients (pgbench) that prepare
    /// synchronously while their other connections hold servers in transactions. The
    /// cost: a statement with an error reports it at first use instead.
    fn prepare_locally(&mut self, h: Header) -> Option<Outcome> {
        let avail = self.c_in.unscanned();
        let sync_at = h.frame_len();
        if avail.len() < sync_at + 5
            || avail[sync_at] != fe::SYNC
            || avail[sync_at + 1..sync_at + 5] != [0, 0, 0, 4]
        {
            if avail.len() < sync_at + 5 {
                self.c_in.need = sync_at + 5;
            }
            return None;
        }
        let p = messages::parse_parse(&avail[5..sync_at])?;
        if p.name.is_empty() || self.sql_of_interest(p.query) {
            // Statements that touch session state are seen when a server runs them.
            return None;
        }
        let name: Box<[u8]> = p.name.into();
        let mut out = BytesMut::with_capacity(16);
        match self.stmts.map_mut().entry(name) {
            std::collections::hash_map::Entry::Occupied(e) => ClientError::error(
                sqlstate::DUPLICATE_PREPARED_STATEMENT,
                format!(
                    "prepared statement \"{}\" already exists",
                    String::from_utf8_lossy(e.key())
                ),
            )
            .encode(&mut out),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(StmtDef::new(p.query, p.param_types));
                messages::parse_complete(&mut out);
            }
        }
        messages::ready_for_query(&mut out, b'I');
        self.c_in.take_frame(sync_at + 5, BodyMode::Skip);
        self.c_in.need = 0;
        self.s_in.push_own(&out);
        Some(Outcome::Continue)
    }

    fn push(&mut self, req: Req) {
        self.tracker.push(req, &mut self.emit, &mut self.fx);
        self.apply_effects();
    }

    pub(super) fn frame(&self, h: Header) -> &[u8] {
        &self.c_in.unscanned()[5..h.frame_len()]
    }

    /// DISCARD ALL / DEALLOCATE ALL / RESET ALL change what the proxy tracks.
    /// Returns the command tag when the query is answered by the proxy instead of the
    /// server.
    fn inspect_query(&mut self, h: Header) -> Option<&'static str> {
        let body = self.frame(h);
        let text = body.strip_suffix(b"\0").unwrap_or(body);
        // Cheap filter first, without allocating: only statements whose first word is
        // DISCARD, DEALLOCATE, RESET or SET matter here.
        let start = text
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(text.len());
        if !matches!(text.get(start).map(|b| b | 0x20), Some(b's' | b'r' | b'd')) {
            return None;
        }
        let word_len = text[start..]
            .iter()
            .position(|b| !b.is_ascii_alphabetic())
            .unwrap_or(text.len() - start);
        let word = &text[start..start + word_len];
        if ![&b"set"[..], b"reset", b"discard", b"deallocate"]
            .iter()
            .any(|k| word.eq_ignore_ascii_case(k))
        {
            return None;
        }
        // Rare statements from here on: an owned copy keeps the borrow checker simple.
        let text = text.to_vec();
        let text = &text[..];
        let word = &text[start..start + word_len];
        if let Some(op) = super::setstmt::parse(text) {
            // Reported settings already follow the client through ParameterStatus.
            let reported = self
                .server
                .as_mut()
                .is_some_and(|l| l.conn().original_params.contains_key(&op.name));
            if !reported {
                // note_request() for this Query runs next: it is request number sent + 1.
                self.pending_sets.push((self.requests_sent + 1, op));
            }
            return None;
        }
        if word.eq_ignore_ascii_case(b"deallocate") {
            // Statements prepared through the protocol exist on servers only under the
            // proxy's names: DEALLOCATE of one (psycopg 3 evicts this way with libpq < 17)
            // or of all of them is this client's business and answered here.
            if let Some(target) = deallocate_target(text) {
                match target {
                    // A client that may hold SQL prepared statements has the server
                    // drop them too; its CommandComplete clears the proxy's names.
                    None if self.pin.is_some() => return None,
                    None => {
                        self.stmts.clear();
                        return Some("DEALLOCATE ALL");
                    }
                    Some(name) => {
                        if self.stmts.remove(name.as_bytes()).is_some() {
                            return Some("DEALLOCATE");
                        }
                    }
                }
            }
        }
        let norm: String = String::from_utf8_lossy(&text[..text.len().min(64)])
            .trim()
            .trim_end_matches(';')
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_ascii_uppercase();
        // DISCARD ALL takes effect when the server confirms it (its CommandComplete),
        // see `forget_server_state`; RESET ALL's tag does not tell it from RESET x.
        if norm == "RESET ALL" {
            self.reset_settings();
        }
        None
    }

    /// Makes sure the bound server holds `def`, injecting a Parse (and a Close for an
    /// evicted statement) ahead of the current message.
    fn ensure_prepared(&mut self, def: &Arc<StmtDef>) {
        self.prepare_on_server(def, None);
    }

    /// Queues a Parse of `def` on the bound server unless it already holds it (then
    /// returns false). `client_name` is set when this answers the client's own Parse;
    /// otherwise the Parse is the proxy's and its ParseComplete is swallowed. A statement
    /// evicted to make room is closed on the server first.
    fn prepare_on_server(&mut self, def: &Arc<StmtDef>, client_name: Option<Box<[u8]>>) -> bool {
        let Some(lease) = self.server.as_mut() else {
            return false;
        };
        let conn = lease.conn();
        let counter = |event: &str| {
            self.shared
                .metrics
                .prepared
                .with_label_values(&[event])
                .inc()
        };
        if conn.prepared.touch(def.id) {
            counter("hit");
            return false;
        }
        let evicted = conn.prepared.insert(def.id);
        counter("miss");
        if let Some(old) = evicted {
            counter("eviction");
            let mut close = BytesMut::new();
            messages::fe_close_statement(&mut close, &server_name(old));
            self.c_in.push_own_buf(close);
            self.push(Req::Close { injected: true });
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

    fn parse_named(&mut self, h: Header) -> Result<(), ClientError> {
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

    fn bind_named(&mut self, h: Header) -> Result<(), ClientError> {
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

    fn describe_named(&mut self, h: Header) -> Result<(), ClientError> {
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

    fn close_named(&mut self, h: Header) -> Result<(), ClientError> {
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
fn deallocate_target(text: &[u8]) -> Option<Option<String>> {
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

//! Client messages: which ones need a server and what each one owes in answers. The
//! rewriting of named prepared statements in transaction mode is in `named.rs`.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::pinning::Verdict;
use super::relay::BodyMode;
use super::tracker::{Req, TxnStatus};
use super::{ReadReady, Session, Step};
use crate::config::PoolMode;
use crate::error::{sqlstate, ClientError};
use crate::protocol::framing::{fe, frontend_header, FrameError, Header};
use crate::protocol::messages;
use crate::server::prepared::StmtDef;

pub(super) enum Outcome {
    Continue,
    NeedMore,
    Stop(Step),
}

pub(super) fn malformed(what: &str) -> ClientError {
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
            self.c_in.need = h.frame_len() as u32;
            return Ok(Outcome::NeedMore);
        }
        self.c_in.need = 0;
        self.stats.msgs_c2s += 1;
        self.stats.bytes_c2s += h.frame_len() as u64;
        match h.tag {
            fe::QUERY | fe::FUNCTION_CALL => {
                if let Some(answered) = self.on_query(h, inspect && h.tag == fe::QUERY) {
                    return Ok(answered);
                }
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
            fe::EXECUTE | fe::PARSE | fe::BIND | fe::DESCRIBE | fe::CLOSE => {
                self.batch_open = true;
                self.on_extended(h, inspect)?;
            }
            // Flush and COPY traffic owe no answer of their own.
            _ => self.c_in.take_frame(h.frame_len(), BodyMode::Forward),
        }
        Ok(Outcome::Continue)
    }

    /// A Query (or FunctionCall): in transaction mode its SQL is looked at for session
    /// state and for DEALLOCATE of proxy-named statements, which the proxy answers
    /// itself. `Some` when the proxy answered it.
    fn on_query(&mut self, h: Header, inspect: bool) -> Option<Outcome> {
        if inspect {
            if let Some(sql) = self.sql_to_note(self.query_text(h)) {
                if let Verdict::Reject(err) = self.note_sql(&sql, None) {
                    self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
                    self.push(Req::LocalError(err.to_bytes()));
                    return Some(self.released_if_idle());
                }
            }
            if let Some(tag) = self.inspect_query(h) {
                // Answered by the proxy (DEALLOCATE of proxy-named statements).
                self.c_in.take_frame(h.frame_len(), BodyMode::Skip);
                self.push(Req::LocalCommand(tag));
                return Some(self.released_if_idle());
            }
        }
        self.note_request();
        self.push(Req::Query);
        self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
        None
    }

    /// An extended-protocol message; `inspect`: transaction mode, where statement
    /// names are rewritten.
    fn on_extended(&mut self, h: Header, inspect: bool) -> Result<(), ClientError> {
        match h.tag {
            fe::EXECUTE => {
                self.push(Req::Execute);
                self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            }
            fe::PARSE if inspect => {
                self.parse_named(h)?;
            }
            fe::BIND if inspect => {
                self.bind_named(h)?;
            }
            fe::DESCRIBE if inspect => {
                self.describe_named(h)?;
            }
            fe::CLOSE if inspect => {
                self.close_named(h)?;
            }
            fe::PARSE => {
                self.push(Req::Parse {
                    stmt: None,
                    client_name: None,
                    injected: false,
                });
                self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            }
            fe::BIND => {
                self.push(Req::Bind);
                self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            }
            fe::DESCRIBE => {
                self.push(Req::DescribeStatement);
                self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            }
            fe::CLOSE => {
                self.push(Req::Close { injected: false });
                self.c_in.take_frame(h.frame_len(), BodyMode::Forward);
            }
            _ => {}
        }
        Ok(())
    }

    /// After a query the proxy answered itself: with nothing else in flight the server
    /// is free again.
    fn released_if_idle(&self) -> Outcome {
        if self.tracker.is_empty() && self.tracker.status == TxnStatus::Idle && !self.batch_open {
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
        if let Some(lease) = self.pool.try_checkout(self.stats.now()) {
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
                self.c_in.need = (sync_at + 5) as u32;
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

    pub(super) fn push(&mut self, req: Req) {
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
                self.sql_sets
                    .get_or_insert_with(Box::default)
                    .pending
                    .push((self.requests_sent + 1, op));
            }
            return None;
        }
        if word.eq_ignore_ascii_case(b"deallocate") {
            // Statements prepared through the protocol exist on servers only under the
            // proxy's names: DEALLOCATE of one (psycopg 3 evicts this way with libpq < 17)
            // or of all of them is this client's business and answered here.
            if let Some(target) = super::named::deallocate_target(text) {
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

    /// Classifies client messages; see `frontend.rs`.
    #[inline(always)]
    pub(super) fn scan_client(&mut self) -> Result<(bool, Option<Step>), ClientError> {
        let mut progress = false;
        loop {
            if self.c_in.body_left > 0 {
                let before = self.c_in.scanned;
                self.c_in.continue_body();
                progress |= self.c_in.scanned != before;
                if self.c_in.body_left > 0 {
                    break;
                }
                continue;
            }
            let h = match frontend_header(self.c_in.unscanned(), self.max_message as usize) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Err(frame_error(e)),
            };
            match self.on_client_message(h)? {
                Outcome::Continue => progress = true,
                Outcome::NeedMore => break,
                Outcome::Stop(step) => return Ok((progress, Some(step))),
            }
        }
        Ok((progress, None))
    }
}

fn frame_error(e: FrameError) -> ClientError {
    match e {
        FrameError::TooLong { .. } => {
            ClientError::fatal(sqlstate::PROGRAM_LIMIT_EXCEEDED, format!("pgsidecar: {e}"))
                .with_hint("raise limits.max_message_size if this message is legitimate")
        }
        _ => ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("pgsidecar: {e}")),
    }
}

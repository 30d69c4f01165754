//! What the server owes the client: one entry per request forwarded, matched against the
//! server's responses in order.
//!
//! Knowing which response answers which request lets the proxy release a server only when
//! nothing is in flight, swallow the answers to messages it injected itself (a Parse to
//! prepare a statement on a new server, a SET to carry session parameters), and answer
//! some requests itself (ParseComplete for a statement the server already holds) at
//! exactly the position PostgreSQL would have.

use std::collections::VecDeque;

use bytes::BytesMut;

use crate::protocol::framing::be;
use crate::protocol::messages;
use crate::server::prepared::StmtId;

#[derive(Debug)]
pub enum Req {
    /// Simple Query or FunctionCall: everything up to ReadyForQuery belongs to it.
    Query,
    /// A query the proxy injected (parameter sync, rollback): all of its answers are swallowed.
    Injected,
    Sync,
    Parse {
        /// The server-side statement this Parse creates, if it is a named one we track.
        stmt: Option<StmtId>,
        /// The client's own name for it, to forget on failure.
        client_name: Option<Box<[u8]>>,
        /// Injected by the proxy: its ParseComplete is swallowed.
        injected: bool,
    },
    Bind,
    DescribeStatement,
    DescribePortal,
    Execute,
    Close {
        injected: bool,
    },
    /// Answered by the proxy when it reaches the head of the queue.
    Synthetic(BytesMut),
    /// A simple query the proxy answers itself (SQL DEALLOCATE of a statement that only
    /// exists under the proxy's name): CommandComplete with this tag and ReadyForQuery
    /// carrying the server's current transaction status.
    LocalCommand(&'static str),
    /// A simple query the proxy refused (an encoded ErrorResponse): the error and a
    /// ReadyForQuery with the server's current transaction status (the refusal does not
    /// abort an open transaction).
    LocalError(BytesMut),
    /// The client ended a COPY FROM STDIN (CopyDone/CopyFail) before the server said
    /// the COPY started (CopyInResponse). Marks where the server's copy-in mode will end
    /// in the client's stream; gets no answer of its own.
    CopyEnd,
}

impl Req {
    fn is_extended(&self) -> bool {
        !matches!(self, Req::Query | Req::Injected | Req::Sync)
    }
}

/// Side effects of a server message on proxy state, returned to the session.
///
/// Boxed on first use: only a failed or skipped Parse leaves any, and every idle
/// client's session carries this (RSS per idle client).
#[derive(Debug, Default)]
pub struct Effects(Option<Box<EffectLists>>);

#[derive(Debug, Default)]
pub struct EffectLists {
    /// Statements the server does not hold after all (their Parse failed or was skipped).
    pub unprepared: Vec<StmtId>,
    /// Client statement names to forget (their Parse failed).
    pub forget: Vec<Box<[u8]>>,
}

impl Effects {
    fn lists(&mut self) -> &mut EffectLists {
        self.0.get_or_insert_with(Box::default)
    }

    /// What was gathered since the last take (None: nothing).
    pub fn take(&mut self) -> Option<Box<EffectLists>> {
        self.0.take()
    }

    /// Statements the server does not hold after all (empty when none).
    pub fn unprepared(&self) -> &[StmtId] {
        self.0.as_ref().map_or(&[], |l| &l.unprepared)
    }
}

/// The transaction status a ReadyForQuery carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnStatus {
    /// 'I': not in a transaction block.
    Idle,
    /// 'T': in a transaction block.
    InTransaction,
    /// 'E': in a failed transaction block.
    Failed,
}

impl TxnStatus {
    /// From ReadyForQuery's status byte; an unknown byte counts as in a transaction
    /// (the server is not known to be free).
    pub fn from_byte(b: u8) -> TxnStatus {
        match b {
            b'I' => TxnStatus::Idle,
            b'E' => TxnStatus::Failed,
            _ => TxnStatus::InTransaction,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            TxnStatus::Idle => b'I',
            TxnStatus::InTransaction => b'T',
            TxnStatus::Failed => b'E',
        }
    }
}

#[derive(Debug)]
pub struct Tracker {
    queue: VecDeque<Req>,
    /// The server hit an error in an extended batch and ignores messages until Sync.
    discard_until_sync: bool,
    /// Transaction status from the last ReadyForQuery.
    pub status: TxnStatus,
    /// An injected query failed; the server connection should not be trusted.
    pub injected_failed: bool,
    /// What PostgreSQL said when the injected settings sync failed (boxed: rare).
    pub injected_error: Option<Box<(String, String)>>,
    /// The server is in COPY FROM STDIN mode and the client has not yet sent CopyDone or
    /// CopyFail. PostgreSQL ignores Sync (and Flush) in copy-in mode, so a Sync sent now
    /// gets no ReadyForQuery and must not be tracked.
    copy_in: bool,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            queue: VecDeque::new(),
            discard_until_sync: false,
            status: TxnStatus::Idle,
            injected_failed: false,
            injected_error: None,
            copy_in: false,
        }
    }
}

impl Tracker {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Resets for a new server (nothing may be in flight when a server is attached).
    pub fn reset(&mut self) {
        self.queue.clear();
        self.discard_until_sync = false;
        self.status = TxnStatus::Idle;
        self.injected_failed = false;
        self.injected_error = None;
        self.copy_in = false;
    }

    /// Whether a Sync from the client now would be ignored by the server (copy-in mode).
    pub fn in_copy_in(&self) -> bool {
        self.copy_in
    }

    /// The client sent CopyDone or CopyFail. Returns true if a `Req::CopyEnd` marker must
    /// be pushed: the COPY may still be about to start (its CopyInResponse not seen yet).
    pub fn client_copy_end(&mut self) -> bool {
        if self.copy_in {
            self.copy_in = false;
            return false;
        }
        // Without a Query or Execute in flight no COPY can start: a stray message that
        // the server ignores.
        self.queue
            .iter()
            .any(|r| matches!(r, Req::Query | Req::Execute))
    }

    /// The server sent CopyInResponse for the request at the head: it now reads the
    /// client's stream in copy-in mode, ignoring Syncs, until CopyDone/CopyFail. Syncs
    /// the client sent after the Execute and before ending the copy were tracked as
    /// owing a ReadyForQuery (libpq and tokio-postgres send one right after Execute);
    /// they are dropped here.
    fn enter_copy_in(&mut self) {
        let mut i = 1;
        while i < self.queue.len() {
            match self.queue[i] {
                Req::Sync => {
                    self.queue.remove(i);
                }
                Req::CopyEnd => {
                    // The client already ended the copy; later Syncs are answered.
                    self.queue.remove(i);
                    return;
                }
                _ => i += 1,
            }
        }
        self.copy_in = true;
    }

    /// Records a request sent to the server. Synthetic answers at the head go to `emit`.
    pub fn push(&mut self, req: Req, emit: &mut BytesMut, fx: &mut Effects) {
        if self.discard_until_sync {
            match req {
                Req::Sync | Req::Query | Req::Injected => self.discard_until_sync = false,
                other => {
                    // The server will skip this message, so no answer will come.
                    drop_effects(&other, fx);
                    return;
                }
            }
        }
        self.queue.push_back(req);
        self.emit_synthetic(emit);
    }

    /// Answers the proxy owes at the head of the queue are sent now, in order.
    #[inline]
    fn emit_synthetic(&mut self, emit: &mut BytesMut) {
        // Runs after every message either way; nearly always there is nothing to emit.
        if matches!(
            self.queue.front(),
            Some(Req::Synthetic(_) | Req::LocalCommand(_) | Req::LocalError(_))
        ) {
            self.emit_owed(emit);
        }
    }

    #[inline(never)]
    fn emit_owed(&mut self, emit: &mut BytesMut) {
        while let Some(Req::Synthetic(_) | Req::LocalCommand(_) | Req::LocalError(_)) =
            self.queue.front()
        {
            match self.queue.pop_front() {
                Some(Req::Synthetic(bytes)) => emit.extend_from_slice(&bytes),
                Some(Req::LocalError(bytes)) => {
                    emit.extend_from_slice(&bytes);
                    messages::ready_for_query(emit, self.status.byte());
                }
                Some(Req::LocalCommand(tag)) => {
                    if self.status == TxnStatus::Failed {
                        // As PostgreSQL in a failed transaction block.
                        crate::error::ClientError::error(
                            "25P02",
                            "current transaction is aborted, commands ignored until end of transaction block",
                        )
                        .encode(emit);
                    } else {
                        messages::command_complete(emit, tag);
                    }
                    messages::ready_for_query(emit, self.status.byte());
                }
                _ => {}
            }
        }
    }

    /// Whether the message at the head of a server stream is to be forwarded.
    /// Returns false to swallow it. `body` is present for ReadyForQuery and ErrorResponse.
    pub fn on_server(
        &mut self,
        tag: u8,
        body: &[u8],
        emit: &mut BytesMut,
        fx: &mut Effects,
    ) -> bool {
        let forward = match tag {
            be::READY_FOR_QUERY => {
                if let Some(&s) = body.first() {
                    self.status = TxnStatus::from_byte(s);
                }
                let mut forward = true;
                // Pop through the Sync/Query this answers (robust to a missed entry).
                while let Some(req) = self.queue.pop_front() {
                    match req {
                        Req::Sync | Req::Query => break,
                        Req::Injected => {
                            forward = false;
                            break;
                        }
                        other => drop_effects(&other, fx),
                    }
                }
                // A CopyEnd right after the answered request belongs to a COPY that never
                // started (it failed first): there is no copy-in mode left to end.
                while let Some(Req::CopyEnd) = self.queue.front() {
                    self.queue.pop_front();
                }
                self.discard_until_sync = false;
                forward
            }
            be::COPY_IN_RESPONSE => {
                self.enter_copy_in();
                !self.head_is_injected()
            }
            be::ERROR_RESPONSE => self.on_error(fx, body),
            be::PARSE_COMPLETE => match self.queue.front() {
                Some(Req::Parse { injected, .. }) => {
                    let fwd = !*injected;
                    self.queue.pop_front();
                    fwd
                }
                // Not a Parse/Close we track: forward it (swallowing would hide an answer
                // the client waits for) unless an injected query is at the head.
                _ => !self.head_is_injected(),
            },
            be::CLOSE_COMPLETE => match self.queue.front() {
                Some(Req::Close { injected }) => {
                    let fwd = !*injected;
                    self.queue.pop_front();
                    fwd
                }
                // Not a Parse/Close we track: forward it (swallowing would hide an answer
                // the client waits for) unless an injected query is at the head.
                _ => !self.head_is_injected(),
            },
            be::BIND_COMPLETE => self.pop_if(|r| matches!(r, Req::Bind)),
            be::NO_DATA | be::ROW_DESCRIPTION => {
                self.pop_if(|r| matches!(r, Req::DescribeStatement | Req::DescribePortal))
            }
            be::COMMAND_COMPLETE | be::EMPTY_QUERY_RESPONSE | be::PORTAL_SUSPENDED => {
                self.pop_if(|r| matches!(r, Req::Execute))
            }
            // Async messages and parts of a longer answer belong to whoever is at the head;
            // only an injected query's are swallowed.
            be::NOTIFICATION_RESPONSE => true,
            _ => !self.head_is_injected(),
        };
        self.emit_synthetic(emit);
        forward
    }

    pub fn head_is_injected(&self) -> bool {
        matches!(self.queue.front(), Some(Req::Injected))
    }

    /// Pops the head if it matches; the message is forwarded unless an injected query is
    /// at the head.
    fn pop_if(&mut self, f: impl Fn(&Req) -> bool) -> bool {
        match self.queue.front() {
            Some(Req::Injected) => false,
            Some(r) if f(r) => {
                self.queue.pop_front();
                true
            }
            _ => true,
        }
    }

    fn on_error(&mut self, fx: &mut Effects, body: &[u8]) -> bool {
        // An error ends copy-in mode on the server: Syncs it reads from now on count.
        self.copy_in = false;
        match self.queue.front() {
            Some(Req::Injected) => {
                self.injected_failed = true;
                if self.injected_error.is_none() {
                    let (code, msg, _) = crate::protocol::messages::error_fields(body);
                    self.injected_error = Some(Box::new((
                        code.unwrap_or_default(),
                        msg.unwrap_or_default(),
                    )));
                }
                false
            }
            Some(r) if r.is_extended() => {
                // PostgreSQL skips everything up to the next Sync after an error in an
                // extended batch: no other answer will come for those entries.
                // An injected Parse failing is reported too: the client's own Bind would
                // have failed the same way on a server without the statement.
                while let Some(r) = self.queue.front() {
                    if matches!(r, Req::Sync | Req::Query | Req::Injected) {
                        break;
                    }
                    if let Some(r) = self.queue.pop_front() {
                        drop_effects(&r, fx);
                    }
                }
                if !matches!(self.queue.front(), Some(Req::Sync)) {
                    self.discard_until_sync = true;
                }
                true
            }
            _ => true,
        }
    }
}

/// What an entry that will get no answer leaves behind.
fn drop_effects(r: &Req, fx: &mut Effects) {
    if let Req::Parse {
        stmt, client_name, ..
    } = r
    {
        if let Some(id) = stmt {
            fx.lists().unprepared.push(*id);
        }
        if let Some(n) = client_name {
            fx.lists().forget.push(n.clone());
        }
    }
}

/// A synthetic ParseComplete.
pub fn synthetic_parse_complete() -> Req {
    let mut b = BytesMut::with_capacity(5);
    messages::parse_complete(&mut b);
    Req::Synthetic(b)
}

/// A synthetic CloseComplete.
pub fn synthetic_close_complete() -> Req {
    let mut b = BytesMut::with_capacity(5);
    messages::close_complete(&mut b);
    Req::Synthetic(b)
}

#[cfg(test)]
#[path = "tracker_tests.rs"]
mod tests;

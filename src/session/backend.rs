//! The server side of the relay: classifies what the server sends (forwarded, swallowed
//! or answered in the client's place) and times requests as their answers come back.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::relay::BodyMode;
use super::tracker::TxnStatus;
use crate::config::PoolMode;
use crate::protocol::messages;
use crate::server::params;

use super::{ReadReady, Session, Step};
use crate::protocol::framing::{backend_header, be};

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    /// Classifies server messages: updates tracking and forwards or swallows each.
    pub(super) fn scan_server(&mut self) -> Result<(bool, Option<Step>), String> {
        let mut progress = false;
        while self.server.is_some() {
            if self.s_in.body_left > 0 {
                let before = self.s_in.scanned;
                self.s_in.continue_body();
                progress |= self.s_in.scanned != before;
                if self.s_in.body_left > 0 {
                    break;
                }
                continue;
            }
            let avail_len = self.s_in.unscanned().len();
            let h = match backend_header(
                self.s_in.unscanned(),
                (self.max_message as usize).max(1 << 30),
            ) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Err(format!("malformed message from server: {e}")),
            };
            // Rows and COPY data stream through; everything else is small and read whole
            // so that answers the proxy adds can never land inside a message.
            let streamed = matches!(
                h.tag,
                be::DATA_ROW
                    | be::COPY_DATA
                    | be::FUNCTION_CALL_RESPONSE
                    | be::PARAMETER_DESCRIPTION
            );
            if !streamed && h.len > crate::protocol::framing::BACKEND_WHOLE_MESSAGE_LIMIT {
                // Only rows and COPY data can be large; a server announcing a huge
                // message of another kind is broken or hostile, and buffering it whole
                // would let it make the proxy hold up to 1 GiB per connection.
                return Err(format!(
                    "server sent a message of type {} of {} bytes, over the {} bytes allowed for it",
                    h.tag as char,
                    h.len,
                    crate::protocol::framing::BACKEND_WHOLE_MESSAGE_LIMIT
                ));
            }
            if !streamed && avail_len < h.frame_len() {
                self.s_in.need = h.frame_len() as u32;
                break;
            }
            self.s_in.need = 0;
            let body = if streamed {
                0..0
            } else {
                self.s_in.scanned + 5..self.s_in.scanned + h.frame_len()
            };
            let forget = self.note_server_message(h.tag, body.clone());
            let forward =
                self.tracker
                    .on_server(h.tag, &self.s_in.buf[body], &mut self.emit, &mut self.fx);
            if let Some(settings_too) = forget {
                self.forget_server_state(settings_too);
            }
            self.s_in.take_frame(
                h.frame_len(),
                if forward {
                    BodyMode::Forward
                } else {
                    BodyMode::Skip
                },
            );
            self.stats.msgs_s2c += 1;
            self.stats.bytes_s2c += h.frame_len() as u64;
            progress = true;
            self.apply_effects();
            if h.tag == be::READY_FOR_QUERY && forward {
                self.observe_ready();
                self.requests_answered += 1;
                if self.tracker.status == TxnStatus::Idle {
                    self.settle_sets();
                }
            }
            if h.tag == be::READY_FOR_QUERY
                && self.mode == PoolMode::Transaction
                && self.tracker.is_empty()
                && self.tracker.status == TxnStatus::Idle
                && !self.batch_open
                && self.c_in.body_left == 0
            {
                return Ok((true, Some(Step::Release)));
            }
        }
        Ok((progress, None))
    }

    /// What the proxy learns from a server message it forwards or swallows: reported
    /// parameters, errors, and statements the server dropped. `body` is the message's
    /// range in the input (empty for streamed messages). Returns `Some(settings_too)`
    /// when the server's prepared statements are gone.
    fn note_server_message(&mut self, tag: u8, body: std::ops::Range<usize>) -> Option<bool> {
        let body: &[u8] = &self.s_in.buf[body];
        let mut forget: Option<bool> = None;
        match tag {
            be::PARAMETER_STATUS => {
                if let Some((k, v)) = messages::parse_parameter_status(body) {
                    // A change the client made is now part of what it expects; during
                    // the proxy's own SETs only the server's spelling of a value the
                    // client asked for is adopted.
                    let ours = self.tracker.head_is_injected();
                    if params::is_carried(&k)
                        && (!ours || self.wanted.contains_key(&k))
                        && self.wanted.get(&k) != Some(&v)
                    {
                        Arc::make_mut(&mut self.wanted).insert(k.clone(), v.clone());
                        self.wanted_fp = self.settings_fp();
                    }
                    if let Some(lease) = self.server.as_mut() {
                        let conn = lease.conn();
                        conn.params.insert(k, v);
                        conn.params_fp = self.wanted_fp;
                    }
                }
            }
            be::COMMAND_COMPLETE => {
                if self
                    .sql_sets
                    .as_ref()
                    .is_some_and(|s| !s.pending.is_empty())
                    && body.starts_with(b"ROLLBACK")
                {
                    self.txn_failed = true;
                }
                // Whichever protocol carried them, these really dropped the server's
                // statements (and DISCARD ALL its settings): forget them here too.
                if body.starts_with(b"DISCARD ALL\0") {
                    forget = Some(true);
                } else if body.starts_with(b"DEALLOCATE ALL\0") {
                    forget = Some(false);
                } else if body.starts_with(b"ROLLBACK") || body.starts_with(b"DROP ") {
                    if let Some(lease) = self.server.as_mut() {
                        let prepared = &mut lease.conn().prepared;
                        if body[0] == b'R' {
                            prepared.rolled_back();
                        } else {
                            prepared.dropped();
                        }
                    }
                }
            }
            be::ERROR_RESPONSE => {
                let (code, _msg, severity) = messages::error_fields(body);
                if !self.tracker.head_is_injected() {
                    self.txn_failed = true;
                    self.shared
                        .metrics
                        .error("server", code.as_deref().unwrap_or("??"));
                    self.pool.m.error("server");
                }
                if matches!(severity.as_deref(), Some("FATAL") | Some("PANIC")) {
                    self.server_fatal = true;
                }
                if code.as_deref() == Some(crate::error::sqlstate::READ_ONLY_SQL_TRANSACTION) {
                    if let Some(l) = self.server.as_mut() {
                        l.note_read_only();
                    }
                }
                tracing::trace!(code = ?code, "server error");
            }
            be::READY_FOR_QUERY if body == b"I" => {
                if let Some(lease) = self.server.as_mut() {
                    lease.conn().prepared.settled();
                }
            }
            _ => {}
        }
        forget
    }

    /// A ReadyForQuery reached the client: time the request it answers and, when the
    /// session is idle again, the transaction.
    pub(super) fn observe_ready(&mut self) {
        let now = self.stats.now();
        let mut query = None;
        if let Some(t) = self.stats.query_starts.pop_front() {
            let d = (now - t).as_secs_f64();
            self.pool.m.query_duration.observe(d);
            query = Some((t, d));
        }
        if self.tracker.status == TxnStatus::Idle && self.tracker.is_empty() {
            if let Some(t) = self.stats.txn_start.take() {
                // A one-statement transaction started with its query: same duration.
                let d = match query {
                    Some((q, d)) if q == t => d,
                    _ => (now - t).as_secs_f64(),
                };
                self.pool.m.transaction_duration.observe(d);
            }
        }
    }
}

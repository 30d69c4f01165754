//! Transaction mode and session state: a client whose statement may leave state on its
//! server past the transaction keeps that server (is pinned) until the server says the
//! state is gone; a pinned client that leaves has its server cleaned before anyone
//! else gets it. See `sessionstate.rs` for what is detected.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::sessionstate::{self, Reason, Scan};
use super::{ReadReady, Session};
use crate::config::{PoolMode, SessionStatePolicy};
use crate::error::ClientError;
use crate::pool::CloseReason;
use crate::pool::{Lease, Pool};
use crate::protocol::framing::Header;
use crate::server::QueryOutcome;

/// A client that ran a statement of interest (boxed: most clients never do).
#[derive(Default)]
pub(super) struct PinState {
    /// Some while the client holds its server; counted in the pool's gauge.
    held: Option<Held>,
    /// A statement of interest ran since the server was last asked.
    check_due: bool,
    /// What was last seen creating state (label of the next pin).
    reason: Option<Reason>,
    /// State the server check cannot see was made: held until the client leaves.
    sticky: bool,
    /// LOAD ran: nothing undoes it, the connection is closed at exit.
    loaded: bool,
    /// The client's named protocol statements whose SQL touches session state: each
    /// Bind of one needs the server asked again.
    stmts: HashSet<Box<[u8]>>,
}

/// One pin, counted in `pgsidecar_pinned_clients` for as long as it lives.
struct Held {
    since: Instant,
    pool: Arc<Pool>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.pool.m.pinned.dec();
        self.pool
            .m
            .pinned_duration
            .observe(self.since.elapsed().as_secs_f64());
    }
}

/// What to do with a statement.
pub(super) enum Verdict {
    Forward,
    /// Refused under `session_state: reject`.
    Reject(ClientError),
}

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    /// Looks at the SQL of a Query or Parse before it is forwarded. `name`: the
    /// protocol statement it defines, if named.
    pub(super) fn note_sql(&mut self, sql: &[u8], name: Option<&[u8]>) -> Verdict {
        if self.mode != PoolMode::Transaction || self.state_policy == SessionStatePolicy::Allow {
            return Verdict::Forward;
        }
        let holding = self.pin.is_some();
        // The pre-filter alone runs for nearly every statement.
        if !sessionstate::prefilter(sql, holding) {
            return Verdict::Forward;
        }
        let s: Scan = sessionstate::scan(sql, holding);
        if !s.needs_check() {
            return Verdict::Forward;
        }
        if let (Some(r), SessionStatePolicy::Reject) = (s.creates, self.state_policy) {
            return Verdict::Reject(reject_error(sql, r));
        }
        let p = self.pin.get_or_insert_with(Default::default);
        p.check_due = true;
        if let Some(r) = s.creates {
            p.reason = Some(r);
            p.sticky |= r.sticky();
            p.loaded |= r == Reason::Load;
        }
        if let Some(n) = name.filter(|n| !n.is_empty()) {
            p.stmts.insert(n.into());
        }
        Verdict::Forward
    }

    /// A Query's SQL text (without its terminating NUL).
    pub(super) fn query_text(&self, h: Header) -> &[u8] {
        let body = self.frame(h);
        body.strip_suffix(b"\0").unwrap_or(body)
    }

    /// An owned copy of SQL the detector must look at; None (no copy) for what the
    /// pre-filter passes: nearly every statement.
    pub(super) fn sql_to_note(&self, sql: &[u8]) -> Option<Vec<u8>> {
        (self.state_policy != SessionStatePolicy::Allow
            && sessionstate::prefilter(sql, self.pin.is_some()))
        .then(|| sql.to_vec())
    }

    /// A Bind of a named protocol statement: one that touches session state runs again.
    pub(super) fn note_bind(&mut self, name: &[u8]) {
        if let Some(p) = self.pin.as_mut() {
            if p.stmts.contains(name) {
                p.check_due = true;
            }
        }
    }

    /// Whether SQL at a Parse that may be answered without a server needs one (to be
    /// seen, or refused, when it reaches the server).
    pub(super) fn sql_of_interest(&self, sql: &[u8]) -> bool {
        self.mode == PoolMode::Transaction
            && self.state_policy != SessionStatePolicy::Allow
            && sessionstate::prefilter(sql, false)
            && sessionstate::scan(sql, false).needs_check()
    }

    /// The client holds its server now.
    pub(super) fn pinned(&self) -> bool {
        self.pin.as_ref().is_some_and(|p| p.held.is_some())
    }

    /// At a transaction boundary in transaction mode: returns true when the client
    /// keeps its server (asking the server first if a statement of interest ran).
    pub(super) async fn keep_server(&mut self) -> bool {
        let Some(p) = self.pin.as_mut() else {
            return false;
        };
        if !p.check_due {
            return p.held.is_some();
        }
        p.check_due = false;
        let sticky = p.sticky;
        let Some(lease) = self.server.as_mut() else {
            return false;
        };
        let outcome = lease
            .conn()
            .query_row(sessionstate::CHECK_SQL, Duration::from_secs(5))
            .await;
        let holds = match outcome {
            Ok(QueryOutcome::Rows(row)) => {
                sticky
                    || row
                        .first()
                        .and_then(|v| v.as_deref())
                        .is_none_or(|v| v != "0")
            }
            // Cannot tell what the server holds: it is not given to anyone else.
            Ok(QueryOutcome::ServerError(e)) | Err(e) => {
                tracing::warn!(error = %e, pool = %self.pool.key, "session state check failed; closing the server connection");
                self.timers.discard_server = true;
                false
            }
        };
        if holds {
            self.pin_now();
        } else {
            self.unpin();
        }
        holds
    }

    fn pin_now(&mut self) {
        let Some(p) = self.pin.as_mut() else { return };
        if p.held.is_some() {
            return;
        }
        let reason = p.reason.unwrap_or(Reason::Unknown);
        p.held = Some(Held {
            since: Instant::now(),
            pool: self.pool.clone(),
        });
        let m = &self.pool.m;
        m.pinned.inc();
        self.shared
            .metrics
            .pins
            .with_label_values(&[&self.pool.key.to_string(), reason.label()])
            .inc();
        if let Some(e) = &self.entry {
            e.info.pinned.store(true, Ordering::Relaxed);
        }
        let pinned = m.pinned.get().max(0) as usize;
        let max = self.pool.settings().max_size;
        if pinned * 2 > max && (pinned - 1) * 2 <= max {
            tracing::warn!(
                pool = %self.pool.key,
                pinned,
                max_size = max,
                "most of this pool's server connections are pinned by clients holding session state (advisory locks, temp tables, LISTEN, ...); other clients wait longer. Use pg_advisory_xact_lock / ON COMMIT DROP, a larger pool, or session mode for such clients"
            );
        }
    }

    /// The state is gone: back to transaction pooling.
    fn unpin(&mut self) {
        let Some(p) = self.pin.as_mut() else { return };
        p.held = None;
        p.reason = None;
        if let Some(e) = &self.entry {
            e.info.pinned.store(false, Ordering::Relaxed);
        }
        if p.stmts.is_empty() {
            self.pin = None;
        }
    }

    /// Before a server whose client left goes back to the pool: whether it may hold
    /// this client's session state, and if so, cleans it. Err: close it instead.
    pub(super) async fn clean_after_pin(
        &mut self,
        lease: &mut Lease,
        limit: Duration,
    ) -> Result<(), CloseReason> {
        let Some(p) = self.pin.take() else {
            return Ok(());
        };
        if p.loaded {
            return Err(CloseReason::LibraryLoaded);
        }
        // DISCARD ALL: CLOSE ALL, SET SESSION AUTHORIZATION DEFAULT, RESET ALL,
        // DEALLOCATE ALL, UNLISTEN *, pg_advisory_unlock_all(), DISCARD TEMP.
        if lease.conn().run_quiet("DISCARD ALL", limit).await.is_err() {
            return Err(CloseReason::SessionStateCleanupFailed);
        }
        // It also dropped the proxy's own statements and reset every setting.
        let conn = lease.conn();
        conn.prepared.clear();
        conn.params = conn.original_params.clone();
        conn.raw_settings.clear();
        conn.params_fp = 0;
        Ok(())
    }
}

/// 0A000 naming the statement and what to do instead.
fn reject_error(sql: &[u8], r: Reason) -> ClientError {
    let text = String::from_utf8_lossy(sql);
    let text = text.trim();
    let shown: String = text.chars().take(80).collect();
    let more = if shown.len() < text.len() { "..." } else { "" };
    ClientError::error(
        crate::error::sqlstate::FEATURE_NOT_SUPPORTED,
        format!(
            "pgsidecar: \"{shown}{more}\" would leave session state ({}) on a pooled server connection, which this pool refuses (session_state: reject)",
            r.label()
        ),
    )
    .with_hint("use the transaction-scoped form (pg_advisory_xact_lock, SET LOCAL, CREATE TEMP ... ON COMMIT DROP), or a pool with pool_mode: session or session_state: pin")
}

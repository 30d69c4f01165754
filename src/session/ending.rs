//! How a session ends when it is not the client's Terminate: a killed client, settings
//! the server refused, and a client that vanished (its transaction rolled back and its
//! session state cleaned before anyone reuses the server).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::tracker::TxnStatus;
use super::{ReadReady, Session, Step};
use crate::config::PoolMode;
use crate::error::{sqlstate, ClientError};
use crate::pool::CloseReason;

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    /// Ends a session whose settings PostgreSQL refused on a server, with its words.
    pub(super) async fn end_unusable_settings(&mut self, e: Box<(String, String)>) {
        let (code, message) = *e;
        let e = ClientError::fatal(
            crate::server::leak_code_or(&code, sqlstate::INVALID_PARAMETER_VALUE),
            format!("pgsidecar: this session's settings cannot be applied on a server connection: {message}"),
        )
        .with_hint("reconnect with settings PostgreSQL accepts");
        self.handle(Step::ClientProtocol(e)).await;
    }

    /// The console's KILL reached this client.
    pub(super) fn killed(&self) -> bool {
        self.entry
            .as_ref()
            .is_some_and(|e| e.info.killed.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Ends the session after KILL: its server is closed, not reused, and the client is
    /// told why.
    pub(super) async fn end_killed(&mut self) {
        if let Some(lease) = self.server.take() {
            lease.discard(CloseReason::Killed);
        }
        self.set_inactive();
        let _ = self.flush_client().await;
        let e = ClientError::fatal(
            sqlstate::ADMIN_SHUTDOWN,
            "terminating connection: an administrator ran KILL for this database in the pgsidecar console; reconnect once it is resumed",
        );
        let _ = self.client.write_all(&e.to_bytes()).await;
    }

    /// After the client left: return the server clean, roll back, or close it.
    pub(super) async fn finish_client_gone(&mut self) {
        self.cancel.slot.set(None);
        self.flush_stats();
        self.set_inactive();
        let Some(mut lease) = self.server.take() else {
            return;
        };
        let quiet = self.tracker.is_empty()
            && !self.batch_open
            && self.c_in.body_left == 0
            && !self.c_in.has_output()
            && self.s_in.unscanned().is_empty()
            && !self.server_fatal
            && !self.timers.discard_server;
        if !quiet {
            // Something is in flight (a query, a COPY, a partial batch): the connection's
            // state is unknown, so it is closed rather than reused.
            lease.discard(CloseReason::ClientLeftMidRequest);
            return;
        }
        let limit = Duration::from_secs(5);
        if self.tracker.status != TxnStatus::Idle {
            if let Err(e) = lease.conn().run_quiet("ROLLBACK", limit).await {
                tracing::debug!(error = %e, "rollback after client left failed");
                lease.discard(CloseReason::RollbackFailed);
                return;
            }
            lease.conn().prepared.rolled_back();
            lease.conn().prepared.settled();
        }
        if let Err(why) = self.clean_after_pin(&mut lease, limit).await {
            tracing::debug!(%why, "closing a server that held a client's session state");
            lease.discard(why);
            return;
        }
        if self.mode == PoolMode::Session {
            let reset = lease.pool().settings().reset_query.clone();
            if !reset.is_empty() && lease.conn_ref().dirty {
                if let Err(e) = lease.conn().run_quiet(&reset, limit).await {
                    tracing::debug!(error = %e, "reset query failed");
                    lease.discard(CloseReason::ResetFailed);
                    return;
                }
                let conn = lease.conn();
                conn.params = conn.original_params.clone();
                conn.dirty = false;
            }
        }
        self.cancel
            .slot
            .wait_delivered(Duration::from_secs(5))
            .await;
        lease.release();
    }
}

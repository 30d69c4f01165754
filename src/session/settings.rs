//! What the client expects of the server it runs on: settings (startup, SET, RESET,
//! DISCARD) tracked per session and settled at transaction ends.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{ReadReady, Session};
use crate::server::params;

/// Settings changed with SQL SET: boxed on the first one, since nearly no client
/// sends any and every idle client's session carries the field (RSS per idle client).
#[derive(Default)]
pub(super) struct SqlSets {
    /// Settings the server does not report, as their SQL text (transaction mode).
    pub(super) raw: params::RawSettings,
    /// SET/RESET statements sent in the current transaction, applied to `raw` when it
    /// ends without error or rollback. Tagged with the request they came in.
    pub(super) pending: Vec<(u64, super::setstmt::SetOp)>,
}

static NO_RAW: params::RawSettings = params::RawSettings::new();

/// The client's SQL-set settings (empty when it never sent a SET).
pub(super) fn raw(sets: &Option<Box<SqlSets>>) -> &params::RawSettings {
    sets.as_ref().map_or(&NO_RAW, |s| &s.raw)
}

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    /// Fingerprint of the startup and the SQL-set settings the client expects.
    pub(super) fn settings_fp(&self) -> u64 {
        params::fingerprint(&self.wanted, raw(&self.sql_sets))
    }

    /// After DISCARD ALL / DEALLOCATE ALL ran on the server: the client's statements are
    /// gone, the server's cache is empty, and (DISCARD) settings are back to defaults.
    pub(super) fn forget_server_state(&mut self, settings_too: bool) {
        self.stmts.clear();
        if let Some(lease) = self.server.as_mut() {
            lease.conn().prepared.clear();
        }
        if settings_too {
            self.reset_settings();
        }
    }

    /// Transaction mode: the client is told its startup settings as PostgreSQL spells
    /// them (`utf8` -> `UTF8`), learned by the settings check (see `validate.rs`).
    pub(super) fn adopt_spelling(&mut self, spelled: Option<super::validate::Spelled>) {
        let Some(spelled) = spelled.filter(|s| !s.is_empty()) else {
            return;
        };
        let wanted = std::sync::Arc::make_mut(&mut self.wanted);
        for (k, v) in spelled.iter() {
            if wanted.contains_key(k) {
                wanted.insert(k.clone(), v.clone());
            }
        }
        self.wanted_fp = self.settings_fp();
    }

    /// The client's settings go back to its startup values and the bound server's to
    /// its own defaults (DISCARD ALL, RESET ALL); the next checkout re-applies them.
    pub(super) fn reset_settings(&mut self) {
        self.wanted = self.startup_settings.clone();
        self.sql_sets = None;
        self.wanted_fp = self.settings_fp();
        if let Some(lease) = self.server.as_mut() {
            let conn = lease.conn();
            conn.params = conn.original_params.clone();
            conn.raw_settings.clear();
            conn.params_fp = 0;
        }
    }

    /// A transaction ended: SETs it made stick unless it failed or rolled back.
    pub(super) fn settle_sets(&mut self) {
        if let Some(sets) = self.sql_sets.as_mut().filter(|s| !s.pending.is_empty()) {
            let answered = self.requests_answered;
            let failed = self.txn_failed;
            let mut changed = false;
            let SqlSets { raw, pending } = &mut **sets;
            pending.retain(|(seq, op)| {
                if *seq > answered {
                    return true; // sent in a later request, not answered yet
                }
                if !failed {
                    match &op.value {
                        Some(v) => raw.insert(op.name.clone(), v.clone()),
                        None => raw.remove(&op.name),
                    };
                    changed = true;
                }
                false
            });
            if changed {
                self.wanted_fp = params::fingerprint(&self.wanted, raw);
                if let Some(lease) = self.server.as_mut() {
                    let conn = lease.conn();
                    conn.raw_settings = raw.clone();
                    conn.params_fp = self.wanted_fp;
                }
            }
        }
        self.txn_failed = false;
    }

    /// Notes a Query or Sync sent to the server, for the duration histograms.
    pub(super) fn note_request(&mut self) {
        self.requests_sent += 1;
        let now = self.stats.now();
        if self.stats.txn_start.is_none() {
            self.stats.txn_start = Some(now);
        }
        self.stats.query_starts.push_back(now);
    }
}

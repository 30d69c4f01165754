//! The proxy's own logins to PostgreSQL as a first-class state: a pool whose server
//! refuses its login (wrong `upstream.password`, a role pg_hba does not admit) records
//! the refusal, keeps existing (so the breaker accumulates failures and backs off, and
//! `/api/pools` and SHOW POOLS show it), counts it in
//! `pgsidecar_upstream_login_failures_total{sqlstate}`, and tells clients that it was
//! the proxy's login that failed, for which role, and what to fix.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::time::Instant;

use super::{CheckoutError, Pool};
use crate::error::{ClientError, Severity};
use crate::server::ConnectError;

/// The first refusal of the current run of refused logins, and the latest.
#[derive(Debug, Clone)]
pub struct LoginFailure {
    pub code: String,
    pub message: String,
    /// The PostgreSQL role the proxy logged in as.
    pub role: String,
    since: Instant,
    since_wall: SystemTime,
    pub count: u64,
}

/// What the admin API and console show.
#[derive(Debug, Clone, Serialize)]
pub struct LoginFailureView {
    pub sqlstate: String,
    pub message: String,
    pub role: String,
    /// Unix time of the first refusal of this run.
    pub since_unix: f64,
    pub failing_for_secs: f64,
    pub failures: u64,
}

/// A refusal that says the proxy's credentials or rights are wrong (class 28: invalid
/// authorization), not that the client asked for something wrong.
fn is_login_refusal(e: &ConnectError) -> bool {
    e.is_refused_login()
}

impl Pool {
    /// Records how a connection attempt's login went (every attempt: client connects,
    /// minimum-size fills, probes).
    pub(super) fn note_login(&self, outcome: Result<(), &ConnectError>) {
        match outcome {
            Ok(()) => {
                if self.login_failure.lock().take().is_some() {
                    tracing::info!(pool = %self.name, "upstream login succeeds again");
                }
            }
            Err(e) => {
                if let ConnectError::Server { code, .. } = e {
                    self.metrics.upstream_login_failed(&self.name, code);
                }
                let ConnectError::Server { code, message, .. } = e else {
                    return;
                };
                if !is_login_refusal(e) {
                    return;
                }
                let role = self.settings().identity.user.clone();
                let mut slot = self.login_failure.lock();
                match slot.as_mut() {
                    Some(f) => {
                        f.count += 1;
                        f.code = code.clone();
                        f.message = message.clone();
                    }
                    None => {
                        tracing::error!(pool = %self.name, role = %role, sqlstate = %code, error = %message,
                            "PostgreSQL refused the proxy's own login: check upstream.user/upstream.password (or the user's server_user/server_password)");
                        *slot = Some(LoginFailure {
                            code: code.clone(),
                            message: message.clone(),
                            role,
                            since: Instant::now(),
                            since_wall: SystemTime::now(),
                            count: 1,
                        });
                    }
                }
            }
        }
    }

    /// A failed probe: a refused login is counted and recorded like any other.
    pub(super) fn note_probe_down(&self, error: &str) {
        let Some(code) = crate::server::refused_code_in(error) else {
            return;
        };
        let message = error
            .strip_prefix("server refused the login: ")
            .and_then(|t| t.get(6..))
            .unwrap_or(error);
        self.note_login(Err(&ConnectError::Server {
            code: code.to_string(),
            message: message.to_string(),
            fatal: true,
        }));
    }

    /// The current run of refused upstream logins, if the last attempt was refused.
    pub fn login_failure(&self) -> Option<LoginFailureView> {
        let f = self.login_failure.lock().clone()?;
        Some(LoginFailureView {
            sqlstate: f.code,
            message: f.message,
            role: f.role,
            since_unix: f
                .since_wall
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            failing_for_secs: f.since.elapsed().as_secs_f64(),
            failures: f.count,
        })
    }

    /// What a client is told when a checkout failed: the proxy's own refused login is
    /// said to be that, with what to fix; anything else as the error itself says.
    pub fn client_error(&self, e: &CheckoutError) -> ClientError {
        let retry_in = match e {
            CheckoutError::Connect(c) if is_login_refusal(c) => None,
            CheckoutError::Unavailable { retry_in, .. } => Some(*retry_in),
            _ => return e.to_client_error(&self.key),
        };
        let Some(f) = self.login_failure.lock().clone() else {
            return e.to_client_error(&self.key);
        };
        upstream_login_error(&f, &self.key.user, retry_in)
    }
}

fn upstream_login_error(
    f: &LoginFailure,
    client_user: &str,
    retry_in: Option<Duration>,
) -> ClientError {
    let role = &f.role;
    let mut message = format!(
        "pgsidecar: the proxy's own login to PostgreSQL as role \"{role}\" failed: {}",
        f.message
    );
    if let Some(r) = retry_in {
        message.push_str(&format!(
            " (failing for {:.1}s; next attempt in {:.1}s)",
            f.since.elapsed().as_secs_f64(),
            r.as_secs_f64()
        ));
    }
    let hint = if f.code == "28P01" {
        format!(
            "your own login to pgsidecar as \"{client_user}\" is fine: the password pgsidecar sends for role \"{role}\" (upstream.password, or server_password of user \"{client_user}\") does not match the role's password in PostgreSQL; fix it and reload"
        )
    } else {
        format!(
            "your own login to pgsidecar as \"{client_user}\" is fine: PostgreSQL does not admit role \"{role}\" from pgsidecar; check upstream.user (or server_user of \"{client_user}\") and pg_hba.conf"
        )
    };
    ClientError {
        severity: Severity::Error,
        code: crate::server::leak_code(&f.code),
        message,
        hint: Some(hint),
    }
}

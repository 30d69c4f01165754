//! Connecting to the upstream: its hosts in the order `Hosts::order` gives, each within
//! `connect_timeout`, until one logs in and has the role `target_session_attrs` asks
//! for. What each attempt taught (unreachable, its role) is recorded in the shared
//! host state, so the next connect starts with the host that works.

use std::time::Duration;

use tokio::time::Instant;

use super::hosts::{role_from_params, Role};
use super::{ConnectError, QueryOutcome, ServerConn, ServerIdentity};
use crate::error::sqlstate;

/// Asked when a server does not report its role at login (before PostgreSQL 14).
const ROLE_SQL: &str =
    "select pg_is_in_recovery()::text, current_setting('default_transaction_read_only')";

impl ServerConn {
    /// Connects and authenticates to a host of the upstream that fits its
    /// `target_session_attrs`; each attempt within `ident.connect_timeout`.
    pub async fn connect(
        ident: &ServerIdentity,
        application_name: &str,
        max_prepared: usize,
        lifetime: Duration,
    ) -> Result<ServerConn, ConnectError> {
        let hosts = &ident.hosts;
        let order = hosts.order(Instant::now(), |n| {
            rand::random::<u64>() as usize % n.max(1)
        });
        let mut tried = Vec::new();
        let mut last = None;
        let mut wrong_role = false;
        for i in order {
            let addr = hosts.get(i).to_string();
            let limit = ident.connect_timeout;
            let attempt = Self::login(ident, i, application_name, max_prepared, lifetime);
            let result = match tokio::time::timeout(limit, attempt).await {
                Ok(r) => r,
                Err(_) => Err(ConnectError::Timeout(limit, addr.clone())),
            };
            let mut conn = match result {
                Ok(c) => c,
                Err(e) if tries_next(&e) => {
                    hosts.failed(i, &e.to_string(), Instant::now());
                    tried.push(format!("{addr}: {e}"));
                    last = Some(e);
                    continue;
                }
                // The server answered and refused us (a wrong password, a database that
                // does not exist): every host would say the same.
                Err(e) => return Err(e),
            };
            let role = if hosts.attrs.needs_role() {
                match conn.role(limit).await {
                    Ok(r) => Some(r),
                    Err(e) => {
                        hosts.failed(i, &e, Instant::now());
                        tried.push(format!("{addr}: {e}"));
                        last = Some(ConnectError::Protocol(e));
                        continue;
                    }
                }
            } else {
                role_from_params(|k| conn.original_params.get(k).cloned())
            };
            if let Some(role) = role {
                if let Some(Some(before)) = hosts.reported(i, role) {
                    tracing::warn!(host = %addr, was = before.name(), now = role.name(), "upstream host changed role");
                }
                if !hosts.attrs.accepts(role) {
                    wrong_role = true;
                    tried.push(format!("{addr} is a {}", role.name()));
                    conn.close().await;
                    continue;
                }
            }
            hosts.connected(i);
            return Ok(conn);
        }
        match last {
            // Every host failed the same way (one host, say): its own error says most.
            Some(e) if !wrong_role && tried.len() == 1 => Err(e),
            _ => Err(ConnectError::NoSuitableHost {
                attrs: hosts.attrs.to_string(),
                tried: tried.join("; "),
            }),
        }
    }

    /// The server's role: as reported at login (PostgreSQL 14+), else asked.
    async fn role(&mut self, limit: Duration) -> Result<Role, String> {
        if let Some(r) = role_from_params(|k| self.original_params.get(k).cloned()) {
            return Ok(r);
        }
        match self.query_row(ROLE_SQL, limit).await? {
            QueryOutcome::Rows(row) => {
                let on = |i: usize, yes: &str| row.get(i).and_then(|v| v.as_deref()) == Some(yes);
                Ok(Role {
                    in_recovery: on(0, "true"),
                    read_only: on(1, "on"),
                })
            }
            QueryOutcome::ServerError(e) => Err(format!("role check failed: {e}")),
        }
    }
}

/// A failure that another host may not have: it is down, starting, stopping, full.
fn tries_next(e: &ConnectError) -> bool {
    match e {
        ConnectError::Io { .. }
        | ConnectError::Timeout(..)
        | ConnectError::Tls { .. }
        | ConnectError::Protocol(_)
        | ConnectError::NoSuitableHost { .. } => true,
        ConnectError::Server { code, .. } => {
            code == sqlstate::CANNOT_CONNECT_NOW
                || code == sqlstate::ADMIN_SHUTDOWN
                || code == sqlstate::TOO_MANY_CONNECTIONS
                || code.starts_with("08")
        }
    }
}

//! Semantic checks of a parsed configuration that serde cannot express, run once
//! before anything listens.

use std::collections::HashSet;
use std::net::SocketAddr;

use super::*;
use crate::auth::Secret;

impl Config {
    /// Semantic checks that serde cannot express. Run before binding any socket.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.listen.parse::<SocketAddr>().is_err() {
            return bad(format!(
                "listen: {:?} is not an IP:port address",
                self.listen
            ));
        }
        if self.admin_listen.parse::<SocketAddr>().is_err() {
            return bad(format!(
                "admin_listen: {:?} is not an IP:port address",
                self.admin_listen
            ));
        }
        if self.worker_threads == 0 || self.worker_threads > 256 {
            return bad("worker_threads must be between 1 and 256".into());
        }
        if self.upstream.host.is_empty() {
            return bad("upstream.host must not be empty".into());
        }
        if self.upstream.port == 0 {
            return bad("upstream.port must not be 0".into());
        }
        self.check_pool()?;
        self.check_limits()?;
        self.check_upstream()?;
        checks::log_level(&self.logging.level).map_err(ConfigError::Invalid)?;
        self.check_durations()?;
        if !matches!(self.logging.format.as_str(), "text" | "json") {
            return bad(format!(
                "logging.format must be text or json, not {:?}",
                self.logging.format
            ));
        }
        self.check_users()?;
        self.check_databases()
    }

    fn check_pool(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.pool.size == 0 {
            return bad("pool.size must be at least 1".into());
        }
        if self.pool.min_size > self.pool.size {
            return bad(format!(
                "pool.min_size ({}) is larger than pool.size ({})",
                self.pool.min_size, self.pool.size
            ));
        }
        for (name, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("pool.query_wait_timeout", self.pool.query_wait_timeout),
            (
                "limits.client_login_timeout",
                self.limits.client_login_timeout,
            ),
            (
                "limits.client_startup_timeout",
                self.limits.client_startup_timeout,
            ),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be greater than 0"));
            }
        }
        if !(self.pool.target_utilization > 0.0 && self.pool.target_utilization <= 1.0) {
            return bad(format!(
                "pool.target_utilization must be in (0, 1], not {}",
                self.pool.target_utilization
            ));
        }
        for (name, d) in [
            ("pool.aimd_interval", self.pool.aimd_interval),
            ("health.check_timeout", self.health.check_timeout),
            ("health.probe_timeout", self.health.probe_timeout),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be greater than 0"));
            }
        }
        if self.breaker.failure_threshold == 0 {
            return bad("breaker.failure_threshold must be at least 1".into());
        }
        if self.breaker.backoff_base.is_zero()
            || self.breaker.backoff_cap < self.breaker.backoff_base
        {
            return bad(
                "breaker.backoff_base must be > 0 and not above breaker.backoff_cap".into(),
            );
        }
        Ok(())
    }

    fn check_limits(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.limits.max_dynamic_pools == 0 {
            return bad("limits.max_dynamic_pools must be at least 1".into());
        }
        if self.limits.max_client_conn == 0 {
            return bad("limits.max_client_conn must be at least 1".into());
        }
        for (name, cap) in [
            (
                "limits.max_db_client_connections",
                self.limits.max_db_client_connections,
            ),
            (
                "limits.max_user_client_connections",
                self.limits.max_user_client_connections,
            ),
        ] {
            if cap == Some(0) {
                return bad(format!(
                    "{name} must be at least 1 (leave it unset for no cap)"
                ));
            }
        }
        for (name, d) in [
            (
                "limits.idle_transaction_timeout",
                self.limits.idle_transaction_timeout,
            ),
            ("limits.query_timeout", self.limits.query_timeout),
            (
                "limits.transaction_timeout",
                self.limits.transaction_timeout,
            ),
            (
                "limits.client_idle_timeout",
                self.limits.client_idle_timeout,
            ),
        ] {
            if d.is_some_and(|d| d.is_zero()) {
                return bad(format!(
                    "{name} must be greater than 0 (leave it unset for no limit)"
                ));
            }
        }
        if self.limits.max_message_size < 1024 || self.limits.max_message_size > 0x3fff_ffff {
            return bad("limits.max_message_size must be between 1024 and 1073741823".into());
        }
        Ok(())
    }

    fn check_upstream(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        self.tls.validate().map_err(ConfigError::Invalid)?;
        self.upstream.tls.validate().map_err(ConfigError::Invalid)?;
        self.upstream.hosts().map_err(ConfigError::Invalid)?;
        if self.upstream.keepalives_idle.is_zero()
            || self.upstream.keepalives_interval.is_zero()
            || self.upstream.keepalives_count == 0
        {
            return bad("upstream.keepalives_idle, keepalives_interval and keepalives_count must be greater than 0".into());
        }
        Ok(())
    }

    fn check_users(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let mut seen = HashSet::new();
        for u in &self.users {
            if u.name.is_empty() {
                return bad("users: a user has an empty name".into());
            }
            if !seen.insert(u.name.as_str()) {
                return bad(format!("users: {:?} is listed twice", u.name));
            }
            if self.auth.method != AuthMethod::Trust && u.password.is_none() {
                return bad(format!(
                    "users: {:?} has no password but auth.method is {:?}; set a password or use auth.method: trust",
                    u.name, self.auth.method
                ));
            }
            for (what, p) in [
                ("password", &u.password),
                ("server_password", &u.server_password),
            ] {
                if let Some(Err(e)) = p.as_deref().map(Secret::parse_strict) {
                    return bad(format!("users: {:?} has a {what} that {e}", u.name));
                }
            }
            if self.auth.method == AuthMethod::Md5 {
                if let Some(Secret::Scram(_)) = u.password.as_deref().map(Secret::parse) {
                    return bad(format!(
                        "users: {:?} has a SCRAM verifier, which cannot check md5 logins; use auth.method: scram-sha-256",
                        u.name
                    ));
                }
            }
        }
        if self.auth.method != AuthMethod::Trust && self.users.is_empty() {
            return bad("auth.method requires passwords but no users are configured".into());
        }
        Ok(())
    }

    fn check_databases(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let mut seen = HashSet::new();
        for d in &self.databases {
            if !seen.insert(d.name.as_str()) {
                return bad(format!("databases: {:?} is listed twice", d.name));
            }
            if d.pool_size == Some(0) {
                return bad(format!("databases: {:?} has pool_size 0", d.name));
            }
        }
        Ok(())
    }
}

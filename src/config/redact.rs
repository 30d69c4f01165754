//! Debug output of the configuration sections that hold secrets: every field but the
//! secrets, which show only whether they are set. A `{:?}` of the whole `Config` (in a
//! log line, a panic message, a test failure) must never print a password or a token.

use std::fmt;

use super::{AdminConfig, UpstreamConfig, UserConfig};

fn redacted(secret: &Option<String>) -> Option<&'static str> {
    secret.as_ref().map(|_| "<redacted>")
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &redacted(&self.password))
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &redacted(&self.password))
            .field("server_user", &self.server_user)
            .field("server_password", &redacted(&self.server_password))
            .field("pool_mode", &self.pool_mode)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("token", &redacted(&self.token))
            .field("unready_when_breaker_open", &self.unready_when_breaker_open)
            .field(
                "unready_when_upstream_login_fails",
                &self.unready_when_upstream_login_fails,
            )
            .field("pause_timeout", &self.pause_timeout)
            .field("startup_grace", &self.startup_grace)
            .field("shutdown_delay", &self.shutdown_delay)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_hides_secrets() {
        let c: crate::config::Config = serde_yaml::from_str(
            "upstream: {host: h, password: up-secret-1}\n\
             users: [{name: u, password: pw-secret-2, server_password: pw-secret-3}]\n\
             admin: {token: tok-secret-4}\n",
        )
        .expect("config");
        let dbg = format!("{c:?}");
        for s in ["up-secret-1", "pw-secret-2", "pw-secret-3", "tok-secret-4"] {
            assert!(!dbg.contains(s), "{s} in {dbg}");
        }
        assert!(dbg.contains("<redacted>"));
    }
}

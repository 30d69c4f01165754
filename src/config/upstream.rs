//! `upstream:` in proxy.yaml: where PostgreSQL is and how server connections reach it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::hosts::{HostAddr, LoadBalanceHosts, TargetSessionAttrs};
use super::tls::UpstreamTlsConfig;

// Debug is written by hand in `redact.rs`: it must not print secrets.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Host name or IP of the PostgreSQL server, or several (`[a, b:5433]` or
    /// `"a,b:5433"`, libpq style; see `server::hosts`). Default `127.0.0.1`.
    #[serde(deserialize_with = "host_list")]
    pub host: String,
    /// Port of hosts listed without one. Default `5432`.
    pub port: u16,
    /// What a server connection must be connected to, as libpq's: `read-write`
    /// (default), `primary`, `read-only`, `standby`, `prefer-standby`, `any`.
    pub target_session_attrs: TargetSessionAttrs,
    /// `disable` (hosts in the order listed) or `random`.
    pub load_balance_hosts: LoadBalanceHosts,
    /// Unacknowledged data older than this aborts a server connection (TCP_USER_TIMEOUT);
    /// `0s` leaves the kernel's default (about 15 minutes). Default `10s`.
    #[serde(with = "humantime_serde")]
    pub tcp_user_timeout: Duration,
    /// TCP keepalive on server connections: first probe after this much idle time, then
    /// every `keepalives_interval`, `keepalives_count` unanswered ones end it. Defaults
    /// `10s`, `5s`, `3`: a vanished server is found within 25 s, not 2 hours.
    #[serde(with = "humantime_serde")]
    pub keepalives_idle: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalives_interval: Duration,
    pub keepalives_count: u32,
    /// Role the proxy logs in as upstream, unless a user entry sets `server_user`.
    /// Unset: the client's user name.
    pub user: Option<String>,
    /// Password for `user` (plaintext; `${ENV}` recommended). Unset: the client's
    /// configured plaintext password, else none (trust upstream).
    #[serde(skip_serializing)]
    pub password: Option<String>,
    /// Time allowed for TCP connect plus authentication. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TLS to PostgreSQL with libpq's sslmode semantics. Default `sslmode: prefer`.
    pub tls: UpstreamTlsConfig,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            host: "127.0.0.1".into(),
            port: 5432,
            target_session_attrs: TargetSessionAttrs::default(),
            load_balance_hosts: LoadBalanceHosts::default(),
            tcp_user_timeout: Duration::from_secs(10),
            keepalives_idle: Duration::from_secs(10),
            keepalives_interval: Duration::from_secs(5),
            keepalives_count: 3,
            user: None,
            password: None,
            connect_timeout: Duration::from_secs(5),
            tls: UpstreamTlsConfig::default(),
        }
    }
}

impl UpstreamConfig {
    pub fn new(host: String, port: u16) -> Self {
        UpstreamConfig {
            host,
            port,
            ..UpstreamConfig::default()
        }
    }

    /// The hosts to try, each with its port.
    pub fn hosts(&self) -> Result<Vec<HostAddr>, String> {
        super::hosts::parse_hosts(&self.host, self.port).map_err(|e| format!("upstream.host: {e}"))
    }
}

/// `upstream.host` as a string (`"a,b"`) or a list of strings, kept as `"a,b"`.
fn host_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s,
        OneOrMany::Many(v) => v.join(","),
    })
}

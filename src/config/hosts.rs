//! `upstream.host` lists and libpq's host-selection words, as data: which hosts, what a
//! server connection must be connected to, in which order. `server::hosts` keeps their
//! runtime state.

use serde::{Deserialize, Serialize};

/// What a server connection must be connected to (libpq's `target_session_attrs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetSessionAttrs {
    /// Accepts writes: not in recovery and `default_transaction_read_only` off.
    #[default]
    ReadWrite,
    /// Not in recovery.
    Primary,
    /// Refuses writes: in recovery, or `default_transaction_read_only` on.
    ReadOnly,
    /// In recovery.
    Standby,
    /// A standby if one is up, else any host.
    PreferStandby,
    Any,
}

impl std::fmt::Display for TargetSessionAttrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
            TargetSessionAttrs::Any => "any",
        })
    }
}

impl TargetSessionAttrs {
    /// Whether a server of `role` serves these attributes (prefer-standby: any).
    pub fn accepts(self, role: Role) -> bool {
        match self {
            TargetSessionAttrs::ReadWrite => !role.in_recovery && !role.read_only,
            TargetSessionAttrs::Primary => !role.in_recovery,
            TargetSessionAttrs::ReadOnly => role.in_recovery || role.read_only,
            TargetSessionAttrs::Standby => role.in_recovery,
            TargetSessionAttrs::PreferStandby | TargetSessionAttrs::Any => true,
        }
    }

    /// Pools that read from replicas spread their connections over them.
    pub fn spreads(self) -> bool {
        matches!(
            self,
            TargetSessionAttrs::ReadOnly
                | TargetSessionAttrs::Standby
                | TargetSessionAttrs::PreferStandby
        )
    }

    /// Whether the role must be known before a connection is used.
    pub fn needs_role(self) -> bool {
        self != TargetSessionAttrs::Any
    }
}

/// libpq's `load_balance_hosts`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalanceHosts {
    /// In the order listed (replica pools: round robin from the next host each time).
    #[default]
    Disable,
    /// A random order per connect.
    Random,
}

/// What a server said about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Role {
    pub in_recovery: bool,
    /// `default_transaction_read_only` (a standby is read-only whatever this says).
    pub read_only: bool,
}

impl Role {
    pub fn name(&self) -> &'static str {
        if self.in_recovery {
            "standby"
        } else if self.read_only {
            "read-only primary"
        } else {
            "primary"
        }
    }
}

/// One candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddr {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for HostAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Splits `a,b:5433,[::1]:5434` into hosts; entries without a port get `default_port`.
pub fn parse_hosts(list: &str, default_port: u16) -> Result<Vec<HostAddr>, String> {
    let mut out = Vec::new();
    for entry in list.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(format!("empty host in {list:?}"));
        }
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let (h, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("unclosed [ in host {entry:?}"))?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(format!("unexpected {after:?} after host {h:?}")),
            }
        } else if entry.matches(':').count() == 1 {
            let (h, p) = entry.split_once(':').unwrap_or((entry, ""));
            (h, Some(p))
        } else {
            (entry, None)
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("invalid port {p:?} for host {host:?}"))?,
            None => default_port,
        };
        out.push(HostAddr {
            host: host.to_string(),
            port,
        });
    }
    Ok(out)
}

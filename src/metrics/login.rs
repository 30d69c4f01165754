//! How client logins ended: the bounded `result` label of
//! `pgsidecar_client_connections_total`.

/// How a client connection's opening ended (`client_connections_total{result}`): a
/// fixed set, so no input can add series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginResult {
    Accepted,
    AuthFailed,
    UnknownDatabase,
    ProtocolError,
    Limit,
    UpstreamAuthFailed,
    UpstreamFailed,
    Timeout,
    Abandoned,
    Cancel,
    InvalidSettings,
    Refused,
}

impl LoginResult {
    pub const ALL: [LoginResult; 12] = [
        LoginResult::Accepted,
        LoginResult::AuthFailed,
        LoginResult::UnknownDatabase,
        LoginResult::ProtocolError,
        LoginResult::Limit,
        LoginResult::UpstreamAuthFailed,
        LoginResult::UpstreamFailed,
        LoginResult::Timeout,
        LoginResult::Abandoned,
        LoginResult::Cancel,
        LoginResult::InvalidSettings,
        LoginResult::Refused,
    ];

    pub fn label(self) -> &'static str {
        match self {
            LoginResult::Accepted => "accepted",
            LoginResult::AuthFailed => "auth_failed",
            LoginResult::UnknownDatabase => "unknown_database",
            LoginResult::ProtocolError => "protocol_error",
            LoginResult::Limit => "limit",
            LoginResult::UpstreamAuthFailed => "upstream_auth_failed",
            LoginResult::UpstreamFailed => "upstream_failed",
            LoginResult::Timeout => "timeout",
            LoginResult::Abandoned => "abandoned",
            LoginResult::Cancel => "cancel",
            LoginResult::InvalidSettings => "invalid_settings",
            LoginResult::Refused => "refused",
        }
    }

    /// A refusal by the proxy's own checks (startup, authentication, caps), by SQLSTATE.
    pub fn of_refusal(code: &str) -> LoginResult {
        match code {
            "3D000" => LoginResult::UnknownDatabase,
            "08P01" | "0A000" => LoginResult::ProtocolError,
            "53300" | "54000" => LoginResult::Limit,
            c if c.starts_with("28") => LoginResult::AuthFailed,
            _ => LoginResult::Refused,
        }
    }
}

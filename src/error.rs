//! Errors the proxy reports to clients, with the SQLSTATE each one carries.
//!
//! Every error a client sees must be a proper ErrorResponse: a severity, an SQLSTATE that
//! drivers can classify, and a message that says what happened and what to do.

use bytes::BytesMut;
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::Message;

/// SQLSTATE codes the proxy itself emits (PostgreSQL `errcodes.txt`).
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CONNECTION_EXCEPTION: &str = "08000";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const QUERY_CANCELED: &str = "57014";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    pub const TRANSACTION_TIMEOUT: &str = "25P04";
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
    pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
}

/// Severity of an error the proxy emits. FATAL closes the connection afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error the proxy itself reports to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

impl ClientError {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        ClientError {
            severity: Severity::Fatal,
            code,
            message: message.into(),
            hint: None,
        }
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        ClientError {
            severity: Severity::Error,
            code,
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Append this error as an ErrorResponse message to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        let mut fields = vec![
            (b'S', self.severity.as_str().to_string()),
            (b'V', self.severity.as_str().to_string()),
            (b'C', self.code.to_string()),
            (b'M', self.message.clone()),
        ];
        if let Some(h) = &self.hint {
            fields.push((b'H', h.clone()));
        }
        // Encoding into a BytesMut only fails for messages over pgwire's size cap, which
        // our short texts never reach; fall back to a minimal frame rather than panic.
        if ErrorResponse::new(fields).encode(buf).is_err() {
            buf.extend_from_slice(b"E\0\0\0\x0cC08P01\0\0");
        }
    }

    pub fn to_bytes(&self) -> BytesMut {
        let mut b = BytesMut::with_capacity(64 + self.message.len());
        self.encode(&mut b);
        b
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.severity.as_str(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ClientError {}

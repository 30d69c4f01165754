//! `tls:` and `upstream.tls:` in proxy.yaml, as data. the `tls` module reads the files they
//! name and builds the acceptor and connector from them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// When clients must use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    /// SSLRequest is answered 'N'; clients use plaintext.
    Disable,
    /// TLS is offered; plaintext is accepted too.
    Allow,
    /// A plaintext StartupMessage gets FATAL 28000.
    Require,
    /// Like `require`, except for clients connecting from a loopback address (the
    /// application in the same pod or host), which may use plaintext.
    #[serde(alias = "require_non_loopback")]
    RequireNonLoopback,
}

/// `tls:` in proxy.yaml: TLS between clients and the proxy.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// PEM certificate chain presented to clients (leaf first).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// `disable`, `allow`, `require` or `require-non-loopback`. Default:
    /// `require-non-loopback` when a certificate is configured, else `disable`.
    #[serde(default)]
    pub mode: Option<ClientTlsMode>,
}

impl ClientTlsConfig {
    pub fn effective_mode(&self) -> ClientTlsMode {
        match (self.mode, &self.cert_file) {
            (Some(m), _) => m,
            (None, Some(_)) => ClientTlsMode::RequireNonLoopback,
            (None, None) => ClientTlsMode::Disable,
        }
    }

    /// Checks that don't touch the files (those are read by [`ClientTlsState::load`]).
    pub fn validate(&self) -> Result<(), String> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => return Err("tls.cert_file is set but tls.key_file is not".into()),
            (None, Some(_)) => return Err("tls.key_file is set but tls.cert_file is not".into()),
            _ => {}
        }
        if self.cert_file.is_none() && self.effective_mode() != ClientTlsMode::Disable {
            return Err(format!(
                "tls.mode {:?} needs tls.cert_file and tls.key_file",
                self.effective_mode()
            ));
        }
        Ok(())
    }
}

/// libpq's `sslmode` (without `allow`, which only matters for servers that refuse
/// plaintext and is better expressed as `prefer` here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    /// libpq's default.
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// `upstream.tls:` in proxy.yaml.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// Default `prefer`, as libpq.
    #[serde(default)]
    pub sslmode: SslMode,
    /// PEM CA certificate(s) the server certificate must chain to.
    #[serde(default)]
    pub root_cert: Option<PathBuf>,
    /// PEM client certificate, for servers that use `cert` authentication.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key for `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

impl UpstreamTlsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if matches!(self.sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
            && self.root_cert.is_none()
        {
            return Err(format!(
                "upstream.tls.sslmode {:?} needs upstream.tls.root_cert",
                self.sslmode
            ));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err("upstream.tls.client_cert and client_key go together".into());
        }
        Ok(())
    }
}

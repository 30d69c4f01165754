//! TLS: to clients (the proxy as a TLS server, PostgreSQL's SSLRequest and PG17 direct
//! TLS), and to PostgreSQL (libpq's `sslmode` semantics). rustls with the ring provider.
//!
//! Certificates are read when the proxy starts and again on every reload (SIGHUP or
//! `/api/reload`); a reload that cannot read them fails as a whole and the previous
//! certificates stay in use. Connections keep the TLS session they opened with.

pub mod stream;
pub mod upstream;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use crate::config::tls::{ClientTlsConfig, ClientTlsMode};
pub use stream::MaybeTls;
pub use upstream::{SslMode, UpstreamTls, UpstreamTlsConfig};

/// The ALPN protocol name PostgreSQL 17 uses, required for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} {path}: {msg}")]
    Invalid {
        what: &'static str,
        path: String,
        msg: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The client-side TLS settings in force: what new connections get.
pub struct ClientTlsState {
    pub mode: ClientTlsMode,
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl ClientTlsState {
    pub fn disabled() -> Self {
        ClientTlsState {
            mode: ClientTlsMode::Disable,
            acceptor: None,
        }
    }

    /// Reads the certificate and key and builds the acceptor.
    pub fn load(cfg: &ClientTlsConfig) -> Result<Self, TlsError> {
        cfg.validate().map_err(TlsError::Config)?;
        let mode = cfg.effective_mode();
        let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) else {
            return Ok(ClientTlsState::disabled());
        };
        let chain = read_certs(cert, "tls.cert_file")?;
        let key = read_key(key, "tls.key_file")?;
        let mut sc = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Invalid {
                what: "tls.key_file",
                path: cfg.key_file.as_deref().map(show).unwrap_or_default(),
                msg: format!("does not fit the certificate: {e}"),
            })?;
        // Clients that send ALPN must ask for "postgresql" (PostgreSQL 17 does the same);
        // direct TLS additionally requires it, checked after the handshake.
        sc.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(ClientTlsState {
            mode,
            acceptor: Some(tokio_rustls::TlsAcceptor::from(Arc::new(sc))),
        })
    }

    /// The acceptor, unless TLS is off for clients.
    pub fn offered(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        match self.mode {
            ClientTlsMode::Disable => None,
            _ => self.acceptor.as_ref(),
        }
    }

    /// Whether a plaintext login from `peer` must be refused.
    pub fn requires_tls(&self, peer: Option<IpAddr>) -> bool {
        match self.mode {
            ClientTlsMode::Disable | ClientTlsMode::Allow => false,
            ClientTlsMode::Require => true,
            // An unknown peer address is treated as remote.
            ClientTlsMode::RequireNonLoopback => !peer.is_some_and(|ip| ip.is_loopback()),
        }
    }
}

/// The proxy's client TLS, swapped on reload; each connection takes a snapshot.
pub struct ClientTls {
    current: RwLock<Arc<ClientTlsState>>,
}

impl Default for ClientTls {
    fn default() -> Self {
        ClientTls {
            current: RwLock::new(Arc::new(ClientTlsState::disabled())),
        }
    }
}

impl ClientTls {
    pub fn current(&self) -> Arc<ClientTlsState> {
        self.current.read().clone()
    }

    pub fn store(&self, state: ClientTlsState) {
        *self.current.write() = Arc::new(state);
    }
}

/// What the TLS sections of a configuration build once their files are read.
pub struct Prepared {
    pub client: ClientTlsState,
    pub upstream: Arc<UpstreamTls>,
}

/// Reads every file the configuration names and builds the client acceptor and the
/// upstream connector. Run at start and on reload, before anything is applied, so bad
/// files leave the running configuration alone.
pub fn prepare(config: &crate::config::Config) -> Result<Prepared, TlsError> {
    Ok(Prepared {
        client: ClientTlsState::load(&config.tls)?,
        upstream: Arc::new(UpstreamTls::build(&config.upstream.tls)?),
    })
}

/// The crypto provider for every TLS context of the proxy.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

pub(crate) fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: show(path),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            what,
            path: show(path),
            msg: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            what,
            path: show(path),
            msg: "contains no certificate".into(),
        });
    }
    Ok(certs)
}

pub(crate) fn read_key(
    path: &Path,
    what: &'static str,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: show(path),
        source,
    })?;
    // The parse error is not shown: it could quote key material.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::Invalid {
        what,
        path: show(path),
        msg: "contains no PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
    })
}

/// Server-side TLS handshake on a connection that is still plain. `prefix` holds bytes
/// of the ClientHello already read (direct TLS), fed to rustls before the socket.
pub async fn accept<S>(
    stream: &mut MaybeTls<S>,
    acceptor: &tokio_rustls::TlsAcceptor,
    prefix: &[u8],
) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let MaybeTls::Plain(io) = std::mem::replace(stream, MaybeTls::Broken) else {
        return Err(std::io::Error::other("TLS is already active"));
    };
    let mut feed_err = None;
    let accept = acceptor.accept_with(io, |conn| {
        let mut rest = prefix;
        while !rest.is_empty() {
            match conn.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    feed_err = Some(e);
                    break;
                }
            }
        }
        // The prefix may hold the whole ClientHello: process it now, or the handshake
        // would wait for socket bytes the client will not send before our answer.
        if feed_err.is_none() && !prefix.is_empty() {
            if let Err(e) = conn.process_new_packets() {
                feed_err = Some(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
            }
        }
    });
    if let Some(e) = feed_err {
        return Err(e);
    }
    let tls = accept.await?;
    *stream = MaybeTls::Tls(Box::new(tokio_rustls::TlsStream::Server(tls)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cert: bool, mode: Option<ClientTlsMode>) -> ClientTlsConfig {
        ClientTlsConfig {
            cert_file: cert.then(|| "c.pem".into()),
            key_file: cert.then(|| "k.pem".into()),
            mode,
        }
    }

    #[test]
    fn mode_defaults_and_validation() {
        assert_eq!(cfg(false, None).effective_mode(), ClientTlsMode::Disable);
        assert_eq!(
            cfg(true, None).effective_mode(),
            ClientTlsMode::RequireNonLoopback
        );
        assert!(cfg(false, Some(ClientTlsMode::Require)).validate().is_err());
        assert!(cfg(true, Some(ClientTlsMode::Allow)).validate().is_ok());
        let half = ClientTlsConfig {
            cert_file: Some("c.pem".into()),
            ..Default::default()
        };
        assert!(half.validate().is_err());
        let parsed: ClientTlsConfig =
            serde_yaml::from_str("{cert_file: a, key_file: b, mode: require_non_loopback}")
                .expect("alias");
        assert_eq!(parsed.mode, Some(ClientTlsMode::RequireNonLoopback));
    }

    #[test]
    fn who_must_use_tls() {
        let state = |mode| ClientTlsState {
            mode,
            acceptor: None,
        };
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        let lo6: IpAddr = "::1".parse().expect("ip");
        let remote: IpAddr = "10.1.2.3".parse().expect("ip");
        let rnl = state(ClientTlsMode::RequireNonLoopback);
        assert!(!rnl.requires_tls(Some(lo)));
        assert!(!rnl.requires_tls(Some(lo6)));
        assert!(rnl.requires_tls(Some(remote)));
        assert!(rnl.requires_tls(None), "unknown peers count as remote");
        assert!(state(ClientTlsMode::Require).requires_tls(Some(lo)));
        assert!(!state(ClientTlsMode::Allow).requires_tls(Some(remote)));
        assert!(!state(ClientTlsMode::Disable).requires_tls(Some(remote)));
    }

    #[test]
    fn unreadable_files_are_reported_without_key_material() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("k.pem");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n").expect("write");
        let c = ClientTlsConfig {
            cert_file: Some(dir.path().join("missing.pem")),
            key_file: Some(key.clone()),
            mode: None,
        };
        let e = ClientTlsState::load(&c).err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("missing.pem")),
            "{e:?}"
        );
        let e = read_key(&key, "tls.key_file").err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| !e.contains("c2VjcmV0")),
            "{e:?}"
        );
    }
}

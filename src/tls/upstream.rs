//! TLS from the proxy to PostgreSQL, with libpq's `sslmode` semantics:
//!
//! | sslmode | encrypted | certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` | if the server agrees ('S'), else plaintext | no |
//! | `require` | always | no; with `root_cert`, as `verify-ca` (libpq does the same) |
//! | `verify-ca` | always | chain to `root_cert` |
//! | `verify-full` | always | chain to `root_cert` and host name (`upstream.host`) |
//!
//! CancelRequests to PostgreSQL stay plaintext TCP (see `cancel.rs`): PostgreSQL reads
//! them before any TLS or pg_hba check, and the key in them is single-use.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stream::{has_unsolicited_input, MaybeTls};
use super::{provider, read_certs, read_key, TlsError, ALPN_POSTGRESQL};
pub use crate::config::tls::{SslMode, UpstreamTlsConfig};

/// What a server connection needs to negotiate TLS.
pub struct UpstreamTls {
    pub mode: SslMode,
    connector: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("mode", &self.mode)
            .finish()
    }
}

/// Why TLS to the server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error("the server does not support SSL, but upstream.tls.sslmode is {0:?}")]
    Refused(SslMode),
    /// Any other answer to SSLRequest; its content is not trusted or shown (an
    /// ErrorResponse here comes before any authentication: CVE-2024-10977).
    #[error("the server answered SSLRequest with an unexpected byte 0x{0:02x}")]
    BadAnswer(u8),
    #[error(
        "received unencrypted data after the server accepted SSL (possible man in the middle)"
    )]
    Unsolicited,
    #[error("upstream.host {0:?} is not a valid TLS server name")]
    BadName(String),
    #[error("TLS handshake with the server failed: {0}")]
    Handshake(std::io::Error),
    #[error("{0}")]
    Io(std::io::Error),
}

impl UpstreamTls {
    pub fn build(cfg: &UpstreamTlsConfig) -> Result<UpstreamTls, TlsError> {
        cfg.validate().map_err(TlsError::Config)?;
        if cfg.sslmode == SslMode::Disable {
            return Ok(UpstreamTls {
                mode: cfg.sslmode,
                connector: None,
            });
        }
        let provider = provider();
        let roots = match &cfg.root_cert {
            Some(p) => {
                let mut roots = RootCertStore::empty();
                for c in read_certs(p, "upstream.tls.root_cert")? {
                    roots.add(c).map_err(|e| TlsError::Invalid {
                        what: "upstream.tls.root_cert",
                        path: p.display().to_string(),
                        msg: e.to_string(),
                    })?;
                }
                Some(Arc::new(roots))
            }
            None => None,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (cfg.sslmode, roots) {
            (SslMode::VerifyFull, Some(roots)) => {
                WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?
            }
            // libpq: require with a root certificate behaves like verify-ca.
            (SslMode::VerifyCa | SslMode::Require, Some(roots)) => Arc::new(ChainOnly {
                roots,
                provider: provider.clone(),
            }),
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(TlsError::Config(
                    "verify modes need upstream.tls.root_cert".into(),
                ))
            }
            // prefer / require without a root: encrypted, not authenticated (as libpq).
            _ => Arc::new(NoVerification(provider.clone())),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut cc = match (&cfg.client_cert, &cfg.client_key) {
            (Some(c), Some(k)) => builder
                .with_client_auth_cert(
                    read_certs(c, "upstream.tls.client_cert")?,
                    read_key(k, "upstream.tls.client_key")?,
                )
                .map_err(|e| TlsError::Invalid {
                    what: "upstream.tls.client_key",
                    path: k.display().to_string(),
                    msg: format!("does not fit the certificate: {e}"),
                })?,
            _ => builder.with_no_client_auth(),
        };
        // libpq 17 sends it; older servers ignore it.
        cc.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(UpstreamTls {
            mode: cfg.sslmode,
            connector: Some(tokio_rustls::TlsConnector::from(Arc::new(cc))),
        })
    }

    /// SSLRequest and, if agreed, the TLS handshake on a fresh connection to `host`.
    pub async fn negotiate(
        &self,
        mut tcp: TcpStream,
        host: &str,
    ) -> Result<MaybeTls<TcpStream>, UpstreamTlsError> {
        let Some(connector) = self.connector.as_ref() else {
            return Ok(MaybeTls::Plain(tcp));
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| UpstreamTlsError::BadName(host.to_string()))?;
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .map_err(UpstreamTlsError::Io)?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(UpstreamTlsError::Io)?;
        match answer[0] {
            b'S' => {}
            b'N' if self.mode == SslMode::Prefer => return Ok(MaybeTls::Plain(tcp)),
            b'N' => return Err(UpstreamTlsError::Refused(self.mode)),
            other => return Err(UpstreamTlsError::BadAnswer(other)),
        }
        if has_unsolicited_input(&mut tcp).await {
            return Err(UpstreamTlsError::Unsolicited);
        }
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(UpstreamTlsError::Handshake)?;
        Ok(MaybeTls::Tls(Box::new(tokio_rustls::TlsStream::Client(
            tls,
        ))))
    }
}

/// `require` without a root certificate: the session is encrypted but the server is not
/// authenticated, exactly libpq's `sslmode=require`. Handshake signatures are still
/// checked so the peer must hold the key of the certificate it shows.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the certificate must chain to a trusted root; its names are not checked.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_validation_follows_libpq() {
        let parse = |y: &str| serde_yaml::from_str::<UpstreamTlsConfig>(y).expect("yaml");
        assert_eq!(parse("{}").sslmode, SslMode::Prefer, "libpq's default");
        assert!(parse("{sslmode: verify-full}").validate().is_err());
        assert!(parse("{sslmode: verify-ca}").validate().is_err());
        assert!(parse("{sslmode: verify-full, root_cert: ca.pem}")
            .validate()
            .is_ok());
        assert!(parse("{sslmode: require, client_cert: c.pem}")
            .validate()
            .is_err());
        assert!(serde_yaml::from_str::<UpstreamTlsConfig>("{sslmode: allow}").is_err());
        let built = UpstreamTls::build(&parse("{sslmode: disable}")).expect("build");
        assert!(built.connector.is_none());
        let built = UpstreamTls::build(&parse("{sslmode: require}")).expect("build");
        assert!(built.connector.is_some());
    }
}

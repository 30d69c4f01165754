//! Connection opening: SSL/GSS negotiation (SSLRequest and PostgreSQL 17 direct TLS),
//! StartupMessage, CancelRequest and client authentication (trust, md5,
//! SCRAM-SHA-256) against the users in the config.
//!
//! Packets before TLS are read with `read_exact` into buffers of exactly the announced
//! size, so no byte beyond an SSLRequest is ever read before the handshake: any byte
//! the client sent in the clear after it is detected and refused (CVE-2021-23214).

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::auth::{self, md5_salt, mock_server_for, verify_md5, ScramServer, Secret};
use crate::config::{AuthMethod, Config};
use crate::error::{sqlstate, ClientError};
use crate::protocol::framing::{fe, frontend_header, AUTH_MESSAGE_LIMIT};
use crate::protocol::messages;
use crate::protocol::startup::{parse_startup, startup_len, StartupError, StartupPacket};
use crate::tls::stream::has_unsolicited_input;
use crate::tls::{ClientTlsState, MaybeTls, ALPN_POSTGRESQL};

/// First byte of a TLS handshake record: a client starting TLS directly (PostgreSQL 17
/// `sslnegotiation=direct`) instead of sending an SSLRequest.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a successful opening yields.
#[derive(Debug)]
pub enum Opening {
    Login(Login),
    Cancel { pid: i32, secret: Vec<u8> },
}

#[derive(Debug)]
pub struct Login {
    pub user: String,
    pub database: String,
    pub params: Vec<(String, String)>,
}

/// Why the opening ended without a login. `None` means close silently.
pub type OpeningError = Option<ClientError>;

fn protocol_violation(msg: impl Into<String>) -> OpeningError {
    Some(ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, msg))
}

/// Writes and flushes (TLS buffers writes).
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Result<(), OpeningError> {
    stream.write_all(bytes).await.map_err(|_| None)?;
    stream.flush().await.map_err(|_| None)
}

/// Reads packets until a StartupMessage or CancelRequest. SSLRequest is answered 'S'
/// and followed by the TLS handshake when `tls` offers it, else 'N'; GSSENCRequest is
/// answered 'N'. Each at most once, and neither after TLS is up (PostgreSQL's rules;
/// unbounded renegotiation was CVE-2026-6479). `peer` decides `require-non-loopback`.
pub async fn read_opening<S>(
    stream: &mut MaybeTls<S>,
    leftover: &mut BytesMut,
    tls: &ClientTlsState,
    peer: Option<IpAddr>,
) -> Result<Opening, OpeningError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ssl_done, mut gss_done) = (false, false);
    let mut first = true;
    loop {
        if !fill(stream, leftover, 4).await {
            return Err(None);
        }
        if std::mem::take(&mut first) && leftover[0] == TLS_HANDSHAKE_RECORD {
            // Everything read so far is the start of the ClientHello.
            let hello = leftover.split();
            // Boxed, as the handshake below: a TLS accept is over a kilobyte of future,
            // which every plain login would otherwise carry and copy.
            Box::pin(direct_tls(stream, tls, &hello)).await?;
            (ssl_done, gss_done) = (true, true);
            continue;
        }
        let prefix = [leftover[0], leftover[1], leftover[2], leftover[3]];
        let len = startup_len(prefix).map_err(|e| protocol_violation(e.to_string()))?;
        if !fill(stream, leftover, len).await {
            return Err(None);
        }
        let packet = leftover.split_to(len);
        match parse_startup(&packet) {
            Ok(StartupPacket::SslRequest) if !ssl_done => {
                ssl_done = true;
                if !leftover.is_empty() {
                    return Err(unsolicited("SSL"));
                }
                refuse_unsolicited(stream, "SSL").await?;
                match tls.offered() {
                    Some(acceptor) => {
                        send(stream, b"S").await?;
                        let accept = Box::pin(crate::tls::accept(stream, acceptor, &[]));
                        if let Err(e) = accept.await {
                            tracing::debug!(error = %e, "client TLS handshake failed");
                            return Err(None);
                        }
                        // Encryption ends negotiation, as in PostgreSQL.
                        gss_done = true;
                    }
                    None => send(stream, b"N").await?,
                }
            }
            Ok(StartupPacket::GssEncRequest) if !gss_done => {
                gss_done = true;
                if !leftover.is_empty() {
                    return Err(unsolicited("GSS encryption"));
                }
                refuse_unsolicited(stream, "GSS encryption").await?;
                send(stream, b"N").await?;
            }
            Ok(StartupPacket::SslRequest | StartupPacket::GssEncRequest) => {
                return Err(protocol_violation("repeated SSL or GSS encryption request"));
            }
            Ok(StartupPacket::Cancel { pid, secret }) => {
                return Ok(Opening::Cancel { pid, secret })
            }
            Ok(StartupPacket::Startup { minor, params }) => {
                return login_from_startup(stream, tls, peer, minor, params).await;
            }
            Err(e @ StartupError::UnsupportedVersion(..)) => {
                return Err(Some(ClientError::fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    e.to_string(),
                )))
            }
            Err(e) => return Err(protocol_violation(e.to_string())),
        }
    }
}

/// The StartupMessage: TLS required or not, protocol options not supported (answered
/// with NegotiateProtocolVersion, as PostgreSQL does), the user and database.
async fn login_from_startup<S>(
    stream: &mut MaybeTls<S>,
    tls: &ClientTlsState,
    peer: Option<IpAddr>,
    minor: u16,
    params: Vec<(String, String)>,
) -> Result<Opening, OpeningError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !stream.is_tls() && tls.requires_tls(peer) {
        // PostgreSQL's words for a hostssl-only pg_hba: 28000 as well.
        return Err(Some(
            ClientError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "pgsidecar: SSL required: this proxy does not accept unencrypted connections",
            )
            .with_hint("connect with sslmode=require (or verify-ca / verify-full)"),
        ));
    }
    if minor > 0 || params.iter().any(|(k, _)| k.starts_with("_pq_.")) {
        // Like PostgreSQL: offer 3.0 and list the protocol options we do not know.
        let unsupported: Vec<String> = params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = BytesMut::new();
        out.extend_from_slice(b"v");
        let body_len: usize = 4 + 4 + 4 + unsupported.iter().map(|s| s.len() + 1).sum::<usize>();
        out.extend_from_slice(&(body_len as i32).to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&(unsupported.len() as i32).to_be_bytes());
        for u in &unsupported {
            out.extend_from_slice(u.as_bytes());
            out.extend_from_slice(b"\0");
        }
        send(stream, &out).await?;
    }
    let mut params: Vec<_> = params
        .into_iter()
        .filter(|(k, _)| !k.starts_with("_pq_."))
        .collect();
    // The names move out of the list (no copy per login); they are not settings.
    let mut take = |k: &str| {
        let i = params.iter().position(|(n, _)| n == k)?;
        Some(params.remove(i).1)
    };
    let user = take("user");
    let database = take("database");
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return Err(Some(ClientError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )));
    };
    if let Some((_, r)) = params.iter().find(|(n, _)| n == "replication") {
        if !matches!(r.as_str(), "false" | "off" | "no" | "0") {
            return Err(Some(ClientError::fatal(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "pgsidecar does not pool replication connections; connect to PostgreSQL directly",
            )));
        }
    }
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    // Bytes after the startup packet stay in `leftover`: PostgreSQL reads
    // messages a client sent ahead, and so do we.
    Ok(Opening::Login(Login {
        user,
        database,
        params,
    }))
}

/// After an SSLRequest or GSSENCRequest, before answering: the client must wait for the
/// answer, so bytes already there were sent unencrypted and may be injected.
async fn refuse_unsolicited<S>(stream: &mut MaybeTls<S>, what: &str) -> Result<(), OpeningError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if has_unsolicited_input(stream).await {
        return Err(unsolicited(what));
    }
    Ok(())
}

fn unsolicited(what: &str) -> OpeningError {
    protocol_violation(format!("received unencrypted data after {what} request"))
}

/// Reads until `buf` holds `need` bytes. Each read takes whatever has arrived, so a
/// packet usually costs one read (and a short read tells tokio the socket is drained,
/// so the unsolicited-input check after an SSLRequest costs no system call).
async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut, need: usize) -> bool {
    while buf.len() < need {
        buf.reserve((need - buf.len()).max(OPENING_READ));
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
    }
    true
}

/// Read size during the opening: a startup packet fits, usually in one read.
const OPENING_READ: usize = 512;

/// A client that starts with a TLS ClientHello: PostgreSQL 17 direct TLS. The ALPN
/// protocol "postgresql" is required, as PostgreSQL requires it, so a TLS client of
/// another protocol cannot be confused for a PostgreSQL one. Closes silently on failure
/// (there is no channel to report on).
async fn direct_tls<S>(
    stream: &mut MaybeTls<S>,
    tls: &ClientTlsState,
    prefix: &[u8],
) -> Result<(), OpeningError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(acceptor) = tls.offered() else {
        tracing::debug!("direct TLS connection refused: TLS is not enabled for clients");
        return Err(None);
    };
    if let Err(e) = crate::tls::accept(stream, acceptor, prefix).await {
        tracing::debug!(error = %e, "direct TLS handshake failed");
        return Err(None);
    }
    if stream.alpn() != Some(ALPN_POSTGRESQL) {
        tracing::debug!("direct TLS connection without ALPN \"postgresql\" refused");
        let _ = stream.shutdown().await;
        return Err(None);
    }
    Ok(())
}

/// Reads one password-family ('p') message body.
async fn read_password_message<S>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<BytesMut, OpeningError>
where
    S: AsyncRead + Unpin,
{
    loop {
        match frontend_header(buf, AUTH_MESSAGE_LIMIT) {
            Ok(Some(h)) if h.tag == fe::PASSWORD => {
                if buf.len() >= h.frame_len() {
                    let mut frame = buf.split_to(h.frame_len());
                    frame.advance(5);
                    return Ok(frame);
                }
            }
            Ok(Some(h)) if h.tag == fe::TERMINATE => return Err(None),
            Ok(Some(h)) => {
                return Err(protocol_violation(format!(
                    "expected password response, got message type {}",
                    h.tag as char
                )))
            }
            Ok(None) => {}
            Err(e) => return Err(protocol_violation(e.to_string())),
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
}

fn auth_failed(user: &str) -> OpeningError {
    Some(ClientError::fatal(
        sqlstate::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    ))
}

/// Authenticates the client. On success returns the last message(s) of the exchange
/// (AuthenticationOk), unsent: the caller sends them with the rest of the login reply.
pub async fn authenticate<S>(
    stream: &mut S,
    config: &Config,
    user: &str,
    buf: &mut BytesMut,
) -> Result<BytesMut, OpeningError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    warm_verifiers(config);
    let entry = config.find_user(user);
    let secret = entry.and_then(|u| u.password.as_deref()).map(Secret::parse);
    if entry.is_none() && !config.users.is_empty() && config.auth.method == AuthMethod::Trust {
        return Err(Some(ClientError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            format!("role \"{user}\" is not allowed to connect through pgsidecar"),
        )));
    }
    // Room for the whole login reply (AuthenticationOk, a dozen ParameterStatus, the
    // cancel key, ReadyForQuery), which the caller appends: one allocation per login.
    let mut out = BytesMut::with_capacity(1024);
    let method = match (config.auth.method, &secret) {
        (AuthMethod::Trust, _) => AuthMethod::Trust,
        // Like PostgreSQL, md5 falls back to SCRAM for users stored as SCRAM verifiers.
        (AuthMethod::Md5, Some(Secret::Scram(_))) => AuthMethod::ScramSha256,
        (m, _) => m,
    };
    match method {
        AuthMethod::Trust => {}
        AuthMethod::Md5 => {
            let salt = md5_salt();
            messages::auth_md5(&mut out, salt);
            send(stream, &out).await?;
            // `out` is reused for AuthenticationOk below: the request must not go twice.
            out.clear();
            let body = read_password_message(stream, buf).await?;
            // Unknown users are checked against a throwaway secret, so the work (and the
            // time) is the same as for a wrong password.
            let unknown = Secret::Plain("pgsidecar-unknown-user".into());
            let ok = verify_md5(secret.as_ref().unwrap_or(&unknown), user, salt, &body)
                & secret.is_some();
            if !ok {
                return Err(auth_failed(user));
            }
        }
        AuthMethod::ScramSha256 => {
            // Unknown users get a mock exchange so they fail exactly like a wrong password.
            let mut server = match &secret {
                Some(s) => {
                    ScramServer::new_for_user(user, s).unwrap_or_else(|| mock_server_for(user))
                }
                None => mock_server_for(user),
            };
            messages::auth_sasl(&mut out);
            send(stream, &out).await?;
            out.clear();
            let body = read_password_message(stream, buf).await?;
            let data = parse_sasl_initial(&body)
                .ok_or_else(|| protocol_violation("malformed SASLInitialResponse message"))?;
            let first = server.handle_client_first(data).map_err(|e| {
                tracing::debug!(user, error = %e, "SCRAM client-first rejected");
                auth_failed(user)
            })?;
            messages::auth_sasl_continue(&mut out, &first);
            send(stream, &out).await?;
            out.clear();
            let body = read_password_message(stream, buf).await?;
            let fin = server.handle_client_final(&body).map_err(|e| {
                tracing::debug!(user, error = %e, "SCRAM client-final rejected");
                auth_failed(user)
            })?;
            messages::auth_sasl_final(&mut out, &fin);
        }
    }
    messages::auth_ok(&mut out);
    Ok(out)
}

/// Derives the SCRAM verifiers of plaintext passwords once per configuration (see
/// `ScramServer::new_for_user`), before the first login that could be timed.
fn warm_verifiers(config: &Config) {
    static WARMED_FOR: AtomicUsize = AtomicUsize::new(0);
    let id = config as *const Config as usize;
    if WARMED_FOR.swap(id, Ordering::Relaxed) != id {
        auth::scram::warm_plain_verifiers(
            config
                .users
                .iter()
                .filter_map(|u| Some((u.name.as_str(), u.password.as_deref()?)))
                .filter(|(_, p)| matches!(Secret::parse(p), Secret::Plain(_))),
        );
    }
}

/// SASLInitialResponse body: mechanism name, i32 length (-1 for none), data.
pub(crate) fn parse_sasl_initial(body: &[u8]) -> Option<&[u8]> {
    let mut pos = 0;
    let mech = crate::protocol::framing::read_cstr(body, &mut pos)?;
    if mech != auth::scram::MECHANISM.as_bytes() {
        return None;
    }
    let len_bytes = body.get(pos..pos + 4)?;
    let len = i32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    let data = body.get(pos + 4..)?;
    if len < 0 || len as usize != data.len() {
        return None;
    }
    Some(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_initial_is_parsed_defensively() {
        let mut b = b"SCRAM-SHA-256\0".to_vec();
        b.extend_from_slice(&3i32.to_be_bytes());
        b.extend_from_slice(b"abc");
        assert_eq!(parse_sasl_initial(&b), Some(&b"abc"[..]));
        let mut bad = b"SCRAM-SHA-256\0".to_vec();
        bad.extend_from_slice(&(-5i32).to_be_bytes());
        assert_eq!(parse_sasl_initial(&bad), None);
        assert_eq!(parse_sasl_initial(b"SCRAM-SHA-256\0\0\0"), None);
        assert_eq!(parse_sasl_initial(b"PLAIN\0\0\0\0\0"), None);
    }
}

//! Opening one server connection: TCP (with the upstream's keepalive and user timeout),
//! TLS as `upstream.tls` says, the startup packet and authentication (cleartext, MD5 or
//! SCRAM-SHA-256), up to the first ReadyForQuery.

use crate::server::params::Settings;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::prepared::PreparedCache;
use super::{
    params, ConnectError, ServerConn, ServerConnState, ServerIdentity, ServerStream, NEXT_ID,
    STARTUP_MESSAGE_LIMIT,
};
use crate::error::sqlstate;
use crate::protocol::framing::backend_header;

impl ServerConn {
    /// Connects to one host and logs in (no time limit: the caller sets it). The host
    /// name is resolved again on every connect.
    pub(super) async fn login(
        ident: &ServerIdentity,
        index: usize,
        application_name: &str,
        max_prepared: usize,
    ) -> Result<ServerConn, ConnectError> {
        let target = ident.hosts.get(index);
        let addr = &target.to_string();
        let io_err = |source| ConnectError::Io {
            addr: addr.to_string(),
            source,
        };
        let (mut stream, sever) = open_stream(ident, index, addr).await?;
        let mut buf = BytesMut::with_capacity(512);
        let params = [
            ("user", ident.user.as_str()),
            ("database", ident.database.as_str()),
            ("application_name", application_name),
        ];
        frontend::startup_message(params.iter().copied(), &mut buf)
            .map_err(|e| ConnectError::Protocol(e.to_string()))?;
        stream.write_all(&buf).await.map_err(io_err)?;
        stream.flush().await.map_err(io_err)?;
        buf.clear();

        let mut auth = Auth { scram: None };
        let mut original_params = Settings::default();
        let (mut pid, mut secret) = (0, 0);
        loop {
            match read_message(&mut stream, &mut buf).await.map_err(io_err)? {
                Message::AuthenticationOk | Message::NoticeResponse(_) => {}
                Message::ParameterStatus(body) => {
                    if let (Ok(k), Ok(v)) = (body.name(), body.value()) {
                        original_params.insert(k.to_string(), v.to_string());
                    }
                }
                Message::BackendKeyData(body) => {
                    pid = body.process_id();
                    secret = body.secret_key();
                }
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                Message::ReadyForQuery(_) => break,
                other => auth.answer(other, &mut stream, ident, addr).await?,
            }
        }
        let now = Instant::now();
        Ok(ServerConn(Box::new(ServerConnState {
            stream,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            backend_pid: pid,
            backend_secret: secret,
            host: target.host.as_str().into(),
            port: target.port,
            host_index: index,
            sever,
            params: original_params.clone(),
            params_fp: 0,
            raw_settings: params::RawSettings::new(),
            original_params,
            created: now,
            retire: std::cell::Cell::new(None),
            last_used: now,
            prepared: PreparedCache::new(max_prepared),
            dirty: false,
            errors: 0,
        })))
    }
}

/// TCP to host `index` (with the upstream's keepalive and user timeout), then TLS as
/// `upstream.tls` says. The socket is also kept as `sever`, so a failover can cut it.
async fn open_stream(
    ident: &ServerIdentity,
    index: usize,
    addr: &str,
) -> Result<(ServerStream, Option<Arc<socket2::Socket>>), ConnectError> {
    let target = ident.hosts.get(index);
    let io_err = |source| ConnectError::Io {
        addr: addr.to_string(),
        source,
    };
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(io_err)?;
    tcp.set_nodelay(true).map_err(io_err)?;
    ident.tcp.apply(&tcp);
    let sever = socket2::SockRef::from(&tcp).try_clone().ok().map(Arc::new);
    if let Some(s) = &sever {
        ident.hosts.track(index, s);
    }
    let stream = ident
        .tls
        .negotiate(tcp, &target.host)
        .await
        .map_err(|source| ConnectError::Tls {
            addr: addr.to_string(),
            source,
        })?;
    Ok((stream, sever))
}

/// The client side of the server's authentication request (cleartext, MD5 or
/// SCRAM-SHA-256).
struct Auth {
    scram: Option<ScramSha256>,
}

impl Auth {
    async fn answer(
        &mut self,
        msg: Message,
        stream: &mut ServerStream,
        ident: &ServerIdentity,
        addr: &str,
    ) -> Result<(), ConnectError> {
        let io_err = |source| ConnectError::Io {
            addr: addr.to_string(),
            source,
        };
        match msg {
            Message::AuthenticationCleartextPassword => {
                let pw = password(ident)?;
                send(stream, |b| frontend::password_message(pw.as_bytes(), b))
                    .await
                    .map_err(io_err)
            }
            Message::AuthenticationMd5Password(body) => {
                let pw = password(ident)?;
                let hash = postgres_protocol::authentication::md5_hash(
                    ident.user.as_bytes(),
                    pw.as_bytes(),
                    body.salt(),
                );
                send(stream, |b| frontend::password_message(hash.as_bytes(), b))
                    .await
                    .map_err(io_err)
            }
            Message::AuthenticationSasl(body) => {
                let mut mechs = body.mechanisms();
                let mut has_scram = false;
                while let Ok(Some(m)) = mechs.next() {
                    has_scram |= m == "SCRAM-SHA-256";
                }
                if !has_scram {
                    return Err(ConnectError::Protocol(
                        "server offers no SASL mechanism we support (SCRAM-SHA-256)".into(),
                    ));
                }
                let pw = password(ident)?;
                let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                send(stream, |b| {
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), b)
                })
                .await
                .map_err(io_err)?;
                self.scram = Some(s);
                Ok(())
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = self.scram.as_mut().ok_or_else(|| {
                    ConnectError::Protocol("SASL continue without SASL start".into())
                })?;
                s.update(body.data())
                    .map_err(|e| ConnectError::Protocol(format!("SCRAM: {e}")))?;
                let msg = s.message().to_vec();
                send(stream, |b| frontend::sasl_response(&msg, b))
                    .await
                    .map_err(io_err)
            }
            Message::AuthenticationSaslFinal(body) => {
                let s = self.scram.as_mut().ok_or_else(|| {
                    ConnectError::Protocol("SASL final without SASL start".into())
                })?;
                s.finish(body.data()).map_err(|e| {
                    ConnectError::Protocol(format!("SCRAM server signature invalid: {e}"))
                })
            }
            _ => Err(ConnectError::Protocol(
                "unexpected message during server startup".into(),
            )),
        }
    }
}

/// A server's ErrorResponse during login.
fn server_error(body: &postgres_protocol::message::backend::ErrorResponseBody) -> ConnectError {
    let mut fields = body.fields();
    let (mut code, mut message, mut fatal) = (String::new(), String::new(), true);
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'V' => fatal = f.value_bytes() != b"ERROR",
            _ => {}
        }
    }
    ConnectError::Server {
        code,
        message,
        fatal,
    }
}

fn password(ident: &ServerIdentity) -> Result<&str, ConnectError> {
    ident.password.as_deref().ok_or_else(|| ConnectError::Server {
        code: sqlstate::INVALID_PASSWORD.into(),
        message: format!(
            "pgsidecar: the server asks for a password for role \"{}\" but none is configured (set upstream.password or the user's server_password)",
            ident.user
        ),
        fatal: true,
    })
}

async fn send<F>(stream: &mut ServerStream, f: F) -> std::io::Result<()>
where
    F: FnOnce(&mut BytesMut) -> std::io::Result<()>,
{
    let mut buf = BytesMut::new();
    f(&mut buf)?;
    stream.write_all(&buf).await?;
    // TLS buffers writes.
    stream.flush().await
}

/// Reads one whole backend message during startup, with a size cap.
async fn read_message(stream: &mut ServerStream, buf: &mut BytesMut) -> std::io::Result<Message> {
    loop {
        if let Some(h) = backend_header(buf, STARTUP_MESSAGE_LIMIT)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?
        {
            if buf.len() >= h.frame_len() {
                if let Some(m) = Message::parse(buf)? {
                    return Ok(m);
                }
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

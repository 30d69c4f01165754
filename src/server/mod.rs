//! A connection from the proxy to PostgreSQL: connect, authenticate, learn the server's
//! parameters and cancel key, then hand the socket to the data path.

mod codes;
pub mod params;
pub mod prepared;

pub(crate) use codes::{leak_code, leak_code_or, refused_code_in};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::error::{sqlstate, ClientError, Severity};
use crate::protocol::framing::{backend_header, be};
use crate::protocol::messages;
use prepared::PreparedCache;

/// Where and as whom a pool's server connections log in.
#[derive(Clone)]
pub struct ServerIdentity {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub connect_timeout: Duration,
    /// TLS settings (`upstream.tls`); `prepared` holds the connector.
    pub tls: crate::tls::UpstreamTlsConfig,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("database", &self.database)
            .field("sslmode", &self.tls.sslmode)
            .finish_non_exhaustive()
    }
}

/// Why a server connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not connect to {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out after {0:?} connecting to {1}")]
    Timeout(Duration, String),
    /// PostgreSQL refused the login; its own error is passed on to the client.
    #[error("server refused the login: {code} {message}")]
    Server {
        code: String,
        message: String,
        fatal: bool,
    },
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("TLS to {addr}: {source}")]
    Tls {
        addr: String,
        source: crate::tls::upstream::UpstreamTlsError,
    },
}

impl ConnectError {
    /// Whether this failure says something about the upstream's health (for the breaker):
    /// an authentication refusal is a configuration problem, not an outage.
    pub fn is_refused_login(&self) -> bool {
        matches!(self, ConnectError::Server { code, .. } if code.starts_with("28"))
    }

    pub fn sqlstate(&self) -> &str {
        match self {
            ConnectError::Server { code, .. } => code,
            _ => sqlstate::CONNECTION_FAILURE,
        }
    }

    pub fn to_client_error(&self) -> ClientError {
        match self {
            ConnectError::Server { code, message, .. } => {
                // Pass PostgreSQL's own verdict through (e.g. 28P01, 3D000, 53300).
                let code = leak_code(code);
                ClientError {
                    severity: Severity::Error,
                    code,
                    message: message.clone(),
                    hint: None,
                }
            }
            other => ClientError::error(
                sqlstate::CONNECTION_FAILURE,
                format!("pgsidecar: the database is unreachable: {other}"),
            )
            .with_hint("check that PostgreSQL is running and upstream.host/port are right; the request can be retried"),
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The connection to PostgreSQL.
pub type ServerStream = crate::tls::MaybeTls<TcpStream>;

/// One authenticated connection to PostgreSQL.
/// A server connection. Boxed: it moves between the pool's idle list, leases and
/// sessions on every transaction, and a pointer moves for free (no copy, no allocation
/// per checkout).
#[derive(Debug)]
pub struct ServerConn(Box<ServerConnState>);

impl std::ops::Deref for ServerConn {
    type Target = ServerConnState;
    fn deref(&self) -> &ServerConnState {
        &self.0
    }
}

impl std::ops::DerefMut for ServerConn {
    fn deref_mut(&mut self) -> &mut ServerConnState {
        &mut self.0
    }
}

pub struct ServerConnState {
    /// Plain TCP or TLS, as `upstream.tls.sslmode` and the server decided.
    pub stream: ServerStream,
    pub id: u64,
    /// The server's own cancel key, used to forward a client's CancelRequest.
    pub backend_pid: i32,
    pub backend_secret: i32,
    /// Shared with the cancel target set at every checkout (no copy per transaction).
    pub host: std::sync::Arc<str>,
    pub port: u16,
    /// Parameters as the server reported them at startup (its defaults).
    pub original_params: HashMap<String, String>,
    /// Parameters as they are now, kept up to date from ParameterStatus and our own SETs.
    pub params: HashMap<String, String>,
    /// Fingerprint of the client settings `params` was last made to match (0: unknown);
    /// equal to a client's own fingerprint means no SET is needed at checkout.
    pub params_fp: u64,
    /// Settings a client set with SQL `SET` that the server does not report.
    pub raw_settings: params::RawSettings,
    pub created: Instant,
    pub last_used: Instant,
    /// Statements prepared on this connection under proxy-wide names (transaction mode).
    pub prepared: PreparedCache,
    /// The session changed state that a reset query should clear (session mode).
    pub dirty: bool,
    /// I/O or protocol errors seen on this connection; too many retire it.
    pub errors: u32,
    /// Randomised lifetime so connections opened together do not all expire together.
    pub lifetime: Duration,
}

impl std::fmt::Debug for ServerConnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("id", &self.id)
            .field("backend_pid", &self.backend_pid)
            .finish_non_exhaustive()
    }
}

/// How one of the proxy's own queries went on a connection that is still usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryOutcome {
    /// The first row's columns as text (None: SQL NULL); empty if there was no row.
    Rows(Vec<Option<String>>),
    /// The server answered with an error and the connection is idle.
    ServerError(String),
}

/// Largest message accepted during server startup (auth exchanges and parameters are small).
const STARTUP_MESSAGE_LIMIT: usize = 1 << 20;

impl ServerConn {
    /// Connects and authenticates within `ident.connect_timeout`.
    pub async fn connect(
        ident: &ServerIdentity,
        application_name: &str,
        max_prepared: usize,
        lifetime: Duration,
    ) -> Result<ServerConn, ConnectError> {
        let addr = format!("{}:{}", ident.host, ident.port);
        match tokio::time::timeout(
            ident.connect_timeout,
            Self::connect_inner(ident, &addr, application_name, max_prepared, lifetime),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout(ident.connect_timeout, addr)),
        }
    }

    async fn connect_inner(
        ident: &ServerIdentity,
        addr: &str,
        application_name: &str,
        max_prepared: usize,
        lifetime: Duration,
    ) -> Result<ServerConn, ConnectError> {
        let io_err = |source| ConnectError::Io {
            addr: addr.to_string(),
            source,
        };
        let tcp = TcpStream::connect(addr).await.map_err(io_err)?;
        tcp.set_nodelay(true).map_err(io_err)?;
        set_keepalive(&tcp);
        let mut stream = match &ident.tls.prepared {
            Some(tls) => tls.negotiate(tcp, &ident.host).await,
            // An identity built from a configuration that was never prepared (files not
            // read): build the connector now.
            None => match crate::tls::UpstreamTls::build(&ident.tls) {
                Ok(tls) => tls.negotiate(tcp, &ident.host).await,
                Err(e) => return Err(ConnectError::Protocol(format!("upstream.tls: {e}"))),
            },
        }
        .map_err(|source| ConnectError::Tls {
            addr: addr.to_string(),
            source,
        })?;

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

        let mut scram: Option<ScramSha256> = None;
        let mut original_params = HashMap::new();
        let (mut pid, mut secret) = (0, 0);
        loop {
            let msg = read_message(&mut stream, &mut buf).await.map_err(io_err)?;
            match msg {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let pw = password(ident)?;
                    send(&mut stream, |b| {
                        frontend::password_message(pw.as_bytes(), b)
                    })
                    .await
                    .map_err(io_err)?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = password(ident)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        ident.user.as_bytes(),
                        pw.as_bytes(),
                        body.salt(),
                    );
                    send(&mut stream, |b| {
                        frontend::password_message(hash.as_bytes(), b)
                    })
                    .await
                    .map_err(io_err)?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut has_scram = false;
                    while let Ok(Some(m)) = mechs.next() {
                        if m == "SCRAM-SHA-256" {
                            has_scram = true;
                        }
                    }
                    if !has_scram {
                        return Err(ConnectError::Protocol(
                            "server offers no SASL mechanism we support (SCRAM-SHA-256)".into(),
                        ));
                    }
                    let pw = password(ident)?;
                    let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                    send(&mut stream, |b| {
                        frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), b)
                    })
                    .await
                    .map_err(io_err)?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ConnectError::Protocol("SASL continue without SASL start".into())
                    })?;
                    s.update(body.data())
                        .map_err(|e| ConnectError::Protocol(format!("SCRAM: {e}")))?;
                    let msg = s.message().to_vec();
                    send(&mut stream, |b| frontend::sasl_response(&msg, b))
                        .await
                        .map_err(io_err)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ConnectError::Protocol("SASL final without SASL start".into())
                    })?;
                    s.finish(body.data()).map_err(|e| {
                        ConnectError::Protocol(format!("SCRAM server signature invalid: {e}"))
                    })?;
                }
                Message::ParameterStatus(body) => {
                    if let (Ok(k), Ok(v)) = (body.name(), body.value()) {
                        original_params.insert(k.to_string(), v.to_string());
                    }
                }
                Message::BackendKeyData(body) => {
                    pid = body.process_id();
                    secret = body.secret_key();
                }
                Message::NoticeResponse(_) => {}
                Message::ErrorResponse(body) => {
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
                    return Err(ConnectError::Server {
                        code,
                        message,
                        fatal,
                    });
                }
                Message::ReadyForQuery(_) => break,
                _ => {
                    return Err(ConnectError::Protocol(
                        "unexpected message during server startup".into(),
                    ))
                }
            }
        }
        let now = Instant::now();
        Ok(ServerConn(Box::new(ServerConnState {
            stream,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            backend_pid: pid,
            backend_secret: secret,
            host: ident.host.as_str().into(),
            port: ident.port,
            params: original_params.clone(),
            params_fp: 0,
            raw_settings: params::RawSettings::new(),
            original_params,
            created: now,
            last_used: now,
            prepared: PreparedCache::new(max_prepared),
            dirty: false,
            errors: 0,
            lifetime,
        })))
    }

    /// Runs a simple query whose results nobody needs (reset, rollback, health check) and
    /// checks that the connection ends idle. Any error makes the connection unusable.
    pub async fn run_quiet(&mut self, sql: &str, limit: Duration) -> Result<(), String> {
        match self.run_simple(sql, limit).await? {
            QueryOutcome::Rows(_) => Ok(()),
            QueryOutcome::ServerError(e) => Err(e),
        }
    }

    /// Runs one of the proxy's own simple queries and returns the first row, as text.
    /// Err: the connection is unusable (I/O, protocol, not idle afterwards, no answer
    /// within `limit`); a server error on an idle connection is an outcome.
    pub async fn query_row(&mut self, sql: &str, limit: Duration) -> Result<QueryOutcome, String> {
        self.run_simple(sql, limit).await
    }

    async fn run_simple(&mut self, sql: &str, limit: Duration) -> Result<QueryOutcome, String> {
        let mut buf = BytesMut::new();
        messages::fe_query(&mut buf, sql);
        let fut = async {
            self.stream
                .write_all(&buf)
                .await
                .map_err(|e| e.to_string())?;
            self.stream.flush().await.map_err(|e| e.to_string())?;
            buf.clear();
            let mut failed = None;
            let mut row = None;
            loop {
                let (tag, body) = read_raw(&mut self.stream, &mut buf)
                    .await
                    .map_err(|e| e.to_string())?;
                match tag {
                    be::READY_FOR_QUERY => {
                        let status = body.first().copied().unwrap_or(b'?');
                        if status != b'I' {
                            return Err(format!("server left in state {}", status as char));
                        }
                        return Ok(match failed {
                            Some(e) => QueryOutcome::ServerError(e),
                            None => QueryOutcome::Rows(row.unwrap_or_default()),
                        });
                    }
                    be::DATA_ROW if row.is_none() => row = Some(messages::data_row_text(&body)),
                    be::ERROR_RESPONSE => {
                        let (code, msg, _) = messages::error_fields(&body);
                        failed = Some(format!(
                            "{}: {}",
                            code.unwrap_or_default(),
                            msg.unwrap_or_default()
                        ));
                    }
                    be::PARAMETER_STATUS => {
                        if let Some((k, v)) = messages::parse_parameter_status(&body) {
                            self.params.insert(k, v);
                        }
                    }
                    be::COPY_IN_RESPONSE | be::COPY_OUT_RESPONSE | be::COPY_BOTH_RESPONSE => {
                        return Err("unexpected COPY from an internal query".into())
                    }
                    _ => {}
                }
            }
        };
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {limit:?}")),
        }
    }

    /// Sends Terminate so PostgreSQL logs a clean disconnect; errors are irrelevant here.
    pub async fn close(mut self) {
        let mut buf = BytesMut::new();
        messages::fe_terminate(&mut buf);
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            let _ = self.stream.write_all(&buf).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
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

/// Reads one raw backend message (type, body) for internal queries.
async fn read_raw(
    stream: &mut ServerStream,
    buf: &mut BytesMut,
) -> std::io::Result<(u8, BytesMut)> {
    loop {
        if let Some(h) = backend_header(buf, STARTUP_MESSAGE_LIMIT)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?
        {
            if buf.len() >= h.frame_len() {
                let mut frame = buf.split_to(h.frame_len());
                frame.advance(5);
                return Ok((h.tag, frame));
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// TCP keepalives detect a vanished peer on otherwise idle connections.
pub fn set_keepalive(stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    let _ = sock.set_tcp_keepalive(&ka);
}

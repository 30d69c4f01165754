//! A client's way in: the opening (TLS, startup, authentication) and the start of its
//! session, then the session's run to the end.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::admission;
use super::handshake::{self, Login, Opening};
use super::Shared;
use super::{ReadReady, Session};
use crate::clients::ClientPhase;
use crate::error::{sqlstate, ClientError};
use crate::metrics::LoginResult;

/// An accepted client connection, before the opening.
pub struct Accepted<C> {
    pub client: C,
    pub peer: SocketAddr,
    pub shared: Arc<Shared>,
}

/// Serves one accepted client connection to the end.
///
/// Login runs in its own boxed future, dropped once the client is in: the task an idle
/// client parks in then holds just a pointer to its boxed session (RSS per idle client).
/// Its steps run inline in that one box (one allocation per login, not one per step);
/// only the rare refusal paths are boxed apart.
pub async fn serve<C>(accepted: Box<Accepted<C>>)
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    let Some((mut session, _slot)) = Box::pin(open(accepted)).await else {
        return;
    };
    if tracing::enabled!(tracing::Level::DEBUG) {
        Box::pin(run_in_span(session)).await;
    } else {
        session.run_to_end().await;
    }
}

/// With debug logging on, every log line of the session says which client it is about.
/// At the default level there is no span: no allocation per client, no enter per poll.
async fn run_in_span<C>(mut session: Box<Session<crate::tls::MaybeTls<C>>>)
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    let span = match session.entry.as_ref().map(|e| e.info.clone()) {
        Some(i) => {
            tracing::debug_span!("client", peer = %i.addr, user = %i.user(), db = %i.database(), app = %i.application_name)
        }
        None => tracing::Span::none(),
    };
    tracing::Instrument::instrument(session.run_to_end(), span).await;
}

type Opened<C> = (Box<Session<crate::tls::MaybeTls<C>>>, admission::LoginSlot);

/// The opening, login and session start; `None` when the connection ended there.
async fn open<C>(accepted: Box<Accepted<C>>) -> Option<Opened<C>>
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    let Accepted {
        client,
        peer,
        shared,
    } = *accepted;
    // Plain until the opening negotiates TLS; the settings are those at connect time.
    let mut client = crate::tls::MaybeTls::Plain(client);
    let config = shared.registry.config();
    let mut leftover = BytesMut::new();
    let login_timeout = config.limits.client_login_timeout;
    let started = tokio::time::Instant::now();
    let login = startup(&mut client, &mut leftover, &shared, peer).await?;
    let slot = match admission::admit(&shared) {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%peer, error = %e, "client refused: at limits.max_client_conn");
            Box::pin(refused(
                &shared,
                &mut client,
                peer,
                BytesMut::new(),
                Some(e),
            ))
            .await;
            return None;
        }
    };
    let left = login_timeout.saturating_sub(started.elapsed());
    let auth = authenticate_within(&shared, &mut client, peer, &login, &mut leftover, left);
    // `greeting` is AuthenticationOk, not sent yet: it goes out with what follows it.
    let greeting = auth.await?;
    if let Some(console) = shared.console_for(&login.database).cloned() {
        let login = ConsoleLogin {
            peer,
            login: &login,
            greeting,
            leftover,
        };
        Box::pin(serve_console(&shared, &mut client, console, login)).await;
        return None;
    }
    // Counted from here until the session ends, however it ends.
    let cap = match shared
        .client_caps
        .admit(&login.database, &login.user, &config.limits)
    {
        Ok(g) => g,
        Err(e) => {
            tracing::info!(%peer, error = %e, "client refused by a connection cap");
            shared.metrics.login(LoginResult::Limit);
            Box::pin(refuse(&mut client, greeting, &e)).await;
            return None;
        }
    };
    let app = login
        .params
        .iter()
        .find(|(k, _)| k == "application_name")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let entry = shared.client_list.register(peer, cap, app);
    let mut session = match Session::start(client, shared, login, leftover, greeting).await {
        Ok(s) => s,
        Err((mut client, greeting, e)) => {
            Box::pin(refuse(&mut client, greeting, &e)).await;
            return None;
        }
    };
    logged_in(&mut session, entry, peer);
    Some((session, slot))
}

/// The session's client entry (which holds its place under the caps), and the log
/// line of the login.
fn logged_in<C>(session: &mut Session<C>, mut entry: crate::clients::ClientEntry, peer: SocketAddr)
where
    C: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    if let Some(lease) = session.server.as_mut() {
        entry.info.set_phase(ClientPhase::Active);
        entry
            .info
            .server_pid
            .store(lease.conn().backend_pid, Ordering::Relaxed);
    }
    let logging = &session.shared.registry.config().logging;
    if logging.log_connections {
        tracing::info!(
            client = %peer,
            user = %entry.info.user(),
            database = %entry.info.database(),
            application_name = %entry.info.application_name,
            "client logged in"
        );
    }
    entry.log_disconnect = logging.log_disconnections;
    session.entry = Some(entry);
}

/// Authentication within what is left of `client_login_timeout`: AuthenticationOk to
/// send, or `None` when the client was refused (and told why).
async fn authenticate_within<S: super::ClientStream>(
    shared: &Shared,
    client: &mut S,
    peer: SocketAddr,
    login: &Login,
    leftover: &mut BytesMut,
    left: Duration,
) -> Option<BytesMut> {
    let config = shared.registry.config();
    let auth = tokio::time::timeout(
        left,
        handshake::authenticate(client, &config, &login.user, leftover),
    )
    .await;
    match auth {
        Ok(Ok(g)) => Some(g),
        Ok(Err(e)) => {
            Box::pin(refused(shared, client, peer, BytesMut::new(), e)).await;
            None
        }
        Err(_) => {
            let limit = config.limits.client_login_timeout;
            let e = ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("pgsidecar: login not completed within client_login_timeout ({limit:?})"),
            );
            shared.metrics.login(LoginResult::Timeout);
            Box::pin(refuse(client, BytesMut::new(), &e)).await;
            None
        }
    }
}

/// What a login to the admin console brings with it.
struct ConsoleLogin<'a> {
    peer: SocketAddr,
    login: &'a Login,
    /// AuthenticationOk, not sent yet.
    greeting: BytesMut,
    leftover: BytesMut,
}

/// A login to the admin console's database: admins get the console, others FATAL 28000.
async fn serve_console<S: super::ClientStream>(
    shared: &Shared,
    client: &mut S,
    console: Arc<dyn super::Console>,
    c: ConsoleLogin<'_>,
) {
    let config = shared.registry.config();
    let is_admin = config.find_user(&c.login.user).is_some_and(|u| u.admin);
    if !is_admin {
        let e = ClientError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            format!(
                "user \"{}\" is not an admin of pgsidecar (set admin: true on the user)",
                c.login.user
            ),
        );
        shared.metrics.login(LoginResult::of_refusal(e.code));
        Box::pin(refuse(client, c.greeting, &e)).await;
        return;
    }
    shared.metrics.login(LoginResult::Accepted);
    let _entry = shared.client_list.register(
        c.peer,
        crate::limits::CapGuard::uncounted(
            c.login.database.as_str().into(),
            c.login.user.as_str().into(),
        ),
        "admin console",
    );
    if Box::pin(client.write_all(&c.greeting)).await.is_err() {
        return;
    }
    console.serve(client, c.leftover).await;
}

/// The opening up to the startup packet (SSL negotiation included): the login to go on
/// with, or `None` when the connection ended there (a cancel served, a refusal sent,
/// silence past `client_startup_timeout`).
async fn startup<C>(
    client: &mut crate::tls::MaybeTls<C>,
    leftover: &mut BytesMut,
    shared: &Arc<Shared>,
    peer: SocketAddr,
) -> Option<Login>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let config = shared.registry.config();
    let tls = shared.tls.current();
    let login_timeout = config.limits.client_login_timeout;
    // Until its startup packet a connection holds no place under max_client_conn, and
    // has a shorter time to send it.
    let startup_timeout = config.limits.client_startup_timeout.min(login_timeout);
    let opening = tokio::time::timeout(
        startup_timeout,
        handshake::read_opening(client, leftover, &tls, Some(peer.ip())),
    )
    .await;
    match opening {
        Ok(Ok(Opening::Login(l))) => Some(l),
        Ok(Ok(Opening::Cancel { pid, secret })) => {
            // As PostgreSQL: the requester's connection closes only after the signal was
            // delivered (libpq waits for that EOF before its next command, so a late
            // cancel cannot hit that command). The key space (31-bit pid, 32-bit secret)
            // makes the timing of a valid key useless to a guesser. Served at the cap.
            shared.metrics.login(LoginResult::Cancel);
            let limit = &shared.cancel_limit;
            Box::pin(limit.serve(&shared.cancels, peer.ip(), pid, &secret)).await;
            None
        }
        Ok(Err(e)) => {
            Box::pin(refused(shared, client, peer, BytesMut::new(), e)).await;
            None
        }
        Err(_) => {
            // No startup packet: there is no protocol state to report an error in.
            tracing::debug!(%peer, timeout = ?startup_timeout, "no startup packet in time; closing");
            shared.metrics.login(LoginResult::Timeout);
            None
        }
    }
}

/// Counts and answers an opening the proxy refused (`None`: the client went away or
/// the opening ended without a channel to report on).
async fn refused<S: AsyncWrite + Unpin>(
    shared: &Shared,
    client: &mut S,
    peer: SocketAddr,
    greeting: BytesMut,
    e: Option<ClientError>,
) {
    let Some(e) = e else {
        shared.metrics.login(LoginResult::Abandoned);
        return;
    };
    tracing::info!(%peer, error = %e, "client login refused");
    shared.metrics.login(LoginResult::of_refusal(e.code));
    refuse(client, greeting, &e).await;
}

/// Sends a FATAL error, after what login still owes the client (AuthenticationOk, when
/// authentication passed), in one write, and closes the connection cleanly (bounded in
/// time).
async fn refuse<S: AsyncWrite + Unpin>(client: &mut S, mut greeting: BytesMut, e: &ClientError) {
    greeting.extend_from_slice(&e.to_bytes());
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = client.write_all(&greeting).await;
        let _ = client.shutdown().await;
    })
    .await;
}

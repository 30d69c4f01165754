//! Running the proxy in-process for integration tests, and tokio-postgres helpers.
//!
//! ```ignore
//! let pg = shared_cluster(ClusterAuth::Trust);
//! let proxy = start_proxy(&pg, |cfg| cfg.pool.size = 2).await;
//! let client = connect(&proxy_url(&proxy, "postgres", "postgres")).await;
//! ```
//!
//! A cluster from [`shared_cluster`] lives for the whole test binary (one start instead
//! of one per test) and is stopped when the process exits. Tests that share it must not
//! break it (no stop/SIGSTOP) and should use their own table names.

use std::future::Future;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use pgsidecar::config::{AuthMethod, Config, PoolMode, UpstreamConfig};
use pgsidecar::proxy::Proxy;

use super::cluster::{ClusterAuth, ClusterOptions, PgCluster};

/// Upper bound for one test body; a hang fails the test instead of stalling CI.
pub const TEST_LIMIT: Duration = Duration::from_secs(60);

/// Runs a test body, panicking if it takes longer than [`TEST_LIMIT`].
pub async fn bounded<F: Future>(body: F) -> F::Output {
    within(TEST_LIMIT, "test body", body).await
}

/// Awaits `fut`, panicking with `what` if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

static SHARED: Mutex<Vec<(ClusterAuth, Arc<PgCluster>)>> = Mutex::new(Vec::new());
static AT_EXIT: Once = Once::new();

extern "C" fn stop_shared_clusters() {
    let clusters = std::mem::take(&mut *SHARED.lock().unwrap_or_else(|e| e.into_inner()));
    // Dropping the last reference stops the server and deletes its directory.
    drop(clusters);
}

/// A cluster with the given TCP auth shared by every test of this binary, started on
/// first use and stopped at process exit.
pub fn shared_cluster(auth: ClusterAuth) -> Arc<PgCluster> {
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain `extern "C" fn` with no arguments, as atexit expects.
        let rc = unsafe { libc::atexit(stop_shared_clusters) };
        assert_eq!(rc, 0, "atexit registration failed");
    });
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = shared.iter().find(|(a, _)| *a == auth) {
        return c.clone();
    }
    let cluster = Arc::new(PgCluster::start_with(ClusterOptions {
        auth,
        ..Default::default()
    }));
    shared.push((auth, cluster.clone()));
    cluster
}

/// A config for `cluster` with test defaults: ephemeral listen port, trust auth, pool
/// size 10, transaction mode.
pub fn proxy_config(cluster: &PgCluster) -> Config {
    let mut cfg = Config::with_upstream(UpstreamConfig::new("127.0.0.1".into(), cluster.port()));
    cfg.listen = "127.0.0.1:0".into();
    cfg.auth.method = AuthMethod::Trust;
    cfg.pool.size = 10;
    cfg.pool_mode = PoolMode::Transaction;
    cfg
}

/// Starts an in-process proxy for `cluster` with [`proxy_config`] defaults adjusted by
/// `adjust`. The configuration must validate.
pub async fn start_proxy(cluster: &PgCluster, adjust: impl FnOnce(&mut Config)) -> Proxy {
    let mut cfg = proxy_config(cluster);
    adjust(&mut cfg);
    cfg.validate().expect("test proxy config must be valid");
    pgsidecar::app::start(cfg).await.expect("proxy must start")
}

/// `postgres://user@proxy/db` (no password: trust).
pub fn proxy_url(proxy: &Proxy, user: &str, db: &str) -> String {
    format!("postgres://{user}@{}/{db}", proxy.addr)
}

/// `postgres://user:password@proxy/db`.
pub fn proxy_url_pw(proxy: &Proxy, user: &str, password: &str, db: &str) -> String {
    format!("postgres://{user}:{password}@{}/{db}", proxy.addr)
}

/// Connects and returns the connection task's handle too: aborting it drops the socket
/// without a Terminate message, like a client that crashed or lost its network.
pub async fn connect_abortable(url: &str) -> (Client, JoinHandle<()>) {
    let (client, conn) = within(
        Duration::from_secs(10),
        "connect",
        tokio_postgres::connect(url, NoTls),
    )
    .await
    .unwrap_or_else(|e| panic!("connect to {url} failed: {e}"));
    let handle = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, handle)
}

/// Connects and forwards the connection's asynchronous messages (notices and
/// notifications) to the returned channel.
pub async fn connect_with_messages(url: &str) -> (Client, mpsc::UnboundedReceiver<AsyncMessage>) {
    let (client, mut conn) = within(
        Duration::from_secs(10),
        "connect",
        tokio_postgres::connect(url, NoTls),
    )
    .await
    .unwrap_or_else(|e| panic!("connect to {url} failed: {e}"));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            let _ = tx.send(m);
        }
    });
    (client, rx)
}

/// The SQLSTATE of a database error, as a string ("" when it was not one).
pub fn code_of(e: &tokio_postgres::Error) -> &str {
    e.code().map(|c| c.code()).unwrap_or("")
}

/// The message of a database error ("" when it was not one).
pub fn message_of(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default()
}

/// Values of the first column of every row of a simple query.
pub async fn simple_col(client: &Client, sql: &str) -> Vec<Option<String>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
            _ => None,
        })
        .collect()
}

/// The single value of a one-row, one-column simple query.
pub async fn simple_one(client: &Client, sql: &str) -> String {
    let v = simple_col(client, sql).await;
    assert_eq!(v.len(), 1, "{sql}: expected one row, got {v:?}");
    v.into_iter()
        .next()
        .flatten()
        .unwrap_or_else(|| panic!("{sql}: NULL"))
}

/// Resident set size of this process (the in-process proxy included), in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Polls `cond` every 10 ms until it holds, panicking with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

//! Core proxy: cancel and failure semantics against a real PostgreSQL (issue "Core
//! proxy", bullets 4 and 5): query cancellation with right and wrong keys, a backend
//! killed mid-transaction, clients vanishing mid-transaction, mid-COPY and while queued.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{pin_mut, SinkExt};
use pgsidecar::config::PoolMode;
use pgsidecar::pool::{Pool, PoolKey};
use pgsidecar::proxy::Proxy;
use tokio::io::AsyncWriteExt;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use common::raw::{self, tags, RawConn};
use common::*;

const MODES: [PoolMode; 2] = [PoolMode::Session, PoolMode::Transaction];

fn pg() -> Arc<PgCluster> {
    shared_cluster(ClusterAuth::Trust)
}

async fn direct(pg: &PgCluster) -> Client {
    connect(&pg.superuser_url()).await
}

async fn proxy_for(pg: &PgCluster, mode: PoolMode, size: u32) -> Proxy {
    start_proxy(pg, |c| {
        c.pool_mode = mode;
        c.pool.size = size;
        // Long enough never to fire by itself, short enough to fail fast on a leak.
        c.pool.query_wait_timeout = Duration::from_secs(10);
    })
    .await
}

fn pool_of(proxy: &Proxy) -> Arc<Pool> {
    proxy
        .shared
        .registry
        .find(&PoolKey {
            database: "postgres".into(),
            user: SUPERUSER.into(),
        })
        .expect("the pool exists once a client logged in")
}

/// Waits until a backend runs a query containing `marker`.
async fn wait_for_query(admin: &Client, marker: &str) {
    let sql = format!(
        "select count(*) from pg_stat_activity where state = 'active' and query like '%{marker}%' and pid <> pg_backend_pid()"
    );
    wait_until(Duration::from_secs(10), marker, || async {
        admin
            .query_one(&sql, &[])
            .await
            .expect("activity")
            .get::<_, i64>(0)
            > 0
    })
    .await;
}

/// Runs `sql` on `c` in the background and returns once PostgreSQL shows it running
/// (found by `marker`, which `sql` carries in a comment).
async fn start_query(
    admin: &Client,
    c: &Arc<Client>,
    sql: &str,
    marker: &str,
) -> tokio::task::JoinHandle<Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>> {
    let (c, sql) = (c.clone(), sql.to_string());
    let running = tokio::spawn(async move { c.simple_query(&sql).await });
    wait_for_query(admin, marker).await;
    running
}

async fn send_cancel(proxy: &Proxy, pid: i32, secret: i32) {
    let mut s = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect for cancel");
    s.write_all(&raw::cancel_request(pid, secret))
        .await
        .expect("write cancel");
    // Like libpq: wait for the proxy to close the connection, so the cancel has been
    // handled before we go on.
    let mut buf = [0u8; 1];
    use tokio::io::AsyncReadExt;
    let n = within(
        Duration::from_secs(5),
        "cancel connection close",
        s.read(&mut buf),
    )
    .await
    .unwrap_or(0);
    assert_eq!(n, 0, "a CancelRequest gets no answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_cancels_the_running_query() {
    bounded(async {
        let pg = pg();
        let admin = direct(&pg).await;
        for mode in MODES {
            let proxy = proxy_for(&pg, mode, 2).await;
            let c = Arc::new(connect(&proxy_url(&proxy, SUPERUSER, "postgres")).await);
            let marker = format!("cancel_me_{mode}");
            let sql = format!("select pg_sleep(30) /* {marker} */");
            let running = start_query(&admin, &c, &sql, &marker).await;
            let t = Instant::now();
            c.cancel_token()
                .cancel_query(NoTls)
                .await
                .expect("send cancel");
            let r = within(Duration::from_secs(3), "cancelled query", running)
                .await
                .expect("task");
            let e = r.expect_err("the query must be cancelled");
            assert_eq!(code_of(&e), "57014", "{mode}: {e}");
            assert!(t.elapsed() < Duration::from_secs(2), "{mode}");
            assert_eq!(simple_one(&c, "select 'usable'").await, "usable", "{mode}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_a_wrong_key_does_nothing() {
    bounded(async {
        let pg = pg();
        let admin = direct(&pg).await;
        for mode in MODES {
            let proxy = proxy_for(&pg, mode, 2).await;
            // A random key while a tokio-postgres client sleeps for a second.
            let c = Arc::new(connect(&proxy_url(&proxy, SUPERUSER, "postgres")).await);
            let marker = format!("random_key_{mode}");
            let sql = format!("select pg_sleep(1) /* {marker} */");
            let running = start_query(&admin, &c, &sql, &marker).await;
            send_cancel(&proxy, rand_i32().abs().max(1), rand_i32()).await;
            running
                .await
                .expect("task")
                .expect("a cancel with a random key must not cancel anything");

            // The right pid with a wrong secret.
            let mut r = RawConn::login(proxy.addr, SUPERUSER, "postgres").await;
            let marker = format!("wrong_secret_{mode}");
            r.send(&raw::query_msg(&format!(
                "select pg_sleep(1) /* {marker} */"
            )))
            .await;
            wait_for_query(&admin, &marker).await;
            send_cancel(&proxy, r.pid, r.secret ^ 0x5a5a).await;
            let m = r.read_until_ready().await;
            assert_eq!(tags(&m), "TDCZ", "{mode}: a wrong secret must not cancel");
            // The right key does cancel.
            let marker = format!("right_key_{mode}");
            r.send(&raw::query_msg(&format!(
                "select pg_sleep(30) /* {marker} */"
            )))
            .await;
            wait_for_query(&admin, &marker).await;
            send_cancel(&proxy, r.pid, r.secret).await;
            let m = within(Duration::from_secs(3), "cancelled", r.read_until_ready()).await;
            assert_eq!(tags(&m), "TEZ", "{mode}");
            assert_eq!(m[1].code().as_deref(), Some("57014"));
        }
    })
    .await
}

/// Transaction mode: a client's key reaches only its own query. A cancel from a client
/// whose transaction ended must not hit the next client's query on the same server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_cancel_does_not_hit_another_client() {
    bounded(async {
        let pg = pg();
        let admin = direct(&pg).await;
        let proxy = proxy_for(&pg, PoolMode::Transaction, 1).await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let a = connect(&url).await;
        let b = Arc::new(connect(&url).await);
        let a_pid = simple_one(&a, "select pg_backend_pid()").await;
        let sql = "select pg_backend_pid(), pg_sleep(1) /* stale_cancel */";
        let running = start_query(&admin, &b, sql, "stale_cancel").await;
        a.cancel_token()
            .cancel_query(NoTls)
            .await
            .expect("send cancel");
        let msgs = running
            .await
            .expect("task")
            .expect("A's cancel must not cancel B's query");
        let b_pid = msgs
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .expect("row");
        assert_eq!(b_pid, a_pid, "pool size 1: B ran on A's former server");
    })
    .await
}

fn rand_i32() -> i32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    (nanos.wrapping_mul(2654435761) ^ std::process::id()) as i32
}

/// (a) The server backend is killed mid-transaction: the client gets an error, and the
/// pool (size 1) serves new clients afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_transaction() {
    bounded(async {
        let pg = pg();
        let admin = direct(&pg).await;
        for mode in MODES {
            let proxy = proxy_for(&pg, mode, 1).await;
            let url = proxy_url(&proxy, SUPERUSER, "postgres");

            // Idle in transaction when killed: the next statement fails.
            let c = connect(&url).await;
            c.batch_execute("begin").await.expect("begin");
            let pid: i32 = c
                .query_one("select pg_backend_pid()", &[])
                .await
                .expect("pid")
                .get(0);
            admin
                .execute("select pg_terminate_backend($1)", &[&pid])
                .await
                .expect("terminate");
            let e = c
                .simple_query("select 1")
                .await
                .expect_err("server is gone");
            eprintln!("{mode}: idle-in-transaction kill -> {e}");
            wait_until(Duration::from_secs(5), "client closed", || async {
                c.is_closed()
            })
            .await;

            let fresh = connect(&url).await;
            assert_eq!(
                simple_one(&fresh, "select 'fresh'").await,
                "fresh",
                "{mode}"
            );
            drop(fresh);

            // Killed while running a statement: that statement gets the server's error.
            let c = Arc::new(connect(&url).await);
            c.batch_execute("begin").await.expect("begin");
            let pid: i32 = c
                .query_one("select pg_backend_pid()", &[])
                .await
                .expect("pid")
                .get(0);
            let running =
                start_query(&admin, &c, "select pg_sleep(30) /* killme */", "killme").await;
            admin
                .execute("select pg_terminate_backend($1)", &[&pid])
                .await
                .expect("terminate");
            let r = within(Duration::from_secs(5), "killed query", running)
                .await
                .expect("task");
            let e = r.expect_err("the statement must fail");
            assert_eq!(code_of(&e), "57P01", "{mode}: {e}");

            let t = Instant::now();
            let fresh = connect(&url).await;
            assert_eq!(
                simple_one(&fresh, "select 'fresh'").await,
                "fresh",
                "{mode}"
            );
            assert!(t.elapsed() < Duration::from_secs(3), "{mode}");
        }
    })
    .await
}

/// (b) A client vanishes holding a row lock mid-transaction: the transaction is rolled
/// back at once, and with pool size 1 the next client gets the same server, clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishes_mid_transaction() {
    bounded(async {
        let pg = pg();
        let admin = direct(&pg).await;
        admin
            .batch_execute(
                "drop table if exists vanish_t; create table vanish_t (id int primary key, v int);
                 insert into vanish_t values (1, 0)",
            )
            .await
            .expect("setup");
        for mode in MODES {
            for abrupt in [true, false] {
                let what = format!("{mode}, abrupt={abrupt}");
                let proxy = proxy_for(&pg, mode, 1).await;
                let url = proxy_url(&proxy, SUPERUSER, "postgres");
                let (a, conn) = connect_abortable(&url).await;
                a.batch_execute("begin; update vanish_t set v = v + 1 where id = 1")
                    .await
                    .expect("lock the row");
                let a_pid = simple_one(&a, "select pg_backend_pid()").await;
                if abrupt {
                    // No Terminate: the socket just closes.
                    conn.abort();
                }
                drop(a);

                let b = connect(&url).await;
                let t = Instant::now();
                within(
                    Duration::from_secs(5),
                    "update of the row A had locked",
                    b.batch_execute("update vanish_t set v = v + 10 where id = 1"),
                )
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(t.elapsed() < Duration::from_secs(3), "{what}");
                assert_eq!(
                    simple_one(&b, "select v::text from vanish_t where id = 1").await,
                    "10",
                    "{what}: A's update must have been rolled back"
                );
                // Same server (pool size 1), and no transaction left open on it.
                assert_eq!(
                    simple_one(&b, "select pg_backend_pid()").await,
                    a_pid,
                    "{what}"
                );
                assert_eq!(
                    simple_col(&b, "select txid_current_if_assigned()").await,
                    [None],
                    "{what}"
                );
                admin
                    .batch_execute("update vanish_t set v = 0 where id = 1")
                    .await
                    .expect("reset");
            }
        }
    })
    .await
}

/// (c) A client disconnects in the middle of COPY FROM STDIN: nothing of the partial
/// copy is visible and the pool still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishes_mid_copy() {
    bounded(async {
        let pg = pg();
        let admin = direct(&pg).await;
        for mode in MODES {
            let table = format!("vanish_copy_{mode}");
            admin
                .batch_execute(&format!(
                    "drop table if exists {table}; create table {table} (id int, v text)"
                ))
                .await
                .expect("setup");
            let proxy = proxy_for(&pg, mode, 1).await;
            let url = proxy_url(&proxy, SUPERUSER, "postgres");
            let (c, conn) = connect_abortable(&url).await;
            let sink = c
                .copy_in::<_, Bytes>(&format!("COPY {table} FROM STDIN"))
                .await
                .expect("copy in");
            pin_mut!(sink);
            let mut chunk = Vec::new();
            for i in 0..5000 {
                chunk.extend_from_slice(format!("{i}\tpartial row {i}\n").as_bytes());
            }
            sink.send(Bytes::from(chunk)).await.expect("copy data");
            // The server has processed rows of the copy.
            let progress = format!(
                "select coalesce(sum(tuples_processed), 0)::bigint from pg_stat_progress_copy where relid = '{table}'::regclass"
            );
            wait_until(Duration::from_secs(10), "copy progress", || async {
                admin.query_one(&progress, &[]).await.expect("progress").get::<_, i64>(0) > 0
            })
            .await;
            conn.abort();
            drop(c);
            // The COPY's backend ends (or leaves the COPY) soon.
            let copying = format!(
                "select count(*) from pg_stat_progress_copy where relid = '{table}'::regclass"
            );
            wait_until(Duration::from_secs(5), "copy aborted", || async {
                admin.query_one(&copying, &[]).await.expect("copying").get::<_, i64>(0) == 0
            })
            .await;
            let count = format!("select count(*)::text from {table}");
            assert_eq!(simple_one(&admin, &count).await, "0", "{mode}");

            let t = Instant::now();
            let d = connect(&url).await;
            d.batch_execute(&format!("insert into {table} values (1, 'after')"))
                .await
                .expect("pool serves after the aborted copy");
            assert_eq!(simple_one(&d, &count).await, "1", "{mode}");
            assert!(t.elapsed() < Duration::from_secs(3), "{mode}");
        }
    })
    .await
}

/// (d) A client that disconnects while queued for a server leaves the queue: when the
/// server frees up, the next client is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishes_while_queued() {
    bounded(async {
        let pg = pg();
        let proxy = proxy_for(&pg, PoolMode::Transaction, 1).await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let a = connect(&url).await;
        a.batch_execute("begin; select 1")
            .await
            .expect("hold the server");
        let pool = pool_of(&proxy);

        let (b, b_conn) = connect_abortable(&url).await;
        let b = Arc::new(b);
        let b_query = {
            let b = b.clone();
            tokio::spawn(async move { b.simple_query("select 'b'").await })
        };
        wait_until(Duration::from_secs(5), "B queued", || async {
            pool.counts().2 == 1
        })
        .await;
        let clients_before = proxy.shared.clients.load(Ordering::Relaxed);
        b_conn.abort();
        b_query.abort();
        drop(b);
        // B's session ends and B no longer waits in the queue.
        wait_until(Duration::from_secs(2), "B's session ended", || async {
            proxy.shared.clients.load(Ordering::Relaxed) == clients_before - 1
        })
        .await;
        wait_until(Duration::from_secs(2), "B left the queue", || async {
            pool.counts().2 == 0
        })
        .await;

        a.batch_execute("commit").await.expect("release");
        let t = Instant::now();
        let c = connect(&url).await;
        assert_eq!(simple_one(&c, "select 'c'").await, "c");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "C waited {:?}",
            t.elapsed()
        );
        assert_eq!(pool.counts().1, 1, "still one server connection");
    })
    .await
}

//! Core proxy: pooling semantics against a real PostgreSQL (issue "Core proxy",
//! bullets 2 and 3): transaction pooling under load with the server-connection cap
//! watched from pg_stat_activity, session-mode state and reset, query_wait_timeout.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgsidecar::config::PoolMode;
use pgsidecar::pool::PoolKey;
use tokio_postgres::Client;

use common::*;

fn pg() -> Arc<PgCluster> {
    shared_cluster(ClusterAuth::Trust)
}

async fn direct(pg: &PgCluster) -> Client {
    connect(&pg.superuser_url()).await
}

/// 200 clients x 20 transactions (BEGIN; INSERT; INSERT; COMMIT) through a pool of 10
/// in transaction mode. PostgreSQL must never see more than 10 connections from the
/// proxy, every row must arrive, and both INSERTs of a transaction must have run in the
/// same server transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_many_clients_few_servers() {
    bounded(async {
        const CLIENTS: i32 = 200;
        const TXNS: i32 = 20;
        const POOL: i64 = 10;
        let pg = pg();
        let admin = direct(&pg).await;
        // A role of its own, so pg_stat_activity counts exactly this proxy's servers.
        admin
            .batch_execute(
                "DO $$ BEGIN
                   IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'txpool') THEN
                     CREATE ROLE txpool LOGIN;
                   END IF;
                 END $$;
                 DROP TABLE IF EXISTS pool_t;
                 CREATE TABLE pool_t (cid int, n int, tag text, x bigint DEFAULT txid_current());
                 GRANT INSERT, SELECT ON pool_t TO txpool;",
            )
            .await
            .expect("setup");
        let proxy = start_proxy(&pg, |c| {
            c.pool_mode = PoolMode::Transaction;
            c.pool.size = POOL as u32;
        })
        .await;
        let url = proxy_url(&proxy, "txpool", "postgres");

        // Watch the server side directly, every 20 ms, for the whole run.
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicI64::new(0));
        let monitor = {
            let (stop, peak) = (stop.clone(), peak.clone());
            tokio::spawn(async move {
                let mut samples = 0;
                while !stop.load(Ordering::Relaxed) {
                    let n: i64 = admin
                        .query_one(
                            "select count(*) from pg_stat_activity where usename = 'txpool'",
                            &[],
                        )
                        .await
                        .expect("pg_stat_activity")
                        .get(0);
                    peak.fetch_max(n, Ordering::Relaxed);
                    samples += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                samples
            })
        };

        let started = Instant::now();
        let mut tasks = Vec::new();
        for cid in 0..CLIENTS {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = connect(&url).await;
                if cid % 2 == 0 {
                    // Extended protocol: one named statement used on whatever server
                    // each transaction lands on.
                    let ins = c
                        .prepare("insert into pool_t (cid, n, tag) values ($1, $2, $3)")
                        .await
                        .expect("prepare");
                    for n in 0..TXNS {
                        let tx = c.transaction().await.expect("begin");
                        tx.execute(&ins, &[&cid, &n, &"a"]).await.expect("insert a");
                        tx.execute(&ins, &[&cid, &n, &"b"]).await.expect("insert b");
                        tx.commit().await.expect("commit");
                    }
                } else {
                    // Simple protocol, one round trip per statement.
                    for n in 0..TXNS {
                        c.batch_execute("BEGIN").await.expect("begin");
                        for tag in ["a", "b"] {
                            c.batch_execute(&format!(
                                "insert into pool_t (cid, n, tag) values ({cid}, {n}, '{tag}')"
                            ))
                            .await
                            .expect("insert");
                        }
                        c.batch_execute("COMMIT").await.expect("commit");
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("client task");
        }
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let samples = monitor.await.expect("monitor");
        let peak = peak.load(Ordering::Relaxed);
        eprintln!(
            "{CLIENTS} clients x {TXNS} txns in {elapsed:?}; peak server connections {peak} over {samples} samples"
        );

        assert!(samples >= 3, "the monitor must have sampled during the run");
        assert!(
            peak <= POOL,
            "PostgreSQL saw {peak} connections from the proxy; the pool size is {POOL}"
        );
        assert!(
            peak >= 2,
            "the monitor saw at most {peak} server connections; it cannot have been watching"
        );
        let admin = direct(&pg).await;
        let total: i64 = admin
            .query_one("select count(*) from pool_t", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(total, (CLIENTS * TXNS * 2) as i64);
        let split: i64 = admin
            .query_one(
                "select count(*) from (select cid, n from pool_t group by cid, n
                   having count(*) <> 2 or count(distinct x) <> 1 or count(distinct tag) <> 2) s",
                &[],
            )
            .await
            .expect("check")
            .get(0);
        assert_eq!(
            split, 0,
            "each transaction's two INSERTs must run in one server transaction"
        );
    })
    .await
}

/// Session mode: the client keeps its server and its state for the whole session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_state_across_statements() {
    bounded(async {
        let pg = pg();
        let proxy = start_proxy(&pg, |c| {
            c.pool_mode = PoolMode::Session;
            c.pool.size = 3;
        })
        .await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let a = connect(&url).await;
        let other = connect(&url).await;
        let pid = simple_one(&a, "select pg_backend_pid()").await;
        a.batch_execute(
            "SET statement_timeout = '1234ms'; create temp table sess_tmp (x int); insert into sess_tmp values (7)",
        )
        .await
        .expect("set up session state");
        for _ in 0..5 {
            // Other traffic in between must not move `a` to another server.
            simple_one(&other, "select 1").await;
            assert_eq!(simple_one(&a, "show statement_timeout").await, "1234ms");
            assert_eq!(simple_one(&a, "select x::text from sess_tmp").await, "7");
            assert_eq!(simple_one(&a, "select pg_backend_pid()").await, pid);
        }
        // Prepared statements live on the server too.
        let st = a.prepare("select x from sess_tmp").await.expect("prepare");
        simple_one(&other, "select 1").await;
        let x: i32 = a.query_one(&st, &[]).await.expect("execute").get(0);
        assert_eq!(x, 7);
    })
    .await
}

/// Session mode with one server: whatever client A left behind (settings, temp
/// tables, prepared statements, LISTEN) is gone (DISCARD ALL) before client B gets the
/// same server, both when A says goodbye and when A vanishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_resets_server_between_clients() {
    bounded(async {
        let pg = pg();
        let proxy = start_proxy(&pg, |c| {
            c.pool_mode = PoolMode::Session;
            c.pool.size = 1;
        })
        .await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        for abrupt in [false, true] {
            let (a, conn) = connect_abortable(&url).await;
            let pid = simple_one(&a, "select pg_backend_pid()").await;
            a.batch_execute(
                "SET statement_timeout = '4321ms';
                 create temp table reset_tmp (x int);
                 LISTEN reset_chan;
                 PREPARE reset_stmt AS select 1;
                 select pg_advisory_lock(4242);",
            )
            .await
            .expect("leave state behind");
            if abrupt {
                conn.abort();
            }
            drop(a);

            let b = connect(&url).await;
            assert_eq!(
                simple_one(&b, "select pg_backend_pid()").await,
                pid,
                "abrupt={abrupt}: pool size 1, so B must get A's server, reset rather than replaced"
            );
            let e = b
                .simple_query("select * from reset_tmp")
                .await
                .expect_err("A's temp table must be gone");
            assert_eq!(code_of(&e), "42P01", "abrupt={abrupt}: {e}");
            assert_eq!(simple_one(&b, "show statement_timeout").await, "0");
            assert_eq!(
                simple_one(&b, "select count(*) from pg_prepared_statements").await,
                "0"
            );
            assert_eq!(
                simple_one(&b, "select count(*) from pg_listening_channels()").await,
                "0"
            );
            assert_eq!(
                simple_one(
                    &b,
                    "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()"
                )
                .await,
                "0"
            );
        }
    })
    .await
}

/// Pool size 1, query_wait_timeout 300 ms: a client that cannot get a server gets
/// SQLSTATE 53300 with an explanation, and its connection works once the server frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_reports_53300_and_recovers() {
    bounded(async {
        let pg = pg();
        let proxy = start_proxy(&pg, |c| {
            c.pool_mode = PoolMode::Transaction;
            c.pool.size = 1;
            c.pool.query_wait_timeout = Duration::from_millis(300);
        })
        .await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let a = connect(&url).await;
        let b = connect(&url).await;
        a.batch_execute("BEGIN; select 1")
            .await
            .expect("hold the server");

        let t = Instant::now();
        let e = b.simple_query("select 1").await.expect_err("must time out");
        let waited = t.elapsed();
        assert_eq!(code_of(&e), "53300", "{e}");
        let msg = message_of(&e);
        assert!(
            msg.contains("query_wait_timeout") && msg.contains("300ms"),
            "the message should say what timed out: {msg}"
        );
        let hint = e
            .as_db_error()
            .and_then(|d| d.hint())
            .unwrap_or_default()
            .to_string();
        assert!(
            hint.contains("pool.size"),
            "a hint should say what to do: {hint}"
        );
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "waited {waited:?} for a 300ms query_wait_timeout"
        );
        let pool = proxy
            .shared
            .registry
            .find(&PoolKey {
                database: "postgres".into(),
                user: SUPERUSER.into(),
            })
            .expect("pool");
        assert_eq!(
            pool.counts().2,
            0,
            "a client that timed out is no longer queued"
        );

        // Extended protocol: the whole batch gets the error and one ReadyForQuery.
        let e = b
            .query_typed(
                "select $1::int4",
                &[(&1i32, tokio_postgres::types::Type::INT4)],
            )
            .await
            .expect_err("must time out");
        assert_eq!(code_of(&e), "53300", "{e}");
        let e = b
            .prepare("select 'named'")
            .await
            .expect_err("must time out");
        assert_eq!(code_of(&e), "53300", "{e}");

        a.batch_execute("COMMIT").await.expect("release");
        assert_eq!(simple_one(&b, "select 'b works'").await, "b works");
        let st = b.prepare("select 'named'").await.expect("prepare");
        let v: String = b.query_one(&st, &[]).await.expect("execute").get(0);
        assert_eq!(v, "named");
        assert_eq!(simple_one(&a, "select 'a works'").await, "a works");
    })
    .await
}

/// In session mode a client waits for its server at login: the timeout is a login
/// error (53300) rather than a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_at_session_login() {
    bounded(async {
        let pg = pg();
        let proxy = start_proxy(&pg, |c| {
            c.pool_mode = PoolMode::Session;
            c.pool.size = 1;
            c.pool.query_wait_timeout = Duration::from_millis(300);
        })
        .await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let a = connect(&url).await;
        let t = Instant::now();
        let e = try_connect(&url, Duration::from_secs(5))
            .await
            .expect_err("no server for a second session");
        assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        drop(a);
        // Once A leaves, the next login gets the server.
        let c = within(Duration::from_secs(5), "login after A left", async {
            loop {
                match try_connect(&url, Duration::from_secs(5)).await {
                    Ok(c) => break c,
                    Err(e) if e.code().map(|c| c.code()) == Some("53300") => {}
                    Err(e) => panic!("unexpected login error: {e}"),
                }
            }
        })
        .await;
        assert_eq!(simple_one(&c, "select 'c works'").await, "c works");
    })
    .await
}

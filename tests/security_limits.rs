//! limits: idle / idle-in-transaction / query timeouts, per-database and per-user caps,
//! and the login timeout against slow (trickling) clients.

mod common;

use std::time::{Duration, Instant};

use common::raw::{query_msg, startup_packet, RawConn};
use common::*;
use pgsidecar::config::{AuthMethod, PoolMode, UserConfig};
use tokio::io::AsyncWriteExt;

fn user(name: &str, password: &str) -> UserConfig {
    serde_yaml::from_str(&format!("name: {name}\npassword: {password}")).expect("user yaml")
}

async fn backend_pid(c: &mut RawConn) -> String {
    c.query_rows("select pg_backend_pid()").await[0][0]
        .clone()
        .expect("pid")
}

/// Reads until the connection closes; returns the last error's SQLSTATE and severity.
async fn fatal_then_close(c: &mut RawConn) -> (String, String) {
    let mut last = (String::new(), String::new());
    while let Some(m) = c.try_read_msg().await {
        if m.tag == b'E' {
            last = (
                m.code().unwrap_or_default(),
                m.field(b'V').unwrap_or_default(),
            );
        }
    }
    last
}

#[tokio::test]
async fn idle_in_transaction_gets_25p03_and_the_server_is_rolled_back_and_reused() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        pg.exec("create table if not exists sec_idle_txn (v int)");
        let proxy = start_proxy(&pg, |c| {
            c.pool.size = 1;
            c.limits.idle_transaction_timeout = Some(Duration::from_millis(400));
        })
        .await;
        let mut a = RawConn::login(proxy.addr, "postgres", "postgres").await;
        a.query_rows("begin").await;
        let pid = backend_pid(&mut a).await;
        // A query that runs longer than the limit is not idleness.
        a.query_rows("select pg_sleep(0.8)").await;
        a.query_rows("insert into sec_idle_txn values (1)").await;
        let started = Instant::now();
        let (code, severity) = fatal_then_close(&mut a).await;
        assert_eq!((code.as_str(), severity.as_str()), ("25P03", "FATAL"));
        assert!(started.elapsed() < Duration::from_secs(5));

        let mut b = RawConn::login(proxy.addr, "postgres", "postgres").await;
        assert_eq!(
            backend_pid(&mut b).await,
            pid,
            "same server: reused, not churned"
        );
        assert_eq!(
            b.query_rows("select count(*) from sec_idle_txn").await,
            vec![vec![Some("0".into())]],
            "the open transaction was rolled back"
        );
        // Idle outside a transaction is fine with only this limit set.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(b.query_rows("select 1").await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn client_idle_timeout_closes_idle_clients_with_57p05() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        for mode in [PoolMode::Transaction, PoolMode::Session] {
            let proxy = start_proxy(&pg, |c| {
                c.pool_mode = mode;
                c.limits.client_idle_timeout = Some(Duration::from_millis(500));
            })
            .await;
            let mut c = RawConn::login(proxy.addr, "postgres", "postgres").await;
            // Activity keeps it alive well past the limit.
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                assert_eq!(c.query_rows("select 1").await.len(), 1, "{mode}");
            }
            // A query longer than the limit is not idleness.
            c.query_rows("select pg_sleep(0.8)").await;
            let (code, severity) = fatal_then_close(&mut c).await;
            assert_eq!(
                (code.as_str(), severity.as_str()),
                ("57P05", "FATAL"),
                "{mode}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn query_timeout_cancels_the_query_and_frees_the_slot() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |c| {
            c.pool.size = 1;
            c.limits.query_timeout = Some(Duration::from_millis(500));
        })
        .await;
        let url = proxy_url(&proxy, "postgres", "postgres");
        let a = connect(&url).await;
        // Idle longer than the limit: nothing fires without a query in flight.
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(simple_one(&a, "select 1").await, "1");
        // Short queries inside a long transaction are fine.
        a.batch_execute("begin").await.expect("begin");
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(simple_one(&a, "select 2").await, "2");
        }
        a.batch_execute("commit").await.expect("commit");

        let started = Instant::now();
        let Err(e) = a.simple_query("select pg_sleep(30)").await else {
            panic!("cancelled");
        };
        assert_eq!(code_of(&e), "57014", "{e:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        // The only server is free again for someone else, and this client goes on.
        let b = connect(&url).await;
        assert_eq!(simple_one(&b, "select 3").await, "3");
        assert_eq!(simple_one(&a, "select 4").await, "4");
        // Extended protocol too.
        let Err(e) = a.query("select pg_sleep($1::float8)", &[&30.0f64]).await else {
            panic!("cancelled");
        };
        assert_eq!(code_of(&e), "57014");
        assert_eq!(simple_one(&b, "select 5").await, "5");
    })
    .await;
}

#[tokio::test]
async fn per_user_and_per_database_caps_give_53300_and_are_released() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |c| {
            c.limits.max_user_client_connections = Some(2);
            c.limits.max_db_client_connections = Some(3);
        })
        .await;
        let url = proxy_url(&proxy, "postgres", "postgres");
        let a = connect(&url).await;
        let b = connect(&url).await;
        let Err(e) = try_connect(&url, Duration::from_secs(10))
            .await else {
            panic!("third login of the user refused");
        };
        assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e:?}");
        assert!(format!("{e:?}").contains("too many connections for role"), "{e:?}");
        drop(a);
        wait_until(Duration::from_secs(5), "cap released", || async {
            proxy.shared.client_caps.counts("postgres", "postgres").1 == 1
        })
        .await;
        let _c = connect(&url).await;
        // Another user on the same database meets the database cap.
        pg.exec("do $$ begin create role sec_cap_user login; exception when duplicate_object then null; end $$");
        let other = proxy_url(&proxy, "sec_cap_user", "postgres");
        let _d = connect(&other).await;
        let Err(e) = try_connect(&other, Duration::from_secs(10))
            .await else {
            panic!("database cap");
        };
        assert!(format!("{e:?}").contains("too many connections for database"), "{e:?}");
        drop(b);
        // A login that fails upstream (no such database) does not leak its count.
        let bad = proxy_url(&proxy, "sec_cap_user", "no_such_db_for_caps");
        let Err(e) = try_connect(&bad, Duration::from_secs(10)).await else {
            panic!("3D000");
        };
        assert_eq!(e.code().map(|c| c.code()), Some("3D000"), "{e:?}");
        assert_eq!(
            proxy.shared.client_caps.counts("no_such_db_for_caps", "sec_cap_user"),
            (0, 1),
            "only the live connection of sec_cap_user is counted"
        );
    })
    .await;
}

/// Slowloris: a client that trickles its SCRAM exchange is cut off by
/// client_login_timeout and blocks nobody meanwhile.
#[tokio::test]
async fn trickled_scram_login_hits_the_login_timeout() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |c| {
            c.auth.method = AuthMethod::ScramSha256;
            c.users = vec![user("postgres", "sekret-pw")];
            c.upstream.user = Some("postgres".into());
            c.limits.client_login_timeout = Duration::from_millis(1500);
        })
        .await;
        let mut slow = RawConn::connect(proxy.addr).await;
        slow.send(&startup_packet(196608, &[("user", "postgres")]))
            .await;
        let m = slow.read_msg().await;
        assert_eq!(m.tag, b'R', "SASL request");
        let started = Instant::now();
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&30i32.to_be_bytes());
        body.extend_from_slice(b"n,,n=,r=abcdefghijklmnopqrstuv");
        let msg = common::raw::fe(b'p', &body);
        let trickle = async {
            for b in &msg {
                if slow.stream.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        };
        // Meanwhile a normal client logs in and works.
        let other = async {
            let c = connect(&proxy_url_pw(&proxy, "postgres", "sekret-pw", "postgres")).await;
            assert_eq!(simple_one(&c, "select 1").await, "1");
        };
        tokio::join!(trickle, other);
        let (code, _) = fatal_then_close(&mut slow).await;
        assert_eq!(code, "08P01");
        assert!(started.elapsed() < Duration::from_secs(6));
    })
    .await;
}

/// A query the client pipelines right after a long one is timed from its own start.
#[tokio::test]
async fn query_timeout_is_per_request_in_a_pipeline() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |c| {
            c.limits.query_timeout = Some(Duration::from_millis(700));
        })
        .await;
        let mut c = RawConn::login(proxy.addr, "postgres", "postgres").await;
        let mut batch = Vec::new();
        for _ in 0..3 {
            batch.extend_from_slice(&query_msg("select pg_sleep(0.4)"));
        }
        c.send(&batch).await;
        for _ in 0..3 {
            let msgs = c.read_until_ready().await;
            assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
        }
    })
    .await;
}

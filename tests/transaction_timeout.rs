//! limits.transaction_timeout (scenario 22): a transaction that stays open, busy or
//! idle, ends with FATAL 25P04; the server is rolled back and reused when nothing is
//! running on it, closed when a request still is; the limit is picked up by a reload.

mod common;

use std::time::{Duration, Instant};

use common::raw::{query_msg, RawConn};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
async fn a_busy_transaction_gets_25p04_and_its_server_is_rolled_back_and_reused() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        pg.exec("create table if not exists txn_timeout_busy (v int)");
        let proxy = start_proxy(&pg, |c| {
            c.pool.size = 1;
            c.limits.transaction_timeout = Some(Duration::from_millis(900));
        })
        .await;
        // Outside a transaction, statements shorter than the limit are never cut.
        let mut a = RawConn::login(proxy.addr, "postgres", "postgres").await;
        for _ in 0..3 {
            a.query_rows("select pg_sleep(0.4)").await;
        }
        let started = Instant::now();
        a.query_rows("begin").await;
        let pid = backend_pid(&mut a).await;
        a.query_rows("insert into txn_timeout_busy values (1)")
            .await;
        // Busy, never idle long: idle_transaction_timeout would not catch this.
        a.query_rows("select pg_sleep(0.3)").await;
        a.query_rows("select pg_sleep(0.3)").await;
        let (code, severity) = fatal_then_close(&mut a).await;
        assert_eq!((code.as_str(), severity.as_str()), ("25P04", "FATAL"));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(850) && took < Duration::from_secs(4),
            "ended after {took:?}"
        );

        let mut b = RawConn::login(proxy.addr, "postgres", "postgres").await;
        assert_eq!(backend_pid(&mut b).await, pid, "same server: reused");
        assert_eq!(
            b.query_rows("select count(*) from txn_timeout_busy").await,
            vec![vec![Some("0".into())]],
            "the open transaction was rolled back"
        );
    })
    .await;
}

#[tokio::test]
async fn a_statement_still_running_at_the_limit_ends_and_its_server_is_closed() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        pg.exec("create table if not exists txn_timeout_running (v int)");
        let proxy = start_proxy(&pg, |c| {
            c.pool.size = 1;
            c.limits.transaction_timeout = Some(Duration::from_millis(500));
        })
        .await;
        let mut a = RawConn::login(proxy.addr, "postgres", "postgres").await;
        a.query_rows("begin").await;
        let pid = backend_pid(&mut a).await;
        a.query_rows("insert into txn_timeout_running values (1)")
            .await;
        let started = Instant::now();
        a.send(&query_msg("select pg_sleep(30)")).await;
        let (code, _) = fatal_then_close(&mut a).await;
        assert_eq!(code, "25P04");
        assert!(started.elapsed() < Duration::from_secs(5));

        // The next client is served (pool size 1: the slot was freed), by a new server.
        let mut b = RawConn::login(proxy.addr, "postgres", "postgres").await;
        assert_ne!(
            backend_pid(&mut b).await,
            pid,
            "the busy server is not reused"
        );
        wait_until(Duration::from_secs(10), "old backend gone", || {
            let q = format!("select count(*) from pg_stat_activity where pid = {pid}");
            let n = pg.psql(&q);
            async move { n == "0" }
        })
        .await;
        assert_eq!(
            b.query_rows("select count(*) from txn_timeout_running")
                .await,
            vec![vec![Some("0".into())]],
            "rolled back"
        );
    })
    .await;
}

async fn post(port: u16, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("admin connect");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("admin write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

/// The limit is read when a client logs in, so a reload applies it to the next clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_timeout_is_applied_after_a_reload() {
    use clap::Parser;
    let pg = shared_cluster(ClusterAuth::Trust);
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, admin) = (free_port(), free_port());
    let yaml = |limits: &str| {
        format!(
            "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\n\
             upstream: {{host: 127.0.0.1, port: {}, tls: {{sslmode: disable}}}}\n\
             auth: {{method: trust}}\n{limits}",
            pg.port()
        )
    };
    let cfg_path = dir.path().join("proxy.yaml");
    std::fs::write(&cfg_path, yaml("")).expect("write config");
    let cli =
        pgsidecar::cli::Cli::parse_from(["pgsidecar", "--config", &cfg_path.display().to_string()]);
    let config = cli.build_config().expect("config");
    config.validate().expect("valid");
    tokio::spawn(pgsidecar::app::run(cli, config));
    bounded(async {
        wait_until(Duration::from_secs(10), "proxy listening", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        // No limit yet: a one-second transaction completes.
        let mut a = RawConn::login(addr, "postgres", "postgres").await;
        a.query_rows("begin").await;
        a.query_rows("select pg_sleep(1)").await;
        a.query_rows("commit").await;

        std::fs::write(&cfg_path, yaml("limits: {transaction_timeout: 400ms}\n"))
            .expect("rewrite config");
        let r = post(admin, "/api/reload").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");

        let mut b = RawConn::login(addr, "postgres", "postgres").await;
        b.query_rows("begin").await;
        b.send(&query_msg("select pg_sleep(1)")).await;
        let (code, _) = fatal_then_close(&mut b).await;
        assert_eq!(code, "25P04", "the reloaded limit applies");
    })
    .await;
}

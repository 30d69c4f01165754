//! The real binary's lifecycle: graceful drain on SIGTERM, live reload on SIGHUP (and a
//! broken file keeping the old config), the admin console and /metrics under traffic.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bounded, connect, free_port, simple_one, PgCluster};

/// A pgsidecar process with its own config file.
struct Sidecar {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    admin: u16,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_text(cluster: &PgCluster, port: u16, admin: u16, pool_size: u32) -> String {
    format!(
        "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nupstream:\n  host: 127.0.0.1\n  port: {}\n  user: postgres\n  tls:\n    sslmode: disable\nauth:\n  method: trust\nusers:\n  - name: postgres\n  - name: admin\n    admin: true\npool:\n  size: {pool_size}\nadmin:\n  shutdown_delay: 1s\n  shutdown_timeout: 10s\n",
        cluster.port()
    )
}

fn start(cluster: &PgCluster, pool_size: u32) -> Sidecar {
    let dir = tempfile::tempdir().expect("temp dir");
    let (port, admin) = (free_port(), free_port());
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, config_text(cluster, port, admin, pool_size)).expect("write config");
    let child = Command::new(env!("CARGO_BIN_EXE_pgsidecar"))
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgsidecar");
    let s = Sidecar {
        child,
        dir,
        port,
        admin,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(s.admin, "GET", "/livez").0 != 200 {
        assert!(Instant::now() < deadline, "pgsidecar did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

/// A minimal HTTP/1.0 request: (status, body). Status 0 when nothing answers.
fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid has no memory-safety implications.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill failed");
}

fn url(port: u16, user: &str, db: &str) -> String {
    format!("postgres://{user}@127.0.0.1:{port}/{db}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_transactions_then_exits_zero() {
    bounded(async {
        let cluster = PgCluster::start();
        cluster.exec("create table drained(v int)");
        let mut sc = start(&cluster, 4);
        let client = connect(&url(sc.port, "postgres", "postgres")).await;
        client
            .batch_execute("begin; insert into drained values (1)")
            .await
            .expect("begin");

        signal(&sc.child, libc::SIGTERM);
        // Readiness fails at once, while the listener still accepts for shutdown_delay.
        let deadline = Instant::now() + Duration::from_secs(2);
        while http(sc.admin, "GET", "/readyz").0 != 503 {
            assert!(Instant::now() < deadline, "readyz did not turn 503");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(http(sc.admin, "GET", "/livez").0, 200);
        let during = connect(&url(sc.port, "postgres", "postgres")).await;
        assert_eq!(simple_one(&during, "select 7").await, "7");
        drop(during);

        // After the delay new connections are refused; the open transaction commits.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let refused =
            tokio_postgres::connect(&url(sc.port, "postgres", "postgres"), tokio_postgres::NoTls)
                .await;
        assert!(
            refused.is_err(),
            "new connections must be refused after shutdown_delay"
        );
        client
            .batch_execute("commit")
            .await
            .expect("open transaction commits during drain");

        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = sc.child.try_wait().expect("wait") {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "pgsidecar did not exit within shutdown_timeout"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "exit status {status:?}");
        assert_eq!(cluster.psql("select count(*) from drained"), "1");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_resizes_live_and_a_broken_file_keeps_the_old_config() {
    bounded(async {
        let cluster = PgCluster::start();
        let sc = start(&cluster, 2);
        let client = connect(&url(sc.port, "postgres", "postgres")).await;
        assert_eq!(simple_one(&client, "select 1").await, "1");
        let (_, pools) = http(sc.admin, "GET", "/api/pools");
        assert!(pools.contains("\"max_size\":2"), "{pools}");

        let path = sc.dir.path().join("proxy.yaml");
        std::fs::write(&path, config_text(&cluster, sc.port, sc.admin, 5)).expect("rewrite");
        signal(&sc.child, libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !http(sc.admin, "GET", "/api/pools")
            .1
            .contains("\"max_size\":5")
        {
            assert!(Instant::now() < deadline, "pool was not resized by SIGHUP");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The connected client never noticed.
        assert_eq!(simple_one(&client, "select 2").await, "2");

        std::fs::write(&path, "upstream: [this is not a mapping\n").expect("break");
        signal(&sc.child, libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !http(sc.admin, "GET", "/metrics")
            .1
            .contains("pgsidecar_config_reloads_total{result=\"failed\"} 1")
        {
            assert!(Instant::now() < deadline, "failed reload not counted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(http(sc.admin, "GET", "/api/pools")
            .1
            .contains("\"max_size\":5"));
        assert_eq!(simple_one(&client, "select 3").await, "3");
        // The HTTP reload reports why.
        let (status, body) = http(sc.admin, "POST", "/api/reload");
        assert_eq!(status, 422, "{body}");
        assert!(body.contains("previous configuration stays"), "{body}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_and_metrics_under_traffic() {
    bounded(async {
        let cluster = PgCluster::start();
        let sc = start(&cluster, 3);
        let client = connect(&url(sc.port, "postgres", "postgres")).await;
        for i in 0..50 {
            client
                .batch_execute(&format!("begin; select {i}; commit"))
                .await
                .expect("txn");
        }
        let admin = connect(&url(sc.port, "admin", "pgsidecar")).await;
        let rows = admin.simple_query("SHOW POOLS").await.expect("SHOW POOLS");
        let pool_rows: Vec<_> = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(pool_rows.len(), 1);
        assert_eq!(pool_rows[0].get("database"), Some("postgres"));
        assert_eq!(pool_rows[0].get("max_size"), Some("3"));
        for cmd in [
            "SHOW CLIENTS",
            "SHOW SERVERS",
            "SHOW STATS",
            "SHOW CONFIG",
            "PAUSE",
            "RESUME",
        ] {
            admin
                .simple_query(cmd)
                .await
                .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        }
        // Not an admin: refused with 28000.
        let e = tokio_postgres::connect(
            &url(sc.port, "postgres", "pgsidecar"),
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .expect("non-admin refused");
        assert_eq!(e.code().map(|c| c.code()), Some("28000"));

        let (status, text) = http(sc.admin, "GET", "/metrics");
        assert_eq!(status, 200);
        let count = |name: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        assert!(
            count("pgsidecar_transaction_duration_seconds_count") >= 50.0,
            "{text}"
        );
        assert!(count("pgsidecar_query_duration_seconds_count") >= 50.0);
        assert!(count("pgsidecar_checkout_wait_seconds_count") >= 50.0);
        assert!(text.contains("pgsidecar_clients{pool=\"postgres/postgres\",state=\"idle\"}"));
    })
    .await;
}

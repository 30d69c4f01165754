//! Every failure visible and bounded: upstream login failures, rejected logins, metric
//! cardinality, refusals at the client cap, startup options, queue mode through an
//! outage or a restart, PAUSE, and the config check. Against real PostgreSQL clusters.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use pgsidecar::config::{AuthMethod, UserConfig};
use pgsidecar::proxy::Proxy;
use tokio::io::AsyncReadExt;

use common::raw::RawConn;
use common::*;

fn user(name: &str, password: &str) -> UserConfig {
    serde_yaml::from_str(&format!("name: {name}\npassword: {password}")).expect("user yaml")
}

/// The value of one series in the proxy's /metrics text (0 when absent).
fn metric(proxy: &Proxy, series: &str) -> f64 {
    proxy.shared.registry.refresh_metrics();
    let text = proxy.shared.metrics.render();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn logins(proxy: &Proxy, result: &str) -> f64 {
    metric(
        proxy,
        &format!("pgsidecar_client_connections_total{{result=\"{result}\"}}"),
    )
}

/// A minimal HTTP/1.0 GET against the admin port: (status, body).
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("admin port");
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}

/// Runs psql (libpq, default sslmode=prefer) against the proxy; returns its stderr.
fn psql_stderr(proxy: &Proxy, user: &str, db: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.addr.port().to_string(),
        ])
        .args(["-U", user, "-d", db, "-c", sql])
        .env_remove("PGSSLMODE")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run psql");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `pgsidecar check` refuses a logging.level the running proxy would honour by
/// printing nothing, naming the key and its line.
#[test]
fn config_check_rejects_an_unknown_log_level_with_key_and_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.yaml");
    let text = "upstream:\n  host: 127.0.0.1\nauth:\n  method: trust\nlogging:\n  format: text\n  level: verbose\n";
    std::fs::write(&path, text).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_pgsidecar"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run pgsidecar check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check must fail: {stderr}");
    assert!(stderr.contains("logging.level"), "{stderr}");
    assert!(stderr.contains("\"verbose\""), "{stderr}");
    assert!(stderr.contains("line 7"), "{stderr}");
    // A filter the docs give passes.
    std::fs::write(&path, text.replace("verbose", "pgsidecar=debug,warn")).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_pgsidecar"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run pgsidecar check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A wrong upstream password (a role whose password changed under the proxy) is a
/// state: the client is told it was the proxy's own login, for which role and what to
/// fix; PostgreSQL sees a bounded number of failed logins (the breaker backs off);
/// the pool stays in /api/pools and SHOW POOLS with the error; the metric counts it
/// with its SQLSTATE; /readyz fails when configured; fixing the password recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_upstream_password_is_a_visible_bounded_state() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Scram);
        pg.exec(
            "drop role if exists vf_upstream; create role vf_upstream login password 'right_pw'",
        );
        let proxy = start_proxy(&pg, |c| {
            c.auth.method = AuthMethod::ScramSha256;
            let mut admin = user("vf_admin", "admin_pw");
            admin.admin = true;
            c.users = vec![user("app", "client_pw"), admin];
            c.upstream.user = Some("vf_upstream".into());
            c.upstream.password = Some("right_pw".into());
            c.admin.unready_when_upstream_login_fails = true;
        })
        .await;
        let admin = pgsidecar::admin::serve("127.0.0.1:0", pgsidecar::app::admin_of(&proxy.shared))
            .await
            .expect("admin port");
        let url = proxy_url_pw(&proxy, "app", "client_pw", "postgres");
        // Works, then the role's password changes under the proxy.
        let c = connect(&url).await;
        assert_eq!(simple_one(&c, "select current_user").await, "vf_upstream");
        drop(c);
        // The session returns its server asynchronously: wait for it to be idle, so
        // that the reconnect below closes it.
        wait_until(
            Duration::from_secs(5),
            "the server back in the pool",
            || {
                let pools = proxy.shared.registry.all();
                async move { pools.iter().all(|p| p.snapshot().active_servers == 0) }
            },
        )
        .await;
        // The password changes first, then the open server is closed: the pool's sizer
        // may reopen a connection at once, and that one must meet the new password.
        pg.exec("alter role vf_upstream password 'changed_pw'");
        proxy
            .shared
            .registry
            .all()
            .iter()
            .for_each(|p| p.reconnect());
        let failed_before = pg
            .log_contents()
            .matches("password authentication failed for user \"vf_upstream\"")
            .count();
        for i in 0..6 {
            let e = match try_connect(&url, Duration::from_secs(10)).await {
                Ok(c) => {
                    // Transaction mode: the pool knows its parameters, so the login
                    // passes and the first query meets the refusal.
                    c.simple_query("select 1")
                        .await
                        .expect_err("upstream login fails")
                }
                Err(TryConnectError::Pg(e)) => e,
                Err(e) => panic!("attempt {i}: {e}"),
            };
            let db = e.as_db_error().expect("a server error");
            assert_eq!(db.code().code(), "28P01", "attempt {i}: {db:?}");
            assert!(
                db.message()
                    .contains("the proxy's own login to PostgreSQL as role \"vf_upstream\" failed"),
                "attempt {i}: {}",
                db.message()
            );
            let hint = db.hint().unwrap_or("");
            assert!(
                hint.contains("upstream.password") && hint.contains("\"app\""),
                "{hint}"
            );
        }
        let failed = pg
            .log_contents()
            .matches("password authentication failed for user \"vf_upstream\"")
            .count()
            - failed_before;
        assert!(
            (1..=4).contains(&failed),
            "PostgreSQL saw {failed} failed logins for 6 clients"
        );
        let pool = "postgres/app";
        let counted = metric(
            &proxy,
            &format!(
                "pgsidecar_upstream_login_failures_total{{pool=\"{pool}\",sqlstate=\"28P01\"}}"
            ),
        );
        assert_eq!(
            counted as usize, failed,
            "metric counts every refused login"
        );
        let (status, body) = http_get(admin, "/api/pools");
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let p = v["pools"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == pool))
            .unwrap_or_else(|| panic!("pool listed: {body}"));
        assert_eq!(p["upstream_login_error"]["sqlstate"], "28P01", "{p}");
        assert_eq!(p["upstream_login_error"]["role"], "vf_upstream");
        assert!(
            p["upstream_login_error"]["since_unix"]
                .as_f64()
                .unwrap_or(0.0)
                > 1.0e9
        );
        let (status, body) = http_get(admin, "/readyz");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("vf_upstream"), "{body}");
        let console = connect(&proxy_url_pw(&proxy, "vf_admin", "admin_pw", "pgsidecar")).await;
        let rows: Vec<_> = console
            .simple_query("SHOW POOLS")
            .await
            .expect("show pools")
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .collect();
        let row = rows
            .iter()
            .find(|r| r.get("user") == Some("app"))
            .expect("pool row");
        assert!(row
            .get("upstream_login_error")
            .unwrap_or("")
            .contains("28P01"));
        // Fixed upstream: the next trial logs in, the state clears.
        pg.exec("alter role vf_upstream password 'right_pw'");
        wait_until(Duration::from_secs(20), "a login after the fix", || async {
            match try_connect(&url, Duration::from_secs(5)).await {
                Ok(c) => c.simple_query("select 1").await.is_ok(),
                Err(_) => false,
            }
        })
        .await;
        assert_eq!(http_get(admin, "/readyz").0, 200);
    })
    .await;
}

/// Every way a login ends is counted, with a bounded set of results.
#[tokio::test]
async fn every_login_outcome_is_counted() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |c| {
            c.auth.method = AuthMethod::ScramSha256;
            c.users = vec![user("postgres", "pw")];
            c.upstream.user = Some("postgres".into());
            c.limits.max_client_conn = 2;
        })
        .await;
        let ok = proxy_url_pw(&proxy, "postgres", "pw", "postgres");
        let held = connect(&ok).await;
        assert_eq!(logins(&proxy, "accepted"), 1.0);
        let wrong_pw = try_connect(
            &proxy_url_pw(&proxy, "postgres", "nope", "postgres"),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(
            wrong_pw
                .err()
                .and_then(|e| e.code().map(|c| c.code().to_string()))
                .as_deref(),
            Some("28P01")
        );
        let unknown_user = try_connect(
            &proxy_url_pw(&proxy, "nobody", "pw", "postgres"),
            Duration::from_secs(10),
        )
        .await;
        assert!(unknown_user.is_err());
        assert_eq!(logins(&proxy, "auth_failed"), 2.0);
        let no_db = try_connect(
            &proxy_url_pw(&proxy, "postgres", "pw", "vf_no_such_db"),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(
            no_db
                .err()
                .and_then(|e| e.code().map(|c| c.code().to_string()))
                .as_deref(),
            Some("3D000")
        );
        assert_eq!(logins(&proxy, "unknown_database"), 1.0);
        // A startup packet with a bad length.
        let mut raw = RawConn::connect(proxy.addr).await;
        raw.send(&[0, 0, 0, 2, 0, 0]).await;
        let m = raw.read_msg().await;
        assert_eq!(m.code().as_deref(), Some("08P01"));
        assert_eq!(logins(&proxy, "protocol_error"), 1.0);
        let second = connect(&ok).await;
        let third = try_connect(&ok, Duration::from_secs(10)).await;
        assert_eq!(
            third
                .err()
                .and_then(|e| e.code().map(|c| c.code().to_string()))
                .as_deref(),
            Some("53300")
        );
        assert_eq!(logins(&proxy, "limit"), 1.0);
        assert_eq!(logins(&proxy, "accepted"), 2.0);
        drop((held, second));
    })
    .await;
}

/// Logins to 2,000 random database names (no `databases:` list, as with `--upstream`)
/// leave no series behind: /metrics and RSS stay bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_database_names_leave_no_metric_series() {
    within(Duration::from_secs(240), "2,000 logins", async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |_| {}).await;
        let c = connect(&proxy_url(&proxy, "postgres", "postgres")).await;
        assert_eq!(simple_one(&c, "select 1").await, "1");
        // Warm up allocator arenas and the metric encoder with a first batch.
        let attempt = |i: usize| {
            let url = proxy_url(
                &proxy,
                "postgres",
                &format!("vf_rand_{i}_{:08x}", rand_u32(i)),
            );
            async move {
                let r = try_connect(&url, Duration::from_secs(10)).await;
                assert_eq!(
                    r.err()
                        .and_then(|e| e.code().map(|c| c.code().to_string()))
                        .as_deref(),
                    Some("3D000")
                );
            }
        };
        run_batched(0..100, 8, attempt).await;
        proxy.shared.registry.refresh_metrics();
        let before = proxy.shared.metrics.render().len();
        let rss_before = rss_kib();
        run_batched(100..2100, 8, attempt).await;
        proxy.shared.registry.refresh_metrics();
        let text = proxy.shared.metrics.render();
        let rss_after = rss_kib();
        eprintln!(
            "/metrics {before} -> {} bytes; RSS {rss_before} -> {rss_after} KiB",
            text.len()
        );
        assert!(
            !text.contains("vf_rand_"),
            "series of forgotten pools remain"
        );
        assert!(
            text.len() <= before + before / 10,
            "/metrics grew from {before} to {} bytes",
            text.len()
        );
        assert!(
            rss_after <= rss_before + 3 * 1024,
            "RSS grew from {rss_before} to {rss_after} KiB"
        );
        assert_eq!(
            proxy.shared.registry.all().len(),
            1,
            "only the pool in use remains"
        );
        assert_eq!(logins(&proxy, "unknown_database"), 2100.0);
    })
    .await;
}

fn rand_u32(i: usize) -> u32 {
    (i as u32).wrapping_mul(2_654_435_761) ^ 0x9e37_79b9
}

async fn run_batched<F, Fut>(range: std::ops::Range<usize>, width: usize, f: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let ids: Vec<usize> = range.collect();
    for chunk in ids.chunks(width) {
        futures_util::future::join_all(chunk.iter().map(|&i| f(i))).await;
    }
}

/// Past limits.max_dynamic_pools a login that needs a new pool gets a clear FATAL; an
/// unused pool makes room.
#[tokio::test]
async fn dynamic_pools_are_capped_with_a_clear_fatal() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |c| c.limits.max_dynamic_pools = 2).await;
        let mut held = Vec::new();
        for db in ["postgres", "template1"] {
            let c = connect(&proxy_url(&proxy, "postgres", db)).await;
            assert_eq!(simple_one(&c, "select 1").await, "1");
            held.push(c);
        }
        let e = try_connect(
            &proxy_url(&proxy, "postgres", "vf_third_db"),
            Duration::from_secs(10),
        )
        .await
        .expect_err("refused");
        let TryConnectError::Pg(e) = e else {
            panic!("{e}")
        };
        assert_eq!(code_of(&e), "53300", "{e}");
        assert!(message_of(&e).contains("limits.max_dynamic_pools"), "{e}");
        assert_eq!(proxy.shared.registry.all().len(), 2);
        // An existing pool still takes logins.
        let c = connect(&proxy_url(&proxy, "postgres", "postgres")).await;
        assert_eq!(simple_one(&c, "select 1").await, "1");
        assert_eq!(logins(&proxy, "limit"), 1.0);
        // Once template1's clients are gone, its pool makes room for another database.
        held.truncate(1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let e = try_connect(
            &proxy_url(&proxy, "postgres", "vf_third_db"),
            Duration::from_secs(10),
        )
        .await
        .expect_err("no such database");
        let TryConnectError::Pg(e) = e else {
            panic!("{e}")
        };
        assert_eq!(code_of(&e), "3D000", "{e}");
        let c = connect(&proxy_url(&proxy, "postgres", "template1")).await;
        assert_eq!(simple_one(&c, "select 1").await, "1");
    })
    .await;
}

/// At max_client_conn the refusal reads as PostgreSQL's through libpq with its default
/// sslmode=prefer: the SSLRequest is answered and the FATAL follows the startup packet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_clients_is_readable_through_libpq_sslmode_prefer() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |c| c.limits.max_client_conn = 1).await;
        let held = connect(&proxy_url(&proxy, "postgres", "postgres")).await;
        let stderr =
            tokio::task::block_in_place(|| psql_stderr(&proxy, "postgres", "postgres", "select 1"));
        assert!(
            stderr.contains("sorry, too many clients already"),
            "psql said: {stderr}"
        );
        assert!(!stderr.contains("SSL exchange"), "psql said: {stderr}");
        drop(held);
    })
    .await;
}

/// A client at the cap can still cancel its own runaway query, as with PostgreSQL.
#[tokio::test]
async fn cancel_is_accepted_at_the_client_cap() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |c| c.limits.max_client_conn = 1).await;
        let c = connect(&proxy_url(&proxy, "postgres", "postgres")).await;
        let token = c.cancel_token();
        let started = Instant::now();
        let canceller = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            token
                .cancel_query(tokio_postgres::NoTls)
                .await
                .expect("cancel request sent");
        };
        let (r, ()) = tokio::join!(c.simple_query("select pg_sleep(30)"), canceller);
        let e = r.expect_err("cancelled");
        assert_eq!(code_of(&e), "57014", "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(logins(&proxy, "cancel"), 1.0);
    })
    .await;
}

/// Silent sockets that never send a startup packet do not lock logins out, and are
/// closed after client_startup_timeout.
#[tokio::test]
async fn silent_sockets_cannot_starve_logins() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |c| {
            c.limits.max_client_conn = 3;
            c.limits.client_startup_timeout = Duration::from_millis(1500);
        })
        .await;
        let mut silent = Vec::new();
        for _ in 0..10 {
            silent.push(
                tokio::net::TcpStream::connect(proxy.addr)
                    .await
                    .expect("connect"),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let c = connect(&proxy_url(&proxy, "postgres", "postgres")).await;
        assert_eq!(simple_one(&c, "select 1").await, "1");
        assert!(started.elapsed() < Duration::from_secs(2));
        // Each silent socket is closed once its time is up.
        for mut s in silent {
            let mut b = [0u8; 1];
            let n = within(
                Duration::from_secs(5),
                "silent socket closed",
                s.read(&mut b),
            )
            .await;
            assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        }
        assert!(started.elapsed() >= Duration::from_millis(1200));
    })
    .await;
}

/// PAUSE returns only once the transaction in flight has finished, and a client queued
/// on the paused pool is told it is paused (not that the pool is too small).
#[tokio::test]
async fn pause_waits_for_transactions_and_waiters_are_told_it_is_paused() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |c| {
            let mut admin: UserConfig = serde_yaml::from_str("name: vf_admin").expect("yaml");
            admin.admin = true;
            c.users = vec![serde_yaml::from_str("name: postgres").expect("yaml"), admin];
            c.pool.query_wait_timeout = Duration::from_millis(800);
        })
        .await;
        let a = connect(&proxy_url(&proxy, "postgres", "postgres")).await;
        a.batch_execute("begin; select 1").await.expect("begin");
        let console = connect(&proxy_url(&proxy, "vf_admin", "pgsidecar")).await;
        let started = Instant::now();
        let pause = console.simple_query("PAUSE");
        let commit_later = async {
            tokio::time::sleep(Duration::from_millis(700)).await;
            a.batch_execute("commit").await.expect("commit");
        };
        let (paused, ()) = tokio::join!(pause, commit_later);
        paused.expect("PAUSE");
        assert!(
            started.elapsed() >= Duration::from_millis(650),
            "PAUSE returned after {:?}, before the transaction ended",
            started.elapsed()
        );
        // Queued on the paused pool past query_wait_timeout.
        let e = a.simple_query("select 1").await.expect_err("paused");
        assert_eq!(code_of(&e), "57P03", "{e}");
        let m = message_of(&e);
        assert!(m.contains("is paused") && !m.contains("busy"), "{m}");
        console.simple_query("RESUME").await.expect("RESUME");
        assert_eq!(simple_one(&a, "select 1").await, "1");
    })
    .await;
}

/// Queue mode rides out the first seconds of an outage and a `pg_ctl restart`: every
/// request made meanwhile succeeds once PostgreSQL is back (none gets 08006 or 57P03).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_mode_rides_out_an_outage_and_a_restart() {
    bounded(async {
        let pg = std::sync::Arc::new(PgCluster::start());
        let proxy = start_proxy(&pg, |c| {
            c.breaker.on_open = pgsidecar::config::BreakerOnOpen::Queue;
            c.pool.query_wait_timeout = Duration::from_secs(20);
            c.pool.size = 4;
        })
        .await;
        let url = proxy_url(&proxy, "postgres", "postgres");
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(connect(&url).await);
        }
        for round in ["restart", "outage"] {
            // A session of its own holds a smart restart in its shutdown phase, where
            // PostgreSQL answers new connections with 57P03; the pool's idle servers
            // are closed so each request needs a new one.
            let direct = connect(&pg.superuser_url()).await;
            let pg2 = pg.clone();
            let restart = std::thread::spawn(move || match round {
                "restart" => pg2.restart("smart"),
                _ => {
                    pg2.stop_fast();
                    std::thread::sleep(Duration::from_millis(1500));
                    pg2.start_again();
                }
            });
            if round == "restart" {
                wait_until(
                    Duration::from_secs(10),
                    "smart shutdown under way",
                    || async {
                        pg.log_contents()
                            .matches("received smart shutdown request")
                            .count()
                            > 0
                    },
                )
                .await;
            }
            proxy
                .shared
                .registry
                .all()
                .iter()
                .for_each(|p| p.reconnect());
            let started = Instant::now();
            let mut requests = Vec::new();
            // Requests all through the restart window.
            while started.elapsed() < Duration::from_millis(1500) {
                for c in &clients {
                    requests.push(c.simple_query("select 1"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The restart completes once the last session is gone.
            drop(direct);
            let results = futures_util::future::join_all(requests).await;
            restart.join().expect("restart thread");
            let failed: Vec<String> = results
                .iter()
                .filter_map(|r| r.as_ref().err())
                .map(|e| format!("{} {}", code_of(e), message_of(e)))
                .collect();
            assert!(
                failed.is_empty(),
                "{round}: {} of {} requests failed: {failed:?}",
                failed.len(),
                results.len()
            );
        }
    })
    .await;
}

/// Startup options are validated as PostgreSQL validates them: a value it refuses
/// refuses the login with its own SQLSTATE and message; valid options cost no server
/// connection per transaction.
#[tokio::test]
async fn bad_startup_options_are_refused_as_postgresql_refuses_them() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |_| {}).await;
        let direct_base = format!("postgres://postgres@{}/postgres", pg.addr());
        let proxy_base = proxy_url(&proxy, "postgres", "postgres");
        for (options, code) in [
            ("-c%20statement_timeout%3Dbanana", "22023"),
            ("-c%20nonexistent_guc%3D1", "42704"),
        ] {
            let direct = try_connect(&format!("{direct_base}?options={options}"), Duration::from_secs(10))
                .await
            .expect_err("PostgreSQL refuses it");
            let TryConnectError::Pg(direct) = direct else { panic!("{direct}") };
            let via = try_connect(&format!("{proxy_base}?options={options}"), Duration::from_secs(10))
                .await
                .err()
                .unwrap_or_else(|| panic!("the proxy must refuse {options} too"));
            let TryConnectError::Pg(via) = via else { panic!("{via}") };
            assert_eq!(code_of(&via), code, "{via}");
            assert_eq!(code_of(&via), code_of(&direct));
            assert_eq!(message_of(&via), message_of(&direct));
            assert_eq!(via.as_db_error().map(|d| d.severity().to_string()).as_deref(), Some("FATAL"));
        }
        assert_eq!(logins(&proxy, "invalid_settings"), 2.0);
        // Valid options apply, and 20 transactions reuse the pool's server.
        let opened = metric(&proxy, "pgsidecar_server_connections_opened_total{pool=\"postgres/postgres\"}");
        let c = connect(&format!("{proxy_base}?options=-c%20statement_timeout%3D4321")).await;
        for _ in 0..20 {
            assert_eq!(simple_one(&c, "show statement_timeout").await, "4321ms");
        }
        let opened_after = metric(&proxy, "pgsidecar_server_connections_opened_total{pool=\"postgres/postgres\"}");
        assert!(opened_after - opened <= 1.0, "{opened} -> {opened_after} server connections");
        let unclean = metric(&proxy, "pgsidecar_server_connections_closed_total{pool=\"postgres/postgres\",reason=\"unclean_at_release\"}");
        assert_eq!(unclean, 0.0);
    })
    .await;
}

/// Settings that PostgreSQL accepted at login but refuses on a later server (the text
/// search configuration they name was dropped) end the session with PostgreSQL's
/// words, instead of a new server connection for every transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_stop_applying_end_the_session_instead_of_a_reconnect_loop() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        pg.exec("drop text search configuration if exists public.vf_ts; create text search configuration public.vf_ts (copy = english)");
        let proxy = start_proxy(&pg, |c| c.pool.size = 2).await;
        let mut c = RawConn::connect(proxy.addr).await;
        c.send(&common::raw::startup_packet(
            196608,
            &[
                ("user", "postgres"),
                ("database", "postgres"),
                ("options", "-c default_text_search_config=public.vf_ts"),
            ],
        ))
        .await;
        c.finish_login().await;
        assert_eq!(c.query_rows("show default_text_search_config").await[0][0].as_deref(), Some("public.vf_ts"));
        pg.exec("drop text search configuration public.vf_ts");
        proxy.shared.registry.all().iter().for_each(|p| p.reconnect());
        let series = "pgsidecar_server_connections_opened_total{pool=\"postgres/postgres\"}";
        let opened = metric(&proxy, series);
        let mut fatal = None;
        for _ in 0..10 {
            c.send(&common::raw::query_msg("select 1")).await;
            let mut msgs = Vec::new();
            while let Some(m) = c.try_read_msg().await {
                let done = m.tag == b'Z';
                msgs.push(m);
                if done {
                    break;
                }
            }
            if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
                fatal = Some((e.code(), e.field(b'S'), e.field(b'M')));
                break;
            }
        }
        let (code, severity, message) = fatal.expect("the session ends with an error");
        assert_eq!(severity.as_deref(), Some("FATAL"));
        assert_eq!(code.as_deref(), Some("22023"), "PostgreSQL's code for it");
        let message = message.unwrap_or_default();
        assert!(message.contains("cannot be applied") && message.contains("default_text_search_config"), "{message}");
        let opened_after = metric(&proxy, series);
        assert!(opened_after - opened <= 2.0, "{opened} -> {opened_after} server connections");
    })
    .await;
}

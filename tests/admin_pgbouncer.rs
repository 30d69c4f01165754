//! PgBouncer habits against the real binary: every console command through psql with
//! PgBouncer's documented column names, KILL / SUSPEND / SHUTDOWN as a client sees them,
//! the live max-wait gauge for a client stuck in the queue, process_* and per-pool error
//! metrics, and the logs (connection lines, flat JSON, a bind error naming the address).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bounded, connect, free_port, simple_one, PgCluster};

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

impl Sidecar {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

fn config_text(cluster: &PgCluster, port: u16, admin: u16, pool_size: u32, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nupstream:\n  host: 127.0.0.1\n  port: {}\n  user: postgres\n  tls:\n    sslmode: disable\nauth:\n  method: trust\nusers:\n  - name: postgres\n  - name: admin\n    admin: true\npool:\n  size: {pool_size}\n  query_wait_timeout: 20s\nadmin:\n  shutdown_delay: 0s\n  shutdown_timeout: 5s\n{extra}",
        cluster.port()
    )
}

fn spawn(cluster: &PgCluster, pool_size: u32, extra: &str, env: &[(&str, &str)]) -> Sidecar {
    let dir = tempfile::tempdir().expect("temp dir");
    let (port, admin) = (free_port(), free_port());
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, config_text(cluster, port, admin, pool_size, extra)).expect("config");
    let log = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_pgsidecar"))
        .arg("--config")
        .arg(&path)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start pgsidecar");
    let s = Sidecar {
        child,
        dir,
        port,
        admin,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(s.admin, "/livez").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "pgsidecar did not start: {}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

fn http(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
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

/// A sample's value from a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn url(port: u16, user: &str, db: &str) -> String {
    format!("postgres://{user}@127.0.0.1:{port}/{db}")
}

/// `psql -U admin pgsidecar -c CMD`, unaligned: (header columns, data rows).
fn psql(port: u16, cmd: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let out = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-F",
            "\t",
            "-P",
            "footer=off",
            "-h",
            "127.0.0.1",
        ])
        .args([
            "-p",
            &port.to_string(),
            "-U",
            "admin",
            "pgsidecar",
            "-c",
            cmd,
        ])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql -c {cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let header = lines
        .next()
        .unwrap_or_default()
        .split('\t')
        .map(String::from)
        .collect();
    let rows = lines
        .map(|l| l.split('\t').map(String::from).collect())
        .collect();
    (header, rows)
}

/// Columns PgBouncer documents for each SHOW command (doc/usage.md of PgBouncer 1.24);
/// STATS_TOTALS / STATS_AVERAGES are SHOW STATS's total_ / avg_ columns as PgBouncer
/// prints them, without the prefix.
fn pgbouncer_columns(cmd: &str) -> &'static [&'static str] {
    match cmd {
        "SHOW POOLS" => &[
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "cl_active_cancel_req",
            "cl_waiting_cancel_req",
            "sv_active",
            "sv_active_cancel",
            "sv_being_canceled",
            "sv_idle",
            "sv_used",
            "sv_tested",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode",
            "load_balance_hosts",
        ],
        "SHOW STATS" => &[
            "database",
            "total_xact_count",
            "total_query_count",
            "total_server_assignment_count",
            "total_server_closed_count",
            "total_received",
            "total_sent",
            "total_xact_time",
            "total_query_time",
            "total_wait_time",
            "total_server_lifetime",
            "total_client_parse_count",
            "total_server_parse_count",
            "total_bind_count",
            "avg_xact_count",
            "avg_query_count",
            "avg_server_assignment_count",
            "avg_recv",
            "avg_sent",
            "avg_xact_time",
            "avg_query_time",
            "avg_wait_time",
            "avg_server_lifetime",
            "avg_client_parse_count",
            "avg_server_parse_count",
            "avg_bind_count",
        ],
        "SHOW STATS_TOTALS" => &[
            "database",
            "xact_count",
            "query_count",
            "server_assignment_count",
            "server_closed_count",
            "received",
            "sent",
            "xact_time",
            "query_time",
            "wait_time",
        ],
        "SHOW STATS_AVERAGES" => &[
            "database",
            "xact_count",
            "query_count",
            "server_assignment_count",
            "recv",
            "sent",
            "xact_time",
            "query_time",
            "wait_time",
        ],
        "SHOW SERVERS" => &[
            "type",
            "user",
            "database",
            "replication",
            "state",
            "addr",
            "port",
            "local_addr",
            "local_port",
            "connect_time",
            "request_time",
            "wait",
            "wait_us",
            "close_needed",
            "ptr",
            "link",
            "remote_pid",
            "tls",
            "application_name",
            "prepared_statements",
            "id",
        ],
        "SHOW USERS" => &[
            "name",
            "pool_size",
            "reserve_pool_size",
            "pool_mode",
            "max_user_connections",
            "current_connections",
            "max_user_client_connections",
            "current_client_connections",
        ],
        "SHOW DATABASES" => &[
            "name",
            "host",
            "port",
            "database",
            "force_user",
            "pool_size",
            "min_pool_size",
            "reserve_pool_size",
            "server_lifetime",
            "pool_mode",
            "load_balance_hosts",
            "max_connections",
            "current_connections",
            "max_client_connections",
            "current_client_connections",
            "paused",
            "disabled",
        ],
        "SHOW CONFIG" => &["key", "value", "default", "changeable"],
        // SHOW LISTS documents its items (databases, users, pools, ...), checked below.
        "SHOW LISTS" => &["list", "items"],
        // SHOW MEM's columns are undocumented ("subject to change"): PgBouncer prints these.
        "SHOW MEM" => &["name", "size", "used", "free", "memtotal"],
        _ => &[],
    }
}

/// pgsidecar's own columns, which come after PgBouncer's.
fn extra_columns(cmd: &str) -> &'static [&'static str] {
    match cmd {
        "SHOW POOLS" => &[
            "cl_idle",
            "min_size",
            "max_size",
            "target_size",
            "ceiling",
            "paused",
            "breaker",
            "upstream_login_error",
            "upstream_login_failing_secs",
        ],
        "SHOW STATS" | "SHOW STATS_TOTALS" | "SHOW STATS_AVERAGES" => &["user"],
        "SHOW SERVERS" => &["age_secs", "idle_secs"],
        "SHOW USERS" => &["server_user", "admin"],
        _ => &[],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_command_answers_psql_with_pgbouncer_column_names() {
    bounded(async {
        let cluster = PgCluster::start();
        let sc = spawn(&cluster, 3, "", &[]);
        let client = connect(&url(sc.port, "postgres", "postgres")).await;
        client.batch_execute("begin").await.expect("begin");
        assert_eq!(simple_one(&client, "select 1").await, "1");
        let client2 = connect(&url(sc.port, "postgres", "postgres")).await;
        for i in 0..20 {
            client2
                .batch_execute(&format!("select {i}"))
                .await
                .expect("select");
        }
        let port = sc.port;
        let checks = tokio::task::spawn_blocking(move || {
            for cmd in [
                "SHOW POOLS",
                "SHOW STATS",
                "SHOW STATS_TOTALS",
                "SHOW STATS_AVERAGES",
                "SHOW SERVERS",
                "SHOW USERS",
                "SHOW DATABASES",
                "SHOW CONFIG",
                "SHOW LISTS",
                "SHOW MEM",
                "SHOW CLIENTS",
                "SHOW VERSION",
                "SHOW HELP",
            ] {
                let (cols, rows) = psql(port, cmd);
                assert!(!rows.is_empty(), "{cmd}: no rows");
                let ours = pgbouncer_columns(cmd);
                if ours.is_empty() {
                    continue;
                }
                let extras = extra_columns(cmd);
                // Every column is PgBouncer's (same name, PgBouncer's relative order)
                // or one of our declared extras.
                let (pgb, own): (Vec<&String>, Vec<&String>) =
                    cols.iter().partition(|c| ours.contains(&c.as_str()));
                assert!(
                    own.iter().all(|c| extras.contains(&c.as_str())),
                    "{cmd}: columns {own:?} are neither PgBouncer's nor declared extras"
                );
                assert!(
                    pgb.len() >= 2,
                    "{cmd}: hardly any PgBouncer column in {cols:?}"
                );
                let order: Vec<usize> = pgb
                    .iter()
                    .map(|c| ours.iter().position(|o| o == c).unwrap_or(usize::MAX))
                    .collect();
                assert!(
                    order.windows(2).all(|w| w[0] < w[1]),
                    "{cmd}: order {cols:?}"
                );
            }
            let (cols, rows) = psql(port, "SHOW POOLS");
            let must: BTreeSet<&str> = [
                "database",
                "user",
                "cl_active",
                "cl_waiting",
                "sv_active",
                "sv_idle",
                "sv_login",
                "maxwait",
                "maxwait_us",
                "pool_mode",
            ]
            .into();
            let have: BTreeSet<&str> = cols.iter().map(String::as_str).collect();
            assert!(must.is_subset(&have), "SHOW POOLS columns {cols:?}");
            let get = |row: &Vec<String>, c: &str| {
                row[cols.iter().position(|x| x == c).expect(c)].clone()
            };
            let pool = rows
                .iter()
                .find(|r| get(r, "database") == "postgres")
                .expect("pool");
            assert_eq!(get(pool, "cl_active"), "2", "{cols:?} {pool:?}");
            assert_eq!(get(pool, "sv_active"), "1");
            assert_eq!(get(pool, "pool_mode"), "transaction");

            let (cols, rows) = psql(port, "SHOW STATS");
            let get = |row: &Vec<String>, c: &str| -> u64 {
                row[cols.iter().position(|x| x == c).expect(c)]
                    .parse()
                    .expect(c)
            };
            let st = &rows[0];
            assert!(get(st, "total_query_count") >= 21, "{cols:?} {st:?}");
            assert!(get(st, "total_xact_count") >= 20);
            assert!(get(st, "total_received") > 0 && get(st, "total_sent") > 0);
            assert!(get(st, "total_query_time") > 0);

            // Servers in use have an age, a connect and a request time.
            let (cols, rows) = psql(port, "SHOW SERVERS");
            let active = rows
                .iter()
                .find(|r| r[cols.iter().position(|c| c == "state").expect("state")] == "active")
                .expect("an active server");
            for c in ["connect_time", "request_time", "age_secs", "remote_pid"] {
                let v = &active[cols.iter().position(|x| x == c).expect(c)];
                assert!(!v.is_empty(), "SHOW SERVERS {c} empty for an active server");
            }

            let (cols, rows) = psql(port, "SHOW CONFIG");
            assert_eq!(cols, ["key", "value", "default", "changeable"]);
            let size = rows
                .iter()
                .find(|r| r[0] == "pool.size")
                .expect("pool.size row");
            assert_eq!(size[1..], ["3", "20", "yes"]);

            let (_, rows) = psql(port, "SHOW LISTS");
            let items: BTreeSet<&str> = rows.iter().map(|r| r[0].as_str()).collect();
            for k in [
                "databases",
                "users",
                "pools",
                "used_clients",
                "used_servers",
            ] {
                assert!(items.contains(k), "SHOW LISTS lacks {k}");
            }
        });
        checks.await.expect("psql checks");
        client.batch_execute("commit").await.expect("commit");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_suspend_and_shutdown_as_clients_see_them() {
    bounded(async {
        let cluster = PgCluster::start();
        let mut sc = spawn(&cluster, 1, "", &[]);
        let admin = connect(&url(sc.port, "admin", "pgsidecar")).await;
        // One client holds the only server in a transaction; another queues for it.
        let victim = connect(&url(sc.port, "postgres", "postgres")).await;
        victim
            .batch_execute("begin; select 1")
            .await
            .expect("begin");
        let waiter = connect(&url(sc.port, "postgres", "postgres")).await;
        let queued = tokio::spawn(async move { waiter.simple_query("select 9").await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!queued.is_finished(), "the second client should be queued");

        admin.simple_query("KILL postgres").await.expect("KILL");
        let e = victim
            .simple_query("select 2")
            .await
            .expect_err("a killed client's next query fails");
        assert!(
            victim.is_closed() || e.code().is_some_and(|c| c.code() == "57P01"),
            "{e}"
        );
        // The queued one is ended too, at once, not after query_wait_timeout (20s).
        let r = tokio::time::timeout(Duration::from_secs(5), queued)
            .await
            .unwrap_or_else(|_| panic!("the queued client was not ended by KILL:\n{}", sc.log()))
            .expect("join");
        let e = r.expect_err("a killed queued client gets an error");
        assert!(e.code().is_none_or(|c| c.code() == "57P01"), "{e}");
        // Killed databases wait for RESUME: a new client's query queues until then.
        let late = connect(&url(sc.port, "postgres", "postgres")).await;
        let q = tokio::spawn(async move { simple_one(&late, "select 3").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !q.is_finished(),
            "a query ran on a killed database before RESUME"
        );
        admin.simple_query("RESUME").await.expect("RESUME");
        assert_eq!(q.await.expect("join"), "3");

        admin.simple_query("SUSPEND").await.expect("SUSPEND");
        let c = connect(&url(sc.port, "postgres", "postgres")).await;
        let q = tokio::spawn(async move { simple_one(&c, "select 4").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!q.is_finished(), "a query ran while suspended");
        admin.simple_query("RESUME").await.expect("RESUME");
        assert_eq!(q.await.expect("join"), "4");

        let _ = admin.simple_query("SHUTDOWN").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = sc.child.try_wait().expect("wait") {
                break st;
            }
            assert!(Instant::now() < deadline, "still running after SHUTDOWN");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "exit status {status}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_waiter_shows_in_the_maxwait_gauge_within_one_scrape() {
    bounded(async {
        let cluster = PgCluster::start();
        let sc = spawn(&cluster, 1, "", &[]);
        let holder = connect(&url(sc.port, "postgres", "postgres")).await;
        holder
            .batch_execute("begin; select 1")
            .await
            .expect("begin");
        let waiter = connect(&url(sc.port, "postgres", "postgres")).await;
        let q = tokio::spawn(async move { simple_one(&waiter, "select 5").await });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!q.is_finished());

        // One scrape, while no wait has completed: the gauge already shows it.
        let (_, text) = http(sc.admin, "/metrics");
        let series = "pgsidecar_pool_client_maxwait_seconds{pool=\"postgres/postgres\"}";
        let w = sample(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"));
        assert!((1.4..10.0).contains(&w), "maxwait {w}");
        let (_, maxwait) = tokio::task::spawn_blocking({
            let port = sc.port;
            move || {
                let (cols, rows) = psql(port, "SHOW POOLS");
                let i = cols.iter().position(|c| c == "maxwait").expect("maxwait");
                (cols, rows[0][i].clone())
            }
        })
        .await
        .expect("psql");
        assert!(
            maxwait.parse::<u64>().expect("maxwait") >= 1,
            "SHOW POOLS maxwait {maxwait}"
        );

        holder.batch_execute("commit").await.expect("commit");
        assert_eq!(q.await.expect("join"), "5");
        let (_, text) = http(sc.admin, "/metrics");
        assert_eq!(
            sample(&text, series),
            Some(0.0),
            "gauge after the wait ended"
        );

        // The operator's other series: process_* and errors by pool.
        let _ = holder.simple_query("select 1/0").await;
        let (_, text) = http(sc.admin, "/metrics");
        assert!(sample(&text, "process_resident_memory_bytes").is_some_and(|v| v > 1e6));
        for s in ["process_cpu_seconds_total", "process_open_fds"] {
            assert!(sample(&text, s).is_some_and(|v| v >= 0.0), "{s} missing");
        }
        let errs = "pgsidecar_pool_errors_total{origin=\"server\",pool=\"postgres/postgres\"}";
        assert_eq!(sample(&text, errs), Some(1.0), "{text}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_flat_and_name_logins_logouts_and_bind_errors() {
    bounded(async {
        let cluster = PgCluster::start();
        let sc = spawn(&cluster, 2, "", &[("PGSIDECAR_LOG_FORMAT", "JSON")]);
        let c = connect(&url(sc.port, "postgres", "postgres")).await;
        assert_eq!(simple_one(&c, "select 1").await, "1");
        drop(c);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sc.log().contains("client disconnected") {
            assert!(
                Instant::now() < deadline,
                "no disconnection line:\n{}",
                sc.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let lines: Vec<serde_json::Value> = sc
            .log()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        for l in &lines {
            for k in ["timestamp", "severity", "message"] {
                assert!(
                    l.get(k).is_some_and(|v| v.is_string()),
                    "{k} missing in {l}"
                );
            }
        }
        let find = |m: &str| lines.iter().find(|l| l["message"] == m).cloned();
        let login = find("client logged in").expect("login line");
        assert_eq!(login["severity"], "INFO");
        assert_eq!(login["user"], "postgres");
        assert_eq!(login["database"], "postgres");
        let logout = find("client disconnected").expect("logout line");
        assert!(logout.get("duration_secs").is_some());

        // Same client port again: the error names the address and the setting.
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("proxy.yaml");
        let text = config_text(
            &cluster,
            sc.port,
            free_port(),
            1,
            "logging:\n  log_connections: false\n",
        );
        std::fs::write(&path, text).expect("config");
        let out = Command::new(env!("CARGO_BIN_EXE_pgsidecar"))
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let addr = format!("127.0.0.1:{}", sc.port);
        assert!(err.contains(&addr) && err.contains("listen"), "{err}");
    })
    .await;
}

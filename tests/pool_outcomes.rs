//! What the pool's controllers do to real loads, judged by what clients and PostgreSQL
//! see (one throwaway cluster per test):
//!
//! - a light load (one transaction a second, one every 150 ms, `pgbench -R 20`) keeps
//!   one server connection: PostgreSQL logs no new login per query;
//! - a lone proxy whose clients queue keeps its whole pool (no congestion control cut
//!   without a signal from PostgreSQL), so a sleep-bound load gets the physical rate;
//! - session-mode clients queued on a full pool get a server the moment one is free;
//! - several proxies sharing a database too small for all of them converge to fair
//!   shares without client errors, and when all but one go idle it gets its size back.
//!
//! The lengths are short enough for the regular suite; `PGSIDECAR_FULL_OUTCOMES=1` runs
//! the full lengths (60 s, 30 s, 20 s, ...). Figures are printed (`--nocapture`).

mod common;
mod pool_support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgsidecar::config::PoolMode;
use pgsidecar::proxy::Proxy;

use common::*;
use pool_support::*;

fn full() -> bool {
    std::env::var("PGSIDECAR_FULL_OUTCOMES").is_ok_and(|v| v == "1")
}

/// `ci` seconds in the regular suite, `full_secs` with `PGSIDECAR_FULL_OUTCOMES=1`.
fn length(ci: u64, full_secs: u64) -> Duration {
    Duration::from_secs(if full() { full_secs } else { ci })
}

fn logging_cluster() -> PgCluster {
    PgCluster::start_with(ClusterOptions {
        extra_conf: vec!["log_connections = on".into()],
        ..Default::default()
    })
}

/// Logins the proxy made to PostgreSQL so far, as PostgreSQL logged them (probes and
/// headroom samples included: every backend PostgreSQL had to fork for us).
fn proxy_logins(pg: &PgCluster) -> usize {
    pg.log_contents()
        .lines()
        .filter(|l| l.contains("connection authorized") && l.contains("application_name=pgsidecar"))
        .count()
}

/// The log lines of the proxy's logins, for a failure message.
fn login_lines(pg: &PgCluster) -> String {
    let log = pg.log_contents();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection authorized") && l.contains("application_name=pgsidecar"))
        .collect();
    lines.join("\n")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One client sending `select pg_backend_pid()` every `period` for `length`: the
/// backend of each transaction and its latency (sorted).
async fn paced(url: &str, period: Duration, length: Duration) -> (Vec<i32>, Vec<Duration>) {
    let c = connect(url).await;
    let n = (length.as_millis() / period.as_millis()).max(1) as u32;
    let start = tokio::time::Instant::now();
    let mut pids = Vec::new();
    let mut lat = Vec::new();
    for i in 0..n {
        tokio::time::sleep_until(start + period * i).await;
        let t = Instant::now();
        let pid = simple_one(&c, "select pg_backend_pid()").await;
        lat.push(t.elapsed());
        pids.push(pid.parse().expect("pid"));
    }
    lat.sort();
    (pids, lat)
}

/// Share of transactions that ran on the most used backend.
fn same_backend_share(pids: &[i32]) -> f64 {
    let mut counts: HashMap<i32, usize> = HashMap::new();
    for p in pids {
        *counts.entry(*p).or_default() += 1;
    }
    let most = counts.values().max().copied().unwrap_or(0);
    most as f64 / pids.len().max(1) as f64
}

/// One transaction a second, then one every 150 ms, through a pool of size 8 with
/// stock settings: each run reuses one server backend (PostgreSQL logs at most one
/// login by the proxy per run), as a client connected directly would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn light_load_keeps_one_server_connection() {
    let _serial = serial().await;
    let runs = [
        (Duration::from_millis(1000), length(10, 60)),
        (Duration::from_millis(150), length(6, 30)),
    ];
    let limit = runs.iter().map(|r| r.1).sum::<Duration>() + Duration::from_secs(40);
    within(limit, "light load", async {
        let pg = logging_cluster();
        let proxy = start_proxy(&pg, |c| c.pool.size = 8).await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let direct = format!(
            "postgres://{SUPERUSER}@{}/postgres?application_name=direct",
            pg.addr()
        );
        for (period, len) in runs {
            let before = proxy_logins(&pg);
            let (pids, lat) = paced(&url, period, len).await;
            let logins = proxy_logins(&pg) - before;
            let share = same_backend_share(&pids);
            let (_, direct_lat) = paced(&direct, period, len.min(Duration::from_secs(3))).await;
            println!(
                "one transaction every {period:?} for {len:?}: {} transactions, {:.1}% on one backend, {logins} proxy logins; p50/p99 {:?}/{:?} (direct {:?}/{:?})",
                pids.len(),
                share * 100.0,
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                percentile(&direct_lat, 0.5),
                percentile(&direct_lat, 0.99),
            );
            assert!(share >= 0.99, "one backend for >= 99% of transactions: {pids:?}");
            assert!(
                logins <= 1,
                "at most one server login per run: {logins}; the proxy's logins:\n{}",
                login_lines(&pg)
            );
        }
        let closed_for_shrink = metric(
            &proxy,
            "pgsidecar_server_connections_closed_total",
            &[("reason", "shrink")],
        );
        assert_eq!(closed_for_shrink, 0.0, "nothing closed for shrink under a steady light load");
    })
    .await;
}

/// `pgbench -S -R 20 -c 2`: two clients at 20 transactions a second in all cause at
/// most 3 server logins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_pgbench_makes_few_server_connections() {
    let _serial = serial().await;
    let len = length(10, 30);
    within(len + Duration::from_secs(40), "paced pgbench", async {
        let pg = logging_cluster();
        let proxy = start_proxy(&pg, |c| c.pool.size = 8).await;
        let pgbench = pg.tool_path("pgbench");
        let port = pg.port().to_string();
        let init = Command::new(&pgbench)
            .args([
                "-i",
                "-s",
                "1",
                "-q",
                "-h",
                pg.host(),
                "-p",
                &port,
                "-U",
                SUPERUSER,
                "postgres",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("pgbench -i runs");
        assert!(
            init.status.success(),
            "pgbench -i: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let before = proxy_logins(&pg);
        let (host, pport) = (proxy.addr.ip().to_string(), proxy.addr.port().to_string());
        let secs = len.as_secs().to_string();
        let args: Vec<String> = [
            "-n", "-S", "-R", "20", "-c", "2", "-T", &secs, "-h", &host, "-p", &pport, "-U",
            SUPERUSER, "postgres",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(pgbench)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .expect("pgbench runs")
        })
        .await
        .expect("pgbench task");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "pgbench: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let logins = proxy_logins(&pg) - before;
        let processed = stdout
            .lines()
            .find(|l| l.contains("number of transactions actually processed"))
            .unwrap_or("?");
        println!(
            "pgbench -S -R 20 -c 2 -T {secs}: {processed}; {logins} server logins by the proxy"
        );
        assert!(logins <= 3, "server logins: {logins}");
    })
    .await;
}

/// Pool size 5, 10 clients of `select pg_sleep(0.2)`: with stock settings (congestion
/// control on) and PostgreSQL far from full, the pool keeps all 5 connections, so the
/// clients get the physical 25 transactions a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_saturated_proxy_keeps_its_whole_pool() {
    let _serial = serial().await;
    let len = length(8, 20);
    within(len + Duration::from_secs(40), "saturation", async {
        let pg = PgCluster::start();
        let proxy = start_proxy(&pg, |c| c.pool.size = 5).await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        simple_one(&connect(&url).await, "select 1").await;
        let pool = pool_of(&proxy, SUPERUSER);
        let load = Load::start(url, 10, "select pg_sleep(0.2)");
        let started = Instant::now();
        let mut lowest_ceiling = usize::MAX;
        let mut lowest_open_late = usize::MAX;
        while started.elapsed() < len {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let s = pool.snapshot();
            lowest_ceiling = lowest_ceiling.min(s.ceiling);
            if started.elapsed() > Duration::from_secs(2) {
                lowest_open_late = lowest_open_late.min(s.open);
            }
        }
        let (ok, failures) = load.stop().await;
        let tps = ok as f64 / started.elapsed().as_secs_f64();
        let congestion = metric(
            &proxy,
            "pgsidecar_server_connections_closed_total",
            &[("reason", "congestion")],
        );
        println!(
            "pool 5, 10 clients of pg_sleep(0.2) for {len:?}: {tps:.1} tps ({:.3} of the physical 25); lowest ceiling {lowest_ceiling}, fewest open after warm-up {lowest_open_late}, {congestion} congestion closes",
            tps / 25.0
        );
        assert!(failures.is_empty(), "no client errors: {:?}", &failures[..failures.len().min(3)]);
        assert_eq!(lowest_ceiling, 5, "the ceiling never drops without a signal from PostgreSQL");
        assert_eq!(lowest_open_late, 5, "all 5 connections stay open");
        assert_eq!(congestion, 0.0);
        assert!(tps >= 0.9 * 25.0, "about the physical 25 tps: {tps:.1}");
    })
    .await;
}

/// Session mode, pool 5: 10 clients connect at once and each holds its session for
/// 1 s. All are served, in two waves: the last starts about 1 s in, when the first
/// wave's servers come free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_waiters_get_a_server_as_soon_as_one_is_free() {
    let _serial = serial().await;
    bounded(async {
        let pg = PgCluster::start();
        let proxy = start_proxy(&pg, |c| {
            c.pool.size = 5;
            c.pool_mode = PoolMode::Session;
        })
        .await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        // Warm: the pool knows the server's parameters.
        drop(connect(&url).await);
        let t0 = Instant::now();
        let results = futures_util::future::join_all((0..10).map(|_| {
            let url = url.clone();
            async move {
                let c = try_connect(&url, Duration::from_secs(20))
                    .await
                    .map_err(|e| e.to_string())?;
                let began = Instant::now();
                c.simple_query("select pg_sleep(1)")
                    .await
                    .map_err(|e| format!("{e}: {}", message_of(&e)))?;
                let start = began.duration_since(t0)
                    + began.elapsed().saturating_sub(Duration::from_secs(1));
                drop(c);
                Ok::<_, String>(start)
            }
        }))
        .await;
        let errors: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(errors.is_empty(), "all served: {errors:?}");
        let mut starts: Vec<Duration> = results.into_iter().filter_map(Result::ok).collect();
        starts.sort();
        let last = *starts.last().expect("ten sessions");
        println!("session mode, pool 5, 10 sessions of 1 s: starts {starts:?}");
        assert!(
            last <= Duration::from_millis(2200),
            "the last session started after {last:?}"
        );
    })
    .await;
}

/// What a fleet run gave.
struct Fleet {
    failures: Vec<Failure>,
    ok: u64,
    /// Mean established connections per proxy once converged (10 s after all started).
    shares: Vec<f64>,
    /// After all but the first went idle: when the first held its whole size.
    regained_in: Option<Duration>,
}

/// `n` proxies (size 10 each) share a PostgreSQL with 15 connection slots. The first
/// runs 12 clients alone for 2 s (so it holds its max), then the others start 8 clients
/// each; after `shared` the others stop and the first should get its size back. The
/// shares are averaged over everything after the first 10 s: the ceilings move by whole
/// connections about once a second, so a shorter window measures the oscillation
/// rather than the share.
async fn fleet(n: usize, shared: Duration) -> Fleet {
    let pg = PgCluster::start_with(ClusterOptions {
        max_connections: 15,
        extra_conf: vec!["superuser_reserved_connections = 0".into()],
        ..Default::default()
    });
    let mut proxies: Vec<Proxy> = Vec::new();
    for _ in 0..n {
        proxies.push(start_proxy(&pg, |c| c.pool.size = 10).await);
    }
    let mut firsts = Vec::new();
    for p in &proxies {
        let c = connect(&proxy_url(p, SUPERUSER, "postgres")).await;
        simple_one(&c, "select 1").await;
        firsts.push(c);
    }
    let pools: Vec<_> = proxies.iter().map(|p| pool_of(p, SUPERUSER)).collect();
    let established = |i: usize| {
        let s = pools[i].snapshot();
        s.open - s.connecting
    };
    let url = |i: usize| proxy_url(&proxies[i], SUPERUSER, "postgres");
    let first = Load::start(url(0), 12, "select pg_sleep(0.02)");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let others: Vec<Load> = (1..n)
        .map(|i| Load::start(url(i), 8, "select pg_sleep(0.02)"))
        .collect();
    let started = Instant::now();
    let mut sums = vec![0usize; n];
    let mut samples = 0;
    while started.elapsed() < shared {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let e: Vec<usize> = (0..n).map(established).collect();
        if std::env::var("POOL_TRACE").is_ok() {
            let c: Vec<_> = pools
                .iter()
                .map(|p| {
                    let s = p.snapshot();
                    (s.ceiling, s.open, s.waiting_in_queue, s.server_slots_used)
                })
                .collect();
            println!(
                "{:>6.2}s established {e:?} (ceiling, open, waiting, server used) {c:?}",
                started.elapsed().as_secs_f64()
            );
        }
        if started.elapsed() >= Duration::from_secs(10) {
            for (s, x) in sums.iter_mut().zip(&e) {
                *s += x;
            }
            samples += 1;
        }
    }
    let mut failures = Vec::new();
    let mut ok = 0;
    for l in others {
        let (k, f) = l.stop().await;
        ok += k;
        failures.extend(f);
    }
    let idle_since = Instant::now();
    let mut regained_in = None;
    while idle_since.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if std::env::var("POOL_TRACE").is_ok() {
            let c: Vec<_> = pools
                .iter()
                .map(|p| {
                    let s = p.snapshot();
                    (
                        s.ceiling,
                        s.open,
                        s.idle,
                        s.waiting_in_queue,
                        s.server_slots_used,
                    )
                })
                .collect();
            println!(
                "idle {:>6.2}s (ceiling, open, idle, waiting, server used) {c:?}",
                idle_since.elapsed().as_secs_f64()
            );
        }
        if established(0) >= 10 {
            regained_in = Some(idle_since.elapsed());
            break;
        }
    }
    let (k, f) = first.stop().await;
    ok += k;
    failures.extend(f);
    failures.sort_by_key(|f| f.at);
    Fleet {
        failures,
        ok,
        shares: sums
            .iter()
            .map(|s| *s as f64 / samples.max(1) as f64)
            .collect(),
        regained_in,
    }
}

fn check_fleet(n: usize, f: &Fleet) {
    let fair = 15.0 / n as f64;
    println!(
        "{n} proxies of size 10 on 15 slots: {} ok, {} client errors; mean established after convergence {:.2?} (fair {fair:.1}); the first regained its size {:?} after the others went idle",
        f.ok,
        f.failures.len(),
        f.shares,
        f.regained_in
    );
    assert!(
        f.failures.is_empty(),
        "no client errors: {:?}",
        &f.failures[..f.failures.len().min(5)]
    );
    for s in &f.shares {
        assert!(
            (s - fair).abs() <= 1.0,
            "each within one of a fair share ({fair:.1}): {:.2?}",
            f.shares
        );
    }
    let regained = f.regained_in.expect("the first proxy got its size back");
    assert!(
        regained <= Duration::from_secs(10),
        "regained its size after {regained:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_share_fairly_and_give_back_when_idle() {
    let _serial = serial().await;
    let shared = length(30, 40);
    within(shared + Duration::from_secs(50), "fleet of 3", async {
        let f = fleet(3, shared).await;
        check_fleet(3, &f);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_proxies_share_fairly_and_give_back_when_idle() {
    let _serial = serial().await;
    // Five shares of three swap a connection every few seconds: the mean of each needs a
    // longer window than three proxies' to be within one of fair on a loaded machine.
    let shared = length(45, 60);
    within(shared + Duration::from_secs(50), "fleet of 5", async {
        let f = fleet(5, shared).await;
        check_fleet(5, &f);
    })
    .await;
}

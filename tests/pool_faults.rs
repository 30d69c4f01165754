//! Managed pool under backend faults, against real PostgreSQL clusters (one throwaway
//! cluster per test): a backend killed under load (breaker, fail-fast, recovery without
//! client traffic, refill, no leaks), a hung backend (health-check and connect
//! timeouts), idle connections terminated behind the pool's back (transparent
//! replacement), and the breaker's `queue` mode riding out a short outage.
//!
//! Measured figures are printed (run with `--nocapture` to see them).

mod common;
mod pool_support;

use std::time::{Duration, Instant};

use pgsidecar::config::BreakerOnOpen;
use pgsidecar::pool::breaker::State;

use common::*;
use pool_support::*;

/// Postgres killed (`pg_ctl stop -m immediate`) under load: in-flight clients get an
/// error; the breaker opens within its threshold; while open a query fails in well under
/// 50 ms with 08006 saying since when and when the next attempt is; once Postgres is
/// back the pool recovers by itself within the backoff (no client traffic), refills to
/// min_size, and holds exactly as many connections as PostgreSQL sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_under_load_fails_fast_then_recovers_by_itself() {
    let _serial = serial().await;
    bounded(async {
        let pg = std::sync::Arc::new(PgCluster::start());
        let proxy = start_proxy(&pg, |c| {
            c.pool.size = 10;
            c.pool.min_size = 3;
            c.pool.query_wait_timeout = Duration::from_secs(2);
            c.upstream.connect_timeout = Duration::from_secs(1);
            c.breaker.failure_threshold = 3;
            c.breaker.backoff_base = Duration::from_millis(200);
            c.breaker.backoff_cap = Duration::from_secs(1);
        })
        .await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let probe_client = connect(&url).await;
        simple_one(&probe_client, "select 1").await;
        let pool = pool_of(&proxy, SUPERUSER);
        wait_until(Duration::from_secs(5), "warm-up to min_size", || {
            let pool = pool.clone();
            async move { pool.snapshot().idle >= 3 }
        })
        .await;

        let load = Load::start(url.clone(), 8, "select pg_sleep(0.01)");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ok_before = load.ok.load(std::sync::atomic::Ordering::Relaxed);
        assert!(ok_before > 20, "load runs before the kill ({ok_before} ok)");

        let watcher = watch_for_open(pool.clone());
        let killed_at = Instant::now();
        let p = pg.clone();
        blocking(move || p.stop_immediate()).await;
        let open_at = within(Duration::from_secs(5), "breaker opens", watcher)
            .await
            .expect("watcher");
        let open_after = open_at.saturating_duration_since(killed_at);
        let failures_at_open = pool.snapshot().connect_failures;
        let (ok_total, failures) = load.stop().await;
        assert!(
            !failures.is_empty(),
            "in-flight clients must see an error when the backend dies"
        );
        assert!(
            failures
                .iter()
                .all(|f| ["08006", "57P01", "57P03", ""].contains(&f.code.as_str())),
            "clients see connection failures, nothing else: {:?}",
            &failures[..failures.len().min(5)]
        );
        // The breaker opens on consecutive connect failures; concurrent attempts that
        // were already under way may fail after it opened, but not many.
        assert!(
            failures_at_open <= 3 + 10,
            "opened within its threshold: {failures_at_open} connect failures"
        );

        // Fail fast while open: a client already logged in runs queries.
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let t = Instant::now();
            let e = probe_client
                .simple_query("select 1")
                .await
                .expect_err("must fail while the breaker is open");
            worst = worst.max(t.elapsed());
            assert_eq!(code_of(&e), "08006", "{e}");
            let m = message_of(&e);
            assert!(
                m.contains("is unreachable (failing for") && m.contains("next connection attempt in"),
                "{m}"
            );
        }
        assert!(worst < Duration::from_millis(50), "fail-fast took {worst:?}");
        // New logins are accepted (parameters are known) and fail fast the same way.
        let fresh = connect(&url).await;
        assert_eq!(
            code_of(&fresh.simple_query("select 1").await.expect_err("open")),
            "08006"
        );

        // No client traffic from here on: the probe is the HalfOpen trial.
        let restarting = Instant::now();
        let p = pg.clone();
        blocking(move || p.start_again()).await;
        let restart_took = restarting.elapsed();
        let up_at = Instant::now();
        wait_until(Duration::from_secs(5), "breaker closes by itself", || {
            let pool = pool.clone();
            async move { pool.breaker_view().state == State::Closed }
        })
        .await;
        let recovered_in = up_at.elapsed();
        // Backoff is capped at 1 s (+20% jitter); allow the probe and a tick on top.
        assert!(
            recovered_in < Duration::from_millis(2500),
            "recovered in {recovered_in:?}"
        );
        wait_until(Duration::from_secs(5), "refill to min_size", || {
            let pool = pool.clone();
            async move {
                let s = pool.snapshot();
                s.idle >= 3 && s.connecting == 0
            }
        })
        .await;
        assert_eq!(simple_one(&probe_client, "select 2").await, "2");

        // No leaks: the pool's count is exactly what PostgreSQL sees.
        drop(fresh);
        let pg2 = pg.clone();
        let pool2 = pool.clone();
        wait_until(Duration::from_secs(5), "pool open == pg_stat_activity", || {
            let (pg2, pool2) = (pg2.clone(), pool2.clone());
            async move {
                let s = pool2.snapshot();
                let n = pg_backends(&pg2).await;
                s.open as i64 == n && s.connecting == 0 && s.testing == 0
            }
        })
        .await;
        let last = (pool.snapshot().open, pg_backends(&pg).await);
        println!(
            "backend killed: {ok_before} ok before, {ok_total} ok total, {} client errors; breaker open {open_after:?} after the kill ({failures_at_open} connect failures); fail-fast worst {worst:?}; restart took {restart_took:?}, breaker closed {recovered_in:?} after it returned; pool {} == pg {}",
            failures.len(),
            last.0,
            last.1
        );
        assert!(metric(&proxy, "pgsidecar_breaker_transitions_total", &[("to", "open")]) >= 1.0);
        assert!(metric(&proxy, "pgsidecar_breaker_transitions_total", &[("to", "closed")]) >= 1.0);
    })
    .await;
}

/// Postgres frozen (SIGSTOP): idle health checks time out and open the breaker, each
/// client query ends with an error within a bounded time instead of hanging, and after
/// SIGCONT the pool recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_hung_times_out_then_recovers() {
    let _serial = serial().await;
    bounded(async {
        let pg = std::sync::Arc::new(PgCluster::start());
        let proxy = start_proxy(&pg, |c| {
            c.pool.size = 5;
            c.pool.min_size = 3;
            c.pool.query_wait_timeout = Duration::from_secs(1);
            c.upstream.connect_timeout = Duration::from_millis(500);
            c.health.check_timeout = Duration::from_millis(300);
            c.health.idle_check_interval = Duration::from_millis(200);
            // Check every connection before use: a hung server is found before the
            // client's query is sent to it.
            c.health.server_check_delay = Duration::ZERO;
            c.health.probe_timeout = Duration::from_millis(500);
            c.breaker.backoff_base = Duration::from_millis(200);
            c.breaker.backoff_cap = Duration::from_secs(1);
        })
        .await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let client = connect(&url).await;
        simple_one(&client, "select 1").await;
        let pool = pool_of(&proxy, SUPERUSER);
        wait_until(Duration::from_secs(5), "warm-up", || {
            let pool = pool.clone();
            async move { pool.snapshot().idle >= 3 }
        })
        .await;

        let watcher = watch_for_open(pool.clone());
        let p = pg.clone();
        blocking(move || p.sigstop()).await;
        let frozen_at = Instant::now();
        let mut worst = Duration::ZERO;
        let mut codes = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            let r = within(Duration::from_secs(5), "a query against a hung server", client.simple_query("select 1")).await;
            worst = worst.max(t.elapsed());
            let e = r.expect_err("a frozen server cannot answer");
            codes.push(code_of(&e).to_string());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(codes.iter().all(|c| c == "08006"), "{codes:?}");
        // Pre-use check (300 ms) plus a connect attempt (500 ms) at worst.
        assert!(worst < Duration::from_millis(1500), "slowest error took {worst:?}");
        wait_until(Duration::from_secs(5), "breaker opens", || {
            let pool = pool.clone();
            async move { pool.breaker_view().state == State::Open }
        })
        .await;
        let open_after = watcher
            .await
            .expect("watcher")
            .saturating_duration_since(frozen_at);
        let timed_out = metric(&proxy, "pgsidecar_server_connections_closed_total", &[("reason", "health_check_timeout")]);
        let failed_checks = metric(&proxy, "pgsidecar_health_checks_total", &[("result", "failed")]);
        assert!(timed_out >= 1.0, "health checks time out ({timed_out})");
        assert!(failed_checks >= 1.0);

        let p = pg.clone();
        blocking(move || p.sigcont()).await;
        let thawed = Instant::now();
        wait_until(Duration::from_secs(5), "recovery after SIGCONT", || {
            let pool = pool.clone();
            async move { pool.breaker_view().state == State::Closed }
        })
        .await;
        let recovered_in = thawed.elapsed();
        assert_eq!(simple_one(&client, "select 3").await, "3");
        println!(
            "backend hung: errors within {worst:?} each; breaker open {open_after:?} after SIGSTOP; {timed_out} checks timed out; recovered {recovered_in:?} after SIGCONT"
        );
    })
    .await;
}

/// Polls the breaker every 5 ms; resolves when it is first seen open.
fn watch_for_open(pool: std::sync::Arc<pgsidecar::pool::Pool>) -> tokio::task::JoinHandle<Instant> {
    tokio::spawn(async move {
        while pool.breaker_view().state != State::Open {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Instant::now()
    })
}

/// Every idle pooled connection killed with pg_terminate_backend while no client is
/// active: the next 100 transactions all succeed (the dead ones are found on checkout
/// before anything is sent and replaced), and the kills show in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_terminated_are_replaced_transparently() {
    let _serial = serial().await;
    bounded(async {
        let pg = PgCluster::start();
        let proxy = start_proxy(&pg, |c| {
            c.pool.size = 10;
            c.pool.min_size = 5;
            // Keep background checks out of the way: this exercises the checkout path.
            c.health.idle_check_interval = Duration::ZERO;
            c.health.probe_interval = Duration::ZERO;
        })
        .await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let clients = futures_util::future::join_all((0..4).map(|_| connect(&url))).await;
        simple_one(&clients[0], "select 1").await;
        let pool = pool_of(&proxy, SUPERUSER);
        // Settled: a login still in flight has no application_name in pg_stat_activity
        // yet, so the kill below would miss it.
        wait_until(Duration::from_secs(5), "warm-up to min_size", || {
            let pool = pool.clone();
            async move {
                let s = pool.snapshot();
                s.idle >= 5 && s.connecting == 0 && s.open == s.idle
            }
        })
        .await;
        let admin = connect(&pg.superuser_url()).await;
        let killed: i64 = admin
            .query_one(
                "select count(*) from (select pg_terminate_backend(pid, 5000) from pg_stat_activity where application_name = 'pgsidecar') k",
                &[],
            )
            .await
            .expect("terminate")
            .get(0);
        assert!(killed >= 5, "killed {killed}");
        assert_eq!(pg_backends(&pg).await, 0);
        // Connections known good in the last 100 ms are handed out without a peek.
        tokio::time::sleep(Duration::from_millis(150)).await;

        let mut ok = 0;
        for round in 0..25 {
            let rs = futures_util::future::join_all(clients.iter().map(|c| {
                c.simple_query("begin; select 1; commit")
            }))
            .await;
            for r in rs {
                match r {
                    Ok(_) => ok += 1,
                    Err(e) => panic!("transaction in round {round} failed: {e} {}", message_of(&e)),
                }
            }
        }
        assert_eq!(ok, 100);
        let broken = metric(&proxy, "pgsidecar_server_connections_closed_total", &[("reason", "broken")]);
        let peeks = metric(&proxy, "pgsidecar_health_checks_total", &[("kind", "peek"), ("result", "failed")]);
        assert!(broken >= killed as f64, "closed as broken: {broken} of {killed}");
        assert_eq!(broken, peeks);
        println!("idle kill: {killed} terminated, 100/100 transactions ok, {broken} found dead on checkout");
    })
    .await;
}

/// With `breaker.on_open: queue`, clients that arrive during a short outage wait
/// (up to query_wait_timeout) and succeed once Postgres is back, instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_mode_rides_out_a_short_outage() {
    let _serial = serial().await;
    bounded(async {
        let pg = std::sync::Arc::new(PgCluster::start());
        let proxy = start_proxy(&pg, |c| {
            c.pool.size = 5;
            c.pool.query_wait_timeout = Duration::from_secs(15);
            c.upstream.connect_timeout = Duration::from_secs(1);
            c.breaker.on_open = BreakerOnOpen::Queue;
            c.breaker.backoff_base = Duration::from_millis(200);
            c.breaker.backoff_cap = Duration::from_millis(500);
        })
        .await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let client = connect(&url).await;
        simple_one(&client, "select 1").await;
        let pool = pool_of(&proxy, SUPERUSER);

        let p = pg.clone();
        blocking(move || p.stop_fast()).await;
        // Make sure the breaker is open before the clients arrive.
        for _ in 0..3 {
            let _ = client.simple_query("select 1").await;
        }
        wait_until(Duration::from_secs(5), "breaker opens", || {
            let pool = pool.clone();
            async move { pool.breaker_view().state == State::Open }
        })
        .await;
        let waiting = futures_util::future::join_all((0..3).map(|i| {
            let url = url.clone();
            async move {
                let c = connect(&url).await;
                let t = Instant::now();
                let r = c.simple_query(&format!("select {i}")).await;
                (r.map(|_| ()), t.elapsed())
            }
        }));
        let restart = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let p = pg.clone();
            blocking(move || p.start_again()).await;
        };
        let (results, ()) = tokio::join!(waiting, restart);
        for (r, waited) in &results {
            assert!(r.is_ok(), "queued client failed after {waited:?}: {r:?}");
        }
        println!(
            "queue mode: 3 clients waited {:?} and succeeded",
            results.iter().map(|r| r.1).collect::<Vec<_>>()
        );
    })
    .await;
}

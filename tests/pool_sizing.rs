//! Elastic sizing and congestion control against real PostgreSQL clusters (one
//! throwaway cluster per test): 200 clients arriving at once grow the pool from min to
//! max without anyone hitting the wait timeout, then it shrinks back; three proxies
//! sharing a database whose max_connections is too small for all of them converge with
//! AIMD (clients stop seeing failures) and keep failing without it.
//!
//! Measured figures are printed (run with `--nocapture` to see them).

mod common;
mod pool_support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgsidecar::proxy::Proxy;

use common::*;
use pool_support::*;

/// 200 clients connect at once and each runs 10 short transactions through a pool of
/// min 2, max 10. Nobody may hit query_wait_timeout, the pool must never exceed max
/// (no connect herd), and after the load it must shrink back to min_size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crowd_of_200_grows_to_max_then_shrinks_to_min() {
    let _serial = serial().await;
    bounded(async {
        let pg = PgCluster::start();
        let proxy = start_proxy(&pg, |c| {
            c.pool.size = 10;
            c.pool.min_size = 2;
            c.pool.query_wait_timeout = Duration::from_secs(10);
            c.pool.shrink_delay = Duration::from_millis(500);
            c.pool.server_idle_timeout = Duration::from_secs(1);
        })
        .await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let first = connect(&url).await;
        simple_one(&first, "select 1").await;
        let pool = pool_of(&proxy, SUPERUSER);
        wait_until(Duration::from_secs(5), "warm-up to min_size", || {
            let pool = pool.clone();
            async move { pool.snapshot().open == 2 }
        })
        .await;
        let connects_before = pool.snapshot().connects;

        // Sample the pool every 5 ms: peak size and when it first reached max.
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let sampler = {
            let (stop, peak, pool) = (stop.clone(), peak.clone(), pool.clone());
            tokio::spawn(async move {
                let mut full_at = None;
                while !stop.load(Ordering::Relaxed) {
                    let open = pool.snapshot().open;
                    peak.fetch_max(open, Ordering::Relaxed);
                    if open >= 10 && full_at.is_none() {
                        full_at = Some(started.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                full_at
            })
        };
        let results = futures_util::future::join_all((0..200).map(|i| {
            let url = url.clone();
            async move {
                let c = try_connect(&url, Duration::from_secs(20))
                    .await
                    .map_err(|e| format!("client {i} connect: {e}"))?;
                for n in 0..10 {
                    c.simple_query("select pg_sleep(0.002)")
                        .await
                        .map_err(|e| format!("client {i} txn {n}: {e} {}", message_of(&e)))?;
                }
                Ok::<_, String>(())
            }
        }))
        .await;
        let load_time = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let full_at = sampler.await.expect("sampler");
        let errors: Vec<_> = results.into_iter().filter_map(Result::err).collect();
        assert!(errors.is_empty(), "{} failed, e.g. {:?}", errors.len(), errors.first());
        let peak = peak.load(Ordering::Relaxed);
        assert!(peak <= 10, "never above max: {peak}");
        let snap = pool.snapshot();
        assert_eq!(snap.wait_timeouts, 0);
        // No churn while growing: about max - min new connections.
        assert!(snap.connects - connects_before <= 12, "connects during the load: {}", snap.connects - connects_before);
        let full_at = full_at.expect("the pool reached max_size under the crowd");

        let quiet = Instant::now();
        wait_until(Duration::from_secs(10), "shrink back to min_size", || {
            let pool = pool.clone();
            async move {
                let s = pool.snapshot();
                s.open == 2 && s.target_size == 2
            }
        })
        .await;
        let shrunk_in = quiet.elapsed();
        assert_eq!(pg_backends(&pg).await, 2);
        println!(
            "crowd: 2000 transactions from 200 clients in {load_time:?}; pool full (10) after {full_at:?}; peak {peak}; shrank to 2 in {shrunk_in:?}"
        );
    })
    .await;
}

/// What a run of three proxies sharing one small database gave.
struct Shared {
    failures: Vec<Failure>,
    ok: u64,
    /// Mean established connections per proxy over the second half of the run.
    shares: Vec<f64>,
    /// Since B and C started: when A held at most 7 and B and C at least 3 each.
    settled_at: Option<Duration>,
    /// Connection attempts PostgreSQL refused, summed over the proxies.
    refused: u64,
}

/// Three proxies (pool size 10 each) of one PostgreSQL with max_connections 15. Proxy
/// A runs 12 clients alone for 2 s (so it grows to its max), then B and C start with 8
/// clients each; all run until `run` has passed since B and C started.
async fn three_proxies(aimd: bool, run: Duration) -> Shared {
    let pg = PgCluster::start_with(ClusterOptions {
        max_connections: 15,
        extra_conf: vec!["superuser_reserved_connections = 0".into()],
        ..Default::default()
    });
    let mut proxies: Vec<Proxy> = Vec::new();
    for _ in 0..3 {
        proxies.push(
            start_proxy(&pg, |c| {
                c.pool.size = 10;
                c.pool.aimd = aimd;
                c.pool.query_wait_timeout = Duration::from_secs(10);
            })
            .await,
        );
    }
    // Each proxy learns the server's parameters with one connection first.
    let mut firsts = Vec::new();
    for p in &proxies {
        let c = connect(&proxy_url(p, SUPERUSER, "postgres")).await;
        simple_one(&c, "select 1").await;
        firsts.push(c);
    }
    let url = |i: usize| proxy_url(&proxies[i], SUPERUSER, "postgres");
    let pools: Vec<_> = proxies.iter().map(|p| pool_of(p, SUPERUSER)).collect();
    let established = |i: usize| {
        let s = pools[i].snapshot();
        s.open - s.connecting
    };
    let mut loads = vec![Load::start(url(0), 12, "select pg_sleep(0.02)")];
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a_alone = established(0);
    assert!(
        a_alone >= 8,
        "A grows to about its max while alone: {a_alone}"
    );
    loads.push(Load::start(url(1), 8, "select pg_sleep(0.02)"));
    loads.push(Load::start(url(2), 8, "select pg_sleep(0.02)"));
    let mut sums = [0usize; 3];
    let mut samples = 0;
    let mut settled_at = None;
    let started = Instant::now();
    while started.elapsed() < run {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let e = [established(0), established(1), established(2)];
        if std::env::var("POOL_TRACE").is_ok() {
            let c: Vec<_> = pools
                .iter()
                .map(|p| {
                    let s = p.snapshot();
                    (
                        s.ceiling,
                        s.open,
                        s.connecting,
                        s.testing,
                        s.waiting_in_queue,
                        s.connect_failures,
                    )
                })
                .collect();
            println!(
                "{:>6.2}s established {e:?} (ceiling, open, connecting, testing, waiting, refused) {c:?}",
                started.elapsed().as_secs_f64()
            );
        }
        if settled_at.is_none() && e[0] <= 7 && e[1] >= 3 && e[2] >= 3 {
            settled_at = Some(started.elapsed());
        }
        if started.elapsed() > run / 2 {
            for i in 0..3 {
                sums[i] += e[i];
            }
            samples += 1;
        }
    }
    let mut failures = Vec::new();
    let mut ok = 0;
    for l in loads {
        let (n, f) = l.stop().await;
        ok += n;
        failures.extend(f);
    }
    failures.sort_by_key(|f| f.at);
    Shared {
        failures,
        ok,
        shares: sums
            .iter()
            .map(|s| *s as f64 / samples.max(1) as f64)
            .collect(),
        settled_at,
        refused: pools.iter().map(|p| p.snapshot().connect_failures).sum(),
    }
}

/// Three proxies (pool max 10 each) share a PostgreSQL with max_connections 15, one of
/// them holding its max before the others arrive. With AIMD the first gives up its
/// excess, the others get a share, and clients see no failures (refused connects are
/// absorbed as waits); without it, refusals reach clients for as long as the load lasts
/// and the first proxy keeps its 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_converge_with_aimd_and_keep_failing_without() {
    let _serial = serial().await;
    bounded(async {
        let run = Duration::from_secs(20);
        let on = three_proxies(true, run).await;
        let off = three_proxies(false, run).await;
        let late = |f: &[Failure]| f.iter().filter(|f| f.at > run / 2).count();
        println!(
            "AIMD on: {} ok, {} client failures ({} in the second half), {} refused connects absorbed; settled (A <= 7, B and C >= 3) after {:?}; mean established per proxy {:.1?}",
            on.ok,
            on.failures.len(),
            late(&on.failures),
            on.refused,
            on.settled_at,
            on.shares
        );
        println!(
            "AIMD off: {} ok, {} client failures ({} in the second half), {} refused connects; settled after {:?}; mean established per proxy {:.1?}; e.g. {:?}",
            off.ok,
            off.failures.len(),
            late(&off.failures),
            off.refused,
            off.settled_at,
            off.shares,
            off.failures.first()
        );
        assert_eq!(
            late(&on.failures),
            0,
            "with AIMD clients stop seeing failures: {:?}",
            &on.failures[..on.failures.len().min(5)]
        );
        let settled = on.settled_at.expect("with AIMD the proxies converge to shares");
        assert!(settled < Duration::from_secs(15), "converged after {settled:?}");
        for s in &on.shares[1..] {
            assert!(*s >= 2.5, "B and C get a share: {:?}", on.shares);
        }
        assert!(
            late(&off.failures) > 10 && off.failures.len() > 10 * on.failures.len().max(1),
            "without AIMD refusals keep reaching clients ({} vs {})",
            off.failures.len(),
            on.failures.len()
        );
        assert!(off.failures.iter().any(|f| f.code == "53300"));
    })
    .await;
}

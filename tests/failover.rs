//! Failover with real clusters: a primary and a streaming standby (`pg_basebackup -R`),
//! the proxy given both hosts (`upstream.host: "primary,standby"`, stock
//! `target_session_attrs: read-write`), a write load running through it.
//!
//! - kill the primary (`pg_ctl stop -m immediate`) and promote the standby: writes
//!   succeed again within seconds of the promotion; only transactions in flight at the
//!   kill see an error; no write ever reaches a host in recovery;
//! - the old primary rejoins as a standby of the new one: the proxy stays with the new
//!   primary, no write is refused with 25006;
//! - a read-only pool (`target_session_attrs: standby`) spreads its connections over
//!   two standbys.
//!
//! `PGSIDECAR_FAILOVER_RUNS=5` repeats the kill-and-promote run and prints each.

mod common;
mod pool_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgsidecar::server::hosts::TargetSessionAttrs;

use common::*;
use pool_support::*;

/// A write load: `clients` clients inserting one row per transaction, each recording
/// successes (with the server port that took the write) and failures (with the time).
struct Writers {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    /// (when, SQLSTATE) of each failure.
    failures: Arc<Mutex<Vec<(Instant, String)>>>,
    /// When each write that succeeded finished, and on which port.
    oks: Arc<Mutex<Vec<(Instant, u16)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(url: String, clients: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let oks = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failures, oks, url) = (
                    stop.clone(),
                    ok.clone(),
                    failures.clone(),
                    oks.clone(),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let mut client = None;
                    while !stop.load(Ordering::Relaxed) {
                        let c = match client.take() {
                            Some(c) => c,
                            None => match try_connect(&url, Duration::from_secs(30)).await {
                                Ok(c) => c,
                                Err(e) => {
                                    let code = e.code().map(|c| c.code().to_string());
                                    failures
                                        .lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .push((Instant::now(), code.unwrap_or("connect".into())));
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    continue;
                                }
                            },
                        };
                        let r = c
                            .query_one(
                                "insert into writes (v) values (1) returning inet_server_port()",
                                &[],
                            )
                            .await;
                        match r {
                            Ok(row) => {
                                let port: i32 = row.get(0);
                                ok.fetch_add(1, Ordering::Relaxed);
                                oks.lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push((Instant::now(), port as u16));
                                client = Some(c);
                            }
                            Err(e) => {
                                failures
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push((Instant::now(), code_of(&e).to_string()));
                                // After a FATAL the proxy closes the connection, but
                                // is_closed() can lag behind: reusing the client then
                                // counted the same failure twice (once without a code).
                                let fatal =
                                    e.as_db_error().is_some_and(|d| d.severity() == "FATAL");
                                if !fatal && !c.is_closed() {
                                    client = Some(c);
                                }
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Writers {
            stop,
            ok,
            failures,
            oks,
            tasks,
        }
    }

    async fn stop(self) -> (Vec<(Instant, String)>, Vec<(Instant, u16)>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = within(Duration::from_secs(40), "writer to stop", t).await;
        }
        let f = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let o = self.oks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (f, o)
    }
}

fn primary_with_table() -> PgCluster {
    let pg = PgCluster::start();
    pg.exec("create table writes (id bigserial primary key, v int)");
    pg
}

fn two_hosts(a: &PgCluster, b: &PgCluster) -> String {
    format!("127.0.0.1:{},127.0.0.1:{}", a.port(), b.port())
}

/// What one kill-and-promote run gave.
struct Failover {
    /// From the promotion to the first write that succeeded after it.
    recovered_after_promotion: Duration,
    failures: Vec<String>,
    ok: u64,
    clients: usize,
}

async fn kill_and_promote() -> Failover {
    let primary = primary_with_table();
    let standby = PgCluster::standby_of(&primary);
    let proxy = start_proxy(&primary, |c| {
        c.upstream.host = two_hosts(&primary, &standby);
        c.pool.size = 8;
    })
    .await;
    let url = proxy_url(&proxy, SUPERUSER, "postgres");
    let clients = 4;
    let w = Writers::start(url, clients);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    let p = Arc::new(primary);
    let killer = p.clone();
    blocking(move || killer.stop_immediate()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = Arc::new(standby);
    let promoter = s.clone();
    blocking(move || promoter.promote()).await;
    let promoted_at = Instant::now();
    let standby_port = s.port();
    wait_until(
        Duration::from_secs(20),
        "a write on the promoted standby",
        || {
            let oks = w.oks.clone();
            async move {
                oks.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .any(|(t, port)| *t > promoted_at && *port == standby_port)
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ok = w.ok.load(Ordering::Relaxed);
    let (failures, oks) = w.stop().await;
    let first = oks
        .iter()
        .filter(|(t, port)| *t > promoted_at && *port == standby_port)
        .map(|(t, _)| *t)
        .min()
        .unwrap_or(promoted_at);
    // Every failure must be one in flight at the kill: it happened before the new
    // primary was up, and there is at most one per client.
    let late: Vec<_> = failures
        .iter()
        .filter(|(t, _)| *t < killed_at || *t > first)
        .collect();
    assert!(
        late.is_empty(),
        "failures outside the failover window: {late:?}"
    );
    // No write was ever taken by a host in recovery: every write before the promotion
    // went to the old primary.
    assert!(oks
        .iter()
        .all(|(t, port)| *t > promoted_at || *port == p.port()));
    drop(proxy);
    Failover {
        recovered_after_promotion: first.duration_since(promoted_at),
        failures: failures.into_iter().map(|(_, c)| c).collect(),
        ok,
        clients,
    }
}

/// Kill the primary, promote the standby: writes resume on the new primary within 5 s
/// of the promotion with stock settings, and only transactions in flight at the kill
/// failed (at most one per client; the others waited and landed on the new primary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_primary_promote_the_standby_and_writes_resume() {
    let _serial = serial().await;
    let runs: usize = std::env::var("PGSIDECAR_FAILOVER_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    within(Duration::from_secs(60 * runs as u64), "failover runs", async {
        for run in 1..=runs {
            let f = kill_and_promote().await;
            println!(
                "run {run}: writes resumed {:?} after the promotion; {} writes ok; {} failed ({:?}) of {} clients",
                f.recovered_after_promotion,
                f.ok,
                f.failures.len(),
                f.failures,
                f.clients
            );
            assert!(
                f.recovered_after_promotion < Duration::from_secs(5),
                "writes resumed after {:?}",
                f.recovered_after_promotion
            );
            assert!(
                f.failures.len() <= f.clients,
                "only transactions in flight at the kill fail: {:?}",
                f.failures
            );
            assert!(
                !f.failures.iter().any(|c| c == "25006"),
                "no write reached a standby: {:?}",
                f.failures
            );
        }
    })
    .await;
}

/// After a failover the old primary comes back as a standby of the new one: the proxy
/// stays with the new primary, and no write is refused as read-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_primary_rejoining_as_a_standby_takes_no_writes() {
    let _serial = serial().await;
    within(Duration::from_secs(90), "demote and swap", async {
        let a = Arc::new(primary_with_table());
        let b = Arc::new(PgCluster::standby_of(&a));
        let proxy = start_proxy(&a, |c| {
            c.upstream.host = two_hosts(&a, &b);
            c.pool.size = 4;
        })
        .await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let w = Writers::start(url, 3);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (a2, b2) = (a.clone(), b.clone());
        blocking(move || {
            a2.stop_fast();
            b2.promote();
        })
        .await;
        let (a3, b3) = (a.clone(), b.clone());
        blocking(move || a3.rejoin_as_standby_of(&b3)).await;
        let settled = Instant::now();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (failures, oks) = w.stop().await;
        let after: Vec<_> = failures.iter().filter(|(t, _)| *t > settled).collect();
        let on_new = oks.iter().filter(|(t, p)| *t > settled && *p == b.port()).count();
        let on_old = oks.iter().filter(|(t, p)| *t > settled && *p == a.port()).count();
        println!(
            "after the old primary rejoined as a standby: {on_new} writes on the new primary, {on_old} on the old, failures after the switch {after:?}; during it {:?}",
            failures.iter().map(|(_, c)| c).collect::<Vec<_>>()
        );
        assert!(after.is_empty(), "no failure after the switch settled: {after:?}");
        assert!(!failures.iter().any(|(_, c)| c == "25006"), "no write refused as read-only");
        assert!(on_new > 0 && on_old == 0);
        let hosts = proxy.shared.registry.hosts();
        let views = hosts.views(tokio::time::Instant::now());
        println!("hosts: {views:?}");
        assert_eq!(hosts.current(), Some(1), "the new primary is the current host");
    })
    .await;
}

/// A standby pool over two standbys spreads its connections (and so `pgbench -S`-like
/// reads) evenly: within 10 % of even.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_pool_spreads_reads_over_two_standbys() {
    let _serial = serial().await;
    within(Duration::from_secs(90), "replica spread", async {
        let primary = primary_with_table();
        let s1 = PgCluster::standby_of(&primary);
        let s2 = PgCluster::standby_of(&primary);
        let proxy = start_proxy(&primary, |c| {
            c.upstream.host = two_hosts(&s1, &s2);
            c.upstream.target_session_attrs = TargetSessionAttrs::Standby;
            c.pool.size = 8;
        })
        .await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let counts = Arc::new(Mutex::new([0u64; 2]));
        let ports = [s1.port(), s2.port()];
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (url, counts, stop) = (url.clone(), counts.clone(), stop.clone());
                tokio::spawn(async move {
                    let c = connect(&url).await;
                    while !stop.load(Ordering::Relaxed) {
                        let row = c
                            .query_one("select inet_server_port(), pg_is_in_recovery()", &[])
                            .await
                            .expect("read on a standby");
                        let port: i32 = row.get(0);
                        let recovery: bool = row.get(1);
                        assert!(recovery, "reads go to standbys only");
                        let i = usize::from(port as u16 == ports[1]);
                        counts.lock().unwrap_or_else(|e| e.into_inner())[i] += 1;
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.expect("reader");
        }
        let c = *counts.lock().unwrap_or_else(|e| e.into_inner());
        let total = (c[0] + c[1]) as f64;
        let share = c[0] as f64 / total;
        println!(
            "reads over two standbys: {c:?} ({:.1}% on the first)",
            share * 100.0
        );
        assert!((share - 0.5).abs() <= 0.05, "within 10% of even: {c:?}");
        assert_eq!(pg_backends(&primary).await, 0, "nothing on the primary");
    })
    .await;
}

/// Black hole: the primary's postmaster and backends are frozen (SIGSTOP; the kernel
/// still acknowledges TCP, so only the proxy's own checks can tell), and the standby is
/// promoted. With stock settings the frozen host is declared dead within
/// `probe_interval + probe_timeout` (15 s): transactions waiting on it get an error, and
/// new ones go to the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_declared_dead_and_writes_move_on() {
    let _serial = serial().await;
    within(Duration::from_secs(90), "black hole", async {
        let primary = primary_with_table();
        let standby = PgCluster::standby_of(&primary);
        let proxy = start_proxy(&primary, |c| {
            c.upstream.host = two_hosts(&primary, &standby);
            c.pool.size = 4;
        })
        .await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let w = Writers::start(url, 3);
        tokio::time::sleep(Duration::from_secs(1)).await;
        primary.sigstop();
        let frozen_at = Instant::now();
        standby.promote();
        let standby_port = standby.port();
        wait_until(Duration::from_secs(30), "a write on the new primary", || {
            let oks = w.oks.clone();
            async move {
                oks.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .any(|(_, port)| *port == standby_port)
            }
        })
        .await;
        let moved_after = frozen_at.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (failures, oks) = w.stop().await;
        let last_failure = failures
            .iter()
            .map(|(t, _)| t.duration_since(frozen_at))
            .max();
        println!(
            "frozen primary: writes moved to the new primary after {moved_after:?}; {} failures, the last {last_failure:?} after the freeze ({:?}); {} writes ok",
            failures.len(),
            failures.iter().map(|(_, c)| c).collect::<Vec<_>>(),
            oks.len()
        );
        assert!(moved_after <= Duration::from_secs(17), "moved after {moved_after:?}");
        assert!(failures.len() <= 3, "only the transactions stuck on the frozen host: {failures:?}");
        primary.sigcont();
    })
    .await;
}

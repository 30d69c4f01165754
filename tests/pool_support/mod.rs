//! Helpers for the managed-pool fault and sizing tests (`pool_faults.rs`,
//! `pool_sizing.rs`): metric scraping, the pool behind a proxy, a load generator that
//! counts failures, and a lock that runs these timing-sensitive tests one at a time.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgsidecar::pool::{Pool, PoolKey};
use pgsidecar::proxy::Proxy;
use tokio::task::JoinHandle;

use crate::common::*;

// An async mutex: it is held across awaits, and works across the tests' runtimes.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held for a whole test: the fault tests measure latencies and convergence on a
/// 2-core machine, which a neighbour test starting clusters would skew.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

pub fn pool_of(proxy: &Proxy, user: &str) -> Arc<Pool> {
    proxy
        .shared
        .registry
        .find(&PoolKey {
            database: "postgres".into(),
            user: user.into(),
        })
        .expect("the pool exists once a client logged in")
}

/// Sum of the samples of metric `name` whose label set contains every `labels` pair.
pub fn metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    proxy.shared.registry.refresh_metrics();
    let text = proxy.shared.metrics.render();
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labelset, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue,
            },
        };
        if labels
            .iter()
            .all(|(k, v)| labelset.contains(&format!("{k}=\"{v}\"")))
        {
            sum += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// Server connections PostgreSQL has for the proxy's pools (application_name
/// `pgsidecar`), counted over a fresh superuser connection.
pub async fn pg_backends(pg: &PgCluster) -> i64 {
    let c = connect(&pg.superuser_url()).await;
    c.query_one(
        "select count(*) from pg_stat_activity where application_name = 'pgsidecar'",
        &[],
    )
    .await
    .expect("pg_stat_activity")
    .get(0)
}

/// Runs `blocking` (a PgCluster call: stop, start, signal) off the async workers.
pub async fn blocking<F: FnOnce() + Send + 'static>(f: F) {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking cluster call panicked");
}

/// A failure a load client saw: when (since the load began) and its SQLSTATE.
#[derive(Debug, Clone)]
pub struct Failure {
    pub at: Duration,
    pub code: String,
    pub message: String,
}

/// Clients running `sql` in a loop through a proxy until stopped; every error is
/// recorded, and a client whose connection broke reconnects.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failures: Arc<Mutex<Vec<Failure>>>,
    tasks: Vec<JoinHandle<()>>,
    pub started: Instant,
}

impl Load {
    pub fn start(url: String, clients: usize, sql: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failures, url) =
                    (stop.clone(), ok.clone(), failures.clone(), url.clone());
                tokio::spawn(async move {
                    let record = |code: String, message: String| {
                        failures
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Failure {
                                at: started.elapsed(),
                                code,
                                message,
                            });
                    };
                    let mut client = None;
                    while !stop.load(Ordering::Relaxed) {
                        let c = match client.take() {
                            Some(c) => c,
                            None => match try_connect(&url, Duration::from_secs(10)).await {
                                Ok(c) => c,
                                Err(e) => {
                                    let code = e.code().map(|c| c.code().to_string());
                                    record(code.unwrap_or_default(), e.to_string());
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    continue;
                                }
                            },
                        };
                        let r = tokio::time::timeout(Duration::from_secs(20), c.simple_query(sql));
                        match r.await {
                            Ok(Ok(_)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                client = Some(c);
                            }
                            Ok(Err(e)) => {
                                record(code_of(&e).to_string(), format!("{e}: {}", message_of(&e)));
                                if !c.is_closed() {
                                    client = Some(c);
                                }
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            Err(_) => record("hang".into(), "no answer within 20s".into()),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            tasks,
            started,
        }
    }

    pub fn failures(&self) -> Vec<Failure> {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub async fn stop(self) -> (u64, Vec<Failure>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = within(Duration::from_secs(30), "load client to stop", t).await;
        }
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

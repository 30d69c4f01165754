//! A reload reaches connections that are already open: per-connection limits are read
//! from the current settings at every check, not fixed when the connection was opened
//! (against a real PostgreSQL cluster).

mod common;
mod pool_support;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use pgsidecar::proxy::Proxy;
use pool_support::*;

/// `pool.server_lifetime` lowered by a reload closes a connection opened before it: the
/// next transaction runs on a new backend, and the close is counted as `lifetime`.
/// (`server_idle_timeout`, the health intervals and `query_wait_timeout` are read from
/// the settings at every use already.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_server_lifetime_to_open_connections() {
    let _serial = serial().await;
    bounded(async {
        let pg = PgCluster::start();
        let proxy = start_proxy(&pg, |c| c.pool.size = 4).await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let client = connect(&url).await;
        let first = simple_one(&client, "select pg_backend_pid()").await;
        assert_eq!(simple_one(&client, "select pg_backend_pid()").await, first);

        let mut cfg = (*proxy.shared.registry.config()).clone();
        cfg.pool.server_lifetime = Duration::from_secs(1);
        cfg.validate().expect("valid");
        let tls = pgsidecar::tls::prepare(&cfg).expect("tls");
        proxy
            .shared
            .registry
            .apply(Arc::new(cfg.clone()), tls.upstream);
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let second = simple_one(&client, "select pg_backend_pid()").await;
        assert_ne!(
            second, first,
            "the connection opened before the reload reached the new lifetime"
        );
        assert!(
            metric(
                &proxy,
                "pgsidecar_server_connections_closed_total",
                &[("reason", "lifetime")]
            ) >= 1.0
        );
    })
    .await;
}

/// Applies `change` to the running proxy's config, as a reload does.
fn reload(proxy: &Proxy, change: impl FnOnce(&mut pgsidecar::config::Config)) {
    let mut cfg = (*proxy.shared.registry.config()).clone();
    change(&mut cfg);
    cfg.validate().expect("valid");
    let tls = pgsidecar::tls::prepare(&cfg).expect("tls");
    proxy.shared.registry.apply(Arc::new(cfg), tls.upstream);
}

fn checks(proxy: &Proxy, kind: &str) -> f64 {
    metric(
        proxy,
        "pgsidecar_health_checks_total",
        &[("kind", kind), ("result", "ok")],
    )
}

/// `health.server_check_delay` and `health.idle_check_interval` changed by a reload
/// reach the connection that is already open: with the delay at 0 every reuse is
/// checked first, back at 30 s none is; a shorter idle-check interval checks the idle
/// connection in the background within the next second. The client keeps its backend
/// throughout (a passed check hands the same connection out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_the_health_intervals_to_open_connections() {
    let _serial = serial().await;
    bounded(async {
        let pg = PgCluster::start();
        let proxy = start_proxy(&pg, |c| c.pool.size = 2).await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let client = connect(&url).await;
        let pid = simple_one(&client, "select pg_backend_pid()").await;
        let run = |n: usize| {
            let client = &client;
            let pid = &pid;
            async move {
                for _ in 0..n {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    assert_eq!(&simple_one(client, "select pg_backend_pid()").await, pid);
                }
            }
        };
        run(5).await;
        assert_eq!(checks(&proxy, "reuse"), 0.0, "no pre-use check at 30 s");

        reload(&proxy, |c| c.health.server_check_delay = Duration::ZERO);
        run(5).await;
        let checked = checks(&proxy, "reuse");
        assert!(
            checked >= 5.0,
            "each of 5 reuses checked after the reload: {checked}"
        );

        reload(&proxy, |c| {
            c.health.server_check_delay = Duration::from_secs(30)
        });
        run(5).await;
        assert_eq!(
            checks(&proxy, "reuse"),
            checked,
            "no pre-use check at 30 s again"
        );

        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(
            checks(&proxy, "idle"),
            0.0,
            "no idle check at the 30 s interval"
        );
        reload(&proxy, |c| {
            c.health.idle_check_interval = Duration::from_millis(200)
        });
        wait_until(
            Duration::from_secs(5),
            "an idle check after the reload",
            || {
                let n = checks(&proxy, "idle");
                async move { n >= 1.0 }
            },
        )
        .await;
        assert_eq!(simple_one(&client, "select pg_backend_pid()").await, pid);
    })
    .await;
}

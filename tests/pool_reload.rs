//! A reload reaches connections that are already open: per-connection limits are read
//! from the current settings at every check, not fixed when the connection was opened
//! (against a real PostgreSQL cluster).

mod common;
mod pool_support;

use std::sync::Arc;
use std::time::Duration;

use common::*;
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

//! Core proxy: authentication against a real PostgreSQL (issue "Core proxy", bullet 6):
//! clients authenticating to the proxy (SCRAM-SHA-256, md5), database checks at login,
//! and the proxy authenticating upstream (SCRAM and md5 clusters).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgsidecar::config::{AuthMethod, DatabaseConfig, PoolMode, UserConfig};
use pgsidecar::proxy::Proxy;

use common::*;

const MODES: [PoolMode; 2] = [PoolMode::Session, PoolMode::Transaction];

/// The cluster's `app` role has password `app_pw`, stored as a SCRAM verifier.
fn scram_pg() -> Arc<PgCluster> {
    shared_cluster(ClusterAuth::Scram)
}

/// A user entry (built from YAML so optional fields keep their defaults).
fn user(name: &str, password: &str) -> UserConfig {
    serde_yaml::from_str(&format!("{{name: {name}, password: {password}}}")).expect("user")
}

fn database(name: &str) -> DatabaseConfig {
    serde_yaml::from_str(&format!("{{name: {name}}}")).expect("database")
}

async fn proxy_with_auth(pg: &PgCluster, method: AuthMethod, mode: PoolMode) -> Proxy {
    start_proxy(pg, |c| {
        c.pool_mode = mode;
        c.auth.method = method;
        c.users = vec![user(APP_USER, APP_PASSWORD)];
    })
    .await
}

/// Logs in and returns the error, which must come within 5 s.
async fn login_error(url: &str) -> TryConnectError {
    let t = Instant::now();
    let e = match try_connect(url, Duration::from_secs(5)).await {
        Ok(_) => panic!("login to {url} must fail"),
        Err(e) => e,
    };
    assert!(!e.is_timeout(), "{url}: login must fail, not hang");
    assert!(t.elapsed() < Duration::from_secs(5));
    e
}

fn sqlstate(e: &TryConnectError) -> &str {
    e.code().map(|c| c.code()).unwrap_or("")
}

fn db_message(e: &TryConnectError) -> String {
    match e {
        TryConnectError::Pg(e) => message_of(e),
        TryConnectError::Timeout => String::new(),
    }
}

/// Right password in, wrong password and unknown user out with the same 28P01 and the
/// same wording, for both client authentication methods.
async fn check_client_auth(method: AuthMethod) {
    let pg = scram_pg();
    for mode in MODES {
        let what = format!("{method:?}/{mode}");
        let proxy = proxy_with_auth(&pg, method, mode).await;
        let c = connect(&proxy_url_pw(&proxy, APP_USER, APP_PASSWORD, "postgres")).await;
        assert_eq!(
            simple_one(&c, "select current_user").await,
            APP_USER,
            "{what}"
        );

        let wrong = login_error(&proxy_url_pw(&proxy, APP_USER, "not_the_pw", "postgres")).await;
        assert_eq!(sqlstate(&wrong), "28P01", "{what}: {wrong}");
        assert_eq!(
            db_message(&wrong),
            format!("password authentication failed for user \"{APP_USER}\"")
        );
        let unknown = login_error(&proxy_url_pw(&proxy, "ghost", APP_PASSWORD, "postgres")).await;
        assert_eq!(sqlstate(&unknown), "28P01", "{what}: {unknown}");
        assert_eq!(
            db_message(&unknown),
            "password authentication failed for user \"ghost\"",
            "{what}: an unknown user must look like a wrong password"
        );
        // The connection that got in is unaffected.
        assert_eq!(simple_one(&c, "select 'still in'").await, "still in");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_scram_sha_256() {
    bounded(check_client_auth(AuthMethod::ScramSha256)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_md5() {
    bounded(check_client_auth(AuthMethod::Md5)).await
}

/// With `databases` configured, an unlisted database is refused by the proxy (3D000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_database_is_refused() {
    bounded(async {
        let pg = scram_pg();
        for mode in MODES {
            let proxy = start_proxy(&pg, |c| {
                c.pool_mode = mode;
                c.auth.method = AuthMethod::ScramSha256;
                c.users = vec![user(APP_USER, APP_PASSWORD)];
                c.databases = vec![database("postgres")];
            })
            .await;
            let e = login_error(&proxy_url_pw(&proxy, APP_USER, APP_PASSWORD, "nosuchdb")).await;
            assert_eq!(sqlstate(&e), "3D000", "{mode}: {e}");
            assert!(db_message(&e).contains("nosuchdb"), "{mode}: {e}");
            let c = connect(&proxy_url_pw(&proxy, APP_USER, APP_PASSWORD, "postgres")).await;
            assert_eq!(
                simple_one(&c, "select current_database()").await,
                "postgres"
            );
        }
    })
    .await
}

/// Without a `databases` list, a database missing upstream fails at login with the
/// server's own 3D000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_missing_upstream_fails_at_login() {
    bounded(async {
        let pg = scram_pg();
        for mode in MODES {
            let proxy = proxy_with_auth(&pg, AuthMethod::ScramSha256, mode).await;
            let e = login_error(&proxy_url_pw(
                &proxy,
                APP_USER,
                APP_PASSWORD,
                "missing_upstream",
            ))
            .await;
            assert_eq!(sqlstate(&e), "3D000", "{mode}: {e}");
            assert_eq!(
                db_message(&e),
                "database \"missing_upstream\" does not exist",
                "{mode}"
            );
            // The proxy is fine for databases that exist.
            let c = connect(&proxy_url_pw(&proxy, APP_USER, APP_PASSWORD, "postgres")).await;
            assert_eq!(simple_one(&c, "select 1").await, "1");
        }
    })
    .await
}

/// The proxy logs in upstream as `upstream.user` with `upstream.password` (clients use
/// trust here); a wrong upstream password reaches the client as the backend's 28P01,
/// said to be the proxy's own login.
async fn check_upstream_auth(pg: &PgCluster, what: &str) {
    for mode in MODES {
        for (password, ok) in [(APP_PASSWORD, true), ("wrong_upstream_pw", false)] {
            let proxy = start_proxy(pg, |c| {
                c.pool_mode = mode;
                c.auth.method = AuthMethod::Trust;
                c.upstream.user = Some(APP_USER.into());
                c.upstream.password = Some(password.into());
            })
            .await;
            let url = proxy_url(&proxy, "someone", "postgres");
            if ok {
                let c = connect(&url).await;
                assert_eq!(
                    simple_one(&c, "select current_user").await,
                    APP_USER,
                    "{what}/{mode}"
                );
            } else {
                let e = login_error(&url).await;
                assert_eq!(sqlstate(&e), "28P01", "{what}/{mode}: {e}");
                assert_eq!(
                    db_message(&e),
                    format!("pgsidecar: the proxy's own login to PostgreSQL as role \"{APP_USER}\" failed: password authentication failed for user \"{APP_USER}\""),
                    "{what}/{mode}: the backend's own message, said to be the proxy's login"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_auth_scram() {
    bounded(async { check_upstream_auth(&scram_pg(), "scram").await }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_auth_md5() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Md5);
        check_upstream_auth(&pg, "md5").await
    })
    .await
}

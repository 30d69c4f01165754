//! Self-test of the shared integration-test harness (tests/common).

mod common;

use std::time::Duration;

use common::{connect, process_alive, try_connect, ClusterAuth, ClusterOptions, PgCluster};

#[tokio::test]
async fn starts_and_accepts_connections() {
    let pg = PgCluster::start();
    assert_eq!(pg.host(), "127.0.0.1");
    assert!(pg.port() > 0);

    let client = connect(&pg.url("postgres", "postgres", "postgres")).await;
    let rows = client
        .simple_query("select 1")
        .await
        .expect("select 1 over tokio-postgres");
    let value = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("1"));

    // The unprivileged role exists and can log in.
    let app = connect(&pg.url("app", "app_pw", "postgres")).await;
    let row = app
        .query_one("select current_user::text", &[])
        .await
        .expect("current_user as app");
    assert_eq!(row.get::<_, String>(0), "app");

    assert_eq!(pg.psql("select current_setting('max_connections')"), "100");
    assert_eq!(pg.psql("select 1 + 1"), "2");
    assert!(pg.postmaster_pid() > 1);
    assert!(pg.log_contents().contains("database system is ready"));
}

#[tokio::test]
async fn options_are_applied() {
    let pg = PgCluster::start_with(ClusterOptions {
        max_connections: 17,
        extra_conf: vec!["work_mem = '7MB'".to_string()],
        ..Default::default()
    });
    assert_eq!(pg.psql("select current_setting('max_connections')"), "17");
    assert_eq!(pg.psql("select current_setting('work_mem')"), "7MB");
    assert_eq!(pg.psql("select current_setting('fsync')"), "off");
}

#[tokio::test]
async fn stop_immediate_and_start_again() {
    let pg = PgCluster::start();
    let port = pg.port();
    let old_pid = pg.postmaster_pid();

    let client = connect(&pg.url("postgres", "postgres", "postgres")).await;
    pg.stop_immediate();
    // The existing session is gone.
    assert!(client.simple_query("select 1").await.is_err());
    // And nobody listens any more.
    let err = try_connect(
        &pg.url("postgres", "postgres", "postgres"),
        Duration::from_secs(2),
    )
    .await
    .expect_err("connect must fail while the cluster is stopped");
    assert!(!err.is_timeout(), "expected connection refused, got {err}");

    pg.start_again();
    assert_eq!(pg.port(), port);
    assert_ne!(pg.postmaster_pid(), old_pid);
    let client = connect(&pg.url("postgres", "postgres", "postgres")).await;
    client
        .simple_query("select 1")
        .await
        .expect("after restart");

    // A clean (fast) shutdown keeps committed data even with synchronous_commit=off.
    pg.exec("create table t (x int); insert into t values (42)");
    pg.stop_fast();
    pg.start_again();
    assert_eq!(pg.psql("select x from t"), "42");
}

/// With the default `synchronous_commit = off`, a crash (`stop_immediate`) may
/// lose the last few hundred ms of commits; tests that check durability across
/// a crash must turn it back on.
#[tokio::test]
async fn crash_keeps_commits_with_synchronous_commit_on() {
    let pg = PgCluster::start_with(ClusterOptions {
        extra_conf: vec!["synchronous_commit = on".to_string()],
        ..Default::default()
    });
    pg.exec("create table t (x int); insert into t values (42)");
    pg.stop_immediate();
    pg.start_again();
    assert_eq!(pg.psql("select x from t"), "42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_freezes_and_sigcont_recovers() {
    let pg = PgCluster::start();
    let url = pg.url("postgres", "postgres", "postgres");
    let existing = connect(&url).await;

    pg.sigstop();
    let err = try_connect(&url, Duration::from_secs(1))
        .await
        .expect_err("connect to a SIGSTOPped server must not succeed");
    assert!(err.is_timeout(), "expected a timeout, got {err}");
    // An existing session hangs too.
    let r = tokio::time::timeout(Duration::from_secs(1), existing.simple_query("select 1")).await;
    assert!(r.is_err(), "query on a frozen server should time out");

    pg.sigcont();
    let client = connect(&url).await;
    client
        .simple_query("select 1")
        .await
        .expect("query after SIGCONT");
    assert_eq!(pg.psql("select 1"), "1");
}

#[tokio::test]
async fn sigstopped_cluster_is_cleaned_up_on_drop() {
    let pg = PgCluster::start();
    let pid = pg.postmaster_pid();
    let dir = pg.base_dir().to_path_buf();
    pg.sigstop();
    drop(pg);
    assert!(!dir.exists(), "temp dir should be removed");
    assert!(!process_alive(pid), "postmaster {pid} should be gone");
}

#[tokio::test]
async fn scram_rejects_wrong_password_and_accepts_right_one() {
    let pg = PgCluster::start_with(ClusterOptions {
        auth: ClusterAuth::Scram,
        ..Default::default()
    });
    assert_eq!(
        pg.psql("select current_setting('password_encryption')"),
        "scram-sha-256"
    );

    let err = try_connect(&pg.url("app", "wrong", "postgres"), Duration::from_secs(10))
        .await
        .expect_err("wrong password must be rejected");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "unexpected error: {err}"
    );
    let err = try_connect(
        &pg.url("postgres", "nope", "postgres"),
        Duration::from_secs(10),
    )
    .await
    .expect_err("wrong superuser password must be rejected");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
    );

    let app = connect(&pg.url("app", "app_pw", "postgres")).await;
    app.simple_query("select 1").await.expect("app select 1");
    let su = connect(&pg.url("postgres", "postgres", "postgres")).await;
    su.simple_query("select 1")
        .await
        .expect("postgres select 1");
    assert!(pg
        .psql("select rolpassword from pg_authid where rolname = 'app'")
        .starts_with("SCRAM-SHA-256$"));
}

#[tokio::test]
async fn md5_cluster_stores_md5_passwords() {
    let pg = PgCluster::start_with(ClusterOptions {
        auth: ClusterAuth::Md5,
        ..Default::default()
    });
    assert!(pg
        .psql("select rolpassword from pg_authid where rolname = 'app'")
        .starts_with("md5"));
    let err = try_connect(&pg.url("app", "wrong", "postgres"), Duration::from_secs(10))
        .await
        .expect_err("wrong password must be rejected");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
    );
    let app = connect(&pg.url("app", "app_pw", "postgres")).await;
    app.simple_query("select 1").await.expect("app select 1");
}

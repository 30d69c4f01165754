//! Transaction mode and session state, against a real PostgreSQL: a client's advisory
//! locks, temp tables, SQL prepared statements, LISTEN, WITH HOLD cursors, session
//! characteristics and settings are its own (kept across its transactions, never seen
//! by another client), and are gone when it leaves, however it leaves.

mod common;

use std::time::{Duration, Instant};

use pgsidecar::config::{PoolMode, SessionStatePolicy};
use tokio_postgres::{AsyncMessage, Client};

use common::*;

const POOL: u32 = 2;

async fn proxy(size: u32, policy: SessionStatePolicy) -> pgsidecar::proxy::Proxy {
    let pg = shared_cluster(ClusterAuth::Trust);
    start_proxy(&pg, |c| {
        c.pool_mode = PoolMode::Transaction;
        c.pool.size = size;
        c.pool.min_size = 0;
        c.pool.query_wait_timeout = Duration::from_millis(1500);
        c.pool.session_state = policy;
    })
    .await
}

fn url(p: &pgsidecar::proxy::Proxy) -> String {
    proxy_url(p, SUPERUSER, "postgres")
}

async fn direct() -> Client {
    connect(&shared_cluster(ClusterAuth::Trust).superuser_url()).await
}

async fn advisory_held(admin: &Client, key: i64) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1::bigint::oid",
            &[&key],
        )
        .await
        .expect("pg_locks")
        .get(0)
}

async fn try_sql(c: &Client, sql: &str) -> Result<Vec<Option<String>>, String> {
    match c.simple_query(sql).await {
        Ok(msgs) => Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
                _ => None,
            })
            .collect()),
        Err(e) => Err(code_of(&e).to_string()),
    }
}

/// One kind of session state: how the owner makes it, what the owner sees of it, what
/// anyone else sees in its place.
struct Item {
    name: &'static str,
    create: &'static str,
    /// Run by the owner: answers `owner_sees`.
    probe: &'static str,
    owner_sees: Result<&'static str, &'static str>,
    /// Run by another client: answers `others_see` (Err: SQLSTATE).
    other_probe: &'static str,
    others_see: Result<&'static str, &'static str>,
    /// What `other_probe` answers once the owner left.
    gone: Result<&'static str, &'static str>,
}

const ITEMS: &[Item] = &[
    Item {
        name: "temp table",
        create: "CREATE TEMP TABLE pin_tt AS SELECT 42 AS v",
        probe: "SELECT v::text FROM pin_tt",
        owner_sees: Ok("42"),
        other_probe: "SELECT v::text FROM pin_tt",
        others_see: Err("42P01"),
        gone: Err("42P01"),
    },
    Item {
        name: "session advisory lock",
        create: "SELECT pg_advisory_lock(5151)",
        probe: "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND objid = 5151 AND pid = pg_backend_pid()",
        owner_sees: Ok("1"),
        // Another client neither gets it nor can release it.
        other_probe: "SELECT pg_try_advisory_lock(5151)::text || pg_advisory_unlock(5151)::text",
        others_see: Ok("falsefalse"),
        gone: Ok("truetrue"),
    },
    Item {
        name: "SQL PREPARE",
        create: "PREPARE pin_q AS SELECT 'mine'::text",
        probe: "EXECUTE pin_q",
        owner_sees: Ok("mine"),
        other_probe: "EXECUTE pin_q",
        others_see: Err("26000"),
        gone: Err("26000"),
    },
    Item {
        name: "LISTEN",
        create: "LISTEN pin_chan",
        probe: "SELECT string_agg(c, ',') FROM pg_listening_channels() c",
        owner_sees: Ok("pin_chan"),
        other_probe: "SELECT count(*)::text FROM pg_listening_channels()",
        others_see: Ok("0"),
        gone: Ok("0"),
    },
    Item {
        name: "WITH HOLD cursor",
        create: "DECLARE pin_c CURSOR WITH HOLD FOR SELECT g::text FROM generate_series(1, 1000) g",
        probe: "FETCH 1 FROM pin_c",
        owner_sees: Ok("*"),
        other_probe: "FETCH 1 FROM pin_c",
        others_see: Err("34000"),
        gone: Err("34000"),
    },
    Item {
        name: "session characteristics",
        create: "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        probe: "SHOW default_transaction_isolation",
        owner_sees: Ok("serializable"),
        other_probe: "SHOW default_transaction_isolation",
        others_see: Ok("read committed"),
        gone: Ok("read committed"),
    },
    Item {
        name: "setting",
        create: "SET work_mem = '7MB'",
        probe: "SHOW work_mem",
        owner_sees: Ok("7MB"),
        other_probe: "SHOW work_mem",
        others_see: Ok("4MB"),
        gone: Ok("4MB"),
    },
];

fn check(what: &str, got: Result<Vec<Option<String>>, String>, want: Result<&str, &str>) {
    match (got, want) {
        (Ok(rows), Ok("*")) => assert_eq!(rows.len(), 1, "{what}: {rows:?}"),
        (Ok(rows), Ok(v)) => assert_eq!(rows, vec![Some(v.to_string())], "{what}"),
        (Err(code), Err(c)) => assert_eq!(code, c, "{what}"),
        (got, want) => panic!("{what}: got {got:?}, wanted {want:?}"),
    }
}

/// Every kind of state, 30 interleaved checks each with a pool of 2: the owner keeps
/// its state across transactions; three other clients taking turns never see it; a
/// client after the owner left sees none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_session_state_stays_with_its_owner() {
    bounded(async {
        let p = proxy(POOL, SessionStatePolicy::Pin).await;
        let others = [
            connect(&url(&p)).await,
            connect(&url(&p)).await,
            connect(&url(&p)).await,
        ];
        for item in ITEMS {
            let owner = connect(&url(&p)).await;
            try_sql(&owner, item.create)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", item.name));
            for i in 0..30 {
                let what = format!("{} check {i}", item.name);
                check(
                    &format!("owner, {what}"),
                    try_sql(&owner, item.probe).await,
                    item.owner_sees,
                );
                let other = &others[i % others.len()];
                check(
                    &format!("other client, {what}"),
                    try_sql(other, item.other_probe).await,
                    item.others_see,
                );
            }
            drop(owner);
            // The owner's server is cleaned before it serves anyone again: every client
            // (and so every server of the pool) sees none of it.
            let after = connect(&url(&p)).await;
            for c in others.iter().chain([&after]) {
                check(
                    &format!("after the owner left, {}", item.name),
                    try_sql(c, item.other_probe).await,
                    item.gone,
                );
            }
        }
    })
    .await;
}

/// A NOTIFY from another client reaches the pinned listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_under_pin_gets_notifications() {
    bounded(async {
        let p = proxy(POOL, SessionStatePolicy::Pin).await;
        let (listener, mut messages) = connect_with_messages(&url(&p)).await;
        listener
            .batch_execute("LISTEN pin_news")
            .await
            .expect("listen");
        let other = connect(&url(&p)).await;
        for i in 0..5 {
            other
                .batch_execute(&format!("NOTIFY pin_news, 'n{i}'"))
                .await
                .expect("notify");
            // Notifications are read with the next message from the server.
            listener.batch_execute("SELECT 1").await.expect("poll");
            let got = within(Duration::from_secs(5), "notification", async {
                loop {
                    if let Some(AsyncMessage::Notification(n)) = messages.recv().await {
                        return n.payload().to_string();
                    }
                }
            })
            .await;
            assert_eq!(got, format!("n{i}"));
        }
    })
    .await;
}

/// A client killed while holding a session advisory lock, a temp table and a LISTEN
/// (its socket dropped without Terminate): within 1 s the lock is gone from pg_locks,
/// and the next client on that server sees none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_leaves_nothing_behind() {
    bounded(async {
        // One server: the next client is certainly on the killed client's server.
        let p = proxy(1, SessionStatePolicy::Pin).await;
        let admin = direct().await;
        let (victim, conn_task) = connect_abortable(&url(&p)).await;
        victim
            .batch_execute(
                "SELECT pg_advisory_lock(6161); CREATE TEMP TABLE pin_killed (a int); LISTEN pin_killed_chan",
            )
            .await
            .expect("take state");
        let pid = simple_one(&victim, "SELECT pg_backend_pid()").await;
        assert_eq!(advisory_held(&admin, 6161).await, 1);
        conn_task.abort();
        drop(victim);
        let t0 = Instant::now();
        wait_until(Duration::from_secs(1), "lock released after the client died", || async {
            advisory_held(&admin, 6161).await == 0
        })
        .await;
        let released_in = t0.elapsed();
        let next = connect(&url(&p)).await;
        assert_eq!(
            simple_one(&next, "SELECT pg_try_advisory_lock(6161)::text").await,
            "true"
        );
        check("temp table", try_sql(&next, "SELECT * FROM pin_killed").await, Err("42P01"));
        check(
            "listen",
            try_sql(&next, "SELECT count(*)::text FROM pg_listening_channels()").await,
            Ok("0"),
        );
        // Same server connection (cleaned, not closed): the pool stays warm.
        assert_eq!(simple_one(&next, "SELECT pg_backend_pid()").await, pid);
        eprintln!("lock released {released_in:?} after the client's socket closed");
    })
    .await;
}

/// Whether a second client gets the single server within the pool's wait timeout.
async fn server_free(p: &pgsidecar::proxy::Proxy) -> bool {
    let c = connect(&url(p)).await;
    c.simple_query("SELECT 1").await.is_ok()
}

/// Pins follow the server's truth: a failed try-lock pins nothing; schema-qualified and
/// extended-protocol lock calls pin; two locks need two unlocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_follow_what_the_server_holds() {
    bounded(async {
        let p = proxy(1, SessionStatePolicy::Pin).await;
        let admin = direct().await;
        admin
            .execute("SELECT pg_advisory_lock(7171)", &[])
            .await
            .expect("direct lock");
        let c = connect(&url(&p)).await;
        assert_eq!(
            simple_one(&c, "SELECT pg_try_advisory_lock(7171)::text").await,
            "false"
        );
        assert!(server_free(&p).await, "a failed try-lock must not pin");
        admin
            .execute("SELECT pg_advisory_unlock(7171)", &[])
            .await
            .expect("direct unlock");

        // Qualified, any case, simple protocol.
        c.batch_execute("SELECT PG_CATALOG.pg_advisory_lock(7272)")
            .await
            .expect("lock");
        assert!(
            !server_free(&p).await,
            "pg_catalog.pg_advisory_lock must pin"
        );
        c.batch_execute("SELECT pg_advisory_unlock(7272)")
            .await
            .expect("unlock");
        assert!(server_free(&p).await, "unlocked: unpinned");

        // Extended protocol, a parameter, the same prepared statement twice: stacked.
        let lock = c
            .prepare("SELECT pg_advisory_lock($1)")
            .await
            .expect("prepare");
        c.execute(&lock, &[&7373i64]).await.expect("lock 1");
        c.execute(&lock, &[&7373i64]).await.expect("lock 2");
        assert!(!server_free(&p).await, "extended-protocol lock must pin");
        let unlock = c
            .prepare("SELECT pg_advisory_unlock($1)")
            .await
            .expect("prepare");
        c.execute(&unlock, &[&7373i64]).await.expect("unlock 1");
        assert!(
            !server_free(&p).await,
            "one of two locks left: still pinned"
        );
        assert_eq!(advisory_held(&admin, 7373).await, 1);
        c.execute(&unlock, &[&7373i64]).await.expect("unlock 2");
        assert!(server_free(&p).await, "both unlocked: unpinned");
        assert_eq!(advisory_held(&admin, 7373).await, 0);

        // pg_advisory_unlock_all() and DISCARD ALL release everything at once.
        c.batch_execute("SELECT pg_advisory_lock(1), pg_advisory_lock(2); LISTEN x")
            .await
            .expect("state");
        assert!(!server_free(&p).await);
        c.batch_execute("SELECT pg_advisory_unlock_all()")
            .await
            .expect("unlock all");
        assert!(!server_free(&p).await, "LISTEN still held");
        c.batch_execute("DISCARD ALL").await.expect("discard");
        assert!(server_free(&p).await, "DISCARD ALL released everything");
    })
    .await;
}

/// `session_state: reject` refuses the statement with 0A000, says what to do, and the
/// session goes on; transaction-scoped forms pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_policy_refuses_session_state() {
    bounded(async {
        let p = proxy(POOL, SessionStatePolicy::Reject).await;
        let c = connect(&url(&p)).await;
        for sql in [
            "SELECT pg_advisory_lock(8181)",
            "CREATE TEMP TABLE pin_rej (a int)",
            "LISTEN pin_rej",
        ] {
            let e = c.simple_query(sql).await.expect_err(sql);
            assert_eq!(code_of(&e), "0A000", "{sql}");
            let db = e.as_db_error().expect("db error");
            assert!(db.message().contains("session_state"), "{}", db.message());
            assert!(db.hint().unwrap_or("").contains("pg_advisory_xact_lock"));
        }
        let e = c
            .query("SELECT pg_advisory_lock($1)", &[&8181i64])
            .await
            .expect_err("extended");
        assert_eq!(code_of(&e), "0A000");
        let admin = direct().await;
        assert_eq!(advisory_held(&admin, 8181).await, 0);
        c.batch_execute("BEGIN; SELECT pg_advisory_xact_lock(8181); COMMIT")
            .await
            .expect("xact lock passes");
        assert_eq!(simple_one(&c, "SELECT 1").await, "1");
    })
    .await;
}

fn metric(p: &pgsidecar::proxy::Proxy, series: &str) -> Option<f64> {
    p.shared
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// A pin shows in SHOW CLIENTS, in the pinned gauge, in pins_total by reason and, once
/// over, in the duration histogram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_are_visible() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let p = start_proxy(&pg, |c| {
            c.pool.size = POOL;
            let user = |name: &str, admin| pgsidecar::config::UserConfig {
                name: name.into(),
                password: None,
                server_user: None,
                server_password: None,
                pool_mode: None,
                admin,
            };
            c.users = vec![user(SUPERUSER, false), user("admin", true)];
        })
        .await;
        let console = connect(&proxy_url(&p, "admin", "pgsidecar")).await;
        let pinned_rows = || async {
            console
                .simple_query("SHOW CLIENTS")
                .await
                .expect("SHOW CLIENTS")
                .into_iter()
                .filter(|m| {
                    matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get("pinned") == Some("true"))
                })
                .count()
        };
        let c = connect(&url(&p)).await;
        let idle = connect(&url(&p)).await;
        simple_one(&idle, "SELECT 1").await;
        assert_eq!(pinned_rows().await, 0);
        c.batch_execute("SELECT pg_advisory_lock(9191)").await.expect("lock");
        assert_eq!(pinned_rows().await, 1);
        let pool = "pool=\"postgres/postgres\"";
        assert_eq!(metric(&p, &format!("pgsidecar_pinned_clients{{{pool}}}")), Some(1.0));
        assert_eq!(
            metric(&p, &format!("pgsidecar_pins_total{{{pool},reason=\"advisory_lock\"}}")),
            Some(1.0)
        );
        c.batch_execute("SELECT pg_advisory_unlock(9191)").await.expect("unlock");
        assert_eq!(pinned_rows().await, 0);
        assert_eq!(metric(&p, &format!("pgsidecar_pinned_clients{{{pool}}}")), Some(0.0));
        assert_eq!(
            metric(&p, &format!("pgsidecar_pinned_duration_seconds_count{{{pool}}}")),
            Some(1.0)
        );
    })
    .await;
}

/// SET SESSION AUTHORIZATION holds the server until the client leaves (the server
/// check cannot tell it from the login role); the next client is itself again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_authorization_stays_with_its_client() {
    bounded(async {
        let p = proxy(1, SessionStatePolicy::Pin).await;
        let c = connect(&url(&p)).await;
        c.batch_execute(&format!("SET SESSION AUTHORIZATION {APP_USER}"))
            .await
            .expect("set session authorization");
        assert!(!server_free(&p).await, "SET SESSION AUTHORIZATION must pin");
        assert_eq!(simple_one(&c, "SELECT session_user::text").await, APP_USER);
        drop(c);
        let next = connect(&url(&p)).await;
        wait_until(
            Duration::from_secs(5),
            "the server is free again",
            || async { next.simple_query("SELECT 1").await.is_ok() },
        )
        .await;
        assert_eq!(
            simple_one(&next, "SELECT session_user::text").await,
            SUPERUSER
        );
    })
    .await;
}

//! Transaction mode shares each server's prepared statements among clients by content.
//! A statement PostgreSQL prepared keeps the parameter types it inferred at Parse, so
//! once the type it names is gone (rolled back, dropped) and made again, reusing it
//! fails ("cache lookup failed for type", XX000) where PostgreSQL itself, given a fresh
//! Parse, succeeds. psycopg's suite does exactly this (`test_change_type*`).

mod common;

use std::time::Duration;

use common::raw::{self, tags, Msg, RawConn};
use common::*;
use pgsidecar::config::PoolMode;

/// Bind of `stmt` with one text parameter.
fn bind_one(stmt: &str, value: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.push(0); // unnamed portal
    b.extend_from_slice(stmt.as_bytes());
    b.push(0);
    b.extend_from_slice(&0i16.to_be_bytes()); // parameter formats: all text
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&(value.len() as i32).to_be_bytes());
    b.extend_from_slice(value.as_bytes());
    b.extend_from_slice(&0i16.to_be_bytes()); // result formats: all text
    raw::fe(b'B', &b)
}

async fn simple(c: &mut RawConn, sql: &str) {
    c.send(&raw::query_msg(sql)).await;
    let m = c.read_until_ready().await;
    assert!(
        !tags(&m).contains('E'),
        "{sql}: {:?}",
        m.iter().find_map(|m| m.field(b'M'))
    );
}

/// Parse `name` (types left to the server), Bind, Execute, Sync: the answers.
async fn prepare_and_run(c: &mut RawConn, name: &str) -> Vec<Msg> {
    let mut batch = raw::parse_msg(name, "SELECT $1::pgsc_mood[]");
    batch.extend(bind_one(name, "{happy}"));
    batch.extend(raw::execute_msg(""));
    batch.extend(raw::sync_msg());
    c.send(&batch).await;
    within(Duration::from_secs(10), name, c.read_until_ready()).await
}

fn outcome(m: &[Msg]) -> String {
    match m.iter().find(|m| m.tag == b'E') {
        Some(e) => format!("{:?}: {:?}", e.code(), e.field(b'M')),
        None => tags(m),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_never_outlives_the_type_it_names() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        // One server: every client's statements land on it.
        let proxy = start_proxy(&pg, |c| {
            c.pool_mode = PoolMode::Transaction;
            c.pool.size = 1;
        })
        .await;
        let mut c = RawConn::login(proxy.addr, SUPERUSER, "postgres").await;
        simple(&mut c, "DROP TYPE IF EXISTS pgsc_mood").await;

        // The type exists only in transactions that roll back (psycopg: test_change_type_execute).
        for round in 0..3 {
            simple(&mut c, "BEGIN").await;
            simple(&mut c, "CREATE TYPE pgsc_mood AS ENUM ('happy')").await;
            let m = prepare_and_run(&mut c, &format!("rb{round}")).await;
            assert_eq!(outcome(&m), "12DCZ", "round {round} after a rollback");
            simple(&mut c, "ROLLBACK").await;
        }

        // Dropped and created again, autocommit (psycopg: test_change_type).
        simple(&mut c, "CREATE TYPE pgsc_mood AS ENUM ('happy')").await;
        let m = prepare_and_run(&mut c, "d0").await;
        assert_eq!(outcome(&m), "12DCZ");
        simple(&mut c, "DROP TYPE pgsc_mood").await;
        simple(&mut c, "CREATE TYPE pgsc_mood AS ENUM ('happy')").await;
        let m = prepare_and_run(&mut c, "d1").await;
        assert_eq!(outcome(&m), "12DCZ", "after DROP TYPE and CREATE TYPE");

        // A statement of a committed transaction is still shared: another client's
        // Parse of the same text is answered without a new Parse on the server.
        let mut other = RawConn::login(proxy.addr, SUPERUSER, "postgres").await;
        let m = prepare_and_run(&mut other, "again").await;
        assert_eq!(outcome(&m), "12DCZ");
        let mut admin = RawConn::login(proxy.addr, SUPERUSER, "postgres").await;
        admin
            .send(&raw::query_msg(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%pgsc_mood%'",
            ))
            .await;
        let rows = admin.read_until_ready().await;
        let count = rows
            .iter()
            .find(|m| m.tag == b'D')
            .map(|m| m.body.clone())
            .expect("a row");
        // DataRow: 1 column, length, then the text; exactly one statement on the server.
        assert_eq!(
            &count[6..],
            b"1",
            "stale statements are closed, not left behind"
        );
        simple(&mut c, "DROP TYPE pgsc_mood").await;
    })
    .await
}

//! Tests of session-state detection (`sessionstate.rs`).

use super::*;

fn creates(sql: &str) -> Option<Reason> {
    scan(sql.as_bytes(), false).creates
}

#[test]
fn advisory_locks_any_spelling() {
    for sql in [
        "SELECT pg_advisory_lock(5151)",
        "select PG_ADVISORY_LOCK(1, 2)",
        "SELECT pg_catalog.pg_advisory_lock($1)",
        "SELECT pg_catalog . pg_try_advisory_lock_shared(1)",
        "SELECT \"pg_advisory_lock\"(1)",
        "SELECT 1; SELECT pg_try_advisory_lock(7) AS got",
        "WITH x AS (SELECT pg_advisory_lock_shared(1)) SELECT * FROM x",
    ] {
        assert_eq!(creates(sql), Some(Reason::AdvisoryLock), "{sql}");
    }
}

#[test]
fn not_fooled_by_literals_comments_or_xact_forms() {
    for sql in [
        "SELECT 'pg_advisory_lock(1)'",
        "SELECT $$ pg_advisory_lock(1) $$",
        "SELECT 1 -- pg_advisory_lock(1)",
        "SELECT /* CREATE TEMP TABLE x() */ 1",
        "SELECT pg_advisory_xact_lock(1)",
        "SELECT \"PG_ADVISORY_LOCK\"(1)",
        "SELECT temperature, payload, threshold FROM readings",
        "SET LOCAL default_transaction_isolation TO serializable",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SET search_path TO app",
        "DECLARE c CURSOR FOR SELECT 1",
        "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
        "PREPARE TRANSACTION 'gid'",
        "CREATE TEMP TABLE t (a int) ON COMMIT DROP",
        "SELECT set_config('x.y', '1', true)",
        // Reported settings follow the client through ParameterStatus.
        "SELECT set_config('application_name', $1, false)",
        "SELECT set_config('TimeZone', 'UTC', false)",
        "SELECT * FROM roles WHERE holder = 1",
    ] {
        assert_eq!(creates(sql), None, "{sql}");
    }
}

#[test]
fn every_kind_of_state() {
    let cases = [
        ("CREATE TEMP TABLE t (a int)", Reason::TempObject),
        ("create temporary view v as select 1", Reason::TempObject),
        (
            "CREATE GLOBAL TEMPORARY TABLE t (a int)",
            Reason::TempObject,
        ),
        (
            "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
            Reason::TempObject,
        ),
        ("CREATE TEMP SEQUENCE s", Reason::TempObject),
        ("CREATE TABLE pg_temp.t (a int)", Reason::TempObject),
        ("SELECT 1 AS a INTO TEMP t", Reason::TempObject),
        (
            "CREATE TEMP TABLE t ON COMMIT PRESERVE ROWS AS SELECT 1",
            Reason::TempObject,
        ),
        ("PREPARE q(int) AS SELECT $1", Reason::Prepare),
        ("LISTEN chan", Reason::Listen),
        (
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            Reason::HoldCursor,
        ),
        (
            "declare c no scroll cursor with hold for select 1",
            Reason::HoldCursor,
        ),
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            Reason::Characteristics,
        ),
        (
            "SET default_transaction_read_only = on",
            Reason::Characteristics,
        ),
        (
            "set session default_transaction_isolation to 'serializable'",
            Reason::Characteristics,
        ),
        ("SET ROLE app", Reason::Role),
        ("SET SESSION AUTHORIZATION bob", Reason::Authorization),
        ("LOAD 'auto_explain'", Reason::Load),
        (
            "SELECT set_config('search_path', 'x', false)",
            Reason::SetConfig,
        ),
        ("SELECT set_config('a', 'b', $1)", Reason::SetConfig),
        ("SELECT set_config($1, 'b', false)", Reason::SetConfig),
        (
            "SELECT set_config('default_transaction_isolation', 'serializable', false)",
            Reason::Characteristics,
        ),
    ];
    for (sql, r) in cases {
        assert_eq!(creates(sql), Some(r), "{sql}");
        assert!(r
            .label()
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_'));
    }
}

#[test]
fn releases_only_count_while_holding() {
    for sql in [
        "SELECT pg_advisory_unlock(5151)",
        "SELECT pg_catalog.pg_advisory_unlock_all()",
        "DEALLOCATE q",
        "UNLISTEN *",
        "CLOSE c",
        "DISCARD ALL",
        "DROP TABLE t",
        "RESET ROLE",
        "ROLLBACK",
        "unlisten chan",
    ] {
        let s = scan(sql.as_bytes(), true);
        assert!(s.releases, "{sql}");
        assert!(s.needs_check());
    }
    assert!(!scan(b"DROP TABLE t", false).needs_check());
    // The unlock functions carry 'advisory': seen even without a pin.
    assert!(scan(b"SELECT pg_advisory_unlock(1)", false).releases);
}

#[test]
fn prefilter_passes_typical_statements() {
    for sql in [
        &b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"[..],
        b"UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
        b"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);",
        b"BEGIN",
        b"COMMIT",
    ] {
        assert!(!prefilter(sql, false), "{}", String::from_utf8_lossy(sql));
    }
}

#[test]
fn unreadable_sql_is_left_to_the_server() {
    let s = scan(b"SELECT pg_advisory_lock(1) 'unterminated", false);
    assert!(s.needs_check());
    assert!(scan(b"\xff pg_advisory_lock(1)", false).creates.is_some());
}

/// The pre-filter decides which statements are looked at: it must find every needle a
/// plain word-by-word search finds, in any case, after any byte.
#[test]
fn prefilter_finds_what_a_plain_search_finds() {
    fn plain(sql: &[u8], needles: &[&[u8]]) -> bool {
        (0..sql.len()).any(|i| {
            (i == 0 || !sql[i - 1].is_ascii_alphanumeric())
                && needles.iter().any(|n| {
                    sql.len() - i >= n.len() && sql[i..i + n.len()].eq_ignore_ascii_case(n)
                })
        })
    }
    let words: Vec<&[u8]> = CREATORS.iter().chain(RELEASERS).copied().collect();
    let glue: [&[u8]; 8] = [b"", b" ", b"_", b"x", b"9", b".", b"\xc3\xa9", b"("];
    let mut n = 0;
    for w in &words {
        for cut in [w.len(), w.len() - 1, 3] {
            for (gi, g) in glue.iter().enumerate() {
                let mut up = w[..cut].to_vec();
                up[gi % cut] = up[gi % cut].to_ascii_uppercase();
                // Every offset in an eight-byte chunk, and across chunks.
                for pad in 0..10 {
                    let sql = [&b"SELECT -- "[..pad], *g, &up[..], b"(1)"].concat();
                    for holding in [false, true] {
                        let want = plain(&sql, CREATORS) || (holding && plain(&sql, RELEASERS));
                        assert_eq!(
                            prefilter(&sql, holding),
                            want,
                            "{:?}",
                            String::from_utf8_lossy(&sql)
                        );
                        n += 1;
                    }
                }
            }
        }
    }
    assert!(n > 1000);
}

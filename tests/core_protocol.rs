//! Core proxy: the wire protocol through the proxy, in both pool modes, against a real
//! PostgreSQL (issue "Core proxy", bullets 1 and 7).
//!
//! All tests share one trust cluster; each starts its own in-process proxy and uses
//! tables named after itself and the pool mode.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{pin_mut, SinkExt, StreamExt};
use pgsidecar::config::PoolMode;
use pgsidecar::proxy::Proxy;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, SimpleQueryMessage};

use common::raw::{self, tags, RawConn};
use common::*;

const MODES: [PoolMode; 2] = [PoolMode::Session, PoolMode::Transaction];

fn pg() -> Arc<PgCluster> {
    shared_cluster(ClusterAuth::Trust)
}

async fn proxy_for(pg: &PgCluster, mode: PoolMode, size: u32) -> Proxy {
    start_proxy(pg, |c| {
        c.pool_mode = mode;
        c.pool.size = size;
    })
    .await
}

async fn client_of(proxy: &Proxy) -> Client {
    connect(&proxy_url(proxy, SUPERUSER, "postgres")).await
}

/// A direct superuser connection to the cluster (not through the proxy).
async fn direct(pg: &PgCluster) -> Client {
    connect(&pg.superuser_url()).await
}

/// Rows and command completions of a simple query, as comparable strings.
fn summary(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(format!(
                "row:{}",
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL"))
                    .collect::<Vec<_>>()
                    .join(",")
            )),
            SimpleQueryMessage::CommandComplete(n) => Some(format!("done:{n}")),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_statement_simple_query() {
    bounded(async {
        let pg = pg();
        for mode in MODES {
            let proxy = proxy_for(&pg, mode, 2).await;
            let c = client_of(&proxy).await;
            let msgs = c
                .simple_query(
                    "select 1 as a; select 'two' as b, 2 as c; select g from generate_series(1,3) g",
                )
                .await
                .expect("multi-statement query");
            assert_eq!(
                summary(&msgs),
                [
                    "row:1", "done:1", "row:two,2", "done:1", "row:1", "row:2", "row:3", "done:3"
                ],
                "{mode}"
            );

            // An error in the middle stops the rest, and the connection carries on.
            let e = c
                .simple_query("select 1; select 1/0; select 3")
                .await
                .expect_err("division by zero");
            assert_eq!(code_of(&e), "22012", "{mode}: {e}");
            assert_eq!(simple_one(&c, "select 'after'").await, "after", "{mode}");

            // A transaction opened and closed within multi-statement queries.
            let msgs = c
                .simple_query("begin; select txid_current() is not null; ")
                .await
                .expect("begin");
            assert_eq!(summary(&msgs), ["done:0", "row:t", "done:1"], "{mode}");
            assert_eq!(
                simple_one(&c, "select txid_current_if_assigned() is not null; commit").await,
                "t",
                "{mode}: the transaction must still be open on the same server"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_unnamed_and_named_statements() {
    bounded(async {
        let pg = pg();
        for mode in MODES {
            let proxy = proxy_for(&pg, mode, 2).await;
            let url = proxy_url(&proxy, SUPERUSER, "postgres");
            let mut a = connect(&url).await;
            let holder = connect(&url).await;

            // Unnamed statement (Parse "" / Bind / Execute in one batch).
            let row = a
                .query_typed_one("select $1::int4 + 1", &[(&41i32, Type::INT4)])
                .await
                .expect("unnamed statement");
            assert_eq!(row.get::<_, i32>(0), 42, "{mode}");

            // A named statement prepared once and used across many transactions. In
            // transaction mode `holder` keeps the most recently used server busy every
            // other round, so `a` runs on different servers and the proxy must prepare
            // the statement there under its own name.
            let stmt = a
                .prepare("select $1::text || ' from a', pg_backend_pid()")
                .await
                .expect("prepare");
            let mut pids = BTreeSet::new();
            for i in 0..6 {
                if i % 2 == 0 {
                    holder.batch_execute("begin; select 1").await.expect("hold");
                }
                let tx = a.transaction().await.expect("begin");
                let row = tx
                    .query_one(&stmt, &[&format!("v{i}")])
                    .await
                    .expect("named statement in a transaction");
                assert_eq!(row.get::<_, String>(0), format!("v{i} from a"), "{mode}");
                pids.insert(row.get::<_, i32>(1));
                tx.commit().await.expect("commit");
                // And outside a transaction block.
                let row = a.query_one(&stmt, &[&"auto"]).await.expect("autocommit");
                assert_eq!(row.get::<_, String>(0), "auto from a", "{mode}");
                if i % 2 == 0 {
                    holder
                        .batch_execute("commit")
                        .await
                        .expect("release holder");
                }
            }
            match mode {
                PoolMode::Session => assert_eq!(pids.len(), 1, "session mode keeps one server"),
                PoolMode::Transaction => assert!(
                    pids.len() >= 2,
                    "transaction mode should have used several servers, used {pids:?}"
                ),
            }

            // A statement that fails to parse is forgotten; the client carries on.
            let e = a.prepare("selec 1").await.expect_err("syntax error");
            assert_eq!(code_of(&e), "42601", "{mode}: {e}");
            let s2 = a
                .prepare("select 'second'")
                .await
                .expect("prepare after error");
            let row = a.query_one(&s2, &[]).await.expect("run second");
            assert_eq!(row.get::<_, String>(0), "second", "{mode}");
            // Closing (drop) and preparing the same text again works.
            drop(s2);
            let s3 = a.prepare("select 'second'").await.expect("prepare again");
            assert_eq!(
                a.query_one(&s3, &[])
                    .await
                    .expect("run again")
                    .get::<_, String>(0),
                "second"
            );
            assert_eq!(
                a.query_one(&stmt, &[&"end"])
                    .await
                    .expect("first statement still there")
                    .get::<_, String>(0),
                "end from a"
            );
        }
    })
    .await
}

/// Two clients using the same statement name for different texts (raw protocol: the
/// names are chosen by the test), on one server in transaction mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_statement_name_in_two_clients() {
    bounded(async {
        let pg = pg();
        for mode in MODES {
            // Transaction mode: both clients share one server.
            let size = if mode == PoolMode::Session { 2 } else { 1 };
            let proxy = proxy_for(&pg, mode, size).await;
            let mut c1 = RawConn::login(proxy.addr, SUPERUSER, "postgres").await;
            let mut c2 = RawConn::login(proxy.addr, SUPERUSER, "postgres").await;
            let prepare = |sql: &str| {
                let mut m = raw::parse_msg("s1", sql);
                m.extend(raw::sync_msg());
                m
            };
            let mut run = raw::bind_msg("", "s1");
            run.extend(raw::execute_msg(""));
            run.extend(raw::sync_msg());

            c1.send(&prepare("select 'one'")).await;
            assert_eq!(tags(&c1.read_until_ready().await), "1Z", "{mode}");
            c2.send(&prepare("select 'two'")).await;
            assert_eq!(tags(&c2.read_until_ready().await), "1Z", "{mode}");
            for _ in 0..2 {
                c1.send(&run).await;
                let m = c1.read_until_ready().await;
                assert_eq!(tags(&m), "2DCZ", "{mode}");
                assert_eq!(m[1].row(), [Some("one".to_string())]);
                c2.send(&run).await;
                let m = c2.read_until_ready().await;
                assert_eq!(tags(&m), "2DCZ", "{mode}");
                assert_eq!(m[1].row(), [Some("two".to_string())]);
            }
            // A duplicate name in the same client is refused as PostgreSQL would.
            c1.send(&prepare("select 'dup'")).await;
            let m = c1.read_until_ready().await;
            assert_eq!(tags(&m), "EZ", "{mode}");
            assert_eq!(m[0].code().as_deref(), Some("42P05"), "{mode}");
            // Close frees the name for a new text.
            let mut close = raw::close_msg(b'S', "s1");
            close.extend(raw::sync_msg());
            c1.send(&close).await;
            assert_eq!(tags(&c1.read_until_ready().await), "3Z", "{mode}");
            c1.send(&prepare("select 'three'")).await;
            assert_eq!(tags(&c1.read_until_ready().await), "1Z", "{mode}");
            c1.send(&run).await;
            let m = c1.read_until_ready().await;
            assert_eq!(m[1].row(), [Some("three".to_string())], "{mode}");
            // Unknown statement: PostgreSQL's own 26000.
            let mut bad = raw::bind_msg("", "nope");
            bad.extend(raw::execute_msg(""));
            bad.extend(raw::sync_msg());
            c1.send(&bad).await;
            let m = c1.read_until_ready().await;
            assert_eq!(tags(&m), "EZ", "{mode}");
            assert_eq!(m[0].code().as_deref(), Some("26000"), "{mode}");
        }
    })
    .await
}

fn copy_data(rows: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(rows * 40);
    for i in 0..rows {
        let n = if i % 7 == 0 {
            "\\N".to_string()
        } else {
            (i * 3).to_string()
        };
        // `\t` inside the text is an escaped tab, which COPY TO writes back the same way.
        data.extend_from_slice(format!("{i}\tval\\t{i} é\t{n}\n").as_bytes());
    }
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_round_trip() {
    bounded(async {
        let pg = pg();
        let admin = direct(&pg).await;
        for mode in MODES {
            let table = format!("copy_rt_{mode}");
            admin
                .batch_execute(&format!(
                    "drop table if exists {table}; create table {table} (id int primary key, v text, n int)"
                ))
                .await
                .expect("create table");
            let proxy = proxy_for(&pg, mode, 2).await;
            let c = client_of(&proxy).await;
            let data = copy_data(100_000);

            let sink = c
                .copy_in(&format!("COPY {table} FROM STDIN"))
                .await
                .expect("copy in");
            pin_mut!(sink);
            for chunk in data.chunks(64 * 1024) {
                sink.send(Bytes::copy_from_slice(chunk))
                    .await
                    .expect("copy data");
            }
            let n = sink.finish().await.expect("copy done");
            assert_eq!(n, 100_000, "{mode}");

            let stream = c
                .copy_out(&format!("COPY (select * from {table} order by id) TO STDOUT"))
                .await
                .expect("copy out");
            pin_mut!(stream);
            let mut out = Vec::with_capacity(data.len());
            while let Some(chunk) = stream.next().await {
                out.extend_from_slice(&chunk.expect("copy out data"));
            }
            assert_eq!(out.len(), data.len(), "{mode}: COPY OUT length");
            assert!(out == data, "{mode}: COPY OUT is not byte-identical");
            assert_eq!(simple_one(&c, "select 'usable'").await, "usable");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_fail_and_bad_row() {
    bounded(async {
        let pg = pg();
        let admin = direct(&pg).await;
        for mode in MODES {
            let table = format!("copy_err_{mode}");
            admin
                .batch_execute(&format!(
                    "drop table if exists {table}; create table {table} (id int, v text, n int)"
                ))
                .await
                .expect("create table");
            let count = format!("select count(*) from {table}");
            let proxy = proxy_for(&pg, mode, 2).await;
            let c = client_of(&proxy).await;

            // 1. The sink is dropped unfinished: tokio-postgres sends CopyFail.
            {
                let sink = c
                    .copy_in(&format!("COPY {table} FROM STDIN"))
                    .await
                    .expect("copy in");
                pin_mut!(sink);
                sink.send(Bytes::from(copy_data(1000)))
                    .await
                    .expect("copy data");
            }
            assert_eq!(simple_one(&c, &count).await, "0", "{mode}: after CopyFail");

            // 2. CopyFail over the simple protocol: the client sees the server's error.
            let mut r = RawConn::login(proxy.addr, SUPERUSER, "postgres").await;
            r.send(&raw::query_msg(&format!("COPY {table} FROM STDIN")))
                .await;
            assert_eq!(r.read_msg().await.tag, b'G', "{mode}: CopyInResponse");
            r.send(&raw::fe(b'd', &copy_data(100))).await;
            r.send(&raw::fe(b'f', b"aborted by test\0")).await;
            let m = r.read_until_ready().await;
            assert_eq!(tags(&m), "EZ", "{mode}");
            assert_eq!(m[0].code().as_deref(), Some("57014"), "{mode}");
            assert!(
                m[0].field(b'M')
                    .unwrap_or_default()
                    .contains("aborted by test"),
                "{mode}: {:?}",
                m[0].field(b'M')
            );
            assert_eq!(r.query_rows(&count).await, [[Some("0".into())]], "{mode}");

            // 3. A bad row: the error reaches the client, nothing is inserted.
            let mut data = copy_data(1000);
            data.extend_from_slice(b"not-a-number\tx\t1\n");
            data.extend_from_slice(&copy_data(1000));
            let sink = c
                .copy_in(&format!("COPY {table} FROM STDIN"))
                .await
                .expect("copy in");
            pin_mut!(sink);
            // The server may fail while data is still being sent; either call may see it.
            let sent = sink.send(Bytes::from(data)).await;
            let e = match sent {
                Err(e) => e,
                Ok(()) => sink.finish().await.expect_err("bad row must fail the COPY"),
            };
            assert_eq!(code_of(&e), "22P02", "{mode}: {e}");
            assert_eq!(simple_one(&c, &count).await, "0", "{mode}: after bad row");

            // 4. A bad row at the start of a simple-protocol COPY with much data after
            //    it: the server answers before the client finishes sending.
            r.send(&raw::query_msg(&format!("COPY {table} FROM STDIN")))
                .await;
            assert_eq!(r.read_msg().await.tag, b'G');
            r.send(&raw::fe(b'd', b"oops\tx\t1\n")).await;
            let bulk = copy_data(20_000);
            for chunk in bulk.chunks(8192) {
                r.send(&raw::fe(b'd', chunk)).await;
            }
            r.send(&raw::fe(b'c', &[])).await;
            let m = r.read_until_ready().await;
            assert_eq!(tags(&m), "EZ", "{mode}");
            assert_eq!(m[0].code().as_deref(), Some("22P02"), "{mode}");
            // The connection answers exactly what it is asked afterwards.
            let m = r.query("select 'after copy'").await;
            assert_eq!(tags(&m), "TDCZ", "{mode}");
            assert_eq!(m[1].row(), [Some("after copy".into())]);
            assert_eq!(r.query_rows(&count).await, [[Some("0".into())]], "{mode}");
            assert_eq!(simple_one(&c, "select 'usable'").await, "usable");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_reach_the_client() {
    bounded(async {
        let pg = pg();
        for mode in MODES {
            let proxy = proxy_for(&pg, mode, 2).await;
            let (c, mut rx) =
                connect_with_messages(&proxy_url(&proxy, SUPERUSER, "postgres")).await;
            c.batch_execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$")
                .await
                .expect("DO with notice");
            // Extended protocol, inside a transaction.
            c.batch_execute("begin").await.expect("begin");
            c.execute("DO $$ BEGIN RAISE NOTICE 'second'; END $$", &[])
                .await
                .expect("DO (extended)");
            c.batch_execute("commit").await.expect("commit");
            for want in ["hello 42", "second"] {
                let m = within(Duration::from_secs(5), "notice", rx.recv())
                    .await
                    .expect("message channel open");
                match m {
                    AsyncMessage::Notice(n) => {
                        assert_eq!(n.message(), want, "{mode}");
                        assert_eq!(n.code().code(), "00000");
                    }
                    other => panic!("{mode}: expected a notice, got {other:?}"),
                }
            }
            assert_eq!(simple_one(&c, "select 'ok'").await, "ok");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_in_session_mode() {
    bounded(async {
        let pg = pg();
        let proxy = proxy_for(&pg, PoolMode::Session, 4).await;
        let url = proxy_url(&proxy, SUPERUSER, "postgres");
        let (listener, mut rx) = connect_with_messages(&url).await;
        let notifier = connect(&url).await;
        listener
            .batch_execute("LISTEN core_chan")
            .await
            .expect("listen");
        // Delivered while the listener is idle (no query of its own in flight).
        notifier
            .execute("select pg_notify('core_chan', 'payload-1')", &[])
            .await
            .expect("notify");
        notifier
            .batch_execute("NOTIFY core_chan, 'payload-2'")
            .await
            .expect("notify");
        for want in ["payload-1", "payload-2"] {
            match within(Duration::from_secs(5), "notification", rx.recv()).await {
                Some(AsyncMessage::Notification(n)) => {
                    assert_eq!(n.channel(), "core_chan");
                    assert_eq!(n.payload(), want);
                }
                other => panic!("expected a notification, got {other:?}"),
            }
        }
        assert_eq!(
            simple_one(&listener, "select 'still fine'").await,
            "still fine"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameter_status_and_set_follow_the_client() {
    bounded(async {
        let pg = pg();
        let server_tz = simple_one(&direct(&pg).await, "show TimeZone").await;
        assert_ne!(server_tz, "America/New_York");
        for mode in MODES {
            // Transaction mode: three clients on two servers.
            let size = if mode == PoolMode::Session { 4 } else { 2 };
            let proxy = proxy_for(&pg, mode, size).await;
            let url = proxy_url(&proxy, SUPERUSER, "postgres");
            let a = connect(&url).await;
            let holder = connect(&url).await;
            let b = connect(&url).await;
            a.batch_execute("SET application_name = 'proto_a'; SET TimeZone = 'America/New_York'")
                .await
                .expect("set");
            for i in 0..4 {
                // Every other round the most recently used server is held elsewhere.
                if i % 2 == 0 {
                    holder.batch_execute("begin; select 1").await.expect("hold");
                }
                assert_eq!(simple_one(&a, "show application_name").await, "proto_a");
                assert_eq!(
                    simple_one(&a, "show TimeZone").await,
                    "America/New_York",
                    "{mode}"
                );
                assert_eq!(
                    simple_one(&a, "select '2020-01-01 00:00:00+00'::timestamptz::text").await,
                    "2019-12-31 19:00:00-05",
                    "{mode}"
                );
                // Another client never inherits a's settings.
                assert_eq!(simple_one(&b, "show TimeZone").await, server_tz, "{mode}");
                assert_ne!(
                    simple_one(&b, "show application_name").await,
                    "proto_a",
                    "{mode}"
                );
                if i % 2 == 0 {
                    holder.batch_execute("commit").await.expect("release");
                }
            }

            // The ParameterStatus message itself reaches a raw client.
            let mut r = RawConn::login(proxy.addr, SUPERUSER, "postgres").await;
            let m = r.query("SET application_name = 'raw_app'").await;
            // PostgreSQL reports changed settings just before ReadyForQuery.
            assert_eq!(tags(&m), "CSZ", "{mode}");
            assert_eq!(m[1].param(), ("application_name".into(), "raw_app".into()));
            assert_eq!(
                r.query_rows("show application_name").await,
                [[Some("raw_app".into())]]
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_query() {
    bounded(async {
        let pg = pg();
        for mode in MODES {
            let proxy = proxy_for(&pg, mode, 2).await;
            let c = client_of(&proxy).await;
            // tokio-postgres reports EmptyQueryResponse as "0 rows".
            let msgs = c.simple_query("").await.expect("empty query");
            assert_eq!(summary(&msgs), ["done:0"], "{mode}: {msgs:?}");
            assert_eq!(simple_one(&c, "select 'next'").await, "next");
            let mut r = RawConn::login(proxy.addr, SUPERUSER, "postgres").await;
            assert_eq!(tags(&r.query("").await), "IZ", "{mode}");
            assert_eq!(tags(&r.query(" ; ").await), "IZ", "{mode}");
            assert_eq!(tags(&r.query("select 1").await), "TDCZ", "{mode}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_in_the_middle_of_a_result() {
    bounded(async {
        let pg = pg();
        let sql = "select 1/(g-50) from generate_series(1,100) g";
        for mode in MODES {
            let proxy = proxy_for(&pg, mode, 2).await;
            let c = client_of(&proxy).await;
            // Extended protocol, streamed: 49 rows, then the error.
            let stream = c
                .query_raw(sql, std::iter::empty::<i32>())
                .await
                .expect("start query");
            pin_mut!(stream);
            let mut rows = 0;
            let err = loop {
                match stream.next().await {
                    Some(Ok(_)) => rows += 1,
                    Some(Err(e)) => break e,
                    None => panic!("{mode}: the query must fail"),
                }
            };
            assert_eq!(rows, 49, "{mode}");
            assert_eq!(code_of(&err), "22012", "{mode}: {err}");
            // Simple protocol.
            let e = c.simple_query(sql).await.expect_err("must fail");
            assert_eq!(code_of(&e), "22012", "{mode}");
            // Inside a transaction: the transaction is failed until rolled back.
            c.batch_execute("begin").await.expect("begin");
            let e = c.simple_query(sql).await.expect_err("must fail");
            assert_eq!(code_of(&e), "22012", "{mode}");
            let e = c.simple_query("select 1").await.expect_err("aborted txn");
            assert_eq!(code_of(&e), "25P02", "{mode}: {e}");
            c.batch_execute("rollback").await.expect("rollback");
            assert_eq!(simple_one(&c, "select 'ok'").await, "ok", "{mode}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_result_is_streamed_not_buffered() {
    bounded(async {
        let pg = pg();
        const ROWS: usize = 200_000;
        const LIMIT_KIB: u64 = 100 * 1024;
        for mode in MODES {
            let proxy = proxy_for(&pg, mode, 2).await;
            let c = client_of(&proxy).await;
            let before = rss_kib();
            let stream = c
                .query_raw(
                    "select repeat('x', 1000) from generate_series(1, 200000)",
                    std::iter::empty::<i32>(),
                )
                .await
                .expect("start query");
            pin_mut!(stream);
            let (mut rows, mut bytes, mut peak) = (0usize, 0usize, before);
            while let Some(row) = stream.next().await {
                let row = row.expect("row");
                bytes += row.get::<_, &str>(0).len();
                rows += 1;
                if rows % 2000 == 0 {
                    peak = peak.max(rss_kib());
                }
            }
            assert_eq!(rows, ROWS, "{mode}");
            assert_eq!(bytes, ROWS * 1000, "{mode}");
            let grew = peak.saturating_sub(before);
            assert!(
                grew < LIMIT_KIB,
                "{mode}: RSS grew by {grew} KiB while streaming 200 MB; the proxy must not buffer results"
            );
            assert_eq!(simple_one(&c, "select 'after'").await, "after");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call() {
    bounded(async {
        let pg = pg();
        for mode in MODES {
            let proxy = proxy_for(&pg, mode, 2).await;
            let mut r = RawConn::login(proxy.addr, SUPERUSER, "postgres").await;
            let oid: u32 = r.query_rows("select 'int4pl'::regproc::oid").await[0][0]
                .as_deref()
                .expect("oid")
                .parse()
                .expect("numeric oid");
            r.send(&raw::function_call_msg(oid, &["40", "2"])).await;
            let m = r.read_until_ready().await;
            assert_eq!(tags(&m), "VZ", "{mode}");
            assert_eq!(&m[0].body[..], b"\0\0\0\x0242", "{mode}");
            // An error from a function call, then normal service.
            r.send(&raw::function_call_msg(oid, &["2147483647", "1"]))
                .await;
            let m = r.read_until_ready().await;
            assert_eq!(tags(&m), "EZ", "{mode}");
            assert_eq!(m[0].code().as_deref(), Some("22003"), "{mode}");
            assert_eq!(r.query_rows("select 1").await, [[Some("1".into())]]);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_protocol_2_is_refused() {
    bounded(async {
        let pg = pg();
        let proxy = proxy_for(&pg, PoolMode::Transaction, 2).await;
        let mut r = RawConn::connect(proxy.addr).await;
        r.send(&raw::startup_packet(
            2 << 16,
            &[("user", SUPERUSER), ("database", "postgres")],
        ))
        .await;
        let m = r.read_msg().await;
        assert_eq!(m.tag, b'E', "{m:?}");
        assert_eq!(m.code().as_deref(), Some("0A000"), "{m:?}");
        assert_eq!(m.field(b'V').as_deref(), Some("FATAL"));
        assert!(
            r.try_read_msg().await.is_none(),
            "connection must be closed"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_request_is_declined_then_startup_works() {
    bounded(async {
        let pg = pg();
        for mode in MODES {
            let proxy = proxy_for(&pg, mode, 2).await;
            let mut stream = tokio::net::TcpStream::connect(proxy.addr)
                .await
                .expect("connect");
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream.write_all(&raw::ssl_request()).await.expect("write");
            let mut answer = [0u8; 1];
            within(
                Duration::from_secs(5),
                "SSL answer",
                stream.read_exact(&mut answer),
            )
            .await
            .expect("read");
            assert_eq!(&answer, b"N", "{mode}");
            // A normal startup on the same socket.
            let mut cfg = tokio_postgres::Config::new();
            cfg.user(SUPERUSER)
                .dbname("postgres")
                .ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (c, conn) = within(
                Duration::from_secs(10),
                "startup after SSLRequest",
                cfg.connect_raw(stream, tokio_postgres::NoTls),
            )
            .await
            .expect("startup after SSLRequest");
            tokio::spawn(conn);
            assert_eq!(simple_one(&c, "select 'plain'").await, "plain", "{mode}");
        }
    })
    .await
}

/// A client may send its first query right behind the startup packet, in one write
/// (PostgreSQL reads it from the same buffer): the proxy must answer both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_sent_with_the_startup_packet_is_answered() {
    bounded(async {
        let pg = pg();
        for mode in MODES {
            let proxy = proxy_for(&pg, mode, 2).await;
            let mut c = RawConn::connect(proxy.addr).await;
            let mut both =
                raw::startup_packet(196608, &[("user", SUPERUSER), ("database", "postgres")]);
            both.extend_from_slice(&raw::query_msg("select 'ahead'"));
            c.send(&both).await;
            c.finish_login().await;
            let msgs = c.read_until_ready().await;
            let rows: Vec<_> = msgs
                .iter()
                .filter(|m| m.tag == b'D')
                .map(|m| m.row())
                .collect();
            assert_eq!(rows, vec![vec![Some("ahead".to_string())]], "{mode}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_key_data_pid_is_real_only_in_session_mode() {
    bounded(async {
        let pg = pg();
        for mode in MODES {
            let proxy = proxy_for(&pg, mode, 2).await;
            let mut r = RawConn::login(proxy.addr, SUPERUSER, "postgres").await;
            assert_ne!(r.pid, 0, "{mode}: BackendKeyData must be sent");
            let real: i32 = r.query_rows("select pg_backend_pid()").await[0][0]
                .as_deref()
                .expect("pid")
                .parse()
                .expect("numeric pid");
            // Session mode: one server for the whole session, so the client is told its
            // real pid (pg_terminate_backend, NOTIFY sender pids mean what they say);
            // the secret stays the proxy's own. Transaction mode: the server changes
            // per transaction, and any pid of one would be a lie about the next.
            if mode == PoolMode::Session {
                assert_eq!(r.pid, real, "{mode}: the client is told its server's pid");
            } else {
                assert_ne!(r.pid, real, "{mode}: no server's pid is the client's");
            }
        }
    })
    .await
}

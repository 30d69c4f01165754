//! Micro-benchmarks of the per-message work the relay does: header framing of both
//! streams, the few message bodies it reads, the prepared-statement bookkeeping and the
//! request tracker. Run with `cargo bench --bench framing` (`-- --quick` for a fast pass).
//!
//! The inputs mirror what pgbench sends and receives: `-S` in extended and prepared
//! mode, and a large result set of 100-byte DataRows.

use std::hint::black_box;

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use pgsidecar::protocol::framing::{backend_header, frontend_header, HEADER_LEN};
use pgsidecar::protocol::messages;
use pgsidecar::server::prepared::{PreparedCache, StmtDef};
use pgsidecar::session::tracker::{Effects, Req, Tracker};

const MAX_MESSAGE: usize = 1 << 30;
const PGBENCH_SELECT: &[u8] = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;";
/// One parameter of type int4 (OID 23), as a Parse carries it.
const INT4_PARAM: &[u8] = &[0, 1, 0, 0, 0, 23];

fn frame(buf: &mut BytesMut, tag: u8, body: &[u8]) {
    buf.put_u8(tag);
    buf.put_i32(4 + body.len() as i32);
    buf.put_slice(body);
}

fn bind_body(stmt: &[u8], value: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.push(0); // unnamed portal
    b.extend_from_slice(stmt);
    b.push(0);
    b.extend_from_slice(&0i16.to_be_bytes()); // parameter formats: all text
    b.extend_from_slice(&1i16.to_be_bytes()); // one parameter
    b.extend_from_slice(&(value.len() as i32).to_be_bytes());
    b.extend_from_slice(value);
    b.extend_from_slice(&0i16.to_be_bytes()); // result formats: all text
    b
}

/// `count` pgbench -S transactions in extended mode, pipelined:
/// Parse (unnamed) Bind Describe(portal) Execute Sync each.
fn extended_batch(count: usize) -> BytesMut {
    let mut buf = BytesMut::new();
    for i in 0..count {
        messages::fe_parse(&mut buf, b"", PGBENCH_SELECT, INT4_PARAM);
        frame(
            &mut buf,
            b'B',
            &bind_body(b"", format!("{}", 1 + i * 7919).as_bytes()),
        );
        frame(&mut buf, b'D', b"P\0");
        frame(&mut buf, b'E', &[0, 0, 0, 0, 0]);
        messages::fe_sync(&mut buf);
    }
    buf
}

/// RowDescription, `rows` DataRows with a 100-byte body, CommandComplete, ReadyForQuery.
fn result_set(rows: usize) -> BytesMut {
    let mut buf = BytesMut::new();
    messages::row_description(&mut buf, &["payload"]);
    // 2 (column count) + 4 (value length) + 94 value bytes = 100-byte body.
    let mut body = Vec::with_capacity(100);
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&94i32.to_be_bytes());
    body.extend(std::iter::repeat_n(b'x', 94));
    for _ in 0..rows {
        frame(&mut buf, b'D', &body);
    }
    messages::command_complete(&mut buf, &format!("SELECT {rows}"));
    messages::ready_for_query(&mut buf, b'I');
    buf
}

fn error_body() -> Vec<u8> {
    let mut b = Vec::new();
    for (field, value) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', "42P01"),
        (b'M', "relation \"pgbench_acounts\" does not exist"),
        (b'P', "22"),
        (b'F', "parse_relation.c"),
        (b'L', "1392"),
        (b'R', "parserOpenTable"),
    ] {
        b.push(field);
        b.extend_from_slice(value.as_bytes());
        b.push(0);
    }
    b.push(0);
    b
}

/// Walks `buf` frame by frame the way the relay does; returns the frame count.
fn walk(buf: &[u8], frontend: bool) -> usize {
    let mut pos = 0;
    let mut frames = 0;
    while pos < buf.len() {
        let header = if frontend {
            frontend_header(&buf[pos..], MAX_MESSAGE)
        } else {
            backend_header(&buf[pos..], MAX_MESSAGE)
        };
        match header {
            Ok(Some(h)) => {
                pos += h.frame_len();
                frames += 1;
            }
            _ => break,
        }
    }
    frames
}

fn bench_framing(c: &mut Criterion) {
    let rows = result_set(1000);
    let batch = extended_batch(100);
    assert_eq!(walk(&rows, false), 1003);
    assert_eq!(walk(&batch, true), 500);

    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Bytes(rows.len() as u64));
    g.bench_function("backend_header/1000_datarows_100B", |b| {
        b.iter(|| walk(black_box(&rows), false))
    });
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.bench_function("frontend_header/pgbench_S_extended_x100", |b| {
        b.iter(|| walk(black_box(&batch), true))
    });
    g.finish();
}

fn bench_messages(c: &mut Criterion) {
    let mut parse = BytesMut::new();
    messages::fe_parse(&mut parse, b"P0_1", PGBENCH_SELECT, INT4_PARAM);
    let parse_body = parse[HEADER_LEN..].to_vec();
    let bind = bind_body(b"P0_1", b"4242");
    let error = error_body();
    assert!(messages::parse_parse(&parse_body).is_some());
    assert!(messages::parse_bind(&bind).is_some());
    assert_eq!(messages::error_fields(&error).0.as_deref(), Some("42P01"));

    let mut g = c.benchmark_group("messages");
    g.bench_function("parse_parse", |b| {
        b.iter(|| messages::parse_parse(black_box(&parse_body)).map(|p| p.query.len()))
    });
    g.bench_function("parse_bind", |b| {
        b.iter(|| messages::parse_bind(black_box(&bind)))
    });
    g.bench_function("error_fields", |b| {
        b.iter(|| messages::error_fields(black_box(&error)))
    });
    g.finish();
}

fn bench_prepared(c: &mut Criterion) {
    let mut g = c.benchmark_group("prepared");
    g.bench_function("StmtDef::new/pgbench_select", |b| {
        b.iter(|| StmtDef::new(black_box(PGBENCH_SELECT), black_box(INT4_PARAM)))
    });

    // A full per-server cache (the default 256 statements), as after a warm-up.
    let ids: Vec<u128> = (0..256u128)
        .map(|i| StmtDef::new(format!("SELECT {i}").as_bytes(), &[0, 0]).id)
        .collect();
    let mut cache = PreparedCache::new(256);
    for &id in &ids {
        cache.insert(id);
    }
    let mut i = 0;
    g.bench_function("PreparedCache::touch/hit_of_256", |b| {
        b.iter(|| {
            i = (i + 97) % ids.len();
            cache.touch(black_box(ids[i]))
        })
    });
    g.bench_function("PreparedCache::touch/miss", |b| {
        b.iter(|| cache.touch(black_box(u128::MAX)))
    });
    // Inserting a new statement into a full cache evicts the least recently used one
    // (a linear scan); the cache stays full, so every iteration evicts.
    let mut next = 1u128 << 64;
    g.bench_function("PreparedCache::insert/evicting_at_256", |b| {
        b.iter(|| {
            next += 1;
            cache.insert(black_box(next))
        })
    });
    g.finish();
}

/// One pgbench -S transaction in extended mode through the tracker: the five requests,
/// then the six answers the server sends back.
fn tracker_round(t: &mut Tracker, emit: &mut BytesMut, fx: &mut Effects) -> usize {
    t.push(
        Req::Parse {
            stmt: None,
            client_name: None,
            injected: false,
        },
        emit,
        fx,
    );
    t.push(Req::Bind, emit, fx);
    t.push(Req::DescribePortal, emit, fx);
    t.push(Req::Execute, emit, fx);
    t.push(Req::Sync, emit, fx);
    let mut forwarded = 0;
    for (tag, body) in [
        (b'1', &b""[..]),
        (b'2', b""),
        (b'T', b""),
        (b'D', b""),
        (b'C', b"SELECT 1\0"),
        (b'Z', b"I"),
    ] {
        forwarded += t.on_server(tag, body, emit, fx) as usize;
    }
    forwarded
}

fn bench_tracker(c: &mut Criterion) {
    let mut t = Tracker::default();
    let (mut emit, mut fx) = (BytesMut::new(), Effects::default());
    assert_eq!(tracker_round(&mut t, &mut emit, &mut fx), 6);
    assert!(t.is_empty());

    let mut g = c.benchmark_group("tracker");
    g.throughput(Throughput::Elements(1));
    g.bench_function("push+on_server/pgbench_S_extended_txn", |b| {
        b.iter(|| {
            let n = tracker_round(&mut t, &mut emit, &mut fx);
            debug_assert!(t.is_empty());
            n
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_framing,
    bench_messages,
    bench_prepared,
    bench_tracker
);
criterion_main!(benches);

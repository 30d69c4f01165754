//! Cost of session-state detection (transaction mode) per statement: the keyword
//! pre-filter every Query and Parse goes through, and the tokenizer for the rare
//! statements it lets through. Run with `cargo bench --bench session_state`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};

use pgsidecar::session::sessionstate::{prefilter, scan};

/// What pgbench's TPC-B-like script and a typical ORM send: no session state.
const TYPICAL: &[(&str, &str)] = &[
    ("pgbench_select", "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"),
    (
        "pgbench_update",
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
    ),
    (
        "pgbench_insert",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);",
    ),
    (
        "orm_select",
        "SELECT users.id, users.email, users.created_at, orders.total FROM users JOIN orders ON orders.user_id = users.id WHERE users.id = $1 ORDER BY orders.created_at DESC LIMIT 20",
    ),
];

const STATEFUL: &[(&str, &str)] = &[
    ("advisory_lock", "SELECT pg_catalog.pg_advisory_lock($1)"),
    (
        "create_temp",
        "CREATE TEMP TABLE import_rows (id bigint, payload jsonb)",
    ),
];

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("session_state");
    for (name, sql) in TYPICAL {
        g.bench_function(format!("scan/{name}"), |b| {
            b.iter(|| scan(black_box(sql.as_bytes()), false))
        });
        g.bench_function(format!("prefilter_pinned/{name}"), |b| {
            b.iter(|| prefilter(black_box(sql.as_bytes()), true))
        });
    }
    for (name, sql) in STATEFUL {
        g.bench_function(format!("scan/{name}"), |b| {
            b.iter(|| scan(black_box(sql.as_bytes()), false))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! The console's SHOW commands with PgBouncer's column names where PgBouncer has the
//! column (so its habits and tools carry over), followed by pgsidecar's own columns.
//! PgBouncer columns for things pgsidecar does not have (cancel-request states, DNS
//! caches, reserve pools, load balancing) are left out rather than filled with zeros.

use std::collections::BTreeMap;

use bytes::BytesMut;

use super::stats;
use crate::control::Stats;
use crate::protocol::messages;

pub(super) type Row = Vec<Option<String>>;

pub(super) fn s(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

fn yes_no(b: bool) -> Option<String> {
    s(if b { "1" } else { "0" })
}

/// Writes a result set; the command tag is PgBouncer's (`SHOW`).
pub fn table(out: &mut BytesMut, columns: &[&str], data: Vec<Row>) {
    messages::row_description(out, columns);
    let n = data.len();
    for r in data {
        messages::data_row(out, &r);
    }
    messages::command_complete(out, &format!("SHOW {n}"));
}

/// Answers a SHOW command this module knows; false if it is not one of them.
pub fn run(what: &str, st: &Stats, out: &mut BytesMut) -> bool {
    match what {
        "POOLS" => pools(st, out),
        "STATS" => stats(st, out, true, true),
        "STATS_TOTALS" => stats(st, out, true, false),
        "STATS_AVERAGES" => stats(st, out, false, true),
        "SERVERS" => super::servers::show(st, out),
        "DATABASES" => databases(st, out),
        "USERS" => users(st, out),
        "LISTS" => lists(st, out),
        "MEM" => mem(st, out),
        "CONFIG" => super::config_rows::show(st, out),
        _ => return false,
    }
    true
}

fn pools(st: &Stats, out: &mut BytesMut) {
    let waits = st.max_waits();
    let data = st
        .pools()
        .iter()
        .map(|p| {
            let sn = p.snapshot();
            let w = waits.get(p.name()).copied().unwrap_or_default();
            let login = p.login_failure();
            vec![
                s(&sn.database),
                s(&sn.user),
                // PgBouncer counts idle clients as cl_active too (linked or not waiting).
                s(sn.clients_active + sn.clients_idle),
                s(sn.clients_waiting),
                s(sn.active_servers),
                s(sn.idle),
                s(sn.testing),
                s(sn.connecting),
                s(w.as_secs()),
                s(w.subsec_micros()),
                s(&sn.mode),
                s(sn.clients_idle),
                s(sn.min_size),
                s(sn.max_size),
                s(sn.target_size),
                s(sn.ceiling),
                yes_no(sn.paused),
                s(p.breaker_view().state.as_str()),
                login
                    .as_ref()
                    .map(|f| format!("{} {}", f.sqlstate, f.message)),
                login.map(|f| format!("{:.1}", f.failing_for_secs)),
            ]
        })
        .collect();
    table(
        out,
        &[
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "sv_tested",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode",
            "cl_idle",
            "min_size",
            "max_size",
            "target_size",
            "ceiling",
            "paused",
            "breaker",
            "upstream_login_error",
            "upstream_login_failing_secs",
        ],
        data,
    );
}

// In the order PgBouncer documents them.
const TOTAL_COLUMNS: [&str; 9] = [
    "total_xact_count",
    "total_query_count",
    "total_server_assignment_count",
    "total_server_closed_count",
    "total_received",
    "total_sent",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
];
const AVG_COLUMNS: [&str; 8] = [
    "avg_xact_count",
    "avg_query_count",
    "avg_server_assignment_count",
    "avg_recv",
    "avg_sent",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
];

/// SHOW STATS (both), STATS_TOTALS (totals, without the `total_` prefix, as PgBouncer
/// prints them) and STATS_AVERAGES (averages, without `avg_`). One row per pool:
/// PgBouncer's `database` plus our `user`, since pools are per (database, user).
fn stats(st: &Stats, out: &mut BytesMut, totals: bool, avgs: bool) {
    let both = totals && avgs;
    let mut cols = vec!["database".to_string(), "user".to_string()];
    let strip = |c: &str, p: &str| {
        if both {
            c.to_string()
        } else {
            c.trim_start_matches(p).to_string()
        }
    };
    if totals {
        cols.extend(TOTAL_COLUMNS.iter().map(|c| strip(c, "total_")));
    }
    if avgs {
        cols.extend(AVG_COLUMNS.iter().map(|c| strip(c, "avg_")));
    }
    let data = st
        .pools()
        .iter()
        .map(|p| {
            let mut r = vec![s(&p.key().database), s(&p.key().user)];
            if totals {
                let t = p.totals();
                r.extend(
                    [
                        t.xact_count,
                        t.query_count,
                        t.server_assignment_count,
                        t.server_closed_count,
                        t.received,
                        t.sent,
                        t.xact_time,
                        t.query_time,
                        t.wait_time,
                    ]
                    .map(s),
                );
            }
            if avgs {
                let a = stats::averages_of(p.name());
                r.extend(
                    [
                        a.xact_count,
                        a.query_count,
                        a.server_assignment_count,
                        a.recv,
                        a.sent,
                        a.xact_time,
                        a.query_time,
                        a.wait_time,
                    ]
                    .map(s),
                );
            }
            r
        })
        .collect();
    let names: Vec<&str> = cols.iter().map(String::as_str).collect();
    table(out, &names, data);
}

/// Per database: (server connections, clients, every pool paused); per user:
/// (server connections, clients). From the pools.
type DbCounts = BTreeMap<String, (usize, usize, bool)>;
type UserCounts = BTreeMap<String, (usize, usize)>;

fn counts(st: &Stats) -> (DbCounts, UserCounts) {
    let mut dbs = DbCounts::new();
    let mut users = UserCounts::new();
    for p in st.pools() {
        let sn = p.snapshot();
        let d = dbs.entry(sn.database.clone()).or_insert((0, 0, true));
        d.0 += sn.open;
        d.1 += sn.clients;
        d.2 &= sn.paused;
        let u = users.entry(sn.user.clone()).or_default();
        u.0 += sn.open;
        u.1 += sn.clients;
    }
    (dbs, users)
}

fn databases(st: &Stats, out: &mut BytesMut) {
    let config = st.config();
    let (dbs, _) = counts(st);
    // Configured databases; with none configured any name is admitted, so the list is
    // the databases clients have asked for.
    let mut names: Vec<(String, Option<&crate::config::DatabaseConfig>)> = config
        .databases
        .iter()
        .map(|d| (d.name.clone(), Some(d)))
        .collect();
    if names.is_empty() {
        names = dbs.keys().map(|n| (n.clone(), None)).collect();
    }
    let data = names
        .into_iter()
        .map(|(name, d)| {
            let (open, clients, paused) = dbs.get(&name).copied().unwrap_or((0, 0, false));
            let server_db = d
                .and_then(|d| d.server_database.clone())
                .unwrap_or_else(|| name.clone());
            let size = d.and_then(|d| d.pool_size).unwrap_or(config.pool.size);
            vec![
                s(&name),
                s(&config.upstream.host),
                s(config.upstream.port),
                s(server_db),
                config.upstream.user.clone(),
                s(size),
                s(config.pool.min_size.min(size)),
                s(config.pool.server_lifetime.as_secs()),
                None,
                s(open),
                config
                    .limits
                    .max_db_client_connections
                    .map(|n| n.to_string()),
                s(clients),
                yes_no(paused),
            ]
        })
        .collect();
    table(
        out,
        &[
            "name",
            "host",
            "port",
            "database",
            "force_user",
            "pool_size",
            "min_pool_size",
            "server_lifetime",
            "pool_mode",
            "current_connections",
            "max_client_connections",
            "current_client_connections",
            "paused",
        ],
        data,
    );
}

fn users(st: &Stats, out: &mut BytesMut) {
    let config = st.config();
    let (_, counts) = counts(st);
    let mut names: Vec<String> = config.users.iter().map(|u| u.name.clone()).collect();
    for n in counts.keys() {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let data = names
        .into_iter()
        .map(|name| {
            let u = config.find_user(&name);
            let (open, clients) = counts.get(&name).copied().unwrap_or_default();
            vec![
                s(&name),
                u.and_then(|u| u.pool_mode)
                    .map(|m| format!("{m:?}").to_lowercase()),
                s(open),
                config
                    .limits
                    .max_user_client_connections
                    .map(|n| n.to_string()),
                s(clients),
                u.and_then(|u| u.server_user.clone())
                    .or_else(|| config.upstream.user.clone()),
                yes_no(u.is_some_and(|u| u.admin)),
            ]
        })
        .collect();
    table(
        out,
        &[
            "name",
            "pool_mode",
            "current_connections",
            "max_user_client_connections",
            "current_client_connections",
            "server_user",
            "admin",
        ],
        data,
    );
}

fn lists(st: &Stats, out: &mut BytesMut) {
    let config = st.config();
    let pools = st.pools();
    let (dbs, users) = counts(st);
    let servers: usize = pools.iter().map(|p| p.snapshot().open).sum();
    let clients = st.clients().len();
    let n_dbs = if config.databases.is_empty() {
        dbs.len()
    } else {
        config.databases.len()
    };
    let n_users = config.users.len().max(users.len());
    // No free lists: memory of a closed client or server is returned, not kept.
    let data = [
        ("databases", n_dbs),
        ("users", n_users),
        ("pools", pools.len()),
        ("free_clients", 0),
        ("used_clients", clients),
        ("free_servers", 0),
        ("used_servers", servers),
    ]
    .into_iter()
    .map(|(k, v)| vec![s(k), s(v)])
    .collect();
    table(out, &["list", "items"], data);
}

/// Resident memory from /proc (Linux), in bytes.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Sizes of the per-client and per-pool bookkeeping, and the process's resident memory.
/// Like PgBouncer's, subject to change.
fn mem(st: &Stats, out: &mut BytesMut) {
    let clients = st.clients().len();
    let pools = st.pools().len();
    let item = |name: &str, size: usize, used: usize| {
        vec![s(name), s(size), s(used), s(0), s(size * used)]
    };
    let mut data = vec![
        item(
            "client_entry",
            std::mem::size_of::<crate::clients::ClientInfo>(),
            clients,
        ),
        item("pool", std::mem::size_of::<crate::pool::Pool>(), pools),
    ];
    if let Some(rss) = rss_bytes() {
        data.push(vec![s("process_rss"), s(rss), s(1), s(0), s(rss)]);
    }
    table(out, &["name", "size", "used", "free", "memtotal"], data);
}

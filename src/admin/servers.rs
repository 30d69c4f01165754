//! SHOW SERVERS with PgBouncer's columns: idle servers from the pools, servers in use
//! from the clients holding them (with their age and when they were taken).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::time::Instant;

use super::show::{s, table};
use crate::control::Stats;

/// Wall-clock time of an instant in the past, as PgBouncer prints it (UTC).
fn wall(ago: Duration) -> Option<String> {
    let t = SystemTime::now()
        .checked_sub(ago)?
        .duration_since(UNIX_EPOCH)
        .ok()?;
    let secs = t.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = crate::logfmt::civil_from_days(days as i64);
    Some(format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    ))
}

pub fn show(stats: &Stats, out: &mut BytesMut) {
    let config = stats.config();
    let (host, port) = (config.upstream.host.clone(), config.upstream.port);
    let mut data = Vec::new();
    let row =
        |user: &str, db: &str, state: &str, pid: i32, age: Duration, idle: Duration, app: &str| {
            vec![
                s("S"),
                s(user),
                s(db),
                s(state),
                s(&host),
                s(port),
                wall(age),
                wall(idle),
                s(pid),
                s(app),
                s(format!("{:.1}", age.as_secs_f64())),
                s(format!("{:.1}", idle.as_secs_f64())),
            ]
        };
    for p in stats.pools() {
        for v in p.idle_servers() {
            let age = Duration::from_secs_f64(v.age_secs.max(0.0));
            let idle = Duration::from_secs_f64(v.idle_secs.max(0.0));
            data.push(row(
                &p.key().user,
                &p.key().database,
                "idle",
                v.backend_pid,
                age,
                idle,
                "",
            ));
        }
    }
    let now = Instant::now();
    for c in stats.clients() {
        let pid = c.server_pid();
        if let Some((age, bound)) = c.server_times(now) {
            // In use: request_time is when this client took it; it is not idle.
            let mut r = row(
                c.user(),
                c.database(),
                "active",
                pid,
                age,
                bound,
                c.application_name(),
            );
            r[11] = s("0.0");
            data.push(r);
        }
    }
    table(
        out,
        &[
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "connect_time",
            "request_time",
            "remote_pid",
            "application_name",
            "age_secs",
            "idle_secs",
        ],
        data,
    );
}

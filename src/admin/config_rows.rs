//! SHOW CONFIG as PgBouncer prints it: one row per setting with its value, its default
//! and whether a reload changes it. Keys are the dotted `proxy.yaml` paths; secrets
//! (passwords, the admin token) are never serialised, so they cannot appear.

use bytes::BytesMut;
use serde_json::Value;

use crate::config::Config;
use crate::control::Stats;

/// Settings read at start only; everything else applies on RELOAD / SIGHUP.
const RESTART_ONLY: &[&str] = &["listen", "admin_listen", "worker_threads", "logging."];

/// Flattens a JSON tree into (dotted key, scalar text); list items are `key[i]`.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        Value::Array(_) => out.push((prefix.to_string(), String::new())),
        Value::Null => out.push((prefix.to_string(), String::new())),
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// Rows (key, value, default, changeable) for a configuration.
pub fn rows(config: &Config) -> Vec<[String; 4]> {
    let mut cur = Vec::new();
    flatten(
        "",
        &serde_json::to_value(config).unwrap_or_default(),
        &mut cur,
    );
    let mut def = Vec::new();
    if let Ok(d) = Config::parse("upstream: {}\n", &|_| None) {
        flatten("", &serde_json::to_value(&d).unwrap_or_default(), &mut def);
    }
    cur.into_iter()
        .map(|(k, v)| {
            // A list entry's fields have no default of their own.
            let d = def
                .iter()
                .find(|(dk, _)| *dk == k)
                .map(|(_, dv)| dv.clone())
                .unwrap_or_default();
            let restart = RESTART_ONLY
                .iter()
                .any(|r| k == *r || (r.ends_with('.') && k.starts_with(r)));
            let changeable = if restart { "no" } else { "yes" };
            [k, v, d, changeable.to_string()]
        })
        .collect()
}

pub fn show(stats: &Stats, out: &mut BytesMut) {
    let data = rows(&stats.config())
        .into_iter()
        .map(|r| r.into_iter().map(Some).collect())
        .collect();
    super::show::table(out, &["key", "value", "default", "changeable"], data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_per_setting_with_defaults_and_no_secrets() {
        let c = Config::parse(
            "upstream: {host: db, password: s3cret}\npool: {size: 7}\nusers: [{name: a, password: s3cret}]\nadmin: {token: s3cret}\n",
            &|_| None,
        )
        .unwrap();
        let rows = rows(&c);
        let get = |k: &str| rows.iter().find(|r| r[0] == k).cloned();
        assert_eq!(get("pool.size").unwrap()[1..], ["7", "20", "yes"]);
        assert_eq!(
            get("upstream.host").unwrap()[1..],
            ["db", "127.0.0.1", "yes"]
        );
        assert_eq!(get("listen").unwrap()[3], "no");
        assert_eq!(get("users[0].name").unwrap()[1], "a");
        assert!(rows.iter().all(|r| !r.iter().any(|v| v.contains("s3cret"))));
    }
}

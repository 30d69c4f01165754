//! Session parameters carried across server connections.
//!
//! In transaction mode a client's transactions land on whichever server is free, so the
//! client-visible settings it chose (startup parameters, `options=-c ...`, and anything it
//! later changed that the server reports via ParameterStatus) are applied to the server at
//! checkout, and settings a previous client left behind are put back to the defaults.

use std::collections::HashMap;

/// Parameter settings by name. foldhash, not SipHash: a login hashes these several
/// times; like std's hasher it is seeded randomly per process.
pub type Settings = HashMap<String, String, foldhash::fast::RandomState>;

/// Reported by the server but not settable (or not ours to carry between sessions).
const READ_ONLY: &[&str] = &[
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "session_authorization",
    "in_hot_standby",
];

/// Startup keys that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

/// Whether a parameter may be tracked and re-applied for a client.
pub fn is_carried(name: &str) -> bool {
    !READ_ONLY.contains(&name) && !NOT_SETTINGS.contains(&name) && valid_name(name)
}

/// GUC names are identifiers, optionally dotted (extension settings).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        && !name.starts_with("_pq_.")
}

/// The settings a client's startup packet asks for, including `options` (`-c k=v`,
/// `--k=v`), as PostgreSQL would apply them.
pub fn startup_settings(params: &[(String, String)]) -> Settings {
    let mut out = Settings::default();
    for (k, v) in params {
        if k == "options" {
            for (ok, ov) in parse_options(v) {
                if is_carried(&ok) {
                    out.insert(ok, ov);
                }
            }
        } else if is_carried(k) {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Shares one copy of each distinct set of startup settings among a pool's clients
/// (an application's clients all send the same ones): memory per idle client. Keyed
/// by the startup parameters as sent, so a login that repeats an earlier one costs a
/// comparison of a few strings: no map built, hashed or fingerprinted.
/// Holds at most `SettingsCache::CAP` sets; an unused one makes room for a new one.
#[derive(Default)]
pub struct SettingsCache {
    sets: parking_lot::Mutex<Vec<Interned>>,
}

struct Interned {
    params: Vec<(String, String)>,
    settings: std::sync::Arc<Settings>,
    /// `fingerprint(settings, no raw settings)`.
    fp: u64,
}

impl SettingsCache {
    const CAP: usize = 32;

    /// The settings of these startup parameters (see `startup_settings`), shared, and
    /// their fingerprint.
    pub fn intern(&self, params: &[(String, String)]) -> (std::sync::Arc<Settings>, u64) {
        use std::sync::Arc;
        let mut sets = self.sets.lock();
        if let Some(e) = sets.iter().find(|e| e.params == params) {
            return (e.settings.clone(), e.fp);
        }
        let settings = Arc::new(startup_settings(params));
        let fp = fingerprint(&settings, &RawSettings::new());
        let entry = Interned {
            params: params.to_vec(),
            settings: settings.clone(),
            fp,
        };
        if sets.len() < Self::CAP {
            sets.push(entry);
        } else if let Some(slot) = sets
            .iter_mut()
            .find(|e| Arc::strong_count(&e.settings) == 1)
        {
            *slot = entry;
        }
        (settings, fp)
    }
}

/// Parses libpq's `options` string: whitespace-separated, backslash escapes a character.
pub fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
        } else if let Some(rest) = w.strip_prefix("-c") {
            Some(rest.to_string())
        } else {
            w.strip_prefix("--").map(|s| s.to_string())
        };
        if let Some(s) = setting {
            if let Some((k, v)) = s.split_once('=') {
                out.push((k.replace('-', "_"), v.to_string()));
            }
        }
    }
    out
}

/// Settings a client changed with SQL `SET` that the server does not report, kept as
/// the SQL text of their value (re-sent verbatim), by name.
pub type RawSettings = std::collections::BTreeMap<String, String>;

/// An order-independent fingerprint of a client's settings, never 0 (0 means "unknown").
pub fn fingerprint(m: &Settings, raw: &RawSettings) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut acc: u64 = 0x9e37_79b9_7f4a_7c15;
    for (k, v) in m.iter().chain(raw.iter()) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        k.hash(&mut h);
        v.hash(&mut h);
        // Wrapping add keeps it independent of HashMap iteration order.
        acc = acc.wrapping_add(h.finish());
    }
    acc.max(1)
}

/// SQL that makes a server's SQL-set settings match the client's; updates `current`.
pub fn sync_raw_sql(wanted: &RawSettings, current: &mut RawSettings) -> String {
    let mut sql = String::new();
    for (k, v) in wanted {
        if current.get(k) != Some(v) {
            sql.push_str(&format!("SET {k} TO {v};"));
        }
    }
    for k in current.keys() {
        if !wanted.contains_key(k) {
            sql.push_str(&format!("RESET {k};"));
        }
    }
    if !sql.is_empty() {
        *current = wanted.clone();
    }
    sql
}

/// A setting to apply (`Some`) or reset to the server default (`None`).
pub type Change = (String, Option<String>);

/// SQL that makes `current` match what the client `wanted`, given the server's own
/// defaults `original`; None when nothing differs.
pub fn sync_sql(
    wanted: &Settings,
    current: &Settings,
    original: &Settings,
) -> Option<(String, Vec<Change>)> {
    let mut sql = String::new();
    let mut changes = Vec::new();
    for (k, v) in wanted {
        if current.get(k) != Some(v) {
            // set_config takes the value as a string exactly like a startup `-c`
            // option, so list settings such as search_path=a,b keep their meaning.
            sql.push_str(&format!(
                "SELECT pg_catalog.set_config({}, {}, false);",
                quote_literal(k),
                quote_literal(v)
            ));
            changes.push((k.clone(), Some(v.clone())));
        }
    }
    for (k, v) in current {
        if wanted.contains_key(k) || !is_carried(k) {
            continue;
        }
        match original.get(k) {
            Some(orig) if orig == v => {}
            _ => {
                sql.push_str(&format!("RESET {};", quote_ident(k)));
                changes.push((k.clone(), None));
            }
        }
    }
    if sql.is_empty() {
        None
    } else {
        Some((sql, changes))
    }
}

fn quote_ident(name: &str) -> String {
    // Names were validated as [A-Za-z0-9_.]; dotted names must stay unquoted as a whole.
    name.to_string()
}

pub fn quote_literal(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('\'');
    for c in v.chars() {
        if c == '\'' {
            s.push('\'');
        }
        if c != '\0' {
            s.push(c);
        }
    }
    s.push('\'');
    if v.contains('\\') {
        format!("E{}", s.replace('\\', "\\\\"))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_cache_shares_equal_sets_and_reuses_unused_slots() {
        use std::sync::Arc;
        let cache = SettingsCache::default();
        let set = |v: &str| {
            vec![
                ("application_name".to_string(), v.to_string()),
                ("options".to_string(), "-c work_mem=8MB".to_string()),
            ]
        };
        let (a, fp_a) = cache.intern(&set("app"));
        let (b, fp_b) = cache.intern(&set("app"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(*a, startup_settings(&set("app")));
        assert_eq!(fp_a, fingerprint(&a, &RawSettings::new()));
        assert_eq!(fp_a, fp_b);
        let (c, fp_c) = cache.intern(&set("other"));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_ne!(fp_a, fp_c);
        assert_eq!(c.get("work_mem").map(String::as_str), Some("8MB"));
        // Fill the cache with sets held elsewhere; a full cache still hands out a copy.
        let held: Vec<_> = (0..SettingsCache::CAP)
            .map(|i| cache.intern(&set(&i.to_string())))
            .collect();
        let (x, _) = cache.intern(&set("x"));
        assert_eq!(x.get("application_name").map(String::as_str), Some("x"));
        drop(held);
        drop(x);
        let (y1, _) = cache.intern(&set("y"));
        let (y2, _) = cache.intern(&set("y"));
        assert!(Arc::ptr_eq(&y1, &y2), "an unused slot makes room");
    }

    fn map(kv: &[(&str, &str)]) -> Settings {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_are_parsed_like_libpq() {
        assert_eq!(
            parse_options("-c search_path=a,b --statement-timeout=5s -cTimeZone=UTC"),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("TimeZone".into(), "UTC".into())
            ]
        );
        assert_eq!(
            parse_options("-c application_name=my\\ app"),
            vec![("application_name".into(), "my app".into())]
        );
    }

    #[test]
    fn sync_sets_differences_and_resets_leftovers() {
        let original = map(&[("TimeZone", "UTC"), ("DateStyle", "ISO, MDY")]);
        let current = map(&[("TimeZone", "Europe/Paris"), ("DateStyle", "ISO, MDY")]);
        let wanted = map(&[("DateStyle", "ISO, MDY")]);
        let (sql, _) = sync_sql(&wanted, &current, &original).expect("differs");
        assert_eq!(sql, "RESET TimeZone;");
        let wanted = map(&[("TimeZone", "Europe/Paris"), ("DateStyle", "ISO, MDY")]);
        assert!(sync_sql(&wanted, &current, &original).is_none());
    }

    #[test]
    fn raw_settings_sync_and_reset() {
        let mut current = RawSettings::new();
        current.insert("work_mem".into(), "'1MB'".into());
        let mut wanted = RawSettings::new();
        wanted.insert("search_path".into(), "app, public".into());
        let sql = sync_raw_sql(&wanted, &mut current);
        assert_eq!(sql, "SET search_path TO app, public;RESET work_mem;");
        assert_eq!(current, wanted);
        assert_eq!(sync_raw_sql(&wanted, &mut current), "");
        let fp1 = fingerprint(&Settings::default(), &wanted);
        assert_ne!(fp1, fingerprint(&Settings::default(), &RawSettings::new()));
    }

    #[test]
    fn literals_cannot_break_out() {
        assert_eq!(quote_literal("a'b"), "'a''b'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
        assert!(!valid_name("x; drop table y"));
        assert!(startup_settings(&[("bad name".into(), "v".into())]).is_empty());
    }
}

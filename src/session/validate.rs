//! Startup settings (`options=-c name=value`, and parameters such as `DateStyle`) are
//! checked the way PostgreSQL checks them, on a server connection, before the client
//! is told it is in: a value PostgreSQL refuses (FATAL 22023 `invalid value for
//! parameter`, 42704 `unrecognized configuration parameter`) refuses the login with
//! PostgreSQL's own words. Otherwise a client with such settings logged in, ran with
//! the server defaults, and every transaction of it failed the settings sync and
//! discarded its server (a backend fork per transaction).
//!
//! Each setting is applied with `set_config(name, value, true)`: local to the
//! implicit transaction of the check query, so the server is left as it was. Its
//! results are the values as PostgreSQL reports them (`utf8` -> `UTF8`), which
//! transaction mode tells the client at login, as PostgreSQL would.

use crate::server::params::Settings;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{ClientError, Severity};
use crate::pool::Pool;
use crate::server::params::quote_literal;
use crate::server::{QueryOutcome, ServerConn};

/// How long the check may take; a server that does not answer in time is left to the
/// first transaction to find out about.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings sets already found good, per pool (their fingerprints); bounded.
const KNOWN_GOOD_CAP: usize = 256;

/// Settings that accept any value are not worth a round trip (PostgreSQL takes any
/// string for application_name, which many clients make unique per process).
const ANY_VALUE: &[&str] = &["application_name"];

/// The startup settings to try on a server, with their fingerprint; `None` when there is
/// nothing PostgreSQL could refuse.
pub fn to_check(settings: &Settings) -> Option<(Settings, u64)> {
    let check: Settings = settings
        .iter()
        .filter(|(k, _)| !ANY_VALUE.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if check.is_empty() {
        return None;
    }
    let fp = crate::server::params::fingerprint(&check, &Default::default());
    Some((check, fp))
}

/// Respellings PostgreSQL makes of a settings set (`utf8` -> `UTF8`).
pub type Spelled = Arc<Settings>;

/// Whether `fp`'s settings were found good on this pool before, with their spellings.
pub fn known_good(pool: &Pool, fp: u64) -> Option<Spelled> {
    pool.validated_settings.lock().get(&fp).cloned()
}

fn remember(pool: &Pool, fp: u64, spelled: Spelled) {
    let mut set = pool.validated_settings.lock();
    if set.len() >= KNOWN_GOOD_CAP {
        set.clear();
    }
    set.insert(fp, spelled);
}

/// Tries `settings` on `conn`. Err(Some): what PostgreSQL said, as the FATAL to send;
/// Err(None): the connection broke or did not answer (discard it; the first
/// transaction applies the settings).
pub async fn check(
    pool: &Pool,
    conn: &mut ServerConn,
    settings: &Settings,
    fp: u64,
) -> Result<Spelled, Option<ClientError>> {
    let mut names: Vec<_> = settings.iter().collect();
    names.sort();
    // One row: set_config returns each value as the server now reports it.
    let sql = format!(
        "SELECT {}",
        names
            .iter()
            .map(|(k, v)| format!(
                "pg_catalog.set_config({}, {}, true)",
                quote_literal(k),
                quote_literal(v)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    match conn.query_row(&sql, CHECK_TIMEOUT).await {
        Ok(QueryOutcome::Rows(row)) => {
            let spelled: Settings = names
                .iter()
                .zip(row)
                .filter_map(|((k, v), now)| {
                    let now = now?;
                    (now != **v).then(|| ((*k).clone(), now))
                })
                .collect();
            let spelled = Arc::new(spelled);
            remember(pool, fp, spelled.clone());
            Ok(spelled)
        }
        Ok(QueryOutcome::ServerError(text)) => {
            // "SQLSTATE: message", as the query reports it.
            let (code, message) = text.split_once(": ").unwrap_or(("", text.as_str()));
            Err(Some(ClientError {
                severity: Severity::Fatal,
                code: crate::server::leak_code_or(code, crate::error::sqlstate::INVALID_PARAMETER_VALUE),
                message: message.to_string(),
                hint: Some("fix the setting in the connection's options (PGOPTIONS, -c name=value) or startup parameters".into()),
            }))
        }
        Err(_) => Err(None),
    }
}

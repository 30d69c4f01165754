//! The PgBouncer-style admin console: a client that logs in to the virtual database
//! `pgsidecar` as a user with `admin: true` gets the commands `SHOW HELP` lists (SHOW
//! commands in `show.rs`, KILL / SUSPEND / SHUTDOWN in `control.rs`), answered as
//! ordinary result sets over the simple query protocol (what psql uses).

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{sqlstate, ClientError};
use crate::protocol::framing::{fe, frontend_header, SMALL_MESSAGE_LIMIT};
use crate::protocol::messages;
use crate::proxy::Shared;

/// The name of the virtual admin database.
pub const DATABASE: &str = "pgsidecar";

/// Serves an authenticated admin client until it leaves.
pub async fn serve<C>(client: &mut C, shared: Arc<Shared>, mut buf: BytesMut)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    for (k, v) in [
        ("server_version", "15.0 (pgsidecar admin)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        messages::parameter_status(&mut out, k, v);
    }
    messages::backend_key_data(&mut out, 0, 0);
    messages::ready_for_query(&mut out, b'I');
    if client.write_all(&out).await.is_err() {
        return;
    }
    loop {
        let h = match frontend_header(&buf, SMALL_MESSAGE_LIMIT) {
            Ok(Some(h)) if buf.len() >= h.frame_len() => h,
            Ok(_) => match client.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
            Err(e) => {
                let e = ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string());
                let _ = client.write_all(&e.to_bytes()).await;
                return;
            }
        };
        let mut frame = buf.split_to(h.frame_len());
        frame.advance(5);
        let mut out = BytesMut::new();
        match h.tag {
            fe::TERMINATE => return,
            fe::QUERY => {
                let text = String::from_utf8_lossy(frame.strip_suffix(b"\0").unwrap_or(&frame))
                    .into_owned();
                for stmt in text.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    // PAUSE waits for transactions in flight, so it runs apart.
                    let r = match super::pause::parse(stmt) {
                        Some(db) => super::pause::console_pause(&shared, db, &mut out).await,
                        None => run(stmt, &shared, &mut out),
                    };
                    if let Err(e) = r {
                        e.encode(&mut out);
                        break;
                    }
                }
                if text.trim().trim_matches(';').is_empty() {
                    out.extend_from_slice(&[b'I', 0, 0, 0, 4]);
                }
                messages::ready_for_query(&mut out, b'I');
            }
            fe::SYNC => messages::ready_for_query(&mut out, b'I'),
            _ => {
                ClientError::error(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the pgsidecar admin console accepts simple queries only",
                )
                .encode(&mut out);
                if h.tag != fe::FLUSH {
                    // Extended batches end with Sync, which answers ReadyForQuery above.
                }
            }
        }
        if client.write_all(&out).await.is_err() {
            return;
        }
    }
}

fn rows(out: &mut BytesMut, columns: &[&str], data: Vec<Vec<String>>, tag: &str) {
    messages::row_description(out, columns);
    let n = data.len();
    for r in data {
        let vals: Vec<Option<String>> = r.into_iter().map(Some).collect();
        messages::data_row(out, &vals);
    }
    messages::command_complete(out, &format!("{tag} {n}"));
}

fn run(stmt: &str, shared: &Arc<Shared>, out: &mut BytesMut) -> Result<(), ClientError> {
    let words: Vec<String> = stmt
        .split_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let arg = stmt
        .split_whitespace()
        .nth(1)
        .map(|s| s.trim_matches('"').to_string());
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let reg = &shared.registry;
    match w.as_slice() {
        ["SHOW", what] if super::show::run(what, shared, out) => {}
        ["KILL"] | ["KILL", _] | ["SUSPEND"] | ["SHUTDOWN"] => {
            super::control::run(w[0], arg.as_deref(), shared, out)?
        }
        ["SHOW", "CLIENTS"] => {
            let data = shared
                .client_list
                .all()
                .iter()
                .map(|c| {
                    let pid = c.server_pid.load(std::sync::atomic::Ordering::Relaxed);
                    vec![
                        c.id.to_string(),
                        c.user.to_string(),
                        c.database.to_string(),
                        c.state_name().into(),
                        c.addr.to_string(),
                        c.application_name.to_string(),
                        format!("{:.1}", c.connected.elapsed().as_secs_f64()),
                        if pid == 0 {
                            String::new()
                        } else {
                            pid.to_string()
                        },
                        // Transaction mode: holds its server for session state.
                        c.pinned
                            .load(std::sync::atomic::Ordering::Relaxed)
                            .to_string(),
                    ]
                })
                .collect();
            rows(
                out,
                &[
                    "id",
                    "user",
                    "database",
                    "state",
                    "addr",
                    "application_name",
                    "connected_secs",
                    "server_pid",
                    "pinned",
                ],
                data,
                "SHOW",
            );
        }
        ["SHOW", "VERSION"] => rows(
            out,
            &["version"],
            vec![vec![format!("pgsidecar {}", env!("CARGO_PKG_VERSION"))]],
            "SHOW",
        ),
        ["SHOW", "HELP"] | ["SHOW"] => rows(
            out,
            &["command"],
            [
                "SHOW POOLS",
                "SHOW CLIENTS",
                "SHOW SERVERS",
                "SHOW DATABASES",
                "SHOW USERS",
                "SHOW STATS",
                "SHOW STATS_TOTALS",
                "SHOW STATS_AVERAGES",
                "SHOW LISTS",
                "SHOW MEM",
                "SHOW CONFIG",
                "SHOW VERSION",
                "PAUSE [db]",
                "RESUME [db]",
                "KILL [db]",
                "SUSPEND",
                "SHUTDOWN",
                "RELOAD",
            ]
            .iter()
            .map(|s| vec![s.to_string()])
            .collect(),
            "SHOW",
        ),
        ["PAUSE"] | ["PAUSE", _] | ["RESUME"] | ["RESUME", _] => {
            let resume = w[0] == "RESUME";
            if resume && shared.lifecycle.is_draining() {
                return Err(ClientError::error(
                    sqlstate::ADMIN_SHUTDOWN,
                    "cannot RESUME while shutting down",
                ));
            }
            let targets: Vec<_> = reg
                .all()
                .into_iter()
                .filter(|p| arg.as_deref().is_none_or(|db| p.key.database == db))
                .collect();
            if targets.is_empty() && arg.is_some() {
                return Err(ClientError::error(
                    sqlstate::INVALID_CATALOG_NAME,
                    format!("no pool for database {:?}", arg.unwrap_or_default()),
                ));
            }
            for p in targets {
                if resume {
                    p.resume()
                } else {
                    p.pause()
                }
            }
            messages::command_complete(out, w[0]);
        }
        ["RELOAD"] => match shared.lifecycle.reload() {
            Ok(()) => messages::command_complete(out, "RELOAD"),
            Err(e) => {
                return Err(ClientError::error(
                    sqlstate::INTERNAL_ERROR,
                    format!("RELOAD failed, the previous configuration stays in force: {e}"),
                ))
            }
        },
        _ => {
            return Err(ClientError::error(
                sqlstate::SYNTAX_ERROR,
                format!("unknown admin command {stmt:?}; try SHOW HELP"),
            ))
        }
    }
    Ok(())
}

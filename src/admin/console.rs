//! The PgBouncer-style admin console: a client that logs in to the virtual database
//! `pgsidecar` as a user with `admin: true` gets the commands `SHOW HELP` lists (SHOW
//! commands in `show.rs`, KILL / SUSPEND / SHUTDOWN in `commands.rs`), answered as
//! ordinary result sets over the simple query protocol (what psql uses).

use std::future::Future;
use std::pin::Pin;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Admin;
use crate::error::{sqlstate, ClientError};
use crate::protocol::framing::{fe, frontend_header, SMALL_MESSAGE_LIMIT};
use crate::protocol::messages;
use crate::session::{ClientStream, Console};

/// The name of the virtual admin database.
pub const DATABASE: &str = "pgsidecar";

impl Console for Admin {
    fn database(&self) -> &str {
        DATABASE
    }

    fn serve<'a>(
        &'a self,
        client: &'a mut dyn ClientStream,
        leftover: BytesMut,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(serve(client, self, leftover))
    }
}

/// Serves an authenticated admin client until it leaves.
pub async fn serve<C>(client: &mut C, admin: &Admin, mut buf: BytesMut)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
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
                        Some(db) => super::pause::console_pause(admin, db, &mut out).await,
                        None => run(stmt, admin, &mut out),
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

fn run(stmt: &str, admin: &Admin, out: &mut BytesMut) -> Result<(), ClientError> {
    let words: Vec<String> = stmt
        .split_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let arg = stmt
        .split_whitespace()
        .nth(1)
        .map(|s| s.trim_matches('"').to_string());
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["SHOW", what] if super::show::run(what, &admin.stats, out) => {}
        ["KILL"] | ["KILL", _] | ["SUSPEND"] | ["SHUTDOWN"] => {
            super::commands::run(w[0], arg.as_deref(), &admin.control, out)?
        }
        ["SHOW", "CLIENTS"] => show_clients(admin, out),
        ["SHOW", "VERSION"] => rows(
            out,
            &["version"],
            vec![vec![format!("pgsidecar {}", env!("CARGO_PKG_VERSION"))]],
            "SHOW",
        ),
        ["SHOW", "HELP"] | ["SHOW"] => show_help(out),
        ["RESUME"] | ["RESUME", _] => {
            admin.control.resume(arg.as_deref())?;
            messages::command_complete(out, "RESUME");
        }
        ["RELOAD"] => match admin.control.reload() {
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

fn show_clients(admin: &Admin, out: &mut BytesMut) {
    let data = admin
        .stats
        .clients()
        .iter()
        .map(|c| {
            let pid = c.server_pid();
            vec![
                c.id().to_string(),
                c.user().to_string(),
                c.database().to_string(),
                c.state_name().into(),
                c.addr().to_string(),
                c.application_name().to_string(),
                format!("{:.1}", c.connected().elapsed().as_secs_f64()),
                if pid == 0 {
                    String::new()
                } else {
                    pid.to_string()
                },
                c.pinned().to_string(),
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

fn show_help(out: &mut BytesMut) {
    rows(
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
    );
}

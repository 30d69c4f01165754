//! The console's process-control commands beyond PAUSE / RESUME / RELOAD.
//!
//! - `KILL [db]`: pauses the database's pools (new work waits for RESUME, as in
//!   PgBouncer), closes their idle server connections, and ends every client of that
//!   database (all databases without an argument) at once with FATAL 57P01; servers
//!   those clients held are closed, not reused.
//! - `SUSPEND`: pauses every pool; clients finish their transactions and new ones wait
//!   for `RESUME`. PgBouncer also stops reading sockets for an online restart with
//!   socket hand-over, which pgsidecar does not do (roll pods instead).
//! - `SHUTDOWN`: the graceful shutdown SIGTERM starts (drain, then exit 0).

use std::sync::Arc;

use bytes::BytesMut;

use crate::error::{sqlstate, ClientError};
use crate::protocol::messages;
use crate::proxy::Shared;

pub fn run(
    cmd: &str,
    db: Option<&str>,
    shared: &Arc<Shared>,
    out: &mut BytesMut,
) -> Result<(), ClientError> {
    match cmd {
        "KILL" => kill(db, shared)?,
        "SUSPEND" => {
            for p in shared.registry.all() {
                p.pause();
            }
        }
        _ => {
            tracing::info!("SHUTDOWN from the admin console");
            shared.lifecycle.request_shutdown();
        }
    }
    messages::command_complete(out, cmd);
    Ok(())
}

fn kill(db: Option<&str>, shared: &Arc<Shared>) -> Result<(), ClientError> {
    let pools: Vec<_> = shared
        .registry
        .all()
        .into_iter()
        .filter(|p| db.is_none_or(|d| p.key.database == d))
        .collect();
    let clients: Vec<_> = shared
        .client_list
        .all()
        .into_iter()
        .filter(|c| db.is_none_or(|d| &*c.database == d))
        .collect();
    if let Some(d) = db.filter(|_| pools.is_empty() && clients.is_empty()) {
        return Err(ClientError::error(
            sqlstate::INVALID_CATALOG_NAME,
            format!("no pool or client for database {d:?}"),
        ));
    }
    for p in &pools {
        p.pause();
        p.reconnect();
    }
    for c in &clients {
        c.kill();
    }
    tracing::info!(
        database = db.unwrap_or("(all)"),
        clients = clients.len(),
        "KILL from the admin console"
    );
    Ok(())
}

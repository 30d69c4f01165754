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

use bytes::BytesMut;

use crate::control::Control;
use crate::error::ClientError;
use crate::protocol::messages;

pub fn run(
    cmd: &str,
    db: Option<&str>,
    control: &Control,
    out: &mut BytesMut,
) -> Result<(), ClientError> {
    match cmd {
        "KILL" => {
            let clients = control.kill(db)?;
            tracing::info!(
                database = db.unwrap_or("(all)"),
                clients,
                "KILL from the admin console"
            );
        }
        "SUSPEND" => control.suspend(),
        _ => {
            tracing::info!("SHUTDOWN from the admin console");
            control.shutdown();
        }
    }
    messages::command_complete(out, cmd);
    Ok(())
}

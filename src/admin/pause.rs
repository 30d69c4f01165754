//! PAUSE as PgBouncer does it: new checkouts queue, and the command returns once the
//! transactions in flight have finished and given their servers back (within
//! `admin.pause_timeout`; the pools stay paused if it passes).

use crate::error::ClientError;

/// The database a console `PAUSE [db]` names, or `None` for another command.
pub fn parse(stmt: &str) -> Option<Option<String>> {
    let mut words = stmt.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("PAUSE") {
        return None;
    }
    let db = words.next().map(|s| s.trim_matches('"').to_string());
    words.next().is_none().then_some(db)
}

/// Console PAUSE: pauses the pools of `db` (all without one) and waits.
pub async fn console_pause(
    admin: &super::Admin,
    db: Option<String>,
    out: &mut bytes::BytesMut,
) -> Result<(), ClientError> {
    admin.control.pause(db.as_deref()).await?;
    crate::protocol::messages::command_complete(out, "PAUSE");
    Ok(())
}

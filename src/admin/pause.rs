//! PAUSE as PgBouncer does it: new checkouts queue, and the command returns once the
//! transactions in flight have finished and given their servers back (within
//! `admin.pause_timeout`; the pools stay paused if it passes).

use std::sync::Arc;
use std::time::Duration;

use crate::error::{sqlstate, ClientError};
use crate::pool::Pool;

/// Pauses `pools` and waits until none holds a server out on a transaction.
pub async fn pause_and_wait(pools: &[Arc<Pool>], timeout: Duration) -> Result<(), ClientError> {
    for p in pools {
        p.pause();
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let busy: usize = pools.iter().map(|p| p.snapshot().active_servers).sum();
        if busy == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ClientError::error(
                sqlstate::QUERY_CANCELED,
                format!(
                    "pgsidecar: PAUSE gave up waiting after admin.pause_timeout ({timeout:?}): {busy} server connections are still in use; the pools stay paused"
                ),
            )
            .with_hint("run PAUSE again to keep waiting, or RESUME"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

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
    shared: &crate::proxy::Shared,
    db: Option<String>,
    out: &mut bytes::BytesMut,
) -> Result<(), ClientError> {
    let targets: Vec<_> = shared
        .registry
        .all()
        .into_iter()
        .filter(|p| db.as_deref().is_none_or(|d| p.key.database == d))
        .collect();
    if targets.is_empty() && db.is_some() {
        return Err(ClientError::error(
            sqlstate::INVALID_CATALOG_NAME,
            format!("no pool for database {:?}", db.unwrap_or_default()),
        ));
    }
    let timeout = shared.registry.config().admin.pause_timeout;
    pause_and_wait(&targets, timeout).await?;
    crate::protocol::messages::command_complete(out, "PAUSE");
    Ok(())
}

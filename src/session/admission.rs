//! The client cap (`limits.max_client_conn`), applied as PostgreSQL applies its own:
//! after the startup packet, so an SSLRequest is answered first (libpq, which drops
//! errors sent in reply to an SSLRequest, then reads "too many clients") and a
//! CancelRequest is always served (a client at the cap can stop its runaway query).
//! Connections that have not sent a startup packet yet do not count; they have
//! `limits.client_startup_timeout` to send one.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Shared;
use crate::error::{sqlstate, ClientError};

/// One place under `max_client_conn`, given back on drop however the session ends.
pub struct LoginSlot(Arc<Shared>);

impl Drop for LoginSlot {
    fn drop(&mut self) {
        self.0.logins.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes a place for a client that sent its startup packet, or refuses it with
/// PostgreSQL's FATAL 53300.
pub fn admit(shared: &Arc<Shared>) -> Result<LoginSlot, ClientError> {
    let max = shared.registry.config().limits.max_client_conn;
    let n = shared.logins.fetch_add(1, Ordering::Relaxed) + 1;
    let slot = LoginSlot(shared.clone());
    if n > max {
        drop(slot);
        return Err(ClientError::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!("sorry, too many clients already (limits.max_client_conn = {max})"),
        ));
    }
    Ok(slot)
}

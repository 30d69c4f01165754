//! pgsidecar: a PostgreSQL sidecar proxy with session and transaction pooling.
//!
//! # Layout
//! - `protocol`: wire framing, the messages the proxy says or reads, startup packets.
//! - `auth`: verifying client passwords (md5, SCRAM-SHA-256).
//! - `config`: `proxy.yaml`, env expansion, validation; `cli`: command line.
//! - `server`: one connection to PostgreSQL (login, parameters, prepared-statement cache).
//! - `pool`: per (database, user) pools with a FIFO wait queue; `pool::registry` holds them.
//! - `session`: one client: login, then the relay that forwards frames and binds servers.
//! - `cancel`: the proxy's cancel keys and their forwarding.
//! - `proxy`: the listener.

pub mod admin;
pub mod auth;
pub mod cancel;
pub mod cancel_limit;
pub mod circuit;
pub mod cli;
pub mod clients;
pub mod config;
pub mod daemon;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod lifecycle;
pub mod limits;
pub mod logfmt;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod session;
pub mod tls;

//! pgsidecar: a PostgreSQL sidecar proxy with session and transaction pooling.
//!
//! # Layout
//! Dependencies point one way: `app` -> `proxy` (listener) / `admin` -> `control` ->
//! `session` -> `pool` -> `server` -> `protocol`; `config` is data every layer reads.
//! `tests/check_structure.py` (run by the test command) keeps it so.
//!
//! - `app`: the process: starts the listener and the admin port, installs the admin
//!   console, handles signals, reload and drain.
//! - `proxy`: the listener: accepts clients, counts them, spawns a session per client.
//! - `admin`: the HTTP admin port and the PgBouncer-style console, through `control`.
//! - `control`: `Stats` (read) and `Control` (pause, resume, reconnect, kill, reload,
//!   shutdown), the only way the admin surfaces see or change the running proxy.
//! - `session`: one client: login, then the relay that forwards frames and binds servers;
//!   `session::Shared` is what all sessions share.
//! - `clients`: the list of connected clients and what each is doing.
//! - `limits`: per-database and per-user client caps.
//! - `cancel`, `cancel_limit`: cancel keys, their forwarding, a per-source rate limit.
//! - `pool`: per (database, user) pools: checkout and wait queue, sizing, congestion
//!   control, breaker, health checks; `pool::registry` holds them.
//! - `server`: one connection to PostgreSQL (hosts, login, parameters, prepared
//!   statements, queries of its own).
//! - `tls`: certificates read into the client acceptor and the upstream connector.
//! - `auth`: verifying client passwords (md5, SCRAM-SHA-256).
//! - `protocol`: wire framing, the messages the proxy says or reads, startup packets.
//! - `config`: `proxy.yaml` as data: sections, env expansion, validation; `cli`: the
//!   command line that builds it.
//! - `lifecycle`: start, drain and reload phases; `metrics`: the Prometheus registry;
//!   `logfmt`: the JSON log format; `error`: client-visible errors and SQLSTATEs.
//! - `fuzzing`: entry points the fuzz targets and their replay tests share.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod cancel;
pub mod cancel_limit;
pub mod cli;
pub mod clients;
pub mod config;
pub mod control;
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

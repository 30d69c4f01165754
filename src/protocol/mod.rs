//! The Postgres v3 wire protocol as far as the proxy needs it.
//!
//! `framing` knows message boundaries and size caps, `messages` builds what the proxy itself
//! says and reads the few message bodies it must understand, `startup` reads the untyped
//! packets that open a connection.

pub mod framing;
pub mod messages;
pub mod startup;

//! The PgBouncer-style admin console (virtual database `pgsidecar`); filled in below.

//! SQLSTATEs received from PostgreSQL, as the static codes `ClientError` carries.

use crate::error::sqlstate;

/// SQLSTATEs are five ASCII characters; map a received one onto our static table so
/// `ClientError` can keep `&'static str` codes without leaking memory.
pub(crate) fn leak_code(code: &str) -> &'static str {
    leak_code_or(code, sqlstate::CONNECTION_FAILURE)
}

/// As [`leak_code`], with `default` for a code not in the table.
pub(crate) fn leak_code_or(code: &str, default: &'static str) -> &'static str {
    const KNOWN: &[&str] = &[
        "28P01", "28000", "3D000", "53300", "57P03", "57P01", "08006", "08P01", "42501", "0A000",
        "53100", "53200", "XX000", "55000", "42704", "22023", "22P02", "55P02", "42602",
    ];
    KNOWN
        .iter()
        .copied()
        .find(|k| *k == code)
        .unwrap_or(default)
}

/// The SQLSTATE of a refused login from a [`super::ConnectError`]'s text (the `Server`
/// variant's Display), for outcomes that keep only the text (probes).
pub(crate) fn refused_code_in(text: &str) -> Option<&str> {
    let code = text.strip_prefix("server refused the login: ")?.get(..5)?;
    code.bytes()
        .all(|b| b.is_ascii_alphanumeric())
        .then_some(code)
}

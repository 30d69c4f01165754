//! Proxy-side (server role) verification of client passwords.
//!
//! Everything here is pure and I/O-free: the session code feeds in the bytes it
//! read from the client and writes back what we return. Errors are for logging
//! only; the client must always get the same generic "password authentication
//! failed" answer whatever went wrong, so that failures are indistinguishable.

pub mod md5;
pub mod scram;

pub use self::md5::{md5_salt, verify_cleartext, verify_md5};
pub use self::scram::{mock_server_for, ScramError, ScramServer, ScramVerifier};

use std::fmt;

use subtle::ConstantTimeEq;

/// What the config holds for a user.
#[derive(Clone)]
pub enum Secret {
    /// A plaintext password.
    Plain(String),
    /// An `md5<32 lowercase hex>` hash, i.e. `md5(password || username)`.
    Md5Hash([u8; 16]),
    /// A SCRAM-SHA-256 verifier in the pg_authid format.
    Scram(ScramVerifier),
}

/// Error from [`Secret::parse_strict`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error(
        "stored secret starts with \"SCRAM-SHA-256$\" but is not a valid SCRAM-SHA-256 verifier"
    )]
    MalformedScram,
}

impl Secret {
    /// Detects the format the way PostgreSQL's `get_password_type` does:
    /// `md5` + 32 lowercase hex digits is an MD5 hash, a valid
    /// `SCRAM-SHA-256$...` verifier is SCRAM, anything else is a plaintext
    /// password - including a *malformed* verifier, which PostgreSQL also
    /// treats as plaintext. Config loaders should prefer [`Secret::parse_strict`]
    /// so that a typo in a verifier does not turn the verifier string itself
    /// into a usable password.
    pub fn parse(stored: &str) -> Secret {
        if let Some(hash) = parse_md5_hash(stored) {
            return Secret::Md5Hash(hash);
        }
        if let Some(verifier) = ScramVerifier::parse(stored) {
            return Secret::Scram(verifier);
        }
        Secret::Plain(stored.to_owned())
    }

    /// Like [`Secret::parse`], but a string that claims to be a SCRAM verifier
    /// and does not parse (bad base64, wrong key length, iteration count out of
    /// range, ...) is an error instead of a plaintext password.
    pub fn parse_strict(stored: &str) -> Result<Secret, SecretError> {
        match Secret::parse(stored) {
            Secret::Plain(_) if stored.starts_with(scram::VERIFIER_PREFIX) => {
                Err(SecretError::MalformedScram)
            }
            secret => Ok(secret),
        }
    }

    /// Short, secret-free name of the format, for logs and config validation.
    pub fn kind(&self) -> &'static str {
        match self {
            Secret::Plain(_) => "plain",
            Secret::Md5Hash(_) => "md5",
            Secret::Scram(_) => "scram-sha-256",
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `md5` followed by exactly 32 lowercase hex digits (PostgreSQL's
/// MD5_PASSWD_CHARSET is lowercase only; anything else is a plaintext password).
fn parse_md5_hash(stored: &str) -> Option<[u8; 16]> {
    let hex = stored.strip_prefix("md5")?.as_bytes();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let [hi, lo] = pair else { return None };
        *byte = (lower_hex_value(*hi)? << 4) | lower_hex_value(*lo)?;
    }
    Some(out)
}

fn lower_hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Lowercase hex, as PostgreSQL writes MD5 digests.
pub(crate) fn to_lower_hex<const N: usize>(bytes: &[u8; N]) -> Vec<u8> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(2 * N);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0x0f)]);
    }
    out
}

/// Constant-time equality of the contents (the lengths are not secret: a length
/// mismatch returns false immediately).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_detects_formats() {
        assert!(matches!(
            Secret::parse("md590a5cf0bcc432258dac4326b0aa1ff09"),
            Secret::Md5Hash(h) if h[0] == 0x90 && h[15] == 0x09
        ));
        // Uppercase hex, wrong length or non-hex: PostgreSQL says plaintext.
        for plain in [
            "md590A5CF0BCC432258DAC4326B0AA1FF09",
            "md590a5cf0bcc432258dac4326b0aa1ff0",
            "md590a5cf0bcc432258dac4326b0aa1ff0g",
            "md5",
            "",
            "hunter2",
            "SCRAM-SHA-256$",
        ] {
            assert!(
                matches!(Secret::parse(plain), Secret::Plain(ref p) if p == plain),
                "{plain:?}"
            );
        }
        let v = "SCRAM-SHA-256$4096:3A7RKauErQHUnHjP7mmz3g==$DJVAB7HR5XDg2xVWb5hD/YVri18dr5eVSNvK2dWUL7M=:D/LUBu1X4Vad8kZgwtsjn9uaxkpSjHf0LdNZBTiPAtE=";
        assert!(matches!(Secret::parse(v), Secret::Scram(_)));
        assert_eq!(Secret::parse(v).kind(), "scram-sha-256");
    }

    #[test]
    fn parse_strict_rejects_malformed_verifier() {
        let bad = "SCRAM-SHA-256$4096:3A7RKauErQHUnHjP7mmz3g==$DJVAB7HR5XDg2xVWb5hD:D/LUBu1X4Vad8kZgwtsjn9uaxkpSjHf0LdNZBTiPAtE=";
        assert!(matches!(Secret::parse(bad), Secret::Plain(_)));
        assert_eq!(
            Secret::parse_strict(bad).err(),
            Some(SecretError::MalformedScram)
        );
        assert!(matches!(
            Secret::parse_strict("hunter2"),
            Ok(Secret::Plain(_))
        ));
    }

    #[test]
    fn debug_is_redacted() {
        let secrets = [
            Secret::parse("hunter2"),
            Secret::parse("md590a5cf0bcc432258dac4326b0aa1ff09"),
            Secret::Scram(ScramVerifier::from_password("hunter2", b"salt", 1)),
        ];
        for s in &secrets {
            let dbg = format!("{s:?}");
            assert_eq!(dbg, "Secret(<redacted>)");
        }
    }

    #[test]
    fn ct_eq() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}

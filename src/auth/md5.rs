//! MD5 challenge-response and cleartext password checks, server side.
//!
//! Both take the PasswordMessage payload with or without its trailing NUL.
//! Empty passwords never authenticate: PostgreSQL refuses to store one and
//! rejects an empty password from the client.

use ::md5::{Digest, Md5};
use rand::RngCore;
use sha2::Sha256;

use super::{constant_time_eq, to_lower_hex, Secret};

/// Random salt for AuthenticationMD5Password.
pub fn md5_salt() -> [u8; 4] {
    let mut salt = [0u8; 4];
    rand::rng().fill_bytes(&mut salt);
    salt
}

/// Checks `"md5" + hex(md5(hex(md5(password + user)) + salt))`, the response to
/// AuthenticationMD5Password. `user` is the role name from the startup packet.
/// Always false for SCRAM secrets: MD5 cannot be verified from a verifier.
pub fn verify_md5(secret: &Secret, user: &str, salt: [u8; 4], client_response: &[u8]) -> bool {
    let inner = match secret {
        Secret::Plain(password) if !password.is_empty() => {
            md5_hex(&[password.as_bytes(), user.as_bytes()])
        }
        Secret::Md5Hash(hash) => to_lower_hex(hash),
        Secret::Plain(_) | Secret::Scram(_) => return false,
    };
    let mut expected = b"md5".to_vec();
    expected.extend_from_slice(&md5_hex(&[&inner, &salt]));
    constant_time_eq(&expected, strip_nul(client_response))
}

/// Checks a password sent in the clear (AuthenticationCleartextPassword).
/// `Scram` costs one PBKDF2 run with the verifier's iteration count.
pub fn verify_cleartext(secret: &Secret, user: &str, password: &[u8]) -> bool {
    let password = strip_nul(password);
    if password.is_empty() {
        return false;
    }
    match secret {
        // Compare digests so the timing does not reveal the password's length.
        Secret::Plain(stored) => constant_time_eq(
            &Sha256::digest(stored.as_bytes()),
            &Sha256::digest(password),
        ),
        Secret::Md5Hash(hash) => {
            let computed = md5_digest(&[password, user.as_bytes()]);
            constant_time_eq(&computed, hash)
        }
        Secret::Scram(verifier) => verifier.matches_password(password),
    }
}

/// A PasswordMessage is a C string; accept the payload with or without its NUL.
fn strip_nul(bytes: &[u8]) -> &[u8] {
    bytes.strip_suffix(&[0]).unwrap_or(bytes)
}

fn md5_digest(parts: &[&[u8]]) -> [u8; 16] {
    let mut md5 = Md5::new();
    for part in parts {
        md5.update(part);
    }
    md5.finalize().into()
}

fn md5_hex(parts: &[&[u8]]) -> Vec<u8> {
    to_lower_hex(&md5_digest(parts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::ScramVerifier;
    use postgres_protocol::authentication::md5_hash;

    /// `CREATE ROLE c PASSWORD 'postgres'` with password_encryption = md5 in PostgreSQL 15.
    const PG_MD5_C_POSTGRES: &str = "md590a5cf0bcc432258dac4326b0aa1ff09";

    fn response(user: &str, password: &str, salt: [u8; 4]) -> Vec<u8> {
        md5_hash(user.as_bytes(), password.as_bytes(), salt).into_bytes()
    }

    #[test]
    fn md5_against_postgres_protocol() {
        let plain = Secret::Plain("password".into());
        let hashed = Secret::parse(&postgres_protocol::password::md5(b"password", "md5_user"));
        assert!(matches!(hashed, Secret::Md5Hash(_)));
        for _ in 0..20 {
            let salt = md5_salt();
            let good = response("md5_user", "password", salt);
            for secret in [&plain, &hashed] {
                assert!(verify_md5(secret, "md5_user", salt, &good));
                // Trailing NUL as sent on the wire.
                let mut with_nul = good.clone();
                with_nul.push(0);
                assert!(verify_md5(secret, "md5_user", salt, &with_nul));

                assert!(!verify_md5(
                    secret,
                    "md5_user",
                    salt,
                    &response("md5_user", "passwore", salt)
                ));
                let other_salt = [salt[0] ^ 1, salt[1], salt[2], salt[3]];
                assert!(!verify_md5(secret, "md5_user", other_salt, &good));
                assert!(!verify_md5(
                    secret,
                    "md5_user",
                    salt,
                    &good[..good.len() - 1]
                ));
                assert!(!verify_md5(secret, "md5_user", salt, b""));
                assert!(!verify_md5(
                    secret,
                    "md5_user",
                    salt,
                    &good.to_ascii_uppercase()
                ));
            }
        }
        // A Plain secret is hashed with the role name; an Md5Hash already has it baked in.
        let salt = md5_salt();
        assert!(!verify_md5(
            &plain,
            "other",
            salt,
            &response("md5_user", "password", salt)
        ));

        // Known vector from postgres-protocol.
        let salt = [0x2a, 0x3d, 0x8f, 0xe0];
        assert!(verify_md5(
            &plain,
            "md5_user",
            salt,
            b"md562af4dd09bbb41884907a838a3233294"
        ));
    }

    #[test]
    fn md5_hash_written_by_postgres() {
        let secret = Secret::parse(PG_MD5_C_POSTGRES);
        let salt = [1, 2, 3, 4];
        assert!(verify_md5(
            &secret,
            "c",
            salt,
            &response("c", "postgres", salt)
        ));
        assert!(verify_cleartext(&secret, "c", b"postgres"));
        assert!(!verify_cleartext(&secret, "d", b"postgres"));
    }

    #[test]
    fn md5_never_verifies_scram_or_empty() {
        let salt = md5_salt();
        let scram = Secret::Scram(ScramVerifier::from_password("pw", b"salt", 1));
        assert!(!verify_md5(&scram, "u", salt, &response("u", "pw", salt)));
        let empty = Secret::Plain(String::new());
        assert!(!verify_md5(&empty, "u", salt, &response("u", "", salt)));
    }

    #[test]
    fn cleartext() {
        let plain = Secret::Plain("hunter2".into());
        let hashed = Secret::parse(&postgres_protocol::password::md5(b"hunter2", "bob"));
        let scram = Secret::Scram(ScramVerifier::from_password("hunter2", b"some salt", 64));
        for secret in [&plain, &hashed, &scram] {
            assert!(
                verify_cleartext(secret, "bob", b"hunter2"),
                "{}",
                secret.kind()
            );
            assert!(
                verify_cleartext(secret, "bob", b"hunter2\0"),
                "{}",
                secret.kind()
            );
            assert!(
                !verify_cleartext(secret, "bob", b"hunter3"),
                "{}",
                secret.kind()
            );
            assert!(
                !verify_cleartext(secret, "bob", b"hunter"),
                "{}",
                secret.kind()
            );
            assert!(!verify_cleartext(secret, "bob", b""), "{}", secret.kind());
            assert!(!verify_cleartext(secret, "bob", b"\0"), "{}", secret.kind());
            assert!(
                !verify_cleartext(secret, "bob", b"\xff\xfe"),
                "{}",
                secret.kind()
            );
        }
        assert!(!verify_cleartext(&Secret::Plain(String::new()), "bob", b""));
        assert!(!verify_cleartext(
            &Secret::Plain(String::new()),
            "bob",
            b"\0"
        ));
    }

    #[test]
    fn cleartext_against_generated_scram_verifier() {
        let v = ScramVerifier::from_password("correct horse", b"0123456789abcdef", 4096);
        let secret = Secret::parse(&v.to_string_pg());
        assert!(verify_cleartext(&secret, "u", b"correct horse"));
        assert!(!verify_cleartext(&secret, "u", b"correct horsf"));
        // SASLprep applies to cleartext too: NBSP maps to a plain space.
        assert!(verify_cleartext(
            &secret,
            "u",
            "correct\u{A0}horse".as_bytes()
        ));
    }
}

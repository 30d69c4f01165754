//! Server side of SCRAM-SHA-256 (RFC 5802 / RFC 7677) as PostgreSQL does it.
//!
//! No channel binding is offered (only the `SCRAM-SHA-256` mechanism, never
//! `-PLUS`), so the gs2 header must be `n,,` or `y,,`. As in PostgreSQL, the
//! username in client-first-message is ignored (the startup packet names the
//! role) and messages are handled as bytes, not required to be UTF-8.
//!
//! Crypto primitives come from `hmac`, `sha2`, `pbkdf2` and `subtle`; only the
//! message handling lives here.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::Secret;

/// SASL mechanism name to advertise in AuthenticationSASL.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// Prefix of a verifier in the pg_authid format.
pub const VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";
/// PostgreSQL's default `scram_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// PostgreSQL's SCRAM_DEFAULT_SALT_LEN.
pub const DEFAULT_SALT_LEN: usize = 16;
/// Verifiers claiming more iterations are rejected: each login runs PBKDF2
/// with this count, so an absurd value in the config would be a self-DoS.
pub const MAX_ITERATIONS: u32 = 1_000_000;
/// PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH; longer SASL messages are rejected.
pub const MAX_MESSAGE_LEN: usize = 65535;
/// PostgreSQL's SCRAM_RAW_NONCE_LEN.
const SERVER_NONCE_RAW_LEN: usize = 18;
const KEY_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Why a SCRAM exchange failed. For logs only: the client must get the same
/// generic authentication failure whatever the variant. Never contains secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("client selected SCRAM-SHA-256-PLUS (channel binding), which is not offered")]
    ChannelBindingUnsupported,
    #[error("client requires an unsupported SCRAM extension")]
    UnsupportedExtension,
    #[error("client uses an authorization identity, which is not supported")]
    AuthzidUnsupported,
    #[error(
        "channel-binding attribute in client-final-message does not match client-first-message"
    )]
    ChannelBindingMismatch,
    #[error("nonce in client-final-message does not match")]
    NonceMismatch,
    #[error("SCRAM client proof does not match")]
    ProofMismatch,
    #[error("SCRAM message received in the wrong state")]
    InvalidState,
}

/// A SCRAM-SHA-256 verifier: what PostgreSQL stores in `pg_authid.rolpassword`.
#[derive(Clone)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; KEY_LEN],
    pub server_key: [u8; KEY_LEN],
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The keys let an attacker impersonate the server; keep them out of logs.
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .finish_non_exhaustive()
    }
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>`.
    /// Rejects an empty salt, keys that are not 32 bytes, and iteration counts
    /// outside `1..=MAX_ITERATIONS`.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix(VERIFIER_PREFIX)?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored_key, server_key) = keys.split_once(':')?;

        // Digits only: u32::from_str would also accept a leading '+'.
        if iterations.is_empty() || !iterations.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let iterations: u32 = iterations.parse().ok()?;
        if !(1..=MAX_ITERATIONS).contains(&iterations) {
            return None;
        }
        let salt = STANDARD.decode(salt).ok()?;
        if salt.is_empty() {
            return None;
        }
        Some(Self {
            iterations,
            salt,
            stored_key: decode_key(stored_key)?,
            server_key: decode_key(server_key)?,
        })
    }

    /// Derives the verifier like PostgreSQL's `scram_build_secret` (SASLprep,
    /// then PBKDF2-HMAC-SHA-256). An iteration count of 0 is treated as 1.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        Self::from_password_bytes(password.as_bytes(), salt, iterations)
    }

    /// Random 16-byte salt, 4096 iterations (PostgreSQL's defaults).
    pub fn generate(password: &str) -> Self {
        let mut salt = [0u8; DEFAULT_SALT_LEN];
        rand::rng().fill_bytes(&mut salt);
        Self::from_password(password, &salt, DEFAULT_ITERATIONS)
    }

    /// The pg_authid format, as accepted by [`ScramVerifier::parse`].
    pub fn to_string_pg(&self) -> String {
        format!(
            "{VERIFIER_PREFIX}{}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key)
        )
    }

    pub(crate) fn from_password_bytes(password: &[u8], salt: &[u8], iterations: u32) -> Self {
        let iterations = iterations.max(1);
        let salted = salted_password(password, salt, iterations);
        let client_key = hmac_sha256(&salted, &[b"Client Key"]);
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac_sha256(&salted, &[b"Server Key"]),
        }
    }

    /// Whether `password` produces this verifier's keys (PostgreSQL's
    /// `scram_verify_plain_password`, which checks ServerKey; we check both).
    pub(crate) fn matches_password(&self, password: &[u8]) -> bool {
        let candidate = Self::from_password_bytes(password, &self.salt, self.iterations);
        let same = candidate.stored_key.ct_eq(&self.stored_key)
            & candidate.server_key.ct_eq(&self.server_key);
        same.into()
    }
}

fn decode_key(b64: &str) -> Option<[u8; KEY_LEN]> {
    STANDARD.decode(b64).ok()?.try_into().ok()
}

/// SASLprep as PostgreSQL's `pg_saslprep` applies it: ASCII is used as is; if
/// the password is not UTF-8, is prohibited, or maps to nothing, the raw bytes
/// are used instead (PostgreSQL passwords need not be valid SASL strings).
fn saslprep(password: &[u8]) -> Cow<'_, [u8]> {
    if password.is_ascii() {
        return Cow::Borrowed(password);
    }
    let Ok(s) = std::str::from_utf8(password) else {
        return Cow::Borrowed(password);
    };
    match stringprep::saslprep(s) {
        Ok(prepared) if !prepared.is_empty() => Cow::Owned(prepared.into_owned().into_bytes()),
        _ => Cow::Borrowed(password),
    }
}

fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; KEY_LEN] {
    let mut out = [0u8; KEY_LEN];
    pbkdf2::pbkdf2_hmac::<Sha256>(&saslprep(password), salt, iterations, &mut out);
    out
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut mac =
        <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Per-process key for deterministic fake salts. Random so that salts of
/// unknown users cannot be predicted or compared across proxy instances.
fn process_key() -> &'static [u8; KEY_LEN] {
    static KEY: OnceLock<[u8; KEY_LEN]> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut key = [0u8; KEY_LEN];
        rand::rng().fill_bytes(&mut key);
        key
    })
}

/// Stable per (process, user) salt, like PostgreSQL's `scram_mock_salt`.
fn deterministic_salt(user: &str) -> Vec<u8> {
    let digest = hmac_sha256(process_key(), &[b"pgsidecar-scram-salt\0", user.as_bytes()]);
    digest[..DEFAULT_SALT_LEN].to_vec()
}

/// Verifiers derived from plaintext passwords, by user and SHA-256 of the password (so
/// the cache holds no extra copy of the password itself).
type PlainCache = std::collections::HashMap<(String, [u8; 32]), ScramVerifier>;
static PLAIN_VERIFIERS: std::sync::Mutex<Option<PlainCache>> = std::sync::Mutex::new(None);
/// Reloads can change passwords; old entries are dropped past this many.
const PLAIN_CACHE_MAX: usize = 4096;

fn plain_verifier(user: &str, password: &str) -> ScramVerifier {
    let key = (user.to_string(), Sha256::digest(password.as_bytes()).into());
    let cached = PLAIN_VERIFIERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|m| m.get(&key).cloned());
    if let Some(v) = cached {
        return v;
    }
    // Derived outside the lock: PBKDF2 takes milliseconds.
    let v = ScramVerifier::from_password(password, &deterministic_salt(user), DEFAULT_ITERATIONS);
    let mut guard = PLAIN_VERIFIERS.lock().unwrap_or_else(|e| e.into_inner());
    let map = guard.get_or_insert_with(Default::default);
    if map.len() >= PLAIN_CACHE_MAX {
        map.clear();
    }
    map.insert(key, v.clone());
    v
}

/// Derives (and caches) the SCRAM verifier of every user with a plaintext password, so
/// that no login pays for PBKDF2 and login timing does not depend on whether the user
/// exists. Call after loading a configuration; cheap when everything is cached.
pub fn warm_plain_verifiers<'a>(users: impl IntoIterator<Item = (&'a str, &'a str)>) {
    for (user, password) in users {
        if !password.is_empty() {
            plain_verifier(user, password);
        }
    }
}

fn random_key() -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    rand::rng().fill_bytes(&mut key);
    key
}

enum State {
    AwaitingClientFirst,
    AwaitingClientFinal {
        /// Channel-binding flag from the gs2 header: b'n' or b'y'.
        cbind_flag: u8,
        client_first_bare: Vec<u8>,
        server_first: Vec<u8>,
        /// client nonce + server nonce, which client-final must repeat.
        nonce: Vec<u8>,
    },
    /// Succeeded or failed; any further message is an error.
    Done,
}

/// One SCRAM-SHA-256 exchange, server side. Drive it with
/// [`handle_client_first`](Self::handle_client_first) (SASLInitialResponse data,
/// reply with AuthenticationSASLContinue) and then
/// [`handle_client_final`](Self::handle_client_final) (SASLResponse data, reply
/// with AuthenticationSASLFinal and AuthenticationOk on `Ok`). Any `Err` ends
/// the exchange.
pub struct ScramServer {
    verifier: ScramVerifier,
    /// Always fail at the proof check (unknown user, unusable secret), after
    /// doing the same work as a real check.
    doomed: bool,
    state: State,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScramServer(<redacted>)")
    }
}

impl ScramServer {
    /// `Plain` builds a verifier on the fly (random salt, 4096 iterations,
    /// one PBKDF2 run), `Scram` uses the verifier, `Md5Hash` returns `None`
    /// since SCRAM cannot be done from an MD5 hash: the caller should then use
    /// [`mock_server_for`] so the failure looks like a wrong password, as
    /// PostgreSQL does. An empty `Plain` password never authenticates
    /// (PostgreSQL refuses to store one).
    ///
    /// Prefer [`ScramServer::new_for_user`]: with a random salt per attempt, a
    /// client can tell a `Plain` user from an unknown one (whose salt is stable).
    pub fn new(secret: &Secret) -> Option<Self> {
        let mut salt = [0u8; DEFAULT_SALT_LEN];
        rand::rng().fill_bytes(&mut salt);
        Self::with_plain_salt(secret, &salt)
    }

    /// Like [`ScramServer::new`], but a `Plain` secret gets the same stable salt
    /// that [`mock_server_for`] would give this user, so salts do not reveal
    /// whether the user exists.
    ///
    /// The verifier of a `Plain` password is derived once and cached: deriving it runs
    /// PBKDF2, and doing that on every login would make a configured user's
    /// server-first-message measurably slower than an unknown user's (a timing oracle
    /// for user names). See also [`warm_plain_verifiers`].
    pub fn new_for_user(user: &str, secret: &Secret) -> Option<Self> {
        match secret {
            Secret::Plain(password) if !password.is_empty() => {
                Some(Self::from_verifier(plain_verifier(user, password)))
            }
            _ => Self::with_plain_salt(secret, &deterministic_salt(user)),
        }
    }

    /// Uses a verifier directly.
    pub fn from_verifier(verifier: ScramVerifier) -> Self {
        Self {
            verifier,
            doomed: false,
            state: State::AwaitingClientFirst,
        }
    }

    fn with_plain_salt(secret: &Secret, salt: &[u8]) -> Option<Self> {
        match secret {
            Secret::Plain(password) if password.is_empty() => Some(Self::doomed(salt.to_vec())),
            Secret::Plain(password) => Some(Self::from_verifier(ScramVerifier::from_password(
                password,
                salt,
                DEFAULT_ITERATIONS,
            ))),
            Secret::Scram(verifier) => Some(Self::from_verifier(verifier.clone())),
            Secret::Md5Hash(_) => None,
        }
    }

    fn doomed(salt: Vec<u8>) -> Self {
        Self {
            verifier: ScramVerifier {
                iterations: DEFAULT_ITERATIONS,
                salt,
                stored_key: random_key(),
                server_key: random_key(),
            },
            doomed: true,
            state: State::AwaitingClientFirst,
        }
    }

    /// client-first-message -> server-first-message.
    pub fn handle_client_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let mut raw = [0u8; SERVER_NONCE_RAW_LEN];
        rand::rng().fill_bytes(&mut raw);
        let server_nonce = STANDARD.encode(raw);
        self.handle_client_first_with_nonce(data, server_nonce.as_bytes())
    }

    pub(crate) fn handle_client_first_with_nonce(
        &mut self,
        data: &[u8],
        server_nonce: &[u8],
    ) -> Result<Vec<u8>, ScramError> {
        // Any error below ends the exchange.
        let state = std::mem::replace(&mut self.state, State::Done);
        if !matches!(state, State::AwaitingClientFirst) {
            return Err(ScramError::InvalidState);
        }
        let first = parse_client_first(data)?;

        let mut nonce = Vec::with_capacity(first.client_nonce.len() + server_nonce.len());
        nonce.extend_from_slice(first.client_nonce);
        nonce.extend_from_slice(server_nonce);

        let mut server_first = Vec::with_capacity(nonce.len() + 64);
        server_first.extend_from_slice(b"r=");
        server_first.extend_from_slice(&nonce);
        server_first.extend_from_slice(b",s=");
        server_first.extend_from_slice(STANDARD.encode(&self.verifier.salt).as_bytes());
        server_first.extend_from_slice(format!(",i={}", self.verifier.iterations).as_bytes());

        self.state = State::AwaitingClientFinal {
            cbind_flag: first.cbind_flag,
            client_first_bare: first.bare.to_vec(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok(server_first)
    }

    /// client-final-message -> server-final-message (`v=<ServerSignature>`).
    /// `Ok` means the client proved knowledge of the password.
    pub fn handle_client_final(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::AwaitingClientFinal {
            cbind_flag,
            client_first_bare,
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::InvalidState);
        };
        let fin = parse_client_final(data)?;

        // No channel binding: the client must echo its gs2 header, i.e.
        // base64("n,,") or base64("y,,"), exactly as PostgreSQL checks it.
        let expected_cbind: &[u8] = if cbind_flag == b'y' { b"eSws" } else { b"biws" };
        if fin.channel_binding != expected_cbind {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if !bool::from(fin.nonce.ct_eq(&nonce)) {
            return Err(ScramError::NonceMismatch);
        }

        let auth_message: [&[u8]; 5] = [
            &client_first_bare,
            b",",
            &server_first,
            b",",
            fin.without_proof,
        ];
        // ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage); the client
        // knows the password iff H(ClientKey) == StoredKey.
        let client_signature = hmac_sha256(&self.verifier.stored_key, &auth_message);
        let mut client_key = fin.proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        let stored_key: [u8; KEY_LEN] = Sha256::digest(client_key).into();
        let ok = stored_key.ct_eq(&self.verifier.stored_key) & Choice::from(u8::from(!self.doomed));
        if !bool::from(ok) {
            return Err(ScramError::ProofMismatch);
        }

        let server_signature = hmac_sha256(&self.verifier.server_key, &auth_message);
        let mut server_final = b"v=".to_vec();
        server_final.extend_from_slice(STANDARD.encode(server_signature).as_bytes());
        Ok(server_final)
    }
}

/// A server for a user that does not exist (or whose secret cannot do SCRAM):
/// it answers like a real one, with a salt that is stable for this user within
/// the process (the same one [`ScramServer::new_for_user`] uses), and always
/// fails with `ProofMismatch`, so probing cannot tell unknown users from wrong
/// passwords.
pub fn mock_server_for(user: &str) -> ScramServer {
    ScramServer::doomed(deterministic_salt(user))
}

struct ClientFirst<'a> {
    cbind_flag: u8,
    bare: &'a [u8],
    client_nonce: &'a [u8],
}

struct ClientFinal<'a> {
    channel_binding: &'a [u8],
    nonce: &'a [u8],
    proof: [u8; KEY_LEN],
    /// Everything before ",p=", which is part of AuthMessage.
    without_proof: &'a [u8],
}

fn check_message(data: &[u8]) -> Result<(), ScramError> {
    if data.len() > MAX_MESSAGE_LEN {
        return Err(ScramError::Malformed("message too long"));
    }
    // PostgreSQL reads these as C strings, so an embedded NUL is malformed.
    if data.contains(&0) {
        return Err(ScramError::Malformed("message contains a NUL byte"));
    }
    Ok(())
}

/// gs2-header client-first-message-bare:
/// `(n|y),,[m=ext,]n=<user>,r=<nonce>[,<attr>=<value>]*`
fn parse_client_first(data: &[u8]) -> Result<ClientFirst<'_>, ScramError> {
    check_message(data)?;
    // gs2 header: exactly "n,," or "y,," (no authzid, no channel binding).
    let (cbind_flag, bare) = match data {
        [flag @ (b'n' | b'y'), b',', b',', bare @ ..] => (*flag, bare),
        [b'p', ..] => return Err(ScramError::ChannelBindingUnsupported),
        [b'n' | b'y', b',', b'a', ..] => return Err(ScramError::AuthzidUnsupported),
        [b'n' | b'y', b',', ..] => {
            return Err(ScramError::Malformed("comma expected after gs2 header"))
        }
        [b'n' | b'y', ..] => {
            return Err(ScramError::Malformed(
                "comma expected after channel-binding flag",
            ))
        }
        _ => return Err(ScramError::Malformed("unexpected channel-binding flag")),
    };
    if bare.first() == Some(&b'm') {
        return Err(ScramError::UnsupportedExtension);
    }

    let mut fields = bare.split(|&b| b == b',');
    // The username is ignored: the role comes from the startup packet.
    attr_value(fields.next(), b'n')?;
    let client_nonce = attr_value(fields.next(), b'r')?;
    if client_nonce.is_empty() {
        return Err(ScramError::Malformed("empty client nonce"));
    }
    if !client_nonce.iter().all(|&b| is_printable(b)) {
        return Err(ScramError::Malformed(
            "client nonce contains invalid characters",
        ));
    }
    // Optional extensions after the nonce are allowed and ignored.
    for field in fields {
        any_attr(field)?;
    }
    Ok(ClientFirst {
        cbind_flag,
        bare,
        client_nonce,
    })
}

/// `c=<cbind>,r=<nonce>[,<attr>=<value>]*,p=<proof>`
fn parse_client_final(data: &[u8]) -> Result<ClientFinal<'_>, ScramError> {
    check_message(data)?;
    let mut fields = data.split(|&b| b == b',');
    let channel_binding = attr_value(fields.next(), b'c')?;
    let nonce = attr_value(fields.next(), b'r')?;

    // Skip extensions up to the proof, which must come last. `offset` tracks
    // where the current field starts: after "c=<cb>,r=<nonce>,".
    let mut offset = channel_binding.len() + nonce.len() + 6;
    loop {
        let Some(field) = fields.next() else {
            return Err(ScramError::Malformed(
                "proof missing from client-final-message",
            ));
        };
        let (attr, value) = any_attr(field)?;
        if attr == b'p' {
            if fields.next().is_some() {
                return Err(ScramError::Malformed(
                    "garbage at the end of client-final-message",
                ));
            }
            let proof = STANDARD
                .decode(value)
                .ok()
                .and_then(|p| <[u8; KEY_LEN]>::try_from(p).ok())
                .ok_or(ScramError::Malformed(
                    "malformed proof in client-final-message",
                ))?;
            // AuthMessage takes everything before the comma that precedes "p=".
            let without_proof = data
                .get(..offset - 1)
                .ok_or(ScramError::Malformed("truncated client-final-message"))?;
            return Ok(ClientFinal {
                channel_binding,
                nonce,
                proof,
                without_proof,
            });
        }
        offset += field.len() + 1;
    }
}

/// Value of `field` if it is `<attr>=<value>`.
fn attr_value(field: Option<&[u8]>, attr: u8) -> Result<&[u8], ScramError> {
    let field = field.ok_or(ScramError::Malformed("missing attribute"))?;
    match field {
        [a, b'=', value @ ..] if *a == attr => Ok(value),
        _ => Err(ScramError::Malformed("unexpected attribute")),
    }
}

/// Any `<letter>=<value>` field (PostgreSQL's `read_any_attr`).
fn any_attr(field: &[u8]) -> Result<(u8, &[u8]), ScramError> {
    match field {
        [a, b'=', value @ ..] if a.is_ascii_alphabetic() => Ok((*a, value)),
        _ => Err(ScramError::Malformed("attribute expected")),
    }
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E (visible ASCII except ',').
fn is_printable(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use rand::Rng;

    /// Verifiers PostgreSQL 15 wrote to pg_authid for `CREATE ROLE ... PASSWORD`.
    const PG_VERIFIER_POSTGRES: &str = "SCRAM-SHA-256$4096:3A7RKauErQHUnHjP7mmz3g==$DJVAB7HR5XDg2xVWb5hD/YVri18dr5eVSNvK2dWUL7M=:D/LUBu1X4Vad8kZgwtsjn9uaxkpSjHf0LdNZBTiPAtE=";
    /// Password E'\uFB01x\u00A0y\u00ADz', which SASLprep turns into "fix yz".
    const PG_VERIFIER_UNICODE: &str = "SCRAM-SHA-256$4096:/3QWp0IFoCOsdoLG5kvCKw==$jB31ZQSMBSFhmmPsOb65KSrqW+r5mK6i3Y1TCtYLOWM=:OdDILcN3uLN1OIwO0i7YsoyOzY1pJ3hcIU5Wu+gUmqA=";
    const UNICODE_PASSWORD: &str = "\u{FB01}x\u{A0}y\u{AD}z";

    fn cheap_verifier(password: &str) -> ScramVerifier {
        ScramVerifier::from_password(password, b"0123456789abcdef", 16)
    }

    /// Full exchange with postgres-protocol's client.
    fn exchange(server: &mut ScramServer, password: &str) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let server_first = server.handle_client_first(client.message())?;
        client
            .update(&server_first)
            .map_err(|_| ScramError::Malformed("client rejected server-first"))?;
        let server_final = server.handle_client_final(client.message())?;
        client
            .finish(&server_final)
            .map_err(|_| ScramError::Malformed("client rejected server-final"))?;
        Ok(())
    }

    #[test]
    fn round_trip_plain() {
        let secret = Secret::Plain("s3cret pässword".into());
        let mut server = ScramServer::new(&secret).unwrap();
        exchange(&mut server, "s3cret pässword").unwrap();
        let mut server = ScramServer::new_for_user("alice", &secret).unwrap();
        exchange(&mut server, "s3cret pässword").unwrap();
    }

    #[test]
    fn round_trip_verifier() {
        let secret = Secret::parse(PG_VERIFIER_POSTGRES);
        let mut server = ScramServer::new(&secret).unwrap();
        exchange(&mut server, "postgres").unwrap();

        let secret = Secret::Scram(cheap_verifier("pw"));
        let mut server = ScramServer::new(&secret).unwrap();
        exchange(&mut server, "pw").unwrap();
    }

    #[test]
    fn round_trip_saslprep_matches_postgres() {
        // PostgreSQL and the client both SASLprep; a server that didn't would fail here.
        let secret = Secret::parse(PG_VERIFIER_UNICODE);
        let mut server = ScramServer::new(&secret).unwrap();
        exchange(&mut server, UNICODE_PASSWORD).unwrap();
        let mut server = ScramServer::new(&secret).unwrap();
        exchange(&mut server, "fix yz").unwrap();
    }

    #[test]
    fn wrong_password_is_proof_mismatch() {
        let mut server = ScramServer::from_verifier(cheap_verifier("right"));
        assert_eq!(
            exchange(&mut server, "wrong"),
            Err(ScramError::ProofMismatch)
        );
        // The exchange is over after a failure.
        assert_eq!(
            server.handle_client_final(b"c=biws,r=x,p=AAAA"),
            Err(ScramError::InvalidState)
        );
    }

    #[test]
    fn md5_secret_cannot_do_scram() {
        assert!(ScramServer::new(&Secret::parse("md590a5cf0bcc432258dac4326b0aa1ff09")).is_none());
    }

    #[test]
    fn empty_plain_password_never_authenticates() {
        let mut server = ScramServer::new(&Secret::Plain(String::new())).unwrap();
        assert_eq!(exchange(&mut server, ""), Err(ScramError::ProofMismatch));
    }

    #[test]
    fn mock_server_fails_like_wrong_password_with_stable_salt() {
        let salt_of = |server: &mut ScramServer| {
            let first = server.handle_client_first(b"n,,n=,r=abc").unwrap();
            let first = String::from_utf8(first).unwrap();
            let salt = first
                .split(',')
                .find_map(|f| f.strip_prefix("s="))
                .unwrap()
                .to_owned();
            assert!(first.ends_with(",i=4096"));
            salt
        };
        let a1 = salt_of(&mut mock_server_for("alice"));
        let a2 = salt_of(&mut mock_server_for("alice"));
        let b = salt_of(&mut mock_server_for("bob"));
        assert_eq!(a1, a2);
        assert_ne!(a1, b);
        assert_eq!(STANDARD.decode(&a1).unwrap().len(), DEFAULT_SALT_LEN);
        // A Plain user gets exactly the salt an unknown user of that name would.
        let plain = Secret::Plain("pw".into());
        assert_eq!(
            salt_of(&mut ScramServer::new_for_user("alice", &plain).unwrap()),
            a1
        );

        let mut mock = mock_server_for("alice");
        assert_eq!(
            exchange(&mut mock, "anything"),
            Err(ScramError::ProofMismatch)
        );
    }

    #[test]
    fn rfc7677_test_vector() {
        let verifier = ScramVerifier::from_password(
            "pencil",
            &STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(),
            4096,
        );
        let mut server = ScramServer::from_verifier(verifier);
        let server_first = server
            .handle_client_first_with_nonce(
                b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
                b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            )
            .unwrap();
        assert_eq!(
            server_first,
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let server_final = server
            .handle_client_final(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(
            server_final,
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn verifier_format_round_trip() {
        for s in [PG_VERIFIER_POSTGRES, PG_VERIFIER_UNICODE] {
            let v = ScramVerifier::parse(s).unwrap();
            assert_eq!(v.iterations, 4096);
            assert_eq!(v.salt.len(), 16);
            assert_eq!(v.to_string_pg(), s);
        }
        let v = ScramVerifier::generate("pw");
        assert_eq!(
            ScramVerifier::parse(&v.to_string_pg())
                .unwrap()
                .to_string_pg(),
            v.to_string_pg()
        );
        assert!(!format!("{v:?}").contains(&STANDARD.encode(v.stored_key)));
    }

    #[test]
    fn from_password_matches_postgres() {
        let pg = ScramVerifier::parse(PG_VERIFIER_POSTGRES).unwrap();
        let ours = ScramVerifier::from_password("postgres", &pg.salt, 4096);
        assert_eq!(ours.to_string_pg(), PG_VERIFIER_POSTGRES);

        let pg = ScramVerifier::parse(PG_VERIFIER_UNICODE).unwrap();
        let ours = ScramVerifier::from_password(UNICODE_PASSWORD, &pg.salt, 4096);
        assert_eq!(ours.to_string_pg(), PG_VERIFIER_UNICODE);

        // postgres-protocol's own test vector (its password::scram_sha_256_salt).
        let salt: Vec<u8> = (1..=16).collect();
        assert_eq!(
            ScramVerifier::from_password("secret", &salt, 4096).to_string_pg(),
            "SCRAM-SHA-256$4096:AQIDBAUGBwgJCgsMDQ4PEA==$8rrDg00OqaiWXJ7p+sCgHEIaBSHY89ZJl3mfIsf32oY=:05L1f+yZbiN8O0AnO40Og85NNRhvzTS57naKRWCcsIA="
        );
    }

    #[test]
    fn verifier_parse_rejects_bad_input() {
        let key = STANDARD.encode([7u8; 32]);
        let short = STANDARD.encode([7u8; 31]);
        let good = format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key}");
        assert!(ScramVerifier::parse(&good).is_some());
        for bad in [
            format!("SCRAM-SHA-256$0:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$1000001:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$99999999999:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$+4096:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$-1:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$4096:${key}:{key}"),
            format!("SCRAM-SHA-256$4096:c2Fsd!==${key}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${short}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{short}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key}$x"),
            format!("SCRAM-SHA-256$4096:c2FsdA==:x${key}:{key}"),
            format!("SCRAM-SHA-1$4096:c2FsdA==${key}:{key}"),
            format!("scram-sha-256$4096:c2FsdA==${key}:{key}"),
            "SCRAM-SHA-256$".to_owned(),
        ] {
            assert!(ScramVerifier::parse(&bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn client_first_errors() {
        let cases: &[(&[u8], ScramError)] = &[
            (
                b"p=tls-server-end-point,,n=,r=abc",
                ScramError::ChannelBindingUnsupported,
            ),
            (b"n,a=bob,n=,r=abc", ScramError::AuthzidUnsupported),
            (b"n,,m=ext,n=,r=abc", ScramError::UnsupportedExtension),
            (b"n,,n=,r=", ScramError::Malformed("empty client nonce")),
            (
                b"n,,n=,r=a\x7fb",
                ScramError::Malformed("client nonce contains invalid characters"),
            ),
            (b"n,,n=,r=abc,", ScramError::Malformed("attribute expected")),
            (
                b"n,,n=,r=abc,1=x",
                ScramError::Malformed("attribute expected"),
            ),
            (b"n,,n=", ScramError::Malformed("missing attribute")),
            (b"n,,r=abc", ScramError::Malformed("unexpected attribute")),
            (
                b"x,,n=,r=abc",
                ScramError::Malformed("unexpected channel-binding flag"),
            ),
            (
                b"",
                ScramError::Malformed("unexpected channel-binding flag"),
            ),
            (
                b"n",
                ScramError::Malformed("comma expected after channel-binding flag"),
            ),
            (
                b"n,",
                ScramError::Malformed("comma expected after gs2 header"),
            ),
            (
                b"n,,n=,r=a\0c",
                ScramError::Malformed("message contains a NUL byte"),
            ),
        ];
        for (input, want) in cases {
            let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
            assert_eq!(
                server.handle_client_first(input).as_ref(),
                Err(want),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        // Username is ignored, non-UTF-8 ones included; extensions after r= are ignored.
        let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
        assert!(server
            .handle_client_first(b"y,,n=\xff\xfe,r=abc,x=1")
            .is_ok());
        let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
        let too_long = [b"n,,n=,r=".as_slice(), &[b'a'; MAX_MESSAGE_LEN]].concat();
        assert!(server.handle_client_first(&too_long).is_err());
    }

    /// Runs a real client to the point of its final message.
    fn client_final_for(
        password: &str,
        server: &mut ScramServer,
        cb: ChannelBinding,
    ) -> (ScramSha256, Vec<u8>) {
        let mut client = ScramSha256::new(password.as_bytes(), cb);
        let server_first = server.handle_client_first(client.message()).unwrap();
        client.update(&server_first).unwrap();
        let fin = client.message().to_vec();
        (client, fin)
    }

    #[test]
    fn nonce_bit_flip_is_nonce_mismatch() {
        let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
        let (_, mut fin) = client_final_for("pw", &mut server, ChannelBinding::unsupported());
        // First byte of the nonce value ("c=biws,r=" is 9 bytes); flip to another
        // printable character so the message still parses.
        assert!(fin.starts_with(b"c=biws,r="));
        fin[9] = if fin[9] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            server.handle_client_final(&fin),
            Err(ScramError::NonceMismatch)
        );

        // Truncated nonce (drops the last server-nonce character).
        let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
        let (_, fin) = client_final_for("pw", &mut server, ChannelBinding::unsupported());
        let s = String::from_utf8(fin).unwrap();
        let p = s.find(",p=").unwrap();
        let fin = format!("{}{}", &s[..p - 1], &s[p..]);
        assert_eq!(
            server.handle_client_final(fin.as_bytes()),
            Err(ScramError::NonceMismatch)
        );
    }

    #[test]
    fn channel_binding_flag_must_match() {
        // Client said "y,," (it supports binding, thinks we don't): final must be "eSws".
        let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
        let (mut client, fin) = client_final_for("pw", &mut server, ChannelBinding::unrequested());
        assert!(fin.starts_with(b"c=eSws,"));
        let server_final = server.handle_client_final(&fin).unwrap();
        client.finish(&server_final).unwrap();

        let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
        let (_, fin) = client_final_for("pw", &mut server, ChannelBinding::unsupported());
        let fin = [b"c=eSws".as_slice(), &fin[6..]].concat();
        assert_eq!(
            server.handle_client_final(&fin),
            Err(ScramError::ChannelBindingMismatch)
        );
    }

    #[test]
    fn final_extensions_are_skipped_but_part_of_auth_message() {
        // An extension before p= is covered by the proof, so inserting one
        // after the fact must fail the proof, not be silently accepted.
        let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
        let (_, fin) = client_final_for("pw", &mut server, ChannelBinding::unsupported());
        let s = String::from_utf8(fin).unwrap();
        let p = s.find(",p=").unwrap();
        let fin = format!("{},x=1{}", &s[..p], &s[p..]);
        assert_eq!(
            server.handle_client_final(fin.as_bytes()),
            Err(ScramError::ProofMismatch)
        );
    }

    #[test]
    fn client_final_errors() {
        let cases: &[&[u8]] = &[
            b"",
            b"c=biws",
            b"c=biws,r=NONCE",
            b"c=biws,r=NONCE,p=",
            b"c=biws,r=NONCE,p=AAAA",
            b"c=biws,r=NONCE,p=!!!!",
            b"r=NONCE,c=biws,p=AAAA",
            b"c=biws,r=NONCE,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=,x=1",
            b"c=biws,r=NONCE,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=,",
            b"c=biws,r=NONCE,,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            b"c=biws,r=NONCE,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\0",
        ];
        for input in cases {
            let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
            let first = server.handle_client_first(b"n,,n=,r=abc").unwrap();
            let nonce = &first[2..first.iter().position(|&b| b == b',').unwrap()];
            let input = String::from_utf8_lossy(input)
                .replace("NONCE", std::str::from_utf8(nonce).unwrap());
            let err = server.handle_client_final(input.as_bytes()).unwrap_err();
            assert!(matches!(err, ScramError::Malformed(_)), "{input}: {err:?}");
        }
    }

    #[test]
    fn out_of_order_calls() {
        let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
        assert_eq!(
            server.handle_client_final(b"c=biws"),
            Err(ScramError::InvalidState)
        );
        let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
        server.handle_client_first(b"n,,n=,r=abc").unwrap();
        assert_eq!(
            server.handle_client_first(b"n,,n=,r=abc"),
            Err(ScramError::InvalidState)
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = rand::rng();
        let verifier = cheap_verifier("pw");
        let alphabet = b"nyp,=abcmrsvi019+/AZ\0\xff";
        for i in 0..10_000 {
            let len = rng.random_range(0..64);
            // Half fully random, half from a SCRAM-ish alphabet to get past the first checks.
            let garbage: Vec<u8> = (0..len)
                .map(|_| {
                    if i % 2 == 0 {
                        rng.random()
                    } else {
                        alphabet[rng.random_range(0..alphabet.len())]
                    }
                })
                .collect();

            let mut server = ScramServer::from_verifier(verifier.clone());
            let _ = server.handle_client_first(&garbage);
            let _ = server.handle_client_final(&garbage);

            let mut server = ScramServer::from_verifier(verifier.clone());
            server.handle_client_first(b"n,,n=,r=abc").unwrap();
            assert!(server.handle_client_final(&garbage).is_err());
        }
    }

    #[test]
    fn mutated_messages_never_panic() {
        let mut rng = rand::rng();
        let verifier = cheap_verifier("pw");
        for _ in 0..2_000 {
            let mut server = ScramServer::from_verifier(verifier.clone());
            let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
            let mut first = client.message().to_vec();
            let mutate_first = rng.random_bool(0.5);
            if mutate_first {
                mutate(&mut rng, &mut first);
            }
            let Ok(server_first) = server.handle_client_first(&first) else {
                continue;
            };
            if client.update(&server_first).is_err() {
                continue;
            }
            let mut fin = client.message().to_vec();
            if !mutate_first {
                mutate(&mut rng, &mut fin);
            }
            let _ = server.handle_client_final(&fin);
        }
    }

    fn mutate(rng: &mut impl Rng, msg: &mut Vec<u8>) {
        match rng.random_range(0..4) {
            0 if !msg.is_empty() => {
                let i = rng.random_range(0..msg.len());
                msg[i] ^= 1 << rng.random_range(0..8);
            }
            1 => msg.truncate(rng.random_range(0..=msg.len())),
            2 => {
                let i = rng.random_range(0..=msg.len());
                msg.insert(i, b",=p\0"[rng.random_range(0..4)]);
            }
            _ if !msg.is_empty() => {
                msg.remove(rng.random_range(0..msg.len()));
            }
            _ => {}
        }
    }
}

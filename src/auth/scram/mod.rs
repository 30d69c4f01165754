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
use parse::{parse_client_final, parse_client_first};

mod parse;

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

#[cfg(test)]
mod tests;

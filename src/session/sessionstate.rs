//! Finds statements that create or may drop state living past the end of a
//! transaction on the server connection (session advisory locks, temporary objects,
//! SQL prepared statements, LISTEN, WITH HOLD cursors, session characteristics and
//! roles, LOAD, `set_config(.., false)`), so that transaction mode can keep such a
//! client on its server (see `pinning.rs`).
//!
//! Two stages: a byte pre-filter for keywords, cheap enough for every statement; then,
//! for the rare statements it lets through, PostgreSQL tokens (so a keyword inside a
//! string literal, a quoted identifier or a comment is told apart from a real one).
//! What cannot be seen: state made inside functions, DO blocks or dynamic SQL
//! (`EXECUTE format(..)`), whose bodies are string literals here. The server is asked
//! what it holds whenever a statement of interest ran (see `CHECK_SQL`), so counting
//! never decides on its own.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

/// Why a client holds its server: bounded labels for `pgsidecar_pins_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    AdvisoryLock,
    TempObject,
    Prepare,
    Listen,
    HoldCursor,
    Characteristics,
    Role,
    /// `SET SESSION AUTHORIZATION`: the server check cannot tell it from the login role.
    Authorization,
    /// `LOAD` of a library: nothing can undo it, the connection is closed at exit.
    Load,
    /// `set_config(name, value, false)`: a session setting the proxy does not carry.
    SetConfig,
    /// A statement of interest the tokenizer could not read; the server decides.
    Unknown,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::AdvisoryLock,
        Reason::TempObject,
        Reason::Prepare,
        Reason::Listen,
        Reason::HoldCursor,
        Reason::Characteristics,
        Reason::Role,
        Reason::Authorization,
        Reason::Load,
        Reason::SetConfig,
        Reason::Unknown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::AdvisoryLock => "advisory_lock",
            Reason::TempObject => "temp_object",
            Reason::Prepare => "sql_prepare",
            Reason::Listen => "listen",
            Reason::HoldCursor => "hold_cursor",
            Reason::Characteristics => "session_characteristics",
            Reason::Role => "role",
            Reason::Authorization => "session_authorization",
            Reason::Load => "load",
            Reason::SetConfig => "set_config",
            Reason::Unknown => "unknown",
        }
    }

    /// State the server check cannot see (`CHECK_SQL`): the pin lasts until the client
    /// leaves.
    pub fn sticky(self) -> bool {
        matches!(
            self,
            Reason::Authorization | Reason::Load | Reason::SetConfig | Reason::Unknown
        )
    }
}

/// What one message's SQL does to session state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// It may create session state (the first kind found).
    pub creates: Option<Reason>,
    /// It may drop session state (unlock, DEALLOCATE, UNLISTEN, CLOSE, DISCARD, DROP,
    /// RESET, ROLLBACK).
    pub releases: bool,
}

impl Scan {
    /// Whether the server should be asked at the next transaction boundary.
    pub fn needs_check(&self) -> bool {
        self.creates.is_some() || self.releases
    }
}

/// One query tells whether the server connection holds any session state the proxy
/// can see: a non-zero answer keeps the client pinned. Each part is what PostgreSQL
/// itself keeps per backend.
pub const CHECK_SQL: &str = "SELECT \
 (SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()) \
 + (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql) \
 + (SELECT count(*) FROM pg_catalog.pg_listening_channels()) \
 + (SELECT count(*) FROM pg_catalog.pg_cursors) \
 + (SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()) \
 + (SELECT count(*) FROM pg_catalog.pg_settings WHERE source = 'session' AND name IN \
   ('default_transaction_isolation', 'default_transaction_read_only', 'default_transaction_deferrable')) \
 + (pg_catalog.current_setting('role') <> 'none')::int";

/// Words whose presence, at the start of a word (after a byte that is not a letter or
/// digit, so `_` counts: `pg_temp`, `pg_try_advisory_lock`), makes a statement worth
/// tokenizing (lower case). `advisory` covers the unlock functions too, `temp`
/// TEMPORARY and pg_temp.
const CREATORS: &[&[u8]] = &[
    b"advisory",
    b"temp",
    b"prepare",
    b"listen",
    b"hold",
    b"characteristics",
    b"default_transaction",
    b"load",
    b"role",
    b"authorization",
    b"set_config",
];
/// Only of interest while a client may hold state.
const RELEASERS: &[&[u8]] = &[
    b"unlisten",
    b"deallocate",
    b"close",
    b"discard",
    b"drop",
    b"reset",
    b"rollback",
    b"abort",
];

/// Needle `k` of CREATORS then RELEASERS, as one list (at most 32).
const fn needle(k: usize) -> &'static [u8] {
    match k < CREATORS.len() {
        true => CREATORS[k],
        false => RELEASERS[k - CREATORS.len()],
    }
}
const N_NEEDLES: usize = CREATORS.len() + RELEASERS.len();
const CREATOR_BITS: u32 = (1 << CREATORS.len()) - 1;
const RELEASER_BITS: u32 = ((1 << N_NEEDLES) - 1) & !CREATOR_BITS;

/// Index of two bytes in `PAIRS`: the low five bits of each, which fold letter case
/// (other bytes collide with letters: a match is a necessary condition only).
#[inline]
const fn pair(a: u8, b: u8) -> usize {
    ((a & 31) as usize) << 5 | (b & 31) as usize
}

/// For each pair of leading bytes, the needles (bit k: needle k) starting with them.
static PAIRS: [u32; 1024] = {
    let mut t = [0u32; 1024];
    let mut k = 0;
    while k < N_NEEDLES {
        t[pair(needle(k)[0], needle(k)[1])] |= 1 << k;
        k += 1;
    }
    t
};

/// Each needle's first four bytes with bit 5 set (ASCII letters in lower case), as a
/// u32: two byte strings equal in any letter case are equal after this too, so a word
/// whose head differs is passed over without comparing it byte by byte (`SELECT` shares
/// its first two letters with `set_config`).
static HEADS: [u32; N_NEEDLES] = {
    let mut t = [0u32; N_NEEDLES];
    let mut k = 0;
    while k < N_NEEDLES {
        let n = needle(k);
        assert!(n.len() >= 4, "every needle has at least four bytes");
        t[k] = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) | 0x2020_2020;
        k += 1;
    }
    t
};

/// Cheap test, without allocating: could `sql` touch session state? `holding`: the
/// client may hold some, so statements that drop state count too.
pub fn prefilter(sql: &[u8], holding: bool) -> bool {
    contains_any(sql, CREATOR_BITS | if holding { RELEASER_BITS } else { 0 })
}

/// High bit of each byte of `x` set where that byte is an ASCII letter or digit. The
/// comparisons work on the low seven bits, so no sum carries into the next byte.
#[inline]
fn alnum_bytes(x: u64) -> u64 {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let y = x & !HI;
    let l = y | (0x20 * LO); // letters in lower case
    let letter = (l + 0x1f * LO) & !(l + 0x05 * LO); // 'a'..='z'
    let digit = (y + 0x50 * LO) & !(y + 0x46 * LO); // '0'..='9'
    (letter | digit) & !x & HI
}

/// Whether a needle of `mask` starts at some word start of `sql` (any letter case).
/// Every Query and Parse passes here, some of them megabytes: word starts are found
/// eight bytes at a time, and only where one's first two bytes begin a needle is it
/// compared.
fn contains_any(sql: &[u8], mask: u32) -> bool {
    let mut before = 0u64; // the previous chunk's letters and digits
    for (c, chunk) in sql.chunks(8).enumerate() {
        let b = <[u8; 8]>::try_from(chunk).unwrap_or_else(|_| {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            b
        });
        let word = alnum_bytes(u64::from_le_bytes(b));
        let mut starts = word & !(word << 8 | before >> 56);
        before = word;
        while starts != 0 {
            let i = c * 8 + (starts.trailing_zeros() / 8) as usize;
            starts &= starts - 1;
            let rest = &sql[i..];
            // Every needle has four bytes or more.
            let Some(&[a, b, c, d]) = rest.first_chunk::<4>() else {
                continue;
            };
            let mut m = PAIRS[pair(a, b)] & mask;
            if m == 0 {
                continue;
            }
            let head = u32::from_le_bytes([a, b, c, d]) | 0x2020_2020;
            while m != 0 {
                let k = m.trailing_zeros() as usize;
                m &= m - 1;
                if HEADS[k] != head {
                    continue;
                }
                let nd = needle(k);
                if rest.len() >= nd.len() && rest[..nd.len()].eq_ignore_ascii_case(nd) {
                    return true;
                }
            }
        }
    }
    false
}

/// Scans one message's SQL (a simple Query may hold several statements).
pub fn scan(sql: &[u8], holding: bool) -> Scan {
    if !prefilter(sql, holding) {
        return Scan::default();
    }
    let text = String::from_utf8_lossy(sql);
    let tokens = match Tokenizer::new(&PostgreSqlDialect {}, &text).tokenize() {
        Ok(t) => t,
        // PostgreSQL will refuse it too; the server check settles what is left.
        Err(_) => {
            return Scan {
                creates: Some(Reason::Unknown),
                releases: true,
            }
        }
    };
    let tokens: Vec<Token> = tokens
        .into_iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect();
    let mut out = Scan::default();
    for stmt in tokens.split(|t| matches!(t, Token::SemiColon)) {
        let s = statement(stmt);
        out.creates = out.creates.or(s.creates);
        out.releases |= s.releases;
    }
    out
}

/// An unquoted word equal to `kw` (any case).
fn is_kw(t: Option<&Token>, kw: &str) -> bool {
    matches!(t, Some(Token::Word(w)) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(kw))
}

/// A name as PostgreSQL resolves it: unquoted folds to lower case, quoted is exact.
fn ident(t: &Token) -> Option<String> {
    match t {
        Token::Word(w) if w.quote_style.is_none() => Some(w.value.to_ascii_lowercase()),
        Token::Word(w) if w.quote_style == Some('"') => Some(w.value.clone()),
        _ => None,
    }
}

fn statement(st: &[Token]) -> Scan {
    let mut out = Scan::default();
    // Function calls anywhere in the statement.
    for (i, t) in st.iter().enumerate() {
        let Some(name) = ident(t) else { continue };
        if !matches!(st.get(i + 1), Some(Token::LParen)) {
            if name == "pg_temp" && matches!(st.get(i + 1), Some(Token::Period)) {
                out.creates = out.creates.or(Some(Reason::TempObject));
            }
            continue;
        }
        match name.as_str() {
            "pg_advisory_lock"
            | "pg_advisory_lock_shared"
            | "pg_try_advisory_lock"
            | "pg_try_advisory_lock_shared" => {
                out.creates = out.creates.or(Some(Reason::AdvisoryLock));
            }
            n if n.starts_with("pg_advisory_unlock") => out.releases = true,
            "set_config" if !local_set_config(&st[i + 1..]) => {
                out.creates = out.creates.or(set_config_state(&st[i + 1..]));
            }
            _ => {}
        }
    }
    let first = st.first();
    let second = st.get(1);
    let word = |kw: &str| is_kw(first, kw);
    if word("prepare") && !is_kw(second, "transaction") {
        out.creates = out.creates.or(Some(Reason::Prepare));
    } else if word("listen") {
        out.creates = out.creates.or(Some(Reason::Listen));
    } else if word("declare") {
        let hold = st
            .windows(2)
            .any(|w| is_kw(Some(&w[0]), "with") && is_kw(Some(&w[1]), "hold"));
        if hold {
            out.creates = out.creates.or(Some(Reason::HoldCursor));
        }
    } else if word("load") {
        out.creates = out.creates.or(Some(Reason::Load));
    } else if word("set") {
        if let Some(r) = set_statement(&st[1..]) {
            out.creates = out.creates.or(Some(r));
        }
        out.releases = true;
    } else if [
        "unlisten",
        "close",
        "deallocate",
        "discard",
        "drop",
        "reset",
        "rollback",
        "abort",
    ]
    .iter()
    .any(|k| word(k))
    {
        out.releases = true;
    }
    // CREATE [OR REPLACE] [GLOBAL|LOCAL] TEMP|TEMPORARY ..., SELECT .. INTO TEMP ..
    let temp_at = |i: usize| is_kw(st.get(i), "temp") || is_kw(st.get(i), "temporary");
    let created_temp = (word("create") && (1..5).any(temp_at))
        || st
            .iter()
            .enumerate()
            .any(|(i, t)| is_kw(Some(t), "into") && (temp_at(i + 1) || temp_at(i + 2)));
    if created_temp && !on_commit_drop(st) {
        out.creates = out.creates.or(Some(Reason::TempObject));
    }
    if out.creates == Some(Reason::TempObject) && on_commit_drop(st) {
        // Dropped at the end of the transaction that made it (or at once, outside one).
        out.creates = None;
    }
    out
}

fn on_commit_drop(st: &[Token]) -> bool {
    st.windows(3).any(|w| {
        is_kw(Some(&w[0]), "on") && is_kw(Some(&w[1]), "commit") && is_kw(Some(&w[2]), "drop")
    })
}

/// After SET: which session state it makes, if any (SET LOCAL and SET TRANSACTION end
/// with the transaction; plain settings follow the client already).
fn set_statement(rest: &[Token]) -> Option<Reason> {
    let mut rest = rest;
    if is_kw(rest.first(), "local") || is_kw(rest.first(), "transaction") {
        return None;
    }
    if is_kw(rest.first(), "session") {
        if is_kw(rest.get(1), "characteristics") {
            return Some(Reason::Characteristics);
        }
        if is_kw(rest.get(1), "authorization") {
            return Some(Reason::Authorization);
        }
        rest = &rest[1..];
    }
    if is_kw(rest.first(), "role") {
        return Some(Reason::Role);
    }
    match rest.first().and_then(ident) {
        Some(n) if n.starts_with("default_transaction_") => Some(Reason::Characteristics),
        Some(n) if n == "session_authorization" => Some(Reason::Authorization),
        Some(n) if n == "role" => Some(Reason::Role),
        _ => None,
    }
}

/// Settings PostgreSQL 15 reports with ParameterStatus: a change to one follows the
/// client to its next servers already (lower case).
const REPORTED: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "standard_conforming_strings",
    "timezone",
];

/// `set_config(name, value, false)`: the state it makes, by the name when it is a
/// literal (`args` starts at the opening parenthesis).
fn set_config_state(args: &[Token]) -> Option<Reason> {
    let name = match (args.get(1), args.get(2)) {
        (Some(Token::SingleQuotedString(n)), Some(Token::Comma)) => n.to_ascii_lowercase(),
        _ => return Some(Reason::SetConfig),
    };
    if REPORTED.contains(&name.as_str()) {
        None
    } else if name.starts_with("default_transaction_") {
        Some(Reason::Characteristics)
    } else if name == "role" {
        Some(Reason::Role)
    } else {
        Some(Reason::SetConfig)
    }
}

/// `set_config(a, b, true)`: local to the transaction. Reads the last argument of the
/// call whose opening parenthesis starts `args`.
fn local_set_config(args: &[Token]) -> bool {
    let mut depth = 0;
    let mut last_arg_start = 1;
    for (i, t) in args.iter().enumerate() {
        match t {
            Token::LParen => depth += 1,
            Token::RParen => {
                depth -= 1;
                if depth == 0 {
                    let arg = &args[last_arg_start..i];
                    return arg.len() == 1 && is_kw(arg.first(), "true");
                }
            }
            Token::Comma if depth == 1 => last_arg_start = i + 1,
            _ => {}
        }
    }
    false
}

#[cfg(test)]
#[path = "sessionstate_tests.rs"]
mod tests;

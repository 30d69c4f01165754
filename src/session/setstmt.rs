//! Recognises `SET name TO value` / `RESET name` sent as a lone simple query, so that in
//! transaction mode settings PostgreSQL does not report (search_path, statement_timeout,
//! work_mem... in PostgreSQL 15) follow the client to whichever server runs its next
//! transaction. Anything more complex (several statements, SET LOCAL) is left alone.

/// A session-level setting change: `Some(value)` is the value as SQL text (re-sent
/// verbatim as `SET name TO <value>`), `None` resets to the server default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOp {
    pub name: String,
    pub value: Option<String>,
}

/// Parses one statement; `None` when it is not a plain session SET/RESET.
pub fn parse(sql: &[u8]) -> Option<SetOp> {
    let text = std::str::from_utf8(sql).ok()?;
    let text = text.trim().trim_end_matches(';').trim_end();
    if text.contains(';') || text.contains("--") || text.contains("/*") {
        return None;
    }
    let (kw, rest) = split_word(text)?;
    if kw.eq_ignore_ascii_case("RESET") {
        let (name, rest) = name(rest)?;
        if !rest.trim().is_empty() || name == "all" || name == "session" {
            return None;
        }
        return Some(SetOp { name, value: None });
    }
    if !kw.eq_ignore_ascii_case("SET") {
        return None;
    }
    let mut rest = rest;
    if let Some((w, r)) = split_word(rest) {
        if w.eq_ignore_ascii_case("LOCAL") || w.eq_ignore_ascii_case("TRANSACTION") {
            return None;
        }
        if w.eq_ignore_ascii_case("SESSION") {
            // SET SESSION AUTHORIZATION / CHARACTERISTICS are not plain settings.
            let (next, _) = split_word(r)?;
            if next.eq_ignore_ascii_case("AUTHORIZATION")
                || next.eq_ignore_ascii_case("CHARACTERISTICS")
            {
                return None;
            }
            rest = r;
        }
    }
    let (name, rest) = name(rest)?;
    if matches!(
        name.as_str(),
        "role" | "time" | "names" | "schema" | "session_authorization"
    ) {
        // Forms with their own grammar or privileges; not carried.
        return None;
    }
    let rest = rest.trim_start();
    let value = if let Some(v) = rest.strip_prefix('=') {
        v
    } else {
        let (w, v) = split_word(rest)?;
        if !w.eq_ignore_ascii_case("TO") {
            return None;
        }
        v
    };
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.eq_ignore_ascii_case("DEFAULT") {
        return Some(SetOp { name, value: None });
    }
    if !balanced_quotes(value) {
        return None;
    }
    Some(SetOp {
        name,
        value: Some(value.to_string()),
    })
}

fn split_word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    let end = s
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    Some((&s[..end], &s[end..]))
}

/// A setting name: an identifier, optionally dotted; quoted identifiers keep case.
fn name(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start();
    if let Some(q) = s.strip_prefix('"') {
        let end = q.find('"')?;
        let n = &q[..end];
        if !crate::server::params::valid_name(n) {
            return None;
        }
        return Some((n.to_string(), &q[end + 1..]));
    }
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(s.len());
    let n = s[..end].to_ascii_lowercase();
    if !crate::server::params::valid_name(&n) {
        return None;
    }
    Some((n, &s[end..]))
}

/// Single quotes balanced (with '' escapes) and double quotes balanced.
fn balanced_quotes(v: &str) -> bool {
    let (mut single, mut double) = (false, false);
    for c in v.chars() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            _ => {}
        }
    }
    !single && !double
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: &str, v: &str) -> Option<SetOp> {
        Some(SetOp {
            name: n.into(),
            value: Some(v.into()),
        })
    }

    #[test]
    fn plain_forms() {
        assert_eq!(
            parse(b"SET search_path TO app, public"),
            set("search_path", "app, public")
        );
        assert_eq!(
            parse(b"set Statement_Timeout = '5s';"),
            set("statement_timeout", "'5s'")
        );
        assert_eq!(
            parse(b"SET SESSION work_mem TO '64MB'"),
            set("work_mem", "'64MB'")
        );
        assert_eq!(
            parse(b"SET search_path = \"$user\", public"),
            set("search_path", "\"$user\", public")
        );
        assert_eq!(
            parse(b"SET myapp.tenant = '42'"),
            set("myapp.tenant", "'42'")
        );
        assert_eq!(
            parse(b"RESET search_path"),
            Some(SetOp {
                name: "search_path".into(),
                value: None
            })
        );
        assert_eq!(
            parse(b"SET search_path TO DEFAULT"),
            Some(SetOp {
                name: "search_path".into(),
                value: None
            })
        );
    }

    #[test]
    fn anything_else_is_left_alone() {
        for sql in [
            &b"SET LOCAL search_path TO x"[..],
            b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            b"SET search_path TO x; DROP TABLE t",
            b"SET ROLE admin",
            b"SET SESSION AUTHORIZATION bob",
            b"SET search_path TO 'unterminated",
            b"RESET ALL",
            b"SELECT 1",
            b"SET x TO",
            b"SET search_path TO a -- comment",
            b"\xff\xfe",
        ] {
            assert_eq!(parse(sql), None, "{:?}", String::from_utf8_lossy(sql));
        }
    }
}

//! Checks of settings the proxy would otherwise honour badly or not at all, and where a
//! rejected key sits in the file (`pgsidecar check` names the line).

/// Levels a `logging.level` directive may name (tracing's, as in `RUST_LOG`).
const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// A `logging.level` filter must be what its doc says: `info`, or directives such as
/// `pgsidecar=debug,warn`. tracing reads any other bare word (`verbose`) as a target
/// name with no level, which silences every log line: refuse it instead.
pub fn log_level(filter: &str) -> Result<(), String> {
    let directives: Vec<&str> = filter.split(',').map(str::trim).collect();
    if directives.iter().all(|d| d.is_empty()) {
        return Err("logging.level must not be empty; use e.g. info".into());
    }
    for d in directives.into_iter().filter(|d| !d.is_empty()) {
        let level = match d.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            Some(_) => return Err(format!("logging.level: {d:?} has no target before '='")),
            None => d,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "logging.level: {level:?} is not a level; use one of {} (or target=level, e.g. pgsidecar=debug)",
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(|_| ())
        .map_err(|e| format!("logging.level: {e}"))
}

/// The 1-based line and column of a dotted key's value, if it is written out.
pub fn position_of(text: &str, dotted: &str) -> Option<(usize, usize)> {
    let line = line_of(text, dotted)?;
    let last = dotted.rsplit('.').next()?;
    let body = text.lines().nth(line - 1)?;
    let at = body.find(last)? + last.len();
    let after = body.get(at..)?.strip_prefix(':')?;
    let col = at + 2 + (after.len() - after.trim_start().len());
    Some((line, col))
}

/// The 1-based line of a dotted key (`logging.level`) in a YAML document, found by
/// indentation: each part must be a mapping key nested under the previous one. Only
/// for messages; `None` when the key is not written out (a default or a flag).
pub fn line_of(text: &str, dotted: &str) -> Option<usize> {
    let mut parts = dotted.split('.').peekable();
    let mut want = parts.next()?;
    let mut parent_indent: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let body = line.trim_start();
        let indent = line.len() - body.len();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        if parent_indent.is_some_and(|p| indent <= p) {
            // Left the parent's block without finding the key.
            return None;
        }
        let key = body
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"');
        if key == want && body.contains(':') {
            match parts.next() {
                None => return Some(i + 1),
                Some(next) => {
                    want = next;
                    parent_indent = Some(indent);
                }
            }
        }
    }
    None
}

/// The dotted key a validation message starts with (`logging.level: ...`,
/// `pool.size must ...`), if it starts with one.
pub fn key_of(message: &str) -> Option<&str> {
    let head = message.split([':', ' ']).next()?;
    let ok = !head.is_empty()
        && head
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
    ok.then_some(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_accept_filters_and_refuse_bare_words() {
        for ok in [
            "info",
            "WARN",
            "pgsidecar=debug",
            "pgsidecar=debug,warn",
            "off",
        ] {
            assert!(log_level(ok).is_ok(), "{ok}");
        }
        for bad in ["verbose", "", "pgsidecar=loud", "=info"] {
            let e = log_level(bad).expect_err(bad);
            assert!(e.starts_with("logging.level"), "{e}");
        }
    }

    #[test]
    fn keys_are_located_by_nesting() {
        let text = "upstream:\n  host: db\n  level: x\nlogging:\n  # c\n  format: text\n  level: verbose\n";
        assert_eq!(line_of(text, "logging.level"), Some(7));
        assert_eq!(line_of(text, "upstream.host"), Some(2));
        assert_eq!(line_of(text, "pool.size"), None);
        assert_eq!(key_of("logging.level: \"x\" is not"), Some("logging.level"));
        assert_eq!(key_of("pool.size must be at least 1"), Some("pool.size"));
        assert_eq!(key_of("users: \"a\" is listed twice"), Some("users"));
        assert_eq!(line_of(text, "give"), None);
    }
}

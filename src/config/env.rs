//! `${VAR}` and `${VAR:-default}` in proxy.yaml's string values.

use super::ConfigError;

/// Expands `${VAR}` and `${VAR:-default}` in every string of the document. A string that
/// is exactly one expression is re-read as a YAML scalar so `port: ${PGPORT}` stays a number.
pub(super) fn expand_value(
    v: &mut serde_yaml::Value,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match v {
        serde_yaml::Value::String(s) => {
            if !s.contains("${") {
                return Ok(());
            }
            let whole = s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
            let expanded = expand_str(s, env)?;
            if whole {
                if let Ok(scalar @ (serde_yaml::Value::Number(_) | serde_yaml::Value::Bool(_))) =
                    serde_yaml::from_str::<serde_yaml::Value>(&expanded)
                {
                    *v = scalar;
                    return Ok(());
                }
            }
            *v = serde_yaml::Value::String(expanded);
        }
        serde_yaml::Value::Sequence(seq) => {
            for item in seq {
                expand_value(item, env)?;
            }
        }
        serde_yaml::Value::Mapping(map) => {
            for (_, item) in map.iter_mut() {
                expand_value(item, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Expands one string; `$${` is a literal `${`.
pub fn expand_str(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(stripped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix("${") {
            let Some(end) = inner.find('}') else {
                return Err(ConfigError::Invalid(format!(
                    "unterminated ${{ in {:?}",
                    redact_hint(s)
                )));
            };
            let expr = &inner[..end];
            let (name, default) = match expr.find(":-") {
                Some(j) => (&expr[..j], Some(&expr[j + 2..])),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ConfigError::Invalid(format!(
                    "invalid variable name {name:?}"
                )));
            }
            match (env(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => return Err(ConfigError::MissingEnv(name.to_string())),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

// Strings with unterminated expressions may hold secrets; show only their start.
fn redact_hint(s: &str) -> String {
    let prefix: String = s.chars().take(8).collect();
    format!("{prefix}...")
}

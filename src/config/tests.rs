use super::*;

fn env(k: &str) -> Option<String> {
    match k {
        "PW" => Some("s3cr:et}".into()),
        "PORT" => Some("5433".into()),
        _ => None,
    }
}

const MINIMAL: &str = "upstream:\n  host: db\n";

#[test]
fn minimal_file_gets_documented_defaults() {
    let c = Config::parse(MINIMAL, &env).expect("parses");
    assert_eq!(c.listen, "127.0.0.1:6432");
    assert_eq!(c.pool_mode, PoolMode::Transaction);
    assert_eq!(c.upstream.port, 5432);
    assert_eq!(c.pool.size, 20);
    assert_eq!(c.pool.reset_query, "DISCARD ALL");
}

#[test]
fn env_expansion_with_defaults_and_numbers() {
    let c = Config::parse(
        "upstream:\n  host: ${HOST:-pg.local}\n  port: ${PORT}\n  password: ${PW}\n",
        &env,
    )
    .expect("parses");
    assert_eq!(c.upstream.host, "pg.local");
    assert_eq!(c.upstream.port, 5433);
    assert_eq!(c.upstream.password.as_deref(), Some("s3cr:et}"));
}

#[test]
fn missing_env_is_an_error_naming_the_variable() {
    let e = Config::parse("upstream:\n  host: ${NOPE}\n", &env).expect_err("must fail");
    assert!(e.to_string().contains("NOPE"), "{e}");
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let e = Config::parse("upstream:\n  host: db\npool:\n  sise: 3\n", &env).expect_err("fails");
    assert!(e.to_string().contains("sise"), "{e}");
}

#[test]
fn min_above_max_is_invalid() {
    let c = Config::parse(
        "upstream:\n  host: db\npool:\n  size: 2\n  min_size: 3\n",
        &env,
    )
    .expect("parses");
    let e = c.validate().expect_err("invalid");
    assert!(e.to_string().contains("min_size"), "{e}");
}

#[test]
fn users_need_passwords_unless_trust() {
    let c = Config::parse("upstream:\n  host: db\nusers:\n  - name: a\n", &env).expect("parses");
    assert!(c.validate().is_err());
    let c = Config::parse(
        "upstream:\n  host: db\nauth:\n  method: trust\nusers:\n  - name: a\n",
        &env,
    )
    .expect("parses");
    assert!(c.validate().is_ok());
}

#[test]
fn literal_dollar_brace_escape() {
    assert_eq!(expand_str("a$${b}", &env).expect("ok"), "a${b}");
    assert_eq!(expand_str("cost $5", &env).expect("ok"), "cost $5");
    assert!(expand_str("${unterminated", &env).is_err());
}

#[test]
fn shipped_example_is_valid() {
    let text = include_str!("../../proxy.yaml");
    let env = |k: &str| match k {
        "PGSIDECAR_UPSTREAM_PASSWORD" | "APP_PASSWORD" => Some("x".to_string()),
        _ => None,
    };
    let c = Config::parse(text, &env).expect("proxy.yaml parses");
    c.validate().expect("proxy.yaml is valid");
}

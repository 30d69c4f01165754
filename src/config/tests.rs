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

#[test]
fn managed_pool_settings_have_documented_defaults_and_are_validated() {
    let c = Config::parse(MINIMAL, &env).expect("parses");
    assert_eq!(c.pool.target_utilization, 0.8);
    assert_eq!(c.pool.shrink_delay, Duration::from_secs(30));
    assert!(c.pool.aimd);
    assert_eq!(c.pool.aimd_interval, Duration::from_secs(1));
    assert_eq!(c.breaker.on_open, BreakerOnOpen::FailFast);
    assert_eq!(c.health.check_query, "");
    assert_eq!(c.health.check_timeout, Duration::from_secs(2));
    assert_eq!(c.health.server_check_delay, Duration::from_secs(30));
    assert_eq!(c.health.idle_check_interval, Duration::from_secs(30));
    assert_eq!(c.health.probe_interval, Duration::from_secs(10));
    assert_eq!(c.health.probe_timeout, Duration::from_secs(5));

    let c = Config::parse(
        "upstream:\n  host: db\nauth:\n  method: trust\npool:\n  max_size: 7\n  min_size: 2\n  aimd: false\nbreaker:\n  on_open: queue\nhealth:\n  check_query: SELECT 1\n  server_check_delay: 0s\n",
        &env,
    )
    .expect("parses");
    assert_eq!((c.pool.size, c.pool.min_size, c.pool.aimd), (7, 2, false));
    assert_eq!(c.breaker.on_open, BreakerOnOpen::Queue);
    assert_eq!(c.health.server_check_delay, Duration::ZERO);
    c.validate().expect("valid");

    for bad in [
        "pool:\n  target_utilization: 0\n",
        "pool:\n  target_utilization: 1.5\n",
        "health:\n  check_timeout: 0s\n",
        "health:\n  probe_timeout: 0s\n",
        "pool:\n  aimd_interval: 0s\n",
    ] {
        let text = format!("upstream:\n  host: db\nauth:\n  method: trust\n{bad}");
        let c = Config::parse(&text, &env).expect("parses");
        let e = c.validate().expect_err(bad).to_string();
        assert!(
            e.contains("target_utilization") || e.contains("must be greater than 0"),
            "{e}"
        );
    }
    assert!(Config::parse("upstream:\n  host: db\nbreaker:\n  on_open: retry\n", &env).is_err());
}

#[test]
fn type_errors_name_the_key_and_syntax_errors_the_position() {
    let text = "upstream:\n  host: db\npool:\n  size: eight\n";
    match Config::parse(text, &env) {
        Err(ConfigError::Yaml { key, message }) => {
            assert_eq!(key, "pool.size");
            assert!(message.contains("eight"), "{message}");
            assert_eq!(super::checks::position_of(text, &key), Some((4, 9)));
        }
        other => panic!("{other:?}"),
    }
    match Config::parse("upstream:\n  host: [db\n", &env) {
        Err(ConfigError::YamlSyntax { line, .. }) => assert!(line >= 2),
        other => panic!("{other:?}"),
    }
}

#[test]
fn absurd_durations_and_malformed_verifiers_are_refused_at_check() {
    for (key, text) in [
        (
            "pool.query_wait_timeout",
            "pool:\n  query_wait_timeout: 317097919180years\n",
        ),
        ("pool.shrink_delay", "pool:\n  shrink_delay: 500000days\n"),
        (
            "breaker.backoff_cap",
            "breaker:\n  backoff_cap: 1000years\n",
        ),
        (
            "admin.shutdown_timeout",
            "admin:\n  shutdown_timeout: 400days\n",
        ),
    ] {
        let text = format!("upstream:\n  host: db\nauth:\n  method: trust\n{text}");
        let e = Config::parse(&text, &env)
            .expect("parses")
            .validate()
            .expect_err(key)
            .to_string();
        assert!(e.contains(key) && e.contains("365 days"), "{e}");
    }
    // A verifier with a broken stored key is not a plaintext password.
    let text = "upstream:\n  host: db\nusers:\n  - name: app\n    password: \"SCRAM-SHA-256$4096:c2FsdA==$bm90LWEta2V5:bm90LWEta2V5\"\n";
    let e = Config::parse(text, &env)
        .expect("parses")
        .validate()
        .expect_err("malformed verifier")
        .to_string();
    assert!(e.contains("\"app\""), "{e}");
}

#[test]
fn session_state_policy_defaults_to_pin_and_takes_only_known_values() {
    let c = Config::parse(MINIMAL, &env).expect("parses");
    assert_eq!(c.pool.session_state, SessionStatePolicy::Pin);
    for (text, want) in [
        ("reject", SessionStatePolicy::Reject),
        ("allow", SessionStatePolicy::Allow),
        ("pin", SessionStatePolicy::Pin),
    ] {
        let c = Config::parse(
            &format!("upstream:\n  host: db\npool:\n  session_state: {text}\n"),
            &env,
        )
        .expect("parses");
        assert_eq!(c.pool.session_state, want);
    }
    let e = Config::parse(
        "upstream:\n  host: db\npool:\n  session_state: sometimes\n",
        &env,
    )
    .expect_err("unknown policy");
    assert!(e.to_string().contains("pin"), "{e}");
}

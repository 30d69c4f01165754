//! Every failure visible and bounded: upstream login failures, rejected logins, metric
//! cardinality, refusals at the client cap, startup options, queue mode through an
//! outage or a restart, PAUSE, and the config check. Against real PostgreSQL clusters.

mod common;

use std::process::Command;

/// `pgsidecar check` refuses a logging.level the running proxy would honour by
/// printing nothing, naming the key and its line.
#[test]
fn config_check_rejects_an_unknown_log_level_with_key_and_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.yaml");
    let text = "upstream:\n  host: 127.0.0.1\nauth:\n  method: trust\nlogging:\n  format: text\n  level: verbose\n";
    std::fs::write(&path, text).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_pgsidecar"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run pgsidecar check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check must fail: {stderr}");
    assert!(stderr.contains("logging.level"), "{stderr}");
    assert!(stderr.contains("\"verbose\""), "{stderr}");
    assert!(stderr.contains("line 7"), "{stderr}");
    // A filter the docs give passes.
    std::fs::write(&path, text.replace("verbose", "pgsidecar=debug,warn")).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_pgsidecar"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run pgsidecar check");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

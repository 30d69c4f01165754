//! Secrets never leak: client passwords, the upstream password and the admin token
//! must not appear in logs (TRACE level), /metrics, /api/pools, error messages sent to
//! clients, or the configuration's Debug output, whatever logins succeed or fail.

mod common;
mod security_util;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use pgsidecar::config::{AuthMethod, UserConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT_PW: &str = "Cl1ent-Pa55-7f3a9";
const MD5_CLIENT_PW: &str = "Md5-Cl1ent-Pa55-41c2";
const UPSTREAM_PW: &str = APP_PASSWORD;
const WRONG_UPSTREAM_PW: &str = "Wr0ng-Upstream-Pa55-88d1";
const ADMIN_TOKEN: &str = "Adm1n-T0ken-5e6b2";
const WRONG_CLIENT_PW: &str = "Wr0ng-Cl1ent-Pa55-0b7e";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber per binary");
        logs
    })
    .clone()
}

fn user(name: &str, password: &str) -> UserConfig {
    serde_yaml::from_str(&format!("name: {name}\npassword: \"{password}\"")).expect("user")
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut out = String::new();
    within(
        Duration::from_secs(10),
        "admin answer",
        s.read_to_string(&mut out),
    )
    .await
    .expect("read answer");
    out
}

/// Every form in which a secret could show up.
fn forms(secret: &str, user: &str) -> Vec<String> {
    use md5::{Digest, Md5};
    let inner = format!("{:x}", Md5::digest(format!("{secret}{user}")));
    vec![secret.to_string(), format!("md5{inner}")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_logs_metrics_admin_and_errors() {
    let logs = capture_logs();
    let pg = shared_cluster(ClusterAuth::Scram);
    let mut seen = String::new();
    bounded(async {
        let scram = start_proxy(&pg, |c| {
            c.auth.method = AuthMethod::ScramSha256;
            c.users = vec![user(APP_USER, CLIENT_PW)];
            c.upstream.user = Some(APP_USER.into());
            c.upstream.password = Some(UPSTREAM_PW.into());
            c.admin.token = Some(ADMIN_TOKEN.into());
        })
        .await;
        let md5 = start_proxy(&pg, |c| {
            c.auth.method = AuthMethod::Md5;
            c.users = vec![user(APP_USER, MD5_CLIENT_PW)];
            c.upstream.user = Some(APP_USER.into());
            c.upstream.password = Some(UPSTREAM_PW.into());
        })
        .await;
        let broken_upstream = start_proxy(&pg, |c| {
            c.auth.method = AuthMethod::ScramSha256;
            c.users = vec![user(APP_USER, CLIENT_PW)];
            c.upstream.user = Some(APP_USER.into());
            c.upstream.password = Some(WRONG_UPSTREAM_PW.into());
        })
        .await;
        let admin = pgsidecar::admin::serve("127.0.0.1:0", pgsidecar::app::admin_of(&scram.shared))
            .await
            .expect("admin");

        // Right password, wrong password, unknown user, on both auth methods.
        let good = connect(&proxy_url_pw(&scram, APP_USER, CLIENT_PW, "postgres")).await;
        assert_eq!(simple_one(&good, "select current_user").await, APP_USER);
        let good_md5 = connect(&proxy_url_pw(&md5, APP_USER, MD5_CLIENT_PW, "postgres")).await;
        assert_eq!(simple_one(&good_md5, "select 1").await, "1");
        let mut errors = Vec::new();
        for (proxy, user, pw) in [
            (&scram, APP_USER, WRONG_CLIENT_PW),
            (&scram, "nobody_here", CLIENT_PW),
            (&md5, APP_USER, WRONG_CLIENT_PW),
            (&md5, "nobody_here", MD5_CLIENT_PW),
            (&broken_upstream, APP_USER, CLIENT_PW),
        ] {
            let Err(e) = try_connect(
                &proxy_url_pw(proxy, user, pw, "postgres"),
                Duration::from_secs(10),
            )
            .await
            else {
                panic!("login must fail");
            };
            assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e:?}");
            errors.push(format!("{e:?}"));
        }
        // Unknown user and wrong password look the same to the client.
        let strip = |s: &str, u: &str| s.replace(u, "<user>");
        assert_eq!(
            strip(&errors[0], APP_USER),
            strip(&errors[1], "nobody_here")
        );
        assert_eq!(
            strip(&errors[2], APP_USER),
            strip(&errors[3], "nobody_here")
        );

        seen.push_str(&errors.join("\n"));
        seen.push_str(&http_get(admin, "/metrics").await);
        seen.push_str(&http_get(admin, "/api/pools").await);
        for p in [&scram, &md5, &broken_upstream] {
            seen.push_str(&format!("{:?}", p.shared.registry.config()));
            seen.push_str(&serde_json::to_string(&*p.shared.registry.config()).unwrap_or_default());
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log_text =
        String::from_utf8_lossy(&logs.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    assert!(
        log_text.contains("TRACE") || log_text.contains("DEBUG"),
        "logs were captured"
    );
    seen.push_str(&log_text);
    for (secret, user) in [
        (CLIENT_PW, APP_USER),
        (MD5_CLIENT_PW, APP_USER),
        (WRONG_CLIENT_PW, APP_USER),
        (UPSTREAM_PW, APP_USER),
        (WRONG_UPSTREAM_PW, APP_USER),
        (ADMIN_TOKEN, ""),
    ] {
        for form in forms(secret, user) {
            if let Some(at) = seen.find(&form) {
                let from = at.saturating_sub(200);
                panic!(
                    "secret {form:?} leaked: ...{}...",
                    &seen[from..(at + form.len() + 50).min(seen.len())]
                );
            }
        }
    }
}

/// The exchange an unknown user sees is the one a known user with a wrong password sees:
/// same messages in the same order, same SCRAM parameters, same error.
#[tokio::test]
async fn unknown_user_and_wrong_password_follow_the_same_sequence() {
    use common::raw::{fe, startup_packet, RawConn};
    let pg = shared_cluster(ClusterAuth::Trust);
    bounded(async {
        let proxy = start_proxy(&pg, |c| {
            c.auth.method = AuthMethod::ScramSha256;
            c.users = vec![user("known_user", CLIENT_PW)];
            c.upstream.user = Some("postgres".into());
        })
        .await;
        let mut shapes = Vec::new();
        for name in ["known_user", "unknown_user"] {
            let mut c = RawConn::connect(proxy.addr).await;
            c.send(&startup_packet(196608, &[("user", name)])).await;
            let sasl = c.read_msg().await;
            let mut first = b"SCRAM-SHA-256\0".to_vec();
            let data = b"n,,n=,r=0123456789abcdefghijklmn";
            first.extend_from_slice(&(data.len() as i32).to_be_bytes());
            first.extend_from_slice(data);
            c.send(&fe(b'p', &first)).await;
            let cont = c.read_msg().await;
            let server_first = String::from_utf8_lossy(&cont.body[4..]).into_owned();
            let nonce = server_first
                .split(',')
                .find_map(|f| f.strip_prefix("r="))
                .expect("nonce")
                .to_string();
            let fin = format!("c=biws,r={nonce},p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
            c.send(&fe(b'p', fin.as_bytes())).await;
            let err = c.read_msg().await;
            let salt_len = server_first
                .split(',')
                .find_map(|f| f.strip_prefix("s="))
                .map(str::len);
            let iterations = server_first
                .split(',')
                .find_map(|f| f.strip_prefix("i="))
                .map(str::to_string);
            shapes.push((
                sasl.tag,
                sasl.body.to_vec(),
                cont.tag,
                cont.body[..4] == [0, 0, 0, 11],
                salt_len,
                iterations,
                err.tag,
                err.code(),
                err.field(b'M').map(|m| m.replace(name, "<user>")),
                c.try_read_msg().await.is_none(),
            ));
        }
        assert_eq!(shapes[0], shapes[1]);
        assert_eq!(shapes[0].7.as_deref(), Some("28P01"));
    })
    .await;
}

/// A TLS client that drops its connection without close_notify is an ordinary end of
/// session: no warning or error is logged for it (one line per such client would be
/// log spam), and the server goes back to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_without_close_notify_is_a_quiet_eof() {
    use common::raw::{ssl_request, startup_packet};
    use security_util::{client_config, Pki};
    let logs = capture_logs();
    let pg = shared_cluster(ClusterAuth::Trust);
    bounded(async {
        let pki = Pki::new("eof-ca");
        let leaf = pki.leaf("eof-proxy", &["localhost"]);
        let proxy = start_proxy(&pg, |c| {
            c.tls.cert_file = Some(leaf.cert.clone());
            c.tls.key_file = Some(leaf.key.clone());
            c.pool.size = 1;
        })
        .await;
        for _ in 0..3 {
            let mut tcp = tokio::net::TcpStream::connect(proxy.addr)
                .await
                .expect("tcp");
            tcp.write_all(&ssl_request()).await.expect("ssl request");
            let mut s = [0u8; 1];
            tcp.read_exact(&mut s).await.expect("answer");
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_config(
                pki.roots(),
                false,
            )));
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let mut tls = connector.connect(name, tcp).await.expect("handshake");
            tls.write_all(&startup_packet(
                196608,
                &[("user", "postgres"), ("database", "postgres")],
            ))
            .await
            .expect("startup");
            tls.write_all(&common::raw::query_msg("begin; select 1"))
                .await
                .expect("query");
            tls.flush().await.expect("flush");
            let mut buf = vec![0u8; 4096];
            let _ = within(Duration::from_secs(5), "answers", tls.read(&mut buf)).await;
            // Drop the TCP connection under the TLS session: no close_notify.
            let (tcp, _) = tls.into_inner();
            drop(tcp);
        }
        // The only server was rolled back and returned each time.
        let c = connect(&proxy_url(&proxy, "postgres", "postgres")).await;
        assert_eq!(simple_one(&c, "select 1").await, "1");
    })
    .await;
    let text =
        String::from_utf8_lossy(&logs.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let noisy: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            ["eof", "close_notify", "peer closed", "tls"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect();
    assert!(noisy.is_empty(), "{noisy:#?}");
}

//! A misbehaving backend: a fake server speaking just enough of the protocol, then
//! sending malformed messages. The proxy must not crash, must give the client a clean
//! error, and must keep serving.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;
use pgsidecar::config::{Config, UpstreamConfig};
use pgsidecar::proxy::Proxy;
use pgsidecar::tls::SslMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug)]
enum Bad {
    /// Login fails with an ErrorResponse that has no SQLSTATE (CVE-2026-6666 class).
    LoginErrorWithoutCode,
    /// A message with a length of 2^31-1 during login.
    LoginHugeLength,
    /// SCRAM with a server nonce that does not extend the client's, 500 kB long
    /// (CVE-2026-6665 class).
    ScramBadNonce,
    /// Random bytes instead of an answer.
    LoginGarbage,
    /// SSLRequest answered with an ErrorResponse (CVE-2024-10977 class).
    SslAnsweredWithError,
    /// Logs in; queries then get: an error without SQLSTATE, a negative length, garbage.
    AfterLogin,
    /// Logs in; never answers a query nor a cancel.
    Silent,
    /// Logs in; answers a query with the header of a 768 MiB RowDescription, then waits.
    HugeRowDescription,
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn login_ok() -> Vec<u8> {
    let mut out = msg(b'R', &0i32.to_be_bytes());
    out.extend(msg(b'S', b"server_version\x0015.0\x00"));
    out.extend(msg(b'S', b"client_encoding\x00UTF8\x00"));
    out.extend(msg(b'K', &[0, 0, 0, 42, 0, 0, 0, 7]));
    out.extend(msg(b'Z', b"I"));
    out
}

/// Reads the opening; answers SSLRequest per scenario. None: a cancel or EOF.
async fn read_startup(s: &mut TcpStream, bad: Bad) -> Option<()> {
    loop {
        let len = s.read_i32().await.ok()?;
        let mut body = vec![0u8; (len.clamp(4, 10_000) - 4) as usize];
        s.read_exact(&mut body).await.ok()?;
        match body.get(..4) {
            Some([0x04, 0xd2, 0x16, 0x2f]) => {
                if let Bad::SslAnsweredWithError = bad {
                    let _ = s
                        .write_all(&msg(b'E', b"SFATAL\0C28000\0Mattacker supplied text\0\0"))
                        .await;
                    return None;
                }
                s.write_all(b"N").await.ok()?;
            }
            Some([0x04, 0xd2, 0x16, 0x2e]) => return None, // cancel: ignored
            _ => return Some(()),
        }
    }
}

async fn serve_fake(mut s: TcpStream, bad: Bad) {
    if read_startup(&mut s, bad).await.is_none() {
        return;
    }
    let _ = match bad {
        Bad::LoginErrorWithoutCode => {
            s.write_all(&msg(b'E', b"SFATAL\0Mno sqlstate here\0\0"))
                .await
        }
        Bad::LoginHugeLength => s.write_all(&[b'R', 0x7f, 0xff, 0xff, 0xff, 0, 0]).await,
        Bad::LoginGarbage => {
            s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3, 0xff, 0x13])
                .await
        }
        Bad::ScramBadNonce => {
            let mut sasl = 10i32.to_be_bytes().to_vec();
            sasl.extend_from_slice(b"SCRAM-SHA-256\0\0");
            let _ = s.write_all(&msg(b'R', &sasl)).await;
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await; // SASLInitialResponse
            let mut cont = 11i32.to_be_bytes().to_vec();
            cont.extend_from_slice(b"r=");
            cont.extend(std::iter::repeat_n(b'A', 500_000));
            cont.extend_from_slice(b",s=c2FsdA==,i=4096");
            s.write_all(&msg(b'R', &cont)).await
        }
        Bad::HugeRowDescription => {
            if s.write_all(&login_ok()).await.is_err() {
                return;
            }
            let _ = s.read(&mut [0u8; 1024]).await;
            let _ = s.write_all(&[b'T', 0x30, 0, 0, 0, 0, 1]).await;
            let _ = tokio::time::timeout(Duration::from_secs(20), s.read(&mut [0u8; 64])).await;
            return;
        }
        Bad::AfterLogin | Bad::Silent => {
            if s.write_all(&login_ok()).await.is_err() {
                return;
            }
            // Answers by query text, so the proxy's own health-check queries get a
            // normal (empty) answer and the scenario stays deterministic.
            let mut buf = Vec::new();
            loop {
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if let Bad::Silent = bad {
                    continue;
                }
                while buf.len() >= 5 {
                    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                    if buf.len() < 1 + len {
                        break;
                    }
                    let frame: Vec<u8> = buf.drain(..1 + len).collect();
                    let text = String::from_utf8_lossy(&frame[5..]).into_owned();
                    let reply = if frame[0] != b'Q' {
                        continue;
                    } else if text.starts_with("select 2") {
                        vec![b'C', 0xff, 0xff, 0xff, 0xf0]
                    } else if text.starts_with("select garbage") {
                        vec![0x00, 0x13, 0x37, 0xff, 0xfe, 0x00, 0x01]
                    } else if text.starts_with("select") {
                        let mut r = msg(b'E', b"SERROR\0Mno sqlstate\0\0");
                        r.extend(msg(b'Z', b"I"));
                        r
                    } else {
                        let mut r = msg(b'I', b"");
                        r.extend(msg(b'Z', b"I"));
                        r
                    };
                    if s.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            }
        }
        Bad::SslAnsweredWithError => Ok(()),
    };
    // Hold the socket a moment so the proxy reads what was sent.
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut [0u8; 64])).await;
}

async fn fake_backend(bad: Bad) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve_fake(s, bad));
        }
    });
    addr
}

async fn proxy_for(upstream: SocketAddr, adjust: impl FnOnce(&mut Config)) -> Proxy {
    let mut cfg = Config::with_upstream(UpstreamConfig::new("127.0.0.1".into(), upstream.port()));
    cfg.listen = "127.0.0.1:0".into();
    cfg.auth.method = pgsidecar::config::AuthMethod::Trust;
    cfg.upstream.connect_timeout = Duration::from_secs(3);
    cfg.upstream.tls.sslmode = SslMode::Disable;
    adjust(&mut cfg);
    cfg.validate().expect("valid");
    pgsidecar::app::start(cfg).await.expect("proxy starts")
}

/// Messages up to ReadyForQuery or the close of the connection.
async fn read_some(c: &mut RawConn) -> Vec<Msg> {
    let mut out = Vec::new();
    while let Some(m) = c.try_read_msg().await {
        let done = m.tag == b'Z';
        out.push(m);
        if done {
            break;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_login_answers_give_clients_a_clean_error() {
    bounded(async {
        for bad in [
            Bad::LoginErrorWithoutCode,
            Bad::LoginHugeLength,
            Bad::ScramBadNonce,
            Bad::LoginGarbage,
        ] {
            let up = fake_backend(bad).await;
            let proxy = proxy_for(up, |c| {
                c.upstream.password = Some("pw".into());
            })
            .await;
            for _ in 0..2 {
                let mut c = RawConn::connect(proxy.addr).await;
                c.send(&startup_packet(196608, &[("user", "u"), ("database", "d")]))
                    .await;
                let msgs = read_some(&mut c).await;
                let e = msgs
                    .iter()
                    .find(|m| m.tag == b'E')
                    .unwrap_or_else(|| panic!("{bad:?}: no error in {msgs:?}"));
                let code = e.code().unwrap_or_default();
                assert!(
                    code.len() == 5 && (code.starts_with("08") || code.starts_with("57")),
                    "{bad:?}: {code} {:?}",
                    e.field(b'M')
                );
                assert!(
                    c.try_read_msg().await.is_none(),
                    "{bad:?}: closed after FATAL"
                );
            }
        }
    })
    .await;
}

#[tokio::test]
async fn an_ssl_refusal_text_from_the_server_is_not_relayed() {
    bounded(async {
        let up = fake_backend(Bad::SslAnsweredWithError).await;
        let proxy = proxy_for(up, |c| c.upstream.tls.sslmode = SslMode::Prefer).await;
        let mut c = RawConn::connect(proxy.addr).await;
        c.send(&startup_packet(196608, &[("user", "u"), ("database", "d")]))
            .await;
        let msgs = read_some(&mut c).await;
        let e = msgs.iter().find(|m| m.tag == b'E').expect("error");
        assert_eq!(e.code().as_deref(), Some("08006"));
        let text = format!("{:?} {:?}", e.field(b'M'), e.field(b'H'));
        assert!(!text.contains("attacker supplied text"), "{text}");
    })
    .await;
}

#[tokio::test]
async fn malformed_messages_mid_session_close_only_that_server() {
    bounded(async {
        let up = fake_backend(Bad::AfterLogin).await;
        let proxy = proxy_for(up, |c| c.pool.size = 2).await;
        for _ in 0..2 {
            let mut c = RawConn::login(proxy.addr, "u", "d").await;
            // An ErrorResponse without SQLSTATE is passed on as it is.
            let msgs = c.query("select 1").await;
            assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
            assert_eq!(msgs[0].code(), None);
            // A negative length: the server is dropped, the client told.
            c.send(&query_msg("select 2")).await;
            let msgs = read_some(&mut c).await;
            let e = msgs.iter().find(|m| m.tag == b'E').expect("error");
            assert_eq!(e.code().as_deref(), Some("08006"), "{msgs:?}");
            assert!(c.try_read_msg().await.is_none());
        }
        // Garbage instead of an answer: the same.
        let mut c = RawConn::login(proxy.addr, "u", "d").await;
        c.send(&query_msg("select garbage")).await;
        let msgs = read_some(&mut c).await;
        let e = msgs.iter().find(|m| m.tag == b'E').expect("error");
        assert_eq!(e.code().as_deref(), Some("08006"), "{msgs:?}");
        // The proxy is still up and serving (a fresh server connection).
        let mut c = RawConn::login(proxy.addr, "u", "d").await;
        assert_eq!(tags(&c.query("select 3").await), "EZ");
    })
    .await;
}

/// query_timeout against a server that ignores the cancel: FATAL 57014 after the grace.
#[tokio::test]
async fn query_timeout_closes_a_server_that_ignores_the_cancel() {
    bounded(async {
        let up = fake_backend(Bad::Silent).await;
        let proxy = proxy_for(up, |c| {
            c.limits.query_timeout = Some(Duration::from_millis(300))
        })
        .await;
        let mut c = RawConn::login(proxy.addr, "u", "d").await;
        let started = Instant::now();
        c.send(&query_msg("select forever")).await;
        let msgs = read_some(&mut c).await;
        let e = msgs.iter().find(|m| m.tag == b'E').expect("error");
        assert_eq!(e.code().as_deref(), Some("57014"));
        assert_eq!(e.field(b'V').as_deref(), Some("FATAL"));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(5) && took < Duration::from_secs(9),
            "{took:?}"
        );
        assert!(c.try_read_msg().await.is_none());
    })
    .await;
}

/// A server announcing a huge message of a kind the proxy must buffer whole is dropped at
/// once, instead of making the proxy wait for (and hold) hundreds of megabytes.
#[tokio::test]
async fn a_huge_non_row_message_from_the_server_is_refused_at_once() {
    bounded(async {
        let up = fake_backend(Bad::HugeRowDescription).await;
        let proxy = proxy_for(up, |_| {}).await;
        let mut c = RawConn::login(proxy.addr, "u", "d").await;
        let started = Instant::now();
        c.send(&query_msg("select 1")).await;
        let msgs = read_some(&mut c).await;
        let e = msgs.iter().find(|m| m.tag == b'E').expect("error");
        assert_eq!(e.code().as_deref(), Some("08006"));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    })
    .await;
}

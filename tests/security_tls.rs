//! TLS between clients and the proxy, and between the proxy and PostgreSQL.

mod common;
mod security_util;

use std::sync::Arc;
use std::time::Duration;

use common::raw::{ssl_request, startup_packet, RawConn};
use common::*;
use pgsidecar::tls::{ClientTlsConfig, ClientTlsMode, SslMode, UpstreamTlsConfig};
use security_util::{client_config, give_to_owner_of, psql, Leaf, Pki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn client_tls(leaf: &Leaf, mode: Option<ClientTlsMode>) -> ClientTlsConfig {
    ClientTlsConfig {
        cert_file: Some(leaf.cert.clone()),
        key_file: Some(leaf.key.clone()),
        mode,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_require_and_verify_full_through_the_proxy() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let pki = Pki::new("proxy-ca");
        let leaf = pki.leaf("proxy", &["localhost", "127.0.0.1"]);
        let proxy = start_proxy(&pg, |c| {
            c.tls = client_tls(&leaf, Some(ClientTlsMode::Require));
        })
        .await;
        let port = proxy.addr.port();
        let base = format!("port={port} user=postgres dbname=postgres");

        let out = psql(
            &format!("host=127.0.0.1 {base} sslmode=require"),
            "select 40 + 2",
        )
        .await;
        assert!(out.ok, "sslmode=require: {out:?}");
        assert_eq!(out.stdout, "42");

        let ca = pki.ca_file.display();
        let out = psql(
            &format!("host=localhost {base} sslmode=verify-full sslrootcert={ca}"),
            "select 'verified'",
        )
        .await;
        assert!(out.ok, "sslmode=verify-full: {out:?}");
        assert_eq!(out.stdout, "verified");

        // A client trusting another CA must refuse the proxy's certificate.
        let other = Pki::new("other-ca");
        let out = psql(
            &format!(
                "host=localhost {base} sslmode=verify-full sslrootcert={}",
                other.ca_file.display()
            ),
            "select 1",
        )
        .await;
        assert!(!out.ok, "a foreign CA must not verify: {out:?}");

        // Plaintext is refused with a clear message.
        let out = psql(
            &format!("host=127.0.0.1 {base} sslmode=disable"),
            "select 1",
        )
        .await;
        assert!(!out.ok);
        assert!(out.stderr.contains("SSL required"), "{out:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_over_rustls_verify_full() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let pki = Pki::new("proxy-ca");
        let leaf = pki.leaf("proxy", &["localhost"]);
        let proxy = start_proxy(&pg, |c| c.tls = client_tls(&leaf, None)).await;
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_config(pki.roots(), false));
        let url = format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode=require",
            proxy.addr.port()
        );
        let (client, conn) = within(
            Duration::from_secs(10),
            "TLS connect",
            tokio_postgres::connect(&url, tls),
        )
        .await
        .expect("TLS connect through the proxy");
        tokio::spawn(conn);
        let row = client
            .query_one("select $1::int + 1", &[&41i32])
            .await
            .expect("extended query over TLS");
        assert_eq!(row.get::<_, i32>(0), 42);
        // The default mode with a certificate lets loopback clients use plaintext.
        let plain = connect(&proxy_url(&proxy, "postgres", "postgres")).await;
        assert_eq!(simple_one(&plain, "select 7").await, "7");
    })
    .await;
}

#[tokio::test]
async fn plaintext_startup_is_refused_when_tls_is_required() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let pki = Pki::new("proxy-ca");
        let leaf = pki.leaf("proxy", &["localhost"]);
        let proxy = start_proxy(&pg, |c| {
            c.tls = client_tls(&leaf, Some(ClientTlsMode::Require))
        })
        .await;
        let mut c = RawConn::connect(proxy.addr).await;
        c.send(&startup_packet(196608, &[("user", "postgres")]))
            .await;
        let m = c.read_msg().await;
        assert_eq!(m.tag, b'E');
        assert_eq!(m.code().as_deref(), Some("28000"));
        assert_eq!(m.field(b'S').as_deref(), Some("FATAL"));
        assert!(c.try_read_msg().await.is_none(), "closed after the error");
    })
    .await;
}

/// CVE-2021-23214 class: plaintext pipelined after SSLRequest must never be trusted.
#[tokio::test]
async fn bytes_after_ssl_request_are_a_protocol_violation() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let pki = Pki::new("proxy-ca");
        let leaf = pki.leaf("proxy", &["localhost"]);
        let with_tls = start_proxy(&pg, |c| {
            c.tls = client_tls(&leaf, Some(ClientTlsMode::Allow))
        })
        .await;
        let without_tls = start_proxy(&pg, |_| {}).await;
        for addr in [with_tls.addr, without_tls.addr] {
            let mut c = RawConn::connect(addr).await;
            let mut both = ssl_request();
            both.extend_from_slice(&startup_packet(196608, &[("user", "postgres")]));
            c.send(&both).await;
            let m = c.read_msg().await;
            assert_eq!(m.tag, b'E', "no 'S'/'N' answer, an error");
            assert_eq!(m.code().as_deref(), Some("08P01"));
            assert!(
                m.field(b'M')
                    .unwrap_or_default()
                    .contains("unencrypted data after SSL request"),
                "{m:?}"
            );
            assert!(c.try_read_msg().await.is_none());
        }
    })
    .await;
}

#[tokio::test]
async fn ssl_request_answers_follow_the_configuration() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let pki = Pki::new("proxy-ca");
        let leaf = pki.leaf("proxy", &["localhost"]);
        let disabled = start_proxy(&pg, |c| {
            c.tls = client_tls(&leaf, Some(ClientTlsMode::Disable))
        })
        .await;
        let mut c = RawConn::connect(disabled.addr).await;
        c.send(&ssl_request()).await;
        assert_eq!(c.read_bytes(1).await, b"N");
        // A second SSLRequest is refused (bounded negotiation).
        c.send(&ssl_request()).await;
        let m = c.read_msg().await;
        assert_eq!(m.code().as_deref(), Some("08P01"));

        let allow = start_proxy(&pg, |c| {
            c.tls = client_tls(&leaf, Some(ClientTlsMode::Allow))
        })
        .await;
        let mut c = RawConn::connect(allow.addr).await;
        c.send(&ssl_request()).await;
        assert_eq!(c.read_bytes(1).await, b"S");
        // Plaintext still works in allow mode.
        let mut p = RawConn::login(allow.addr, "postgres", "postgres").await;
        assert_eq!(p.query_rows("select 1").await, vec![vec![Some("1".into())]]);
    })
    .await;
}

/// PostgreSQL 17 direct TLS: the client starts with a ClientHello and ALPN "postgresql".
#[tokio::test]
async fn direct_tls_requires_alpn_postgresql() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let pki = Pki::new("proxy-ca");
        let leaf = pki.leaf("proxy", &["localhost"]);
        let proxy = start_proxy(&pg, |c| {
            c.tls = client_tls(&leaf, Some(ClientTlsMode::Require))
        })
        .await;
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");

        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(client_config(pki.roots(), true)));
        let tcp = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .expect("tcp");
        let mut tls = connector
            .connect(name.clone(), tcp)
            .await
            .expect("direct TLS handshake");
        tls.write_all(&startup_packet(
            196608,
            &[("user", "postgres"), ("database", "postgres")],
        ))
        .await
        .expect("send startup");
        let mut buf = vec![0u8; 9];
        tls.read_exact(&mut buf).await.expect("auth answer");
        assert_eq!(
            &buf,
            &[b'R', 0, 0, 0, 8, 0, 0, 0, 0],
            "AuthenticationOk over direct TLS"
        );

        // Without ALPN the proxy closes the connection after the handshake.
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(client_config(pki.roots(), false)));
        let tcp = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .expect("tcp");
        if let Ok(mut tls) = connector.connect(name, tcp).await {
            let _ = tls
                .write_all(&startup_packet(196608, &[("user", "postgres")]))
                .await;
            let mut b = [0u8; 1];
            let n = within(Duration::from_secs(10), "close", tls.read(&mut b)).await;
            assert!(!matches!(n, Ok(n) if n > 0), "no answer without ALPN");
        }
    })
    .await;
}

/// A cluster that speaks TLS with a certificate for "localhost" from `pki`.
fn tls_cluster(pki: &Pki) -> PgCluster {
    let pg = PgCluster::start_with(ClusterOptions {
        auth: ClusterAuth::Trust,
        ..Default::default()
    });
    let leaf = pki.leaf("postgres-server", &["localhost"]);
    give_to_owner_of(&leaf, pg.base_dir());
    pg.exec(&format!(
        "ALTER SYSTEM SET ssl_cert_file = '{}'",
        leaf.cert.display()
    ));
    pg.exec(&format!(
        "ALTER SYSTEM SET ssl_key_file = '{}'",
        leaf.key.display()
    ));
    pg.exec("ALTER SYSTEM SET ssl = on");
    pg.exec("SELECT pg_reload_conf()");
    for _ in 0..100 {
        if pg.psql("SHOW ssl") == "on" {
            return pg;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("ssl did not turn on: {}", pg.log_contents());
}

fn upstream_tls(sslmode: SslMode, root: Option<&Pki>) -> UpstreamTlsConfig {
    UpstreamTlsConfig {
        sslmode,
        root_cert: root.map(|p| p.ca_file.clone()),
        ..Default::default()
    }
}

const SSL_IN_USE: &str = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sslmodes_follow_libpq() {
    let pki = Pki::new("pg-ca");
    let pg = tls_cluster(&pki);
    let wrong = Pki::new("wrong-ca");
    bounded(async {
        // verify-full by name.
        let p = start_proxy(&pg, |c| {
            c.upstream.host = "localhost".into();
            c.upstream.tls = upstream_tls(SslMode::VerifyFull, Some(&pki));
        })
        .await;
        let c = connect(&proxy_url(&p, "postgres", "postgres")).await;
        assert_eq!(
            simple_one(&c, SSL_IN_USE).await,
            "t",
            "verify-full link is TLS"
        );

        // verify-full to an address the certificate does not name fails ...
        let p = start_proxy(&pg, |c| {
            c.upstream.tls = upstream_tls(SslMode::VerifyFull, Some(&pki));
        })
        .await;
        let Err(e) = try_connect(
            &proxy_url(&p, "postgres", "postgres"),
            Duration::from_secs(10),
        )
        .await
        else {
            panic!("name mismatch must fail");
        };
        assert_eq!(e.code().map(|c| c.code()), Some("08006"), "{e}");
        // ... while verify-ca only checks the chain.
        let p = start_proxy(&pg, |c| {
            c.upstream.tls = upstream_tls(SslMode::VerifyCa, Some(&pki));
        })
        .await;
        let c = connect(&proxy_url(&p, "postgres", "postgres")).await;
        assert_eq!(simple_one(&c, SSL_IN_USE).await, "t");

        // An unknown CA fails verify-ca, and require with a root behaves like verify-ca.
        for mode in [SslMode::VerifyCa, SslMode::Require] {
            let p = start_proxy(&pg, |c| c.upstream.tls = upstream_tls(mode, Some(&wrong))).await;
            let e = try_connect(
                &proxy_url(&p, "postgres", "postgres"),
                Duration::from_secs(10),
            )
            .await
            .err()
            .unwrap_or_else(|| panic!("{mode:?} with the wrong CA must fail"));
            assert_eq!(e.code().map(|c| c.code()), Some("08006"), "{e}");
        }

        // require without a root, and prefer: encrypted, unverified.
        for mode in [SslMode::Require, SslMode::Prefer] {
            let p = start_proxy(&pg, |c| c.upstream.tls = upstream_tls(mode, None)).await;
            let c = connect(&proxy_url(&p, "postgres", "postgres")).await;
            assert_eq!(simple_one(&c, SSL_IN_USE).await, "t", "{mode:?}");
        }
        let p = start_proxy(&pg, |c| {
            c.upstream.tls = upstream_tls(SslMode::Disable, None)
        })
        .await;
        let c = connect(&proxy_url(&p, "postgres", "postgres")).await;
        assert_eq!(simple_one(&c, SSL_IN_USE).await, "f");
    })
    .await;

    // Against a server without SSL: prefer falls back, require fails.
    bounded(async {
        let plain = shared_cluster(ClusterAuth::Trust);
        let p = start_proxy(&plain, |c| {
            c.upstream.tls = upstream_tls(SslMode::Prefer, None)
        })
        .await;
        let c = connect(&proxy_url(&p, "postgres", "postgres")).await;
        assert_eq!(simple_one(&c, SSL_IN_USE).await, "f");
        let p = start_proxy(&plain, |c| {
            c.upstream.tls = upstream_tls(SslMode::Require, None)
        })
        .await;
        let Err(e) = try_connect(
            &proxy_url(&p, "postgres", "postgres"),
            Duration::from_secs(10),
        )
        .await
        else {
            panic!("require against a plaintext server must fail");
        };
        assert!(format!("{e:?}").contains("does not support SSL"), "{e:?}");
    })
    .await;
}

/// Queries, cancels and server reuse work over a TLS upstream link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_works_with_a_tls_upstream() {
    let pki = Pki::new("pg-ca");
    let pg = tls_cluster(&pki);
    bounded(async {
        let p = start_proxy(&pg, |c| {
            c.upstream.host = "localhost".into();
            c.upstream.tls = upstream_tls(SslMode::VerifyFull, Some(&pki));
            c.pool.size = 1;
        })
        .await;
        let c = connect(&proxy_url(&p, "postgres", "postgres")).await;
        let token = c.cancel_token();
        let slow = tokio::spawn(async move { c.simple_query("select pg_sleep(30)").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("send cancel");
        let r = within(Duration::from_secs(10), "cancelled query", slow)
            .await
            .expect("join");
        let Err(e) = r else {
            panic!("query must be cancelled");
        };
        assert_eq!(code_of(&e), "57014");
        let c2 = connect(&proxy_url(&p, "postgres", "postgres")).await;
        assert_eq!(simple_one(&c2, SSL_IN_USE).await, "t");
    })
    .await;
}

/// The certificate the proxy at `port` presents after SSLRequest.
async fn presented_cert(port: u16, pki: &Pki) -> Vec<u8> {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("tcp");
    tcp.write_all(&ssl_request()).await.expect("ssl request");
    let mut s = [0u8; 1];
    tcp.read_exact(&mut s).await.expect("answer");
    assert_eq!(&s, b"S");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(pki.roots(), false)));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    tls.get_ref().1.peer_certificates().expect("certs")[0].to_vec()
}

fn der_of(pem_file: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(pem_file)
        .expect("pem")
        .to_vec()
}

async fn post(port: u16, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("admin");
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("post");
    let mut out = String::new();
    let _ = within(
        Duration::from_secs(10),
        "admin answer",
        s.read_to_string(&mut out),
    )
    .await;
    out
}

/// SIGHUP and /api/reload share the reload path: it re-reads the certificate and key;
/// a broken file fails the reload and the previous certificate stays in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_certificate_and_keeps_it_on_bad_files() {
    use clap::Parser;
    let pg = shared_cluster(ClusterAuth::Trust);
    let pki = Pki::new("reload-ca");
    let first = pki.leaf("first", &["localhost"]);
    let second = pki.leaf("second", &["localhost"]);
    let live = Leaf {
        cert: pki.dir.path().join("live.crt"),
        key: pki.dir.path().join("live.key"),
    };
    let install = |l: &Leaf| {
        std::fs::copy(&l.cert, &live.cert).expect("copy cert");
        std::fs::copy(&l.key, &live.key).expect("copy key");
    };
    install(&first);
    let (port, admin) = (free_port(), free_port());
    let yaml = format!(
        "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\n\
         upstream: {{host: 127.0.0.1, port: {}, tls: {{sslmode: disable}}}}\n\
         auth: {{method: trust}}\n\
         tls: {{cert_file: {}, key_file: {}, mode: require}}\n",
        pg.port(),
        live.cert.display(),
        live.key.display()
    );
    let cfg_path = pki.dir.path().join("proxy.yaml");
    std::fs::write(&cfg_path, yaml).expect("write config");
    let cli =
        pgsidecar::cli::Cli::parse_from(["pgsidecar", "--config", &cfg_path.display().to_string()]);
    let config = cli.build_config().expect("config");
    config.validate().expect("valid");
    tokio::spawn(pgsidecar::app::run(cli, config));
    bounded(async {
        wait_until(Duration::from_secs(10), "proxy listening", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert_eq!(presented_cert(port, &pki).await, der_of(&first.cert));

        install(&second);
        let r = post(admin, "/api/reload").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert_eq!(presented_cert(port, &pki).await, der_of(&second.cert));

        std::fs::write(&live.key, "not a key").expect("break key");
        let r = post(admin, "/api/reload").await;
        assert!(
            !r.starts_with("HTTP/1.1 200"),
            "a bad key must fail the reload: {r}"
        );
        assert_eq!(
            presented_cert(port, &pki).await,
            der_of(&second.cert),
            "the previous certificate stays in use"
        );
    })
    .await;
}

//! Hostile input: malformed, truncated, oversized and out-of-order client traffic, and a
//! misbehaving backend. The proxy must answer with a clear error or close that one
//! connection, never hang (every read is bounded) and never disturb other clients.

mod common;

use std::time::Duration;

use common::raw::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads until the proxy closes the connection; returns the SQLSTATEs of the errors seen.
async fn errors_until_close(c: &mut RawConn) -> Vec<String> {
    let mut codes = Vec::new();
    let drain = async {
        while let Ok(tag) = c.stream.read_u8().await {
            let Ok(len) = c.stream.read_i32().await else {
                break;
            };
            let mut body = vec![0u8; (len.clamp(4, 1 << 20) - 4) as usize];
            if c.stream.read_exact(&mut body).await.is_err() {
                break;
            }
            if tag == b'E' {
                let m = Msg {
                    tag,
                    body: body.into(),
                };
                codes.push(m.code().unwrap_or_default());
            }
        }
    };
    within(
        Duration::from_secs(15),
        "proxy to close the connection",
        drain,
    )
    .await;
    codes
}

/// A tiny deterministic generator, so failures are reproducible.
struct Lcg(u64);
impl Lcg {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (self.0 >> 33) as u8
            })
            .collect()
    }
}

async fn assert_alive(addr: std::net::SocketAddr) {
    let mut c = RawConn::login(addr, "postgres", "postgres").await;
    assert_eq!(
        c.query_rows("select 'alive'").await,
        vec![vec![Some("alive".into())]]
    );
}

fn frame(tag: u8, len: i32, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(body);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_client_input_is_refused_and_others_are_unaffected() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        pg.exec("create table if not exists sec_hostile (v int)");
        let proxy = start_proxy(&pg, |c| c.pool.size = 4).await;
        let addr = proxy.addr;

        // A well-behaved client with a transaction open throughout.
        let mut good = RawConn::login(addr, "postgres", "postgres").await;
        good.query_rows("begin").await;
        good.query_rows("insert into sec_hostile values (1)").await;

        // Opening packets.
        let mut rng = Lcg(7);
        for n in [1usize, 3, 7, 8, 64, 512, 4096] {
            let mut c = RawConn::connect(addr).await;
            let junk = rng.bytes(n);
            c.send(&junk).await;
            // Short junk leaves the proxy waiting for the rest: end our side.
            let _ = c.stream.shutdown().await;
            let codes = errors_until_close(&mut c).await;
            assert!(
                codes.iter().all(|c| c == "08P01" || c == "0A000"),
                "{n}: {codes:?}"
            );
        }
        for len in [0i32, 4, 7, -1, i32::MIN, 10_001, i32::MAX] {
            let mut c = RawConn::connect(addr).await;
            let mut p = len.to_be_bytes().to_vec();
            p.extend_from_slice(&196608i32.to_be_bytes());
            c.send(&p).await;
            assert_eq!(
                errors_until_close(&mut c).await,
                vec!["08P01"],
                "startup length {len}"
            );
        }
        // A password message before any startup packet.
        let mut c = RawConn::connect(addr).await;
        c.send(&fe(b'p', b"hunter2\0")).await;
        assert_eq!(errors_until_close(&mut c).await, vec!["08P01"]);
        // Protocol versions: 2.0, 4.0 and garbage are refused; 3.9 is negotiated down.
        for v in [2 << 16, 4 << 16, 0x1234_5678] {
            let mut c = RawConn::connect(addr).await;
            c.send(&startup_packet(v, &[("user", "postgres")])).await;
            assert_eq!(
                errors_until_close(&mut c).await,
                vec!["0A000"],
                "version {v:#x}"
            );
        }
        let mut c = RawConn::connect(addr).await;
        c.send(&startup_packet(
            (3 << 16) | 9,
            &[("user", "postgres"), ("database", "postgres")],
        ))
        .await;
        let msgs = c.read_until_ready().await;
        assert_eq!(msgs[0].tag, b'v', "NegotiateProtocolVersion first");
        assert_eq!(c.query_rows("select 1").await.len(), 1);
        // Repeated SSLRequest / GSSENCRequest.
        for code in [80877103i32, 80877104] {
            let mut c = RawConn::connect(addr).await;
            let mut p = 8i32.to_be_bytes().to_vec();
            p.extend_from_slice(&code.to_be_bytes());
            c.send(&p).await;
            assert_eq!(c.read_bytes(1).await, b"N");
            c.send(&p).await;
            assert_eq!(errors_until_close(&mut c).await, vec!["08P01"]);
        }
        // A startup packet without a user.
        let mut c = RawConn::connect(addr).await;
        c.send(&startup_packet(196608, &[("database", "postgres")]))
            .await;
        assert_eq!(errors_until_close(&mut c).await, vec!["28000"]);

        // After login: bad lengths, unknown types, wrong message kinds.
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("negative length", frame(b'Q', -1, b""), "08P01"),
            ("length below 4", frame(b'Q', 3, b""), "08P01"),
            ("huge query", frame(b'Q', i32::MAX, b"select"), "54000"),
            ("huge small type", frame(b'S', 100_000, b""), "54000"),
            ("unknown type", frame(b'z', 4, b""), "08P01"),
            ("password after login", fe(b'p', b"x\0"), "08P01"),
            (
                "startup after login",
                startup_packet(196608, &[("user", "x")]),
                "08P01",
            ),
        ];
        for (what, bytes, code) in cases {
            let mut c = RawConn::login(addr, "postgres", "postgres").await;
            c.send(&bytes).await;
            assert_eq!(errors_until_close(&mut c).await, vec![code], "{what}");
        }
        // Garbage in the middle of a session, inside a transaction.
        for seed in 1..6u64 {
            let mut c = RawConn::login(addr, "postgres", "postgres").await;
            c.query_rows("begin").await;
            c.query_rows("insert into sec_hostile values (2)").await;
            let mut junk = Lcg(seed).bytes(300);
            junk[0] = b'!'; // never a valid type
            c.send(&junk).await;
            let codes = errors_until_close(&mut c).await;
            assert!(
                !codes.is_empty() && codes.iter().all(|c| c == "08P01"),
                "{codes:?}"
            );
        }

        // Truncated frames: the client announces more than it sends, then hangs up
        // (inside a transaction); the proxy lets go of it and of the server.
        for (tag, announced, sent) in [(b'Q', 100i32, 10usize), (b'P', 5000, 4000), (b'B', 9, 0)] {
            let mut c = RawConn::login(addr, "postgres", "postgres").await;
            c.query_rows("begin").await;
            let mut f = frame(tag, announced, &vec![b'x'; sent]);
            f.truncate(5 + sent);
            c.send(&f).await;
            let _ = c.stream.shutdown().await;
            assert!(
                errors_until_close(&mut c).await.is_empty(),
                "{}",
                tag as char
            );
        }

        // Out-of-order extended protocol: errors inside the protocol, session goes on.
        let mut c = RawConn::login(addr, "postgres", "postgres").await;
        let mut batch = bind_msg("", "never_parsed");
        batch.extend_from_slice(&execute_msg(""));
        batch.extend_from_slice(&sync_msg());
        c.send(&batch).await;
        let msgs = c.read_until_ready().await;
        assert_eq!(msgs[0].code().as_deref(), Some("26000"), "{msgs:?}");
        let mut batch = execute_msg("no_such_portal");
        batch.extend_from_slice(&sync_msg());
        c.send(&batch).await;
        let msgs = c.read_until_ready().await;
        assert_eq!(msgs[0].code().as_deref(), Some("34000"), "{msgs:?}");
        assert_eq!(c.query_rows("select 'still here'").await.len(), 1);

        // The other client's transaction never noticed.
        good.query_rows("insert into sec_hostile values (3)").await;
        assert_eq!(
            good.query_rows("select count(*) from sec_hostile where v in (1, 3)")
                .await,
            vec![vec![Some("2".into())]]
        );
        good.query_rows("rollback").await;
        assert_alive(addr).await;
    })
    .await;
}

#[tokio::test]
async fn one_byte_at_a_time_delivery_works() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |_| {}).await;
        let mut c = RawConn::connect(proxy.addr).await;
        async fn dribble(c: &mut RawConn, bytes: &[u8]) {
            for b in bytes {
                c.stream.write_all(&[*b]).await.expect("write");
                c.stream.flush().await.expect("flush");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        dribble(
            &mut c,
            &startup_packet(196608, &[("user", "postgres"), ("database", "postgres")]),
        )
        .await;
        c.finish_login().await;
        dribble(&mut c, &query_msg("select 6 * 7")).await;
        let msgs = c.read_until_ready().await;
        let row = msgs.iter().find(|m| m.tag == b'D').expect("row").row();
        assert_eq!(row, vec![Some("42".into())]);
        let mut ext = parse_msg("s_drib", "select 'ext'");
        ext.extend_from_slice(&bind_msg("", "s_drib"));
        ext.extend_from_slice(&execute_msg(""));
        ext.extend_from_slice(&close_msg(b'S', "s_drib"));
        ext.extend_from_slice(&sync_msg());
        dribble(&mut c, &ext).await;
        let msgs = c.read_until_ready().await;
        assert_eq!(tags(&msgs), "12DC3Z", "{msgs:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_a_wrong_key_does_nothing_and_says_nothing() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |_| {}).await;
        let mut c = RawConn::login(proxy.addr, "postgres", "postgres").await;
        c.send(&query_msg("select pg_sleep(1.2)")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (pid, secret) in [
            (c.pid, c.secret.wrapping_add(1)),
            (c.pid ^ 0x55, c.secret),
            (0, 0),
        ] {
            let mut x = RawConn::connect(proxy.addr).await;
            x.send(&cancel_request(pid, secret)).await;
            let mut buf = Vec::new();
            let n = within(
                Duration::from_secs(5),
                "cancel connection to close",
                x.stream.read_to_end(&mut buf),
            )
            .await
            .unwrap_or(0);
            assert_eq!(n, 0, "nothing is said to a cancel requester");
        }
        let msgs = c.read_until_ready().await;
        assert!(
            msgs.iter().all(|m| m.tag != b'E'),
            "query must not be cancelled: {msgs:?}"
        );
    })
    .await;
}

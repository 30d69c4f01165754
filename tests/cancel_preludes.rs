//! Every way libpq opens a cancel connection reaches the running query through the
//! proxy: the plain CancelRequest of `PQcancel`, and libpq 17+'s `PQcancelCreate`
//! (psycopg's `cancel_safe()`, used on Ctrl-C), which first asks for encryption on the
//! cancel connection as on a normal one (SSLRequest under `sslmode=prefer`, GSSENCRequest
//! before it under `gssencmode=prefer`), and sends the CancelRequest after the 'N'.

mod common;

use std::time::Duration;

use common::raw::{self, tags, RawConn};
use common::*;
use pgsidecar::config::PoolMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GSSENC_REQUEST_CODE: i32 = 80877104;

fn gssenc_request() -> Vec<u8> {
    let mut p = 8i32.to_be_bytes().to_vec();
    p.extend_from_slice(&GSSENC_REQUEST_CODE.to_be_bytes());
    p
}

/// Opens a cancel connection, sends `prelude` (each request answered 'N', as a proxy
/// without TLS or GSS does), then the CancelRequest; returns once the proxy closes it.
async fn cancel_after(proxy: &pgsidecar::proxy::Proxy, prelude: &[Vec<u8>], key: (i32, i32)) {
    let mut s = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect for cancel");
    for request in prelude {
        s.write_all(request).await.expect("encryption request");
        let mut answer = [0u8; 1];
        within(Duration::from_secs(5), "answer", s.read_exact(&mut answer))
            .await
            .expect("an answer to the encryption request");
        assert_eq!(answer[0], b'N', "no TLS/GSS configured: declined");
    }
    s.write_all(&raw::cancel_request(key.0, key.1))
        .await
        .expect("write cancel");
    let mut sink = [0u8; 1];
    let n = within(Duration::from_secs(5), "cancel close", s.read(&mut sink))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "a CancelRequest gets no answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_works_after_each_encryption_request_libpq_sends() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let admin = connect(&pg.superuser_url()).await;
        let preludes: [(&str, Vec<Vec<u8>>); 4] = [
            ("plain (PQcancel)", vec![]),
            ("SSLRequest first (PQcancelCreate, sslmode=prefer)", vec![raw::ssl_request()]),
            ("GSSENCRequest first", vec![gssenc_request()]),
            ("GSSENCRequest then SSLRequest", vec![gssenc_request(), raw::ssl_request()]),
        ];
        for mode in [PoolMode::Session, PoolMode::Transaction] {
            let proxy = start_proxy(&pg, |c| {
                c.pool_mode = mode;
                c.pool.size = 2;
            })
            .await;
            let mut r = RawConn::login(proxy.addr, SUPERUSER, "postgres").await;
            for (i, (how, prelude)) in preludes.iter().enumerate() {
                let marker = format!("prelude_{mode}_{i}");
                r.send(&raw::query_msg(&format!("select pg_sleep(30) /* {marker} */")))
                    .await;
                let sql = format!(
                    "select count(*) from pg_stat_activity where state = 'active' and query like '%{marker}%' and pid <> pg_backend_pid()"
                );
                wait_until(Duration::from_secs(10), &marker, || async {
                    admin.query_one(&sql, &[]).await.expect("activity").get::<_, i64>(0) > 0
                })
                .await;
                cancel_after(&proxy, prelude, (r.pid, r.secret)).await;
                let m = within(Duration::from_secs(3), how, r.read_until_ready()).await;
                assert_eq!(tags(&m), "TEZ", "{mode}, {how}: the query was cancelled");
                assert_eq!(m[1].code().as_deref(), Some("57014"), "{mode}, {how}");
            }
        }
    })
    .await
}

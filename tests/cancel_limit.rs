//! CancelRequests are rate-limited per source address (scenario list, cancel flood):
//! a flood of guesses from one address is cut to the bucket's budget and counted in
//! `pgsidecar_cancel_requests_total{result}`, while a client on another address can
//! still cancel its query during the flood.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pgsidecar::cancel_limit::{BURST, REFILL_PER_SEC};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::NoTls;

/// One CancelRequest with a guessed key, sent from `source`; waits for the close.
async fn guess(proxy: std::net::SocketAddr, source: &str, n: u32) {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{source}:0").parse().expect("source"))
        .expect("bind source");
    let mut s = sock.connect(proxy).await.expect("connect");
    let mut pkt = Vec::new();
    pkt.extend_from_slice(&16u32.to_be_bytes());
    pkt.extend_from_slice(&80_877_102u32.to_be_bytes());
    pkt.extend_from_slice(&(1_000_000 + n).to_be_bytes());
    pkt.extend_from_slice(&n.wrapping_mul(2_654_435_761).to_be_bytes());
    s.write_all(&pkt).await.expect("send cancel");
    let mut sink = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut sink))
        .await
        .expect("the proxy closes a cancel connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "a CancelRequest gets no answer");
}

fn counter(proxy: &pgsidecar::proxy::Proxy, result: &str) -> u64 {
    let text = proxy.shared.metrics.render();
    let key = format!("pgsidecar_cancel_requests_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_flood_from_one_address_is_limited_and_another_client_still_cancels() {
    bounded(async {
        let pg = shared_cluster(ClusterAuth::Trust);
        let proxy = start_proxy(&pg, |c| c.pool.size = 2).await;
        let addr = proxy.addr;
        // The flood comes from 127.0.0.2 (any 127/8 address is loopback on Linux) and
        // lasts until the other client's cancel is done.
        let stop = Arc::new(AtomicBool::new(false));
        let flooding = stop.clone();
        let flood = tokio::spawn(async move {
            let started = Instant::now();
            let mut n = 0u32;
            while !flooding.load(Ordering::Relaxed) {
                guess(addr, "127.0.0.2", n).await;
                n += 1;
            }
            (n, started.elapsed())
        });

        // Meanwhile a client on 127.0.0.1 cancels its own running query.
        let (client, conn) =
            tokio_postgres::connect(&proxy_url(&proxy, "postgres", "postgres"), NoTls)
                .await
                .expect("connect");
        tokio::spawn(conn);
        let client = Arc::new(client);
        let c2 = client.clone();
        let running = tokio::spawn(async move { c2.simple_query("select pg_sleep(30)").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        client
            .cancel_token()
            .cancel_query(NoTls)
            .await
            .expect("send cancel");
        let r = tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the query ends")
            .expect("task");
        let e = r.expect_err("the query must be cancelled");
        assert_eq!(
            e.as_db_error().map(|d| d.code().code()),
            Some("57014"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(3));

        stop.store(true, Ordering::Relaxed);
        let (guesses, took) = flood.await.expect("flood");
        let limited = counter(&proxy, "rate_limited");
        let served = counter(&proxy, "not_forwarded");
        assert_eq!(
            limited + served,
            u64::from(guesses),
            "every guess is counted once"
        );
        let budget = BURST + REFILL_PER_SEC * took.as_secs_f64() + 1.0;
        assert!(
            (served as f64) <= budget,
            "{served} guesses looked up in {took:?}, budget {budget}"
        );
        assert!(limited > 0, "the flood hit the limit");
        assert!(took > t.elapsed(), "the cancel was sent during the flood");
        // The client reads 57014 as soon as PostgreSQL acts on the cancel, which can be
        // before the proxy's forwarding task has seen PostgreSQL close that socket and
        // counted it: wait for the count rather than race it.
        let counted = Instant::now();
        while counter(&proxy, "forwarded") < 1 && counted.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            counter(&proxy, "forwarded") >= 1,
            "the real cancel was forwarded"
        );
        println!("flood of {guesses} in {took:?}: {served} looked up, {limited} rate-limited");
    })
    .await
}

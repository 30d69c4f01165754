use super::*;

impl ReadReady for tokio::io::DuplexStream {}

/// Every idle client parks in this future: keep it small (RSS per idle client).
#[tokio::test]
async fn idle_session_state_stays_small() {
    let cfg = crate::config::Config::with_upstream(crate::config::UpstreamConfig::new(
        "127.0.0.1".into(),
        1,
    ));
    let tls = crate::tls::prepare(&cfg).unwrap();
    let shared = Shared::new(Arc::new(cfg), tls);
    let (a, _b) = tokio::io::duplex(64);
    let fut = serve(Box::new(Accepted {
        client: a,
        peer: "127.0.0.1:1".parse().unwrap(),
        shared,
    }));
    let future = std::mem::size_of_val(&fut);
    let session = std::mem::size_of::<Session<crate::tls::MaybeTls<tokio::io::DuplexStream>>>();
    // tokio's task cell is 128-byte aligned: header and trailer take 80 bytes, so a
    // future above ~150 bytes makes every client's task 384 bytes instead of 256.
    assert!(future <= 128, "serve future grew to {future} bytes");
    assert!(session <= 1024, "Session grew to {session} bytes");
}

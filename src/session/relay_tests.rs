//! Tests of the relay's segment queue and its writes.

use super::*;

#[test]
fn segments_keep_order_and_account_for_skips() {
    let mut ib = Inbound::default();
    ib.buf.extend_from_slice(b"aaaBBBcc");
    ib.forward(3);
    ib.skip(3);
    ib.push_own(b"XY");
    ib.forward(2);
    let waker = futures_noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut out: Vec<u8> = Vec::new();
    let r = ib.poll_drain(&mut cx, &mut out);
    assert!(matches!(r, Poll::Ready(Ok(()))));
    assert_eq!(out, b"aaaXYcc");
    assert!(ib.buf.is_empty());
    assert_eq!(ib.scanned, 0);
}

/// A writer that takes at most `max` bytes per call, vectored: partial writes
/// must resume mid-segment, across skips, without losing or repeating a byte.
struct Trickle {
    out: Vec<u8>,
    max: usize,
}

impl AsyncWrite for Trickle {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = buf.len().min(self.max);
        self.out.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut left = self.max;
        let mut n = 0;
        for b in bufs {
            let t = b.len().min(left);
            self.out.extend_from_slice(&b[..t]);
            n += t;
            left -= t;
        }
        Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[test]
fn vectored_partial_writes_resume_where_they_stopped() {
    for max in [1, 2, 3, 5, 7, 100] {
        let mut ib = Inbound::default();
        ib.buf.extend_from_slice(b"aaaBBBccDDeee");
        ib.forward(3);
        ib.skip(3);
        ib.push_own(b"XY");
        ib.forward(2);
        ib.skip(2);
        ib.push_own_buf(BytesMut::new());
        ib.forward(3);
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut w = Trickle {
            out: Vec::new(),
            max,
        };
        let r = ib.poll_drain(&mut cx, &mut w);
        assert!(matches!(r, Poll::Ready(Ok(()))), "max {max}");
        assert_eq!(w.out, b"aaaXYcceee", "max {max}");
        assert!(ib.buf.is_empty());
        assert_eq!(ib.scanned, 0);
    }
}

fn futures_noop_waker() -> std::task::Waker {
    std::task::Waker::noop().clone()
}

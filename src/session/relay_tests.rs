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
/// must resume mid-segment, across skips, without losing or repeating a byte. `calls`
/// counts the writes it was given.
struct Trickle {
    out: Vec<u8>,
    max: usize,
    calls: usize,
}

impl AsyncWrite for Trickle {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.calls += 1;
        let n = buf.len().min(self.max);
        self.out.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.calls += 1;
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
            calls: 0,
        };
        let r = ib.poll_drain(&mut cx, &mut w);
        assert!(matches!(r, Poll::Ready(Ok(()))), "max {max}");
        assert_eq!(w.out, b"aaaXYcceee", "max {max}");
        assert!(ib.buf.is_empty());
        assert_eq!(ib.scanned, 0);
    }
}

/// A pipelined batch through named statements (rewritten Bind, forwarded Execute, per
/// row) goes out in as few writes as the writer takes: one vectored write while it has
/// room, however many segments, and in order across partial writes.
#[test]
fn many_segments_go_out_in_one_vectored_write() {
    for max in [usize::MAX, 1000, 37] {
        let mut ib = Inbound::default();
        let mut want = Vec::new();
        for row in 0..300u32 {
            let bind = format!("B{row:05}");
            let exec = format!("E{row:05}");
            ib.buf.extend_from_slice(bind.as_bytes());
            ib.buf.extend_from_slice(exec.as_bytes());
            ib.skip(bind.len());
            ib.push_own_buf(BytesMut::from(format!("b{row:05}").as_bytes()));
            ib.forward(exec.len());
            want.extend_from_slice(format!("b{row:05}").as_bytes());
            want.extend_from_slice(exec.as_bytes());
        }
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut w = Trickle {
            out: Vec::new(),
            max,
            calls: 0,
        };
        let r = ib.poll_drain(&mut cx, &mut w);
        assert!(matches!(r, Poll::Ready(Ok(()))), "max {max}");
        assert_eq!(w.out, want, "max {max}");
        let fewest = want.len().div_ceil(max.min(want.len()));
        assert_eq!(w.calls, fewest, "writes for 600 segments, max {max}");
        assert!(ib.buf.is_empty());
        assert_eq!(ib.scanned, 0);
    }
}

/// A response written whole leaves the read buffer at the start of its allocation, so
/// the next read (or the thread's next taker) reuses all of it without reclaiming; a
/// skipped tail and writes in parts lose and repeat no byte.
#[test]
fn a_whole_write_keeps_the_buffer_start() {
    let mut ib = Inbound::default();
    ib.buf = BytesMut::with_capacity(READ_CHUNK);
    let cap = ib.buf.capacity();
    ib.buf.extend_from_slice(b"0123456789");
    ib.forward(10);
    let waker = futures_noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut out = Vec::new();
    assert!(matches!(
        ib.poll_drain(&mut cx, &mut out),
        Poll::Ready(Ok(()))
    ));
    assert_eq!(out, b"0123456789");
    assert!(ib.buf.is_empty());
    assert_eq!(ib.scanned, 0);
    assert_eq!(ib.buf.capacity(), cap, "the buffer lost its head room");

    ib.buf.extend_from_slice(b"abcdef");
    ib.forward(4);
    ib.skip(2);
    let mut out = Vec::new();
    assert!(matches!(
        ib.poll_drain(&mut cx, &mut out),
        Poll::Ready(Ok(()))
    ));
    assert_eq!(out, b"abcd");
    assert!(ib.buf.is_empty(), "the skipped tail was dropped too");
    assert_eq!(ib.scanned, 0);

    // Written in parts: each part leaves exactly the rest.
    ib.buf.extend_from_slice(b"0123456789");
    ib.forward(10);
    let mut w = Trickle {
        out: Vec::new(),
        max: 4,
        calls: 0,
    };
    assert!(matches!(
        ib.poll_drain(&mut cx, &mut w),
        Poll::Ready(Ok(()))
    ));
    assert_eq!(w.out, b"0123456789");
    assert!(ib.buf.is_empty());
    assert_eq!(ib.scanned, 0);
}

fn futures_noop_waker() -> std::task::Waker {
    std::task::Waker::noop().clone()
}

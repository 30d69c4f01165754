//! The byte pump between a client and a server.
//!
//! Each direction has one `Inbound`: the bytes read from one peer and a queue of what to
//! write to the other. Scanned messages are forwarded straight out of the read buffer
//! (no copy per message); the proxy's own messages and rewritten frames are queued in
//! order between them. Reads stop when a buffer is full, so memory stays bounded whatever
//! the size of a result or COPY stream, and both peers get backpressure.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use super::ReadReady;

/// Segments written in one vectored write, at most: Linux's IOV_MAX. A pipelined
/// executemany through named statements queues two segments per row (rewritten Bind,
/// forwarded Execute); at 64 per call a 16 KiB read of them took six or seven writes.
const MAX_IOV: usize = 1024;
/// Up to this many segments the iovec array lives on the stack (prepared-statement
/// traffic: a few per transaction); beyond, one allocation serves a whole batch.
const STACK_IOV: usize = 16;

/// One piece of output, in order.
#[derive(Debug)]
enum Seg {
    /// The next n bytes of the read buffer are written out.
    Fwd(usize),
    /// The next n bytes of the read buffer are dropped (a swallowed or replaced message).
    Skip(usize),
    /// Bytes the proxy made.
    Own(BytesMut),
}

/// How the rest of a partly scanned message body is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    Forward,
    Skip,
}

/// Read buffers are recycled per thread: an idle session holds none, and a busy one takes
/// a warm buffer instead of allocating one per transaction.
mod cache {
    use bytes::BytesMut;
    use std::cell::RefCell;

    const KEEP: usize = 256;

    thread_local! {
        static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    pub fn take(min: usize) -> BytesMut {
        let b = FREE.with(|f| f.borrow_mut().pop());
        match b {
            Some(mut b) => {
                // Empty and unique: reserve reclaims the whole allocation, no copy.
                b.reserve(min);
                b
            }
            None => BytesMut::with_capacity(min),
        }
    }

    pub fn give(mut b: BytesMut) {
        b.clear();
        // Only ordinary buffers are kept; a huge one from a big message is freed.
        if b.capacity() == 0 || b.capacity() > 4 * super::READ_CHUNK {
            return;
        }
        // try_with: a session dropped while its thread shuts down just frees it.
        let _ = FREE.try_with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(b);
            }
        });
    }
}

/// A session that ends holding a read buffer (a client that sends its last query and
/// Terminate together, a connection per transaction) gives it back: the next login's
/// first read takes a warm buffer instead of a fresh 16 KiB allocation.
impl Drop for Inbound {
    fn drop(&mut self) {
        if self.buf.capacity() > 0 {
            cache::give(std::mem::take(&mut self.buf));
        }
    }
}

/// Reading more stops at this many buffered bytes unless a whole message must be seen.
pub const READ_HIGH_WATER: usize = 256 * 1024;
pub const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug, Default)]
pub struct Inbound {
    pub buf: BytesMut,
    /// Bytes at the front of `buf` already classified (forwarded or skipped).
    pub scanned: usize,
    /// Bytes of the current message's body still to come, and what to do with them.
    /// u32 (a message is at most 1 GiB) to keep every idle session smaller.
    pub body_left: u32,
    pub body_mode: Option<BodyMode>,
    /// A whole message of this many bytes must be buffered before it can be inspected.
    pub need: u32,
    segs: VecDeque<Seg>,
    pub eof: bool,
    /// The last read returned Pending and registered this task's waker, which still
    /// stands while the stream stays `quiet()`: polling it again would only repeat that.
    armed: bool,
}

impl Inbound {
    #[inline]
    pub fn unscanned(&self) -> &[u8] {
        &self.buf[self.scanned..]
    }

    /// Whether output is still queued for the other peer.
    #[inline]
    pub fn has_output(&self) -> bool {
        !self.segs.is_empty()
    }

    #[inline]
    pub fn forward(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.scanned += n;
        if let Some(Seg::Fwd(m)) = self.segs.back_mut() {
            *m += n;
        } else {
            self.segs.push_back(Seg::Fwd(n));
        }
    }

    #[inline]
    pub fn skip(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.scanned += n;
        if let Some(Seg::Skip(m)) = self.segs.back_mut() {
            *m += n;
        } else {
            self.segs.push_back(Seg::Skip(n));
        }
    }

    /// Queues bytes the proxy made, after everything queued so far.
    pub fn push_own(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if let Some(Seg::Own(b)) = self.segs.back_mut() {
            b.extend_from_slice(bytes);
        } else {
            self.segs.push_back(Seg::Own(BytesMut::from(bytes)));
        }
    }

    /// Queues a frame the proxy built, taking the buffer (no copy unless it joins an
    /// earlier proxy-made segment).
    pub fn push_own_buf(&mut self, bytes: BytesMut) {
        if bytes.is_empty() {
            return;
        }
        if let Some(Seg::Own(b)) = self.segs.back_mut() {
            b.extend_from_slice(&bytes);
        } else {
            self.segs.push_back(Seg::Own(bytes));
        }
    }

    /// Continues a partly scanned body; returns false when nothing is left of it.
    #[inline]
    pub fn continue_body(&mut self) -> bool {
        if self.body_left == 0 {
            return false;
        }
        let n = (self.body_left as usize).min(self.buf.len() - self.scanned);
        match self.body_mode {
            Some(BodyMode::Skip) => self.skip(n),
            _ => self.forward(n),
        }
        self.body_left -= n as u32;
        if self.body_left == 0 {
            self.body_mode = None;
        }
        true
    }

    /// Forwards or skips a frame of `frame_len` bytes, of which only part may be buffered.
    #[inline]
    pub fn take_frame(&mut self, frame_len: usize, mode: BodyMode) {
        let n = frame_len.min(self.buf.len() - self.scanned);
        match mode {
            BodyMode::Forward => self.forward(n),
            BodyMode::Skip => self.skip(n),
        }
        self.body_left = (frame_len - n) as u32;
        self.body_mode = if self.body_left > 0 { Some(mode) } else { None };
    }

    /// Drops everything not yet scanned (bytes from a server that is going away).
    pub fn drop_unscanned(&mut self) {
        self.buf.truncate(self.scanned);
        self.body_left = 0;
        self.body_mode = None;
        self.need = 0;
    }

    /// Drops queued output without writing it: with no server bound, what is queued is
    /// either skipped client bytes or the tail of a COPY the released server already
    /// abandoned (PostgreSQL ignores CopyData after a failed COPY), never a request.
    pub fn discard_output(&mut self) {
        while let Some(seg) = self.segs.pop_front() {
            match seg {
                Seg::Fwd(n) | Seg::Skip(n) => self.advance_buf(n),
                Seg::Own(_) => {}
            }
        }
    }

    /// Drops `n` written or skipped bytes from the head of the read buffer.
    #[inline]
    fn advance_buf(&mut self, n: usize) {
        if n == self.buf.len() {
            // All of it (the usual case: a whole response written): the buffer keeps the
            // start of its allocation, so neither the next read nor the cache's next
            // taker has to reclaim the space before it.
            self.buf.clear();
        } else {
            self.buf.advance(n);
        }
        self.scanned -= n;
    }

    /// Gives an empty buffer back to the thread's cache (an idle session holds none).
    pub fn recycle(&mut self) {
        if self.buf.is_empty() && self.segs.is_empty() && self.buf.capacity() > 0 {
            cache::give(std::mem::take(&mut self.buf));
            self.scanned = 0;
        }
    }

    /// Whether another read may be issued without exceeding the buffer limit.
    #[inline]
    pub fn wants_read(&self) -> bool {
        !self.eof && (self.buf.len() < READ_HIGH_WATER || self.buf.len() < self.need as usize)
    }

    /// A read of this side returned Pending. Not when the task's coop budget ran out:
    /// tokio then registered no waker with the stream (it reschedules the task instead).
    pub fn note_pending(&mut self) {
        self.armed = tokio::task::coop::has_budget_remaining();
    }

    /// Another stream is read from now (a server was attached).
    pub fn new_source(&mut self) {
        self.armed = false;
    }

    /// Reads once from `r`. Ok(0) means end of stream.
    pub fn poll_fill<R: AsyncRead + ReadReady + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
    ) -> Poll<io::Result<usize>> {
        if r.quiet() {
            // Nothing to read, known without a syscall. The waker stands (armed), or the
            // readiness poll alone registers it: cheaper than a read that ends Pending,
            // and an idle client takes no buffer.
            if self.armed {
                return Poll::Pending;
            }
            match r.poll_read_ready_hint(cx) {
                Poll::Pending => {
                    self.note_pending();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
        }
        if self.buf.capacity() == 0 {
            self.buf = cache::take(READ_CHUNK.max(self.need as usize));
        } else if self.buf.capacity() - self.buf.len() < 1024 {
            let need = self.need as usize;
            let want = if need > self.buf.len() {
                (need - self.buf.len()).max(READ_CHUNK)
            } else {
                READ_CHUNK
            };
            self.buf.reserve(want);
        }
        let n = match tokio_util::io::poll_read_buf(Pin::new(r), cx, &mut self.buf) {
            Poll::Pending => {
                self.note_pending();
                return Poll::Pending;
            }
            Poll::Ready(r) => {
                self.armed = false;
                r?
            }
        };
        if n == 0 {
            self.eof = true;
        }
        Poll::Ready(Ok(n))
    }

    /// Writes queued output to `w` until it is all written (Ready) or `w` is full (Pending).
    #[inline]
    pub fn poll_drain<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<io::Result<()>> {
        // The relay calls this for both sides at every turn; mostly nothing is queued.
        if self.segs.is_empty() {
            return Poll::Ready(Ok(()));
        }
        self.drain_segs(cx, w)
    }

    fn drain_segs<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<io::Result<()>> {
        let mut wrote = false;
        loop {
            self.drop_empty_head();
            if self.segs.is_empty() {
                break;
            }
            let r = if self.segs.len() == 1 {
                // The usual case (one response, one request): a plain write, without
                // building an iovec array.
                let bytes = match &self.segs[0] {
                    Seg::Fwd(n) => &self.buf[..*n],
                    Seg::Own(b) => &b[..],
                    // Not at the head: drop_empty_head applied it.
                    Seg::Skip(_) => &[][..],
                };
                Pin::new(&mut *w).poll_write(cx, bytes)
            } else {
                // One vectored write for every queued segment: a rewritten Bind between
                // forwarded Execute frames used to cost one send() per segment, two per
                // row of a pipelined executemany.
                self.write_gathered(cx, w)
            };
            let k = match r {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(k)) => k,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return self.pending_after(cx, w, wrote),
            };
            wrote = true;
            self.consume(k);
        }
        if self.buf.is_empty() && self.buf.capacity() > 4 * READ_HIGH_WATER {
            // A huge message passed through; do not keep its buffer for an idle client.
            self.buf = BytesMut::new();
        }
        if wrote {
            std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// One vectored write of the queued segments. Kept out of `drain_segs`, whose usual
    /// case (one segment) is inlined into the relay loop.
    #[inline(never)]
    fn write_gathered<W: AsyncWrite + Unpin>(
        &self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<io::Result<usize>> {
        let mut stack = [io::IoSlice::new(&[]); STACK_IOV];
        let mut heap;
        let iov: &mut [io::IoSlice<'_>] = if self.segs.len() <= STACK_IOV {
            &mut stack
        } else {
            heap = vec![io::IoSlice::new(&[]); self.segs.len().min(MAX_IOV)];
            &mut heap
        };
        let m = self.gather(iov);
        Pin::new(w).poll_write_vectored(cx, &iov[..m])
    }

    /// Points `iov` at the queued bytes in order, skips left out; returns how many.
    fn gather<'a>(&'a self, iov: &mut [io::IoSlice<'a>]) -> usize {
        let mut m = 0;
        let mut off = 0;
        for seg in &self.segs {
            if m == iov.len() {
                break;
            }
            match seg {
                Seg::Skip(n) => off += n,
                Seg::Fwd(n) => {
                    iov[m] = io::IoSlice::new(&self.buf[off..off + n]);
                    off += n;
                    m += 1;
                }
                Seg::Own(b) => {
                    iov[m] = io::IoSlice::new(b);
                    m += 1;
                }
            }
        }
        m
    }

    /// Applies skips and drops empty segments at the head, so a write starts with bytes.
    fn drop_empty_head(&mut self) {
        loop {
            match self.segs.front() {
                Some(Seg::Skip(n)) => {
                    let n = *n;
                    self.advance_buf(n);
                }
                Some(Seg::Fwd(0)) => {}
                Some(Seg::Own(b)) if b.is_empty() => {}
                _ => return,
            }
            self.segs.pop_front();
        }
    }

    /// Takes `k` written bytes off the head segments (skips between them included).
    fn consume(&mut self, mut k: usize) {
        while k > 0 {
            match self.segs.front_mut() {
                Some(Seg::Skip(n)) => {
                    let n = *n;
                    self.advance_buf(n);
                    self.segs.pop_front();
                }
                Some(Seg::Fwd(n)) => {
                    let t = k.min(*n);
                    *n -= t;
                    k -= t;
                    if *n == 0 {
                        self.segs.pop_front();
                    }
                    self.advance_buf(t);
                }
                Some(Seg::Own(b)) => {
                    let t = k.min(b.len());
                    b.advance(t);
                    k -= t;
                    if b.is_empty() {
                        self.segs.pop_front();
                    }
                }
                None => return,
            }
        }
    }

    fn pending_after<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
        wrote: bool,
    ) -> Poll<io::Result<()>> {
        if wrote {
            // Streams that buffer (TLS) must be flushed for the peer to see the bytes.
            if let Poll::Ready(Err(e)) = Pin::new(w).poll_flush(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;

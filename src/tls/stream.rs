//! A connection that is plain TCP or TLS, decided during the opening.
//!
//! The relay polls whatever stream a session holds; a plain connection costs one
//! discriminant check per call, and the (large) TLS state is boxed so that an idle
//! plaintext client stays small.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A client or server connection, with or without TLS.
pub enum MaybeTls<S> {
    Plain(S),
    Tls(Box<tokio_rustls::TlsStream<S>>),
    /// Only while an upgrade is under way, or after one failed: all I/O fails.
    Broken,
}

impl<S> MaybeTls<S> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }

    /// The ALPN protocol the TLS peer agreed to, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            MaybeTls::Tls(t) => t.get_ref().1.alpn_protocol(),
            _ => None,
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for MaybeTls<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaybeTls::Plain(s) => f.debug_tuple("Plain").field(s).finish(),
            MaybeTls::Tls(_) => f.write_str("Tls(..)"),
            MaybeTls::Broken => f.write_str("Broken"),
        }
    }
}

fn broken() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "connection unusable after a failed TLS upgrade",
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MaybeTls::Broken => Poll::Ready(Err(broken())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Broken => Poll::Ready(Err(broken())),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            MaybeTls::Broken => Poll::Ready(Err(broken())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
            MaybeTls::Broken => false,
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Broken => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            // Sends close_notify, so the peer sees a clean end rather than a truncation.
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MaybeTls::Broken => Poll::Ready(Ok(())),
        }
    }
}

/// Whether the peer has already sent bytes we have not asked for. Used right after an
/// SSLRequest: a client must wait for our one-byte answer, so anything already there
/// was sent in the clear before encryption began and may have been injected by a man in
/// the middle (CVE-2021-23214 / CVE-2021-23222). Consumes at most one byte, and only
/// when it returns true (the connection is then refused).
pub async fn has_unsolicited_input<S: AsyncRead + Unpin>(stream: &mut S) -> bool {
    std::future::poll_fn(|cx| {
        let mut one = [0u8; 1];
        let mut rb = ReadBuf::new(&mut one);
        match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Poll::Ready(!rb.filled().is_empty()),
            Poll::Ready(Err(_)) | Poll::Pending => Poll::Ready(false),
        }
    })
    .await
}

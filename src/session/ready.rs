//! Read readiness without a buffer: what lets an idle session hold none.

use std::task::{Context, Poll};

/// Streams that can say whether a read would find data without a buffer to read into,
/// so idle sessions need not hold one. The default says "read now".
pub trait ReadReady {
    fn poll_read_ready_hint(&self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Whether closing needs a shutdown() (TLS close_notify) rather than just a drop.
    fn close_needs_shutdown(&self) -> bool {
        true
    }

    /// Whether nothing was signalled since a read last returned Pending (the waker it
    /// registered still stands), checked without a syscall. The default says "poll".
    fn quiet(&self) -> bool {
        false
    }
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready_hint(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_read_ready(cx)
    }

    #[inline]
    fn quiet(&self) -> bool {
        // try_io runs the closure only if tokio holds read readiness for the socket, and
        // clears nothing when it returns Ok: a peek at tokio's readiness bits.
        self.try_io(tokio::io::Interest::READABLE, || Ok(()))
            .is_err()
    }
}

impl<S: ReadReady> ReadReady for crate::tls::MaybeTls<S> {
    fn poll_read_ready_hint(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            crate::tls::MaybeTls::Plain(s) => s.poll_read_ready_hint(cx),
            // TLS may hold decrypted bytes the socket no longer shows: always read.
            _ => Poll::Ready(Ok(())),
        }
    }

    fn close_needs_shutdown(&self) -> bool {
        !matches!(self, crate::tls::MaybeTls::Plain(_))
    }

    #[inline]
    fn quiet(&self) -> bool {
        // TLS may hold decrypted bytes the socket no longer shows.
        matches!(self, crate::tls::MaybeTls::Plain(s) if s.quiet())
    }
}

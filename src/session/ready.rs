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
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready_hint(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_read_ready(cx)
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
}

//! TCP settings of sockets to PostgreSQL and from clients.
//!
//! Keepalives find a peer that vanished while the connection was idle; the user timeout
//! (TCP_USER_TIMEOUT, Linux) ends a connection whose sent data stays unacknowledged, so
//! a server behind a network black hole is declared dead in seconds, not after the
//! kernel's 15 minutes of retransmissions.

use std::time::Duration;

use tokio::net::TcpStream;

/// `upstream.keepalives_*` and `upstream.tcp_user_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSettings {
    pub keepalives_idle: Duration,
    pub keepalives_interval: Duration,
    pub keepalives_count: u32,
    /// Zero: the kernel's default.
    pub user_timeout: Duration,
}

impl Default for TcpSettings {
    fn default() -> Self {
        TcpSettings {
            keepalives_idle: Duration::from_secs(10),
            keepalives_interval: Duration::from_secs(5),
            keepalives_count: 3,
            user_timeout: Duration::from_secs(10),
        }
    }
}

impl TcpSettings {
    /// Applies the settings; a setting the platform lacks is skipped (best effort: the
    /// connection works without it).
    pub fn apply(&self, stream: &TcpStream) {
        let sock = socket2::SockRef::from(stream);
        let ka = socket2::TcpKeepalive::new()
            .with_time(self.keepalives_idle)
            .with_interval(self.keepalives_interval);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let ka = ka.with_retries(self.keepalives_count);
        let _ = sock.set_tcp_keepalive(&ka);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if !self.user_timeout.is_zero() {
            let _ = sock.set_tcp_user_timeout(Some(self.user_timeout));
        }
    }
}

/// Whether accepted sockets inherit the listening socket's TCP options. Linux builds
/// each accepted connection as a copy of the listener, options included (TCP_NODELAY,
/// SO_KEEPALIVE and the keepalive times, whose timer it starts), so setting them once on
/// the listener saves four setsockopt calls per client login.
pub const LISTENER_OPTIONS_INHERITED: bool = cfg!(any(target_os = "linux", target_os = "android"));

/// The options of a client connection: no Nagle delay (a reply goes out when written),
/// and keepalives that find a vanished client on an otherwise idle connection. Set on
/// the listener where accepted sockets inherit them, else on each accepted socket.
/// Each option is tried even when the other fails; the first failure is returned.
pub fn set_client_options(sock: socket2::SockRef<'_>) -> std::io::Result<()> {
    let nodelay = sock.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    nodelay.and(sock.set_tcp_keepalive(&ka))
}

//! Process lifecycle: readiness, graceful drain on SIGTERM (or /quitquitquit), live
//! reload on SIGHUP (or /api/reload), and the upstream reachability seen at startup.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Where the process is in its life, shared by sessions, the admin port and main.
pub struct Lifecycle {
    pub started: Instant,
    /// A `Phase`: one atomic, which sessions check on every wake-up without a lock.
    /// It only moves forward.
    phase: AtomicU8,
    /// Asks main to begin a graceful shutdown (SIGTERM, /quitquitquit).
    pub shutdown_requested: Notify,
    /// An upstream answered at least once (for /startupz).
    pub upstream_seen: AtomicBool,
    /// Re-reads the configuration (file and flags) and applies it.
    reloader: Mutex<Option<Reloader>>,
}

pub type Reloader = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            started: Instant::now(),
            phase: AtomicU8::new(Phase::Running as u8),
            shutdown_requested: Notify::new(),
            upstream_seen: AtomicBool::new(false),
            reloader: Mutex::new(None),
        }
    }
}

/// Where shutdown is, in the order it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running = 0,
    /// Shutdown began: readiness fails at once, clients are still accepted for
    /// `shutdown_delay` while endpoints are removed.
    Unready = 1,
    /// Clients leave at their next transaction boundary.
    Drain = 2,
    /// The remaining clients go now (after `shutdown_timeout`).
    Force = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Running,
            1 => Phase::Unready,
            2 => Phase::Drain,
            _ => Phase::Force,
        }
    }
}

impl Lifecycle {
    /// The one transition: moves to `phase` unless already past it. The caller wakes
    /// the sessions when that matters to them (Drain, Force).
    pub fn advance(&self, phase: Phase) {
        self.phase.fetch_max(phase as u8, Ordering::SeqCst);
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::SeqCst))
    }

    /// Shutdown has begun (readiness fails).
    pub fn is_draining(&self) -> bool {
        self.phase() >= Phase::Unready
    }

    /// Asks the process to shut down gracefully (SIGTERM does the same).
    pub fn request_shutdown(&self) {
        self.advance(Phase::Unready);
        self.shutdown_requested.notify_one();
    }

    pub fn set_reloader(&self, r: Reloader) {
        *self.reloader.lock() = Some(r);
    }

    /// Runs the reloader; Err explains why the old configuration stays in force.
    pub fn reload(&self) -> Result<(), String> {
        let r = self.reloader.lock().clone();
        match r {
            Some(r) => r(),
            None => Err("this process has no configuration file to reload".into()),
        }
    }
}

/// Whether PostgreSQL answers at `host:port`: TCP connect plus an SSLRequest, whose
/// one-byte answer any live server gives before authentication. Needs no credentials.
pub async fn upstream_answers(host: &str, port: u16, limit: Duration) -> bool {
    let probe = async {
        let mut s = TcpStream::connect((host, port)).await?;
        s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        Ok::<bool, std::io::Error>(b[0] == b'S' || b[0] == b'N')
    };
    matches!(tokio::time::timeout(limit, probe).await, Ok(Ok(true)))
}

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
    /// Set when shutdown begins: readiness fails at once.
    pub draining: AtomicBool,
    /// RUNNING; DRAIN when clients should leave at their next transaction boundary;
    /// FORCE when the remaining ones must go now (after shutdown_timeout). One atomic,
    /// which sessions check on every wake-up without a lock.
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
            draining: AtomicBool::new(false),
            phase: AtomicU8::new(RUNNING),
            shutdown_requested: Notify::new(),
            upstream_seen: AtomicBool::new(false),
            reloader: Mutex::new(None),
        }
    }
}

pub const RUNNING: u8 = 0;
pub const DRAIN: u8 = 1;
pub const FORCE: u8 = 2;

impl Lifecycle {
    /// Clients leave at their next transaction boundary. The caller wakes the sessions.
    pub fn begin_drain(&self) {
        self.phase.fetch_max(DRAIN, Ordering::SeqCst);
    }

    /// The remaining clients go now. The caller wakes the sessions.
    pub fn begin_force(&self) {
        self.phase.store(FORCE, Ordering::SeqCst);
    }

    /// RUNNING, DRAIN or FORCE.
    pub fn phase(&self) -> u8 {
        self.phase.load(Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn request_shutdown(&self) {
        self.draining.store(true, Ordering::Relaxed);
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

//! What every session shares: the pools, metrics, cancel keys, client list and the
//! client TLS in force, plus the hook that serves admin-console logins (installed by
//! `app`, so sessions never depend on the admin module).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::cancel::CancelRegistry;
use crate::clients::ClientList;
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::pool::registry::Registry;

/// A logged-in client's stream, as the console sees it.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}

/// Serves a client that logged in to the virtual admin database.
pub trait Console: Send + Sync {
    /// Database name that reaches the console.
    fn database(&self) -> &str;
    /// Runs the console on `client` (AuthenticationOk already sent) until it leaves;
    /// `leftover` holds bytes already read past the login.
    fn serve<'a>(
        &'a self,
        client: &'a mut dyn ClientStream,
        leftover: BytesMut,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// State every session shares.
pub struct Shared {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub cancels: Arc<CancelRegistry>,
    pub cancel_limit: crate::cancel_limit::CancelLimiter,
    /// Client connections open now (all states, before the startup packet included).
    pub clients: AtomicUsize,
    /// Connections past their startup packet: what `limits.max_client_conn` caps.
    pub logins: AtomicUsize,
    pub lifecycle: Lifecycle,
    pub client_list: Arc<ClientList>,
    /// Client-side TLS in force (swapped on reload).
    pub tls: crate::tls::ClientTls,
    /// Per-database and per-user client counts.
    pub client_caps: Arc<crate::limits::ClientCaps>,
    /// The admin console, once the application has installed it.
    console: OnceLock<Arc<dyn Console>>,
}

impl Shared {
    pub fn new(config: Arc<Config>, tls: crate::tls::Prepared) -> Arc<Shared> {
        let metrics = Arc::new(Metrics::new());
        let shared = Arc::new(Shared {
            registry: Registry::new(config, metrics.clone(), tls.upstream),
            cancel_limit: crate::cancel_limit::CancelLimiter::new(&metrics.registry),
            metrics,
            cancels: CancelRegistry::new(),
            clients: AtomicUsize::new(0),
            logins: AtomicUsize::new(0),
            lifecycle: Lifecycle::default(),
            client_list: Arc::new(ClientList::default()),
            tls: crate::tls::ClientTls::default(),
            client_caps: Arc::default(),
            console: OnceLock::new(),
        });
        shared.tls.store(tls.client);
        shared
    }

    /// Installs the admin console; the first one installed stays.
    pub fn set_console(&self, console: Arc<dyn Console>) {
        let _ = self.console.set(console);
    }

    /// The console, if `database` is the one it serves.
    pub fn console_for(&self, database: &str) -> Option<&Arc<dyn Console>> {
        self.console.get().filter(|c| c.database() == database)
    }
}

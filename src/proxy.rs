//! The listener: accepts clients, enforces the client cap and spawns one task per client.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::session::Shared;

/// A running proxy (used by the binary and by in-process tests).
pub struct Proxy {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

impl Proxy {
    /// Binds the client listener and starts accepting.
    pub async fn start(config: Config) -> std::io::Result<Proxy> {
        // Certificates and keys are read before anything listens, so a bad file stops
        // the start instead of failing every TLS client later.
        let tls = crate::tls::prepare(&config)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let listener = TcpListener::bind(&config.listen).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot listen for clients on {} (listen): {e}",
                    config.listen
                ),
            )
        })?;
        let addr = listener.local_addr()?;
        let shared = Shared::new(Arc::new(config), tls);
        let (stop, stop_rx) = watch::channel(false);
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone(), stop_rx));
        tracing::info!(%addr, "accepting PostgreSQL clients");
        Ok(Proxy {
            addr,
            shared,
            stop,
            accept_task,
        })
    }

    /// Stops accepting new clients; connected ones carry on.
    pub fn stop_accepting(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops accepting and closes idle server connections.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.accept_task.await;
        self.shared.registry.close_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                spawn_client(stream, peer, shared.clone());
            }
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Decrements the client count however the session ends.
struct ClientCount(Arc<Shared>);

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

fn spawn_client(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    crate::server::set_keepalive(&stream);
    // The cap (max_client_conn) is applied after the startup packet, as PostgreSQL
    // does (session::admission).
    shared.clients.fetch_add(1, Ordering::Relaxed);
    let count = ClientCount(shared.clone());
    // One box for what login needs: a task keeps its future's captures for its whole
    // life, and this one lives as long as the client (RSS per idle client).
    let accepted = Box::new(crate::session::Accepted {
        client: stream,
        peer,
        shared,
    });
    tokio::spawn(async move {
        let _count = count;
        crate::session::serve(accepted).await;
    });
}

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
        let options = ClientOptions::on_listener(&listener);
        let shared = Shared::new(Arc::new(config), tls);
        let (stop, stop_rx) = watch::channel(false);
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone(), stop_rx, options));
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

/// Where client sockets get their TCP options: once on the listener where accepted
/// sockets inherit them, else on each accepted socket.
#[derive(Debug, Clone, Copy)]
struct ClientOptions {
    per_socket: bool,
}

impl ClientOptions {
    fn on_listener(listener: &TcpListener) -> Self {
        let inherited = crate::server::LISTENER_OPTIONS_INHERITED
            && match crate::server::set_client_options(socket2::SockRef::from(listener)) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "client socket options not set on the listener; setting them per client");
                    false
                }
            };
        ClientOptions {
            per_socket: !inherited,
        }
    }

    /// Gives an accepted socket what the listener did not hand down (best effort: the
    /// connection works without them).
    fn apply(self, stream: &TcpStream) {
        if self.per_socket {
            let _ = crate::server::set_client_options(socket2::SockRef::from(stream));
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    options: ClientOptions,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                options.apply(&stream);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What a client connection ends up with, however the options got there: no Nagle
    /// delay and keepalives on (a vanished client is found on an idle connection).
    #[tokio::test]
    async fn accepted_sockets_have_nodelay_and_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let options = ClientOptions::on_listener(&listener);
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        options.apply(&stream);
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.nodelay().expect("nodelay"), "TCP_NODELAY off");
        assert!(sock.keepalive().expect("keepalive"), "SO_KEEPALIVE off");
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            assert_eq!(
                sock.keepalive_time().expect("idle"),
                Duration::from_secs(60)
            );
            assert_eq!(
                sock.keepalive_interval().expect("intvl"),
                Duration::from_secs(10)
            );
            assert!(!options.per_socket, "Linux hands listener options down");
        }
    }
}

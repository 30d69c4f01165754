//! The process: starts the listener and the admin port, handles signals (SIGTERM and
//! SIGINT drain, a second one exits at once; SIGHUP reloads), and drains on shutdown.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::admin::Admin;
use crate::cli::Cli;
use crate::config::Config;
use crate::control::{Control, Stats};
use crate::lifecycle::{upstream_answers, Phase};
use crate::proxy::Proxy;
use crate::session::Shared;

/// The admin surfaces' view of a running proxy.
pub fn admin_of(shared: &Arc<Shared>) -> Admin {
    Admin {
        stats: Stats::new(shared.clone()),
        control: Control::new(shared.clone()),
    }
}

/// Starts the listener with the admin console installed: a login to the virtual
/// `pgsidecar` database is routed to it.
pub async fn start(config: Config) -> std::io::Result<Proxy> {
    let proxy = Proxy::start(config).await?;
    proxy.shared.set_console(Arc::new(admin_of(&proxy.shared)));
    Ok(proxy)
}

/// Runs until shut down; returns the process exit code.
pub async fn run(cli: Cli, config: Config) -> ExitCode {
    let admin_addr = config.admin_listen.clone();
    let proxy = match start(config).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for clients");
            return ExitCode::FAILURE;
        }
    };
    let shared = proxy.shared.clone();
    if let Err(e) = crate::admin::serve(&admin_addr, admin_of(&shared)).await {
        tracing::error!(error = %e, addr = %admin_addr, "cannot start the admin port");
        return ExitCode::FAILURE;
    }
    install_reloader(cli, &shared);
    spawn_startup_probe(&shared);
    spawn_maintenance(&shared);

    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            tracing::error!("cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = shared.lifecycle.shutdown_requested.notified() => break,
            _ = hup.recv() => {
                if let Err(e) = shared.lifecycle.reload() {
                    tracing::error!(error = %e, "reload failed; the previous configuration stays in force");
                }
            }
        }
    }

    // Graceful drain. Readiness fails at once so the endpoint is removed; the listener
    // keeps accepting for shutdown_delay while that propagates.
    let config = shared.registry.config();
    shared.lifecycle.advance(Phase::Unready);
    tracing::info!(
        delay = ?config.admin.shutdown_delay,
        timeout = ?config.admin.shutdown_timeout,
        "shutdown requested: draining"
    );
    let second = async {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    };
    tokio::pin!(second);
    tokio::select! {
        _ = tokio::time::sleep(config.admin.shutdown_delay) => {}
        _ = &mut second => return fast_exit(),
    }
    proxy.stop_accepting();
    shared.lifecycle.advance(Phase::Drain);
    shared.client_list.wake_all();
    let deadline = Instant::now() + config.admin.shutdown_timeout;
    while shared.clients.load(Ordering::Relaxed) > 0 {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(25)) => {}
            _ = tokio::time::sleep_until(deadline) => break,
            _ = &mut second => return fast_exit(),
        }
    }
    let left = shared.clients.load(Ordering::Relaxed);
    if left > 0 {
        tracing::warn!(
            clients = left,
            "shutdown_timeout reached: closing remaining clients"
        );
        shared.lifecycle.advance(Phase::Force);
        shared.client_list.wake_all();
        let until = Instant::now() + Duration::from_secs(1);
        while shared.clients.load(Ordering::Relaxed) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    proxy.shutdown().await;
    // Let the Terminate messages to PostgreSQL go out.
    tokio::time::sleep(Duration::from_millis(50)).await;
    tracing::info!("shutdown complete");
    ExitCode::SUCCESS
}

fn fast_exit() -> ExitCode {
    tracing::warn!("second signal: exiting without waiting for clients");
    ExitCode::SUCCESS
}

/// SIGHUP and /api/reload re-read the file (with the command-line overrides on top),
/// validate it and apply pool settings live; an invalid file changes nothing.
fn install_reloader(cli: Cli, shared: &Arc<Shared>) {
    if cli.config.is_none() {
        return;
    }
    let weak = Arc::downgrade(shared);
    let cli = Arc::new(cli);
    shared.lifecycle.set_reloader(Arc::new(move || {
        let Some(shared) = weak.upgrade() else {
            return Err("shutting down".into());
        };
        let reloads = &shared.metrics.reloads;
        let new = match cli.build_config() {
            Ok(c) => c,
            Err(e) => {
                reloads.with_label_values(&["failed"]).inc();
                return Err(e.to_string());
            }
        };
        // Certificates and keys are re-read here (rotation); unreadable files fail the
        // reload before anything changes.
        let tls = match crate::tls::prepare(&new) {
            Ok(t) => t,
            Err(e) => {
                reloads.with_label_values(&["failed"]).inc();
                return Err(e.to_string());
            }
        };
        let old = shared.registry.config();
        if new.listen != old.listen || new.admin_listen != old.admin_listen {
            tracing::warn!("listen addresses change only on restart; keeping the current ones");
        }
        shared.registry.apply(Arc::new(new), tls.upstream);
        shared.tls.store(tls.client);
        reloads.with_label_values(&["ok"]).inc();
        tracing::info!("configuration reloaded");
        Ok(())
    }));
}

/// Marks the upstream as seen once it answers, for /startupz.
fn spawn_startup_probe(shared: &Arc<Shared>) {
    let shared = shared.clone();
    tokio::spawn(async move {
        loop {
            let c = shared.registry.config();
            if upstream_answers(&c.upstream.host, c.upstream.port, Duration::from_secs(2)).await {
                shared
                    .lifecycle
                    .upstream_seen
                    .store(true, Ordering::Relaxed);
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

/// Closes server connections past their idle timeout or lifetime.
fn spawn_maintenance(shared: &Arc<Shared>) {
    let shared = Arc::downgrade(shared);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            for pool in shared.registry.all() {
                pool.reap_idle();
            }
        }
    });
}

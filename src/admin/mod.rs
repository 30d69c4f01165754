//! The HTTP admin port: Prometheus metrics, Kubernetes probes, and pool control.
//!
//! Endpoints:
//! - `GET /metrics` Prometheus text format.
//! - `GET /livez` the process answers; `GET /readyz` it accepts clients (not draining, not
//!   at max_client_conn, and optionally no open breaker); `GET /startupz` an upstream
//!   answered once, or the startup grace period passed.
//! - `GET /api/pools` pools as JSON.
//! - `POST /api/pools/{name}/pause|resume|reconnect` (`name`: `database/user` URL-encoded,
//!   or just `database` for all of its pools), `POST /api/reload`, `POST /quitquitquit`.
//!
//! Mutating endpoints need `Authorization: Bearer <admin.token>` when a token is set, and
//! are refused outright on a non-loopback address without one.

mod config_rows;
pub mod console;
mod control;
pub mod pause;
mod servers;
pub mod show;
mod stats;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::auth::constant_time_eq;
use crate::proxy::Shared;

#[derive(Clone)]
struct AdminState {
    shared: Arc<Shared>,
    loopback: bool,
}

/// Starts the admin server on `addr`; returns the bound address.
pub async fn serve(addr: &str, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for the admin port on {addr} (admin_listen): {e}"),
        )
    })?;
    let local = listener.local_addr()?;
    stats::spawn_sampler(shared.clone());
    let state = AdminState {
        shared,
        loopback: local.ip().is_loopback(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/startupz", get(startupz))
        .route("/api/pools", get(pools))
        .route("/api/pools/{name}/{action}", post(pool_action))
        .route("/api/reload", post(reload))
        .route("/quitquitquit", post(quit))
        .with_state(state);
    tracing::info!(addr = %local, "admin port listening");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin server stopped");
        }
    });
    Ok(local)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

async fn metrics(State(st): State<AdminState>) -> Response {
    st.shared.registry.refresh_metrics();
    show::refresh_maxwait(&st.shared);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.shared.metrics.render(),
    )
        .into_response()
}

async fn livez() -> Response {
    text(StatusCode::OK, "ok\n")
}

async fn readyz(State(st): State<AdminState>) -> Response {
    let sh = &st.shared;
    if sh.lifecycle.is_draining() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down (draining clients)\n",
        );
    }
    let config = sh.registry.config();
    let clients = sh.logins.load(Ordering::Relaxed);
    if clients >= config.limits.max_client_conn {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: at limits.max_client_conn ({clients} clients)\n"),
        );
    }
    if config.admin.unready_when_breaker_open {
        if let Some(p) = sh.registry.all().into_iter().find(|p| p.breaker_open()) {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: circuit breaker open for pool {}\n", p.name),
            );
        }
    }
    if config.admin.unready_when_upstream_login_fails {
        let failing = sh
            .registry
            .all()
            .into_iter()
            .find_map(|p| Some((p.login_failure()?, p)));
        if let Some((f, p)) = failing {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "not ready: PostgreSQL refuses the proxy's login as role {:?} for pool {} since {:.0}s ({} {})\n",
                    f.role, p.name, f.failing_for_secs, f.sqlstate, f.message
                ),
            );
        }
    }
    text(StatusCode::OK, "ready\n")
}

async fn startupz(State(st): State<AdminState>) -> Response {
    let lc = &st.shared.lifecycle;
    let grace = st.shared.registry.config().admin.startup_grace;
    if lc.upstream_seen.load(Ordering::Relaxed) {
        text(StatusCode::OK, "started: upstream answered\n")
    } else if lc.started.elapsed() >= grace {
        text(
            StatusCode::OK,
            "started: grace period passed without an upstream answer\n",
        )
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: waiting for the upstream to answer\n",
        )
    }
}

async fn pools(State(st): State<AdminState>) -> Response {
    let list: Vec<_> = st
        .shared
        .registry
        .all()
        .iter()
        .map(|p| {
            let mut v = serde_json::to_value(p.snapshot()).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                obj.insert(
                    "breaker".into(),
                    serde_json::to_value(p.breaker_view()).unwrap_or_default(),
                );
                obj.insert(
                    "upstream_login_error".into(),
                    serde_json::to_value(p.login_failure()).unwrap_or_default(),
                );
            }
            v
        })
        .collect();
    Json(serde_json::json!({ "pools": list })).into_response()
}

/// Checks the bearer token for a mutating endpoint.
fn authorize(st: &AdminState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let token = st
        .shared
        .registry
        .config()
        .admin
        .token
        .clone()
        .filter(|t| !t.is_empty());
    match token {
        None if st.loopback => Ok(()),
        None => Err(Box::new(text(
            StatusCode::FORBIDDEN,
            "refused: the admin port is not on a loopback address and no admin.token is configured\n",
        ))),
        Some(t) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if constant_time_eq(given.as_bytes(), t.as_bytes()) {
                Ok(())
            } else {
                Err(Box::new(text(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token\n",
                )))
            }
        }
    }
}

async fn pool_action(
    State(st): State<AdminState>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
) -> Response {
    if let Err(r) = authorize(&st, &headers) {
        return *r;
    }
    let targets: Vec<_> = st
        .shared
        .registry
        .all()
        .into_iter()
        .filter(|p| p.name == name || p.key.database == name)
        .collect();
    if targets.is_empty() {
        return text(StatusCode::NOT_FOUND, format!("no pool named {name:?}\n"));
    }
    if action == "pause" {
        let timeout = st.shared.registry.config().admin.pause_timeout;
        if let Err(e) = pause::pause_and_wait(&targets, timeout).await {
            return text(StatusCode::GATEWAY_TIMEOUT, format!("{}\n", e.message));
        }
    }
    for p in &targets {
        match action.as_str() {
            "pause" => {}
            "resume" => {
                if st.shared.lifecycle.is_draining() {
                    return text(StatusCode::CONFLICT, "refused: shutting down\n");
                }
                p.resume()
            }
            "reconnect" => p.reconnect(),
            _ => {
                return text(
                    StatusCode::NOT_FOUND,
                    format!("unknown action {action:?}: use pause, resume or reconnect\n"),
                )
            }
        }
    }
    let names: Vec<_> = targets.iter().map(|p| p.name.clone()).collect();
    text(StatusCode::OK, format!("{action}: {}\n", names.join(", ")))
}

async fn reload(State(st): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&st, &headers) {
        return *r;
    }
    match st.shared.lifecycle.reload() {
        Ok(()) => text(StatusCode::OK, "reloaded\n"),
        Err(e) => text(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload failed, the previous configuration stays in force: {e}\n"),
        ),
    }
}

async fn quit(State(st): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&st, &headers) {
        return *r;
    }
    st.shared.lifecycle.request_shutdown();
    text(StatusCode::OK, "shutting down gracefully\n")
}

//! The HTTP admin port: Prometheus metrics, Kubernetes probes, and pool control.
//!
//! Endpoints:
//! - `GET /metrics` Prometheus text format.
//! - `GET /livez` the process answers; `GET /readyz` it accepts clients (not draining, not
//!   at max_client_conn, and optionally no open breaker); `GET /startupz` an upstream
//!   answered once, or the startup grace period passed.
//! - `GET /api/pools` pools as JSON, and the upstream's hosts with their roles and health.
//! - `POST /api/pools/{name}/pause|resume|reconnect` (`name`: `database/user` URL-encoded,
//!   or just `database` for all of its pools), `POST /api/reload`, `POST /quitquitquit`.
//!
//! Mutating endpoints need `Authorization: Bearer <admin.token>` when a token is set, and
//! are refused outright on a non-loopback address without one.

mod commands;
mod config_rows;
pub mod console;
pub mod pause;
mod servers;
pub mod show;
mod stats;

use std::net::SocketAddr;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::auth::constant_time_eq;
use crate::control::{Control, Stats};
use crate::error::{sqlstate, ClientError};

/// What both admin surfaces work through.
#[derive(Clone)]
pub struct Admin {
    pub stats: Stats,
    pub control: Control,
}

#[derive(Clone)]
struct AdminState {
    admin: Admin,
    loopback: bool,
}

/// Starts the admin server on `addr`; returns the bound address.
pub async fn serve(addr: &str, admin: Admin) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for the admin port on {addr} (admin_listen): {e}"),
        )
    })?;
    let local = listener.local_addr()?;
    stats::spawn_sampler(admin.stats.clone());
    let state = AdminState {
        admin,
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
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.admin.stats.render_metrics(),
    )
        .into_response()
}

async fn livez() -> Response {
    text(StatusCode::OK, "ok\n")
}

async fn readyz(State(st): State<AdminState>) -> Response {
    let sh = &st.admin.stats;
    if sh.draining() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down (draining clients)\n",
        );
    }
    let config = sh.config();
    let clients = sh.logins();
    if clients >= config.limits.max_client_conn {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: at limits.max_client_conn ({clients} clients)\n"),
        );
    }
    if config.admin.unready_when_breaker_open {
        if let Some(p) = sh.pools().into_iter().find(|p| p.breaker_open()) {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: circuit breaker open for pool {}\n", p.name()),
            );
        }
    }
    if config.admin.unready_when_upstream_login_fails {
        let failing = sh
            .pools()
            .into_iter()
            .find_map(|p| Some((p.login_failure()?, p)));
        if let Some((f, p)) = failing {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "not ready: PostgreSQL refuses the proxy's login as role {:?} for pool {} since {:.0}s ({} {})\n",
                    f.role, p.name(), f.failing_for_secs, f.sqlstate, f.message
                ),
            );
        }
    }
    text(StatusCode::OK, "ready\n")
}

async fn startupz(State(st): State<AdminState>) -> Response {
    let sh = &st.admin.stats;
    let grace = sh.config().admin.startup_grace;
    if sh.upstream_seen() {
        text(StatusCode::OK, "started: upstream answered\n")
    } else if sh.started().elapsed() >= grace {
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
        .admin
        .stats
        .pools()
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
    let hosts = st.admin.stats.hosts();
    let upstream = serde_json::json!({
        "target_session_attrs": hosts.attrs.to_string(),
        "current": hosts.current().map(|i| hosts.get(i).to_string()),
        "hosts": hosts.views(tokio::time::Instant::now()),
    });
    Json(serde_json::json!({ "pools": list, "upstream": upstream })).into_response()
}

/// Checks the bearer token for a mutating endpoint.
fn authorize(st: &AdminState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let token = st
        .admin
        .stats
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
    let ctl = &st.admin.control;
    let done = match action.as_str() {
        "pause" => ctl.pause(Some(&name)).await,
        "resume" => ctl.resume(Some(&name)),
        "reconnect" => ctl.reconnect(Some(&name)),
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                format!("unknown action {action:?}: use pause, resume or reconnect\n"),
            )
        }
    };
    match done {
        Ok(names) => text(StatusCode::OK, format!("{action}: {}\n", names.join(", "))),
        Err(e) => text(status_of(&e), format!("{}\n", e.message)),
    }
}

/// The HTTP status for a refused control action.
fn status_of(e: &ClientError) -> StatusCode {
    match e.code {
        sqlstate::INVALID_CATALOG_NAME => StatusCode::NOT_FOUND,
        sqlstate::QUERY_CANCELED => StatusCode::GATEWAY_TIMEOUT,
        sqlstate::ADMIN_SHUTDOWN => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn reload(State(st): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&st, &headers) {
        return *r;
    }
    match st.admin.control.reload() {
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
    st.admin.control.shutdown();
    text(StatusCode::OK, "shutting down gracefully\n")
}

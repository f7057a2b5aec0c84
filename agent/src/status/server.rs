//! The HTTP status server: `/healthz`, `/readyz`, `/metrics`, `/status`.
use std::net::SocketAddr;

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::net::TcpListener;

use super::{Status, StatusQuery, metrics};

/// The status server could not start.
#[derive(Debug, thiserror::Error)]
#[error(
    "status server on {addr}: {source} (is another agent running? choose another --status-addr)"
)]
pub struct ServeError {
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` now (so a taken port fails at start) and returns the bound
/// address and the future that serves until `shutdown` resolves.
pub async fn bind(
    addr: SocketAddr,
    status: Status,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<
    (
        SocketAddr,
        impl std::future::Future<Output = std::io::Result<()>> + Send,
    ),
    ServeError,
> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError { addr, source })?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route(
            "/status",
            get({
                let calls = std::sync::Arc::new(tokio::sync::Semaphore::new(STATUS_CONCURRENCY));
                move |State(s): State<Status>,
                      axum::extract::Query(q): axum::extract::Query<StatusQuery>| {
                    status_handler(s, q, calls.clone())
                }
            }),
        )
        .with_state(status);
    let fut = async move {
        podmesh_plumbing::http::serve(
            listener,
            app,
            podmesh_plumbing::http::HttpLimits::default(),
            shutdown,
        )
        .await
    };
    Ok((local, fut))
}

async fn readyz(State(s): State<Status>) -> impl IntoResponse {
    let snap = s.summary();
    if snap.ready {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        let mut waiting = snap.local.problems();
        waiting.extend(
            snap.remotes
                .values()
                .filter(|r| !(r.connected && r.synced))
                .map(|r| {
                    format!(
                        "{}: {}",
                        r.name,
                        r.last_error.as_deref().unwrap_or(if r.connected {
                            "listing"
                        } else {
                            "connecting"
                        })
                    )
                }),
        );
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", waiting.join("; ")),
        )
    }
}

async fn metrics_handler(State(s): State<Status>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics::render(&s.summary()),
    )
}

/// Full `/status` answers built at once: with 100k remote records one is
/// about 25 MB of JSON and four times that while it is built, so more
/// callers get 503 and `Retry-After` instead of memory.
pub const STATUS_CONCURRENCY: usize = 2;

async fn status_handler(
    s: Status,
    q: StatusQuery,
    calls: std::sync::Arc<tokio::sync::Semaphore>,
) -> axum::response::Response {
    // The summary costs nothing worth bounding.
    let _permit = if q.summary {
        None
    } else {
        match calls.try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(axum::http::header::RETRY_AFTER, "1")],
                    format!(
                        "{STATUS_CONCURRENCY} /status calls are being answered; retry in a second, or ask for less (?summary=true, ?cluster=NAME, ?rejected=true)\n"
                    ),
                )
                    .into_response();
            }
        }
    };
    // Built off the runtime's worker threads: 100k records take a while.
    match tokio::task::spawn_blocking(move || s.query(&q)).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

//! The proxy's admin HTTP endpoint (`--metrics-addr`, plain HTTP): /metrics, /healthz and /readyz.
//!
//! It reads the [`Hub`]; the hub records into [`crate::metrics`] and knows nothing of this
//! server, so dependencies point one way: admin -> hub -> metrics.
use std::net::SocketAddr;
use std::sync::Arc;

use axum::{Router, extract::State, http::StatusCode, routing::get};

use crate::hub::Hub;

/// Serves /metrics, /healthz (the process answers) and /readyz (the cache
/// holds a complete list of the prefix) until shutdown.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: Arc<Hub>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(hub);
    // Bounded: the port is unauthenticated, and a crowd of idle
    // connections to it must not take the descriptors the mTLS port needs.
    podmesh_plumbing::http::serve(
        listener,
        app,
        podmesh_plumbing::http::HttpLimits::default(),
        async move {
            let _ = crate::hub::stopped(&mut shutdown).await;
        },
    )
    .await
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn metrics(State(hub): State<Arc<Hub>>) -> ([(&'static str, &'static str); 1], String) {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        hub.metrics.encode(),
    )
}

async fn readyz(State(hub): State<Arc<Hub>>) -> (StatusCode, String) {
    let (synced, revision) = hub.with_cache(|c| (c.synced(), c.revision()));
    let state = hub.upstream_state();
    // The port is unauthenticated: the upstream's error text (addresses,
    // certificate subjects) stays in the log; the probe learns the state.
    let body = format!(
        "synced={synced} revision={revision} upstream={}{}\n",
        state.name(),
        hub.upstream_outage()
            .map(|d| format!(" failing_for={}s", d.as_secs()))
            .unwrap_or_default()
    );
    if synced {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

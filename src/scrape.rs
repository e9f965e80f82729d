//! The metrics endpoint: `/metrics` (Prometheus text format, from the recorder
//! [`crate::metrics`] installs), `/healthz` and `/readyz`, served within the endpoint limits of
//! [`crate::endpoint`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::endpoint::{self, EndpointLimits};

/// Whether the broker is ready to serve (listeners bound, not shutting down).
#[derive(Clone, Default)]
pub(crate) struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the broker ready (`true`) or not.
    pub(crate) fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Serves `/metrics` (Prometheus text format), `/healthz` (200 while the process runs) and
/// `/readyz` (200 once listeners are up and until shutdown starts; Redis trouble only degrades,
/// so it does not make the broker unready) until `shutdown` is cancelled, within `limits`.
pub(crate) async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    ready: Readiness,
    limits: EndpointLimits,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, max_connections = limits.max_connections, "metrics endpoint listening (/metrics, /healthz, /readyz)");
    }
    let app = Router::new()
        .route(
            "/metrics",
            get(|State((h, _)): State<(PrometheusHandle, Readiness)>| async move { h.render() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(
                |State((_, r)): State<(PrometheusHandle, Readiness)>| async move {
                    if r.get() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                },
            ),
        )
        .with_state((handle, ready));
    endpoint::serve(
        "metrics",
        listener,
        app,
        limits,
        endpoint::Access::default(),
        shutdown,
    )
    .await;
}

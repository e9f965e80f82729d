//! Prometheus metrics, and the `/metrics`, `/healthz`, `/readyz` HTTP endpoint.
//!
//! Names follow the Prometheus conventions (base units: seconds; `_total` for counters).
//! Label values are fixed vocabularies (command names, reasons, sources, validator kinds,
//! outcomes): never a user, a token or a digest, so no secret can reach a scrape and the label
//! cardinality is bounded.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `extauth_requests_total` | counter | `command`, `result` (`accepted`/`refused`), `reason`, `source` |
//! | `extauth_request_duration_seconds` | histogram | `command` |
//! | `extauth_cache_hits_total` | counter | `layer` (`l1`, `redis`) |
//! | `extauth_coalesced_waiters_total` | counter | |
//! | `extauth_provider_calls_total` | counter | `validator`, `outcome` (`valid`, `invalid`, `unavailable`) |
//! | `extauth_provider_duration_seconds` | histogram | `validator` |
//! | `extauth_redis_errors_total` | counter | `op` |
//! | `extauth_redis_up` | gauge | `op` (`connection`, `read`, `write`; 0 during an outage, set on changes) |
//! | `extauth_connections_open` | gauge | |
//! | `extauth_peers_refused_total` | counter | |
//! | `extauth_circuit_open` | gauge | `validator` (1 open, 0 closed) |

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::validate::Validation;
use crate::wire::{Reason, Source};

/// Request latency buckets (seconds): cached answers take microseconds, provider calls up to the
/// provider timeout.
const REQUEST_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// The process-wide recorder's handle (installed once).
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (idempotent) and returns its handle.
///
/// # Errors
/// When another recorder was installed first.
pub fn install() -> Result<PrometheusHandle, String> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(REQUEST_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Drains histogram samples into their buckets every 5 s until `shutdown`. The recorder keeps
/// raw samples until a scrape or an upkeep folds them, so without this a broker nobody scrapes
/// grows by every request's latency sample (found by the soak run in docs/benchmarks.md).
pub async fn upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
        }
    }
}

/// Counts and times one answered request.
pub fn request(command: &'static str, ok: bool, reason: Reason, source: Source, elapsed: Duration) {
    let result = if ok { "accepted" } else { "refused" };
    counter!("extauth_requests_total", "command" => command, "result" => result, "reason" => reason.as_str(), "source" => source.as_str()).increment(1);
    histogram!("extauth_request_duration_seconds", "command" => command)
        .record(elapsed.as_secs_f64());
}

/// Counts a cache hit in `layer` (`l1` or `redis`).
pub fn cache_hit(layer: &'static str) {
    counter!("extauth_cache_hits_total", "layer" => layer).increment(1);
}

/// Counts a request answered by another request's flight.
pub fn coalesced_waiter() {
    counter!("extauth_coalesced_waiters_total").increment(1);
}

/// Counts and times one provider call.
pub fn provider_call(validator: &'static str, validation: &Validation, elapsed: Duration) {
    let outcome = match validation {
        Validation::Valid(_) => "valid",
        Validation::Invalid(_) => "invalid",
        Validation::Unavailable(_) => "unavailable",
    };
    counter!("extauth_provider_calls_total", "validator" => validator, "outcome" => outcome)
        .increment(1);
    histogram!("extauth_provider_duration_seconds", "validator" => validator)
        .record(elapsed.as_secs_f64());
}

/// Counts a failed Redis operation.
pub fn redis_error(op: &'static str) {
    counter!("extauth_redis_errors_total", "op" => op).increment(1);
}

/// Counts a connection refused before any request (peer credentials, TLS).
pub fn peer_refused() {
    counter!("extauth_peers_refused_total").increment(1);
}

/// Records whether the Redis connection, reads or writes (`op`) work, as a 1/0 gauge.
pub fn redis_up(op: &'static str, up: bool) {
    gauge!("extauth_redis_up", "op" => op).set(if up { 1.0 } else { 0.0 });
}

/// Tracks open shim connections.
pub fn connection_opened() {
    gauge!("extauth_connections_open").increment(1.0);
}

/// See [`connection_opened`].
pub fn connection_closed() {
    gauge!("extauth_connections_open").decrement(1.0);
}

/// Records a circuit breaker's state.
pub fn circuit(validator: &'static str, open: bool) {
    gauge!("extauth_circuit_open", "validator" => validator).set(if open { 1.0 } else { 0.0 });
}

/// Whether the broker is ready to serve (listeners bound, not shutting down).
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the broker ready (`true`) or not.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Serves `/metrics` (Prometheus text format), `/healthz` (200 while the process runs) and
/// `/readyz` (200 once listeners are up and until shutdown starts; Redis trouble only degrades,
/// so it does not make the broker unready) until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    ready: Readiness,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, "metrics endpoint listening (/metrics, /healthz, /readyz)");
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
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        warn!("metrics endpoint stopped: {e}");
    }
}

//! Prometheus metrics: the recorder and one function per event (the scrape module serves them).
//!
//! Names follow the Prometheus conventions (base units: seconds; `_total` for counters).
//! Label values are fixed vocabularies (command names, reasons, sources, validator kinds,
//! outcomes): never a user, a token or a digest, so no secret can reach a scrape and the label
//! cardinality is bounded.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `extauth_requests_total` | counter | `command`, `result` (`accepted`/`refused`), `reason`, `source`, `front` (`shim`, `http`) |
//! | `extauth_request_duration_seconds` | histogram | `command`, `front` |
//! | `extauth_cache_hits_total` | counter | `layer` (`l1`, `redis`) |
//! | `extauth_coalesced_waiters_total` | counter | |
//! | `extauth_provider_calls_total` | counter | `validator`, `outcome` (`valid`, `invalid`, `unavailable`) |
//! | `extauth_provider_duration_seconds` | histogram | `validator` |
//! | `extauth_redis_errors_total` | counter | `op` |
//! | `extauth_redis_rejected_total` | counter | `kind` (`entry`, `user_mark`, `token_mark`, `seen`, `hint`, `index`) |
//! | `extauth_revocation_hints_total` | counter | `outcome` (`applied`) |
//! | `extauth_kicks_total` | counter | `outcome` (`kicked`, `failed`): the revoke hook's calls to ejabberd's `kick_user` |
//! | `extauth_unbound_tokens_total` | counter | `reason` (`no_user`, `non_canonical_claim`, `wrong_domain`) |
//! | `extauth_provider_clock_skew_seconds` | gauge | `validator` |
//! | `extauth_redis_up` | gauge | `op` (`connection`, `read`, `write`; 0 during an outage, set on changes) |
//! | `extauth_connections_open` | gauge | |
//! | `extauth_connections_evicted_total` | counter | |
//! | `extauth_handshakes_in_progress` | gauge | |
//! | `extauth_handshakes_failed_total` | counter | `reason` ([`HandshakeFailure`]) |
//! | `extauth_peers_refused_total` | counter | |
//! | `extauth_circuit_open` | gauge | `validator` (1 open, 0 closed) |
//! | `extauth_provider_calls_queued` | gauge | `validator` (calls waiting for a `provider_concurrency` slot) |
//! | `extauth_endpoint_connections_open` | gauge | `endpoint` (`metrics`, `admin`, `http`) |
//! | `extauth_endpoint_connections_refused_total` | counter | `endpoint` |
//! | `extauth_endpoint_timeouts_total` | counter | `endpoint`, `phase` (`header`, `idle`, `request`) |

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use extauth_protocol::wire::{Reason, Source};

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
pub(crate) fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(REQUEST_BUCKETS)?
        .install_recorder()?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Drains histogram samples into their buckets every 5 s until `shutdown`. The recorder keeps
/// raw samples until a scrape or an upkeep folds them, so without this a broker nobody scrapes
/// grows by every request's latency sample (found by the soak run in docs/benchmarks.md).
pub(crate) async fn upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
        }
    }
}

/// Counts and times one answered request; `front` is where it came in (`shim` or `http`).
pub(crate) fn request(
    command: &'static str,
    front: &'static str,
    outcome: (bool, Reason, Source),
    elapsed: Duration,
) {
    let (ok, reason, source) = outcome;
    let result = if ok { "accepted" } else { "refused" };
    counter!("extauth_requests_total", "command" => command, "result" => result, "reason" => reason.as_str(), "source" => source.as_str(), "front" => front).increment(1);
    histogram!("extauth_request_duration_seconds", "command" => command, "front" => front)
        .record(elapsed.as_secs_f64());
}

/// Counts a cache hit in `layer` (`Source::L1` or `Source::Redis`).
pub(crate) fn cache_hit(layer: Source) {
    counter!("extauth_cache_hits_total", "layer" => layer.as_str()).increment(1);
}

/// Counts a request answered by another request's flight.
pub(crate) fn coalesced_waiter() {
    counter!("extauth_coalesced_waiters_total").increment(1);
}

/// Counts and times one provider call; `outcome` is `valid`, `invalid` or `unavailable`
/// (`Validation::outcome` in the validate module).
pub(crate) fn provider_call(validator: &'static str, outcome: &'static str, elapsed: Duration) {
    counter!("extauth_provider_calls_total", "validator" => validator, "outcome" => outcome)
        .increment(1);
    histogram!("extauth_provider_duration_seconds", "validator" => validator)
        .record(elapsed.as_secs_f64());
}

/// Counts a failed Redis operation (`op`: the store's `Op::as_str`).
pub(crate) fn redis_error(op: &'static str) {
    counter!("extauth_redis_errors_total", "op" => op).increment(1);
}

/// Counts a value read from Redis that was not believed (not UTF-8, not a string, its seal failed
/// or it does not parse); `kind` is the seal purpose (`entry`, `user_mark`, `token_mark`,
/// `seen`, `hint`), or `index` for a user's index of tokens that is not a set.
pub(crate) fn redis_rejected(kind: &'static str) {
    counter!("extauth_redis_rejected_total", "kind" => kind).increment(1);
}

/// Counts a revocation hint whose mark was kept (`outcome="applied"`, the only outcome since
/// hints carry their mark).
pub(crate) fn hint_applied() {
    counter!("extauth_revocation_hints_total", "outcome" => "applied").increment(1);
}

/// Counts a call of the revoke hook (the kick module) by outcome (`kicked`, `failed`).
pub(crate) fn kick(outcome: &'static str) {
    counter!("extauth_kicks_total", "outcome" => outcome).increment(1);
}

/// Counts a valid token that names no user of its domain, by reason (`no_user`,
/// `non_canonical_claim`, `wrong_domain`).
pub(crate) fn unbound(reason: Reason) {
    counter!("extauth_unbound_tokens_total", "reason" => reason.as_str()).increment(1);
}

/// Records how far in the past (s) the `exp` of a token the provider calls valid was: a clock
/// or time-zone problem at the provider.
pub(crate) fn provider_clock_skew(validator: &'static str, seconds: u64) {
    gauge!("extauth_provider_clock_skew_seconds", "validator" => validator).set(seconds as f64);
}

/// Counts a connection refused before any request (peer credentials, TLS).
pub(crate) fn peer_refused() {
    counter!("extauth_peers_refused_total").increment(1);
}

/// Records whether the Redis connection, reads or writes (`op`) work, as a 1/0 gauge.
pub(crate) fn redis_up(op: &'static str, up: bool) {
    gauge!("extauth_redis_up", "op" => op).set(if up { 1.0 } else { 0.0 });
}

/// Records how many connections hold a `--max-connections` slot.
pub(crate) fn connections_open(n: usize) {
    gauge!("extauth_connections_open").set(n as f64);
}

/// Counts a connection closed to give its slot to a new one.
pub(crate) fn connection_evicted() {
    counter!("extauth_connections_evicted_total").increment(1);
}

/// Records how many connections are in their handshake (peer check, TLS, `Hello`, first request).
pub(crate) fn handshakes_in_progress(n: usize) {
    gauge!("extauth_handshakes_in_progress").set(n as f64);
}

/// Why a connection ended before it was served: the `reason` label of
/// `extauth_handshakes_failed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeFailure {
    /// No `Hello` and first request within `--handshake-timeout`.
    Timeout,
    /// Dropped, as the oldest of the busiest source, because `--max-handshakes` were in progress.
    Budget,
    /// Dropped, as its source's oldest, because `--max-handshakes-per-ip` of it were in progress.
    SourceBudget,
    /// The Unix socket peer check refused it.
    Peer,
    /// The TLS handshake failed (no or an untrusted client certificate, not TLS at all, ...).
    Tls,
    /// It closed before its first request, or sent something other than a `Hello` of our
    /// protocol version.
    Hello,
    /// Every slot had a request in flight, so none could be freed for it: its first request
    /// was answered `unavailable`.
    Busy,
}

impl HandshakeFailure {
    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Budget => "budget",
            HandshakeFailure::SourceBudget => "source_budget",
            HandshakeFailure::Peer => "peer",
            HandshakeFailure::Tls => "tls",
            HandshakeFailure::Hello => "hello",
            HandshakeFailure::Busy => "busy",
        }
    }
}

/// Counts a connection that ended in its handshake.
pub(crate) fn handshake_failed(why: HandshakeFailure) {
    counter!("extauth_handshakes_failed_total", "reason" => why.as_str()).increment(1);
}

/// Records a circuit breaker's state.
pub(crate) fn circuit(validator: &'static str, open: bool) {
    gauge!("extauth_circuit_open", "validator" => validator).set(if open { 1.0 } else { 0.0 });
}

/// Records how many provider calls wait for one of the domain's `provider_concurrency` slots.
pub(crate) fn provider_calls_queued(validator: &'static str, waiting: usize) {
    gauge!("extauth_provider_calls_queued", "validator" => validator).set(waiting as f64);
}

/// Counts a connection to an HTTP endpoint (`metrics`, `admin`) closed as soon as it was
/// accepted, because the endpoint held its connection cap.
pub(crate) fn endpoint_refused(endpoint: &'static str) {
    counter!("extauth_endpoint_connections_refused_total", "endpoint" => endpoint).increment(1);
}

/// Counts an endpoint connection closed by a timeout (`phase`: `header`, `idle`, `request`).
pub(crate) fn endpoint_timeout(endpoint: &'static str, phase: &'static str) {
    counter!("extauth_endpoint_timeouts_total", "endpoint" => endpoint, "phase" => phase)
        .increment(1);
}

/// Tracks an endpoint's open connections (`opened`: one more, else one fewer).
pub(crate) fn endpoint_connection(endpoint: &'static str, opened: bool) {
    let open = gauge!("extauth_endpoint_connections_open", "endpoint" => endpoint);
    if opened {
        open.increment(1.0);
    } else {
        open.decrement(1.0);
    }
}

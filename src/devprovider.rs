//! A development OAuth provider speaking RFC 7662 introspection, for the demo and the tests.
//!
//! `POST /introspect` with HTTP Basic client authentication and the form field `token`. A known
//! token gets its claims (with `"active": true` unless the claims say otherwise); an unknown one
//! gets `{"active": false}`; a wrong client secret gets 401. Every call is counted, so tests can
//! assert how many calls the broker made. Not for production: tokens live in memory.
//!
//! For load tests, a [resolver](DevProvider::set_resolver) answers tokens that were never
//! inserted (so millions of tokens need no table), and an [error rate](DevProvider::set_error_rate)
//! makes a fraction of calls fail with HTTP 503. With a [key set](DevProvider::set_jwks) it also
//! serves `GET /jwks` (RFC 7517), for brokers that verify JWTs locally; fetches count as calls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::prelude::{Engine as _, BASE64_STANDARD};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// A running development provider; stops when dropped.
pub struct DevProvider {
    addr: SocketAddr,
    state: Arc<ProviderState>,
    stop: CancellationToken,
}

/// Claims for a token that is not in the table, or `None` for "unknown" (`{"active": false}`).
pub type Resolver = Arc<dyn Fn(&str) -> Option<Value> + Send + Sync>;

struct ProviderState {
    /// `base64(client_id:client_secret)`, the expected HTTP Basic credentials.
    basic: String,
    tokens: Mutex<HashMap<String, Value>>,
    calls: AtomicU64,
    /// Calls being answered now, and the most there ever were at once.
    in_flight: AtomicU64,
    most_in_flight: AtomicU64,
    latency_ms: AtomicU64,
    /// When set, every call gets this HTTP status (e.g. 503) instead of an answer.
    fail_status: AtomicU64,
    /// Fraction of calls answered HTTP 503, in millionths (0 = none).
    error_ppm: AtomicU64,
    /// Calls answered HTTP 503 because of `error_ppm`.
    injected_errors: AtomicU64,
    resolver: Mutex<Option<Resolver>>,
    /// The JWK Set served at `/jwks` (404 until set).
    jwks: Mutex<Option<Value>>,
}

#[derive(Deserialize)]
struct IntrospectForm {
    token: String,
}

impl DevProvider {
    /// Starts on `127.0.0.1:0` (a free port) accepting `client_id`/`client_secret`.
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub async fn start(client_id: &str, client_secret: &str) -> std::io::Result<DevProvider> {
        Self::start_at("127.0.0.1:0", client_id, client_secret).await
    }

    /// Like [`DevProvider::start`], on `addr` (e.g. `127.0.0.1:8080`, so that a broker started
    /// elsewhere can be pointed at it).
    ///
    /// # Errors
    /// When `addr` cannot be bound.
    pub async fn start_at(
        addr: &str,
        client_id: &str,
        client_secret: &str,
    ) -> std::io::Result<DevProvider> {
        let state = Arc::new(ProviderState {
            basic: BASE64_STANDARD.encode(format!("{client_id}:{client_secret}")),
            tokens: Mutex::new(HashMap::new()),
            calls: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            most_in_flight: AtomicU64::new(0),
            latency_ms: AtomicU64::new(0),
            fail_status: AtomicU64::new(0),
            error_ppm: AtomicU64::new(0),
            injected_errors: AtomicU64::new(0),
            resolver: Mutex::new(None),
            jwks: Mutex::new(None),
        });
        let app = Router::new()
            .route("/introspect", post(introspect))
            .route("/jwks", get(jwks))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let until = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(until)
                .await
        });
        Ok(DevProvider { addr, state, stop })
    }

    /// The introspection endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}/introspect", self.addr)
    }

    /// The JWK Set URL (see [`DevProvider::set_jwks`]).
    pub fn jwks_url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    /// Serves `set` (a JWK Set, RFC 7517 section 5) at `/jwks`.
    pub fn set_jwks(&self, set: Value) {
        *self.state.jwks.lock().expect("jwks") = Some(set);
    }

    /// Registers `token` with these introspection claims (`active` defaults to true).
    pub fn insert(&self, token: &str, claims: Value) {
        self.state
            .tokens
            .lock()
            .expect("token table")
            .insert(token.to_owned(), active_by_default(claims));
    }

    /// Introspection calls answered so far (including failed ones).
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// The most calls (introspection and JWKS) ever answered at once.
    pub fn most_concurrent_calls(&self) -> u64 {
        self.state.most_in_flight.load(Ordering::SeqCst)
    }

    /// Delays every answer by `latency` (to make concurrent requests overlap).
    pub fn set_latency(&self, latency: Duration) {
        self.state
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    /// Makes every call answer HTTP `status` (0 restores normal answers).
    pub fn set_fail_status(&self, status: u16) {
        self.state
            .fail_status
            .store(status.into(), Ordering::SeqCst);
    }

    /// Answers tokens missing from the table with `resolver`'s claims (`active` defaults to
    /// true); a `None` from it means unknown (`{"active": false}`).
    pub fn set_resolver(&self, resolver: Resolver) {
        *self.state.resolver.lock().expect("resolver") = Some(resolver);
    }

    /// Makes a random `rate` (0.0..=1.0) of calls answer HTTP 503, as a flaky provider would.
    pub fn set_error_rate(&self, rate: f64) {
        let ppm = (rate.clamp(0.0, 1.0) * 1e6).round() as u64;
        self.state.error_ppm.store(ppm, Ordering::SeqCst);
    }

    /// Calls answered HTTP 503 because of [`DevProvider::set_error_rate`] so far.
    pub fn injected_errors(&self) -> u64 {
        self.state.injected_errors.load(Ordering::SeqCst)
    }
}

impl Drop for DevProvider {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn introspect(
    State(state): State<Arc<ProviderState>>,
    headers: HeaderMap,
    Form(form): Form<IntrospectForm>,
) -> Response {
    if let Some(failure) = misbehave(&state).await {
        return failure;
    }
    let authorised = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .is_some_and(|b| b == state.basic);
    if !authorised {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let claims = state
        .tokens
        .lock()
        .expect("token table")
        .get(&form.token)
        .cloned();
    let claims = claims.or_else(|| resolve(&state, &form.token));
    Json(claims.unwrap_or_else(|| json!({"active": false}))).into_response()
}

async fn jwks(State(state): State<Arc<ProviderState>>) -> Response {
    if let Some(failure) = misbehave(&state).await {
        return failure;
    }
    let set = state.jwks.lock().expect("jwks").clone();
    match set {
        Some(set) => Json(set).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Counts the call, waits the set latency, and returns the failure to answer with, if any (a
/// fixed status, or a random 503 at the set error rate).
async fn misbehave(state: &ProviderState) -> Option<Response> {
    state.calls.fetch_add(1, Ordering::SeqCst);
    let latency = state.latency_ms.load(Ordering::SeqCst);
    if latency > 0 {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.most_in_flight.fetch_max(now, Ordering::SeqCst);
        // Counted down when the answer goes, or when the broker hangs up first.
        let _answering = scopeguard(|| state.in_flight.fetch_sub(1, Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let fail = state.fail_status.load(Ordering::SeqCst) as u16;
    if let Ok(status) = StatusCode::from_u16(fail) {
        return Some(status.into_response());
    }
    let error_ppm = state.error_ppm.load(Ordering::SeqCst);
    if error_ppm > 0 && rand::random_range(0..1_000_000) < error_ppm {
        state.injected_errors.fetch_add(1, Ordering::SeqCst);
        return Some(StatusCode::SERVICE_UNAVAILABLE.into_response());
    }
    None
}

/// Runs `f` when dropped.
fn scopeguard<F: FnMut() -> u64>(f: F) -> impl Drop {
    struct Guard<F: FnMut() -> u64>(F);
    impl<F: FnMut() -> u64> Drop for Guard<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    Guard(f)
}

fn resolve(state: &ProviderState, token: &str) -> Option<Value> {
    // Cloned out so the resolver runs without the lock held.
    let resolver = state.resolver.lock().expect("resolver").clone()?;
    resolver(token).map(active_by_default)
}

/// Claims without an `active` member are active.
fn active_by_default(mut claims: Value) -> Value {
    if let Some(map) = claims.as_object_mut() {
        map.entry("active").or_insert(Value::Bool(true));
    }
    claims
}

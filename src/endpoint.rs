//! Serves an HTTP endpoint (`/metrics`, the admin `POST /revoke`) so that nobody can hold it,
//! or the process's file descriptors, for long.
//!
//! Every socket of the broker comes out of one `RLIMIT_NOFILE`: a peer that could open endpoint
//! connections without bound would stop the shim listener's accept(2) with `EMFILE`, and with
//! it every login. So each endpoint serves at most `max_connections` at once and closes any
//! connection over the cap as soon as it is accepted (queued connections would hold
//! descriptors too), and three timeouts close what a slow or silent peer holds:
//!
//! - header: a request head must arrive complete within this of the connection's start, or of
//!   the first byte after an idle pause (slow-loris);
//! - idle: after a response, a kept-alive connection waits this long for the next request;
//! - request: from a complete head to the response (the handler reads the body within it);
//!   a request over it is answered 503 and the connection closed.
//!
//! Who may come in is checked by an [`Access`] before a connection holds a slot (its peer
//! address against an allow list), then its TLS handshake (when the endpoint has TLS) must
//! finish within the header timeout; [`require_caller`] checks the caller's secret before any
//! body byte is read (a completed mTLS handshake stands for it).
//!
//! `axum::serve` sets none of these, so this module runs hyper's HTTP/1 connection itself (the
//! accept loop is ours, the HTTP is hyper's). hyper's own `header_read_timeout` is not used: its
//! clock starts whenever hyper waits for a head, which on a kept-alive connection includes the
//! idle time, so it cannot give a short header timeout and a longer keep-alive. A `Clock` per
//! connection tracks which of the three phases the connection is in instead.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics;
use extauth_protocol::extauth::Secret;

/// Default cap of the metrics endpoint (connections): a Prometheus server or two, `stats`, and
/// health checks need a handful.
pub(crate) const DEFAULT_METRICS_CONNECTIONS: usize = 64;
/// Default cap of the admin endpoint (connections): an identity provider's webhook and an
/// operator.
pub(crate) const DEFAULT_ADMIN_CONNECTIONS: usize = 16;

/// Default connection cap of the HTTP check front: a few XMPP servers' or proxies' connection pools
/// (MongooseIM's `connection_pool_size` defaults to 10 per host).
pub(crate) const DEFAULT_HTTP_CONNECTIONS: usize = 256;

/// Default header timeout: a client on the same network sends its head in one packet.
pub(crate) const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default idle timeout: keeps a Prometheus connection across 15 s scrapes.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default request timeout: a revocation waits for Redis; a scrape renders in milliseconds.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head (bytes): hyper's read buffer, which bounds what each connection holds
/// while a head is incomplete. 16 KiB is twice what curl or Prometheus send.
const MAX_HEAD: usize = 16 * 1024;

/// Pause after a failed accept(2) (`EMFILE` and friends), so a full descriptor table does not
/// turn the accept loop into a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Limits of one HTTP endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EndpointLimits {
    /// Most connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Time a request head may take to arrive complete, from the connection's start or from the
    /// first byte after an idle pause.
    pub header_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request after a response.
    pub idle_timeout: Duration,
    /// Time from a complete request head to the response.
    pub request_timeout: Duration,
}

impl EndpointLimits {
    /// The file descriptors the endpoint may hold: its cap, plus the one it accepts in order to
    /// close it when at the cap.
    pub(crate) fn max_fds(&self) -> u64 {
        self.max_connections as u64 + 1
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, admitting peers by `access`.
/// `name` (`metrics`, `admin` or `http`) is the `endpoint` label of the metrics and the word
/// the log lines use.
pub(crate) async fn serve(
    name: &'static str,
    listener: TcpListener,
    router: Router,
    limits: EndpointLimits,
    access: Access,
    shutdown: CancellationToken,
) {
    let endpoint = Arc::new(Endpoint {
        name,
        router,
        limits,
        access,
        shutdown,
    });
    endpoint.accept_loop(listener).await;
}

/// A bad endpoint setting: an exposed plaintext listener or a bad allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Plaintext on an address that is not loopback, without `--insecure-tcp`.
    #[error(
        "{flag} {local} is not a loopback address: tokens would cross the network in clear. \
         Serve it over TLS (--http-tls with --tls-cert and --tls-key), or give --insecure-tcp"
    )]
    NotLoopback {
        /// The flag that configured the listener (`--http-listen`).
        flag: String,
        /// The listening address.
        local: std::net::SocketAddr,
    },
    /// An allow-list entry that is neither an address nor a CIDR range.
    #[error("{value:?} is not an address or CIDR range like 10.0.0.0/8")]
    BadRange {
        /// The entry as given.
        value: String,
    },
}

/// Who may open a connection to an endpoint, and how it must speak.
#[derive(Clone, Default)]
pub(crate) struct Access {
    /// TLS every connection must complete first (with client certificates when its
    /// configuration requires them: mTLS).
    pub tls: Option<TlsAcceptor>,
    /// Peer addresses allowed in; empty allows every address.
    pub allow: Vec<IpRange>,
}

impl Access {
    /// Checks the listener rule shared with the shim listeners: plaintext only on a loopback
    /// address, unless `insecure` (callers' tokens would otherwise cross the network in clear).
    ///
    /// # Errors
    /// A non-loopback `local` address without TLS and without `insecure`, naming `flag`.
    pub(crate) fn check_exposure(
        &self,
        local: std::net::SocketAddr,
        insecure: bool,
        flag: &str,
    ) -> Result<(), EndpointError> {
        if self.tls.is_none() && !insecure && !local.ip().is_loopback() {
            return Err(EndpointError::NotLoopback {
                flag: flag.to_owned(),
                local,
            });
        }
        Ok(())
    }

    fn admits(&self, peer: std::net::IpAddr) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|range| range.contains(peer))
    }
}

/// An address range in CIDR notation (`10.0.0.0/8`, `::1/128`; a bare address is a /32 or
/// /128), for peer allow lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IpRange {
    base: std::net::IpAddr,
    prefix: u8,
}

impl IpRange {
    /// True when `addr` lies in the range (an IPv4-mapped IPv6 address counts as IPv4).
    pub(crate) fn contains(&self, addr: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        let (base, addr, bits) = match (self.base, addr) {
            (IpAddr::V4(b), IpAddr::V4(a)) => (u32::from(b) as u128, u32::from(a) as u128, 32),
            (IpAddr::V6(b), IpAddr::V6(a)) => (u128::from(b), u128::from(a), 128),
            _ => return false,
        };
        let host_bits = bits - u32::from(self.prefix);
        host_bits >= bits || (base >> host_bits) == (addr >> host_bits)
    }
}

impl std::str::FromStr for IpRange {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<IpRange, EndpointError> {
        let bad = || EndpointError::BadRange {
            value: s.to_owned(),
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let base: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if base.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(IpRange { base, prefix })
    }
}

impl std::fmt::Display for IpRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// Who may call an endpoint's routes: the caller secret, or a completed mTLS handshake.
pub(crate) struct Callers {
    /// The secret callers present; `None` when mTLS alone authenticates them.
    pub secret: Option<Secret>,
    /// True when every connection completed mTLS (a client certificate signed by the client CA).
    pub mtls: bool,
}

/// The header a caller may carry its secret in when `Authorization` is taken by the request
/// itself (an nginx `auth_request` passes the user's `Authorization: Bearer` through).
pub(crate) const CALLER_HEADER: &str = "x-extauth-caller";

/// Middleware: 401 unless the caller is authenticated, before anything reads the body.
///
/// The secret is accepted, compared in constant time, from `X-Extauth-Caller: <secret>` (or
/// `Bearer <secret>`), else from `Authorization: Bearer <secret>` (RFC 6750 section 2.1) or
/// the password of `Authorization: Basic` (RFC 7617: MongooseIM's `basic_auth`, Prosody's
/// `http_auth_credentials`, a `user:secret@` in a LuaSocket URL). With mTLS no secret is asked.
pub(crate) async fn require_caller(
    axum::extract::State(callers): axum::extract::State<Arc<Callers>>,
    request: Request<Body>,
    next: axum::middleware::Next,
) -> Response<Body> {
    if callers.mtls
        || callers
            .secret
            .as_ref()
            .is_some_and(|s| presented(request.headers(), s))
    {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(serde_json::json!({"error": "unauthorized"})),
    )
        .into_response()
}

/// True when `headers` carry `secret` in one of the places [`require_caller`] names.
fn presented(headers: &axum::http::HeaderMap, secret: &Secret) -> bool {
    use base64::Engine as _;
    use subtle::ConstantTimeEq;
    let same = |p: &[u8]| bool::from(p.ct_eq(secret.expose().as_bytes()));
    if let Some(v) = headers.get(CALLER_HEADER) {
        let v = v.as_bytes();
        return same(v.strip_prefix(b"Bearer ").unwrap_or(v));
    }
    let Some(v) = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) else {
        return false;
    };
    if let Some(bearer) = v.strip_prefix(b"Bearer ") {
        return same(bearer);
    }
    let Some(basic) = v.strip_prefix(b"Basic ") else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic) else {
        return false;
    };
    // The user part names the caller only; the password is the secret.
    match decoded.iter().position(|b| *b == b':') {
        Some(colon) => same(&decoded[colon + 1..]),
        None => false,
    }
}

/// One endpoint's accept loop and connections.
struct Endpoint {
    name: &'static str,
    router: Router,
    limits: EndpointLimits,
    access: Access,
    shutdown: CancellationToken,
}

impl Endpoint {
    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        // Connections refused since the cap was reached, for one warning per episode rather
        // than one per connection.
        let mut refused: Option<u64> = None;
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let stream = match accepted {
                Ok((_, peer)) if !self.access.admits(peer.ip()) => {
                    metrics::endpoint_refused(self.name);
                    debug!(
                        "{} endpoint: refused {peer}: not in the allow list",
                        self.name
                    );
                    continue;
                }
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!("{} endpoint: accept failed: {e}", self.name);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    if let Some(n) = refused.take() {
                        info!(
                            "{} endpoint: below its connection cap again, after closing {n} connection(s) at once",
                            self.name
                        );
                    }
                    tokio::spawn(self.clone().connection(stream, slot));
                }
                Err(_) => {
                    // Dropping the stream closes it: a connection over the cap costs one
                    // descriptor for this instant only.
                    drop(stream);
                    metrics::endpoint_refused(self.name);
                    if refused.is_none() {
                        warn!(
                            "{} endpoint: {} connections open (its cap); closing new ones at once",
                            self.name, self.limits.max_connections
                        );
                    }
                    *refused.get_or_insert(0) += 1;
                }
            }
        }
    }

    /// Serves one connection until the peer closes it, a timeout expires, or shutdown.
    async fn connection(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        slot: OwnedSemaphorePermit,
    ) {
        let _open = Open::new(self.name, slot);
        let clock = Arc::new(Clock::new(&self.limits));
        let stream: Box<dyn Io> = match &self.access.tls {
            None => Box::new(stream),
            // The handshake is part of the first head: it gets the header timeout.
            Some(tls) => {
                match tokio::time::timeout(self.limits.header_timeout, tls.accept(stream)).await {
                    Ok(Ok(tls)) => Box::new(tls),
                    Ok(Err(e)) => {
                        debug!("{} endpoint: TLS handshake failed: {e}", self.name);
                        return;
                    }
                    Err(_) => {
                        metrics::endpoint_timeout(self.name, Phase::Head.as_str());
                        return;
                    }
                }
            }
        };
        let io = TokioIo::new(Watched {
            stream,
            clock: clock.clone(),
        });
        let mut conn = pin!(http1::Builder::new()
            .max_buf_size(MAX_HEAD)
            // The Clock times heads (see the module documentation).
            .header_read_timeout(None)
            .serve_connection(io, self.service(clock.clone())));
        let mut expired = pin!(clock.expired());
        let mut draining = false;
        loop {
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(e) = served {
                        debug!("{} endpoint: connection ended: {e}", self.name);
                    }
                    return;
                }
                phase = &mut expired => {
                    // Dropping the connection closes it, whatever hyper was waiting for.
                    metrics::endpoint_timeout(self.name, phase.as_str());
                    debug!(
                        "{} endpoint: closing a connection: {}",
                        self.name,
                        phase.describe(&self.limits)
                    );
                    return;
                }
                _ = self.shutdown.cancelled(), if !draining => {
                    // Finishes a request in progress; the Clock still bounds it.
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }

    /// The router, with the request timeout and the [`Clock`]'s view of requests around it.
    fn service(
        &self,
        clock: Arc<Clock>,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
    > {
        let router = TowerToHyperService::new(self.router.clone());
        let (name, limit) = (self.name, self.limits.request_timeout);
        hyper::service::service_fn(move |request: Request<Incoming>| {
            clock.request_started();
            let response = router.call(request);
            let clock = clock.clone();
            async move {
                let response = match tokio::time::timeout(limit, response).await {
                    Ok(answered) => answered,
                    Err(_) => {
                        metrics::endpoint_timeout(name, Phase::Request.as_str());
                        warn!(
                            "{name} endpoint: a request took longer than {limit:?}; answered 503"
                        );
                        Ok(timed_out())
                    }
                };
                clock.request_finished();
                response
            }
        })
    }
}

/// 503, and the connection closes after it (the request may still be reading its body).
fn timed_out() -> Response<Body> {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONNECTION, "close")],
        "request timed out\n",
    )
        .into_response()
}

/// An open connection: holds its slot and counts in `extauth_endpoint_connections_open` until
/// dropped, however the connection ends.
struct Open {
    name: &'static str,
    _slot: OwnedSemaphorePermit,
}

impl Open {
    fn new(name: &'static str, slot: OwnedSemaphorePermit) -> Open {
        metrics::endpoint_connection(name, true);
        Open { name, _slot: slot }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::endpoint_connection(self.name, false);
    }
}

/// What a connection is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The rest of a request head (header timeout).
    Head,
    /// Its handler (request timeout, applied by the service).
    Request,
    /// The first byte of the next request (idle timeout).
    Idle,
}

impl Phase {
    /// The `phase` label of `extauth_endpoint_timeouts_total`.
    fn as_str(self) -> &'static str {
        match self {
            Phase::Head => "header",
            Phase::Request => "request",
            Phase::Idle => "idle",
        }
    }

    /// Why a connection in this phase was closed, for the log.
    fn describe(self, limits: &EndpointLimits) -> String {
        match self {
            Phase::Head => format!(
                "no complete request head within {:?}",
                limits.header_timeout
            ),
            Phase::Request => format!("no response within {:?}", limits.request_timeout),
            Phase::Idle => format!("idle for {:?}", limits.idle_timeout),
        }
    }
}

/// A connection's phase and its deadline (`None`: the request timeout applies, see
/// [`Endpoint::service`]).
struct Clock {
    header_timeout: Duration,
    idle_timeout: Duration,
    state: watch::Sender<(Phase, Option<Instant>)>,
}

impl Clock {
    /// A new connection: waiting for its first head.
    fn new(limits: &EndpointLimits) -> Clock {
        let first = (Phase::Head, Some(Instant::now() + limits.header_timeout));
        Clock {
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            state: watch::Sender::new(first),
        }
    }

    /// Bytes came in: after an idle pause, they start the next head's header timeout.
    fn bytes_arrived(&self) {
        self.state.send_if_modified(|state| match state.0 {
            Phase::Idle => {
                *state = (Phase::Head, Some(Instant::now() + self.header_timeout));
                true
            }
            Phase::Head | Phase::Request => false,
        });
    }

    /// hyper parsed a complete head and called the service.
    fn request_started(&self) {
        self.state.send_replace((Phase::Request, None));
    }

    /// The response is ready: the connection idles until the next request (hyper writes the
    /// response meanwhile, so a peer that does not read it is closed at the idle timeout).
    fn request_finished(&self) {
        self.state
            .send_replace((Phase::Idle, Some(Instant::now() + self.idle_timeout)));
    }

    /// Resolves with the phase whose deadline passed.
    async fn expired(&self) -> Phase {
        let mut changes = self.state.subscribe();
        loop {
            let (phase, deadline) = *changes.borrow_and_update();
            match deadline {
                Some(at) => tokio::select! {
                    _ = tokio::time::sleep_until(at) => return phase,
                    changed = changes.changed() => if changed.is_err() { return phase },
                },
                // `self` holds the sender, so this only fails if the Clock is gone.
                None => {
                    if changes.changed().await.is_err() {
                        return phase;
                    }
                }
            }
        }
    }
}

/// A connection's byte stream: plain TCP or TLS over it.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A connection's stream, telling its [`Clock`] when bytes arrive.
struct Watched {
    stream: Box<dyn Io>,
    clock: Arc<Clock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.clock.bytes_arrived();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Settings of the HTTP check front (`--http-listen`; served by the http_front module).
#[derive(Clone)]
pub(crate) struct HttpFrontConfig {
    /// `HOST:PORT` to listen on.
    pub listen: String,
    /// The caller secret; `None` only with mTLS.
    pub secret: Option<Secret>,
    /// Serve over TLS (the broker's `--tls-cert`/`--tls-key`; mTLS with `--client-ca`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// True when TLS requires client certificates (they then authenticate callers).
    pub mtls: bool,
    /// Peer addresses allowed in (empty: any).
    pub allow: Vec<IpRange>,
    /// Connection cap and timeouts.
    pub limits: EndpointLimits,
}

impl std::fmt::Debug for HttpFrontConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpFrontConfig")
            .field("listen", &self.listen)
            .field("secret", &self.secret.is_some())
            .field("tls", &self.tls.is_some())
            .field("mtls", &self.mtls)
            .field("allow", &self.allow)
            .field("limits", &self.limits)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> EndpointLimits {
        EndpointLimits {
            max_connections: 1,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn ip_ranges_parse_and_match() {
        let net: IpRange = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: IpRange = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("127.0.0.1".parse().unwrap()));
        let all: IpRange = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", ""] {
            assert!(bad.parse::<IpRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn callers_present_the_secret_as_bearer_basic_or_the_caller_header() {
        use axum::http::HeaderMap;
        let secret = Secret::new("s3cret".into());
        let with = |name: &str, value: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
            h
        };
        assert!(presented(&with("authorization", "Bearer s3cret"), &secret));
        // base64("mongooseim:s3cret")
        assert!(presented(
            &with("authorization", "Basic bW9uZ29vc2VpbTpzM2NyZXQ="),
            &secret
        ));
        assert!(presented(&with(CALLER_HEADER, "s3cret"), &secret));
        assert!(presented(&with(CALLER_HEADER, "Bearer s3cret"), &secret));
        assert!(!presented(&with("authorization", "Bearer s3cre"), &secret));
        // base64("s3cret"): no colon, no password.
        assert!(!presented(
            &with("authorization", "Basic czNjcmV0"),
            &secret
        ));
        assert!(!presented(&HeaderMap::new(), &secret));
        // The caller header wins: a user's bearer token in Authorization is no caller secret.
        let mut both = with(CALLER_HEADER, "wrong");
        both.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(!presented(&both, &secret));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_expires_at_the_header_timeout() {
        let clock = Clock::new(&limits());
        let started = Instant::now();
        assert_eq!(clock.expired().await, Phase::Head);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_pause_gets_the_idle_timeout_and_a_new_head_the_header_timeout() {
        let clock = Arc::new(Clock::new(&limits()));
        let watcher = tokio::spawn({
            let clock = clock.clone();
            async move { clock.expired().await }
        });
        clock.request_started();
        // A request never expires on the Clock: the service's timeout answers it.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!watcher.is_finished());
        clock.request_finished();
        tokio::time::sleep(Duration::from_secs(29)).await;
        // Bytes while idle: the head must now be complete within 5 s.
        clock.bytes_arrived();
        clock.bytes_arrived();
        let started = Instant::now();
        assert_eq!(watcher.await.unwrap(), Phase::Head);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_during_a_request_change_nothing() {
        let clock = Clock::new(&limits());
        clock.request_started();
        clock.bytes_arrived();
        clock.request_finished();
        let started = Instant::now();
        assert_eq!(clock.expired().await, Phase::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }
}

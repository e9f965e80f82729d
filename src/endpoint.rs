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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics;

/// Default cap of the metrics endpoint (connections): a Prometheus server or two, `stats`, and
/// health checks need a handful.
pub const DEFAULT_METRICS_CONNECTIONS: usize = 64;
/// Default cap of the admin endpoint (connections): an identity provider's webhook and an
/// operator.
pub const DEFAULT_ADMIN_CONNECTIONS: usize = 16;
/// Default header timeout: a client on the same network sends its head in one packet.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default idle timeout: keeps a Prometheus connection across 15 s scrapes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default request timeout: a revocation waits for Redis; a scrape renders in milliseconds.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head (bytes): hyper's read buffer, which bounds what each connection holds
/// while a head is incomplete. 16 KiB is twice what curl or Prometheus send.
const MAX_HEAD: usize = 16 * 1024;

/// Pause after a failed accept(2) (`EMFILE` and friends), so a full descriptor table does not
/// turn the accept loop into a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Limits of one HTTP endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointLimits {
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
    pub fn max_fds(&self) -> u64 {
        self.max_connections as u64 + 1
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled. `name` (`metrics` or `admin`)
/// is the `endpoint` label of the metrics and the word the log lines use.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    router: Router,
    limits: EndpointLimits,
    shutdown: CancellationToken,
) {
    let endpoint = Arc::new(Endpoint {
        name,
        router,
        limits,
        shutdown,
    });
    endpoint.accept_loop(listener).await;
}

/// One endpoint's accept loop and connections.
struct Endpoint {
    name: &'static str,
    router: Router,
    limits: EndpointLimits,
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
    async fn connection(self: Arc<Self>, stream: TcpStream, slot: OwnedSemaphorePermit) {
        let _open = Open::new(self.name, slot);
        let clock = Arc::new(Clock::new(&self.limits));
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

/// A connection's stream, telling its [`Clock`] when bytes arrive.
struct Watched {
    stream: TcpStream,
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

//! Listeners and connections: accept shims on Unix and TCP sockets, run the wire-protocol
//! handshake, answer pipelined requests, and stop cleanly. What a connection may hold before and
//! after its handshake is decided in [`crate::admission`].

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admission::{Handshake, Handshakes, InFlight, Slot, Slots};
use crate::config::{Limits, PeerPolicy};
use crate::engine::{Engine, Front, Later, Outcome};
use crate::listener::{Incoming, Listener};
use crate::metrics::{self, HandshakeFailure};
use extauth_protocol::wire::{
    self, ClientMsg, Reason, Refused, Request, Response, ServerMsg, Source, Welcome,
};

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Responses queued per connection before its request reader waits for the writer.
const RESPONSE_QUEUE: usize = 256;

/// Serves shims on every listener until `shutdown` is cancelled, then waits for in-flight
/// requests (at most `drain`) and removes the Unix socket files it bound.
pub(crate) async fn serve(
    listeners: Vec<Listener>,
    engine: Arc<Engine>,
    limits: Limits,
    peers: PeerPolicy,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let tracker = TaskTracker::new();
    let peers = Arc::new(peers);
    let handshakes = Handshakes::new(limits.max_handshakes, limits.max_handshakes_per_ip);
    let slots = Slots::new(limits.max_connections);
    for listener in listeners {
        info!(listen = %listener.describe(), "listening for shims");
        let acceptor = Acceptor {
            engine: engine.clone(),
            limits,
            peers: peers.clone(),
            handshakes: handshakes.clone(),
            slots: slots.clone(),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        };
        tracker.spawn(acceptor.run(listener));
    }
    shutdown.cancelled().await;
    tracker.close();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        warn!("requests still in flight after {drain:?}; exiting anyway");
    }
}

/// Accepts connections on one listener and gives each a place in the handshake budget at once:
/// it never stops accepting, so hostile peers cannot make shims wait in the kernel's listen
/// queue behind them.
struct Acceptor {
    engine: Arc<Engine>,
    limits: Limits,
    peers: Arc<PeerPolicy>,
    handshakes: Arc<Handshakes>,
    slots: Arc<Slots>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Acceptor {
    async fn run(self, listener: Listener) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok(incoming) => {
                    let handshake = self.handshakes.begin(incoming.origin());
                    let connection = Connection {
                        engine: self.engine.clone(),
                        limits: self.limits,
                        peers: self.peers.clone(),
                        slots: self.slots.clone(),
                        shutdown: self.shutdown.clone(),
                    };
                    self.tracker.spawn(connection.run(incoming, handshake));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        if let Some(path) = listener.bound_path() {
            // After a privilege drop the socket's directory may not be ours to write: say so,
            // since the next start would otherwise meet a stale socket without a word.
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    warn!("could not remove socket {}: {e}", path.display());
                }
                _ => {}
            }
        }
    }
}

/// One shim connection: a reader that starts a task per request (at most `max_in_flight` at
/// once) and a writer that sends the responses as they complete (pipelining).
struct Connection {
    engine: Arc<Engine>,
    limits: Limits,
    peers: Arc<PeerPolicy>,
    slots: Arc<Slots>,
    shutdown: CancellationToken,
}

/// Why a connection's reader stopped.
enum Stop {
    /// The peer closed, sent garbage, or went idle: its pending requests are abandoned.
    Peer,
    /// The broker is shutting down: pending requests are finished and answered.
    Shutdown,
    /// Its slot went to a new connection: requests already read are finished and answered.
    Evicted,
}

/// A connection that completed its handshake: its frames, its sink, the peer's description
/// for logs, its slot, and its first frame with the in-flight mark that came with the slot.
struct Admitted {
    frames: FramedRead<Reader, LengthDelimitedCodec>,
    sink: FramedWrite<Writer, LengthDelimitedCodec>,
    peer: String,
    slot: Slot,
    first: (BytesMut, InFlight),
}

impl Connection {
    async fn run(self, incoming: Incoming, handshake: Handshake) {
        // Peer check, TLS, the Hello and the first request all within one bound and one place
        // in the handshake budget: a slow or silent peer holds nothing but that place, and only
        // until the timeout or until newer handshakes need it.
        let limit = self.limits.handshake_timeout;
        let admitted = tokio::select! {
            _ = handshake.dropped() => return,
            a = tokio::time::timeout(limit, self.admit(incoming)) => a,
        };
        drop(handshake);
        let Admitted {
            mut frames,
            mut sink,
            peer,
            slot,
            first,
        } = match admitted {
            Ok(Some(admitted)) => admitted,
            Ok(None) => return,
            Err(_) => {
                metrics::handshake_failed(HandshakeFailure::Timeout);
                debug!("no handshake within {limit:?}; closing");
                return;
            }
        };
        let (tx, mut rx) = mpsc::channel::<Response>(RESPONSE_QUEUE);
        let writer = tokio::spawn(async move {
            while let Some(response) = rx.recv().await {
                // Every answer already queued goes out with this one: one flush (one write) per
                // burst rather than per answer.
                let mut batch = Some(response);
                while let Some(response) = batch.take().or_else(|| rx.try_recv().ok()) {
                    let Ok(frame) = encode_body(&ServerMsg::Response(response)) else {
                        continue;
                    };
                    if sink.feed(frame).await.is_err() {
                        return;
                    }
                }
                if SinkExt::<Bytes>::flush(&mut sink).await.is_err() {
                    return;
                }
            }
        });
        let mut requests = JoinSet::new();
        let reader = RequestReader {
            connection: &self,
            requests: &mut requests,
            tx,
            peer: &peer,
            slot: &slot,
        };
        match reader.run(&mut frames, first).await {
            // Nobody will read these answers: stop the work (waiters of a shared flight leave
            // it; the flight itself goes on for its other waiters).
            Stop::Peer => requests.abort_all(),
            Stop::Shutdown | Stop::Evicted => while requests.join_next().await.is_some() {},
        }
        // The writer ends once every request task has dropped its sender.
        let _ = writer.await;
        drop(slot);
        debug!(peer, "connection closed");
    }

    /// Checks the peer, completes TLS and the protocol handshake, waits for the first request
    /// and takes a slot for it.
    ///
    /// The slot comes with the first request, not with the `Hello`: a slot given at the
    /// `Hello` could be evicted in the instant between the `Welcome` and the shim's first
    /// request, and a shim refuses the login when a connection it has just opened fails (it
    /// retries only on a connection it reused). Taken with the first request, a slot is never
    /// lost before a request is in flight on it.
    async fn admit(&self, incoming: Incoming) -> Option<Admitted> {
        let (read, write) = incoming.open(&self.peers).await?;
        let codec = || {
            LengthDelimitedCodec::builder()
                .max_frame_length(wire::MAX_FRAME)
                .new_codec()
        };
        let mut frames = FramedRead::new(read, codec());
        let mut sink = FramedWrite::new(write, codec());
        let hello = read_hello(&mut frames, &mut sink).await;
        let Some(peer) = hello else {
            metrics::handshake_failed(HandshakeFailure::Hello);
            return None;
        };
        welcome(&mut sink).await?;
        let Some(Ok(first)) = frames.next().await else {
            metrics::handshake_failed(HandshakeFailure::Hello);
            debug!(peer, "closed before its first request");
            return None;
        };
        let Some((slot, in_flight)) = self.slots.admit() else {
            metrics::handshake_failed(HandshakeFailure::Busy);
            debug!(
                peer,
                "every connection slot has a request in flight; refusing"
            );
            refuse_request(&mut sink, &first).await;
            return None;
        };
        debug!(peer, "shim connected");
        Some(Admitted {
            frames,
            sink,
            peer,
            slot,
            first: (first, in_flight),
        })
    }
}

/// Reads a connection's requests and starts a task for each, at most `max_in_flight` at once.
struct RequestReader<'a> {
    connection: &'a Connection,
    requests: &'a mut JoinSet<()>,
    tx: mpsc::Sender<Response>,
    peer: &'a str,
    slot: &'a Slot,
}

impl RequestReader<'_> {
    async fn run<R: AsyncRead + Unpin>(
        mut self,
        frames: &mut FramedRead<R, LengthDelimitedCodec>,
        (first, in_flight): (BytesMut, InFlight),
    ) -> Stop {
        let (limits, shutdown) = (&self.connection.limits, &self.connection.shutdown);
        let permits = Arc::new(Semaphore::new(limits.max_in_flight));
        let permit = permits.clone().try_acquire_owned();
        self.dispatch(
            first,
            (permit.expect("a new semaphore has permits"), in_flight),
        );
        loop {
            // Stopping comes first (`biased`): an evicted peer that keeps sending must not keep
            // its connection by never letting the reader look at the eviction.
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Stop::Shutdown,
                _ = self.slot.evicted() => return Stop::Evicted,
                p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let frame = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Stop::Shutdown,
                _ = self.slot.evicted() => return Stop::Evicted,
                f = tokio::time::timeout(limits.idle_timeout, frames.next()) => f,
            };
            let body = match frame {
                Err(_) => {
                    debug!(peer = self.peer, "closing idle connection");
                    return Stop::Peer;
                }
                Ok(None) => return Stop::Peer,
                Ok(Some(Ok(body))) => body,
                Ok(Some(Err(e))) => {
                    warn!(peer = self.peer, "closing connection: {e}");
                    return Stop::Peer;
                }
            };
            // Reap finished requests so the set does not grow with the connection's lifetime.
            while self.requests.try_join_next().is_some() {}
            let in_flight = self.slot.request();
            self.dispatch(body, (permit, in_flight));
        }
    }

    /// Starts answering a request frame; the marks it holds are released with its answer.
    fn dispatch(&mut self, body: BytesMut, marks: (OwnedSemaphorePermit, InFlight)) {
        match wire::decode::<ClientMsg>(&body) {
            Ok(ClientMsg::Request(request)) => {
                // A cached verdict is answered here: a task per request costs more than the
                // lookup (its future holds the engine's whole state machine).
                match self
                    .connection
                    .engine
                    .answer_now(&request.command, Front::Shim)
                {
                    Ok(outcome) => self.reply_now(response(request.id, outcome), marks),
                    Err(later) => {
                        let (engine, tx) = (self.connection.engine.clone(), self.tx.clone());
                        self.requests.spawn(async move {
                            let _ = tx.send(answer(&engine, request, later).await).await;
                            drop(marks);
                        });
                    }
                }
            }
            // The length prefix keeps the stream in sync, so a bad frame costs only itself.
            Ok(ClientMsg::Hello(_)) | Err(_) => warn!(
                peer = self.peer,
                "ignoring an undecodable or out-of-place frame of {} bytes",
                body.len()
            ),
        }
    }

    /// Queues an answer decided where the request was read; a full queue (the writer is
    /// behind) hands it to a task rather than stopping the reader.
    fn reply_now(&mut self, response: Response, marks: (OwnedSemaphorePermit, InFlight)) {
        match self.tx.try_send(response) {
            Err(TrySendError::Full(response)) => {
                let tx = self.tx.clone();
                self.requests.spawn(async move {
                    let _ = tx.send(response).await;
                    drop(marks);
                });
            }
            Ok(()) | Err(TrySendError::Closed(_)) => drop(marks),
        }
    }
}

/// Decides one request [`Engine::answer_now`] could not, within its deadline (counted with
/// `front="shim"`).
async fn answer(engine: &Engine, request: Request, later: Later) -> Response {
    let deadline = Duration::from_millis(request.deadline_ms.into());
    let outcome = engine
        .answer_later(&request.command, later, deadline, Front::Shim)
        .await;
    response(request.id, outcome)
}

/// The wire response to request `id`.
fn response(id: u64, outcome: Outcome) -> Response {
    Response {
        id,
        ok: outcome.ok,
        reason: outcome.reason,
        source: outcome.source,
    }
}

/// Reads the `Hello` and checks its version. Returns the peer's description, or `None` when the
/// connection must close.
async fn read_hello<R, W>(
    frames: &mut FramedRead<R, LengthDelimitedCodec>,
    sink: &mut FramedWrite<W, LengthDelimitedCodec>,
) -> Option<String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let body = frames.next().await?.ok()?;
    let hello = match wire::decode::<ClientMsg>(&body) {
        Ok(ClientMsg::Hello(h)) => h,
        _ => {
            refuse(sink, "expected a Hello frame first").await;
            return None;
        }
    };
    let peer = format!("{} pid {}", hello.node, hello.pid);
    if hello.version != wire::VERSION {
        warn!(
            peer,
            version = hello.version,
            "refusing shim with another protocol version"
        );
        refuse(
            sink,
            &format!("unsupported protocol version {}", hello.version),
        )
        .await;
        return None;
    }
    Some(peer)
}

/// Accepts the handshake.
async fn welcome<W: AsyncWrite + Unpin>(
    sink: &mut FramedWrite<W, LengthDelimitedCodec>,
) -> Option<()> {
    let welcome = ServerMsg::Welcome(Welcome {
        version: wire::VERSION,
        server: concat!("extauth-broker/", env!("CARGO_PKG_VERSION")).into(),
    });
    sink.send(encode_body(&welcome).ok()?).await.ok()
}

async fn refuse<W: AsyncWrite + Unpin>(
    sink: &mut FramedWrite<W, LengthDelimitedCodec>,
    reason: &str,
) {
    let msg = ServerMsg::Refused(Refused {
        version: wire::VERSION,
        reason: reason.to_owned(),
    });
    if let Ok(frame) = encode_body(&msg) {
        let _ = sink.send(frame).await;
    }
}

/// Answers a request that no slot could be found for with `unavailable` (fail closed, and
/// clear to the shim); anything else gets no answer.
async fn refuse_request<W: AsyncWrite + Unpin>(
    sink: &mut FramedWrite<W, LengthDelimitedCodec>,
    body: &[u8],
) {
    let Ok(ClientMsg::Request(request)) = wire::decode::<ClientMsg>(body) else {
        return;
    };
    let response = ServerMsg::Response(Response {
        id: request.id,
        ok: false,
        reason: Reason::Unavailable,
        source: Source::Local,
    });
    if let Ok(frame) = encode_body(&response) {
        let _ = sink.send(frame).await;
    }
}

/// Encodes a message body for `LengthDelimitedCodec`, which adds the length prefix itself.
fn encode_body(msg: &ServerMsg) -> std::io::Result<Bytes> {
    let frame = wire::encode(msg)?;
    Ok(Bytes::from(frame).slice(4..))
}

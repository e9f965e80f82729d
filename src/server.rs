//! Listeners and connections: accept shims on Unix and TCP sockets, run the wire-protocol
//! handshake, answer pipelined requests, and stop cleanly.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{Limits, PeerPolicy};
use crate::engine::{Engine, Outcome};
use crate::listener::{Incoming, Listener};
use crate::metrics;
use crate::wire::{
    self, ClientMsg, Reason, Refused, Request, Response, ServerMsg, Source, Welcome,
};

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Responses queued per connection before its request reader waits for the writer.
const RESPONSE_QUEUE: usize = 256;

/// Serves shims on every listener until `shutdown` is cancelled, then waits for in-flight
/// requests (at most `drain`) and removes the Unix socket files it bound.
pub async fn serve(
    listeners: Vec<Listener>,
    engine: Arc<Engine>,
    limits: Limits,
    peers: PeerPolicy,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let tracker = TaskTracker::new();
    let peers = Arc::new(peers);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    for listener in listeners {
        info!(listen = %listener.describe(), "listening for shims");
        let acceptor = Acceptor {
            engine: engine.clone(),
            limits,
            peers: peers.clone(),
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

/// Accepts connections on one listener, at most `max_connections` at once across listeners
/// (the rest wait in the kernel's listen queue).
struct Acceptor {
    engine: Arc<Engine>,
    limits: Limits,
    peers: Arc<PeerPolicy>,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Acceptor {
    async fn run(self, listener: Listener) {
        loop {
            let slot = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                s = self.slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            };
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok(incoming) => {
                    let connection = Connection {
                        engine: self.engine.clone(),
                        limits: self.limits,
                        peers: self.peers.clone(),
                        shutdown: self.shutdown.clone(),
                    };
                    self.tracker.spawn(async move {
                        connection.run(incoming).await;
                        drop(slot);
                    });
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
    shutdown: CancellationToken,
}

/// Why a connection's reader stopped.
enum Stop {
    /// The peer closed, sent garbage, or went idle: its pending requests are abandoned.
    Peer,
    /// The broker is shutting down: pending requests are finished and answered.
    Shutdown,
}

impl Connection {
    async fn run(self, incoming: Incoming) {
        // Peer check, TLS and the Hello all within one bound: a slow-loris peer holds nothing
        // but its own task.
        let limit = self.limits.handshake_timeout;
        let (mut frames, mut sink, peer) =
            match tokio::time::timeout(limit, self.open(incoming)).await {
                Ok(Some(opened)) => opened,
                Ok(None) => return,
                Err(_) => {
                    debug!("no handshake within {limit:?}; closing");
                    return;
                }
            };
        metrics::connection_opened();
        let (tx, mut rx) = mpsc::channel::<Response>(RESPONSE_QUEUE);
        let writer = tokio::spawn(async move {
            while let Some(response) = rx.recv().await {
                let Ok(frame) = encode_body(&ServerMsg::Response(response)) else {
                    continue;
                };
                if sink.send(frame).await.is_err() {
                    break;
                }
            }
        });
        let mut requests = JoinSet::new();
        match self
            .read_requests(&mut frames, &mut requests, tx, &peer)
            .await
        {
            // Nobody will read these answers: stop the work (waiters of a shared flight leave
            // it; the flight itself goes on for its other waiters).
            Stop::Peer => requests.abort_all(),
            Stop::Shutdown => while requests.join_next().await.is_some() {},
        }
        // The writer ends once every request task has dropped its sender.
        let _ = writer.await;
        metrics::connection_closed();
        debug!(peer, "connection closed");
    }

    /// Checks the peer, completes TLS and the protocol handshake.
    async fn open(
        &self,
        incoming: Incoming,
    ) -> Option<(
        FramedRead<Reader, LengthDelimitedCodec>,
        FramedWrite<Writer, LengthDelimitedCodec>,
        String,
    )> {
        let (read, write) = incoming.open(&self.peers).await?;
        let codec = || {
            LengthDelimitedCodec::builder()
                .max_frame_length(wire::MAX_FRAME)
                .new_codec()
        };
        let mut frames = FramedRead::new(read, codec());
        let mut sink = FramedWrite::new(write, codec());
        let peer = handshake(&mut frames, &mut sink).await?;
        Some((frames, sink, peer))
    }

    async fn read_requests<R: AsyncRead + Unpin>(
        &self,
        frames: &mut FramedRead<R, LengthDelimitedCodec>,
        requests: &mut JoinSet<()>,
        tx: mpsc::Sender<Response>,
        peer: &str,
    ) -> Stop {
        let permits = Arc::new(Semaphore::new(self.limits.max_in_flight));
        loop {
            let permit = tokio::select! {
                _ = self.shutdown.cancelled() => return Stop::Shutdown,
                p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let frame = tokio::select! {
                _ = self.shutdown.cancelled() => return Stop::Shutdown,
                f = tokio::time::timeout(self.limits.idle_timeout, frames.next()) => f,
            };
            let body = match frame {
                Err(_) => {
                    debug!(peer, "closing idle connection");
                    return Stop::Peer;
                }
                Ok(None) => return Stop::Peer,
                Ok(Some(Ok(body))) => body,
                Ok(Some(Err(e))) => {
                    warn!(peer, "closing connection: {e}");
                    return Stop::Peer;
                }
            };
            // Reap finished requests so the set does not grow with the connection's lifetime.
            while requests.try_join_next().is_some() {}
            match wire::decode::<ClientMsg>(&body) {
                Ok(ClientMsg::Request(request)) => {
                    let (engine, tx) = (self.engine.clone(), tx.clone());
                    requests.spawn(async move {
                        let _ = tx.send(answer(&engine, request).await).await;
                        drop(permit);
                    });
                }
                // The length prefix keeps the stream in sync, so a bad frame costs only itself.
                Ok(ClientMsg::Hello(_)) | Err(_) => warn!(
                    peer,
                    "ignoring an undecodable or out-of-place frame of {} bytes",
                    body.len()
                ),
            }
        }
    }
}

/// Decides one request within its deadline, and counts it.
async fn answer(engine: &Engine, request: Request) -> Response {
    let started = std::time::Instant::now();
    let deadline = Duration::from_millis(request.deadline_ms.into());
    let until = started + deadline;
    let outcome = match tokio::time::timeout(deadline, engine.handle(&request.command, until)).await
    {
        Ok(o) => o,
        Err(_) => Outcome {
            ok: false,
            reason: Reason::DeadlineExceeded,
            source: Source::Local,
        },
    };
    metrics::request(
        request.command.name(),
        outcome.ok,
        outcome.reason,
        outcome.source,
        started.elapsed(),
    );
    Response {
        id: request.id,
        ok: outcome.ok,
        reason: outcome.reason,
        source: outcome.source,
    }
}

/// Reads the `Hello` and answers it. Returns the peer's description, or `None` when the
/// connection must close.
async fn handshake<R, W>(
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
    let welcome = ServerMsg::Welcome(Welcome {
        version: wire::VERSION,
        server: concat!("extauth-broker/", env!("CARGO_PKG_VERSION")).into(),
    });
    sink.send(encode_body(&welcome).ok()?).await.ok()?;
    debug!(peer, "shim connected");
    Some(peer)
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

/// Encodes a message body for `LengthDelimitedCodec`, which adds the length prefix itself.
fn encode_body(msg: &ServerMsg) -> std::io::Result<Bytes> {
    let frame = wire::encode(msg)?;
    Ok(Bytes::from(frame).slice(4..))
}

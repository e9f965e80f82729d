//! Listeners and connections: accept shims on Unix and TCP sockets, run the wire-protocol
//! handshake, answer pipelined requests, and stop cleanly.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::ListenAddr;
use crate::engine::Engine;
use crate::wire::{self, ClientMsg, Reason, Refused, Response, ServerMsg, Source, Welcome};

/// How long a new connection may take to send its `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per connection before its request reader waits for the writer.
const RESPONSE_QUEUE: usize = 256;

/// A bound listening socket.
pub enum Listener {
    /// A Unix stream socket; the path is removed again on shutdown.
    Unix(UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `addr`. A Unix socket path left over by a previous run is replaced, but only if no
    /// process answers on it; the socket gets `mode`.
    ///
    /// # Errors
    /// Bind failures, a live socket already at the path, permission changes that fail.
    pub async fn bind(addr: &ListenAddr, mode: u32) -> Result<Listener> {
        match addr {
            ListenAddr::Tcp(hostport) => {
                let l = TcpListener::bind(hostport)
                    .await
                    .with_context(|| format!("binding tcp:{hostport}"))?;
                Ok(Listener::Tcp(l))
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                let l = UnixListener::bind(path)
                    .with_context(|| format!("binding unix:{}", path.display()))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .with_context(|| format!("setting mode {mode:o} on {}", path.display()))?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    /// The address for logs (`unix:/path`, `tcp:127.0.0.1:7000`).
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp:?".into(), |a| format!("tcp:{a}")),
        }
    }
}

async fn remove_stale_socket(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        anyhow::bail!(
            "{} is in use by a running process (another broker?)",
            path.display()
        );
    }
    std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))
}

/// Serves shims on every listener until `shutdown` is cancelled, then waits for in-flight
/// requests (at most `drain`) and removes Unix socket files.
pub async fn serve(
    listeners: Vec<Listener>,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let tracker = TaskTracker::new();
    for listener in listeners {
        info!(listen = %listener.describe(), "listening for shims");
        tracker.spawn(accept_loop(
            listener,
            engine.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    shutdown.cancelled().await;
    tracker.close();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        warn!("requests still in flight after {drain:?}; exiting anyway");
    }
}

async fn accept_loop(
    listener: Listener,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = accept(&listener) => a,
        };
        match accepted {
            Ok((read, write)) => {
                tracker.spawn(
                    Connection {
                        engine: engine.clone(),
                        shutdown: shutdown.clone(),
                    }
                    .run(read, write),
                );
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

type Halves = (
    Box<dyn AsyncRead + Send + Unpin>,
    Box<dyn AsyncWrite + Send + Unpin>,
);

async fn accept(listener: &Listener) -> std::io::Result<Halves> {
    match listener {
        Listener::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

/// One shim connection: a reader that spawns a task per request and a writer that sends the
/// responses as they complete (pipelining).
struct Connection {
    engine: Arc<Engine>,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(
        self,
        read: Box<dyn AsyncRead + Send + Unpin>,
        write: Box<dyn AsyncWrite + Send + Unpin>,
    ) {
        let codec = || {
            LengthDelimitedCodec::builder()
                .max_frame_length(wire::MAX_FRAME)
                .new_codec()
        };
        let mut frames = FramedRead::new(read, codec());
        let mut sink = FramedWrite::new(write, codec());
        let peer = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut frames, &mut sink))
            .await
        {
            Ok(Some(peer)) => peer,
            Ok(None) => return,
            Err(_) => {
                debug!("no handshake within {HANDSHAKE_TIMEOUT:?}; closing");
                return;
            }
        };
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
        self.read_requests(&mut frames, tx, &peer).await;
        // The writer ends once every request task has dropped its sender.
        let _ = writer.await;
        debug!(peer, "connection closed");
    }

    async fn read_requests<R: AsyncRead + Unpin>(
        &self,
        frames: &mut FramedRead<R, LengthDelimitedCodec>,
        tx: mpsc::Sender<Response>,
        peer: &str,
    ) {
        loop {
            let frame = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                f = frames.next() => f,
            };
            let body = match frame {
                None => return,
                Some(Ok(body)) => body,
                Some(Err(e)) => {
                    warn!(peer, "closing connection: {e}");
                    return;
                }
            };
            match wire::decode::<ClientMsg>(&body) {
                Ok(ClientMsg::Request(request)) => {
                    let (engine, tx) = (self.engine.clone(), tx.clone());
                    tokio::spawn(async move {
                        let deadline = Duration::from_millis(request.deadline_ms.into());
                        let outcome =
                            match tokio::time::timeout(deadline, engine.handle(&request.command))
                                .await
                            {
                                Ok(o) => Response {
                                    id: request.id,
                                    ok: o.ok,
                                    reason: o.reason,
                                    source: o.source,
                                },
                                Err(_) => Response {
                                    id: request.id,
                                    ok: false,
                                    reason: Reason::DeadlineExceeded,
                                    source: Source::Local,
                                },
                            };
                        let _ = tx.send(outcome).await;
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

//! Lanes: one request in flight each. A lane is an extauth program on stdio (a real
//! extauth-shim, or any other program), a slot on a pipelined wire-protocol connection, or a
//! kept-alive connection to the broker's HTTP check front.

use std::collections::HashMap;
use std::io;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command as Process};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use super::services::Rss;
use extauth_broker::ListenAddr;
use extauth_protocol::extauth::{reply, Command, Secret};
use extauth_protocol::wire::{self, ClientMsg, Hello, Reason, Request, ServerMsg};

/// The deadline the wire lanes give the broker per request (what a shim with `--timeout 10` sends).
const WIRE_DEADLINE_MS: u32 = 10_000;
/// How long a program may take to exit after end of input before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// An answer: what ejabberd would see, and the broker's reason when the lane can tell.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// Accepted?
    pub ok: bool,
    /// The broker's reason (wire lanes only).
    pub reason: Option<Reason>,
}

/// One request in flight at a time.
pub enum Lane {
    /// An extauth program on stdio.
    Program(Box<ProgramLane>),
    /// A slot on a shared wire connection.
    Wire(Arc<WireConn>),
    /// A connection to the HTTP check front.
    Http(Box<HttpLane>),
}

impl Lane {
    /// Peak resident memory of the lane's program (KiB); `None` for wire lanes.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        match self {
            Lane::Program(p) => p.child.id().and_then(Rss::of).map(|r| r.peak_kib),
            Lane::Wire(_) | Lane::Http(_) => None,
        }
    }

    /// Sends `auth:USER:DOMAIN:TOKEN` and waits for the answer.
    ///
    /// # Errors
    /// The program or connection broke, or answered something that is not an answer.
    pub async fn auth(&mut self, user: &str, domain: &str, token: &str) -> io::Result<Answer> {
        match self {
            Lane::Program(p) => {
                p.ask(format!("auth:{user}:{domain}:{token}").as_bytes())
                    .await
            }
            Lane::Wire(w) => {
                let command = Command::Auth {
                    user: user.to_owned(),
                    server: domain.to_owned(),
                    password: Secret::new(token.to_owned()),
                };
                w.ask(command).await
            }
            Lane::Http(h) => {
                h.ask(
                    "/check_password",
                    &[("user", user), ("server", domain), ("pass", token)],
                )
                .await
            }
        }
    }

    /// Sends `isuser:USER:DOMAIN` (warms the lane up: starts the program, opens its connection).
    ///
    /// # Errors
    /// As [`Lane::auth`].
    pub async fn isuser(&mut self, user: &str, domain: &str) -> io::Result<Answer> {
        match self {
            Lane::Program(p) => p.ask(format!("isuser:{user}:{domain}").as_bytes()).await,
            Lane::Wire(w) => {
                w.ask(Command::IsUser {
                    user: user.to_owned(),
                    server: domain.to_owned(),
                })
                .await
            }
            Lane::Http(h) => {
                h.ask("/user_exists", &[("user", user), ("server", domain)])
                    .await
            }
        }
    }
}

/// How to start an extauth program.
#[derive(Debug, Clone)]
pub struct ProgramSpec {
    /// The executable.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl ProgramSpec {
    /// A command line run by `sh -c` (the shell is replaced by the program with `exec`).
    pub fn shell(command: &str, env: Vec<(String, String)>) -> Self {
        ProgramSpec {
            program: "sh".into(),
            args: vec!["-c".into(), format!("exec {command}")],
            env,
        }
    }
}

/// An extauth program speaking ejabberd's `{packet, 2}` protocol on its stdin/stdout.
pub struct ProgramLane {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
}

impl ProgramLane {
    /// Starts the program (its stderr is discarded).
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn spawn(spec: &ProgramSpec) -> Result<Self> {
        let mut child = Process::new(&spec.program)
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", spec.program))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("program stdout")?;
        Ok(ProgramLane {
            child,
            stdin,
            stdout,
        })
    }

    async fn ask(&mut self, request: &[u8]) -> io::Result<Answer> {
        let len = u16::try_from(request.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "request over 65535 bytes"))?;
        let mut frame = Vec::with_capacity(2 + request.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(request);
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?;
        stdin.write_all(&frame).await?;
        let mut answer = [0u8; 4];
        self.stdout.read_exact(&mut answer).await?;
        match answer {
            a if a == reply(true) => Ok(Answer {
                ok: true,
                reason: None,
            }),
            a if a == reply(false) => Ok(Answer {
                ok: false,
                reason: None,
            }),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an extauth reply: {other:02x?}"),
            )),
        }
    }

    /// Closes stdin (a well-behaved program exits) and reaps the program, killing it after 2 s.
    pub async fn close(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(EXIT_GRACE, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Lanes waiting for an answer, by request id; `None` once the connection has ended.
type Pending = Mutex<Option<HashMap<u64, oneshot::Sender<Answer>>>>;

/// A wire-protocol connection shared by many lanes: requests are pipelined, and answers are
/// matched to them by id in whatever order they come.
pub struct WireConn {
    frames: mpsc::UnboundedSender<Vec<u8>>,
    pending: Arc<Pending>,
    next_id: AtomicU64,
}

impl WireConn {
    /// Connects to `addr` (`unix:/path` or `tcp:HOST:PORT`) and completes the handshake.
    ///
    /// # Errors
    /// Connection failures and a refused handshake.
    pub async fn connect(addr: &str, node: &str) -> Result<Arc<WireConn>> {
        let (read, mut write): (
            Box<dyn AsyncRead + Send + Unpin>,
            Box<dyn AsyncWrite + Send + Unpin>,
        ) = match addr.parse()? {
            ListenAddr::Unix(path) => {
                let (r, w) = tokio::net::UnixStream::connect(&path)
                    .await
                    .with_context(|| format!("connecting to {addr}"))?
                    .into_split();
                (Box::new(r), Box::new(w))
            }
            ListenAddr::Tcp(hostport) => {
                let stream = tokio::net::TcpStream::connect(&hostport)
                    .await
                    .with_context(|| format!("connecting to {addr}"))?;
                stream.set_nodelay(true)?;
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
        };
        let mut frames = FramedRead::new(
            read,
            LengthDelimitedCodec::builder()
                .max_frame_length(wire::MAX_FRAME)
                .new_codec(),
        );
        let hello = ClientMsg::Hello(Hello {
            version: wire::VERSION,
            node: node.to_owned(),
            pid: std::process::id(),
        });
        write.write_all(&wire::encode(&hello)?).await?;
        let body = frames
            .next()
            .await
            .context("the broker closed during the handshake")??;
        match wire::decode::<ServerMsg>(&body)? {
            ServerMsg::Welcome(_) => {}
            ServerMsg::Refused(r) => bail!("{addr} refused the handshake: {}", r.reason),
            ServerMsg::Response(_) => bail!("{addr} answered the handshake with a response"),
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let pending: Arc<Pending> = Arc::new(Mutex::new(Some(HashMap::new())));
        tokio::spawn(write_frames(write, rx));
        tokio::spawn(read_answers(frames, pending.clone()));
        Ok(Arc::new(WireConn {
            frames: tx,
            pending,
            next_id: AtomicU64::new(1),
        }))
    }

    async fn ask(&self, command: Command) -> io::Result<Answer> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = wire::encode(&ClientMsg::Request(Request {
            id,
            deadline_ms: WIRE_DEADLINE_MS,
            command,
        }))?;
        let (tx, rx) = oneshot::channel();
        let broken = || {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the broker closed the connection",
            )
        };
        self.pending
            .lock()
            .expect("pending")
            .as_mut()
            .ok_or_else(broken)?
            .insert(id, tx);
        self.frames.send(frame).map_err(|_| broken())?;
        rx.await.map_err(|_| broken())
    }
}

/// Writes queued frames, as many per system call as are waiting.
async fn write_frames(
    mut write: Box<dyn AsyncWrite + Send + Unpin>,
    mut frames: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let mut batch = Vec::with_capacity(64 * 1024);
    while let Some(frame) = frames.recv().await {
        batch.clear();
        batch.extend_from_slice(&frame);
        while batch.len() < 64 * 1024 {
            match frames.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if write.write_all(&batch).await.is_err() {
            return;
        }
    }
}

/// Hands every response to the lane waiting for its id. When the connection ends, the waiting
/// lanes see it closed (their senders are dropped).
async fn read_answers(
    mut frames: FramedRead<Box<dyn AsyncRead + Send + Unpin>, LengthDelimitedCodec>,
    pending: Arc<Pending>,
) {
    while let Some(Ok(body)) = frames.next().await {
        let Ok(ServerMsg::Response(r)) = wire::decode::<ServerMsg>(&body) else {
            continue;
        };
        let waiter = pending
            .lock()
            .expect("pending")
            .as_mut()
            .and_then(|p| p.remove(&r.id));
        if let Some(waiter) = waiter {
            let _ = waiter.send(Answer {
                ok: r.ok,
                reason: Some(r.reason),
            });
        }
    }
    pending.lock().expect("pending").take();
}

/// Longest response head an HTTP lane reads (bytes): the front's heads are a few hundred.
const MAX_HTTP_HEAD: usize = 8 * 1024;

/// One kept-alive HTTP/1.1 connection to the broker's HTTP check front, as a MongooseIM or
/// Prosody connection pool holds: `POST /check_password` and `POST /user_exists` with a form
/// body (no token in the URL), one request in flight.
pub struct HttpLane {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
    /// The `Host` and `Authorization` header lines, the same for every request.
    fixed: String,
}

impl HttpLane {
    /// Connects to the front at `addr` (`HOST:PORT`); callers authenticate with `secret`.
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn connect(addr: &str, secret: &str) -> Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the HTTP front {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(HttpLane {
            stream: tokio::io::BufReader::new(stream),
            fixed: format!("Host: {addr}\r\nAuthorization: Bearer {secret}\r\n"),
        })
    }

    async fn ask(&mut self, path: &str, fields: &[(&str, &str)]) -> io::Result<Answer> {
        let body = fields
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
                )
            })
            .collect::<Vec<_>>()
            .join("&");
        let request = format!(
            "POST {path} HTTP/1.1\r\n{}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            self.fixed,
            body.len()
        );
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let (status, reason, length) = self.read_head().await?;
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).await?;
        match (status, body.as_slice()) {
            (200, b"true") => Ok(Answer { ok: true, reason }),
            (200, b"false") => Ok(Answer { ok: false, reason }),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("HTTP front answered {status} with {length} bytes"),
            )),
        }
    }

    /// Reads a response head: its status, `X-Extauth-Reason` and `Content-Length`.
    async fn read_head(&mut self) -> io::Result<(u16, Option<Reason>, usize)> {
        use tokio::io::AsyncBufReadExt;
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let (mut status, mut reason, mut length, mut read) = (None, None, 0usize, 0usize);
        loop {
            let mut line = String::new();
            let n = self.stream.read_line(&mut line).await?;
            read += n;
            if n == 0 || read > MAX_HTTP_HEAD {
                return Err(bad("the HTTP front closed or sent an oversized head"));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if status.is_none() {
                status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok());
                continue;
            }
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.parse().map_err(|_| bad("bad length"))?,
                    "x-extauth-reason" => reason = Reason::from_name(value),
                    _ => {}
                }
            }
        }
        if length > MAX_HTTP_HEAD {
            return Err(bad("oversized body"));
        }
        Ok((status.ok_or_else(|| bad("no status line"))?, reason, length))
    }
}

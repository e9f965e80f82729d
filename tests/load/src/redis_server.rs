//! A throwaway `redis-server` for chaos runs: on a free 127.0.0.1 port, without persistence,
//! working in the run's temporary directory. Killed with SIGKILL and started again on the same
//! port, it comes back empty, as a Redis without persistence does after a crash.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long redis-server may take to answer PING once started.
const READY_LIMIT: Duration = Duration::from_secs(10);
/// Pause between two readiness probes.
const READY_POLL: Duration = Duration::from_millis(20);

/// A redis-server child process (killed on drop) and how to start it again.
pub struct RedisServer {
    program: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `program` (a path, or a name looked up on PATH) on a free port of 127.0.0.1 with
    /// `dir` as its working directory (its output goes to `dir/redis.log`), and waits until it
    /// answers PING.
    ///
    /// # Errors
    /// No free port, a program that cannot be run, or a server that does not answer within 10 s
    /// (the message quotes its log).
    pub async fn start(program: &Path, dir: &Path) -> Result<RedisServer> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port for redis-server")?
            .port();
        let mut server = RedisServer {
            program: program.to_owned(),
            dir: dir.to_owned(),
            port,
            child: None,
        };
        server.launch().await?;
        Ok(server)
    }

    /// The URL brokers use: `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL and reaps it: clients see their connections drop and new
    /// ones refused. Nothing happens when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (killing it first if it runs); it starts empty.
    ///
    /// # Errors
    /// As [`RedisServer::start`].
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch().await
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    async fn launch(&mut self) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        // No RDB snapshots, no append-only file: a restart loses every key, the worst case.
        let child = Command::new(&self.program)
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (install redis-server, or name it with --redis-server PATH)",
                    self.program.display()
                )
            })?;
        self.child = Some(child);
        self.wait_ready().await
    }

    /// Polls with PING until `+PONG`, the process exits, or [`READY_LIMIT`] passes.
    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        while !self.pong().await {
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait()?.is_some(),
                None => true,
            };
            if exited || started.elapsed() > READY_LIMIT {
                self.kill();
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                bail!(
                    "redis-server did not answer on 127.0.0.1:{}; its log:\n{log}",
                    self.port
                );
            }
            tokio::time::sleep(READY_POLL).await;
        }
        Ok(())
    }

    /// Whether the server answers PING (RESP inline command) with `+PONG`.
    async fn pong(&self) -> bool {
        let ask = async {
            let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await?;
            stream.write_all(b"PING\r\n").await?;
            let mut answer = [0u8; 7];
            stream.read_exact(&mut answer).await?;
            std::io::Result::Ok(&answer == b"+PONG\r\n")
        };
        tokio::time::timeout(Duration::from_secs(1), ask)
            .await
            .is_ok_and(|r| r.unwrap_or(false))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a Redis server has done since it started (`INFO stats`): commands processed, and
/// reads from client sockets, each a batch of commands one client sent together (a round
/// trip, or a pipeline of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RedisWork {
    /// `total_commands_processed`.
    pub commands: u64,
    /// `total_reads_processed` (Redis 6.0 and later).
    pub reads: u64,
}

impl RedisWork {
    /// The work done since `before`.
    pub fn since(self, before: RedisWork) -> RedisWork {
        RedisWork {
            commands: self.commands.saturating_sub(before.commands),
            reads: self.reads.saturating_sub(before.reads),
        }
    }
}

/// [`RedisWork`] of the server at the `redis://HOST:PORT[/DB]` URL, over a plain connection;
/// `None` for another URL form (TLS, a password, Sentinel or Cluster lists) or when it does not
/// answer within a second.
pub async fn work_done(url: &str) -> Option<RedisWork> {
    let host_port = url.strip_prefix("redis://")?.split('/').next()?;
    if host_port.contains('@') || host_port.contains(',') {
        return None;
    }
    let ask = async {
        let mut stream = TcpStream::connect(host_port).await?;
        stream.write_all(b"INFO stats\r\n").await?;
        // A bulk string of about 1 KiB: read until both fields' lines are complete.
        let mut answer = String::new();
        let mut chunk = [0u8; 4096];
        loop {
            let field = |name: &str| -> Option<u64> {
                let (_, rest) = answer.split_once(name)?;
                rest.split_once("\r\n")?.0.trim().parse().ok()
            };
            if let (Some(commands), Some(reads)) = (
                field("total_commands_processed:"),
                field("total_reads_processed:"),
            ) {
                return std::io::Result::Ok(Some(RedisWork { commands, reads }));
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 || answer.len() > 64 * 1024 {
                return Ok(None);
            }
            answer.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    };
    tokio::time::timeout(Duration::from_secs(1), ask)
        .await
        .ok()?
        .ok()?
}

//! The shim's one persistent broker connection: opened lazily, re-opened with a short backoff
//! when it breaks, and never trusted past a request's deadline.

use std::io;
use std::thread::sleep;
use std::time::{Duration, Instant};

use extauth_protocol::extauth::Command;
use extauth_protocol::wire::{self, ClientMsg, Hello, Request, ServerMsg};

use crate::options::Options;
use crate::stream::Stream;

/// First pause between connection attempts; doubled after each failed round, up to the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Least time one broker of the list gets to connect and answer the handshake.
const MIN_SHARE: Duration = Duration::from_millis(200);

/// Relays requests to the first broker that answers.
pub(crate) struct Relay<'a> {
    options: &'a Options,
    conn: Option<Stream>,
    next_id: u64,
}

impl<'a> Relay<'a> {
    /// A relay with no connection yet (the first request opens it).
    pub(crate) fn new(options: &'a Options) -> Self {
        Relay {
            options,
            conn: None,
            next_id: 1,
        }
    }

    /// Asks a broker about `command` and returns its verdict, or `false` when no answer arrived
    /// before `deadline`. A connection that timed out is dropped, so a late answer can never be
    /// taken for the next request's.
    pub(crate) fn call(&mut self, command: Command, deadline: Instant) -> bool {
        let id = self.next_id;
        self.next_id += 1;
        let (user, server) = command.jid_parts();
        let what = format!("{} {user}@{server}", command.name());
        let mut request = ClientMsg::Request(Request {
            id,
            deadline_ms: 0,
            command,
        });
        // A kept connection may have been closed by a broker restart since the last request;
        // one fresh attempt is safe because every command is idempotent at the broker.
        for _attempt in 0..2 {
            let reused = self.conn.is_some();
            let Some(mut conn) = self.conn.take().or_else(|| self.connect(deadline)) else {
                eprintln!("extauth-shim: no broker reachable; refusing {what}");
                return false;
            };
            if let ClientMsg::Request(r) = &mut request {
                r.deadline_ms = remaining_ms(deadline);
            }
            match exchange(&mut conn, &request, id, deadline) {
                Ok(ok) => {
                    self.conn = Some(conn);
                    return ok;
                }
                Err(e) if reused && !is_timeout(&e) && Instant::now() < deadline => continue,
                Err(e) => {
                    eprintln!("extauth-shim: broker did not answer {what}: {e}; refusing");
                    return false;
                }
            }
        }
        false
    }

    /// Tries every broker in order, then backs off and tries again, until one completes the
    /// handshake or the connect budget (bounded by `deadline`) is spent.
    fn connect(&self, deadline: Instant) -> Option<Stream> {
        let give_up = deadline.min(Instant::now() + self.options.connect_timeout);
        // Each broker gets an equal share of the budget: a socket that accepts while its
        // broker is down (systemd keeps listening during a restart) must not use up the time
        // the next broker in the list needs.
        let share = self.options.connect_timeout / self.options.brokers.len().max(1) as u32;
        let mut backoff = FIRST_BACKOFF;
        loop {
            for addr in &self.options.brokers {
                let attempt_ends = give_up.min(Instant::now() + share.max(MIN_SHARE));
                match Stream::open(addr, attempt_ends, self.options.tls.as_ref())
                    .and_then(|s| self.handshake(s, attempt_ends))
                {
                    Ok(stream) => return Some(stream),
                    Err(e) => eprintln!("extauth-shim: broker {addr:?}: {e}"),
                }
            }
            let now = Instant::now();
            if now + backoff >= give_up {
                return None;
            }
            sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn handshake(&self, mut stream: Stream, deadline: Instant) -> io::Result<Stream> {
        let hello = ClientMsg::Hello(Hello {
            version: wire::VERSION,
            node: self.options.node.clone(),
            pid: std::process::id(),
        });
        stream.set_deadline(deadline)?;
        wire::write_msg(&mut stream, &hello)?;
        match wire::read_msg(&mut stream, wire::MAX_FRAME)? {
            ServerMsg::Welcome(_) => Ok(stream),
            ServerMsg::Refused(r) => Err(io::Error::other(format!(
                "refused handshake (broker protocol {}, ours {}): {}",
                r.version,
                wire::VERSION,
                r.reason
            ))),
            ServerMsg::Response(_) => Err(io::Error::other("response before handshake")),
        }
    }
}

/// Sends one request and waits for the response with its id (skipping any other).
fn exchange(
    conn: &mut Stream,
    request: &ClientMsg,
    id: u64,
    deadline: Instant,
) -> io::Result<bool> {
    conn.set_deadline(deadline)?;
    wire::write_msg(conn, request)?;
    loop {
        conn.set_deadline(deadline)?;
        match wire::read_msg(conn, wire::MAX_FRAME)? {
            ServerMsg::Response(r) if r.id == id => return Ok(r.ok),
            ServerMsg::Response(_) => continue,
            _ => return Err(io::Error::other("unexpected message from broker")),
        }
    }
}

fn remaining_ms(deadline: Instant) -> u32 {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .as_millis();
    u32::try_from(left).unwrap_or(u32::MAX)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

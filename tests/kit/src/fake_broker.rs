//! A fake broker that speaks the wire protocol and answers as a test scripts it: late, or with a
//! stray response (another request's id) before the real one. The real broker always answers a
//! shim within the deadline the shim sends, so only a fake can show what the shim does when an
//! answer comes after its `--timeout`, or out of turn.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use extauth_protocol::wire::{
    self, ClientMsg, Reason, Response, ServerMsg, Source, Welcome, VERSION,
};
use tempfile::TempDir;

use super::services::wait_until;

/// How the fake answers one request.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// The verdict sent with the request's id.
    pub ok: bool,
    /// Time between reading the request and answering it.
    pub delay: Duration,
    /// A response sent first with the previous id (what a late answer to the previous request
    /// looks like) carrying this verdict.
    pub stray: Option<bool>,
}

impl Answer {
    /// `ok`, after `delay`.
    pub fn late(ok: bool, delay: Duration) -> Answer {
        Answer {
            ok,
            delay,
            stray: None,
        }
    }

    /// `ok` at once, preceded by a stray response with the previous id and the opposite verdict.
    pub fn after_stray(ok: bool) -> Answer {
        Answer {
            ok,
            delay: Duration::ZERO,
            stray: Some(!ok),
        }
    }
}

/// One request the fake read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Which connection it came on, counted from 0 in accept order.
    pub connection: usize,
    /// Its wire id.
    pub id: u64,
    /// The user it is about (the script's key).
    pub user: String,
    /// Whether the fake finished trying to send its answer (sent, or the write failed because
    /// the shim had closed the connection).
    pub answered: bool,
}

/// What [`FakeBroker`]'s threads share.
struct State {
    script: Box<dyn Fn(&str) -> Answer + Send + Sync>,
    seen: Mutex<Vec<Seen>>,
    connections: Mutex<usize>,
    stop: AtomicBool,
}

/// A fake broker on a Unix socket in its own temp dir; one thread per connection, each
/// answering its requests in order as `script(user)` says. Stops accepting on drop.
pub struct FakeBroker {
    socket: PathBuf,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
    _dir: TempDir,
}

impl FakeBroker {
    /// Listens at once; `script` maps a request's user to its [`Answer`].
    pub fn start(script: impl Fn(&str) -> Answer + Send + Sync + 'static) -> FakeBroker {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let state = Arc::new(State {
            script: Box::new(script),
            seen: Mutex::new(Vec::new()),
            connections: Mutex::new(0),
            stop: AtomicBool::new(false),
        });
        let shared = state.clone();
        let acceptor = std::thread::spawn(move || accept(&listener, &shared));
        FakeBroker {
            socket,
            state,
            acceptor: Some(acceptor),
            _dir: dir,
        }
    }

    /// The `--broker` argument for shims.
    pub fn addr(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// Every request read so far, in the order read.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        *self.state.connections.lock().unwrap()
    }

    /// Waits (at most `limit`) until every request read so far has been answered.
    pub fn wait_all_answered(&self, limit: Duration) {
        wait_until(limit, "the fake broker's answers", || {
            self.seen().iter().all(|s| s.answered)
        });
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so the thread sees the flag.
        let _ = UnixStream::connect(&self.socket);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept(listener: &UnixListener, state: &Arc<State>) {
    for stream in listener.incoming() {
        if state.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let connection = {
            let mut n = state.connections.lock().unwrap();
            *n += 1;
            *n - 1
        };
        let state = state.clone();
        std::thread::spawn(move || serve(stream, connection, &state));
    }
}

/// Handshake, then answers requests in order until the peer goes away.
fn serve(mut stream: UnixStream, connection: usize, state: &State) {
    match wire::read_msg(&mut stream, wire::MAX_FRAME) {
        Ok(ClientMsg::Hello(_)) => {}
        _ => return,
    }
    let welcome = ServerMsg::Welcome(Welcome {
        version: VERSION,
        server: "fake-broker".into(),
    });
    if wire::write_msg(&mut stream, &welcome).is_err() {
        return;
    }
    while let Ok(ClientMsg::Request(request)) = wire::read_msg(&mut stream, wire::MAX_FRAME) {
        let user = request.command.jid_parts().0.to_owned();
        let answer = (state.script)(&user);
        let index = {
            let mut seen = state.seen.lock().unwrap();
            seen.push(Seen {
                connection,
                id: request.id,
                user,
                answered: false,
            });
            seen.len() - 1
        };
        std::thread::sleep(answer.delay);
        let stray = answer
            .stray
            .map(|ok| response(request.id.wrapping_sub(1), ok));
        let sent = stray
            .iter()
            .chain([&response(request.id, answer.ok)])
            .all(|msg| wire::write_msg(&mut stream, msg).is_ok());
        state.seen.lock().unwrap()[index].answered = true;
        if !sent {
            return;
        }
    }
}

fn response(id: u64, ok: bool) -> ServerMsg {
    ServerMsg::Response(Response {
        id,
        ok,
        reason: if ok {
            Reason::Accepted
        } else {
            Reason::Inactive
        },
        source: Source::Provider,
    })
}

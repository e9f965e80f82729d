//! Hostile peers that never become shims, played against a real broker over real sockets: silent
//! connections, peers that say `Hello` (and perhaps ask one question) and then nothing, TLS
//! clients without a certificate, reconnect loops, and Unix socket peers of a refused uid.
//!
//! Every kind keeps its connections as long as the broker lets it and comes back when the broker
//! closes one. The pauses between attempts keep the attack about what hostile peers hold, not
//! about how fast a 2-core machine can spin (the broker, the shims and this process share it).

use std::collections::VecDeque;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use extauth_protocol::extauth;
use extauth_protocol::wire::{self, ClientMsg, Hello, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::runtime::Runtime;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

/// Pause before a silent peer comes back after the broker closed it.
const SILENT_PAUSE: Duration = Duration::from_millis(200);
/// Pause before a peer that says `Hello` (and perhaps asks one question) comes back after the
/// broker closed it: each return may take a slot from someone.
const HELLO_PAUSE: Duration = Duration::from_millis(500);
/// Pause between TLS attempts (each costs the broker a key exchange).
const TLS_PAUSE: Duration = Duration::from_millis(200);
/// Pause between the connect-and-close attempts of a reconnect loop.
const LOOP_PAUSE: Duration = Duration::from_millis(2);

/// A running attack; [`Attack::stop`] (or drop) ends it.
pub struct Attack {
    rt: Runtime,
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
    counts: Arc<Counts>,
    peers: u64,
}

#[derive(Default)]
struct Counts {
    /// Hostile peers that connected at least once.
    arrived: AtomicU64,
    /// Hostile connections open right now (as this side sees them).
    open: AtomicI64,
    /// Connections made in all.
    connects: AtomicU64,
}

impl Counts {
    /// Counts a connection made, by a peer that arrives with it when `first`.
    fn connected(&self, first: bool) {
        self.connects.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        if first {
            self.arrived.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Attack {
    /// An attack with no peer yet, on a runtime of its own.
    pub fn new() -> Attack {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Attack {
            rt,
            stop: CancellationToken::new(),
            threads: Vec::new(),
            counts: Arc::default(),
            peers: 0,
        }
    }

    /// `count` peers from `source` that connect to `target` and send nothing.
    pub fn silent(&mut self, target: SocketAddr, source: IpAddr, count: usize) {
        let peer = Peer::new(source, target, SILENT_PAUSE);
        self.each(count, peer, |stream| async move {
            Some(Box::new(stream) as Held)
        });
    }

    /// `count` peers from `source` that complete the handshake on `target` (plain TCP) and then
    /// never send a request.
    pub fn idle_after_hello(&mut self, target: SocketAddr, source: IpAddr, count: usize) {
        let peer = Peer::new(source, target, HELLO_PAUSE);
        self.each(count, peer, |mut stream| async move {
            stream.write_all(&hello()).await.ok()?;
            Some(Box::new(stream) as Held)
        });
    }

    /// `count` peers from `source` that complete the handshake on `target` (plain TCP), ask one
    /// cheap question (`isuser`) and then sit idle: they hold a slot until they are evicted.
    pub fn idle_after_request(&mut self, target: SocketAddr, source: IpAddr, count: usize) {
        let peer = Peer::new(source, target, HELLO_PAUSE);
        self.each(count, peer, |mut stream| async move {
            stream.write_all(&hello()).await.ok()?;
            stream.write_all(&isuser()).await.ok()?;
            Some(Box::new(stream) as Held)
        });
    }

    /// `count` TLS clients from `source` that trust `ca` but present no client certificate.
    pub fn tls_without_certificate(
        &mut self,
        target: SocketAddr,
        source: IpAddr,
        ca: &Path,
        count: usize,
    ) {
        let connector = TlsConnector::from(extauth_protocol::tls::client_config(ca, None).unwrap());
        let peer = Peer::new(source, target, TLS_PAUSE);
        self.each(count, peer, move |stream| {
            let connector = connector.clone();
            async move {
                let name = ServerName::try_from("localhost").unwrap();
                let tls = connector.connect(name, stream).await.ok()?;
                Some(Box::new(tls) as Held)
            }
        });
    }

    /// One peer from `source` that connects to `target` and closes at once, over and over.
    pub fn reconnect_loop(&mut self, target: SocketAddr, source: IpAddr) {
        let peer = Peer::new(source, target, LOOP_PAUSE);
        self.each(1, peer, |_closed| async { None });
    }

    /// `count` Unix socket peers running as `uid`/`gid` that send a `Hello` on `path` and keep
    /// their end open, reconnecting in a loop (the oldest is dropped beyond `count`). Needs root.
    pub fn unix_hello_as(&mut self, path: &Path, uid: u32, gid: u32, count: usize) {
        let (path, stop, counts) = (path.to_owned(), self.stop.clone(), self.counts.clone());
        self.peers += count as u64;
        self.threads.push(std::thread::spawn(move || {
            become_in_this_thread(uid, gid);
            unix_loop(&path, &stop, &counts, count);
        }));
    }

    /// Hostile peers that connected at least once.
    pub fn arrived(&self) -> u64 {
        self.counts.arrived.load(Ordering::Relaxed)
    }

    /// Hostile peers started.
    pub fn peers(&self) -> u64 {
        self.peers
    }

    /// Hostile connections open right now, as the attackers see them.
    pub fn open(&self) -> i64 {
        self.counts.open.load(Ordering::Relaxed)
    }

    /// Connections made so far.
    pub fn connects(&self) -> u64 {
        self.counts.connects.load(Ordering::Relaxed)
    }

    /// Ends every hostile peer and closes their connections.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }

    /// Runs `count` copies of `peer`, each: connect, `speak`, hold what it returns until the
    /// broker closes it, pause, again.
    fn each<F, Fut>(&mut self, count: usize, peer: Peer, speak: F)
    where
        F: Fn(TcpStream) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Option<Held>> + Send,
    {
        self.peers += count as u64;
        for _ in 0..count {
            let (speak, stop, counts) = (speak.clone(), self.stop.clone(), self.counts.clone());
            self.rt.spawn(async move {
                let mut first = true;
                while !stop.is_cancelled() {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = peer.visit(&speak, &counts, &mut first) => {}
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(peer.pause) => {}
                    }
                }
            });
        }
    }
}

/// What a hostile peer keeps open: a TCP or TLS stream.
type Held = Box<dyn AsyncRead + Unpin + Send>;

/// Where one kind of hostile peer connects from and to, and how long it pauses between visits.
#[derive(Clone, Copy)]
struct Peer {
    source: IpAddr,
    target: SocketAddr,
    pause: Duration,
}

impl Peer {
    fn new(source: IpAddr, target: SocketAddr, pause: Duration) -> Peer {
        Peer {
            source,
            target,
            pause,
        }
    }

    /// Connects (counted as soon as TCP is up, whatever the broker does next), speaks, and
    /// holds the connection until the broker closes it.
    async fn visit<F, Fut>(&self, speak: &F, counts: &Counts, first: &mut bool)
    where
        F: Fn(TcpStream) -> Fut,
        Fut: std::future::Future<Output = Option<Held>>,
    {
        let Ok(stream) = connect(self.source, self.target).await else {
            return;
        };
        counts.connected(std::mem::take(first));
        if let Some(mut held) = speak(stream).await {
            let mut buf = [0u8; 512];
            while matches!(held.read(&mut buf).await, Ok(n) if n > 0) {}
        }
        counts.closed();
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A TCP connection from `source` (any loopback address works as a source on Linux).
async fn connect(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(target).await
}

/// A Unix socket connection that fails instead of waiting when the listen queue is full (a
/// broker that stopped accepting must not hang the attacker).
fn connect_unix(path: &Path) -> nix::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

/// A valid `Hello` frame of the current protocol version.
fn hello() -> Vec<u8> {
    wire::encode(&ClientMsg::Hello(Hello {
        version: wire::VERSION,
        node: "hostile".into(),
        pid: 0,
    }))
    .unwrap()
}

/// An `isuser` request frame: answered from the broker's own state, no provider call.
fn isuser() -> Vec<u8> {
    wire::encode(&ClientMsg::Request(Request {
        id: 1,
        deadline_ms: 1000,
        command: extauth::parse(b"isuser:mallory:example.com").unwrap(),
    }))
    .unwrap()
}

/// Takes `uid`/`gid` as the effective ids of the calling thread only. The libc wrappers change
/// every thread of the process (the test harness's too), the raw system calls only this one;
/// SO_PEERCRED reports the credentials of the thread that connects.
fn become_in_this_thread(uid: u32, gid: u32) {
    let unchanged = u32::MAX;
    // SAFETY: plain system calls on integers; they only change this thread's credentials.
    let (g, u) = unsafe {
        (
            nix::libc::syscall(nix::libc::SYS_setresgid, unchanged, gid, unchanged),
            nix::libc::syscall(nix::libc::SYS_setresuid, unchanged, uid, unchanged),
        )
    };
    assert_eq!((g, u), (0, 0), "setresgid/setresuid need root");
}

fn unix_loop(path: &Path, stop: &CancellationToken, counts: &Counts, count: usize) {
    let mut held = VecDeque::with_capacity(count + 1);
    let mut made = 0;
    while !stop.is_cancelled() {
        if let Ok(mut stream) = connect_unix(path) {
            counts.connected(made < count);
            made += 1;
            let _ = stream.write_all(&hello());
            held.push_back(stream);
        }
        if held.len() > count {
            held.pop_front();
            counts.closed();
        }
        std::thread::sleep(LOOP_PAUSE);
    }
    for _ in held.drain(..) {
        counts.closed();
    }
}

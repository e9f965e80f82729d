//! The HTTP endpoints (`/metrics` and the admin `POST /revoke`) against an attacker: floods of
//! idle, slow-header and oversized-body connections must not cost a shim its login, and the admin
//! endpoint must refuse strangers before it reads a byte of their body. Real broker, shim and
//! provider processes on real sockets.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use extauth_testkit::faults::Metrics;
use extauth_testkit::services::{
    broker_bin, free_port, printed, shim_bin, token, wait_until, Broker, BrokerSpec, Provider,
    Shim, CLIENT_ID, CLIENT_SECRET,
};
use serde_json::json;

const ADMIN_SECRET: &str = "admin-secret-3b9e41";

/// The file descriptors the flooded broker may hold (soft and hard RLIMIT_NOFILE): far fewer
/// than the flood's connections, comfortably more than the endpoints' default caps (64 + 16)
/// plus the broker's own files, the shims and the provider connections.
const BROKER_NOFILE: u64 = 256;

/// The broker's default header timeout (s) (`--endpoint-header-timeout`); the tests use the
/// defaults so they run unchanged against a broker without these settings.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A broker with both endpoints on free loopback ports.
struct Endpoints {
    broker: Broker,
    metrics: u16,
    admin: u16,
    _dir: tempfile::TempDir,
}

impl Endpoints {
    fn start(provider: &Provider, nofile: Option<u64>, extra: &[&str]) -> Endpoints {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("admin.secret");
        std::fs::write(&secret, format!("{ADMIN_SECRET}\n")).unwrap();
        let (metrics, admin) = (free_port(), free_port());
        let mut spec = BrokerSpec::new(provider);
        spec.extra = vec![
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics}"),
            "--admin-listen".into(),
            format!("127.0.0.1:{admin}"),
            "--admin-secret-file".into(),
            secret.display().to_string(),
        ];
        spec.extra.extend(extra.iter().map(|s| s.to_string()));
        spec.nofile = nofile;
        let broker = Broker::start(&spec);
        wait_until(Duration::from_secs(10), "the HTTP endpoints", || {
            [metrics, admin]
                .iter()
                .all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
        });
        Endpoints {
            broker,
            metrics,
            admin,
            _dir: dir,
        }
    }
}

/// Sends `request` (head, and body if any) and returns everything the server wrote until it
/// closed the connection, or what came within `wait` (empty: no answer at all).
fn exchange(port: u16, request: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(request).unwrap();
    read_until_closed(&mut stream, wait)
}

fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> String {
    let deadline = Instant::now() + wait;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status code of an HTTP/1.1 answer, 0 for none.
fn status(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// A `POST /revoke` head with `headers` (each ending in CRLF) and an optional bearer secret.
fn revoke_head(bearer: Option<&str>, headers: &str) -> String {
    let auth = bearer.map_or(String::new(), |b| format!("Authorization: Bearer {b}\r\n"));
    format!(
        "POST /revoke HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\n{headers}\r\n"
    )
}

#[test]
fn the_admin_endpoint_checks_the_bearer_before_reading_any_body() {
    let provider = Provider::start();
    let endpoints = Endpoints::start(&provider, None, &[]);
    let port = endpoints.admin;
    let wait = Duration::from_secs(5);
    let gib = "Content-Length: 1073741824\r\n";

    // A 1 GiB body announced, not a byte of it sent: a stranger is answered at once.
    for bearer in [None, Some("admin-secret-3b9e4"), Some("Basic x")] {
        let answer = exchange(port, revoke_head(bearer, gib).as_bytes(), wait);
        assert_eq!(status(&answer), 401, "bearer {bearer:?}: {answer:?}");
        assert!(answer.contains("www-authenticate: Bearer"), "{answer}");
    }
    // A client that waits for 100 Continue is refused without being asked for its body.
    let answer = exchange(
        port,
        revoke_head(None, &format!("{gib}Expect: 100-continue\r\n")).as_bytes(),
        wait,
    );
    assert_eq!(status(&answer), 401, "{answer:?}");
    assert!(!answer.contains("100 Continue"), "{answer}");

    // The right bearer and an announced body over the limit: 413 before any body byte.
    let answer = exchange(port, revoke_head(Some(ADMIN_SECRET), gib).as_bytes(), wait);
    assert_eq!(status(&answer), 413, "{answer:?}");
    // A chunked body (no length announced) is cut off at the limit (20 KiB by default): 413 too.
    let mut chunked = revoke_head(Some(ADMIN_SECRET), "Transfer-Encoding: chunked\r\n");
    for _ in 0..8 {
        chunked.push_str(&format!("1000\r\n{}\r\n", "a".repeat(0x1000)));
    }
    let answer = exchange(port, chunked.as_bytes(), wait);
    assert_eq!(status(&answer), 413, "{answer:?}");

    // A revoke body of the usual size still works.
    let body = r#"{"domain": "example.com", "user": "alice"}"#;
    let request = format!(
        "{}{body}",
        revoke_head(
            Some(ADMIN_SECRET),
            &format!("Content-Length: {}\r\nConnection: close\r\n", body.len())
        )
    );
    let answer = exchange(port, request.as_bytes(), wait);
    assert_eq!(status(&answer), 200, "{answer:?}");
    assert!(!endpoints.broker.log().contains(ADMIN_SECRET));
}

/// Reads one `GET /healthz` answer ("ok\n") off a kept-alive connection.
fn read_healthz(stream: &mut TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"\r\n\r\nok\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn stalled_bodies_idle_keep_alives_and_slow_later_heads_are_closed() {
    let provider = Provider::start();
    let endpoints = Endpoints::start(
        &provider,
        None,
        &[
            "--endpoint-header-timeout",
            "1",
            "--endpoint-idle-timeout",
            "5",
            "--endpoint-request-timeout",
            "1",
        ],
    );
    let wait = Duration::from_secs(15);

    // An authenticated revoke whose body stalls: 503 at the request timeout, and closed.
    let stalled = revoke_head(Some(ADMIN_SECRET), "Content-Length: 100\r\n") + "{\"domain\"";
    let answer = exchange(endpoints.admin, stalled.as_bytes(), wait);
    assert_eq!(status(&answer), 503, "{answer:?}");

    let healthz = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
    // Kept alive, then a next head started after a pause shorter than the idle timeout and
    // never finished: closed at the header timeout.
    let mut slow = TcpStream::connect(("127.0.0.1", endpoints.metrics)).unwrap();
    slow.write_all(healthz).unwrap();
    assert_eq!(status(&read_healthz(&mut slow)), 200);
    std::thread::sleep(Duration::from_secs(1));
    slow.write_all(b"GET /hea").unwrap();
    assert_eq!(read_until_closed(&mut slow, wait), "", "closed, unanswered");
    // Kept alive, then silent: closed at the idle timeout.
    let mut idle = TcpStream::connect(("127.0.0.1", endpoints.metrics)).unwrap();
    idle.write_all(healthz).unwrap();
    assert_eq!(status(&read_healthz(&mut idle)), 200);
    assert_eq!(read_until_closed(&mut idle, wait), "", "closed, unanswered");

    let metrics = Metrics::scrape(endpoints.metrics);
    for (endpoint, phase) in [
        ("admin", "request"),
        ("metrics", "header"),
        ("metrics", "idle"),
    ] {
        let series =
            format!("extauth_endpoint_timeouts_total{{endpoint=\"{endpoint}\",phase=\"{phase}\"}}");
        assert_eq!(metrics.sum(&series), 1.0, "{series} in\n{}", metrics.0);
    }
}

#[test]
fn endpoint_caps_that_leave_no_descriptors_for_shims_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("broker.sock");
    let output = std::process::Command::new(broker_bin())
        .args(["--listen", &format!("unix:{}", socket.display())])
        .args(["--introspection-url", "http://127.0.0.1:1/introspect"])
        .args(["--client-id", CLIENT_ID])
        .env("EXTAUTH_CLIENT_SECRET", CLIENT_SECRET)
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-max-connections", "1000"])
        .env("EXTAUTH_LOG_LEVEL", "info")
        .stdin(std::process::Stdio::null())
        .output_with_nofile(BROKER_NOFILE);
    let shown = printed(&output);
    assert!(!output.status.success(), "{shown}");
    assert!(shown.contains("RLIMIT_NOFILE"), "{shown}");
    assert!(shown.contains("--metrics-max-connections"), "{shown}");
}

/// `Command::output` under a given RLIMIT_NOFILE.
trait OutputWithNofile {
    fn output_with_nofile(&mut self, limit: u64) -> std::process::Output;
}

impl OutputWithNofile for std::process::Command {
    fn output_with_nofile(&mut self, limit: u64) -> std::process::Output {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit(2) is async-signal-safe; the closure runs between fork and exec.
        unsafe {
            self.pre_exec(move || {
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_NOFILE,
                    limit,
                    limit,
                )
                .map_err(std::io::Error::from)
            });
        }
        self.output().unwrap()
    }
}

/// What one hostile connection does once connected.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Attack {
    /// Nothing: holds the connection.
    Idle,
    /// A request head one byte every 500 ms, never finished (slow-loris).
    SlowHeaders(&'static str),
    /// `POST /revoke` without a bearer, a 1 GiB body announced and streamed as fast as it goes.
    OversizedBody,
}

/// One hostile connection slot: reconnects (after a pause) whenever the broker closes it.
struct Slot {
    attack: Attack,
    addr: SocketAddr,
    stream: Option<TcpStream>,
    /// When to reconnect, or to send the next slow byte.
    next: Instant,
    /// The first bytes the broker answered on this connection.
    answer: Vec<u8>,
}

/// What the flood saw.
#[derive(Debug, Default)]
struct FloodReport {
    /// Connections opened (connect succeeded).
    opened: u64,
    /// Connections the broker closed.
    closed: u64,
    /// Connections still open when the drain time ran out.
    still_open: usize,
    /// How often each status code answered an oversized-body request (0: closed unanswered,
    /// as over the cap).
    oversized_answers: BTreeMap<u16, u64>,
}

/// Pause before a slot reconnects: keeps the flood at a few hundred connections a second,
/// enough to keep both caps full without running the test machine out of ephemeral ports.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
const SLOW_BYTE_EVERY: Duration = Duration::from_millis(500);

impl Slot {
    fn new(attack: Attack, port: u16) -> Slot {
        Slot {
            attack,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            stream: None,
            next: Instant::now(),
            answer: Vec::new(),
        }
    }

    fn connect(&mut self, report: &mut FloodReport) {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)) else {
            self.next = Instant::now() + RECONNECT_PAUSE;
            return;
        };
        report.opened += 1;
        let head = match self.attack {
            Attack::Idle => String::new(),
            Attack::SlowHeaders(path) => {
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            }
            Attack::OversizedBody => revoke_head(None, "Content-Length: 1073741824\r\n"),
        };
        let _ = stream.write_all(head.as_bytes());
        stream.set_nonblocking(true).unwrap();
        self.stream = Some(stream);
        self.answer.clear();
        self.next = Instant::now() + SLOW_BYTE_EVERY;
    }

    /// Reads what the broker sent, feeds the attack; notes a close.
    fn poll(&mut self, report: &mut FloodReport, reconnect: bool) {
        if self.stream.is_none() {
            if reconnect && Instant::now() >= self.next {
                self.connect(report);
            }
            return;
        }
        // A failed write means the broker closed: what it answered first is still to be read.
        let closed = self.read_answer() || self.feed().is_err();
        if closed {
            self.read_answer();
            self.stream = None;
            report.closed += 1;
            if self.attack == Attack::OversizedBody {
                let answered = status(&String::from_utf8_lossy(&self.answer));
                *report.oversized_answers.entry(answered).or_default() += 1;
            }
            self.next = Instant::now() + RECONNECT_PAUSE;
        }
    }

    /// Reads what the broker sent so far; true once it closed the connection.
    fn read_answer(&mut self) -> bool {
        let stream = self.stream.as_mut().expect("connected");
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => {
                    if self.answer.len() < 64 {
                        self.answer.extend_from_slice(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    }

    fn feed(&mut self) -> std::io::Result<()> {
        let stream = self.stream.as_mut().expect("connected");
        match self.attack {
            Attack::Idle => Ok(()),
            Attack::SlowHeaders(_) if Instant::now() >= self.next => {
                self.next = Instant::now() + SLOW_BYTE_EVERY;
                stream.write_all(b"a").or_else(ignore_would_block)
            }
            Attack::SlowHeaders(_) => Ok(()),
            Attack::OversizedBody => {
                let chunk = [b'x'; 16 * 1024];
                stream.write(&chunk).map(drop).or_else(ignore_would_block)
            }
        }
    }
}

fn ignore_would_block(e: std::io::Error) -> std::io::Result<()> {
    match e.kind() {
        ErrorKind::WouldBlock => Ok(()),
        _ => Err(e),
    }
}

/// Hostile connections on a thread of their own, reconnecting until [`Flood::stop`].
struct Flood {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<FloodReport>,
}

impl Flood {
    fn start(mut slots: Vec<Slot>, drain: Duration) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut report = FloodReport::default();
            while !stopping.load(Ordering::Relaxed) {
                for slot in &mut slots {
                    slot.poll(&mut report, true);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // No more reconnects: every connection left must be closed by the broker.
            let deadline = Instant::now() + drain;
            while Instant::now() < deadline && slots.iter().any(|s| s.stream.is_some()) {
                for slot in &mut slots {
                    slot.poll(&mut report, false);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            report.still_open = slots.iter().filter(|s| s.stream.is_some()).count();
            report
        });
        Flood { stop, thread }
    }

    fn stop(self) -> FloodReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The broker's open file descriptors right now.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Logs `n` fresh shims in at once, each with a token the provider has not seen; returns how
/// many were refused.
fn fresh_logins(provider: &Provider, broker: &str, n: usize) -> usize {
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let user_token = token("flood");
            provider.insert(&user_token, json!({"username": "alice"}));
            let broker = broker.to_owned();
            std::thread::spawn(move || {
                let mut shim = Shim::spawn(&broker, 5.0, &[]);
                shim.ask(&format!("auth:alice:example.com:{user_token}"))
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().unwrap_or(false))
        .filter(|accepted| !accepted)
        .count()
}

#[test]
fn a_flood_of_endpoint_connections_costs_no_shim_its_login() {
    let provider = Provider::start();
    // Built before the flood starts, not during it.
    shim_bin();
    let endpoints = Endpoints::start(&provider, Some(BROKER_NOFILE), &[]);
    let pid = endpoints.broker.pid();
    let at_rest = open_fds(pid);

    // 330 hostile connections against a broker allowed 256 descriptors in all.
    let mut slots = Vec::new();
    slots.extend((0..150).map(|_| Slot::new(Attack::Idle, endpoints.metrics)));
    slots.extend((0..60).map(|_| Slot::new(Attack::SlowHeaders("/metrics"), endpoints.metrics)));
    slots.extend((0..60).map(|_| Slot::new(Attack::Idle, endpoints.admin)));
    slots.extend((0..30).map(|_| Slot::new(Attack::SlowHeaders("/revoke"), endpoints.admin)));
    slots.extend((0..30).map(|_| Slot::new(Attack::OversizedBody, endpoints.admin)));
    let flood = Flood::start(slots, HEADER_TIMEOUT * 3);
    std::thread::sleep(Duration::from_secs(2));

    // New shims (new connections, new provider calls: both need descriptors) log in meanwhile.
    let mut refused = 0;
    let mut peak_fds = 0;
    for _ in 0..3 {
        refused += fresh_logins(&provider, &endpoints.broker.addr(), 4);
        peak_fds = peak_fds.max(open_fds(pid));
        std::thread::sleep(Duration::from_secs(1));
    }
    let report = flood.stop();
    println!(
        "broker descriptors: {at_rest} at rest, {peak_fds} at most seen under the flood \
         (RLIMIT_NOFILE {BROKER_NOFILE}); flood: {report:?}"
    );
    assert_eq!(refused, 0, "valid logins refused under the flood");
    assert!(report.opened >= 330, "{report:?}");
    assert_eq!(
        report.still_open, 0,
        "hostile connections the broker never closed: {report:?}"
    );
    assert!(
        report
            .oversized_answers
            .keys()
            .all(|s| [0, 401].contains(s)),
        "an oversized body without a bearer is answered 401 unread, or closed over the cap: {:?}",
        report.oversized_answers
    );

    // Both endpoints serve again, and say what they refused.
    let log = endpoints.broker.log();
    for endpoint in ["metrics", "admin"] {
        assert!(
            log.contains(&format!("{endpoint} endpoint: "))
                && log.contains("closing new ones at once"),
            "the cap's log line for {endpoint}"
        );
    }
    let metrics = Metrics::scrape(endpoints.metrics);
    for endpoint in ["metrics", "admin"] {
        for series in [
            format!("extauth_endpoint_connections_refused_total{{endpoint=\"{endpoint}\"}}"),
            format!("extauth_endpoint_timeouts_total{{endpoint=\"{endpoint}\",phase=\"header\"}}"),
        ] {
            assert!(metrics.sum(&series) > 0.0, "{series} in\n{}", metrics.0);
        }
    }
    let body = r#"{"domain": "example.com", "user": "alice"}"#;
    let request = format!(
        "{}{body}",
        revoke_head(
            Some(ADMIN_SECRET),
            &format!("Content-Length: {}\r\nConnection: close\r\n", body.len())
        )
    );
    let answer = exchange(endpoints.admin, request.as_bytes(), Duration::from_secs(5));
    assert_eq!(status(&answer), 200, "{answer:?}");
    assert!(!endpoints.broker.log().contains(ADMIN_SECRET));
}

//! Fault-injection helpers: reading a broker's log and metrics, the `probe` command, a provider
//! that answers garbage, and a mixed login load through real shims that records every answer
//! (what was asked, what came back, when, and how long it took).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::services::{broker_bin, now_s, token, Provider, Shim, CLIENT_ID, CLIENT_SECRET};

/// `text` without terminal colour sequences (`ESC [ ... m`), which a text log may carry.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// Lines of `log` (colours stripped) that contain every one of `needles`.
pub fn log_lines(log: &str, needles: &[&str]) -> Vec<String> {
    strip_ansi(log)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

/// One plain HTTP/1.1 GET on 127.0.0.1: the status and the body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    (
        response[9..12].parse().unwrap(),
        response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    )
}

/// Sends one HTTP/1.1 request and returns (status, body).
pub fn http(port: u16, method: &str, path: &str, auth: Option<&str>, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = auth
        .map(|a| format!("Authorization: Bearer {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A scrape of a broker's `/metrics`.
pub struct Metrics(pub String);

impl Metrics {
    /// Scrapes `http://127.0.0.1:PORT/metrics`.
    pub fn scrape(port: u16) -> Metrics {
        let (status, body) = http_get(port, "/metrics");
        assert_eq!(status, 200, "{body}");
        Metrics(body)
    }

    /// The sum of every sample whose series starts with `prefix` (e.g.
    /// `extauth_requests_total{command="auth",result="refused"`); 0 when there is none.
    pub fn sum(&self, prefix: &str) -> f64 {
        self.0
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// The series (without values) starting with `prefix`.
    pub fn series(&self, prefix: &str) -> Vec<String> {
        self.0
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_owned())
            .collect()
    }
}

/// `--metrics-listen 127.0.0.1:PORT` for a broker's extra arguments.
pub fn metrics_flags(port: u16) -> Vec<String> {
    vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")]
}

/// What `extauth-broker probe` printed.
#[derive(Debug)]
pub struct Probe {
    pub accepted: bool,
    pub reason: String,
    pub source: String,
}

/// Runs `extauth-broker probe --broker ADDR --domain example.com --user USER --token-file F`.
pub fn probe(addr: &str, user: &str, token: &str) -> Probe {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let out = Command::new(broker_bin())
        .args([
            "probe",
            "--broker",
            addr,
            "--domain",
            "example.com",
            "--user",
            user,
            "--timeout",
            "10",
            "--token-file",
        ])
        .arg(&token_file)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "probe failed: {printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        printed
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {printed}"))
            .trim()
            .to_owned()
    };
    Probe {
        accepted: field("verdict:").starts_with("accepted"),
        reason: field("reason:"),
        source: field("source:"),
    }
}

/// A broker configuration file (`--config`) whose circuit breaker never opens during a test, so
/// that every failed provider call is a real call, and `extra` TOML lines after `[defaults]`.
pub fn relaxed_breaker_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("faults.toml");
    std::fs::write(
        &path,
        format!("[defaults]\nbreaker = {{ threshold = 1000, cooldown = 1 }}\n{extra}\n"),
    )
    .unwrap();
    path
}

/// `validator = { ... }` TOML pointing at `url` with the test client credentials, with
/// `total_s` as the provider timeout.
pub fn introspection_validator(url: &str, total_s: f64) -> String {
    format!(
        "validator = {{ kind = \"introspection\", url = \"{url}\", client_id = \"{CLIENT_ID}\", client_secret = \"{CLIENT_SECRET}\", timeouts = {{ connect = 1, total = {total_s} }} }}"
    )
}

/// An introspection endpoint that answers whatever the test mounts (wiremock), e.g. 200 with
/// a body that is not JSON.
pub struct MockIdp {
    server: MockServer,
    rt: tokio::runtime::Runtime,
}

impl MockIdp {
    pub fn start() -> MockIdp {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let server = rt.block_on(MockServer::start());
        MockIdp { server, rt }
    }

    /// The introspection URL.
    pub fn url(&self) -> String {
        format!("{}/introspect", self.server.uri())
    }

    /// From now on every call is answered `status` with `body` as `content_type`.
    pub fn answer(&self, status: u16, body: &str, content_type: &str) {
        self.rt.block_on(self.server.reset());
        let mock = Mock::given(method("POST")).respond_with(
            ResponseTemplate::new(status).set_body_raw(body.to_owned(), content_type),
        );
        self.rt.block_on(mock.mount(&self.server));
    }

    /// Calls received since the last [`MockIdp::answer`].
    pub fn calls(&self) -> usize {
        self.rt
            .block_on(self.server.received_requests())
            .unwrap_or_default()
            .len()
    }
}

/// What kind of login a load request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// alice's own active token: must be accepted.
    Valid,
    /// A token the provider never issued (or revoked: `active: false`).
    Invalid,
    /// alice's token whose `exp` has passed.
    Expired,
    /// bob's valid token, presented for alice.
    Foreign,
}

/// One request of a mixed load.
pub struct Case {
    pub kind: Kind,
    pub request: String,
}

/// The mix of a login load for user alice at example.com: mostly her few "hot" tokens (cache
/// hits), some fresh tokens of hers (provider calls), unknown, revoked, expired and foreign tokens.
pub struct Mix<'a> {
    provider: &'a Provider,
    hot: Vec<String>,
    inactive: String,
    expired: String,
    foreign: String,
}

impl<'a> Mix<'a> {
    /// Registers the mix's tokens with `provider`.
    pub fn new(provider: &'a Provider) -> Mix<'a> {
        let hot: Vec<String> = (0..4).map(|i| token(&format!("hot-{i}"))).collect();
        for t in &hot {
            provider.insert(t, json!({"username": "alice", "exp": now_s() + 3600}));
        }
        let (inactive, expired, foreign) = (token("inactive"), token("expired"), token("bob"));
        provider.insert(&inactive, json!({"active": false, "username": "alice"}));
        provider.insert(&expired, json!({"username": "alice", "exp": now_s() - 60}));
        provider.insert(&foreign, json!({"username": "bob"}));
        Mix {
            provider,
            hot,
            inactive,
            expired,
            foreign,
        }
    }

    /// alice's hot tokens (to warm caches before a fault).
    pub fn hot(&self) -> &[String] {
        &self.hot
    }

    /// The `n`th request of load thread `lane`.
    pub fn case(&self, lane: usize, n: u64) -> Case {
        let auth = |kind, t: &str| Case {
            kind,
            request: format!("auth:alice:example.com:{t}"),
        };
        match n % 10 {
            0..=3 => auth(Kind::Valid, &self.hot[(n as usize + lane) % self.hot.len()]),
            4 | 5 => {
                let fresh = token(&format!("fresh-{lane}"));
                self.provider.insert(&fresh, json!({"username": "alice"}));
                auth(Kind::Valid, &fresh)
            }
            6 => auth(Kind::Invalid, &token(&format!("never-issued-{lane}"))),
            7 => auth(
                if n % 20 == 7 {
                    Kind::Invalid
                } else {
                    Kind::Expired
                },
                if n % 20 == 7 {
                    &self.inactive
                } else {
                    &self.expired
                },
            ),
            _ => auth(Kind::Foreign, &self.foreign),
        }
    }
}

/// One answered (or failed) load request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub lane: usize,
    pub kind: Kind,
    /// The reply, or why there was none (the shim exited or wrote garbage).
    pub got: Result<bool, String>,
    pub started: Instant,
    pub took: Duration,
}

impl Answer {
    /// Was a kill at `at` while this request waited for its answer?
    pub fn in_flight_at(&self, at: Instant) -> bool {
        self.started <= at && at <= self.started + self.took
    }
}

/// Everything a load saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub answers: Vec<Answer>,
    /// How each shim ended after end of input: `Ok` for exit 0 with nothing left on stdout.
    pub exits: Vec<Result<(), String>>,
}

impl LoadReport {
    /// Requests of `kind`.
    pub fn count(&self, kind: Kind) -> usize {
        self.answers.iter().filter(|a| a.kind == kind).count()
    }

    /// Invalid, expired or foreign tokens that were accepted: must always be empty.
    pub fn wrong_accepts(&self) -> Vec<&Answer> {
        self.answers
            .iter()
            .filter(|a| a.kind != Kind::Valid && a.got == Ok(true))
            .collect()
    }

    /// Valid tokens refused (or not answered).
    pub fn refused_valid(&self) -> Vec<&Answer> {
        self.answers
            .iter()
            .filter(|a| a.kind == Kind::Valid && a.got != Ok(true))
            .collect()
    }

    /// Requests the shim did not answer with a reply at all (it exited or wrote garbage).
    pub fn unanswered(&self) -> Vec<&Answer> {
        self.answers.iter().filter(|a| a.got.is_err()).collect()
    }

    /// The slowest reply.
    pub fn slowest(&self) -> Duration {
        self.answers
            .iter()
            .map(|a| a.took)
            .max()
            .unwrap_or_default()
    }

    /// One line of figures.
    pub fn summary(&self) -> String {
        let mut took: Vec<Duration> = self.answers.iter().map(|a| a.took).collect();
        took.sort();
        let pct = |p: f64| {
            took.get(((took.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        format!(
            "{} requests (valid {}, invalid {}, expired {}, foreign {}); wrong accepts {}; valid refused {}; unanswered {}; latency p50 {:?} p99 {:?} max {:?}",
            self.answers.len(),
            self.count(Kind::Valid),
            self.count(Kind::Invalid),
            self.count(Kind::Expired),
            self.count(Kind::Foreign),
            self.wrong_accepts().len(),
            self.refused_valid().len(),
            self.unanswered().len(),
            pct(0.5),
            pct(0.99),
            self.slowest(),
        )
    }
}

/// How many requests the load has answered so far, for the fault schedule to wait on.
#[derive(Default)]
pub struct Progress(AtomicUsize);

impl Progress {
    pub fn answered(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Waits (at most `limit`) until `more` further requests were answered.
    pub fn wait_for_more(&self, more: usize, limit: Duration) {
        let target = self.answered() + more;
        super::services::wait_until(limit, "load progress", || self.answered() >= target);
    }
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Most requests one load lane sends (a bound; the stop flag normally ends it first).
const MAX_PER_LANE: u64 = 100_000;

/// Runs one shim per entry of `lanes` (its `--broker` argument, e.g. `unix:/a,unix:/b`) with
/// `--timeout shim_timeout_s` and `shim_args`, each asking `mix`'s requests one after the other
/// (as ejabberd does: one in flight per program), while `during` runs on this thread; then stops
/// the load, closes every shim's stdin and reports. `during` starts once every shim has answered
/// once, and gets the progress counter to pace its faults.
pub fn run_load<R>(
    lanes: &[String],
    shim_timeout_s: f64,
    shim_args: &[&str],
    mix: &Mix,
    during: impl FnOnce(&Progress) -> R,
) -> (LoadReport, R) {
    let stop = AtomicBool::new(false);
    let progress = Progress::default();
    let report = Mutex::new(LoadReport::default());
    // Every shim exists before the clock of `during` starts.
    let shims: Vec<Shim> = lanes
        .iter()
        .map(|addr| Shim::spawn(addr, shim_timeout_s, shim_args))
        .collect();
    let result = std::thread::scope(|scope| {
        for (lane, mut shim) in shims.into_iter().enumerate() {
            let (stop, progress, report) = (&stop, &progress, &report);
            scope.spawn(move || {
                let mut answers = Vec::new();
                for n in 0..MAX_PER_LANE {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let case = mix.case(lane, n);
                    let started = Instant::now();
                    let got = shim.try_ask(&case.request).map_err(|e| e.to_string());
                    let failed = got.is_err();
                    answers.push(Answer {
                        lane,
                        kind: case.kind,
                        got,
                        started,
                        took: started.elapsed(),
                    });
                    progress.0.fetch_add(1, Ordering::SeqCst);
                    if failed {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                let exit = match shim.exited() {
                    Some(status) => Err(format!("the shim exited during the load: {status}")),
                    None => {
                        let (rest, status) = shim.finish(Duration::from_secs(5));
                        if status.success() && rest.is_empty() {
                            Ok(())
                        } else {
                            Err(format!("after EOF: {status}, {} stray bytes", rest.len()))
                        }
                    }
                };
                let mut report = report.lock().unwrap();
                report.answers.extend(answers);
                report.exits.push(exit);
            });
        }
        // Stops the lanes even when `during` panics, so the scope can end.
        let _stop = StopOnDrop(&stop);
        progress.wait_for_more(lanes.len(), Duration::from_secs(20));
        during(&progress)
    });
    let mut report = report.into_inner().unwrap();
    report.answers.sort_by_key(|a| a.started);
    (report, result)
}

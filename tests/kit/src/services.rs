//! Real components for integration tests: redis-server, the broker and shims as child processes,
//! and the development introspection provider (the only simulated part).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use extauth_broker::devprovider::DevProvider;
use extauth_protocol::extauth::reply;
use serde_json::Value;
use tempfile::TempDir;

/// The client credentials every test broker uses against the mock provider.
pub const CLIENT_ID: &str = "test-broker";
pub const CLIENT_SECRET: &str = "client-secret-5f1e0c7a";

/// The repository's root (fixtures, docs and scripts are read from there).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The directory cargo puts this profile's binaries in: the test executable runs from its
/// `deps/` subdirectory.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable in a directory");
    deps.parent()
        .expect("deps/ in a profile directory")
        .to_path_buf()
}

/// The broker binary cargo built for these tests (the package's own binary).
pub fn broker_bin() -> PathBuf {
    bin_dir().join("extauth-broker")
}

/// The shim binary, built next to the broker (another workspace member, which cargo does not
/// build for the broker's tests).
pub fn shim_bin() -> PathBuf {
    sibling_bins().join("extauth-shim")
}

/// The `extauth-load` harness binary (its own package under `tests/load/`).
pub fn load_bin() -> PathBuf {
    sibling_bins().join("extauth-load")
}

/// The `extauth-lab` binary of this package (`src/bin/extauth-lab.rs`): the tests' ejabberd
/// cluster for scripts such as `deploy/tsung/run.sh`.
pub fn lab_bin() -> PathBuf {
    sibling_bins().join("extauth-lab")
}

/// Builds the shim, the load harness and `extauth-lab` once per test process, in the tests'
/// profile.
fn sibling_bins() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = bin_dir();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            // Whole packages (their default targets: the testkit's library and extauth-lab), not
            // `--bin`, which would leave out the other packages' binaries.
            let packages = ["extauth-shim", "extauth-load", "extauth-testkit"];
            build.arg("build");
            for p in packages {
                build.args(["-p", p]);
            }
            // The package variables cargo sets for this test process (CARGO_MANIFEST_DIR,
            // CARGO_PKG_NAME, …). Build scripts such as ring's rerun when they change, and this
            // build shares those dependencies with the tests' own (same features): passing
            // them on would rebuild ring, rustls and everything above them on every test run,
            // here and again in the next `cargo test`.
            for (name, _) in std::env::vars_os() {
                let name_str = name.to_string_lossy();
                if [
                    "CARGO_PKG_",
                    "CARGO_MANIFEST_",
                    "CARGO_CRATE_",
                    "CARGO_BIN_",
                ]
                .iter()
                .any(|prefix| name_str.starts_with(prefix))
                    || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"]
                        .contains(&name_str.as_ref())
                {
                    build.env_remove(&name);
                }
            }
            if dir.file_name().is_some_and(|name| name == "release") {
                build.arg("--release");
            }
            let status = build.current_dir(repo_root()).status().unwrap_or_else(|e| {
                panic!("running cargo build -p {}: {e}", packages.join(" -p "))
            });
            assert!(
                status.success(),
                "cargo build -p {} failed",
                packages.join(" -p ")
            );
            dir
        })
        .clone()
}

/// What a finished child printed, for assertion messages: its stdout, then its stderr.
pub fn printed(output: &std::process::Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 10 ms until it is true or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True when nothing is `missing`. Otherwise prints a loud `SKIPPED` block naming `test` and
/// what is missing and returns false, or panics when the environment variable `require_env` is
/// `1` (`tests/run` and CI set it), so a machine without a prerequisite never passes a test
/// silently.
pub fn skip_or_require(require_env: &str, test: &str, missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let what = missing.join("; ");
    if std::env::var(require_env).as_deref() == Ok("1") {
        panic!("{require_env}=1 but {test} cannot run; missing: {what}");
    }
    // Straight to the process's stderr: cargo test captures `eprintln!` of passing tests, and
    // a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n*********************************************************************\n\
         SKIPPED: {test} did NOT run (missing: {what}).\n\
         `tests/run` installs the prerequisites;\n\
         set {require_env}=1 to turn this skip into a failure.\n\
         *********************************************************************\n"
    );
    false
}

/// The mock OAuth provider on its own small runtime, so tests can stay synchronous.
pub struct Provider {
    // Declared before the runtime so it stops first.
    inner: DevProvider,
    _rt: tokio::runtime::Runtime,
}

impl Provider {
    /// Starts the provider on a free loopback port.
    pub fn start() -> Provider {
        Provider::start_at("127.0.0.1:0")
    }

    /// Starts the provider on `addr` (e.g. a port a broker already points at, to end a
    /// "connection refused" outage).
    pub fn start_at(addr: &str) -> Provider {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let inner = rt
            .block_on(DevProvider::start_at(addr, CLIENT_ID, CLIENT_SECRET))
            .unwrap();
        Provider { inner, _rt: rt }
    }

    pub fn url(&self) -> String {
        self.inner.url()
    }

    pub fn insert(&self, token: &str, claims: Value) {
        self.inner.insert(token, claims);
    }

    pub fn calls(&self) -> u64 {
        self.inner.calls()
    }

    pub fn set_latency(&self, latency: Duration) {
        self.inner.set_latency(latency);
    }

    /// The most calls answered at once (counted while a latency is set).
    pub fn most_concurrent_calls(&self) -> u64 {
        self.inner.most_concurrent_calls()
    }

    pub fn set_fail_status(&self, status: u16) {
        self.inner.set_fail_status(status);
    }
}

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The Redis server program the tests start: `$EXTAUTH_REDIS_SERVER` when set (tests/run sets
/// `/usr/bin/valkey-server` to repeat the Redis tests against Valkey), else `redis-server`.
pub fn redis_server_bin() -> PathBuf {
    std::env::var_os("EXTAUTH_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// A throwaway redis-server (or `$EXTAUTH_REDIS_SERVER`) on a free loopback port, killed on
/// drop.
pub struct Redis {
    child: Child,
    pub port: u16,
    _dir: TempDir,
    /// The `extra` arguments it was started with (a restart uses them again).
    extra: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// A redis-server with `extra` arguments (e.g. `--cluster-enabled yes`, `--replicaof ...`).
    pub fn start_with(extra: &[&str]) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let child = Redis::spawn(port, dir.path(), &extra);
        let redis = Redis {
            child,
            port,
            _dir: dir,
            extra,
        };
        redis.wait_ready();
        redis
    }

    fn spawn(port: u16, dir: &Path, extra: &[String]) -> Child {
        Command::new(redis_server_bin())
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{} must be installed (apt-get install redis-server): {e}",
                    redis_server_bin().display()
                )
            })
    }

    fn wait_ready(&self) {
        wait_until(Duration::from_secs(10), "redis-server", || {
            self.command(&["PING"]).is_ok_and(|r| r == "+PONG")
        });
    }

    /// Kills the server (SIGKILL) and waits for it: clients see their connections drop and new
    /// ones refused.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port and directory (empty: nothing is persisted),
    /// with the same arguments; kills it first if it still runs.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Redis::spawn(self.port, self._dir.path(), &self.extra);
        self.wait_ready();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's working directory (for config files it writes, e.g. a sentinel's).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Sends one command (RESP) and returns the raw reply, e.g. `+PONG` or `:3`.
    pub fn command(&self, args: &[&str]) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        stream.write_all(req.as_bytes())?;
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a test broker is started with.
pub struct BrokerSpec<'a> {
    /// The introspection provider passed with `--introspection-url` (and the client
    /// credentials); `None` for a broker whose validators all come from `config`.
    pub provider: Option<&'a Provider>,
    /// A `--config` TOML file.
    pub config: Option<PathBuf>,
    pub redis: Option<&'a Redis>,
    /// The shared cache key secret; brokers sharing Redis must share it.
    pub cache_secret: &'a str,
    pub extra: Vec<String>,
    /// RLIMIT_NOFILE (soft and hard) the broker starts with; `None` inherits the test's.
    pub nofile: Option<u64>,
}

impl<'a> BrokerSpec<'a> {
    pub fn new(provider: &'a Provider) -> Self {
        BrokerSpec {
            provider: Some(provider),
            ..Self::bare()
        }
    }

    /// A broker configured by the TOML file `config` alone (no introspection flags, which would
    /// override its `[defaults] validator`).
    pub fn from_config(config: &Path) -> Self {
        BrokerSpec {
            config: Some(config.to_owned()),
            ..Self::bare()
        }
    }

    /// No validator source yet.
    fn bare() -> Self {
        BrokerSpec {
            provider: None,
            config: None,
            redis: None,
            cache_secret: "test-cache-secret-0123456789abcdef0123",
            extra: Vec::new(),
            nofile: None,
        }
    }

    pub fn with_redis(mut self, redis: &'a Redis) -> Self {
        self.redis = Some(redis);
        self
    }
}

/// A broker child process listening on a Unix socket in its own temp dir; killed on drop.
pub struct Broker {
    child: Option<Child>,
    pub socket: PathBuf,
    dir: TempDir,
}

impl Broker {
    pub fn start(spec: &BrokerSpec) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("broker.sock");
        let mut broker = Broker {
            child: None,
            socket,
            dir,
        };
        broker.launch(spec);
        broker
    }

    /// The `--broker` argument for shims.
    pub fn addr(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// Starts the process (again) on the same socket.
    pub fn launch(&mut self, spec: &BrokerSpec) {
        let secret_file = self.cache_secret_file();
        std::fs::write(&secret_file, spec.cache_secret).unwrap();
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new(broker_bin());
        cmd.arg("--listen")
            .arg(format!("unix:{}", self.socket.display()))
            .arg("--cache-secret-file")
            .arg(&secret_file)
            .args(&spec.extra)
            .env("EXTAUTH_LOG_LEVEL", "debug")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(provider) = spec.provider {
            cmd.args([
                "--introspection-url",
                &provider.url(),
                "--client-id",
                CLIENT_ID,
            ])
            .env("EXTAUTH_CLIENT_SECRET", CLIENT_SECRET);
        }
        if let Some(config) = &spec.config {
            cmd.arg("--config").arg(config);
        }
        if let Some(redis) = spec.redis {
            cmd.args(["--redis", &redis.url()]);
        }
        if let Some(limit) = spec.nofile {
            use nix::sys::resource::{setrlimit, Resource};
            // SAFETY: setrlimit(2) is async-signal-safe and allocates nothing; the closure runs
            // in the forked child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    setrlimit(Resource::RLIMIT_NOFILE, limit, limit).map_err(std::io::Error::from)
                });
            }
        }
        self.child = Some(cmd.spawn().unwrap());
        let socket = self.socket.clone();
        wait_until(Duration::from_secs(10), "the broker's socket", || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The cache key secret file this broker was started with.
    pub fn cache_secret_file(&self) -> PathBuf {
        self.dir.path().join("cache.key")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    /// Everything the broker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `extauth-broker revoke` against `broker`'s Redis and cache secret (user `user` of
/// `example.com`, or only the token in `token_file`); panics unless it succeeds, returns what it
/// printed.
pub fn revoke_cli(redis: &Redis, broker: &Broker, user: &str, token_file: Option<&Path>) -> String {
    let out = try_revoke_cli(redis, broker, user, token_file);
    assert!(
        out.status.success(),
        "revoke failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Like [`revoke_cli`], whatever the outcome.
pub fn try_revoke_cli(
    redis: &Redis,
    broker: &Broker,
    user: &str,
    token_file: Option<&Path>,
) -> std::process::Output {
    let mut cmd = Command::new(broker_bin());
    cmd.args([
        "revoke",
        "--redis",
        &redis.url(),
        "--domain",
        "example.com",
        "--user",
        user,
    ])
    .arg("--cache-secret-file")
    .arg(broker.cache_secret_file());
    if let Some(path) = token_file {
        cmd.arg("--token-file").arg(path);
    }
    cmd.output().unwrap()
}

/// A real shim child process speaking extauth on its stdin/stdout.
pub struct Shim {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
}

impl Shim {
    /// Starts `extauth-shim --broker ADDR --timeout T` plus `extra` flags.
    pub fn spawn(broker: &str, timeout_s: f64, extra: &[&str]) -> Shim {
        let mut child = Command::new(shim_bin())
            .args(["--broker", broker, "--timeout", &timeout_s.to_string()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        Shim {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends raw bytes (a frame or part of one).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Sends one request frame without waiting for the reply.
    pub fn send(&mut self, request: &[u8]) {
        self.send_raw(&frame(request));
    }

    /// Reads one reply; panics on anything but `00 02 00 0x`.
    pub fn reply(&mut self) -> bool {
        let mut answer = [0u8; 4];
        self.stdout.read_exact(&mut answer).unwrap();
        match answer {
            a if a == reply(true) => true,
            a if a == reply(false) => false,
            other => panic!("not an extauth reply: {other:?}"),
        }
    }

    /// Sends a request and waits for its reply.
    pub fn ask(&mut self, request: &str) -> bool {
        self.send(request.as_bytes());
        self.reply()
    }

    /// Like [`Shim::ask`], but a shim that exited (or wrote anything but a reply) is an error
    /// instead of a panic, so a load thread can report it.
    pub fn try_ask(&mut self, request: &str) -> std::io::Result<bool> {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(&frame(request.as_bytes()))?;
        stdin.flush()?;
        let mut answer = [0u8; 4];
        self.stdout.read_exact(&mut answer)?;
        match answer {
            a if a == reply(true) => Ok(true),
            a if a == reply(false) => Ok(false),
            other => Err(std::io::Error::other(format!(
                "not an extauth reply: {other:?}"
            ))),
        }
    }

    /// What the shim wrote to stdout beyond the replies read so far, within `settle` (empty when
    /// it wrote exactly one reply per request). Reads without blocking, so the shim stays usable.
    pub fn unread(&mut self, settle: Duration) -> Vec<u8> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        std::thread::sleep(settle);
        let flags = OFlag::from_bits_truncate(fcntl(&self.stdout, FcntlArg::F_GETFL).unwrap());
        fcntl(&self.stdout, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).unwrap();
        let mut extra = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match self.stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => extra.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading the shim's stdout: {e}"),
            }
        }
        fcntl(&self.stdout, FcntlArg::F_SETFL(flags)).unwrap();
        extra
    }

    /// Has the process exited (without being waited for by [`Shim::finish`])?
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Closes stdin and returns everything left on stdout and the exit status.
    pub fn finish(mut self, limit: Duration) -> (Vec<u8>, ExitStatus) {
        drop(self.stdin.take());
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                start.elapsed() < limit,
                "shim did not exit within {limit:?} after EOF"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut rest = Vec::new();
        self.stdout.read_to_end(&mut rest).unwrap();
        (rest, status)
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends each request on a shim of its own (`--timeout timeout_s`), all before reading any
/// reply, so they are in flight together; the replies, in order.
pub fn ask_all(broker: &str, timeout_s: f64, requests: &[String]) -> Vec<bool> {
    let mut shims: Vec<Shim> = requests
        .iter()
        .map(|request| {
            let mut shim = Shim::spawn(broker, timeout_s, &[]);
            shim.send(request.as_bytes());
            shim
        })
        .collect();
    shims.iter_mut().map(Shim::reply).collect()
}

/// An extauth frame: 2-byte big-endian length, then the request.
pub fn frame(request: &[u8]) -> Vec<u8> {
    let mut v = u16::try_from(request.len()).unwrap().to_be_bytes().to_vec();
    v.extend_from_slice(request);
    v
}

/// A unique token for this test run (so no two tests share a cache entry by accident).
pub fn token(label: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("tok-{label}-{}-{n}-{}", std::process::id(), now_s())
}

/// Path helper for tests that need a socket path that does not exist yet.
pub fn socket_in(dir: &Path) -> PathBuf {
    dir.join("broker.sock")
}

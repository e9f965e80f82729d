//! The production daemon: socket activation, sd_notify, graceful stop, SIGHUP reload, metrics,
//! and the operator commands, against the real broker binary.

use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use extauth_testkit::faults::http_get;
use extauth_testkit::services::{
    broker_bin, free_port, token, wait_until, Provider, Shim, CLIENT_ID, CLIENT_SECRET,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;

/// A NOTIFY_SOCKET that records what the broker sends, as systemd's would.
struct Notifications {
    socket: UnixDatagram,
    path: PathBuf,
    seen: String,
}

impl Notifications {
    fn new(dir: &Path) -> Notifications {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notifications {
            socket,
            path,
            seen: String::new(),
        }
    }

    /// Waits (at most 10 s) until a message containing `line` arrives; returns everything so far.
    fn wait_for(&mut self, line: &str) -> &str {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while !self.seen.lines().any(|l| l == line) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no {line:?} in {:?}",
                self.seen
            );
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
        &self.seen
    }
}

/// The broker's arguments for `provider`, without listeners.
fn broker_args(provider: &Provider, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--introspection-url".into(),
        provider.url(),
        "--client-id".into(),
        CLIENT_ID.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts the broker exactly as systemd does for a socket unit: the listening sockets as fds 3,
/// 4, ... and `LISTEN_PID` (the broker's own pid: `exec` keeps the shell's), `LISTEN_FDS`,
/// `LISTEN_FDNAMES` (sd_listen_fds(3)).
fn spawn_activated(
    fds: &[RawFd],
    names: &str,
    args: &[String],
    notify: &Path,
    log: &Path,
) -> Child {
    let script = format!(
        "export LISTEN_PID=$$ LISTEN_FDS={} LISTEN_FDNAMES={names}; exec \"$0\" \"$@\"",
        fds.len()
    );
    let fds = fds.to_vec();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script).arg(broker_bin()).args(args);
    cmd.env("EXTAUTH_CLIENT_SECRET", CLIENT_SECRET)
        .env("NOTIFY_SOCKET", notify)
        .env("EXTAUTH_LOG_LEVEL", "debug")
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        );
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            use nix::libc;
            for (i, fd) in fds.iter().enumerate() {
                let target = 3 + i as RawFd;
                // dup2 clears FD_CLOEXEC on the copy; an fd already in place needs it cleared.
                let ok = if *fd == target {
                    libc::fcntl(target, libc::F_SETFD, 0)
                } else {
                    libc::dup2(*fd, target)
                };
                if ok < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn stop(child: &mut Child, signal: Signal) -> std::process::ExitStatus {
    kill(Pid::from_raw(child.id() as i32), signal).unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "broker did not exit after {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn socket_activation_serves_inherited_sockets_and_a_restart_refuses_nobody() {
    let provider = Provider::start();
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("broker.sock");
    let shim_socket = UnixListener::bind(&socket_path).unwrap();
    let metrics_socket = TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_port = metrics_socket.local_addr().unwrap().port();
    let fds = [shim_socket.as_raw_fd(), metrics_socket.as_raw_fd()];
    let mut notes = Notifications::new(dir.path());
    let log = dir.path().join("broker.log");
    let args = broker_args(&provider, &[]);
    let mut broker = spawn_activated(&fds, "shim:metrics", &args, &notes.path, &log);
    notes.wait_for("READY=1");
    assert!(
        notes.seen.contains("STATUS=serving any domain"),
        "{}",
        notes.seen
    );

    let addr = format!("unix:{}", socket_path.display());
    let mut shim = Shim::spawn(&addr, 10.0, &[]);
    assert!(shim.ask(&format!("auth:alice:example.com:{alice}")));
    let (status, body) = http_get(metrics_port, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("extauth_requests_total"), "{body}");

    // Kill the broker; connections made while it is down wait in the kernel's queue of the
    // socket systemd (here: this test) still holds, and the next broker serves them.
    assert!(!stop(&mut broker, Signal::SIGKILL).success());
    let request = format!("auth:alice:example.com:{alice}");
    let waiting = std::thread::spawn(move || Shim::spawn(&addr, 10.0, &[]).ask(&request));
    std::thread::sleep(Duration::from_millis(500));
    let mut notes = Notifications {
        seen: String::new(),
        ..notes
    };
    let mut broker = spawn_activated(&fds, "shim:metrics", &args, &notes.path, &log);
    assert!(
        waiting.join().unwrap(),
        "the queued login was served by the restarted broker"
    );
    assert!(
        shim.ask(&format!("auth:alice:example.com:{alice}")),
        "the first shim reconnected"
    );
    notes.wait_for("READY=1");
    assert!(
        stop(&mut broker, Signal::SIGTERM).success(),
        "SIGTERM: exit 0"
    );
    notes.wait_for("STOPPING=1");
    assert!(
        socket_path.exists(),
        "an inherited socket's path is never removed"
    );
}

#[test]
fn the_real_systemd_socket_activate_starts_the_broker_on_first_connection() {
    let Some(tool) = [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists()) else {
        eprintln!("SKIPPED: systemd-socket-activate not installed (the fd-passing harness above covers the protocol)");
        return;
    };
    let provider = Provider::start();
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("broker.sock");
    let mut notes = Notifications::new(dir.path());
    let mut child = Command::new(tool)
        .arg(format!("--listen={}", socket_path.display()))
        .arg("--fdname=shim")
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notes.path.display()))
        .arg(format!("--setenv=EXTAUTH_CLIENT_SECRET={CLIENT_SECRET}"))
        .arg(broker_bin())
        .args(broker_args(&provider, &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "the activation socket", || {
        socket_path.exists()
    });
    let mut shim = Shim::spawn(&format!("unix:{}", socket_path.display()), 10.0, &[]);
    assert!(shim.ask(&format!("auth:alice:example.com:{alice}")));
    notes.wait_for("READY=1");
    assert!(stop(&mut child, Signal::SIGTERM).success());
}

/// A broker on a Unix socket with a metrics endpoint and a config file, started directly.
struct Daemon {
    child: Child,
    socket: PathBuf,
    metrics_port: u16,
    log: PathBuf,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(provider: &Provider, config: &str, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let (socket, log, config_path) = (
            dir.path().join("b.sock"),
            dir.path().join("b.log"),
            dir.path().join("b.toml"),
        );
        std::fs::write(&config_path, config).unwrap();
        let metrics_port = free_port();
        let mut args = broker_args(provider, extra);
        args.extend([
            "--listen".into(),
            format!("unix:{}", socket.display()),
            "--config".into(),
            config_path.display().to_string(),
        ]);
        args.extend([
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}"),
        ]);
        let child = Command::new(broker_bin())
            .args(&args)
            .env("EXTAUTH_CLIENT_SECRET", CLIENT_SECRET)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // The socket accepts (into its backlog) as soon as it is bound, a moment before the
        // broker says it is ready: wait for that line.
        let s = socket.clone();
        wait_until(Duration::from_secs(10), "the broker", || {
            std::os::unix::net::UnixStream::connect(&s).is_ok()
                && std::fs::read_to_string(&log).is_ok_and(|l| l.contains(" ready: "))
        });
        Daemon {
            child,
            socket,
            metrics_port,
            log,
            config: config_path,
            _dir: dir,
        }
    }

    fn addr(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sighup_reloads_domains_and_refuses_a_bad_configuration() {
    let provider = Provider::start();
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let daemon = Daemon::start(&provider, "[domains.\"a.example\"]\n", &[]);
    let mut shim = Shim::spawn(&daemon.addr(), 5.0, &[]);
    assert!(shim.ask(&format!("auth:alice:a.example:{alice}")));
    assert!(
        !shim.ask(&format!("auth:alice:b.example:{alice}")),
        "b.example not configured yet"
    );

    std::fs::write(
        &daemon.config,
        "[domains.\"a.example\"]\n[domains.\"b.example\"]\n",
    )
    .unwrap();
    kill(Pid::from_raw(daemon.child.id() as i32), Signal::SIGHUP).unwrap();
    wait_until(Duration::from_secs(10), "the reload", || {
        daemon.log().contains("configuration reloaded")
    });
    assert!(
        shim.ask(&format!("auth:alice:b.example:{alice}")),
        "served after reload, same connection"
    );

    std::fs::write(&daemon.config, "[domains.\"a.example\"]\nmax_tll = 5\n").unwrap();
    kill(Pid::from_raw(daemon.child.id() as i32), Signal::SIGHUP).unwrap();
    wait_until(Duration::from_secs(10), "the refusal", || {
        daemon.log().contains("configuration refused")
    });
    assert!(
        daemon.log().contains("max_tll"),
        "the log names the problem"
    );
    assert!(
        shim.ask(&format!("auth:alice:b.example:{alice}")),
        "the running configuration stays"
    );
}

#[test]
fn metrics_health_and_the_operator_commands() {
    let provider = Provider::start();
    let alice = token("metrics-alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let daemon = Daemon::start(&provider, "", &["--log-format", "json"]);
    assert_eq!(http_get(daemon.metrics_port, "/healthz").0, 200);
    assert_eq!(http_get(daemon.metrics_port, "/readyz").0, 200);
    let mut shim = Shim::spawn(&daemon.addr(), 5.0, &[]);
    assert!(shim.ask(&format!("auth:alice:example.com:{alice}")));
    assert!(shim.ask(&format!("auth:alice:example.com:{alice}")));
    assert!(!shim.ask("auth:alice:example.com:wrong"));
    let (_, body) = http_get(daemon.metrics_port, "/metrics");
    let line = |prefix: &str| {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{body}"))
            .to_owned()
    };
    assert!(line("extauth_requests_total{command=\"auth\",result=\"accepted\",reason=\"accepted\",source=\"provider\",front=\"shim\"}").ends_with(" 1"));
    assert!(line("extauth_requests_total{command=\"auth\",result=\"accepted\",reason=\"accepted\",source=\"l1\",front=\"shim\"}").ends_with(" 1"));
    assert!(
        line("extauth_requests_total{command=\"auth\",result=\"refused\",reason=\"inactive\"")
            .ends_with(" 1")
    );
    assert!(
        line("extauth_provider_calls_total{validator=\"introspection\",outcome=\"valid\"}")
            .ends_with(" 1")
    );
    assert!(line("extauth_cache_hits_total{layer=\"l1\"}").ends_with(" 1"));
    assert!(
        body.contains("extauth_request_duration_seconds_bucket{command=\"auth\",front=\"shim\",le=\"0.0001\"}"),
        "real histogram buckets"
    );
    assert!(line("extauth_connections_open").ends_with(" 1"));
    assert!(
        !body.contains(&alice) && !body.contains(CLIENT_SECRET),
        "no secret in /metrics"
    );

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &alice).unwrap();
    let probe = Command::new(broker_bin())
        .args([
            "probe",
            "--broker",
            &daemon.addr(),
            "--domain",
            "example.com",
            "--user",
            "alice",
            "--token-file",
        ])
        .arg(&token_file)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&probe.stdout);
    assert!(probe.status.success(), "{printed}");
    assert!(
        printed.contains("verdict: accepted") && printed.contains("source:  l1"),
        "{printed}"
    );

    let stats = Command::new(broker_bin())
        .args([
            "stats",
            "--metrics-url",
            &format!("http://127.0.0.1:{}/metrics", daemon.metrics_port),
        ])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&stats.stdout);
    assert!(
        printed.contains("extauth_provider_calls_total"),
        "{printed}"
    );

    let log = daemon.log();
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        !lines.is_empty()
            && lines
                .iter()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "JSON logs:\n{log}"
    );
    assert!(!log.contains(&alice) && !log.contains(CLIENT_SECRET));
}

#[test]
fn check_config_prints_the_effective_settings_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    let secret = dir.path().join("client.secret");
    std::fs::write(&secret, "very-secret-client-credential\n").unwrap();
    std::fs::write(
        &config,
        format!(
            "listen = [\"unix:/run/x.sock\"]\n[defaults]\nvalidator = {{ kind = \"introspection\", url = \"https://idp/introspect\", client_id = \"c\", client_secret_file = \"{}\" }}\n",
            secret.display()
        ),
    )
    .unwrap();
    let out = Command::new(broker_bin())
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains("configuration OK") && printed.contains("https://idp/introspect"),
        "{printed}"
    );
    assert!(
        printed.contains("unix:/run/x.sock (mode 0660)")
            && printed.contains("claim \"username\" names the user, claim_folding exact")
            && !printed.contains("socket_mode: 432"),
        "a readable summary, not a debug dump: {printed}"
    );
    assert!(
        !printed.contains("very-secret-client-credential"),
        "{printed}"
    );
    std::fs::write(&config, "listen = [\"unix:/run/x.sock\"]\nmax_tll = 3\n").unwrap();
    let out = Command::new(broker_bin())
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_tll"));
}

#[test]
fn started_as_root_it_binds_then_drops_to_the_given_user() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root");
        return;
    }
    let provider = Provider::start();
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let mut spec = extauth_testkit::services::BrokerSpec::new(&provider);
    spec.extra = vec![
        "--user".into(),
        "nobody".into(),
        "--group".into(),
        "nogroup".into(),
    ];
    let broker = extauth_testkit::services::Broker::start(&spec);
    // The socket answers as soon as it is bound; the privileges are dropped just after.
    let status_path = format!("/proc/{}/status", broker.pid());
    extauth_testkit::services::wait_until(Duration::from_secs(5), "the privilege drop", || {
        std::fs::read_to_string(&status_path).is_ok_and(|s| !s.contains("Uid:\t0\t"))
    });
    let status = std::fs::read_to_string(&status_path).unwrap();
    let ids = |field: &str| {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap()
            .split_whitespace()
            .skip(1)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids("Uid:"),
        vec!["65534"; 4],
        "real, effective, saved and fs uid"
    );
    assert_eq!(ids("Gid:"), vec!["65534"; 4]);
    assert_eq!(ids("Groups:"), vec!["65534"], "no supplementary group left");
    let meta = std::fs::metadata(&broker.socket).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (meta.uid(), meta.gid()),
        (65534, 65534),
        "the socket belongs to the new user and group"
    );
    assert!(
        Shim::spawn(&broker.addr(), 5.0, &[]).ask(&format!("auth:alice:example.com:{alice}")),
        "serving after the drop"
    );
}

/// The README's first command: `extauth-broker demo` runs the whole request path with nothing
/// external (the bundled provider, the broker, a real shim) and every verdict comes out right.
#[test]
fn the_demo_in_the_readme_runs_end_to_end() {
    let shim = extauth_testkit::services::shim_bin();
    let out = Command::new(broker_bin())
        .arg("demo")
        .arg("--shim")
        .arg(&shim)
        .output()
        .expect("running extauth-broker demo");
    let printed = extauth_testkit::services::printed(&out);
    assert!(out.status.success(), "{printed}");
    assert!(
        printed.contains("provider calls in total: 6 for 12 requests"),
        "{printed}"
    );
    assert!(printed.contains("every verdict as expected"), "{printed}");
}

//! Who may connect (peer credentials, loopback-only plaintext, TLS and mTLS), slow peers, and
//! secrets that must appear nowhere: real broker, shim and redis-server processes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use extauth_testkit::pki::{open_dir, Pki};
use extauth_testkit::services::{
    broker_bin, frame, free_port, shim_bin, token, Broker, BrokerSpec, Provider, Redis, Shim,
    CLIENT_SECRET,
};
use serde_json::json;

/// `nobody` and `nogroup` on Debian.
const NOBODY: u32 = 65534;

/// Asks one question through a shim running as `uid`.
fn ask_as(uid: u32, broker: &str, request: &str) -> bool {
    let mut child = Command::new(shim_bin())
        .args(["--broker", broker, "--timeout", "5"])
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(&frame(request.as_bytes()))
        .unwrap();
    let mut answer = [0u8; 4];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut answer)
        .unwrap();
    drop(child.stdin.take());
    child.wait().unwrap();
    answer == [0, 2, 0, 1]
}

#[test]
fn unix_peers_are_checked_before_any_request() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root to run a shim as another user");
        return;
    }
    let provider = Provider::start();
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let dir = open_dir();
    let socket = dir.path().join("b.sock");
    let mut spec = BrokerSpec::new(&provider);
    // The socket's mode lets everyone connect: only the peer check keeps `nobody` out.
    spec.extra = vec![
        "--listen".into(),
        format!("unix:{}", socket.display()),
        "--socket-mode".into(),
        "0666".into(),
        "--allow-uid".into(),
        "root".into(),
    ];
    let broker = Broker::start(&spec);
    let addr = format!("unix:{}", socket.display());
    let request = format!("auth:alice:example.com:{alice}");
    assert!(ask_as(0, &addr, &request), "root is allowed");
    assert!(!ask_as(NOBODY, &addr, &request), "nobody is refused");
    assert_eq!(
        provider.calls(),
        1,
        "the refused peer's request was never read"
    );
    let log = broker.log();
    assert!(
        log.contains("refused a Unix socket peer") && log.contains(&format!("uid={NOBODY}")),
        "{log}"
    );

    // Default policy (no --allow-*): root, the broker's user and the socket's group.
    let socket2 = dir.path().join("c.sock");
    spec.extra = vec![
        "--listen".into(),
        format!("unix:{}", socket2.display()),
        "--socket-mode".into(),
        "0666".into(),
    ];
    let _default = Broker::start(&spec);
    let addr2 = format!("unix:{}", socket2.display());
    assert!(ask_as(0, &addr2, &request));
    assert!(
        !ask_as(NOBODY, &addr2, &request),
        "nobody is not in the socket's group (root)"
    );
}

#[test]
fn plaintext_tcp_is_refused_off_loopback_unless_insecure() {
    let provider = Provider::start();
    let port = free_port();
    let out = Command::new(broker_bin())
        .args([
            "--listen",
            &format!("tcp:0.0.0.0:{port}"),
            "--introspection-url",
            &provider.url(),
            "--client-id",
            "c",
        ])
        .env("EXTAUTH_CLIENT_SECRET", CLIENT_SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--tls-cert"),
        "{err}"
    );
}

fn tls_broker(provider: &Provider, pki: &Pki, port: u16, mtls: bool) -> Broker {
    let mut spec = BrokerSpec::new(provider);
    spec.extra = vec![
        "--listen".into(),
        format!("tcp:127.0.0.1:{port}"),
        "--tls-cert".into(),
        pki.path("server.pem"),
        "--tls-key".into(),
        pki.path("server.key"),
    ];
    if mtls {
        spec.extra
            .extend(["--client-ca".into(), pki.path("ca.pem")]);
    }
    Broker::start(&spec)
}

#[test]
fn shims_reach_brokers_over_tls_and_mtls() {
    let provider = Provider::start();
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let request = format!("auth:alice:example.com:{alice}");
    let pki = Pki::new();
    let port = free_port();
    let _broker = tls_broker(&provider, &pki, port, false);
    let tls = format!("tls:localhost:{port}");
    assert!(
        Shim::spawn(&tls, 5.0, &["--ca", &pki.path("ca.pem")]).ask(&request),
        "TLS"
    );
    assert!(
        Shim::spawn(
            &format!("tls:127.0.0.1:{port}"),
            5.0,
            &["--ca", &pki.path("ca.pem")]
        )
        .ask(&request),
        "by IP"
    );
    assert!(
        !Shim::spawn(
            &tls,
            2.0,
            &[
                "--ca",
                &pki.path("other-ca.pem"),
                "--connect-timeout",
                "0.5"
            ]
        )
        .ask(&request),
        "untrusted broker"
    );
    assert!(
        !Shim::spawn(
            &format!("tcp:127.0.0.1:{port}"),
            2.0,
            &["--connect-timeout", "0.5"]
        )
        .ask(&request),
        "plaintext to a TLS port"
    );

    let mport = free_port();
    let _mtls = tls_broker(&provider, &pki, mport, true);
    let mtls = format!("tls:localhost:{mport}");
    let client = [
        "--ca",
        &pki.path("ca.pem"),
        "--cert",
        &pki.path("client.pem"),
        "--key",
        &pki.path("client.key"),
    ];
    assert!(
        Shim::spawn(&mtls, 5.0, &client).ask(&request),
        "mTLS with a client certificate"
    );
    assert!(
        !Shim::spawn(
            &mtls,
            2.0,
            &["--ca", &pki.path("ca.pem"), "--connect-timeout", "0.5"]
        )
        .ask(&request),
        "mTLS without one"
    );
    assert_eq!(provider.calls(), 2, "one per broker: they share no cache");
}

#[test]
fn a_slow_loris_is_dropped_at_the_handshake_timeout_without_delaying_anyone() {
    let provider = Provider::start();
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let port = free_port();
    let mut spec = BrokerSpec::new(&provider);
    spec.extra = vec![
        "--listen".into(),
        format!("tcp:127.0.0.1:{port}"),
        "--handshake-timeout".into(),
        "2".into(),
    ];
    let broker = Broker::start(&spec);
    let mut loris = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let started = Instant::now();
    let dripper = std::thread::spawn(move || {
        // One byte a second of a Hello frame that never completes.
        for byte in [0u8, 0, 0, 200, 0, 1, 1, 1, 1, 1] {
            if loris.write_all(&[byte]).is_err() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        started.elapsed()
    });
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    for _ in 0..3 {
        let asked = Instant::now();
        assert!(shim.ask(&format!("auth:alice:example.com:{alice}")));
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "not delayed by the slow peer"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let dropped_after = dripper.join().unwrap();
    assert!(
        dropped_after < Duration::from_secs(6),
        "dropped around the 2 s handshake timeout, not after 10 s: {dropped_after:?}"
    );
}

#[test]
fn no_token_or_client_secret_appears_in_redis_logs_or_metrics() {
    let provider = Provider::start();
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let admin_secret = dir.path().join("admin");
    std::fs::write(&admin_secret, "admin-secret-for-the-scan\n").unwrap();
    let (metrics_port, admin_port) = (free_port(), free_port());
    let (a, b) = (
        Broker::start(&BrokerSpec::new(&provider).with_redis(&redis)),
        {
            let mut spec = BrokerSpec::new(&provider).with_redis(&redis);
            spec.extra = vec![
                "--metrics-listen".into(),
                format!("127.0.0.1:{metrics_port}"),
                "--admin-listen".into(),
                format!("127.0.0.1:{admin_port}"),
                "--admin-secret-file".into(),
                admin_secret.display().to_string(),
            ];
            Broker::start(&spec)
        },
    );
    let tokens: Vec<String> = [
        "good",
        "wrong-user",
        "inactive",
        "expired",
        "never-issued",
        "with:colons",
    ]
    .iter()
    .map(|l| format!("SCAN-{}", token(l)))
    .collect();
    provider.insert(&tokens[0], json!({"username": "alice"}));
    provider.insert(&tokens[1], json!({"username": "bob"}));
    provider.insert(&tokens[2], json!({"active": false}));
    provider.insert(&tokens[3], json!({"username": "alice", "exp": 1}));
    provider.insert(&tokens[5], json!({"username": "alice"}));
    for broker in [&a, &b] {
        let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
        for t in &tokens {
            shim.ask(&format!("auth:alice:example.com:{t}"));
            shim.ask(&format!("setpass:alice:example.com:{t}"));
        }
        shim.ask("isuser:alice:example.com");
    }
    // Revocation with a token, through the admin endpoint.
    let body = format!(
        r#"{{"domain":"example.com","user":"alice","token":"{}"}}"#,
        tokens[0]
    );
    let mut admin = TcpStream::connect(("127.0.0.1", admin_port)).unwrap();
    write!(admin, "POST /revoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer admin-secret-for-the-scan\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut answer = String::new();
    admin.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let mut haystacks = vec![("log A", a.log()), ("log B", b.log())];
    let mut metrics = TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    write!(
        metrics,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    metrics.read_to_string(&mut body).unwrap();
    haystacks.push(("/metrics", body));
    let keys = redis.command(&["KEYS", "*"]).unwrap();
    let mut dump = keys.clone();
    for key in keys.lines().filter(|l| l.starts_with("extauth:")) {
        dump.push_str(&redis.command(&["DUMP", key]).unwrap_or_default());
        dump.push_str(&redis.command(&["GET", key]).unwrap_or_default());
    }
    haystacks.push(("redis", dump));
    assert!(
        haystacks[0].1.contains("provider verdict"),
        "the scan reads real logs"
    );
    for (place, text) in &haystacks {
        for secret in tokens
            .iter()
            .map(String::as_str)
            .chain([CLIENT_SECRET, "admin-secret-for-the-scan"])
        {
            assert!(!text.contains(secret), "{secret:?} found in {place}");
        }
        assert!(!text.contains("SCAN-"), "a token prefix found in {place}");
    }
}

/// Runs the broker binary with `args` and no `EXTAUTH_*` setting but a client secret.
fn broker_output(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(broker_bin());
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("EXTAUTH_")) {
        cmd.env_remove(name);
    }
    cmd.env("EXTAUTH_CLIENT_SECRET", "x")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn passwords_in_configured_urls_appear_in_no_error_or_check_config_output() {
    const PASSWORD: &str = "PASSWORD123";
    let listen = "unix:/tmp/extauth-redact-test.sock";
    // A refused URL: the error names the setting and the URL, its password redacted.
    let refused = broker_output(&[
        "--listen",
        listen,
        "--introspection-url",
        &format!("ftp://u:{PASSWORD}@127.0.0.1/x"),
        "--client-id",
        "c",
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("introspection url must be an http:// or https:// URL")
            && stderr.contains("ftp://u:***@127.0.0.1/x"),
        "{stderr}"
    );
    // An unreachable metrics endpoint: reqwest's error would name the URL.
    let stats = broker_output(&[
        "stats",
        "--metrics-url",
        &format!(
            "http://u:{PASSWORD}@127.0.0.1:{}/metrics?token={PASSWORD}",
            free_port()
        ),
    ]);
    let stats_err = String::from_utf8_lossy(&stats.stderr);
    assert!(!stats.status.success());
    assert!(stats_err.contains("http://u:***@127.0.0.1"), "{stats_err}");
    // check-config prints the whole configuration.
    let dir = tempfile::tempdir().unwrap();
    let cache_secret = dir.path().join("cache");
    std::fs::write(&cache_secret, "c".repeat(32)).unwrap();
    let checked = broker_output(&[
        "check-config",
        "--listen",
        listen,
        "--introspection-url",
        &format!("https://u:{PASSWORD}@127.0.0.1:1/i?access_token={PASSWORD}"),
        "--client-id",
        "c",
        "--redis",
        &format!("redis://:{PASSWORD}@127.0.0.1:1/0"),
        "--cache-secret-file",
        &cache_secret.display().to_string(),
    ]);
    let checked_out = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success() && checked_out.contains("redis://:***@127.0.0.1:1/0"),
        "{checked_out}{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    for (place, text) in [
        ("startup error", stderr.as_ref()),
        ("stats error", stats_err.as_ref()),
        ("check-config", checked_out.as_ref()),
        (
            "check-config stderr",
            &String::from_utf8_lossy(&checked.stderr),
        ),
    ] {
        assert!(
            !text.contains(PASSWORD),
            "{PASSWORD:?} found in {place}: {text}"
        );
    }
}

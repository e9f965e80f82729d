//! The HTTP check front (`--http-listen`) with real processes: the broker binary, a real
//! redis-server, the dev provider, shims, curl for TLS, and a real nginx whose `auth_request`
//! asks the broker before proxying to a small upstream. Every contract of
//! `src/http_front.rs`: MongooseIM / ejabberd-contrib / Prosody `mod_auth_http` (`true`/`false`),
//! Prosody `mod_auth_custom_http` (JSON), nginx `auth_request` (204 + user header / 401 / 403).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use extauth_testkit::faults::{metrics_flags, Metrics};
use extauth_testkit::pki::Pki;
use extauth_testkit::services::{
    broker_bin, free_port, printed, revoke_cli, skip_or_require, token, wait_until, Broker,
    BrokerSpec, Provider, Redis, Shim, CLIENT_ID,
};
use serde_json::json;

const CALLER_SECRET: &str = "caller-secret-7d2a90c4";
/// `base64("mongooseim:caller-secret-7d2a90c4")`: MongooseIM's `basic_auth`.
const BASIC: &str = "Basic bW9uZ29vc2VpbTpjYWxsZXItc2VjcmV0LTdkMmE5MGM0";

/// A broker serving `example.com` only, with the HTTP front (and metrics) on free ports.
struct Front {
    broker: Broker,
    port: u16,
    metrics: u16,
    _dir: tempfile::TempDir,
}

impl Front {
    fn start(provider: &Provider, redis: Option<&Redis>, extra: &[&str]) -> Front {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("http.secret");
        std::fs::write(&secret, format!("{CALLER_SECRET}\n")).unwrap();
        let (port, metrics) = (free_port(), free_port());
        let mut spec = BrokerSpec::new(provider);
        if let Some(redis) = redis {
            spec = spec.with_redis(redis);
        }
        spec.extra = vec![
            "--domain".into(),
            "example.com".into(),
            "--http-listen".into(),
            format!("127.0.0.1:{port}"),
            "--http-secret-file".into(),
            secret.display().to_string(),
        ];
        spec.extra.extend(metrics_flags(metrics));
        spec.extra.extend(extra.iter().map(|s| s.to_string()));
        let broker = Broker::start(&spec);
        wait_until(Duration::from_secs(10), "the HTTP front", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Front {
            broker,
            port,
            metrics,
            _dir: dir,
        }
    }

    fn get(&self, target: &str, headers: &[(&str, &str)]) -> Answer {
        http(self.port, "GET", target, headers, b"")
    }

    fn post(&self, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        http(self.port, "POST", target, headers, body)
    }
}

/// A response: status, lower-cased headers, body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`), read to the end.
fn http(port: u16, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut request =
        format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "POST" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    // A refused body may be cut short by the server: what it answered still counts.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse(&String::from_utf8_lossy(&raw))
}

fn parse(raw: &str) -> Answer {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", percent(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");

#[test]
fn the_xmpp_server_contracts_answer_from_the_same_engine_as_the_shim() {
    let provider = Provider::start();
    let redis = Redis::start();
    let front = Front::start(&provider, Some(&redis), &[]);
    // A token with the characters a query must escape.
    let alice = format!("{}+/=&%", token("alice"));
    let bob = token("bob");
    provider.insert(&alice, json!({"username": "alice"}));
    provider.insert(&bob, json!({"username": "bob"}));
    let auth = [("Authorization", BASIC)];
    let check = |user: &str, server: &str, pass: &str| {
        let query = form(&[("user", user), ("server", server), ("pass", pass)]);
        front.get(&format!("/check_password?{query}"), &auth)
    };

    // MongooseIM and ejabberd-contrib: GET with the query, 200 and the body `true`/`false`.
    let yes = check("alice", "example.com", &alice);
    assert_eq!((yes.status, yes.body.as_str()), (200, "true"), "{yes:?}");
    assert_eq!(
        check("alice", "example.com", &bob).body,
        "false",
        "bob's token for alice"
    );
    assert_eq!(check("alice", "example.com", "never-issued").body, "false");
    let unknown = check("alice", "other.example", &alice);
    assert_eq!((unknown.status, unknown.body.as_str()), (200, "false"));
    assert_eq!(unknown.header("x-extauth-reason"), Some("unknown_domain"));
    assert_eq!(
        provider.calls(),
        3,
        "one call per token: alice's, bob's, never-issued"
    );

    // The shim path shares the verdict: no provider call for alice's token.
    let mut shim = Shim::spawn(&front.broker.addr(), 5.0, &[]);
    assert!(shim.ask(&format!("auth:alice:example.com:{alice}")));
    assert_eq!(
        provider.calls(),
        3,
        "the shim was answered from the front's verdict"
    );

    // Prosody mod_auth_http: POST form to <url>/check_password; user_exists.
    let body = form(&[
        ("user", "alice"),
        ("server", "example.com"),
        ("pass", &alice),
    ]);
    let posted = front.post("/check_password", &[auth[0], FORM], body.as_bytes());
    assert_eq!(
        (posted.status, posted.body.as_str()),
        (200, "true"),
        "{posted:?}"
    );
    let exists = |user: &str| {
        front
            .get(
                &format!("/user_exists?user={user}&server=example.com"),
                &auth,
            )
            .body
    };
    assert_eq!(exists("alice"), "true", "alice logged in: seen");
    assert_eq!(exists("nobody"), "false");

    // Prosody mod_auth_custom_http: JSON POST, body exactly `true`; LuaSocket labels it a form.
    let custom = |user: &str, password: &str| {
        let body = json!({"username": user, "password": password}).to_string();
        front.post(
            "/custom_http/example.com",
            &[auth[0], FORM],
            body.as_bytes(),
        )
    };
    let ok = custom("alice", &alice);
    assert_eq!((ok.status, ok.body.as_str()), (200, "true"), "{ok:?}");
    assert_eq!(custom("alice", &bob).body, "false");

    // Accounts are the provider's; bad requests are 400, oversized bodies 413.
    for method in ["set_password", "register", "remove_user", "get_password"] {
        let body = form(&[("user", "alice"), ("server", "example.com"), ("pass", "x")]);
        let answer = front.post(&format!("/{method}"), &[auth[0], FORM], body.as_bytes());
        assert_eq!(answer.status, 403, "{method}: {answer:?}");
    }
    assert_eq!(front.get("/check_password?user=alice", &auth).status, 400);
    assert_eq!(
        front
            .post(
                "/custom_http/example.com",
                &auth,
                br#"{"username": "alice", "pass"#
            )
            .status,
        400
    );
    let huge = vec![b'a'; 200 * 1024];
    assert_eq!(
        front.post("/custom_http/example.com", &auth, &huge).status,
        413
    );
    assert_eq!(front.get("/nothing", &auth).status, 404);
    for garbage in [&b"\x00\xff\r\n\r\n"[..], b"GET / HTTP/9.9\r\n\r\n", b"GET /check_password?user=%ZZ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer caller-secret-7d2a90c4\r\nConnection: close\r\n\r\n"] {
        let mut stream = TcpStream::connect(("127.0.0.1", front.port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(garbage).unwrap();
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        let answer = parse(&String::from_utf8_lossy(&raw));
        assert!(matches!(answer.status, 400 | 505), "{garbage:?}: {answer:?}");
    }

    // Revocation reaches this front too: the provider now says inactive, and the cached
    // verdict is dropped (without the revocation it would be served until its TTL).
    provider.insert(&alice, json!({"active": false, "username": "alice"}));
    assert_eq!(
        check("alice", "example.com", &alice).body,
        "true",
        "still cached"
    );
    revoke_cli(&redis, &front.broker, "alice", None);
    wait_until(
        Duration::from_secs(3),
        "alice's revocation on the front",
        || check("alice", "example.com", &alice).body == "false",
    );

    // Metrics carry the front; neither the token nor the caller secret is logged.
    let metrics = Metrics::scrape(front.metrics);
    assert!(
        metrics.sum("extauth_requests_total{command=\"auth\",result=\"accepted\",reason=\"accepted\",source=\"l1\",front=\"shim\"}") >= 1.0,
        "{}",
        metrics.0
    );
    assert!(
        metrics
            .series("extauth_requests_total")
            .iter()
            .any(|s| s.contains("front=\"http\"")),
        "{}",
        metrics.0
    );
    let log = front.broker.log();
    for secret in [
        alice.clone(),
        bob.clone(),
        percent(&alice),
        CALLER_SECRET.to_owned(),
    ] {
        assert!(!log.contains(&secret), "the log holds a secret");
    }
    assert!(log.contains("http front request"), "debug access log lines");
}

#[test]
fn callers_need_the_secret_or_a_client_certificate_and_listeners_follow_the_rules() {
    let provider = Provider::start();
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let front = Front::start(&provider, None, &[]);
    let target = format!("/check_password?user=alice&server=example.com&pass={alice}");
    for headers in [
        vec![],
        vec![("Authorization", "Basic bW9uZ29vc2VpbTp3cm9uZw==")],
        vec![("Authorization", "Bearer wrong")],
        vec![("X-Extauth-Caller", "wrong"), ("Authorization", BASIC)],
    ] {
        let answer = front.get(&target, &headers);
        assert_eq!(answer.status, 401, "{headers:?}: {answer:?}");
    }
    let bearer = format!("Bearer {CALLER_SECRET}");
    for headers in [
        vec![("Authorization", BASIC)],
        vec![("Authorization", bearer.as_str())],
        vec![("X-Extauth-Caller", CALLER_SECRET)],
    ] {
        assert_eq!(front.get(&target, &headers).body, "true", "{headers:?}");
    }
    assert_eq!(
        provider.calls(),
        1,
        "refused callers never reached the provider"
    );

    // A peer outside the allow list is closed before it is served.
    let fenced = Front::start(&provider, None, &["--http-allow", "10.0.0.0/8"]);
    let answer = fenced.get(&target, &[("Authorization", BASIC)]);
    assert_eq!(answer.status, 0, "closed without an answer: {answer:?}");

    // Plaintext off loopback is refused at start.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("http.secret");
    std::fs::write(&secret, CALLER_SECRET).unwrap();
    let out = Command::new(broker_bin())
        .args([
            "--listen",
            "tcp:127.0.0.1:0",
            "--introspection-url",
            &provider.url(),
        ])
        .args(["--client-id", CLIENT_ID])
        .env("EXTAUTH_CLIENT_SECRET", "x")
        .args(["--http-listen", &format!("0.0.0.0:{}", free_port())])
        .arg("--http-secret-file")
        .arg(&secret)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let printed = printed(&out);
    assert!(printed.contains("--http-listen"), "{printed}");
    mtls_authenticates_callers(&provider, &alice);
}

/// With --http-tls and --client-ca, a client certificate is the caller's credential.
fn mtls_authenticates_callers(provider: &Provider, alice: &str) {
    if !skip_or_require(
        "EXTAUTH_REQUIRE_NGINX",
        "the mTLS part of the HTTP front test",
        &which(&["curl"]),
    ) {
        return;
    }
    let pki = Pki::new();
    let port = free_port();
    let mut spec = BrokerSpec::new(provider);
    spec.extra = [
        "--domain",
        "example.com",
        "--http-listen",
        &format!("127.0.0.1:{port}"),
        "--http-tls",
        "--tls-cert",
        &pki.path("server.pem"),
        "--tls-key",
        &pki.path("server.key"),
        "--client-ca",
        &pki.path("ca.pem"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _broker = Broker::start(&spec);
    wait_until(Duration::from_secs(10), "the TLS front", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let url = format!(
        "https://localhost:{port}/check_password?user=alice&server=example.com&pass={alice}"
    );
    let curl = |client_cert: bool| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "--cacert", &pki.path("ca.pem")]);
        if client_cert {
            cmd.args([
                "--cert",
                &pki.path("client.pem"),
                "--key",
                &pki.path("client.key"),
            ]);
        }
        cmd.arg(&url).output().unwrap()
    };
    let with = curl(true);
    assert_eq!(
        String::from_utf8_lossy(&with.stdout),
        "true",
        "{}",
        printed(&with)
    );
    let without = curl(false);
    assert!(
        !without.status.success() || String::from_utf8_lossy(&without.stdout) != "true",
        "no client certificate, no answer"
    );
}

fn which(programs: &[&str]) -> Vec<String> {
    programs
        .iter()
        .filter(|p| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {p}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|p| format!("{p} (Debian package {p})"))
        .collect()
}

#[test]
fn nginx_auth_request_lets_only_valid_tokens_reach_the_upstream_with_the_user() {
    let nginx = Path::new("/usr/sbin/nginx");
    let missing = match nginx.exists() {
        true => vec![],
        false => vec!["/usr/sbin/nginx (Debian package nginx)".to_owned()],
    };
    if !skip_or_require(
        "EXTAUTH_REQUIRE_NGINX",
        "the nginx auth_request test",
        &missing,
    ) {
        return;
    }
    let provider = Provider::start();
    let alice = token("alice");
    let bob = token("bob");
    provider.insert(&alice, json!({"username": "alice"}));
    provider.insert(&bob, json!({"username": "bob"}));
    let front = Front::start(&provider, None, &[]);
    let upstream = Upstream::start();
    let proxy = Nginx::start(front.port, upstream.port);

    let ask = |token: Option<&str>, user: &str, domain: &str| {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("X-Extauth-User", user), ("X-Extauth-Domain", domain)];
        if let Some(b) = &bearer {
            headers.push(("Authorization", b.as_str()));
        }
        http(proxy.port, "GET", "/app/inbox", &headers, b"")
    };
    let yes = ask(Some(&alice), "alice", "example.com");
    assert_eq!(yes.status, 200, "{yes:?}\n{}", proxy.log());
    assert!(yes.body.contains("x-jid: alice@example.com"), "{yes:?}");
    assert!(yes.body.contains("GET /app/inbox"), "{yes:?}");
    let seen_before = upstream.requests();
    for (token, user, domain, status) in [
        (Some(bob.as_str()), "alice", "example.com", 401),
        (Some("never-issued"), "alice", "example.com", 401),
        (None, "alice", "example.com", 401),
        (Some(alice.as_str()), "alice", "other.example", 403),
    ] {
        let answer = ask(token, user, domain);
        assert_eq!(answer.status, status, "{user}@{domain}: {answer:?}");
    }
    assert_eq!(
        upstream.requests(),
        seen_before,
        "no refused request reached the upstream"
    );
    // The path form: the user and domain in the auth location's URL.
    let by_path = http(
        proxy.port,
        "GET",
        "/alice/profile",
        &[("Authorization", &format!("Bearer {alice}"))],
        b"",
    );
    assert_eq!(by_path.status, 200, "{by_path:?}\n{}", proxy.log());
    assert!(by_path.body.contains("x-jid: alice@example.com"));
    assert!(
        !front.broker.log().contains(&alice),
        "the log holds a token"
    );
}

/// nginx as an unprivileged user with its own prefix, config and temp paths in a temp dir.
struct Nginx {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Nginx {
    fn start(broker: u16, upstream: u16) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let prefix = dir.path().display().to_string();
        let conf = format!(
            r#"
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location /app/ {{
            auth_request /_extauth;
            auth_request_set $extauth_jid $upstream_http_x_extauth_jid;
            proxy_set_header X-Jid $extauth_jid;
            proxy_set_header Authorization "";
            proxy_pass http://127.0.0.1:{upstream};
        }}
        location /alice/ {{
            auth_request /_extauth_alice;
            auth_request_set $extauth_jid $upstream_http_x_extauth_jid;
            proxy_set_header X-Jid $extauth_jid;
            proxy_set_header Authorization "";
            proxy_pass http://127.0.0.1:{upstream};
        }}
        location = /_extauth {{
            internal;
            proxy_pass http://127.0.0.1:{broker}/auth_request;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Extauth-Caller "{CALLER_SECRET}";
        }}
        location = /_extauth_alice {{
            internal;
            proxy_pass http://127.0.0.1:{broker}/auth_request/example.com/alice;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Extauth-Caller "{CALLER_SECRET}";
        }}
    }}
}}
"#
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let mut cmd = Command::new("/usr/sbin/nginx");
        cmd.args([
            "-p",
            &prefix,
            "-c",
            &format!("{prefix}/nginx.conf"),
            "-e",
            &format!("{prefix}/error.log"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if nix::unistd::Uid::effective().is_root() {
            // Never root: the unprivileged nobody owns the prefix and runs nginx.
            let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
            nix::unistd::chown(dir.path(), Some(nobody.uid), Some(nobody.gid)).unwrap();
            use std::os::unix::process::CommandExt;
            cmd.uid(nobody.uid.as_raw()).gid(nobody.gid.as_raw());
        }
        let child = cmd.spawn().unwrap();
        let nginx = Nginx { child, port, dir };
        wait_until(Duration::from_secs(10), "nginx", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        nginx
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An upstream that answers every request with its request head (lower-cased header names).
struct Upstream {
    port: u16,
    count: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        c.fetch_add(1, Ordering::Relaxed);
                        answer_with_head(stream);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Upstream { port, count, stop }
    }

    fn requests(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn answer_with_head(mut stream: TcpStream) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let body: String = text
        .lines()
        .map(|l| match l.split_once(':') {
            Some((n, v)) => format!("{}:{v}\n", n.to_lowercase()),
            None => format!("{l}\n"),
        })
        .collect();
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

#[test]
fn silent_connections_are_closed_and_the_cap_holds() {
    let provider = Provider::start();
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let front = Front::start(
        &provider,
        None,
        &[
            "--http-max-connections",
            "2",
            "--endpoint-header-timeout",
            "1",
        ],
    );
    // Let the start-up probe's connection go first.
    std::thread::sleep(Duration::from_millis(300));
    let silent: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", front.port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // Over the cap: closed as soon as accepted.
    let over = front.get(
        "/user_exists?user=alice&server=example.com",
        &[("Authorization", BASIC)],
    );
    assert_eq!(over.status, 0, "{over:?}\n{}", front.broker.log());
    // The silent ones are closed at the header timeout, and the front serves again.
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "closed by the broker");
    }
    let target = format!("/check_password?user=alice&server=example.com&pass={alice}");
    assert_eq!(front.get(&target, &[("Authorization", BASIC)]).body, "true");
}

//! A hostile or broken provider against the real broker process: redirects that would carry the
//! token and the client secret to another host, answers too large to hold, plain `http://` off
//! loopback, 2xx pages that vouch for nobody, and refused client credentials. Real broker and
//! shim processes; the provider is wiremock, the development provider, or a raw HTTP server
//! below that streams bodies it never holds.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use extauth_load::services::Rss;
use extauth_testkit::faults::{log_lines, probe, strip_ansi};
use extauth_testkit::mock_idp::Idp;
use extauth_testkit::services::{
    ask_all, broker_bin, printed, shim_bin, token, wait_until, Broker, BrokerSpec, Provider, Shim,
    CLIENT_ID, CLIENT_SECRET,
};
use extauth_testkit::tokens::{public_jwk, sign, Signer};
use serde_json::json;
use tempfile::TempDir;
use wiremock::matchers::{any, path};
use wiremock::{Mock, ResponseTemplate};

const MIB: u64 = 1 << 20;

/// A broker configured by `toml_text` alone, with its directory.
fn broker(toml_text: &str) -> (Broker, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    std::fs::write(&file, toml_text).unwrap();
    (Broker::start(&BrokerSpec::from_config(&file)), dir)
}

fn auth(user: &str, domain: &str, token: &str) -> String {
    format!("auth:{user}:{domain}:{token}")
}

/// `extauth-broker check-config --config FILE` on `toml_text` (plus `args`).
fn check_config(toml_text: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    std::fs::write(&file, toml_text).unwrap();
    Command::new(broker_bin())
        .args([
            "check-config",
            "--listen",
            "unix:/nonexistent/b.sock",
            "--config",
        ])
        .arg(&file)
        .args(args)
        .env("EXTAUTH_CLIENT_SECRET", CLIENT_SECRET)
        .output()
        .unwrap()
}

/// A raw HTTP/1.1 server answering every request `200` with a JSON body of `size` bytes that is
/// generated while it is written (the test never holds it), without `Content-Length`: the body
/// ends when the connection closes, so only a streaming cap can stop a reader. `/jwks` gets a
/// JWK Set with key `rsa-a`, any other path the claims of an active token of alice; both padded.
struct Flood {
    addr: SocketAddr,
    /// Bytes written to each connection so far.
    written: Arc<Mutex<Vec<u64>>>,
}

impl Flood {
    fn start(size: u64) -> Flood {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let written = Arc::new(Mutex::new(Vec::new()));
        let counts = Arc::clone(&written);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counts = Arc::clone(&counts);
                std::thread::spawn(move || flood(stream, size, &counts));
            }
        });
        Flood { addr, written }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn connections(&self) -> usize {
        self.written.lock().unwrap().len()
    }

    fn most_written(&self) -> u64 {
        self.written
            .lock()
            .unwrap()
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

/// Reads one request (head and body, so closing never resets the answer), then streams the
/// answer until `size` bytes or the client hangs up, counting what was written.
fn flood(mut stream: TcpStream, size: u64, counts: &Mutex<Vec<u64>>) {
    let slot = {
        let mut counts = counts.lock().unwrap();
        counts.push(0);
        counts.len() - 1
    };
    let Some(path) = read_request(&mut stream) else {
        return;
    };
    let (prefix, suffix) = match path.as_str() {
        "/jwks" => (
            format!("{{\"keys\":[{}],\"pad\":\"", public_jwk("rsa-a")),
            "\"}",
        ),
        _ => (
            r#"{"active":true,"username":"alice","sub":"alice","pad":""#.to_owned(),
            "\"}",
        ),
    };
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n";
    let pad = size - (prefix.len() + suffix.len()) as u64;
    let chunk = vec![b'x'; 64 * 1024];
    let mut write = |bytes: &[u8]| -> bool {
        let ok = stream.write_all(bytes).is_ok();
        counts.lock().unwrap()[slot] += bytes.len() as u64;
        ok
    };
    if !(write(head.as_bytes()) && write(prefix.as_bytes())) {
        return;
    }
    let mut left = pad;
    while left > 0 {
        let n = left.min(chunk.len() as u64);
        if !write(&chunk[..n as usize]) {
            return;
        }
        left -= n;
    }
    write(suffix.as_bytes());
}

/// The request's path, once its head and its `Content-Length` body are read.
fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).ok()?;
        seen.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    stream.read_exact(&mut vec![0u8; length]).ok()?;
    head.split(' ').nth(1).map(str::to_owned)
}

#[test]
fn a_huge_answer_is_cut_at_the_cap_and_memory_stays_flat() {
    let flood = Flood::start(1 << 30); // 1 GiB per answer
    let (broker, _dir) = broker(&format!(
        "[defaults]\nbreaker = {{ threshold = 100, cooldown = 1 }}\nvalidator = {{ kind = \"introspection\", url = \"{}\", client_id = \"broker\", client_secret = \"s\" }}\n",
        flood.url("/introspect")
    ));
    shim_bin(); // built (if need be) before the clock starts
    let before = Rss::of(broker.pid()).unwrap();
    let logins: Vec<String> = (0..4)
        .map(|i| auth("alice", "example.com", &token(&format!("flood{i}"))))
        .collect();
    let started = Instant::now();
    let answers = ask_all(&broker.addr(), 10.0, &logins);
    let took = started.elapsed();
    let after = Rss::of(broker.pid()).unwrap();
    println!(
        "4 concurrent logins against 1 GiB answers: refused in {took:?}; broker VmRSS {} KiB \
         before, {} KiB after, VmHWM {} KiB; at most {} bytes written to one connection",
        before.now_kib,
        after.now_kib,
        after.peak_kib,
        flood.most_written()
    );
    assert_eq!(answers, vec![false; 4]);
    assert!(
        after.peak_kib < 100 * 1024,
        "the broker's peak RSS reached {} KiB",
        after.peak_kib
    );
    let refused = log_lines(
        &broker.log(),
        &[
            "provider unavailable, refusing",
            "introspection answer larger than 1048576 bytes",
        ],
    );
    assert_eq!(refused.len(), 4, "{}", strip_ansi(&broker.log()));
    assert!(
        flood.most_written() < 64 * MIB,
        "the broker kept reading: {} bytes",
        flood.most_written()
    );
    let why = probe(&broker.addr(), "alice", &token("flood-probe"));
    assert_eq!(why.reason, "upstream_unavailable", "{why:?}");
    assert_eq!(flood.connections(), 5, "every login asked: nothing cached");
}

/// One domain per provider call that reads a body: introspection, userinfo, the site API and
/// the JWKS fetch, all at `flood`.
fn every_kind(flood: &Flood, max_response_bytes: Option<u64>) -> String {
    let cap = max_response_bytes.map_or(String::new(), |b| {
        format!("provider_max_response_bytes = {b}\n")
    });
    format!(
        "{cap}[domains.\"intro.example\"]\nvalidator = {{ kind = \"introspection\", url = \"{}\", client_id = \"c\", client_secret = \"s\" }}\n\
         [domains.\"oidc.example\"]\nvalidator = {{ kind = \"userinfo\", url = \"{}\" }}\n\
         [domains.\"api.example\"]\nvalidator = {{ kind = \"http\", url = \"{}\" }}\n\
         [domains.\"jwt.example\"]\nvalidator = {{ kind = \"jwt\", jwks_url = \"{}\", require = {{ audience = \"xmpp\" }} }}\n",
        flood.url("/introspect"),
        flood.url("/userinfo"),
        flood.url("/api/me"),
        flood.url("/jwks"),
    )
}

#[test]
fn every_provider_answer_is_capped_and_the_cap_is_configurable() {
    // 2 MiB of valid answers: under a 4 MiB cap every one of them logs alice in.
    let flood = Flood::start(2 * MIB);
    let jwt = sign(
        Signer::RsaA,
        Some("rsa-a"),
        &json!({"sub": "alice", "aud": "xmpp", "exp": extauth_testkit::services::now_s() + 600}),
    );
    let logins = |broker: &Broker| -> Vec<bool> {
        let mut shim = Shim::spawn(&broker.addr(), 10.0, &[]);
        [
            auth("alice", "intro.example", &token("big")),
            auth("alice", "oidc.example", &token("big")),
            auth("alice", "api.example", &token("big")),
            auth("alice", "jwt.example", &jwt),
        ]
        .iter()
        .map(|request| shim.ask(request))
        .collect()
    };
    let (capped, _dir) = broker(&every_kind(&flood, None));
    assert_eq!(logins(&capped), vec![false; 4], "over the default 1 MiB");
    let log = capped.log();
    for what in ["introspection", "userinfo", "http validator", "JWKS"] {
        let needle = format!("{what} answer larger than 1048576 bytes");
        assert_eq!(
            log_lines(&log, &["provider unavailable, refusing", &needle]).len(),
            1,
            "{needle}: {}",
            strip_ansi(&log)
        );
    }
    let (roomy, _dir) = broker(&every_kind(&flood, Some(4 * MIB)));
    assert_eq!(logins(&roomy), vec![true; 4], "under a 4 MiB cap");
}

#[test]
fn redirects_are_never_followed_and_nothing_reaches_their_target() {
    let (idp, elsewhere) = (Idp::start(), Idp::start());
    // What the target would answer: a yes for alice, from a host the broker was never told of.
    elsewhere.mount(Mock::given(any()).respond_with(
        ResponseTemplate::new(200).set_body_json(json!({"active": true, "username": "alice"})),
    ));
    let redirect = |from: &str, status: u16, to: &str| {
        Mock::given(path(from))
            .respond_with(ResponseTemplate::new(status).insert_header("location", to))
    };
    idp.mount(redirect(
        "/introspect",
        307,
        &elsewhere.url("/steal?client_secret=leaked"),
    ));
    idp.mount(redirect("/userinfo", 302, &elsewhere.url("/userinfo")));
    let secret = "client-secret-redirect-7f3a";
    let (broker, _dir) = broker(&format!(
        "[domains.\"example.com\"]\nvalidator = {{ kind = \"introspection\", url = \"{}\", client_id = \"broker\", client_secret = \"{secret}\", client_auth = \"client_secret_post\" }}\n\
         [domains.\"oidc.example\"]\nvalidator = {{ kind = \"userinfo\", url = \"{}\" }}\n",
        idp.url("/introspect"),
        idp.url("/userinfo"),
    ));
    let stolen = token("redirected");
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    assert!(!shim.ask(&auth("alice", "example.com", &stolen)));
    assert!(!shim.ask(&auth("alice", "example.com", &stolen)));
    assert!(!shim.ask(&auth("alice", "oidc.example", &stolen)));
    let why = probe(&broker.addr(), "alice", &stolen);
    assert_eq!(why.reason, "upstream_unavailable", "{why:?}");
    let reached: Vec<String> = elsewhere
        .requests()
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r.method,
                r.url,
                String::from_utf8_lossy(&r.body)
            )
        })
        .collect();
    assert!(
        reached.is_empty(),
        "the redirect target was asked: {reached:?}"
    );
    assert_eq!(
        idp.calls("/introspect"),
        3,
        "asked every time: a redirect is never cached"
    );
    let log = broker.log();
    let shown = format!(
        "introspection endpoint {} answered HTTP 307, a redirect to \"{}?...\"",
        idp.url("/introspect"),
        elsewhere.url("/steal")
    );
    assert_eq!(log_lines(&log, &[&shown]).len(), 3, "{}", strip_ansi(&log));
    assert_eq!(
        log_lines(&log, &["userinfo endpoint", "answered HTTP 302"]).len(),
        1
    );
    for never in [secret, stolen.as_str(), "leaked"] {
        assert!(!log.contains(never), "{never} was logged");
    }
}

/// A non-loopback `http://` URL with credentials, for each setting that takes a provider URL.
fn plain_http_configs() -> Vec<(&'static str, String)> {
    let remote = "http://u:PASSWORD123@192.0.2.1:8080";
    let loopback = format!(
        "validator = {{ kind = \"introspection\", url = \"http://127.0.0.1:9/i\", client_id = \"{CLIENT_ID}\" }}"
    );
    vec![
        (
            "introspection url",
            format!("validator = {{ kind = \"introspection\", url = \"{remote}/i\", client_id = \"{CLIENT_ID}\" }}"),
        ),
        (
            "userinfo url",
            format!("validator = {{ kind = \"userinfo\", url = \"{remote}/userinfo\" }}"),
        ),
        (
            "http validator url",
            format!("validator = {{ kind = \"http\", url = \"{remote}/users/{{user}}\", json_pointer = \"/ok\", json_equals = true }}"),
        ),
        (
            "jwks_url",
            format!("validator = {{ kind = \"jwt\", jwks_url = \"{remote}/jwks\", require = {{ audience = \"xmpp\" }} }}"),
        ),
        (
            "directory url",
            format!("{loopback}\nisuser = \"directory\"\ndirectory = {{ url = \"{remote}/users/{{user}}\" }}"),
        ),
    ]
}

#[test]
fn plain_http_off_loopback_is_refused_unless_allowed() {
    for (setting, table) in plain_http_configs() {
        let refused = check_config(&format!("[defaults]\n{table}\n"), &[]);
        let said = printed(&refused);
        assert!(!refused.status.success(), "{setting}: {said}");
        assert!(
            said.contains(&format!("{setting} \"http://u:***@192.0.2.1:8080/")),
            "{setting}: {said}"
        );
        assert!(said.contains("insecure_provider_http"), "{said}");
        assert!(!said.contains("PASSWORD123"), "{said}");
        let allowed = check_config(
            &format!("insecure_provider_http = true\n[defaults]\n{table}\n"),
            &[],
        );
        assert!(allowed.status.success(), "{setting}: {}", printed(&allowed));
    }
    let flag = check_config(
        "",
        &[
            "--introspection-url",
            "http://idp.example/introspect",
            "--client-id",
            CLIENT_ID,
        ],
    );
    assert!(!flag.status.success(), "{}", printed(&flag));
    let flag = check_config(
        "",
        &[
            "--introspection-url",
            "http://idp.example/introspect",
            "--client-id",
            CLIENT_ID,
            "--insecure-provider-http",
        ],
    );
    assert!(flag.status.success(), "{}", printed(&flag));
    // `run` refuses to start, with the same message.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    std::fs::write(
        &file,
        format!("[defaults]\n{}\n", plain_http_configs()[0].1),
    )
    .unwrap();
    let run = Command::new(broker_bin())
        .arg("--listen")
        .arg(format!("unix:{}", dir.path().join("b.sock").display()))
        .arg("--config")
        .arg(&file)
        .env("EXTAUTH_CLIENT_SECRET", CLIENT_SECRET)
        .output()
        .unwrap();
    assert!(!run.status.success(), "{}", printed(&run));
    assert!(
        printed(&run).contains("introspection url \"http://u:***@192.0.2.1:8080/i\": http://"),
        "{}",
        printed(&run)
    );
}

#[test]
fn a_reload_to_plain_http_off_loopback_is_refused_and_the_running_one_stays() {
    let provider = Provider::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    let config = |url: &str| {
        format!("[defaults]\nvalidator = {{ kind = \"introspection\", url = \"{url}\", client_id = \"{CLIENT_ID}\", client_secret = \"{CLIENT_SECRET}\" }}\n")
    };
    std::fs::write(&file, config(&provider.url())).unwrap();
    let broker = Broker::start(&BrokerSpec::from_config(&file));
    std::fs::write(&file, config("http://192.0.2.1/introspect")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(broker.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_until(Duration::from_secs(10), "the reload refused", || {
        !log_lines(&broker.log(), &["configuration refused"]).is_empty()
    });
    let refused = log_lines(&broker.log(), &["configuration refused"]).join("\n");
    assert!(
        refused.contains("introspection url \"http://192.0.2.1/introspect\": http://"),
        "{refused}"
    );
    let fresh = token("after-reload");
    provider.insert(&fresh, json!({"username": "alice"}));
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    assert!(
        shim.ask(&auth("alice", "example.com", &fresh)),
        "the running provider still answers"
    );
}

#[test]
fn a_site_api_status_alone_never_vouches_for_a_user() {
    let idp = Idp::start();
    let refused = check_config(
        &format!(
            "[defaults]\nvalidator = {{ kind = \"http\", url = \"{}\" }}\n",
            idp.url("/users/{user}")
        ),
        &[],
    );
    let said = printed(&refused);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("json_pointer") && said.contains("trust_status = true"),
        "{said}"
    );
    // A maintenance page answered with 200 to every call.
    idp.mount(Mock::given(any()).respond_with(
        ResponseTemplate::new(200).set_body_raw("<html>Down for maintenance</html>", "text/html"),
    ));
    let (broker, _dir) = broker(&format!(
        "[domains.\"ruled.example\"]\nvalidator = {{ kind = \"http\", url = \"{}\", json_pointer = \"/valid\", json_equals = true }}\n\
         [domains.\"claims.example\"]\nvalidator = {{ kind = \"http\", url = \"{}\" }}\n",
        idp.url("/ruled/{user}"),
        idp.url("/me"),
    ));
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    for domain in ["ruled.example", "claims.example"] {
        let page = token("maintenance");
        assert!(!shim.ask(&auth("alice", domain, &page)), "{domain}");
        assert!(!shim.ask(&auth("alice", domain, &page)), "{domain}");
    }
    assert_eq!(
        (idp.calls("/ruled/alice"), idp.calls("/me")),
        (2, 2),
        "asked every time: a page is no answer, never a cached verdict"
    );
    let log = broker.log();
    for why in [
        "http validator answer is not JSON",
        "http validator answer is not a JSON object",
    ] {
        assert_eq!(
            log_lines(&log, &["provider unavailable, refusing", why]).len(),
            2,
            "{why}: {}",
            strip_ansi(&log)
        );
    }
}

#[test]
fn trusting_the_status_is_said_at_start_up_and_on_every_reload() {
    let idp = Idp::start();
    idp.mount(Mock::given(path("/users/alice")).respond_with(ResponseTemplate::new(204)));
    let (broker, _dir) = broker(&format!(
        "[defaults]\nvalidator = {{ kind = \"http\", url = \"{}\", trust_status = true }}\n",
        idp.url("/users/{user}")
    ));
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    assert!(shim.ask(&auth("alice", "example.com", &token("trusted"))));
    let warnings = || log_lines(&broker.log(), &["WARN", "trust_status = true"]).len();
    assert_eq!(warnings(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(broker.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_until(Duration::from_secs(10), "the warning again", || {
        warnings() == 2
    });
}

/// Logins of alice with fresh tokens the provider knows, each refused; returns the broker's log.
fn refused_logins(provider: &Provider, broker: &Broker, n: usize) -> String {
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    for i in 0..n {
        let fresh = token(&format!("creds{i}"));
        provider.insert(&fresh, json!({"username": "alice"}));
        assert!(!shim.ask(&auth("alice", "example.com", &fresh)));
    }
    let why = probe(&broker.addr(), "alice", &token("creds-probe"));
    assert_eq!(why.reason, "upstream_unavailable", "{why:?}");
    broker.log()
}

#[test]
fn refused_client_credentials_are_unavailable_and_said_once_a_minute() {
    let provider = Provider::start();
    let config = |secret: &str| {
        format!(
            "[defaults]\nbreaker = {{ threshold = 100, cooldown = 1 }}\nvalidator = {{ kind = \"introspection\", url = \"{}\", client_id = \"{CLIENT_ID}\", client_secret = \"{secret}\" }}\n",
            provider.url()
        )
    };
    // A wrong client secret: the development provider answers 401.
    let wrong = "not-the-client-secret-9a7c";
    let (refusing, _dir) = broker(&config(wrong));
    let log = refused_logins(&provider, &refusing, 6);
    assert_eq!(provider.calls(), 7, "asked every time: nothing cached");
    let explained = log_lines(
        &log,
        &[
            "WARN",
            "refused the broker's own client credentials (HTTP 401)",
            "check client_id, the client secret and client_auth",
            &format!("client_id={CLIENT_ID}"),
        ],
    );
    assert_eq!(explained.len(), 1, "{}", strip_ansi(&log));
    assert_eq!(
        log_lines(
            &log,
            &["refusing: introspection endpoint refused the broker's client credentials (HTTP 401)"]
        )
        .len(),
        7
    );
    assert!(!log.contains(wrong), "the secret was logged");
    // django-oauth-toolkit answers 403 instead.
    provider.set_fail_status(403);
    let (forbidden, _dir) = broker(&config(CLIENT_SECRET));
    let log = refused_logins(&provider, &forbidden, 3);
    assert_eq!(
        log_lines(
            &log,
            &[
                "WARN",
                "refused the broker's own client credentials (HTTP 403)"
            ]
        )
        .len(),
        1,
        "{}",
        strip_ansi(&log)
    );
}

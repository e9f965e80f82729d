//! Revocation: `extauth-broker revoke` and `POST /revoke` drop cached verdicts on every broker.

use extauth_testkit::faults::{http, Metrics};
use std::time::Duration;

use extauth_testkit::services::{
    free_port, revoke_cli, token, wait_until, Broker, BrokerSpec, Provider, Redis, Shim,
};
use serde_json::json;

/// Gives alice two valid tokens, logs in with both through a shim on each broker, and checks
/// that cost one provider call per token. Returns the two shims.
fn cached_on_both(provider: &Provider, a: &Broker, b: &Broker, tokens: [&str; 2]) -> (Shim, Shim) {
    let (mut via_a, mut via_b) = (
        Shim::spawn(&a.addr(), 5.0, &[]),
        Shim::spawn(&b.addr(), 5.0, &[]),
    );
    for t in tokens {
        provider.insert(t, json!({"username": "alice"}));
    }
    for shim in [&mut via_a, &mut via_b] {
        for t in tokens {
            assert!(shim.ask(&format!("auth:alice:example.com:{t}")));
        }
    }
    assert_eq!(provider.calls(), 2, "cached everywhere");
    (via_a, via_b)
}

#[test]
fn revoking_a_user_makes_every_broker_ask_the_provider_again() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let spec = BrokerSpec::new(&provider).with_redis(&redis);
    let (a, b) = (Broker::start(&spec), Broker::start(&spec));
    let (phone, laptop) = (token("phone"), token("laptop"));
    let (mut via_a, mut via_b) = cached_on_both(&provider, &a, &b, [&phone, &laptop]);

    // The provider now refuses the phone's token; alice's verdicts are revoked (user "Alice"
    // is normalised as ejabberd would).
    provider.insert(&phone, json!({"active": false}));
    let printed = revoke_cli(&redis, &a, "Alice", None);
    assert!(
        printed.contains("every verdict of Alice@example.com"),
        "{printed}"
    );
    // The contract: every broker drops its copies within 1 s.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert!(
        !via_b.ask(&format!("auth:alice:example.com:{phone}")),
        "broker B asks again and gets the new answer"
    );
    assert_eq!(provider.calls(), 3);
    assert!(
        !via_a.ask(&format!("auth:alice:example.com:{phone}")),
        "broker A: the new verdict, shared"
    );
    assert!(
        via_a.ask(&format!("auth:alice:example.com:{laptop}")),
        "the laptop's token is re-validated too"
    );
    assert_eq!(provider.calls(), 4);
    assert!(via_b.ask(&format!("auth:alice:example.com:{laptop}")));
    assert_eq!(provider.calls(), 4);
}

#[test]
fn revoking_one_token_leaves_the_users_other_tokens_cached() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let spec = BrokerSpec::new(&provider).with_redis(&redis);
    let (a, b) = (Broker::start(&spec), Broker::start(&spec));
    let (stolen, kept) = (token("stolen"), token("kept"));
    let (mut via_a, mut via_b) = cached_on_both(&provider, &a, &b, [&stolen, &kept]);
    provider.insert(&stolen, json!({"active": false}));
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{stolen}\n")).unwrap();
    let printed = revoke_cli(&redis, &b, "alice", Some(&token_file));
    assert!(
        printed.contains("one token") && !printed.contains(&stolen),
        "{printed}"
    );
    // The contract: every broker drops its copies within 1 s.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert!(
        !via_a.ask(&format!("auth:alice:example.com:{stolen}")),
        "broker A dropped its copy"
    );
    assert_eq!(provider.calls(), 3);
    assert!(!via_b.ask(&format!("auth:alice:example.com:{stolen}")));
    assert!(
        via_a.ask(&format!("auth:alice:example.com:{kept}"))
            && via_b.ask(&format!("auth:alice:example.com:{kept}"))
    );
    assert_eq!(provider.calls(), 3, "the other token stayed cached");
}

#[test]
fn the_admin_endpoint_revokes_and_refuses_strangers() {
    let provider = Provider::start();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("admin.secret");
    std::fs::write(&secret_file, "admin-secret-7d1c\n").unwrap();
    let port = free_port();
    let mut spec = BrokerSpec::new(&provider);
    spec.extra = vec![
        "--admin-listen".into(),
        format!("127.0.0.1:{port}"),
        "--admin-secret-file".into(),
        secret_file.display().to_string(),
    ];
    // Without Redis: the endpoint revokes this broker's in-process verdicts.
    let broker = Broker::start(&spec);
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    assert!(shim.ask(&format!("auth:alice:example.com:{alice}")));
    assert!(shim.ask(&format!("auth:alice:example.com:{alice}")));
    assert_eq!(provider.calls(), 1);

    let body = r#"{"domain": "example.com", "user": "alice"}"#;
    assert_eq!(http(port, "POST", "/revoke", None, body).0, 401);
    assert_eq!(
        http(port, "POST", "/revoke", Some("admin-secret-7d1"), body).0,
        401
    );
    assert_eq!(
        http(
            port,
            "POST",
            "/revoke",
            Some("admin-secret-7d1c"),
            "{\"user\": 1}"
        )
        .0,
        400
    );
    assert_eq!(
        http(
            port,
            "POST",
            "/revoke",
            Some("admin-secret-7d1c"),
            r#"{"domain": "example.com", "user": "a b"}"#
        )
        .0,
        400
    );
    assert_eq!(provider.calls(), 1, "refused calls revoked nothing");
    assert!(shim.ask(&format!("auth:alice:example.com:{alice}")));
    assert_eq!(provider.calls(), 1);

    let (status, answer) = http(port, "POST", "/revoke", Some("admin-secret-7d1c"), body);
    assert_eq!(
        (status, answer.contains("\"revoked\":\"user\"")),
        (200, true),
        "{answer}"
    );
    provider.insert(&alice, json!({"active": false}));
    assert!(
        !shim.ask(&format!("auth:alice:example.com:{alice}")),
        "the provider's new answer"
    );
    assert_eq!(provider.calls(), 2);

    let token_body = format!(r#"{{"domain": "example.com", "user": "alice", "token": "{alice}"}}"#);
    let (status, answer) = http(
        port,
        "POST",
        "/revoke",
        Some("admin-secret-7d1c"),
        &token_body,
    );
    assert_eq!(
        (status, answer.contains("\"revoked\":\"token\"")),
        (200, true),
        "{answer}"
    );
    assert!(!broker.log().contains(&alice), "no token in the log");
}

/// A broker whose subscription was down while a user was revoked never got the hint: it must
/// drop its in-process verdicts once it is subscribed again, and ask the provider afresh.
/// The subscription is kept down by an ACL that forbids SUBSCRIBE to the brokers' Redis user.
#[test]
fn a_broker_back_on_the_revocation_channel_forgets_what_it_may_have_missed() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let broker = Broker::start(&BrokerSpec::new(&provider).with_redis(&redis));
    let phone = token("phone");
    provider.insert(&phone, json!({"username": "alice"}));
    let login = format!("auth:alice:example.com:{phone}");
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    assert!(shim.ask(&login));
    assert_eq!(provider.calls(), 1);

    redis
        .command(&["ACL", "SETUSER", "default", "-subscribe", "-psubscribe"])
        .unwrap();
    redis
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the broker to lose its subscription",
        || numsub(&redis) == 0 && broker.log().contains("revocation channel unavailable"),
    );
    // Revoked while the broker cannot hear it: its L1 still answers (the documented gap).
    revoke_cli(&redis, &broker, "alice", None);
    assert!(shim.ask(&login), "served from L1: the hint was missed");
    assert_eq!(provider.calls(), 1);

    redis
        .command(&["ACL", "SETUSER", "default", "+subscribe", "+psubscribe"])
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the broker to subscribe again",
        || broker.log().contains("revocation channel back"),
    );
    assert!(shim.ask(&login), "the provider still vouches for the token");
    assert_eq!(
        provider.calls(),
        2,
        "L1 dropped: the provider was asked again"
    );
}

/// Brokers subscribed to the hint channel, as Redis counts them.
fn numsub(redis: &Redis) -> u64 {
    let out = redis
        .command(&["PUBSUB", "NUMSUB", "extauth:v2:hints"])
        .unwrap();
    // RESP: *2, $16, the channel, :N
    out.lines()
        .last()
        .and_then(|n| n.strip_prefix(':')?.parse().ok())
        .unwrap_or(u64::MAX)
}

/// A stand-in for ejabberd's `mod_http_api` on loopback: answers every request with `status`
/// and body `1`, and keeps each request (head and body) for the test to read.
struct FakeApi {
    port: u16,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeApi {
    fn start(status: u16) -> FakeApi {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream);
                let (mut head, mut length) = (String::new(), 0usize);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                kept.lock()
                    .unwrap()
                    .push(format!("{head}\r\n{}", String::from_utf8_lossy(&body)));
                let _ = write!(
                    reader.get_mut(),
                    "HTTP/1.1 {status} X\r\nContent-Length: 1\r\nConnection: close\r\n\r\n1"
                );
            }
        });
        FakeApi { port, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// A broker with the admin and metrics endpoints and `[on_revoke] kick` posting to `url`.
fn broker_with_kick(provider: &Provider, dir: &std::path::Path, url: &str) -> (Broker, u16, u16) {
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        format!("[on_revoke]\nkick = {{ kind = \"http_api\", url = \"{url}\", timeout = 2 }}\n"),
    )
    .unwrap();
    let secret_file = dir.join("admin.secret");
    std::fs::write(&secret_file, "admin-secret-7d1c\n").unwrap();
    let (admin, metrics) = (free_port(), free_port());
    let mut spec = BrokerSpec::new(provider);
    spec.config = Some(config);
    spec.extra = vec![
        "--admin-listen".into(),
        format!("127.0.0.1:{admin}"),
        "--admin-secret-file".into(),
        secret_file.display().to_string(),
        "--metrics-listen".into(),
        format!("127.0.0.1:{metrics}"),
    ];
    (Broker::start(&spec), admin, metrics)
}

/// `POST /revoke` on a broker with the kick hook: a user revocation kicks once through the API
/// (credentials from the URL sent as HTTP Basic, never logged), a token revocation says it
/// cannot kick, and a failing API turns the answer into 502 while the revocation stands; both
/// outcomes are counted.
#[test]
fn the_admin_endpoint_kicks_a_revoked_user_and_reports_a_failed_kick() {
    let provider = Provider::start();
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::start(200);
    let url = format!(
        "http://admin%40example.com:kick-pw-93b1@127.0.0.1:{}/api/kick_user",
        api.port
    );
    let (broker, admin, metrics) = broker_with_kick(&provider, dir.path(), &url);
    let user_body = r#"{"domain": "example.com", "user": "Alice"}"#;
    let (status, answer) = http(
        admin,
        "POST",
        "/revoke",
        Some("admin-secret-7d1c"),
        user_body,
    );
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer.contains(r#""kick":{"outcome":"kicked","sessions":1}"#),
        "{answer}"
    );
    let requests = api.requests();
    assert_eq!(requests.len(), 1, "one kick per revocation: {requests:?}");
    let request = &requests[0];
    assert!(
        request.starts_with("POST /api/kick_user HTTP/1.1"),
        "{request}"
    );
    assert!(
        request.ends_with(r#"{"host":"example.com","user":"alice"}"#),
        "the normalised JID: {request}"
    );
    // admin@example.com:kick-pw-93b1, base64.
    assert!(
        request.contains("authorization: Basic YWRtaW5AZXhhbXBsZS5jb206a2ljay1wdy05M2Ix"),
        "{request}"
    );

    let token_body = r#"{"domain": "example.com", "user": "alice", "token": "t-1"}"#;
    let (status, answer) = http(
        admin,
        "POST",
        "/revoke",
        Some("admin-secret-7d1c"),
        token_body,
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains(r#""outcome":"not_for_token""#), "{answer}");
    assert_eq!(api.requests().len(), 1, "a token revocation kicks nobody");

    let scrape = Metrics::scrape(metrics);
    assert_eq!(scrape.sum(r#"extauth_kicks_total{outcome="kicked"}"#), 1.0);
    assert!(
        !broker.log().contains("kick-pw-93b1"),
        "no password in the log"
    );

    // ejabberd refuses (403): revoked all the same, reported as a failed kick.
    let refusing = FakeApi::start(403);
    let dir2 = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}/api/kick_user", refusing.port);
    let (broker2, admin2, metrics2) = broker_with_kick(&provider, dir2.path(), &url);
    let (status, answer) = http(
        admin2,
        "POST",
        "/revoke",
        Some("admin-secret-7d1c"),
        user_body,
    );
    assert_eq!(status, 502, "{answer}");
    assert!(
        answer.contains(r#""revoked":"user""#)
            && answer.contains(r#""outcome":"failed""#)
            && answer.contains("the revocation stands")
            && answer.contains("HTTP 403"),
        "{answer}"
    );
    let scrape = Metrics::scrape(metrics2);
    assert_eq!(scrape.sum(r#"extauth_kicks_total{outcome="failed"}"#), 1.0);
    assert!(broker2.log().contains("kick_user failed"));
}

//! Revocation: `extauth-broker revoke` and `POST /revoke` drop cached verdicts on every broker.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use common::services::{broker_bin, free_port, token, Broker, BrokerSpec, Provider, Redis, Shim};
use serde_json::json;

/// Runs `extauth-broker revoke` against `broker`'s Redis and cache secret.
fn revoke_cli(
    redis: &Redis,
    broker: &Broker,
    user: &str,
    token_file: Option<&std::path::Path>,
) -> String {
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
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "revoke failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

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

/// Sends one HTTP/1.1 request and returns (status, body).
fn http(port: u16, method: &str, path: &str, auth: Option<&str>, body: &str) -> (u16, String) {
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

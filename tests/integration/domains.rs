//! Per-domain (vhost) configuration: validators, claim binding, isuser policies, stale_if_error
//! and the circuit breaker, through the real broker and shim.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use extauth_testkit::services::{now_s, token, Broker, BrokerSpec, Provider, Redis, Shim};
use extauth_testkit::wire_client::{auth, connect};
use serde_json::json;

/// A spec whose `--config` file is `toml`, written in the returned directory (the flags still
/// name `provider` as the default validator).
fn spec_with_config<'a>(provider: &'a Provider, toml: &str) -> (BrokerSpec<'a>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, toml).unwrap();
    let mut spec = BrokerSpec::new(provider);
    spec.extra = vec!["--config".into(), path.display().to_string()];
    (spec, dir)
}

/// Starts a broker as [`spec_with_config`] describes it.
fn broker_with_config(provider: &Provider, toml: &str) -> (Broker, tempfile::TempDir) {
    let (spec, dir) = spec_with_config(provider, toml);
    (Broker::start(&spec), dir)
}

#[test]
fn each_domain_uses_its_own_validator_and_claim_and_others_are_unknown() {
    let (chat, corp) = (Provider::start(), Provider::start());
    let config = format!(
        r#"
        [domains."chat.example"]
        subject_claim = "preferred_username"
        [domains."corp.example"]
        jid_claim = "jid"
        validator = {{ kind = "introspection", url = "{}", client_id = "test-broker", client_auth = "client_secret_basic", require = {{ scopes = ["xmpp"] }} }}
        "#,
        corp.url()
    );
    let (broker, _dir) = broker_with_config(&chat, &config);
    let (alice_chat, alice_corp, no_scope) = (token("chat"), token("corp"), token("noscope"));
    chat.insert(
        &alice_chat,
        json!({"preferred_username": "alice", "username": "someone-else"}),
    );
    corp.insert(
        &alice_corp,
        json!({"jid": "alice@corp.example", "scope": "openid xmpp"}),
    );
    corp.insert(
        &no_scope,
        json!({"jid": "alice@corp.example", "scope": "openid"}),
    );
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    assert!(shim.ask(&format!("auth:alice:chat.example:{alice_chat}")));
    assert!(shim.ask(&format!("auth:alice:corp.example:{alice_corp}")));
    assert!(
        !shim.ask(&format!("auth:alice:corp.example:{alice_chat}")),
        "a chat token at corp"
    );
    assert!(
        !shim.ask(&format!("auth:alice:chat.example:{alice_corp}")),
        "a corp token at chat"
    );
    assert!(
        !shim.ask(&format!("auth:alice:corp.example:{no_scope}")),
        "missing the required scope"
    );
    let (chat_calls, corp_calls) = (chat.calls(), corp.calls());
    assert_eq!((chat_calls, corp_calls), (2, 3));
    assert!(
        !shim.ask(&format!("auth:alice:elsewhere.example:{alice_chat}")),
        "unknown domain"
    );
    assert!(!shim.ask("isuser:alice:elsewhere.example"));
    assert_eq!(
        (chat.calls(), corp.calls()),
        (chat_calls, corp_calls),
        "no provider call for an unknown domain"
    );
    assert!(
        broker.log().contains("domain not served"),
        "unknown_domain is logged"
    );
}

/// A user directory: `GET /users/{jid}` answers 200 for `known` users, 404 otherwise, or
/// `status` when it is set (to simulate an outage).
struct DirectoryMock {
    addr: SocketAddr,
    calls: Arc<AtomicU64>,
    status: Arc<AtomicU16>,
    _rt: tokio::runtime::Runtime,
}

impl DirectoryMock {
    fn start(known: &'static [&'static str]) -> DirectoryMock {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (calls, status) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU16::new(0)));
        let state = (known, calls.clone(), status.clone());
        let app = Router::new()
            .route(
                "/users/{jid}",
                get(
                    |State((known, calls, status)): State<(
                        &'static [&'static str],
                        Arc<AtomicU64>,
                        Arc<AtomicU16>,
                    )>,
                     Path(jid): Path<String>| async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        match status.load(Ordering::SeqCst) {
                            0 if known.contains(&jid.as_str()) => StatusCode::OK,
                            0 => StatusCode::NOT_FOUND,
                            s => StatusCode::from_u16(s).unwrap(),
                        }
                    },
                ),
            )
            .with_state(state);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move { axum::serve(listener, app).await });
        DirectoryMock {
            addr,
            calls,
            status,
            _rt: rt,
        }
    }
}

#[test]
fn isuser_policies_directory_seen_always_never() {
    let provider = Provider::start();
    let directory = DirectoryMock::start(&["offline@dir.example"]);
    let config = format!(
        r#"
        [domains."dir.example"]
        isuser = "directory"
        directory = {{ url = "http://{}/users/{{user}}@{{domain}}", ttl = 60 }}
        [domains."seen.example"]
        [domains."open.example"]
        isuser = "always"
        [domains."closed.example"]
        isuser = "never"
        "#,
        directory.addr
    );
    let (broker, _dir) = broker_with_config(&provider, &config);
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    assert!(
        shim.ask("isuser:offline:dir.example"),
        "existing offline user: 1 via the directory"
    );
    assert!(!shim.ask("isuser:nobody:dir.example"), "unknown: 0");
    assert!(shim.ask("isuser:offline:dir.example"), "cached");
    assert_eq!(directory.calls.load(Ordering::SeqCst), 2);

    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    assert!(shim.ask(&format!("auth:alice:dir.example:{alice}")));
    directory.status.store(503, Ordering::SeqCst);
    assert!(
        shim.ask("isuser:alice:dir.example"),
        "directory down: the seen set answers"
    );
    assert!(
        !shim.ask("isuser:ghost:dir.example"),
        "directory down, never seen: 0"
    );
    assert!(
        !shim.ask("isuser:ghost:dir.example"),
        "and the failure was not cached"
    );
    assert_eq!(directory.calls.load(Ordering::SeqCst), 5);

    assert!(!shim.ask("isuser:bob:seen.example"));
    assert!(shim.ask("isuser:anyone:open.example"));
    assert!(!shim.ask("isuser:anyone:closed.example"));
}

#[test]
fn stale_if_error_serves_cached_logins_while_the_provider_is_down_but_never_past_exp() {
    let provider = Provider::start();
    let config = r#"
        [domains."example.com"]
        max_ttl = 1
        stale_if_error = 60
        breaker = { threshold = 100, cooldown = 1 }
    "#;
    let (broker, _dir) = broker_with_config(&provider, config);
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    let (long, short, unseen) = (token("long"), token("short"), token("unseen"));
    provider.insert(&long, json!({"username": "alice"}));
    provider.insert(&unseen, json!({"username": "alice"}));
    assert!(shim.ask(&format!("auth:alice:example.com:{long}")));
    let exp = now_s() + 3;
    provider.insert(&short, json!({"username": "alice", "exp": exp}));
    assert!(shim.ask(&format!("auth:alice:example.com:{short}")));
    provider.set_fail_status(503);
    while now_s() <= exp {
        std::thread::sleep(Duration::from_millis(100));
    }
    let calls = provider.calls();
    assert!(
        shim.ask(&format!("auth:alice:example.com:{long}")),
        "stale but usable"
    );
    assert!(
        !shim.ask(&format!("auth:alice:example.com:{short}")),
        "never past exp"
    );
    assert!(
        !shim.ask(&format!("auth:alice:example.com:{unseen}")),
        "nothing cached: fail closed"
    );
    assert_eq!(
        provider.calls(),
        calls + 3,
        "each stale entry is re-validated first"
    );
    assert!(broker.log().contains("serving a stale verdict"));
}

/// `stale_if_error` is for provider outages only. A verdict Redis still holds within that grace,
/// past its TTL, must not pass for fresh on a broker that never saw the token: with the provider
/// up, that broker asks it and follows its answer. Nor may the stale copy in the first broker's
/// own L1: it takes the fresh refusal instead. Guards against a stale-but-usable verdict (from
/// Redis or L1) being served as fresh, which would keep a token the provider has deactivated
/// working for `stale_if_error` longer.
#[test]
fn a_stale_verdict_in_redis_is_not_served_while_the_provider_answers() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let config = r#"
        [domains."example.com"]
        max_ttl = 1
        stale_if_error = 60
    "#;
    let (spec, _dir) = spec_with_config(&provider, config);
    let spec = spec.with_redis(&redis);
    let (a, b) = (Broker::start(&spec), Broker::start(&spec));
    let revoked = token("revoked");
    provider.insert(&revoked, json!({"username": "alice"}));
    let login = format!("auth:alice:example.com:{revoked}");
    assert!(Shim::spawn(&a.addr(), 5.0, &[]).ask(&login));
    assert_eq!(provider.calls(), 1);
    // Past max_ttl (1 s), well within stale_if_error: the verdict is stale but still usable.
    std::thread::sleep(Duration::from_millis(1500));
    provider.insert(&revoked, json!({"active": false}));
    assert!(
        !Shim::spawn(&b.addr(), 5.0, &[]).ask(&login),
        "broker B asked the provider, which says inactive"
    );
    assert_eq!(provider.calls(), 2, "broker B made the call");
    assert!(
        !Shim::spawn(&a.addr(), 5.0, &[]).ask(&login),
        "broker A does not serve its stale copy either"
    );
    assert_eq!(provider.calls(), 2, "broker A took B's refusal from Redis");
}

/// A half-open probe slower than the request's deadline is cut (its future dropped). It must count
/// as a failure and free the probe slot; before the fix the slot stayed taken and every uncached
/// login was refused until a restart.
#[test]
fn a_probe_cut_at_the_deadline_does_not_keep_the_circuit_open() {
    let provider = Provider::start();
    let config = r#"
        [defaults]
        breaker = { threshold = 2, cooldown = 1 }
    "#;
    let (broker, _dir) = broker_with_config(&provider, config);
    let mut shim = Shim::spawn(&broker.addr(), 1.0, &[]);
    provider.set_fail_status(503);
    for i in 0..2 {
        assert!(!shim.ask(&format!("auth:alice:example.com:fail-{i}")));
    }
    assert_eq!(provider.calls(), 2, "open after 2 failures");
    std::thread::sleep(Duration::from_millis(1100));
    provider.set_fail_status(0);
    provider.set_latency(Duration::from_secs(3));
    assert!(
        !shim.ask("auth:alice:example.com:slow-probe"),
        "the probe answers after the shim's 1 s deadline"
    );
    assert_eq!(provider.calls(), 3, "the probe reached the provider");
    provider.set_latency(Duration::ZERO);
    let fresh = token("fresh");
    provider.insert(&fresh, json!({"username": "alice"}));
    // Within the cooldown that the abandoned probe started, then one provider call.
    std::thread::sleep(Duration::from_millis(1100));
    assert!(
        shim.ask(&format!("auth:alice:example.com:{fresh}")),
        "the next probe goes through: the circuit closes without a SIGHUP"
    );
    assert_eq!(provider.calls(), 4);
    assert!(broker.log().contains("circuit probe abandoned"));
}

#[test]
fn the_circuit_breaker_fails_fast_then_probes() {
    let provider = Provider::start();
    let config = r#"
        [defaults]
        breaker = { threshold = 3, cooldown = 1 }
    "#;
    let (broker, _dir) = broker_with_config(&provider, config);
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    let cached = token("cached");
    provider.insert(&cached, json!({"username": "alice"}));
    assert!(shim.ask(&format!("auth:alice:example.com:{cached}")));
    provider.set_fail_status(500);
    for i in 0..10 {
        assert!(!shim.ask(&format!("auth:alice:example.com:new-{i}")));
    }
    assert_eq!(
        provider.calls(),
        1 + 3,
        "open after 3 failures: no more calls"
    );
    assert!(
        shim.ask(&format!("auth:alice:example.com:{cached}")),
        "cached verdicts still served"
    );
    provider.set_fail_status(0);
    std::thread::sleep(Duration::from_millis(1100));
    let fresh = token("fresh");
    provider.insert(&fresh, json!({"username": "alice"}));
    assert!(
        shim.ask(&format!("auth:alice:example.com:{fresh}")),
        "the probe goes through"
    );
    assert!(
        !shim.ask("auth:alice:example.com:never-issued"),
        "an answer, not a fast failure"
    );
    assert_eq!(provider.calls(), 1 + 3 + 2, "closed again");
    assert!(broker.log().contains("circuit opened"));
}

/// A flood of made-up tokens for one user, against a slow provider and `provider_concurrency`
/// 2: the provider never sees more than 2 calls at once, and another user's new login is
/// served in its turn, after at most a few of the flood's calls, not after all of them.
#[test]
fn a_flood_for_one_user_keeps_to_the_cap_and_does_not_starve_another_users_login() {
    let provider = Provider::start();
    let (broker, _dir) = broker_with_config(
        &provider,
        r#"
        [domains."example.com"]
        provider_concurrency = 2
        "#,
    );
    provider.set_latency(Duration::from_millis(200));
    let valid = token("alice-new");
    provider.insert(&valid, json!({"username": "alice"}));
    let streams: Vec<_> = (0..31).map(|_| connect(&broker)).collect();
    let answered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let threads: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut stream)| {
            let (answered, valid) = (answered.clone(), valid.clone());
            std::thread::spawn(move || {
                let (user, tok) = match i {
                    // Alice comes once the flood is queued.
                    30 => {
                        std::thread::sleep(Duration::from_millis(100));
                        ("alice", valid)
                    }
                    _ => ("mallory", token(&format!("made-up-{i}"))),
                };
                let response = auth(&mut stream, 1, user, &tok);
                answered.lock().unwrap().push((user, response.ok));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let answered = answered.lock().unwrap();
    let alice_at = answered.iter().position(|(u, _)| *u == "alice").unwrap();
    assert!(answered[alice_at].1, "alice's valid token is accepted");
    assert_eq!(
        answered
            .iter()
            .filter(|(u, ok)| *u == "mallory" && !ok)
            .count(),
        30
    );
    assert_eq!(provider.most_concurrent_calls(), 2, "the cap holds");
    assert_eq!(provider.calls(), 31);
    assert!(
        alice_at <= 6,
        "alice answered after {alice_at} of the flood's 30 calls"
    );
}

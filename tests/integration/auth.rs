//! Verdicts through the real path: shim process -> broker process -> (Redis) -> mock provider.

use std::time::Duration;

use extauth_testkit::services::{now_s, token, Broker, BrokerSpec, Provider, Redis, Shim};
use serde_json::json;

/// One broker with Redis, one shim, and the provider's tokens for alice and bob.
struct World {
    provider: Provider,
    _redis: Redis,
    broker: Broker,
}

fn world() -> World {
    let provider = Provider::start();
    let redis = Redis::start();
    let broker = Broker::start(&BrokerSpec::new(&provider).with_redis(&redis));
    World {
        provider,
        _redis: redis,
        broker,
    }
}

#[test]
fn verdicts_follow_the_token_its_owner_and_its_lifetime() {
    let w = world();
    let (alice, bob, carol, inactive, expired, shouting) = (
        token("alice"),
        token("bob"),
        token("carol"),
        token("inactive"),
        token("expired"),
        token("shouting"),
    );
    w.provider
        .insert(&alice, json!({"username": "alice", "exp": now_s() + 600}));
    w.provider.insert(&bob, json!({"username": "bob"}));
    w.provider.insert(&carol, json!({"sub": "carol"}));
    w.provider
        .insert(&inactive, json!({"active": false, "username": "alice"}));
    w.provider
        .insert(&expired, json!({"username": "alice", "exp": now_s() - 5}));
    w.provider.insert(&shouting, json!({"username": "Alice"}));
    let mut shim = Shim::spawn(&w.broker.addr(), 5.0, &[]);

    assert!(
        shim.ask(&format!("auth:alice:example.com:{alice}")),
        "good token"
    );
    assert!(
        !shim.ask("auth:alice:example.com:never-issued"),
        "wrong token"
    );
    assert!(
        !shim.ask(&format!("auth:alice:example.com:{bob}")),
        "bob's token for alice"
    );
    assert!(
        !shim.ask(&format!("auth:bob:example.com:{alice}")),
        "alice's token for bob"
    );
    assert!(
        shim.ask(&format!("auth:bob:example.com:{bob}")),
        "bob's own token"
    );
    assert!(
        !shim.ask(&format!("auth:carol:example.com:{carol}")),
        "no username claim: no silent fallback to sub"
    );
    assert!(
        !shim.ask(&format!("auth:alice:example.com:{inactive}")),
        "active: false"
    );
    assert!(
        !shim.ask(&format!("auth:alice:example.com:{expired}")),
        "exp in the past"
    );
    assert!(
        !shim.ask(&format!("auth:alice:example.com:{shouting}")),
        "an Alice claim is not alice (exact binding by default)"
    );
    assert!(
        !shim.ask(&format!("auth:Alice:example.com:{shouting}")),
        "nor Alice: ejabberd never sends an un-prepped user"
    );
    assert!(!shim.ask("auth:alice:example.com:"), "empty token");
    assert_eq!(
        w.provider.calls(),
        7,
        "one provider call per distinct token, whatever users it is tried for (none for the empty one)"
    );
    assert!(
        w.broker.log().contains("non_canonical_claim"),
        "the refusal of a non-canonical claim is logged with its own reason"
    );
}

#[test]
fn verdicts_are_cached_positive_and_negative_but_failures_are_not() {
    let w = world();
    let (alice, inactive) = (token("alice"), token("inactive"));
    w.provider.insert(&alice, json!({"username": "alice"}));
    w.provider.insert(&inactive, json!({"active": false}));
    let mut shim = Shim::spawn(&w.broker.addr(), 5.0, &[]);
    for _ in 0..5 {
        assert!(shim.ask(&format!("auth:alice:example.com:{alice}")));
        assert!(!shim.ask(&format!("auth:alice:example.com:{inactive}")));
    }
    assert_eq!(
        w.provider.calls(),
        2,
        "one call per token, then the cache answers"
    );

    let fresh = token("fresh");
    w.provider.insert(&fresh, json!({"username": "alice"}));
    w.provider.set_fail_status(503);
    assert!(
        !shim.ask(&format!("auth:alice:example.com:{fresh}")),
        "provider 503 fails closed"
    );
    assert!(
        !shim.ask(&format!("auth:alice:example.com:{fresh}")),
        "and is asked again"
    );
    w.provider.set_fail_status(0);
    assert!(
        shim.ask(&format!("auth:alice:example.com:{fresh}")),
        "the 503 was not cached"
    );
    assert_eq!(w.provider.calls(), 5);
}

#[test]
fn unsupported_commands_get_zero_and_isuser_knows_who_logged_in() {
    let w = world();
    let alice = token("alice");
    w.provider.insert(&alice, json!({"username": "alice"}));
    let mut shim = Shim::spawn(&w.broker.addr(), 5.0, &[]);
    assert!(!shim.ask("isuser:alice:example.com"), "not seen yet");
    assert!(shim.ask(&format!("auth:alice:example.com:{alice}")));
    assert!(shim.ask("isuser:alice:example.com"), "seen after a login");
    assert!(!shim.ask("isuser:alice:example.org"), "per domain");
    for request in [
        "setpass:alice:example.com:new",
        "tryregister:carol:example.com:pw",
        "removeuser:alice:example.com",
        "removeuser3:alice:example.com:pw",
        "certauth:alice:example.com:cert",
    ] {
        assert!(!shim.ask(request), "{request}");
    }
    assert!(
        shim.ask(&format!("auth:alice:example.com:{alice}")),
        "removeuser changed nothing"
    );
    assert_eq!(w.provider.calls(), 1);
}

#[test]
fn positive_ttl_is_capped_by_max_ttl() {
    let provider = Provider::start();
    let mut spec = BrokerSpec::new(&provider);
    spec.extra = vec!["--max-ttl".into(), "1".into()];
    let broker = Broker::start(&spec);
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    let capped = token("capped");
    provider.insert(&capped, json!({"username": "alice"}));
    let login = format!("auth:alice:example.com:{capped}");
    assert!(shim.ask(&login));
    assert!(shim.ask(&login), "cached");
    assert_eq!(provider.calls(), 1);
    std::thread::sleep(Duration::from_millis(1300));
    assert!(shim.ask(&login), "re-validated after max_ttl");
    assert_eq!(provider.calls(), 2, "a read never extends a TTL");
}

/// `max_ttl` far longer than the token's life: the verdict ends at `exp` all the same, in L1
/// and in Redis (RFC 7662 section 4: a cached answer must not outlive the token).
#[test]
fn a_verdict_is_never_served_past_exp_even_under_a_long_max_ttl() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let mut spec = BrokerSpec::new(&provider).with_redis(&redis);
    spec.extra = vec!["--max-ttl".into(), "600".into()];
    let (a, b) = (Broker::start(&spec), Broker::start(&spec));
    let (mut via_a, mut via_b) = (
        Shim::spawn(&a.addr(), 5.0, &[]),
        Shim::spawn(&b.addr(), 5.0, &[]),
    );
    let short = token("short");
    let exp = now_s() + 2;
    provider.insert(&short, json!({"username": "alice", "exp": exp}));
    let login = format!("auth:alice:example.com:{short}");
    assert!(via_a.ask(&login));
    assert!(via_b.ask(&login), "shared through Redis before exp");
    assert_eq!(provider.calls(), 1);
    while now_s() <= exp {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!via_a.ask(&login), "broker A: not from L1 past exp");
    assert!(
        !via_b.ask(&login),
        "broker B: not from L1 nor Redis past exp"
    );
}

/// Only a login that succeeded makes a user known to `isuser`: not a made-up token, not a
/// valid token of someone else, on the broker that refused them nor on another through Redis.
#[test]
fn failed_logins_do_not_make_a_user_known() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let spec = BrokerSpec::new(&provider).with_redis(&redis);
    let (a, b) = (Broker::start(&spec), Broker::start(&spec));
    let (bobs, alices) = (token("bob"), token("alice"));
    provider.insert(&bobs, json!({"username": "bob"}));
    provider.insert(&alices, json!({"username": "alice"}));
    let (mut via_a, mut via_b) = (
        Shim::spawn(&a.addr(), 5.0, &[]),
        Shim::spawn(&b.addr(), 5.0, &[]),
    );
    assert!(!via_a.ask(&format!("auth:alice:example.com:{}", token("made-up"))));
    assert!(!via_a.ask(&format!("auth:alice:example.com:{bobs}")));
    for (shim, broker) in [(&mut via_a, "A"), (&mut via_b, "B")] {
        assert!(!shim.ask("isuser:alice:example.com"), "broker {broker}");
    }
    assert!(via_a.ask(&format!("auth:alice:example.com:{alices}")));
    for (shim, broker) in [(&mut via_a, "A"), (&mut via_b, "B")] {
        assert!(shim.ask("isuser:alice:example.com"), "broker {broker}");
        assert!(!shim.ask("isuser:bob:example.com"), "bob never logged in");
    }
}

#[test]
fn redis_entries_hold_no_token_and_expire_with_the_verdict() {
    let w = world();
    let alice = token("secret-alice");
    // The shim first (its first start may build it), then a token that expires in 120 s.
    let mut shim = Shim::spawn(&w.broker.addr(), 5.0, &[]);
    w.provider
        .insert(&alice, json!({"username": "alice", "exp": now_s() + 120}));
    assert!(shim.ask(&format!("auth:alice:example.com:{alice}")));
    let keys = w._redis.command(&["KEYS", "*"]).unwrap();
    assert!(keys.contains("extauth:v2:{t:"), "{keys}");
    assert!(!keys.contains(&alice) && !keys.contains("alice"), "{keys}");
    let verdict_key = keys
        .lines()
        .find(|l| l.starts_with("extauth:v2:{t:") && l.ends_with("}:v"))
        .unwrap();
    let value = w._redis.command(&["GET", verdict_key]).unwrap();
    assert!(
        value.contains("v|1|accepted|") && !value.contains(&alice) && !value.contains("alice"),
        "{value}"
    );
    let ttl: i64 = w
        ._redis
        .command(&["TTL", verdict_key])
        .unwrap()
        .trim_start_matches(':')
        .parse()
        .unwrap();
    assert!(
        (100..=120).contains(&ttl),
        "TTL follows min(exp - now, max_ttl): {ttl}"
    );
    assert!(
        !w.broker.log().contains(&alice),
        "the token must not be logged"
    );
}

/// A provider whose clock or time zone is off (Django with `USE_TZ = False` east or west of UTC)
/// says `active: true` for tokens whose `exp` is hours in the past: every login is refused as
/// expired. The operator must be told why, with the measured skew, not only see refusals.
#[test]
fn an_active_token_with_exp_hours_in_the_past_is_refused_and_explained() {
    use extauth_testkit::faults::{metrics_flags, Metrics};
    let provider = Provider::start();
    let metrics_port = extauth_testkit::services::free_port();
    let mut spec = BrokerSpec::new(&provider);
    spec.extra = metrics_flags(metrics_port);
    let broker = Broker::start(&spec);
    let skewed = token("skewed");
    provider.insert(
        &skewed,
        json!({"username": "alice", "exp": now_s() - 4 * 3600}),
    );
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    assert!(!shim.ask(&format!("auth:alice:example.com:{skewed}")));
    // The skew is measured when the broker asks: 4 h, plus however long this test took to get
    // there.
    let plausible = 14_400..=14_400 + 300;
    let log = broker.log();
    let line = log
        .lines()
        .find(|l| l.contains("clock or time zone"))
        .unwrap_or_else(|| panic!("no clock warning: {log}"));
    let said: u64 = line
        .split("exp is ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no skew in {line}"));
    assert!(plausible.contains(&said), "{line}");
    let gauge = Metrics::scrape(metrics_port).sum("extauth_provider_clock_skew_seconds") as u64;
    assert!(plausible.contains(&gauge), "gauge: {gauge}");
}

//! Verdicts through the real path: shim process -> broker process -> (Redis) -> mock provider.

mod common;

use std::time::Duration;

use common::services::{now_s, token, Broker, BrokerSpec, Provider, Redis, Shim};
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
    let (alice, bob, inactive, expired, shouting) = (
        token("alice"),
        token("bob"),
        token("inactive"),
        token("expired"),
        token("shouting"),
    );
    w.provider
        .insert(&alice, json!({"username": "alice", "exp": now_s() + 600}));
    w.provider.insert(&bob, json!({"sub": "bob"}));
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
        "sub claim as fallback"
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
        shim.ask(&format!("auth:alice:example.com:{shouting}")),
        "Alice claim logs in alice"
    );
    assert!(
        !shim.ask(&format!("auth:Alice:example.com:{shouting}")),
        "ejabberd never sends an un-prepped user"
    );
    assert!(!shim.ask("auth:alice:example.com:"), "empty token");
    assert_eq!(
        w.provider.calls(),
        9,
        "every distinct (user, token) but the empty one asks the provider once"
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
fn positive_ttl_is_capped_by_max_ttl_and_by_exp() {
    let provider = Provider::start();
    let mut spec = BrokerSpec::new(&provider);
    spec.extra = vec!["--max-ttl".into(), "1".into()];
    let broker = Broker::start(&spec);
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    let (capped, short) = (token("capped"), token("short"));
    provider.insert(&capped, json!({"username": "alice"}));
    assert!(shim.ask(&format!("auth:alice:example.com:{capped}")));
    // Accepted now, refused once exp has passed, whatever max_ttl says.
    let exp = now_s() + 3;
    provider.insert(&short, json!({"username": "alice", "exp": exp}));
    assert!(shim.ask(&format!("auth:alice:example.com:{short}")));
    assert_eq!(provider.calls(), 2);
    while now_s() <= exp {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        shim.ask(&format!("auth:alice:example.com:{capped}")),
        "re-validated after max_ttl"
    );
    assert!(
        !shim.ask(&format!("auth:alice:example.com:{short}")),
        "never served past exp"
    );
    assert_eq!(
        provider.calls(),
        4,
        "both entries expired: a read never extends a TTL"
    );
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
    assert!(keys.contains("extauth:v1:verdict:"), "{keys}");
    assert!(!keys.contains(&alice), "{keys}");
    let verdict_key = keys
        .lines()
        .find(|l| l.starts_with("extauth:v1:verdict:"))
        .unwrap();
    let value = w._redis.command(&["GET", verdict_key]).unwrap();
    assert!(
        value.contains("1|accepted|") && !value.contains(&alice),
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

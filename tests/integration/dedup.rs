//! One provider call per token: concurrent requests coalesce, and brokers share verdicts.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use extauth_protocol::wire::{Reason, Response, Source};
use extauth_testkit::redis_attacker::{field, Attacker};
use extauth_testkit::wire_client::{ask, auth, connect};

use extauth_testkit::services::{token, Broker, BrokerSpec, Provider, Redis, Shim};
use serde_json::json;

/// Fifty shims ask for one fresh token at once; returns how many were accepted.
fn fifty_shims_at_once(broker: &Broker, provider: &Provider) -> usize {
    let fresh = token("herd");
    provider.insert(&fresh, json!({"username": "alice"}));
    // Slow enough that all 50 requests arrive while the first call is in flight.
    provider.set_latency(Duration::from_millis(500));
    let mut shims: Vec<Shim> = (0..50)
        .map(|_| Shim::spawn(&broker.addr(), 10.0, &[]))
        .collect();
    // Open every connection first, so the herd is not spread out by connection set-up.
    for shim in &mut shims {
        assert!(!shim.ask("isuser:nobody:example.com"));
    }
    let barrier = Arc::new(Barrier::new(shims.len()));
    let request = format!("auth:alice:example.com:{fresh}");
    let threads: Vec<_> = shims
        .into_iter()
        .map(|mut shim| {
            let (barrier, request) = (barrier.clone(), request.clone());
            std::thread::spawn(move || {
                barrier.wait();
                shim.ask(&request)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|ok| *ok)
        .count()
}

#[test]
fn fifty_shims_with_one_fresh_token_cost_one_provider_call() {
    let provider = Provider::start();
    let redis = Redis::start();
    let broker = Broker::start(&BrokerSpec::new(&provider).with_redis(&redis));
    assert_eq!(fifty_shims_at_once(&broker, &provider), 50);
    assert_eq!(provider.calls(), 1);
}

/// The in-process singleflight alone, with no Redis lock to fall back on.
#[test]
fn without_redis_fifty_shims_with_one_fresh_token_cost_one_provider_call() {
    let provider = Provider::start();
    let broker = Broker::start(&BrokerSpec::new(&provider));
    assert_eq!(fifty_shims_at_once(&broker, &provider), 50);
    assert_eq!(provider.calls(), 1);
}

#[test]
fn a_verdict_reached_through_one_broker_is_shared_with_another_through_redis() {
    let provider = Provider::start();
    let redis = Redis::start();
    let spec = BrokerSpec::new(&provider).with_redis(&redis);
    let (a, b) = (Broker::start(&spec), Broker::start(&spec));
    let (alice, stranger) = (token("alice"), token("stranger"));
    provider.insert(&alice, json!({"username": "alice"}));
    let mut via_a = Shim::spawn(&a.addr(), 5.0, &[]);
    let mut via_b = Shim::spawn(&b.addr(), 5.0, &[]);
    assert!(via_a.ask(&format!("auth:alice:example.com:{alice}")));
    assert!(!via_a.ask(&format!("auth:alice:example.com:{stranger}")));
    assert_eq!(provider.calls(), 2);
    assert!(
        via_b.ask(&format!("auth:alice:example.com:{alice}")),
        "positive verdict shared"
    );
    assert!(
        !via_b.ask(&format!("auth:alice:example.com:{stranger}")),
        "negative verdict shared"
    );
    assert!(
        via_b.ask("isuser:alice:example.com"),
        "seen through broker A"
    );
    assert_eq!(provider.calls(), 2, "broker B made no provider call");
}

#[test]
fn brokers_with_different_cache_secrets_share_nothing() {
    let provider = Provider::start();
    let redis = Redis::start();
    let a = Broker::start(&BrokerSpec::new(&provider).with_redis(&redis));
    let mut other = BrokerSpec::new(&provider).with_redis(&redis);
    other.cache_secret = "another-cache-secret-fedcba9876543210fedcba";
    let b = Broker::start(&other);
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    assert!(Shim::spawn(&a.addr(), 5.0, &[]).ask(&format!("auth:alice:example.com:{alice}")));
    assert!(Shim::spawn(&b.addr(), 5.0, &[]).ask(&format!("auth:alice:example.com:{alice}")));
    assert_eq!(
        provider.calls(),
        2,
        "keys are HMACs of the secret: no cross-talk"
    );
}

/// Sends `auth:alice:example.com:TOKEN` on every stream at once (released together by a
/// barrier) and returns the responses.
fn herd(streams: Vec<UnixStream>, token: &str) -> Vec<Response> {
    let barrier = Arc::new(Barrier::new(streams.len()));
    let threads: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut stream)| {
            let (barrier, token) = (barrier.clone(), token.to_owned());
            std::thread::spawn(move || {
                barrier.wait();
                auth(&mut stream, i as u64, "alice", &token)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Brokers sharing one Redis.
const BROKERS: usize = 3;
/// Concurrent requests per broker.
const EACH: usize = 40;

/// Cross-broker dedup: three brokers on one Redis, forty concurrent requests each for one new
/// token, cost exactly one provider call; every request is accepted; exactly one broker asked
/// the provider and the others waited for its verdict in Redis; Redis then holds that one
/// accepting verdict, every broker keeps it in its L1, a broker started later reads it from
/// Redis, and alice is known to `isuser` everywhere. Guards against brokers that skip or misuse
/// the cluster flight lock (one provider call per broker, or per request under a herd), and
/// against waiters that take the verdict from Redis without keeping it.
#[test]
fn brokers_with_forty_requests_each_make_one_provider_call_and_all_share_its_verdict() {
    let provider = Provider::start();
    let redis = Redis::start();
    let spec = BrokerSpec::new(&provider).with_redis(&redis);
    let brokers: Vec<Broker> = (0..BROKERS).map(|_| Broker::start(&spec)).collect();
    let fresh = token("cluster-herd");
    provider.insert(&fresh, json!({"username": "alice"}));
    // Slow enough that every request arrives while the one call is in flight.
    provider.set_latency(Duration::from_millis(300));
    let streams: Vec<UnixStream> = (0..BROKERS * EACH)
        .map(|i| connect(&brokers[i % BROKERS]))
        .collect();
    let responses = herd(streams, &fresh);
    assert!(
        responses
            .iter()
            .all(|r| r.ok && r.reason == Reason::Accepted),
        "{responses:?}"
    );
    assert_eq!(
        provider.calls(),
        1,
        "one provider call for the whole cluster"
    );
    // Stream i went to broker i % BROKERS. The broker that made the call answered from it (the
    // lead, and those that waited on it) or, for late arrivals, from its L1; the others waited
    // on the cluster lock and took the verdict from Redis (or their L1 after that).
    let sources = |broker: usize| -> Vec<Source> {
        let mut s: Vec<Source> = responses
            .iter()
            .skip(broker)
            .step_by(BROKERS)
            .map(|r| r.source)
            .collect();
        s.dedup();
        s
    };
    let callers: Vec<usize> = (0..BROKERS)
        .filter(|b| sources(*b).contains(&Source::Provider))
        .collect();
    assert_eq!(
        callers.len(),
        1,
        "one broker asked the provider: {callers:?}"
    );
    for broker in 0..BROKERS {
        let s = sources(broker);
        if broker == callers[0] {
            assert!(
                s.iter().all(|s| matches!(s, Source::Provider | Source::L1)),
                "broker {broker}: {s:?}"
            );
        } else {
            assert!(
                s.contains(&Source::Redis)
                    && s.iter().all(|s| matches!(s, Source::Redis | Source::L1)),
                "broker {broker} waited for the verdict in Redis: {s:?}"
            );
        }
    }
    let verdicts = Attacker::connect(&redis).verdicts();
    assert_eq!(verdicts.len(), 1, "one verdict in Redis: {verdicts:?}");
    let stored = verdicts.values().next().unwrap();
    assert_eq!(field(stored, 1), "1", "an accepting verdict: {stored}");
    let isuser = |stream: &mut UnixStream| ask(stream, 1000, 10_000, "isuser:alice:example.com");
    for (i, broker) in brokers.iter().enumerate() {
        let mut stream = connect(broker);
        let again = auth(&mut stream, 999, "alice", &fresh);
        assert_eq!(
            (again.ok, again.source),
            (true, Source::L1),
            "broker {i} kept the verdict"
        );
        assert!(isuser(&mut stream).ok, "broker {i} knows alice");
    }
    let later = Broker::start(&spec);
    let mut stream = connect(&later);
    let shared = auth(&mut stream, 999, "alice", &fresh);
    assert_eq!(
        (shared.ok, shared.source),
        (true, Source::Redis),
        "a broker started later reads the verdict from Redis"
    );
    assert!(isuser(&mut stream).ok, "and knows alice");
    assert_eq!(provider.calls(), 1, "still the one provider call");
}

#[test]
fn a_failed_flight_fails_all_its_waiters_and_the_next_request_tries_again() {
    let provider = Provider::start();
    let redis = Redis::start();
    let spec = BrokerSpec::new(&provider).with_redis(&redis);
    let broker = Broker::start(&spec);
    let fresh = token("failing");
    provider.insert(&fresh, json!({"username": "alice"}));
    provider.set_latency(Duration::from_millis(300));
    provider.set_fail_status(503);
    let streams: Vec<UnixStream> = (0..20).map(|_| connect(&broker)).collect();
    let responses = herd(streams, &fresh);
    assert!(
        responses
            .iter()
            .all(|r| !r.ok && r.reason == Reason::UpstreamUnavailable),
        "{responses:?}"
    );
    assert_eq!(
        provider.calls(),
        1,
        "every waiter shared the one failed flight"
    );
    provider.set_fail_status(0);
    let calls = provider.calls();
    assert!(
        auth(&mut connect(&broker), 99, "alice", &fresh).ok,
        "nothing cached from the failure"
    );
    assert_eq!(provider.calls(), calls + 1);
}

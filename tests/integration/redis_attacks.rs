//! Redis is untrusted storage: an attacker with every Redis command but without the cache secret
//! plays against real brokers, real shims and a real redis-server (docs/security.md, "Redis as
//! untrusted storage: tests").
//!
//! The attacker ([`extauth_testkit::redis_attacker`]) finds what the brokers store by looking at Redis, writes,
//! copies, renames, replays and deletes values, and publishes on any channel. It may cause
//! refusals and extra provider calls; it must never get an accept the brokers would not give
//! without it. Where an accept could come from the provider, the provider refuses (the token is
//! inactive) or is down (HTTP 503), so an accept can only come from what Redis holds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use extauth_testkit::faults::{http, log_lines, metrics_flags, Metrics};
use extauth_testkit::redis_attacker::{erase_as_written, field, unseal, with_field, Attacker};
use extauth_testkit::services::{
    free_port, revoke_cli, token, try_revoke_cli, wait_until, Broker, BrokerSpec, Provider, Redis,
    Shim,
};
use serde_json::json;

/// The one domain every test logs in to.
const DOMAIN: &str = "example.com";

/// What the broker logs when it ignores a Redis value (at most once per 10 s per kind).
const REJECTION_LOG: &str = "ignored a Redis value";

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Sleeps until `at_ms` (ms since the epoch).
fn sleep_until_ms(at_ms: u64) {
    std::thread::sleep(Duration::from_millis(at_ms.saturating_sub(now_ms())));
}

/// A broker on `redis`, asking `provider`, with `extra` flags.
fn start(provider: &Provider, redis: &Redis, extra: &[&str]) -> Broker {
    let mut spec = BrokerSpec::new(provider).with_redis(redis);
    spec.extra = extra.iter().map(|s| s.to_string()).collect();
    Broker::start(&spec)
}

/// [`start`] with `/metrics` on a free port; returns the port too.
fn start_with_metrics(provider: &Provider, redis: &Redis, extra: &[&str]) -> (Broker, u16) {
    let port = free_port();
    let mut flags: Vec<String> = metrics_flags(port);
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    (start(provider, redis, &flags), port)
}

fn shim(broker: &Broker) -> Shim {
    Shim::spawn(&broker.addr(), 5.0, &[])
}

fn login(shim: &mut Shim, user: &str, token: &str) -> bool {
    shim.ask(&format!("auth:{user}:{DOMAIN}:{token}"))
}

fn isuser(shim: &mut Shim, user: &str) -> bool {
    shim.ask(&format!("isuser:{user}:{DOMAIN}"))
}

/// `extauth_redis_rejected_total{kind}` of the broker whose metrics are on `port`.
fn rejected(port: u16, kind: &str) -> f64 {
    Metrics::scrape(port).sum(&format!("extauth_redis_rejected_total{{kind=\"{kind}\""))
}

/// How many "ignored a Redis value" lines `broker` logged.
fn rejection_lines(broker: &Broker) -> usize {
    log_lines(&broker.log(), &[REJECTION_LOG]).len()
}

/// A file holding `token`, for `extauth-broker revoke --token-file`.
fn token_file(dir: &tempfile::TempDir, token: &str) -> PathBuf {
    let path = dir.path().join(format!("token-{}", now_ms()));
    std::fs::write(&path, token).unwrap();
    path
}

/// The user key (64 hex digits) a v2 verdict names, in the clear in its payload.
fn named_user(verdict: &str) -> String {
    field(verdict, 3).to_owned()
}

/// Does this verdict (v2 or v1 format) accept?
fn accepts(verdict: &str) -> bool {
    verdict.contains("|accepted|")
}

/// What an attacker without the cache secret can write under a key, hoping the user whose
/// genuine (sealed) verdict on another token is `genuine` logs in with the key's token;
/// `refused` is the genuine refusal the key held.
fn forgeries(genuine: &str, refused: &str) -> Vec<(&'static str, String)> {
    let (payload, tag) = unseal(genuine);
    let (_, refused_tag) = unseal(refused);
    let named = genuine.split('|').nth(3).unwrap_or_default();
    let (now, far) = (now_ms(), (now_ms() + 3_600_000).to_string());
    let forged = format!("v|1|accepted|{named}|{now}|{far}|{far}|0");
    let turned = with_field(
        &with_field(&with_field(refused, 1, "1"), 2, "accepted"),
        3,
        named,
    );
    vec![
        ("the v1 text format", format!("1|accepted|{far}|{far}")),
        ("a v2 payload without a tag", forged.clone()),
        (
            "a v2 payload with a made-up tag",
            format!("{forged}|{}", "5a".repeat(16)),
        ),
        (
            "a v2 payload with the tag of the refusal this key held",
            format!("{forged}|{refused_tag}"),
        ),
        (
            "a v2 payload with the tag of the user's genuine verdict",
            format!("{forged}|{tag}"),
        ),
        ("the user's genuine verdict, copied", genuine.to_owned()),
        (
            "the genuine verdict with its tag in capitals",
            format!("{payload}|{}", tag.to_uppercase()),
        ),
        (
            "the genuine verdict living an hour longer, tag kept",
            with_field(&with_field(genuine, 5, &far), 6, &far),
        ),
        ("the refusal turned into an accept, tag kept", turned),
        ("the genuine verdict and a newline", format!("{genuine}\n")),
        (
            "the genuine verdict with a longer tag",
            format!("{genuine}00"),
        ),
        (
            "the genuine verdict sealed twice",
            format!("{genuine}|{tag}"),
        ),
        ("the genuine verdict after a space", format!(" {genuine}")),
        ("an empty value", String::new()),
    ]
}

/// Point 1: forged, altered, copied and renamed verdicts log nobody in; each is counted, and
/// logged at most once per 10 s.
#[test]
fn forged_copied_and_renamed_verdicts_log_nobody_in() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let writer = start(&provider, &redis, &[]);
    let (victim, metrics) = start_with_metrics(&provider, &redis, &[]);
    let mut att = Attacker::connect(&redis);
    let (bob_tok, alice_tok, made_up) = (token("bob"), token("alice"), token("made-up"));
    provider.insert(&bob_tok, json!({"username": "bob"}));
    provider.insert(&alice_tok, json!({"username": "alice"}));

    // Genuine values, written by a broker: bob's and alice's accepted verdicts, and the refusal
    // of a token the attacker made up (for each user: v1 keyed verdicts by user and token).
    let mut via_writer = shim(&writer);
    let (bob_key, bob_verdict) =
        att.verdict_of(|| assert!(login(&mut via_writer, "bob", &bob_tok)));
    let (alice_key, alice_verdict) =
        att.verdict_of(|| assert!(login(&mut via_writer, "alice", &alice_tok)));
    let before = att.verdicts();
    assert!(!login(&mut via_writer, "bob", &made_up));
    assert!(!login(&mut via_writer, "alice", &made_up));
    let targets: Vec<String> = att.new_verdicts(&before).into_keys().collect();
    let refused = att.get(&targets[0]).unwrap();
    let before = att.verdicts();
    assert!(
        !login(&mut via_writer, "alice", &bob_tok),
        "bob's token names bob"
    );
    let alice_with_bobs_token: Vec<String> = att.new_verdicts(&before).into_keys().collect();

    // The provider is down from here on: an accept could only come from what Redis holds.
    provider.set_fail_status(503);
    let mut via_victim = shim(&victim);
    let started = Instant::now();
    let mut planted = 0;
    for (user, genuine) in [("bob", &bob_verdict), ("alice", &alice_verdict)] {
        for (what, value) in forgeries(genuine, &refused) {
            for key in &targets {
                att.set(key, &value);
            }
            assert!(
                !login(&mut via_victim, user, &made_up),
                "{user} logged in with a made-up token after the attacker wrote {what}: {value:?}"
            );
            planted += 1;
        }
    }
    // Bob's genuine verdict copied under alice's token's key.
    att.set(&alice_key, &bob_verdict);
    assert!(!login(&mut via_victim, "alice", &alice_tok));
    assert!(!login(&mut via_victim, "bob", &alice_tok));
    planted += 2;
    // Bob's token tried for alice, with bob's genuine verdict under whatever key that made
    // (none in v2: one verdict per token, which names bob).
    for key in &alice_with_bobs_token {
        att.set(key, &bob_verdict);
    }
    assert!(!login(&mut via_victim, "alice", &bob_tok));
    // Bob's genuine verdict renamed onto the made-up token's key.
    att.cmd(redis::cmd("RENAME").arg(&bob_key).arg(&targets[0]));
    assert!(!login(&mut via_victim, "bob", &made_up));
    planted += 1;

    // A flight looks in Redis before it takes the token's lock and once more after: each
    // planted verdict is read, rejected and counted at both looks.
    assert_eq!(
        rejected(metrics, "entry"),
        (2 * planted) as f64,
        "every planted verdict is counted at both looks"
    );
    let lines = rejection_lines(&victim);
    let allowed = 1 + started.elapsed().as_secs() as usize / 10;
    assert!(
        (1..=allowed).contains(&lines),
        "{planted} rejected values, {lines} log lines (at most one per 10 s)"
    );
}

/// Points 1 and 2: a stored verdict lives no longer than the reader's own `max_ttl` from its
/// issue, nor past the token's `exp`, from Redis and from the reader's L1; a genuine verdict
/// replayed after its own end, as it was or with its instants changed, is refused.
#[test]
fn stored_verdicts_live_no_longer_than_the_readers_max_ttl_nor_the_tokens_exp() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let (long, metrics) = start_with_metrics(&provider, &redis, &["--max-ttl", "60"]);
    let short = start(&provider, &redis, &["--max-ttl", "2"]);
    let fresh = start(&provider, &redis, &["--max-ttl", "2"]);
    let mut att = Attacker::connect(&redis);
    let (t_long, t_exp, t_short) = (token("long"), token("exp"), token("short"));
    provider.insert(&t_long, json!({"username": "alice"}));
    let exp_s = extauth_testkit::services::now_s() + 2;
    provider.insert(&t_exp, json!({"username": "alice", "exp": exp_s}));
    provider.insert(&t_short, json!({"username": "alice"}));
    let (mut via_long, mut via_short, mut via_fresh) = (shim(&long), shim(&short), shim(&fresh));
    let (_, v_long) = att.verdict_of(|| assert!(login(&mut via_long, "alice", &t_long)));
    let (k_exp, v_exp) = att.verdict_of(|| assert!(login(&mut via_long, "alice", &t_exp)));
    let (k_short, v_short) = att.verdict_of(|| assert!(login(&mut via_short, "alice", &t_short)));
    assert!(login(&mut via_short, "alice", &t_long));
    assert_eq!(
        provider.calls(),
        3,
        "the short broker read the long one's verdict"
    );

    // The provider is down from here on: an accept could only come from a cache.
    provider.set_fail_status(503);
    let ms = |v: &str, n: usize| field(v, n).parse::<u64>().unwrap();
    let (issued_long, exp_ms, short_end) = (ms(&v_long, 4), ms(&v_exp, 7), ms(&v_short, 6));
    assert_eq!(exp_ms, exp_s * 1000);
    sleep_until_ms((issued_long + 2_000).max(exp_ms).max(short_end) + 100);
    assert!(
        login(&mut via_long, "alice", &t_long),
        "within the writer's own max_ttl: the stored verdict is still fresh"
    );
    assert!(
        !login(&mut via_short, "alice", &t_long),
        "the short broker's L1 copy ends at its own max_ttl"
    );
    assert!(
        !login(&mut via_fresh, "alice", &t_long),
        "a broker reading it from Redis now clamps it to its own max_ttl"
    );
    assert!(
        !login(&mut via_long, "alice", &t_exp),
        "never past exp, not even from L1"
    );
    assert!(!login(&mut via_fresh, "alice", &t_exp));

    // Genuine verdicts replayed after their own end (exp; the short broker's max_ttl), to the
    // long broker, which never saw t_short and whose own max_ttl is 60 s.
    let far = (now_ms() + 3_600_000).to_string();
    let mut altered = 0;
    for (key, genuine, tok) in [(&k_exp, &v_exp, &t_exp), (&k_short, &v_short, &t_short)] {
        let replays = [
            ("as it was, kept forever", genuine.clone(), false),
            (
                "its end an hour later and no exp, tag kept",
                with_field(&with_field(&with_field(genuine, 5, &far), 6, &far), 7, "0"),
                true,
            ),
            ("in the v1 format", format!("1|accepted|{far}|{far}"), true),
        ];
        for (what, value, forged) in replays {
            att.set(key, &value);
            assert!(
                !login(&mut via_long, "alice", tok),
                "a verdict replayed after its end ({what}) was served"
            );
            altered += usize::from(forged);
        }
    }
    // Rejected at both looks of the flight (before and after its lock).
    assert_eq!(rejected(metrics, "entry"), (2 * altered) as f64);
}

/// Point 1: "seen" markers planted, copied, extended or replayed make nobody known to `isuser`.
#[test]
fn planted_seen_markers_make_nobody_known() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let writer = start(&provider, &redis, &["--seen-ttl", "2"]);
    let (reader, metrics) = start_with_metrics(&provider, &redis, &["--seen-ttl", "2"]);
    let mut att = Attacker::connect(&redis);
    let (bob_tok, carol_tok) = (token("bob"), token("carol"));
    provider.insert(&bob_tok, json!({"username": "bob"}));
    provider.insert(&carol_tok, json!({"username": "carol"}));
    let mut via_writer = shim(&writer);
    let single = |mut markers: Vec<(String, String)>| {
        assert_eq!(markers.len(), 1, "one new marker: {markers:?}");
        markers.remove(0)
    };
    let (bob_key, bob_marker) =
        single(att.markers_of(|| assert!(login(&mut via_writer, "bob", &bob_tok))));
    std::thread::sleep(Duration::from_millis(2_100));
    let (_, carol_marker) =
        single(att.markers_of(|| assert!(login(&mut via_writer, "carol", &carol_tok))));
    let mut via_reader = shim(&reader);
    assert!(
        isuser(&mut via_reader, "carol"),
        "a genuine marker is believed"
    );
    assert!(!isuser(&mut via_reader, "bob"), "bob's marker ended");

    let far = (now_ms() + 3_600_000).to_string();
    let plants = [
        ("the v1 marker", "1".to_owned(), true),
        ("carol's genuine marker", carol_marker, true),
        (
            "bob's marker an hour longer, tag kept",
            with_field(&bob_marker, 0, &far),
            true,
        ),
        (
            "a marker with a made-up tag",
            format!("{far}|{}", "5a".repeat(16)),
            true,
        ),
        ("bob's own marker, kept after its end", bob_marker, false),
    ];
    let mut forged = 0;
    for (what, value, is_forged) in plants {
        att.set(&bob_key, &value);
        assert!(
            !isuser(&mut via_reader, "bob"),
            "{what} made bob known: {value:?}"
        );
        forged += usize::from(is_forged);
    }
    assert_eq!(rejected(metrics, "seen"), forged as f64);
}

/// How a value of one Redis type is planted under a key.
type Plant = fn(&str) -> redis::Cmd;

/// Garbage of every Redis type, and strings a parser could choke on.
fn garbage() -> Vec<(&'static str, Plant)> {
    fn set(key: &str, value: Vec<u8>) -> redis::Cmd {
        redis::cmd("SET").arg(key).arg(value).clone()
    }
    vec![
        ("a list", |k| {
            redis::cmd("RPUSH").arg(k).arg("1|accepted|9|9").clone()
        }),
        ("a hash", |k| {
            redis::cmd("HSET").arg(k).arg("v").arg("1").clone()
        }),
        ("a set", |k| redis::cmd("SADD").arg(k).arg("00").clone()),
        ("a sorted set", |k| {
            redis::cmd("ZADD").arg(k).arg(1).arg("00").clone()
        }),
        ("a stream", |k| {
            redis::cmd("XADD").arg(k).arg("*").arg("v").arg("1").clone()
        }),
        ("an 8 MiB string", |k| {
            set(k, "v|1|accepted|".repeat((8 << 20) / 13).into_bytes())
        }),
        ("bytes that are not UTF-8", |k| {
            set(k, b"\xff\xfe|\x00|\x80accepted".to_vec())
        }),
        ("a number", |k| set(k, b"18446744073709551615".to_vec())),
        ("an empty string", |k| set(k, Vec::new())),
    ]
}

/// Point 1: garbage of every type under every key a broker reads (verdict, revocation marks,
/// index, "seen" marker) and on the hint channel is a miss: the provider answers, the broker
/// neither crashes nor accepts a made-up token, strings are counted, and nothing is logged per
/// request (a planted value is not a Redis outage).
#[test]
fn garbage_of_every_type_under_every_key_is_a_miss() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let writer = start(&provider, &redis, &[]);
    let (victim, metrics) = start_with_metrics(&provider, &redis, &[]);
    let mut att = Attacker::connect(&redis);
    let (mut via_writer, mut via_victim) = (shim(&writer), shim(&victim));
    let started = Instant::now();
    for (i, (kind, plant)) in garbage().into_iter().enumerate() {
        let (user, tok) = (format!("user{i}"), token("garbage"));
        provider.insert(&tok, json!({"username": user}));
        let (verdict_key, verdict) =
            att.verdict_of(|| assert!(login(&mut via_writer, &user, &tok)));
        let token_keys = verdict_key.trim_end_matches(":v");
        let user_keys = format!("extauth:v2:{{u:{}}}", named_user(&verdict));
        let keys: Vec<String> = [":v", ":r"]
            .iter()
            .map(|s| format!("{token_keys}{s}"))
            .chain([":r", ":i", ":s"].iter().map(|s| format!("{user_keys}{s}")))
            .collect();
        att.del(&keys);
        for key in &keys {
            att.cmd(&plant(key));
        }
        assert!(
            !isuser(&mut via_victim, &user),
            "{kind} under the seen key made {user} known"
        );
        assert!(
            login(&mut via_victim, &user, &tok),
            "{kind} under every key must be a miss: the provider answers"
        );
        assert!(
            !login(&mut via_victim, &user, &token("made-up")),
            "{kind}: a made-up token"
        );
        att.del(&keys);
    }
    // Garbage on the hint channel.
    let messages: [&[u8]; 5] = [
        b"\xff\xfe|\x00|\x80accepted",
        b"18446744073709551615",
        b"user 00 1",
        b"",
        &vec![b'u'; 8 << 20],
    ];
    for message in messages {
        att.publish("extauth:v2:hints", message);
    }
    wait_until(Duration::from_secs(5), "every garbage hint counted", || {
        rejected(metrics, "hint") >= messages.len() as f64
    });
    // A lock of any type only delays a login (the broker waits at most half its deadline).
    let tok = token("locked");
    provider.insert(&tok, json!({"username": "locked"}));
    let (verdict_key, _) = att.verdict_of(|| assert!(login(&mut via_writer, "locked", &tok)));
    let lock = verdict_key.replace("}:v", "}:l");
    att.del(&[verdict_key, lock.clone()]);
    att.cmd(redis::cmd("RPUSH").arg(&lock).arg("x"));
    assert!(login(
        &mut Shim::spawn(&victim.addr(), 3.0, &[]),
        "locked",
        &tok
    ));

    assert!(rejected(metrics, "entry") >= 4.0 && rejected(metrics, "seen") >= 4.0);
    let log = victim.log();
    let outages: Vec<String> = ["Redis failed", "work again", "reachable again"]
        .iter()
        .flat_map(|needle| log_lines(&log, &[needle]))
        .collect();
    assert!(
        outages.is_empty(),
        "planted values are not Redis outages: {outages:#?}"
    );
    // Six kinds (verdicts, token marks, user marks, "seen" markers, indexes, hints), each at
    // most once per 10 s.
    let allowed = 6 * (1 + started.elapsed().as_secs() as usize / 10);
    assert!(rejection_lines(&victim) <= allowed, "{log}");
}

/// Point 3: after `revoke --user`, `revoke --token` and `POST /revoke`, the revoked verdicts are
/// refused on every broker, including brokers started later, whatever the attacker then
/// publishes (forged and replayed hints), renames, deletes (every mark) or flushes; a user whose
/// index was deleted before the revocation stays revoked while its mark is there (deleting that
/// mark too is the replay residue, see the next test).
#[test]
fn revocations_stick_whatever_a_redis_writer_then_publishes_renames_deletes_or_flushes() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let admin_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let admin_secret = dir.path().join("admin.secret");
    std::fs::write(&admin_secret, "admin-secret-4e0b\n").unwrap();
    let a = start(&provider, &redis, &[]);
    let admin_flags = [
        "--admin-listen".to_owned(),
        format!("127.0.0.1:{admin_port}"),
        "--admin-secret-file".to_owned(),
        admin_secret.display().to_string(),
    ];
    let b = start(
        &provider,
        &redis,
        &admin_flags.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut att = Attacker::connect(&redis);
    let hints = att.record_messages();
    let logins: Vec<(&str, String)> = ["alice", "alice", "bob", "carol", "dave"]
        .into_iter()
        .map(|u| (u, token(u)))
        .collect();
    let (mut via_a, mut via_b) = (shim(&a), shim(&b));
    let mut dave = String::new();
    for (user, tok) in &logins {
        provider.insert(tok, json!({"username": user}));
        let (_, verdict) = att.verdict_of(|| assert!(login(&mut via_a, user, tok)));
        assert!(login(&mut via_b, user, tok));
        if *user == "dave" {
            dave = named_user(&verdict);
        }
    }
    // Before the revocation: dave's index goes (his verdicts cannot be found to be deleted).
    let dave_keys: Vec<String> = att
        .keys()
        .into_iter()
        .filter(|k| k.contains(&dave))
        .collect();
    att.del(&dave_keys);
    // The provider refuses every one of these tokens now: an accept can only be a cached one.
    for (_, tok) in &logins {
        provider.insert(tok, json!({"active": false}));
    }
    revoke_cli(&redis, &a, "alice", None);
    revoke_cli(&redis, &a, "dave", None);
    revoke_cli(&redis, &a, "carol", Some(&token_file(&dir, &logins[3].1)));
    let body = format!(
        r#"{{"domain": "{DOMAIN}", "user": "bob", "token": "{}"}}"#,
        logins[2].1
    );
    let (status, answer) = http(
        admin_port,
        "POST",
        "/revoke",
        Some("admin-secret-4e0b"),
        &body,
    );
    assert_eq!(status, 200, "{answer}");
    std::thread::sleep(Duration::from_millis(1_000));
    let genuine_hints = hints.take();
    assert!(!genuine_hints.is_empty(), "the revocations published hints");

    let mut shims = vec![via_a, via_b];
    let mut brokers = Vec::new();
    let mut check = |shims: &mut Vec<Shim>, when: &str| {
        brokers.push(start(&provider, &redis, &[]));
        shims.push(shim(brokers.last().unwrap()));
        for (i, shim) in shims.iter_mut().enumerate() {
            for (user, tok) in &logins {
                assert!(!login(shim, user, tok), "broker {i} let {user} in {when}");
            }
        }
    };
    check(&mut shims, "after the revocations");

    // Forged hints, and the genuine ones again, many times.
    let channel = genuine_hints[0].0.clone();
    for forged in [
        "garbage".to_owned(),
        format!("u {dave}"),
        format!("user {dave} 0"),
        format!("u {dave}|{}", "00".repeat(16)),
    ] {
        att.publish(&channel, forged);
    }
    for _ in 0..50 {
        for (channel, message) in &genuine_hints {
            att.publish(channel, message);
        }
    }
    check(&mut shims, "after forged and replayed hints");

    // Every mark but dave's renamed onto another's name, or deleted.
    let marks: Vec<String> = att
        .keys()
        .into_iter()
        .filter(|k| k.ends_with(":r") && !k.contains(&dave))
        .collect();
    if let [first, second, ..] = marks.as_slice() {
        att.cmd(redis::cmd("RENAME").arg(first).arg(second));
    }
    att.delete_revocation_state(&[&dave]);
    check(&mut shims, "after its marks were renamed and deleted");

    att.cmd(&redis::cmd("FLUSHALL"));
    check(&mut shims, "after FLUSHALL");
}

/// Point 3, the residue: an attacker who kept a revoked verdict (saved it and writes it back, or
/// deleted the user's index before the revocation so it was not deleted) and deletes the marks
/// gets it served again, but only by brokers that never saw the revocation, and never past the
/// verdict's own end (its issue + max_ttl). Both sides of the bound are checked, by the
/// millisecond.
#[test]
fn a_kept_revoked_verdict_comes_back_only_where_the_revocation_was_not_seen_and_only_until_its_end()
{
    let (provider, redis) = (Provider::start(), Redis::start());
    let ttl = ["--max-ttl", "4"];
    let (a, b) = (
        start(&provider, &redis, &ttl),
        start(&provider, &redis, &ttl),
    );
    let mut att = Attacker::connect(&redis);
    let (phone, watch) = (token("alice-phone"), token("dave-watch"));
    provider.insert(&phone, json!({"username": "alice"}));
    provider.insert(&watch, json!({"username": "dave"}));
    let (mut via_a, mut via_b) = (shim(&a), shim(&b));
    let alice = att.verdict_of(|| assert!(login(&mut via_a, "alice", &phone)));
    let dave = att.verdict_of(|| assert!(login(&mut via_a, "dave", &watch)));
    assert!(login(&mut via_b, "alice", &phone));
    assert!(login(&mut via_b, "dave", &watch));
    let dave_user = named_user(&dave.1);
    let dave_index: Vec<String> = att
        .keys()
        .into_iter()
        .filter(|k| k.contains(&dave_user))
        .collect();
    att.del(&dave_index);
    revoke_cli(&redis, &a, "alice", None);
    revoke_cli(&redis, &a, "dave", None);
    // The provider is down: an accept can only come from a cache. The marks go; alice's saved
    // verdict comes back, kept forever; dave's never left.
    provider.set_fail_status(503);
    att.delete_revocation_state(&[]);
    att.set(&alice.0, &alice.1);
    let later = start(&provider, &redis, &ttl);
    let mut via_later = shim(&later);

    let end = |v: &str| field(v, 5).parse::<u64>().unwrap();
    let cases = [
        ("alice", &phone, end(&alice.1)),
        ("dave", &watch, end(&dave.1)),
    ];
    let mut served_by_later = [0, 0];
    while now_ms() < cases[0].2.max(cases[1].2) + 300 {
        for (i, (user, tok, end)) in cases.iter().enumerate() {
            for (name, shim) in [("A", &mut via_a), ("B", &mut via_b)] {
                assert!(
                    !login(shim, user, tok),
                    "broker {name} saw {user}'s revocation, yet served the kept verdict"
                );
            }
            let sent = now_ms();
            if login(&mut via_later, user, tok) {
                assert!(
                    sent < *end,
                    "{user}'s kept verdict was served {} ms past its own end",
                    sent - end
                );
                served_by_later[i] += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        served_by_later.iter().all(|n| *n > 0),
        "the documented residue: a broker that never saw the revocation serves a kept verdict \
         until its end ({served_by_later:?})"
    );
    // After their end, written back as they were or made to live longer: refused everywhere.
    let far = (now_ms() + 3_600_000).to_string();
    let newest = start(&provider, &redis, &ttl);
    let mut via_newest = shim(&newest);
    for ((key, genuine), (user, tok, _)) in [alice, dave].iter().zip(cases) {
        for value in [
            genuine.clone(),
            with_field(&with_field(genuine, 5, &far), 6, &far),
        ] {
            att.set(key, &value);
            for shim in [&mut via_later, &mut via_newest] {
                assert!(!login(shim, user, tok), "{user}'s verdict past its end");
            }
        }
    }
}

/// Point 3: a revocation that lands while a provider call for the user is in flight (or just as
/// it answers) does not put the revoked verdict back, in the broker's L1 or in Redis.
#[test]
fn a_revocation_racing_a_provider_call_keeps_its_verdict_out_of_l1_and_redis() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let (a, b) = (start(&provider, &redis, &[]), start(&provider, &redis, &[]));
    let mut att = Attacker::connect(&redis);
    let latency = Duration::from_millis(1_000);
    for (round, revoke_after) in [(0u32, 300u64), (1, 980)] {
        let (user, tok) = (format!("racer{round}"), token("racer"));
        provider.insert(&tok, json!({"username": user}));
        provider.set_latency(latency);
        let mut via_a = shim(&a);
        let racing = {
            let (user, tok) = (user.clone(), tok.clone());
            std::thread::spawn(move || login(&mut via_a, &user, &tok))
        };
        std::thread::sleep(Duration::from_millis(revoke_after));
        revoke_cli(&redis, &a, &user, None);
        let raced = racing.join().unwrap();
        println!("round {round}: the racing login got {raced}");
        provider.set_latency(Duration::ZERO);
        provider.insert(&tok, json!({"active": false}));
        assert!(
            !login(&mut shim(&a), &user, &tok),
            "round {round}: the raced verdict stayed in A's L1"
        );
        assert!(
            !login(&mut shim(&b), &user, &tok),
            "round {round}: broker B"
        );
        let stored: Vec<String> = att
            .verdicts()
            .into_values()
            .filter(|v| accepts(v))
            .collect();
        assert!(
            stored.is_empty(),
            "round {round}: the raced verdict is in Redis: {stored:?}"
        );
        att.delete_revocation_state(&[]);
        let later = start(&provider, &redis, &[]);
        assert!(
            !login(&mut shim(&later), &user, &tok),
            "round {round}: a later broker"
        );
    }
}

/// The broker's resident memory (`VmRSS`), KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Hints per flood: two floods make "hundreds of thousands".
const FLOOD: usize = 100_000;

/// Publishes `count` messages on `channel` (pipelined, 10 000 per round trip): forged hints of
/// several shapes, and every 10th one a replay of a genuine hint.
fn flood(att: &mut Attacker, channel: &str, genuine: &[Vec<u8>], count: usize) {
    let forged = |i: usize| -> Vec<u8> {
        let key = format!("{i:064x}");
        match i % 5 {
            0 => format!("u {key}").into_bytes(),
            1 => format!("t {key}|{}", "5a".repeat(16)).into_bytes(),
            2 => format!("user {key} 18446744073709551615").into_bytes(),
            3 => vec![0xff; 256],
            _ => format!("u {key} {i}|{key}").into_bytes(),
        }
    };
    for batch in (0..count).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for &i in batch {
            let message = if i % 10 == 9 {
                genuine[i % genuine.len()].clone()
            } else {
                forged(i)
            };
            pipe.cmd("PUBLISH").arg(channel).arg(message).ignore();
        }
        att.pipe(&pipe);
    }
}

/// Waits until the broker stops counting rejected hints (it has drained the channel).
fn drained(metrics: u16) -> f64 {
    let mut last = -1.0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = rejected(metrics, "hint");
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Point 3: hundreds of thousands of forged and replayed hints leave the broker's memory bounded
/// (a second flood adds nothing), its log quiet, and revocation working.
#[test]
fn a_flood_of_forged_and_replayed_hints_leaves_memory_bounded_and_revocation_working() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let (a, metrics) = start_with_metrics(&provider, &redis, &[]);
    let mut att = Attacker::connect(&redis);
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let mut via_a = shim(&a);
    assert!(login(&mut via_a, "alice", &alice));
    // Genuine hints to replay: revocations of another user and of another user's token, on
    // whatever channel the brokers use.
    let recorder = att.record_messages();
    let dir = tempfile::tempdir().unwrap();
    revoke_cli(&redis, &a, "mallory", None);
    revoke_cli(&redis, &a, "trudy", Some(&token_file(&dir, "trudy-token")));
    let mut recorded = Vec::new();
    wait_until(Duration::from_secs(5), "the genuine hints", || {
        recorded.extend(recorder.take());
        recorded.len() >= 2
    });
    std::thread::sleep(Duration::from_millis(200));
    recorded.extend(recorder.take());
    drop(recorder);
    let channel = recorded[0].0.clone();
    let genuine: Vec<Vec<u8>> = recorded.into_iter().map(|(_, m)| m).collect();

    let pid = a.pid();
    let (log_before, rss_before) = (a.log().len(), rss_kib(pid));
    let started = Instant::now();
    let flooded = |att: &mut Attacker| {
        flood(att, &channel, &genuine, FLOOD);
        (drained(metrics), rss_kib(pid))
    };
    let (counted, rss_first) = flooded(&mut att);
    let (counted_again, rss_second) = flooded(&mut att);
    println!(
        "VmRSS {rss_before} KiB, {rss_first} KiB after {FLOOD} hints ({counted} rejected), \
         {rss_second} KiB after {FLOOD} more ({counted_again} rejected in all), {:?}",
        started.elapsed()
    );
    assert!(
        counted > (FLOOD / 2) as f64,
        "the broker saw the flood ({counted} rejected)"
    );
    assert!(
        rss_first < rss_before + 64 * 1024,
        "the first flood grew VmRSS from {rss_before} to {rss_first} KiB"
    );
    assert!(
        rss_second < rss_first + 8 * 1024,
        "a second flood grew VmRSS from {rss_first} to {rss_second} KiB: state kept per message"
    );
    let log = a.log();
    let grown = &log[log_before..];
    assert!(
        grown.len() < 16 * 1024,
        "{} hints added {} bytes of log:\n{}",
        2 * FLOOD,
        grown.len(),
        &grown[..grown.len().min(4096)]
    );

    // Revocation still works: alice's verdict (in L1 again, had the flood cost the broker its
    // subscription and L1) is dropped within a second of `revoke`.
    assert!(login(&mut via_a, "alice", &alice));
    provider.insert(&alice, json!({"active": false}));
    revoke_cli(&redis, &a, "alice", None);
    std::thread::sleep(Duration::from_millis(1_000));
    assert!(
        !login(&mut via_a, "alice", &alice),
        "revocation still works after the flood"
    );
}

/// Found by review: an attacker who deletes a user's revocation mark the moment it is written
/// (keyspace notifications) and slows the revocation down (a stuffed index) made the brokers'
/// hint find no mark, so running brokers kept serving the revoked verdict from L1, and a saved
/// copy replayed into Redis came back even on brokers that received the hint.
#[test]
fn a_mark_erased_as_soon_as_it_is_written_still_revokes_on_running_brokers() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let (a, b) = (start(&provider, &redis, &[]), start(&provider, &redis, &[]));
    let mut att = Attacker::connect(&redis);
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let (mut via_a, mut via_b) = (shim(&a), shim(&b));
    let (key, verdict) = att.verdict_of(|| assert!(login(&mut via_a, "alice", &alice)));
    assert!(login(&mut via_b, "alice", &alice));
    let index = format!("extauth:v2:{{u:{}}}:i", named_user(&verdict));
    let mut stuffing = redis::cmd("SADD");
    stuffing.arg(&index);
    for i in 0..3_000u32 {
        stuffing.arg(format!("{i:064x}"));
    }
    att.cmd(&stuffing);
    let eraser = erase_as_written(&redis, ":r");
    // The provider is down: an accept can only come from a cache, and nothing new is cached.
    provider.set_fail_status(503);
    revoke_cli(&redis, &a, "alice", None);
    std::thread::sleep(Duration::from_millis(1_000));
    assert!(
        att.keys().iter().all(|k| !k.ends_with(":r")),
        "the marks were erased"
    );
    drop(eraser);
    for (name, shim) in [("A", &mut via_a), ("B", &mut via_b)] {
        assert!(
            !login(shim, "alice", &alice),
            "broker {name} kept the revoked verdict"
        );
    }
    att.set(&key, &verdict);
    for (name, shim) in [("A", &mut via_a), ("B", &mut via_b)] {
        assert!(
            !login(shim, "alice", &alice),
            "broker {name} saw the revocation, yet served a replayed copy"
        );
    }
}

/// Found by review: a string under a user's index made `revoke` fail before it told any broker,
/// so running brokers kept serving the user's revoked verdicts, and `POST /revoke` did not even
/// revoke on its own broker.
#[test]
fn garbage_under_a_users_keys_does_not_stop_their_revocation() {
    let (provider, redis) = (Provider::start(), Redis::start());
    let admin_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let admin_secret = dir.path().join("admin.secret");
    std::fs::write(&admin_secret, "admin-secret-77aa\n").unwrap();
    let a = start(
        &provider,
        &redis,
        &[
            "--admin-listen",
            &format!("127.0.0.1:{admin_port}"),
            "--admin-secret-file",
            &admin_secret.display().to_string(),
        ],
    );
    let b = start(&provider, &redis, &[]);
    let mut att = Attacker::connect(&redis);
    let (mut via_a, mut via_b) = (shim(&a), shim(&b));
    for user in ["alice", "bob"] {
        let tok = token(user);
        provider.insert(&tok, json!({"username": user}));
        let (_, verdict) = att.verdict_of(|| assert!(login(&mut via_a, user, &tok)));
        assert!(login(&mut via_b, user, &tok));
        let keys = format!("extauth:v2:{{u:{}}}", named_user(&verdict));
        att.set(&format!("{keys}:i"), "garbage");
        att.cmd(redis::cmd("RPUSH").arg(format!("{keys}:r")).arg("garbage"));
        provider.insert(&tok, json!({"active": false}));
        if user == "alice" {
            let out = try_revoke_cli(&redis, &a, user, None);
            assert!(
                out.status.success(),
                "revoke failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            let body = format!(r#"{{"domain": "{DOMAIN}", "user": "{user}"}}"#);
            let (status, answer) = http(
                admin_port,
                "POST",
                "/revoke",
                Some("admin-secret-77aa"),
                &body,
            );
            assert_eq!(status, 200, "{answer}");
        }
        std::thread::sleep(Duration::from_millis(1_000));
        for (name, shim) in [("A", &mut via_a), ("B", &mut via_b)] {
            assert!(
                !login(shim, user, &tok),
                "broker {name} kept {user}'s revoked verdict"
            );
        }
    }
}

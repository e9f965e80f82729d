//! The shim as ejabberd sees it: one 4-byte reply per request, fail closed, reconnect, exit on EOF.

use std::time::{Duration, Instant};

use extauth_testkit::fake_broker::{Answer, FakeBroker};
use extauth_testkit::services::{frame, token, Broker, BrokerSpec, Provider, Shim};
use serde_json::json;

#[test]
fn answers_zero_while_the_broker_is_down_and_one_once_it_is_up() {
    let provider = Provider::start();
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let mut broker = Broker::start(&BrokerSpec::new(&provider));
    broker.kill();
    let mut shim = Shim::spawn(&broker.addr(), 1.0, &["--connect-timeout", "0.3"]);
    let request = format!("auth:alice:example.com:{alice}");
    let started = Instant::now();
    assert!(!shim.ask(&request), "no broker: fail closed");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "within the timeout: {:?}",
        started.elapsed()
    );
    broker.launch(&BrokerSpec::new(&provider));
    assert!(shim.ask(&request), "same shim process, broker back");
    broker.kill();
    broker.launch(&BrokerSpec::new(&provider));
    assert!(shim.ask(&request), "reconnects after a broker restart");
}

#[test]
fn malformed_requests_do_not_disturb_the_stream() {
    let provider = Provider::start();
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let broker = Broker::start(&BrokerSpec::new(&provider));
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    let good = format!("auth:alice:example.com:{alice}");
    let requests: Vec<Vec<u8>> = vec![
        b"auth:alice".to_vec(),
        good.clone().into_bytes(),
        Vec::new(),
        b"frobnicate:a:b:c".to_vec(),
        b"auth:alice:example.com:\xff\xfe".to_vec(),
        good.clone().into_bytes(),
        b"isuser:alice:example.com:extra".to_vec(),
        format!("auth:alice:example.com:{alice}:with:colons").into_bytes(),
        good.into_bytes(),
    ];
    let expected = [false, true, false, false, false, true, false, false, true];
    // All requests in one write, as a burst of frames arriving together.
    let burst: Vec<u8> = requests.iter().flat_map(|r| frame(r)).collect();
    shim.send_raw(&burst);
    let got: Vec<bool> = (0..requests.len()).map(|_| shim.reply()).collect();
    assert_eq!(got, expected);
    let (rest, status) = shim.finish(Duration::from_secs(2));
    assert!(rest.is_empty(), "nothing but replies on stdout: {rest:?}");
    assert!(status.success());
}

#[test]
fn stdout_carries_exactly_four_bytes_per_request_and_eof_exits_zero() {
    let provider = Provider::start();
    let broker = Broker::start(&BrokerSpec::new(&provider));
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    let mut burst = Vec::new();
    for i in 0..40 {
        burst.extend(frame(format!("auth:user{i}:example.com:tok{i}").as_bytes()));
        burst.extend(frame(b"isuser:x:y"));
    }
    // A frame split in two writes, then EOF with half a frame pending.
    shim.send_raw(&burst);
    let (rest, status) = {
        let split = frame(b"auth:alice:example.com:slow-split");
        shim.send_raw(&split[..7]);
        std::thread::sleep(Duration::from_millis(50));
        shim.send_raw(&split[7..]);
        shim.send_raw(&[0, 9, b'a']);
        shim.finish(Duration::from_secs(5))
    };
    assert!(status.success(), "EOF -> exit 0, got {status}");
    assert_eq!(rest.len(), 81 * 4, "one 4-byte reply per complete request");
    assert!(
        rest.chunks(4).all(|c| c == [0, 2, 0, 0]),
        "unknown tokens -> 0"
    );
}

#[test]
fn the_largest_request_is_relayed() {
    let provider = Provider::start();
    let prefix = "auth:alice:example.com:";
    let big: String = "t".repeat(65_535 - prefix.len());
    provider.insert(&big, json!({"username": "alice"}));
    let mut spec = BrokerSpec::new(&provider);
    spec.extra = vec!["--max-token-len".into(), "65535".into()];
    let broker = Broker::start(&spec);
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    assert!(
        shim.ask(&format!("{prefix}{big}")),
        "65 535-byte frame, unsigned length"
    );
    assert!(
        !shim.ask(&format!("{prefix}{}", &big[1..])),
        "different token"
    );
    assert_eq!(provider.calls(), 2);
    let default_limit = Broker::start(&BrokerSpec::new(&provider));
    let mut shim = Shim::spawn(&default_limit.addr(), 5.0, &[]);
    assert!(
        !shim.ask(&format!("{prefix}{big}")),
        "over --max-token-len: refused"
    );
    assert_eq!(provider.calls(), 2, "without a provider call");
}

/// How late the fake broker answers the `late` user: well past the shim's `--timeout` (0.5 s).
const LATE: Duration = Duration::from_secs(2);

/// A broker that answers after the shim's `--timeout`, and answers out of turn: the shim must
/// refuse in time, drop the connection (a late answer on it could be taken for the next
/// request's), and never write anything but one reply per request.
///
/// Guards against two shim bugs: writing the late answer to ejabberd once it comes (ejabberd
/// would take it for the reply to its next request), and keeping the timed-out connection and
/// accepting whatever response comes first (the late "yes" would answer the next request). The
/// next request is only sent once the late answer has been sent and the shim has had time to
/// misuse it, so either bug shows as a wrong verdict or an extra reply, not only as a
/// connection count.
#[test]
fn a_late_answer_is_never_written_nor_taken_for_the_next_request() {
    // `late`: yes after LATE. `yes` and `no`: at once, each after a stray response with the
    // previous id and the opposite verdict (what a late answer to the previous request is).
    let broker = FakeBroker::start(|user| match user {
        "late" => Answer::late(true, LATE),
        "yes" => Answer::after_stray(true),
        _ => Answer::after_stray(false),
    });
    let connection_of = |user: &str| {
        let seen = broker.seen();
        let on = seen.iter().find(|s| s.user == user).map(|s| s.connection);
        (on, seen)
    };
    let mut shim = Shim::spawn(&broker.addr(), 0.5, &[]);
    let ask = |shim: &mut Shim, user: &str| {
        let ok = shim.ask(&format!("auth:{user}:example.com:t"));
        let extra = shim.unread(Duration::from_millis(50));
        assert!(extra.is_empty(), "more than one reply to {user}: {extra:?}");
        ok
    };
    let started = Instant::now();
    assert!(!ask(&mut shim, "late"), "no answer within --timeout: 0");
    assert!(
        started.elapsed() < LATE - Duration::from_millis(500),
        "refused at the timeout, not when the late answer came: {:?}",
        started.elapsed()
    );
    // The late "yes" has now been sent (or its write failed on the closed connection); a shim
    // still reading that connection has it, and has time to write it.
    broker.wait_all_answered(LATE * 2);
    let extra = shim.unread(Duration::from_millis(300));
    assert!(extra.is_empty(), "the late answer was written: {extra:?}");
    // `no` first: on a kept connection the late "yes" would be read before its answer.
    let no = ask(&mut shim, "no");
    assert!(
        !no,
        "neither the late yes nor the stray yes before it is its answer"
    );
    assert_eq!(
        connection_of("no").0,
        Some(1),
        "the next request goes on a new connection: {:?}",
        connection_of("no").1
    );
    assert!(
        ask(&mut shim, "yes"),
        "answered with its own id, not the stray no before it"
    );
    let (rest, status) = shim.finish(Duration::from_secs(5));
    assert!(rest.is_empty(), "nothing after the three replies: {rest:?}");
    assert!(status.success(), "EOF -> exit 0, got {status}");
    assert_eq!(
        (connection_of("late").0, connection_of("yes").0),
        (Some(0), Some(1)),
        "the new connection is kept"
    );
    assert_eq!(broker.connections(), 2);
}

#[test]
fn a_socket_that_accepts_while_its_broker_is_down_does_not_block_failover() {
    let provider = Provider::start();
    let alice = token("alice");
    provider.insert(&alice, json!({"username": "alice"}));
    let broker = Broker::start(&BrokerSpec::new(&provider));
    // What systemd does while the local broker restarts: the socket accepts, nobody answers.
    let dir = tempfile::tempdir().unwrap();
    let silent = dir.path().join("silent.sock");
    let _held = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let brokers = format!("unix:{},{}", silent.display(), broker.addr());
    let mut shim = Shim::spawn(&brokers, 5.0, &["--connect-timeout", "2"]);
    let started = Instant::now();
    assert!(
        shim.ask(&format!("auth:alice:example.com:{alice}")),
        "served by the second broker"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "within the connect budget: {:?}",
        started.elapsed()
    );
}

//! CI smoke of `extauth-load`: every scenario briefly, through real shims, the wire protocol,
//! the broker's HTTP front and the seed-style baseline, against brokers it starts with its mock provider. Asserts
//! correctness only (no wrong verdict, the expected provider calls), never timings: performance
//! figures live in docs/benchmarks.md.

use std::path::Path;
use std::process::Command;

use extauth_testkit::harness::{num, run as load, run_with_env as load_with_env};
use serde_json::Value;

/// No wrong verdict, nothing broken, and exactly one provider call per distinct login.
fn assert_correct(report: &Value) {
    assert_eq!(num(report, "wrong_verdicts"), 0, "{report}");
    assert_eq!(report["counts"]["errors"], 0, "{report}");
    assert_eq!(
        num(report, "provider_calls"),
        num(report, "expected_provider_calls"),
        "{report}"
    );
    assert!(num(report, "answered") > 0, "{report}");
}

#[test]
fn hot_costs_one_provider_call_per_token() {
    let report = load(&[
        "--scenario",
        "hot",
        "--tokens",
        "40",
        "--nodes",
        "2",
        "--pool-size",
        "4",
        "--requests",
        "600",
    ]);
    assert_correct(&report);
    assert_eq!(num(&report, "provider_calls"), 40);
    assert_eq!(num(&report, "answered"), 600);
    assert_eq!(report["counts"]["accepts"], 600);
}

/// A reconnect storm: the tokens were validated through one broker, the other has never seen
/// them. Every measured answer must come from Redis (the provider is asked only in the
/// warm-up), right, and for a few Redis commands each.
#[test]
fn a_storm_of_tokens_known_to_redis_costs_no_provider_call() {
    let redis = extauth_testkit::services::Redis::start();
    let url = redis.url();
    let report = load(&[
        "--scenario",
        "storm",
        "--via",
        "wire",
        "--connections",
        "2",
        "--depth",
        "16",
        "--brokers",
        "2",
        "--redis",
        &url,
        "--tokens",
        "300",
    ]);
    assert_correct(&report);
    assert_eq!(num(&report, "answered"), 300, "{report}");
    assert_eq!(report["counts"]["accepts"], 300, "{report}");
    assert_eq!(num(&report, "warmup_requests"), 300, "{report}");
    assert_eq!(num(&report, "provider_calls"), 300, "{report}");
    // A verdict and the token's mark (one MGET), then the user's mark: two commands, for which
    // concurrent misses share round trips (the connection pipelines them).
    let commands = report["redis_commands_per_auth"]
        .as_f64()
        .expect("redis figures");
    let trips = report["redis_round_trips_per_auth"]
        .as_f64()
        .expect("redis figures");
    assert!((1.0..=3.0).contains(&commands), "{report}");
    assert!(trips > 0.0 && trips <= commands, "{report}");
}

#[test]
fn the_http_front_lane_answers_the_same_scenario_from_the_same_cache() {
    // Mixed verdicts through the broker's HTTP check front: refusals are `false`, never errors.
    let report = load(&[
        "--via",
        "http",
        "--scenario",
        "mixed",
        "--tokens",
        "40",
        "--invalid-pct",
        "10",
        "--foreign-pct",
        "10",
        "--nodes",
        "2",
        "--pool-size",
        "4",
        "--requests",
        "600",
    ]);
    assert_correct(&report);
    assert_eq!(num(&report, "answered"), 600);
    assert!(
        report["counts"]["rejects"].as_u64().unwrap() > 0,
        "{report}"
    );
}

#[test]
fn garbage_floods_cost_what_they_must_and_refuse_every_made_up_token() {
    // One unknown token tried for every user: one provider call in all.
    let users = load(&[
        "--scenario",
        "flood-users",
        "--tokens",
        "50",
        "--nodes",
        "2",
        "--pool-size",
        "4",
        "--requests",
        "400",
    ]);
    assert_correct(&users);
    assert_eq!(num(&users, "provider_calls"), 1);
    assert_eq!(users["counts"]["rejects"], 400);
    // A new unknown token for one user on every request: one call each, all refused.
    let tokens = load(&[
        "--scenario",
        "flood-tokens",
        "--via",
        "wire",
        "--connections",
        "2",
        "--depth",
        "16",
        "--requests",
        "300",
    ]);
    assert_correct(&tokens);
    assert_eq!(num(&tokens, "provider_calls"), 300);
    assert_eq!(tokens["counts"]["rejects"], 300);
    // Real users' new logins among the garbage: every one accepted, and timed on their own.
    let flood = load(&[
        "--scenario",
        "flood",
        "--valid-every",
        "5",
        "--nodes",
        "2",
        "--pool-size",
        "4",
        "--requests",
        "500",
    ]);
    assert_correct(&flood);
    assert_eq!(flood["counts"]["accepts"], 100, "{flood}");
    assert_eq!(flood["counts"]["rejects"], 400, "{flood}");
    assert!(
        flood["valid_logins_us"]["p50"]
            .as_f64()
            .is_some_and(|p50| p50 > 0.0),
        "{flood}"
    );
}

#[test]
fn cold_costs_one_provider_call_per_request() {
    let report = load(&[
        "--scenario",
        "cold",
        "--nodes",
        "2",
        "--pool-size",
        "2",
        "--requests",
        "200",
    ]);
    assert_correct(&report);
    assert_eq!(num(&report, "provider_calls"), 200);
}

#[test]
fn a_herd_of_one_new_token_costs_one_provider_call_per_round() {
    // 3 rounds of 30 shims at once; the slow provider keeps each flight open while the herd arrives.
    let report = load(&[
        "--scenario",
        "herd",
        "--nodes",
        "3",
        "--pool-size",
        "10",
        "--requests",
        "90",
        "--provider-latency",
        "200",
    ]);
    assert_correct(&report);
    assert_eq!(num(&report, "provider_calls"), 3);
    assert_eq!(report["counts"]["accepts"], 90);
}

#[test]
fn a_herd_over_the_wire_protocol_costs_one_call() {
    let report = load(&[
        "--via",
        "wire",
        "--scenario",
        "herd",
        "--connections",
        "4",
        "--depth",
        "50",
        "--requests",
        "200",
        "--provider-latency",
        "200",
    ]);
    assert_correct(&report);
    assert_eq!(num(&report, "provider_calls"), 1);
}

#[test]
fn mixed_refuses_unknown_and_foreign_tokens() {
    let report = load(&[
        "--scenario",
        "mixed",
        "--tokens",
        "200",
        "--invalid-pct",
        "10",
        "--foreign-pct",
        "10",
        "--seed",
        "7",
        "--nodes",
        "2",
        "--pool-size",
        "4",
        "--requests",
        "1500",
    ]);
    assert_correct(&report);
    assert!(
        num(&report["counts"], "rejects") > 0,
        "some tokens must be refused: {report}"
    );
}

#[test]
fn expiring_tokens_are_refused_after_exp_and_asked_about_twice() {
    let report = load(&[
        "--scenario",
        "expiry",
        "--tokens",
        "20",
        "--expire-after",
        "2",
        "--duration",
        "4",
        "--nodes",
        "1",
        "--pool-size",
        "4",
    ]);
    assert_correct(&report);
    // Each token: one call while valid, one after `exp` (then cached as expired).
    assert_eq!(num(&report, "provider_calls"), 40);
    assert!(num(&report["counts"], "rejects") > 0, "{report}");
}

#[test]
fn provider_failures_fail_closed_and_are_never_cached() {
    let report = load(&[
        "--via",
        "wire",
        "--scenario",
        "mixed",
        "--tokens",
        "50",
        "--requests",
        "800",
        "--provider-error-rate",
        "0.3",
    ]);
    assert_eq!(num(&report, "wrong_verdicts"), 0, "{report}");
    assert!(num(&report, "provider_errors") > 0, "{report}");
    assert!(
        report["expected_provider_calls"].is_null(),
        "failed calls are retried: no exact count"
    );
}

#[test]
fn open_loop_runs_answer_every_scheduled_request() {
    let report = load(&[
        "--scenario",
        "hot",
        "--tokens",
        "10",
        "--rate",
        "400",
        "--duration",
        "1",
        "--nodes",
        "1",
        "--pool-size",
        "4",
    ]);
    assert_correct(&report);
    assert_eq!(report["pace"], "open");
    assert_eq!(num(&report, "unanswered"), 0, "{report}");
}

#[test]
fn the_seed_style_baseline_asks_the_provider_every_time() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/baselines/seed_extauth.py");
    let via = format!("python3 {}", script.display());
    let report = load(&[
        "--via",
        "program",
        &via,
        "--scenario",
        "mixed",
        "--tokens",
        "30",
        "--nodes",
        "1",
        "--pool-size",
        "4",
        "--requests",
        "200",
    ]);
    assert_eq!(num(&report, "wrong_verdicts"), 0, "{report}");
    assert_eq!(
        num(&report, "provider_calls"),
        200,
        "no cache: one call per auth"
    );
}

#[test]
fn floors_answer_without_a_decision() {
    let report = load(&["--floor", "--requests", "300", "--tokens", "10"]);
    assert!(report["wrong_verdicts"].is_null());
    assert_eq!(num(&report, "provider_calls"), 0);
    let echo = format!("{} echo", extauth_testkit::services::load_bin().display());
    let report = load(&[
        "--via",
        "program",
        &echo,
        "--no-verify",
        "--requests",
        "300",
        "--tokens",
        "10",
    ]);
    assert_eq!(num(&report["counts"], "accepts"), 300);
}

/// `--validator jwt`: the brokers verify EdDSA JWTs against the mock's JWKS, so every scenario
/// costs one key fetch, whatever the number of tokens; forged, foreign and expired ones are
/// refused.
#[test]
fn jwt_scenarios_cost_one_key_fetch() {
    for scenario in ["hot", "cold", "herd", "mixed", "expiry"] {
        let report = load(&[
            "--validator",
            "jwt",
            "--scenario",
            scenario,
            "--tokens",
            "30",
            "--expire-after",
            "1",
            "--duration",
            "2.5",
            "--nodes",
            "2",
            "--pool-size",
            "2",
        ]);
        assert_eq!(num(&report, "wrong_verdicts"), 0, "{scenario}: {report}");
        assert_eq!(report["counts"]["errors"], 0, "{scenario}: {report}");
        assert_eq!(report["provider"], "mock jwt", "{report}");
        assert_eq!(num(&report, "provider_calls"), 1, "{scenario}: {report}");
        assert!(report["expected_provider_calls"].is_null(), "{report}");
        let rejects = num(&report["counts"], "rejects");
        match scenario {
            "mixed" | "expiry" => assert!(rejects > 0, "{scenario}: {report}"),
            _ => assert_eq!(rejects, 0, "{scenario}: {report}"),
        }
    }
}

/// `--provider-url` with `--token-file`: started brokers use a provider the harness does not
/// run (here `extauth-load provider`, a separate process), with real users' tokens from a file.
#[test]
fn a_real_provider_is_driven_with_listed_tokens() {
    let port = extauth_testkit::services::free_port();
    let secret = "listed-tokens-test-secret";
    let mut provider = Reaped(
        Command::new(extauth_testkit::services::load_bin())
            .args(["provider", "--listen", &format!("127.0.0.1:{port}")])
            .env("EXTAUTH_CLIENT_SECRET", secret)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    extauth_testkit::services::wait_until(
        std::time::Duration::from_secs(10),
        "the provider to listen",
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    let lines: String = (0..20)
        .map(|i| format!("user{i} listed.{i}.4102444800.{i}\n"))
        .collect();
    std::fs::write(&file, format!("# user token\n{lines}")).unwrap();
    let url = format!("http://127.0.0.1:{port}/introspect");
    let args = [
        "--provider-url",
        &url,
        "--token-file",
        file.to_str().unwrap(),
        "--scenario",
        "mixed",
        "--invalid-pct",
        "20",
        "--foreign-pct",
        "20",
        "--nodes",
        "2",
        "--pool-size",
        "2",
        "--requests",
        "500",
    ];
    let report = load_with_env(&args, &[("EXTAUTH_CLIENT_SECRET", secret)]);
    assert_eq!(num(&report, "wrong_verdicts"), 0, "{report}");
    assert_eq!(report["counts"]["errors"], 0, "{report}");
    assert_eq!(report["provider"], "real", "{report}");
    assert!(report["provider_calls"].is_null(), "{report}");
    assert!(num(&report["counts"], "rejects") > 0, "{report}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(provider.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut printed = String::new();
    let mut stdout = provider.0.stdout.take().unwrap();
    std::io::Read::read_to_string(&mut stdout, &mut printed).unwrap();
    let calls: u64 = printed
        .split("mock provider: ")
        .nth(2)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no call count in {printed:?}"));
    // 20 tokens, each at most once as its owner's, once unknown, once foreign.
    assert!((1..=60).contains(&calls), "{calls} calls");
}

/// A child process killed and reaped when the test ends, even by a failed assertion.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

//! CI smoke of `extauth-load`: every scenario briefly, through real shims, the wire protocol and
//! the seed-style baseline, against brokers it starts with its mock provider. Asserts
//! correctness only (no wrong verdict, the expected provider calls), never timings: performance
//! figures live in docs/benchmarks.md.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::services::{printed, shim_bin};
use serde_json::Value;

/// Runs `extauth-load` with `args` (plus `--quiet --json`) and returns its JSON report.
fn load(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_extauth-load"))
        .args(args)
        .arg("--shim")
        .arg(shim_bin())
        .arg("--quiet")
        .arg("--json")
        .arg(&json)
        .output()
        .expect("running extauth-load");
    let shown = printed(&output);
    assert!(
        output.status.success(),
        "extauth-load {args:?} failed:\n{shown}"
    );
    println!("extauth-load {}\n{shown}", args.join(" "));
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn num(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {report}"))
}

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
    let echo = format!(
        "{} echo",
        PathBuf::from(env!("CARGO_BIN_EXE_extauth-load")).display()
    );
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

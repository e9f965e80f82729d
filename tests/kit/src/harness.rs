//! Running the real `extauth-load` binary and reading its JSON report.

use std::process::Command;

use serde_json::Value;

use super::services::{load_bin, printed, shim_bin};

/// Runs `extauth-load` with `args` (plus `--shim`, `--quiet --json`), asserts it succeeded
/// (printing its output either way) and returns its JSON report.
pub fn run(args: &[&str]) -> Value {
    run_with_env(args, &[])
}

/// [`run`] with extra environment variables.
pub fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = Command::new(load_bin())
        .args(args)
        .envs(env.iter().copied())
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

/// The unsigned number `field` of `report`; panics (showing the report) when it is missing.
pub fn num(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {report}"))
}

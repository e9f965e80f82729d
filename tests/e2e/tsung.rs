//! A small tsung login storm through a real two-node ejabberd cluster (started by
//! `extauth-lab ejabberd-cluster`, the tests' own launcher): `deploy/tsung/run.sh`
//! with 40 good and 5 bad tokens, each logging in twice (`--relogin`), once through
//! extauth-shim + extauth-broker + the mock provider and once through
//! `extauth-load echo --check-tokens`. Asserts the counts of the
//! script's `summary.env` (tsung, ejabberd's logs, the broker and the provider must agree),
//! never a timing: figures live in docs/benchmarks.md.
//!
//! Skips loudly without ejabberd or tsung, unless `EXTAUTH_REQUIRE_EJABBERD=1` (CI).
//! `KEEP_ON_FAIL=1` reaches the script: a failing storm is left running for inspection.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use extauth_testkit::ejabberd::{find_program, free_ports, missing_for_cluster, runnable};
use extauth_testkit::services::{broker_bin, lab_bin, printed, shim_bin};

const USERS: u64 = 40;
const BAD: u64 = 5;

/// `key=value` lines of the script's summary.
fn summary(path: &Path) -> HashMap<String, String> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn login_storm_counts_agree_through_the_broker_and_the_local_program() {
    let mut missing = missing_for_cluster();
    if find_program("tsung").is_none() {
        missing.push("tsung (apt-get install tsung)".to_string());
    }
    if !runnable("The tsung login storm test", &missing) {
        return;
    }
    // The script takes its four binaries from one directory: cargo's, where the shim is
    // built next to the broker, extauth-load and extauth-lab (the cluster launcher).
    let bin_dir = shim_bin()
        .parent()
        .expect("the shim's directory")
        .to_path_buf();
    assert_eq!(Some(bin_dir.as_path()), broker_bin().parent());
    assert_eq!(Some(bin_dir.as_path()), lab_bin().parent());
    for bin in ["extauth-load", "extauth-lab"] {
        assert!(
            bin_dir.join(bin).exists(),
            "{bin} missing in {}",
            bin_dir.display()
        );
    }
    let out = tempfile::tempdir().expect("results dir");
    // Free ports, so the test runs next to a stock ejabberd or another storm.
    let ports = free_ports(5);
    let output = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tsung/run.sh"))
        .args(["--users", &USERS.to_string(), "--bad", &BAD.to_string()])
        .args(["--rate", "50", "--pool-size", "2", "--relogin"])
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(out.path())
        .args(["--c2s-ports", &format!("{},{}", ports[0], ports[1])])
        .args(["--epmd-port", &ports[2].to_string()])
        .args(["--provider-port", &ports[3].to_string()])
        .args(["--metrics-port", &ports[4].to_string()])
        .output()
        .expect("running deploy/tsung/run.sh");
    let shown = printed(&output);
    println!("{shown}");
    assert!(output.status.success(), "run.sh failed:\n{shown}");

    let s = summary(&out.path().join("summary.env"));
    let get = |key: &str| -> u64 {
        s.get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} missing or not a number in summary.env: {s:?}"))
    };
    assert_eq!(s.get("checks").map(String::as_str), Some("ok"), "{s:?}");
    // Every user logs in twice: the second login of each is answered from the broker's cache.
    for run in ["shim", "local"] {
        for transaction in ["tr_sasl_auth", "tr_sasl_again"] {
            let count = get(&format!("{run}.{transaction}.count"));
            assert_eq!(count, USERS + BAD, "{run} {transaction}");
        }
        let success = get(&format!("{run}.match"));
        assert_eq!(success, 2 * USERS, "{run}: tsung saw <success/>");
        assert_eq!(get(&format!("{run}.nomatch")), 2 * BAD, "{run}");
        assert_eq!(get(&format!("{run}.users_finished")), USERS + BAD, "{run}");
        assert_eq!(get(&format!("{run}.tsung_errors")), 0, "{run}");
        assert_eq!(get(&format!("{run}.ejabberd.accepted")), 2 * USERS, "{run}");
        assert_eq!(get(&format!("{run}.ejabberd.failed")), 2 * BAD, "{run}");
    }
    assert_eq!(get("shim.broker.accepted"), 2 * USERS);
    assert_eq!(get("shim.broker.refused"), 2 * BAD);
    let calls = get("shim.provider_calls");
    assert!(
        (USERS..=USERS + BAD).contains(&calls),
        "{calls} provider calls for {USERS} good and {BAD} bad distinct tokens, each used twice"
    );
    assert_eq!(
        get("shim.mock_provider_calls"),
        get("shim.provider_calls_with_warmup"),
        "the mock answered every call the broker made, and no other"
    );
}

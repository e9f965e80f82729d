//! `extauth-lab ejabberd-cluster`, the tests' cluster launcher as a binary for scripts
//! (`deploy/tsung/run.sh` drives it): it prints what a script needs, the cluster it describes
//! is up, and SIGTERM stops every process it started and removes its temp dir.
//!
//! Skips loudly without an ejabberd install, unless `EXTAUTH_REQUIRE_EJABBERD=1` (CI).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use extauth_testkit::ejabberd::{missing_for_cluster, runnable, sasl_mechanisms, DOMAIN};
use extauth_testkit::services::{lab_bin, printed};

/// Exists and is no zombie (docs/testing.md, pitfall 12).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

#[test]
fn the_lab_reports_a_running_cluster_and_sigterm_leaves_nothing_behind() {
    if !runnable("The extauth-lab test", &missing_for_cluster()) {
        return;
    }
    let stderr = tempfile::NamedTempFile::new().unwrap();
    // `cat` as the extauth program: it stays alive, which is all the launcher checks.
    let mut lab = Command::new(lab_bin())
        .args([
            "ejabberd-cluster",
            "--program",
            "/bin/cat",
            "--pool-size",
            "1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr.reopen().unwrap())
        .spawn()
        .expect("start extauth-lab");
    let mut facts = HashMap::new();
    for line in BufReader::new(lab.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line == "READY=1" {
            break;
        }
        let (key, value) = line.split_once('=').expect("KEY=VALUE");
        facts.insert(key.to_string(), value.to_string());
    }
    let log = || std::fs::read_to_string(stderr.path()).unwrap_or_default();
    let fact = |key: &str| -> String {
        facts
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("no {key} in {facts:?}; stderr:\n{}", log()))
    };
    assert_eq!(fact("NODES"), "2");
    assert_eq!(fact("POOL_SIZE"), "1");

    // The nodes, epmd and one program per node run; node 2 is in node 1's cluster.
    let mut pids = vec![fact("EPMD_PID")];
    for n in 1..=2 {
        pids.push(fact(&format!("NODE{n}_BEAM_PID")));
        let programs: Vec<String> = fact(&format!("NODE{n}_EXTAUTH_PIDS"))
            .split(' ')
            .map(String::from)
            .collect();
        assert_eq!(programs.len(), 1, "node {n}: {programs:?}");
        pids.extend(programs);
        let port: u16 = fact(&format!("NODE{n}_C2S_PORT")).parse().unwrap();
        let mechanisms = sasl_mechanisms(port, DOMAIN).unwrap();
        assert!(mechanisms.iter().any(|m| m == "PLAIN"), "{mechanisms:?}");
    }
    for pid in &pids {
        assert!(alive(pid), "pid {pid} not running; {facts:?}");
    }
    let listed = Command::new("sh")
        .arg("-c")
        .arg(format!("{} list_cluster", fact("NODE1_CTL")))
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", printed(&listed));
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(&fact("NODE2_NAME")),
        "list_cluster on node 1: {listed}"
    );

    let t_stop = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lab.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = lab.wait().unwrap();
    assert!(
        status.success(),
        "extauth-lab: {status}; stderr:\n{}",
        log()
    );
    assert!(
        t_stop.elapsed() < Duration::from_secs(40),
        "stopping took {:?}",
        t_stop.elapsed()
    );
    let left: Vec<&String> = pids.iter().filter(|pid| alive(pid)).collect();
    assert!(
        left.is_empty(),
        "still running after the stop: {left:?}; stderr:\n{}",
        log()
    );
    let dir = fact("CLUSTER_DIR");
    assert!(
        !std::path::Path::new(&dir).exists(),
        "{dir} left behind; stderr:\n{}",
        log()
    );
}

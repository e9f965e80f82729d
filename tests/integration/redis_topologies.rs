//! The shared store on a real 3-master Redis Cluster, and behind Sentinel through a forced
//! failover, with real brokers and shims.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use extauth_testkit::services::{
    broker_bin, free_port, token, wait_until, Broker, BrokerSpec, Provider, Redis, Shim,
};
use serde_json::json;

/// Three masters, slots assigned with `redis-cli --cluster create`.
fn cluster() -> Vec<Redis> {
    let nodes: Vec<Redis> = (0..3)
        .map(|_| {
            Redis::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
                "--cluster-config-file",
                "nodes.conf",
            ])
        })
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli");
    assert!(
        out.status.success(),
        "cluster create: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_until(Duration::from_secs(20), "cluster_state:ok", || {
        nodes.iter().all(|n| {
            n.command(&["CLUSTER", "INFO"])
                .is_ok_and(|i| i.contains("cluster_state:ok"))
        })
    });
    nodes
}

fn cluster_spec<'a>(provider: &'a Provider, nodes: &[Redis]) -> BrokerSpec<'a> {
    let urls: Vec<String> = nodes.iter().map(Redis::url).collect();
    let mut spec = BrokerSpec::new(provider);
    spec.extra = vec![
        "--redis-mode".into(),
        "cluster".into(),
        "--redis".into(),
        urls.join(","),
    ];
    spec
}

#[test]
fn a_redis_cluster_shares_verdicts_locks_and_revocations() {
    let provider = Provider::start();
    let nodes = cluster();
    let spec = cluster_spec(&provider, &nodes);
    let (a, b) = (Broker::start(&spec), Broker::start(&spec));
    let (mut via_a, mut via_b) = (
        Shim::spawn(&a.addr(), 5.0, &[]),
        Shim::spawn(&b.addr(), 5.0, &[]),
    );
    let tokens: Vec<String> = (0..12).map(|i| token(&format!("cluster-{i}"))).collect();
    for t in &tokens {
        provider.insert(t, json!({"username": "alice"}));
        assert!(via_a.ask(&format!("auth:alice:example.com:{t}")));
    }
    assert_eq!(provider.calls(), 12);
    for t in &tokens {
        assert!(
            via_b.ask(&format!("auth:alice:example.com:{t}")),
            "shared through the cluster"
        );
    }
    assert_eq!(
        provider.calls(),
        12,
        "keys spread over the slots of three masters, all found"
    );
    let spread = nodes
        .iter()
        .filter(|n| n.command(&["DBSIZE"]).is_ok_and(|r| r != ":0"))
        .count();
    assert!(spread >= 2, "verdicts live on several masters ({spread})");

    provider.insert(&tokens[0], json!({"active": false}));
    let revoked = Command::new(broker_bin())
        .args([
            "revoke",
            "--redis-mode",
            "cluster",
            "--redis",
            &nodes.iter().map(Redis::url).collect::<Vec<_>>().join(","),
            "--domain",
            "example.com",
            "--user",
            "alice",
        ])
        .arg("--cache-secret-file")
        .arg(a.cache_secret_file())
        .output()
        .unwrap();
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !via_b.ask(&format!("auth:alice:example.com:{}", tokens[0])),
        "revoked on broker B (pub/sub through the cluster)"
    );
    assert!(
        !via_a.ask(&format!("auth:alice:example.com:{}", tokens[0])),
        "and on broker A"
    );
    assert_eq!(provider.calls(), 13);
}

/// A sentinel process watching `master` as `mymaster` (quorum 2, 1 s down-after).
fn sentinel(dir: &std::path::Path, master_port: u16) -> (Child, u16) {
    let port = free_port();
    let conf = dir.join(format!("sentinel-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {master_port} 2\nsentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n",
            dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(extauth_testkit::services::redis_server_bin())
        .arg(&conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    (child, port)
}

fn sentinel_master_port(sentinel_port: u16) -> Option<u16> {
    let out = Command::new("redis-cli")
        .args([
            "-p",
            &sentinel_port.to_string(),
            "SENTINEL",
            "get-master-addr-by-name",
            "mymaster",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

#[test]
fn the_broker_follows_a_sentinel_failover_and_keeps_answering() {
    let provider = Provider::start();
    let master = Redis::start();
    let replica = Redis::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    wait_until(Duration::from_secs(20), "replication", || {
        master
            .command(&["INFO", "replication"])
            .is_ok_and(|i| i.contains("connected_slaves:1"))
    });
    let dir = tempfile::tempdir().unwrap();
    let mut sentinels: Vec<(Child, u16)> =
        (0..3).map(|_| sentinel(dir.path(), master.port)).collect();
    wait_until(Duration::from_secs(20), "sentinels", || {
        sentinels
            .iter()
            .all(|(_, p)| sentinel_master_port(*p) == Some(master.port))
    });
    let urls: Vec<String> = sentinels
        .iter()
        .map(|(_, p)| format!("redis://127.0.0.1:{p}"))
        .collect();
    let mut spec = BrokerSpec::new(&provider);
    spec.extra = vec![
        "--redis-mode".into(),
        "sentinel".into(),
        "--redis".into(),
        urls.join(","),
        "--redis-master".into(),
        "mymaster".into(),
    ];
    let (a, b) = (Broker::start(&spec), Broker::start(&spec));
    let cached = token("sentinel-cached");
    provider.insert(&cached, json!({"username": "alice"}));
    let mut via_a = Shim::spawn(&a.addr(), 5.0, &[]);
    assert!(via_a.ask(&format!("auth:alice:example.com:{cached}")));
    assert!(Shim::spawn(&b.addr(), 5.0, &[]).ask(&format!("auth:alice:example.com:{cached}")));
    assert_eq!(
        provider.calls(),
        1,
        "shared through the master the sentinels named"
    );

    // Logins keep flowing through broker A while the sentinels move the master: a cached token
    // and a new token each round, so every round reads, locks and writes Redis.
    let fresh_tokens: Vec<String> = (0..1000).map(|i| token(&format!("load-{i}"))).collect();
    for t in &fresh_tokens {
        provider.insert(t, json!({"username": "alice"}));
    }
    let (stop, refused, answered) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let load = {
        let (stop, refused, answered) = (stop.clone(), refused.clone(), answered.clone());
        let (addr, cached) = (a.addr(), cached.clone());
        std::thread::spawn(move || {
            let mut shim = Shim::spawn(&addr, 5.0, &[]);
            for fresh in fresh_tokens
                .iter()
                .take_while(|_| !stop.load(Ordering::SeqCst))
            {
                for t in [&cached, fresh] {
                    if !shim.ask(&format!("auth:alice:example.com:{t}")) {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let out = Command::new("redis-cli")
        .args([
            "-p",
            &sentinels[0].1.to_string(),
            "SENTINEL",
            "FAILOVER",
            "mymaster",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("OK"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_until(Duration::from_secs(30), "the failover", || {
        sentinel_master_port(sentinels[0].1) == Some(replica.port)
    });
    wait_until(Duration::from_secs(30), "the old master to follow", || {
        master.command(&["ROLE"]).is_ok_and(|r| r.contains("slave"))
    });

    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    // New tokens after the failover: once A has re-resolved the master (a Redis error may make
    // it skip Redis for a second first), a token A validates is written to the new master and
    // B takes it from there: one provider call for both.
    let mut attempt = 0;
    wait_until(
        Duration::from_secs(20),
        "a verdict shared through the new master",
        || {
            attempt += 1;
            let fresh = token(&format!("sentinel-fresh-{attempt}"));
            provider.insert(&fresh, json!({"username": "bob"}));
            let calls = provider.calls();
            let request = format!("auth:bob:example.com:{fresh}");
            let shared = via_a.ask(&request)
                && Shim::spawn(&b.addr(), 5.0, &[]).ask(&request)
                && provider.calls() == calls + 1;
            shared || {
                std::thread::sleep(Duration::from_millis(300));
                false
            }
        },
    );
    assert!(
        replica.command(&["DBSIZE"]).is_ok_and(|r| r != ":0"),
        "written to the new master"
    );
    assert!(answered.load(Ordering::SeqCst) > 10, "the load ran");
    assert_eq!(
        refused.load(Ordering::SeqCst),
        0,
        "no valid login refused during the failover"
    );
    assert!(a
        .log()
        .contains("Redis master resolved through the sentinels"));
    for (child, _) in &mut sentinels {
        let _ = child.kill();
        let _ = child.wait();
    }
}

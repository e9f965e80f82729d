//! The revoke hook against a real two-node ejabberd cluster: a real XMPP client holds a session
//! open with its token; `extauth-broker revoke --user` with `[on_revoke] kick` configured ends
//! that session through ejabberd (`mod_http_api`'s `kick_user`, and `ejabberdctl kick_user`),
//! and the same token no longer logs in; so does `POST /revoke` on a broker running the hook. A control user revoked without the hook stays
//! connected: a revocation alone never ends an open session. A hook that cannot reach ejabberd
//! makes `revoke` exit 1 with the reason; a token revocation says it cannot kick, and does not.
//! Also checks the cluster offers PLAIN and not X-OAUTH2 (`disable_sasl_mechanisms`).
//!
//! Skips loudly without an ejabberd install, unless `EXTAUTH_REQUIRE_EJABBERD=1` (CI).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use extauth_testkit::ejabberd::{sasl_mechanisms, xmpp_login, Cluster, XmppSession, DOMAIN};
use extauth_testkit::faults::http as http_request;
use extauth_testkit::services::{
    broker_bin, free_port, now_s, printed, shim_bin, token, Broker, BrokerSpec, Provider, Redis,
};
use serde_json::json;

/// How long a client keeps its session when nobody ends it (the test ends them all sooner).
const HOLD: Duration = Duration::from_secs(45);

/// `extauth-broker revoke --config FILE --domain localhost --user USER`, run from the cluster's
/// directory with `env` added (the ejabberdctl variant needs the cluster's epmd port).
fn revoke(config: &Path, cwd: &Path, user: &str, env: &[(String, String)]) -> Output {
    Command::new(broker_bin())
        .arg("revoke")
        .arg("--config")
        .arg(config)
        .args(["--domain", DOMAIN, "--user", user])
        .current_dir(cwd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run extauth-broker revoke")
}

/// A revoke configuration: the brokers' Redis and cache secret, and `on_revoke` (TOML) if any.
fn revoke_config(
    dir: &Path,
    name: &str,
    redis: &Redis,
    broker: &Broker,
    on_revoke: &str,
) -> std::path::PathBuf {
    let path = dir.join(name);
    let text = format!(
        "redis = \"{}\"\ncache_secret_file = \"{}\"\n{on_revoke}",
        redis.url(),
        broker.cache_secret_file().display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn revoking_a_user_with_the_kick_hook_ends_their_open_session() {
    if !Cluster::available() {
        return;
    }
    let provider = Provider::start();
    let redis = Redis::start();
    let port = free_port();
    let mut spec = BrokerSpec::new(&provider).with_redis(&redis);
    spec.extra = vec!["--listen".into(), format!("tcp:127.0.0.1:{port}")];
    let broker = Broker::start(&spec);
    let users = ["alice", "bob", "carol", "dave"];
    let tokens: Vec<String> = users.iter().map(|u| token(u)).collect();
    for (user, t) in users.iter().zip(&tokens) {
        provider.insert(t, json!({"username": user, "exp": now_s() + 3600}));
    }
    let cluster = Cluster::start_with(|dir| {
        let shim = dir.join("extauth-shim");
        std::fs::copy(shim_bin(), &shim).expect("copy the shim where user ejabberd can run it");
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
        format!(
            "{} --broker tcp:127.0.0.1:{port} --timeout 5",
            shim.display()
        )
    });
    let t_test = std::time::Instant::now();
    // docs/ejabberd.md: disable_sasl_mechanisms keeps clients off X-OAUTH2, which never reaches
    // extauth (the harness's ejabberd.yml sets it).
    let mechanisms = sasl_mechanisms(cluster.c2s_port(1), DOMAIN).unwrap();
    assert!(
        mechanisms.iter().any(|m| m == "PLAIN") && !mechanisms.iter().any(|m| m == "X-OAUTH2"),
        "{mechanisms:?}"
    );
    let diagnostics = |what: &str| {
        format!(
            "{what}\n{}\n{}\n--- broker ---\n{}",
            cluster.logs(1),
            cluster.logs(2),
            broker.log()
        )
    };
    let open = |node: usize, i: usize| {
        XmppSession::open(cluster.c2s_port(node), users[i], DOMAIN, &tokens[i], HOLD)
            .unwrap_or_else(|e| panic!("{}", diagnostics(&format!("{}: {e}", users[i]))))
    };
    // alice on node 2 (kicked through node 1's API: kick_user acts cluster-wide), bob and
    // carol on node 1.
    let (mut alice, mut bob, mut carol, mut dave) =
        (open(2, 0), open(1, 1), open(1, 2), open(2, 3));
    // The provider revokes every token; the broker's cached verdicts still vouch for them.
    for t in &tokens {
        provider.insert(t, json!({"active": false}));
    }
    let dir = tempfile::tempdir().unwrap();

    // Control: bob revoked without a hook stays connected.
    let plain = revoke_config(dir.path(), "plain.toml", &redis, &broker, "");
    let out = revoke(&plain, cluster.dir(), "bob", &[]);
    assert!(out.status.success(), "{}", printed(&out));
    assert!(
        bob.wait_end(Duration::from_secs(2)).is_none(),
        "without the hook a revocation leaves the session open: {}",
        bob.output()
    );

    // alice: mod_http_api on node 1.
    let http = revoke_config(
        dir.path(),
        "http.toml",
        &redis,
        &broker,
        &format!(
            "[on_revoke]\nkick = {{ kind = \"http_api\", url = \"http://127.0.0.1:{}/api/kick_user\", timeout = 5 }}\n",
            cluster.api_port(1)
        ),
    );
    let t0 = std::time::Instant::now();
    let out = revoke(&http, cluster.dir(), "alice", &[]);
    let revoked_in = t0.elapsed();
    assert!(out.status.success(), "{}", diagnostics(&printed(&out)));
    assert!(
        printed(&out).contains("ended 1 session(s) of alice@localhost"),
        "{}",
        printed(&out)
    );
    match alice.wait_end(Duration::from_secs(10)) {
        Some((Some(3), _)) => eprintln!(
            "alice: revoke + kick (mod_http_api) {:.0} ms, client saw the end {:.0} ms after the revoke started",
            revoked_in.as_secs_f64() * 1000.0,
            t0.elapsed().as_secs_f64() * 1000.0
        ),
        other => panic!(
            "{}",
            diagnostics(&format!("alice still connected or failed: {other:?}"))
        ),
    }

    // carol: ejabberdctl kick_user against node 1, run as argv (no shell).
    let (mut argv, env) = cluster.ctl_argv(1, &["kick_user", "{user}", "{host}"]);
    argv.iter_mut().for_each(|a| *a = a.replace('"', "\\\""));
    let command = revoke_config(
        dir.path(),
        "command.toml",
        &redis,
        &broker,
        &format!(
            "[on_revoke]\nkick = {{ kind = \"command\", argv = [{}], timeout = 30 }}\n",
            argv.iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let t0 = std::time::Instant::now();
    let out = revoke(&command, cluster.dir(), "carol", &env);
    let revoked_in = t0.elapsed();
    assert!(out.status.success(), "{}", diagnostics(&printed(&out)));
    match carol.wait_end(Duration::from_secs(10)) {
        Some((Some(3), _)) => eprintln!(
            "carol: revoke + kick (ejabberdctl) {:.0} ms, client saw the end {:.0} ms after the revoke started",
            revoked_in.as_secs_f64() * 1000.0,
            t0.elapsed().as_secs_f64() * 1000.0
        ),
        other => panic!(
            "{}",
            diagnostics(&format!("carol still connected or failed: {other:?}"))
        ),
    }

    // dave: the daemon's path. A broker sharing Redis, with the hook and the admin endpoint,
    // revokes and kicks on POST /revoke.
    let admin_port = free_port();
    let secret = dir.path().join("admin.secret");
    std::fs::write(&secret, "admin-secret-kick\n").unwrap();
    let mut admin_spec = BrokerSpec::new(&provider).with_redis(&redis);
    admin_spec.config = Some(http.clone());
    admin_spec.extra = vec![
        "--admin-listen".into(),
        format!("127.0.0.1:{admin_port}"),
        "--admin-secret-file".into(),
        secret.display().to_string(),
    ];
    let admin_broker = Broker::start(&admin_spec);
    let body = format!(r#"{{"domain": "{DOMAIN}", "user": "dave"}}"#);
    let (status, answer) = http_request(
        admin_port,
        "POST",
        "/revoke",
        Some("admin-secret-kick"),
        &body,
    );
    assert_eq!(
        (
            status,
            answer.contains(r#""kick":{"outcome":"kicked","sessions":1}"#)
        ),
        (200, true),
        "{}",
        diagnostics(&format!(
            "{answer}\n--- admin broker ---\n{}",
            admin_broker.log()
        ))
    );
    match dave.wait_end(Duration::from_secs(10)) {
        Some((Some(3), _)) => {}
        other => panic!(
            "{}",
            diagnostics(&format!("dave still connected or failed: {other:?}"))
        ),
    }

    // The same tokens no longer log in (ejabberd's own cache is off; the broker asks again).
    for (node, i) in [(1, 0), (2, 2), (1, 3)] {
        assert_eq!(
            xmpp_login(cluster.c2s_port(node), users[i], DOMAIN, &tokens[i]),
            Ok(false),
            "{} logs in again after the revocation",
            users[i]
        );
    }
    // A failing hook is reported, and the revocation stands: nothing listens on this port.
    let dead = revoke_config(
        dir.path(),
        "dead.toml",
        &redis,
        &broker,
        &format!(
            "[on_revoke]\nkick = {{ kind = \"http_api\", url = \"http://127.0.0.1:{}/api/kick_user\", timeout = 2 }}\n",
            free_port()
        ),
    );
    let out = revoke(&dead, cluster.dir(), "bob", &[]);
    assert!(!out.status.success(), "{}", printed(&out));
    assert!(
        printed(&out).contains("the revocation stands, but ending bob@localhost's sessions"),
        "{}",
        printed(&out)
    );
    // One token: revoked, and the command says why nobody was kicked.
    let token_file = dir.path().join("bob.token");
    std::fs::write(&token_file, &tokens[1]).unwrap();
    let out = Command::new(broker_bin())
        .arg("revoke")
        .arg("--config")
        .arg(&http)
        .args(["--domain", DOMAIN, "--user", "bob", "--token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", printed(&out));
    assert!(
        printed(&out).contains("cannot end sessions for one token"),
        "{}",
        printed(&out)
    );
    assert!(
        bob.wait_end(Duration::from_millis(500)).is_none(),
        "a token revocation kicks nobody: {}",
        bob.output()
    );
    drop(bob);
    eprintln!(
        "kick test after the cluster was up: {:.1} s",
        t_test.elapsed().as_secs_f64()
    );
    assert!(
        !broker.log().contains(&tokens[0]),
        "no token in the broker's log"
    );
}

//! End to end: a real two-node ejabberd cluster whose `extauth_program` is our shim, our broker,
//! a real redis-server and the mock introspection provider; a real XMPP client (slixmpp) logs in
//! with SASL PLAIN, the OAuth access token as the password.
//!
//! Skips loudly without an ejabberd install, unless `EXTAUTH_REQUIRE_EJABBERD=1` (CI).

use std::os::unix::fs::PermissionsExt;

use extauth_testkit::ejabberd::{xmpp_login, Cluster, DOMAIN};
use extauth_testkit::services::{
    free_port, now_s, shim_bin, token, Broker, BrokerSpec, Provider, Redis,
};
use serde_json::json;

#[test]
fn tokens_log_in_through_shim_broker_and_redis_on_both_nodes() {
    if !Cluster::available() {
        return;
    }
    let provider = Provider::start();
    let redis = Redis::start();
    // The shims run as user `ejabberd`: they reach the broker over loopback TCP.
    let port = free_port();
    let mut spec = BrokerSpec::new(&provider).with_redis(&redis);
    spec.extra = vec!["--listen".into(), format!("tcp:127.0.0.1:{port}")];
    let broker = Broker::start(&spec);
    let (alice, bob) = (token("alice"), token("bob"));
    provider.insert(&alice, json!({"username": "alice", "exp": now_s() + 3600}));
    provider.insert(&bob, json!({"username": "bob", "exp": now_s() + 3600}));

    let cluster = Cluster::start_with(|dir| {
        let shim = dir.join("extauth-shim");
        std::fs::copy(shim_bin(), &shim).expect("copy the shim where user ejabberd can run it");
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
        format!(
            "{} --broker tcp:127.0.0.1:{port} --timeout 5",
            shim.display()
        )
    });
    let login = |node: usize, user: &str, password: &str| {
        xmpp_login(cluster.c2s_port(node), user, DOMAIN, password).unwrap_or_else(|e| {
            panic!(
                "login error on node {node}: {e}\n{}\n--- broker ---\n{}",
                cluster.logs(node),
                broker.log()
            )
        })
    };

    assert!(login(1, "alice", &alice), "good token on node 1");
    assert_eq!(provider.calls(), 1);
    assert!(!login(1, "alice", "not-a-token"), "wrong token");
    assert!(!login(1, "alice", &bob), "another user's token");
    let before_node2 = provider.calls();
    assert!(login(2, "alice", &alice), "node-1 token on node 2");
    assert_eq!(
        provider.calls(),
        before_node2,
        "node 2 login answered from the shared cache"
    );
    assert_eq!(
        cluster
            .ctl(2, &["check_password", "alice", DOMAIN, &alice])
            .map(|_| ()),
        Ok(()),
        "ejabberdctl check_password goes through extauth too"
    );
    assert!(cluster
        .ctl(2, &["check_password", "alice", DOMAIN, &bob])
        .is_err());
    assert!(
        cluster.ctl(1, &["check_account", "alice", DOMAIN]).is_ok(),
        "isuser: alice logged in"
    );
    assert!(
        cluster.ctl(1, &["check_account", "carol", DOMAIN]).is_err(),
        "isuser: never seen"
    );
    assert!(
        !broker.log().contains(&alice),
        "no token in the broker's log"
    );
}

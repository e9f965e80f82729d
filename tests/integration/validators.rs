//! Every validator kind through the real path: shim process -> broker process (configured by a
//! TOML file only) -> a mock provider speaking the real protocol (OIDC UserInfo, a JWK Set, a
//! site API). The mock (wiremock) is the only simulated part.

use std::time::Duration;

use extauth_testkit::faults::strip_ansi;
use extauth_testkit::mock_idp::Idp;
use extauth_testkit::services::{ask_all, Broker, BrokerSpec, Shim};
use extauth_testkit::tokens::{forge, jwks, public_jwk, sign, Signer};
use serde_json::{json, Value};
use tempfile::TempDir;
use wiremock::matchers::{body_string, header, method, path};
use wiremock::{Mock, ResponseTemplate};

/// Answers `status` (and `body`) to a request with `Authorization: Bearer <token>`.
fn bearer(token: &str, status: u16, body: Option<Value>) -> Mock {
    let mut answer = ResponseTemplate::new(status);
    if let Some(body) = body {
        answer = answer.set_body_json(body);
    }
    Mock::given(header("authorization", format!("Bearer {token}").as_str())).respond_with(answer)
}

/// A broker configured by `toml_text` alone.
fn broker(dir: &TempDir, toml_text: &str) -> Broker {
    let file = dir.path().join("broker.toml");
    std::fs::write(&file, toml_text).unwrap();
    Broker::start(&BrokerSpec::from_config(&file))
}

fn auth(shim: &mut Shim, user: &str, domain: &str, token: &str) -> bool {
    shim.ask(&format!("auth:{user}:{domain}:{token}"))
}

/// The reason of the broker's last provider verdict, from its log line
/// `provider verdict ... verdict="expired"` (the shim only sees 0 or 1).
fn last_verdict(broker: &Broker) -> String {
    let log = strip_ansi(&broker.log());
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("provider verdict"))
        .expect("a provider verdict in the log");
    let (_, rest) = line.split_once("verdict=\"").expect("a verdict field");
    rest.split('"').next().unwrap().to_owned()
}

/// Each case: `user@domain` logs in with a token, gets the expected answer and, when the
/// provider was asked and answered definitively, the expected reason.
fn expect(
    broker: &Broker,
    shim: &mut Shim,
    domain: &str,
    cases: &[(&str, &str, bool, Option<&str>)],
) {
    for (i, (user, token, accepted, reason)) in cases.iter().enumerate() {
        assert_eq!(auth(shim, user, domain, token), *accepted, "case {i}");
        if let Some(reason) = reason {
            assert_eq!(last_verdict(broker), *reason, "case {i}");
        }
    }
}

fn assert_no_token_logged(broker: &Broker, tokens: &[&str]) {
    let log = broker.log();
    for t in tokens {
        assert!(!log.contains(t), "a token was logged");
    }
}

#[test]
fn userinfo_200_is_yes_401_and_403_are_no_and_failures_are_not_cached() {
    let idp = Idp::start();
    let good = "ui-good-alice";
    idp.mount(bearer(
        good,
        200,
        Some(json!({"sub": "248289761001", "preferred_username": "alice"})),
    ));
    idp.mount(bearer("ui-revoked", 401, None));
    idp.mount(bearer("ui-forbidden", 403, None));
    idp.mount(bearer("ui-broken", 503, None));
    idp.mount(
        Mock::given(header("authorization", "Bearer ui-garbage"))
            .respond_with(ResponseTemplate::new(200).set_body_string("<html>")),
    );
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(
        &dir,
        &format!(
            "[defaults]\nsubject_claim = \"preferred_username\"\nvalidator = {{ kind = \"userinfo\", url = \"{}\" }}\n",
            idp.url("/userinfo")
        ),
    );
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    let cases = [
        ("alice", good, true, Some("accepted")),
        ("alice", good, true, None),                        // cached
        ("bob", good, false, None),                         // the cached verdict names alice
        ("alice", "ui-revoked", false, Some("inactive")),   // 401
        ("alice", "ui-revoked", false, None),               // cached
        ("alice", "ui-forbidden", false, Some("inactive")), // 403
        ("alice", "ui-broken", false, None),                // 503: unavailable
        ("alice", "ui-broken", false, None),                // not cached: asked again
        ("alice", "ui-garbage", false, None),               // not JSON: unavailable
    ];
    expect(&broker, &mut shim, "example.com", &cases);
    assert_eq!(
        idp.calls("/userinfo"),
        6,
        "good (once for both users), revoked, forbidden, broken x2 (never cached), garbage"
    );
    assert_no_token_logged(&broker, &[good, "ui-revoked", "ui-broken"]);
}

/// A JWT broker and what it is checked with.
struct JwtWorld {
    idp: Idp,
    broker: Broker,
    _dir: TempDir,
}

const ISSUER: &str = "https://idp.example";
const AUDIENCE: &str = "xmpp";

fn jwt_world(kids: &[&str]) -> JwtWorld {
    let idp = Idp::start();
    serve_jwks(&idp, kids);
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(
        &dir,
        &format!(
            "[defaults.validator]\nkind = \"jwt\"\njwks_url = \"{}\"\njwks_min_refresh = 1\nrequire = {{ issuer = \"{ISSUER}\", audience = \"{AUDIENCE}\" }}\n",
            idp.url("/jwks")
        ),
    );
    JwtWorld {
        idp,
        broker,
        _dir: dir,
    }
}

fn serve_jwks(idp: &Idp, kids: &[&str]) {
    idp.reset();
    idp.mount(
        Mock::given(method("GET"))
            .and(path("/jwks"))
            .respond_with(ResponseTemplate::new(200).set_body_json(jwks(kids))),
    );
}

fn now() -> u64 {
    extauth_testkit::services::now_s()
}

/// Good claims for `user`, changed by `change` (a `null` removes a claim). Each call gets a
/// fresh `jti`, so every token is new to the broker's cache.
fn claims(user: &str, change: Value) -> Value {
    static JTI: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut c = json!({
        "sub": user, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600,
        "jti": JTI.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
    });
    let map = c.as_object_mut().unwrap();
    for (k, v) in change.as_object().unwrap() {
        match v {
            Value::Null => map.remove(k),
            v => map.insert(k.clone(), v.clone()),
        };
    }
    c
}

fn rsa_a(user: &str, change: Value) -> String {
    sign(Signer::RsaA, Some("rsa-a"), &claims(user, change))
}

#[test]
fn jwt_checks_are_local_and_refuse_bad_times_audiences_issuers_and_forgeries() {
    let w = jwt_world(&["rsa-a", "ec", "ed"]);
    let mut shim = Shim::spawn(&w.broker.addr(), 5.0, &[]);
    let alice = claims("alice", json!({}));
    let rsa_public = serde_json::to_vec(&public_jwk("rsa-a")).unwrap();
    let tokens = [
        ("accepted", rsa_a("alice", json!({}))),
        ("accepted", sign(Signer::Ec, Some("ec"), &alice)),
        ("accepted", sign(Signer::Ed, Some("ed"), &alice)),
        ("wrong_user", rsa_a("bob", json!({}))),
        ("expired", rsa_a("alice", json!({"exp": now() - 120}))),
        ("not_yet_valid", rsa_a("alice", json!({"nbf": now() + 600}))),
        ("wrong_audience", rsa_a("alice", json!({"aud": "other"}))),
        ("wrong_audience", rsa_a("alice", json!({"aud": null}))),
        (
            "wrong_issuer",
            rsa_a("alice", json!({"iss": "https://evil"})),
        ),
        ("bad_token", rsa_a("alice", json!({"exp": null}))),
        // alg: none
        ("bad_token", forge(&json!({"alg": "none"}), &alice, None)),
        // HS256 "signed" with the RSA key's public bytes as the HMAC secret
        (
            "bad_token",
            forge(
                &json!({"alg": "HS256", "kid": "rsa-a"}),
                &alice,
                Some(&rsa_public),
            ),
        ),
        // RS256 under the EC key's kid
        ("bad_token", sign(Signer::RsaA, Some("ec"), &alice)),
        // signed by a key that is not in the set, under a kid that is
        ("bad_token", sign(Signer::RsaB, Some("rsa-a"), &alice)),
    ];
    let cases: Vec<_> = tokens
        .iter()
        .map(|(reason, token)| {
            (
                "alice",
                token.as_str(),
                *reason == "accepted",
                Some(*reason),
            )
        })
        .collect();
    expect(&w.broker, &mut shim, "example.com", &cases);
    assert_eq!(
        w.idp.calls("/jwks"),
        1,
        "one fetch for the first token, then every check is local"
    );
    assert_no_token_logged(&w.broker, &[&tokens[0].1, &tokens[4].1]);
}

/// Sends one login per (user, token) at example.com, all in flight together.
fn concurrent_logins(broker: &Broker, logins: &[(&str, String)]) -> Vec<bool> {
    let requests: Vec<String> = logins
        .iter()
        .map(|(user, token)| format!("auth:{user}:example.com:{token}"))
        .collect();
    ask_all(&broker.addr(), 5.0, &requests)
}

/// Waits out `jwks_min_refresh` (1 s in these tests), so the next unknown kid may fetch.
fn pass_min_refresh() {
    std::thread::sleep(Duration::from_millis(1100));
}

#[test]
fn jwks_rotation_costs_one_fetch_and_old_tokens_work_until_their_key_leaves() {
    let w = jwt_world(&["rsa-a"]);
    let mut shim = Shim::spawn(&w.broker.addr(), 5.0, &[]);
    assert!(auth(
        &mut shim,
        "alice",
        "example.com",
        &rsa_a("alice", json!({}))
    ));
    assert_eq!(w.idp.calls("/jwks"), 1);

    // The issuer publishes rsa-b next to rsa-a and starts signing with it.
    serve_jwks(&w.idp, &["rsa-a", "rsa-b"]);
    pass_min_refresh();
    let users = ["alice", "bob", "carol", "dave"];
    let new_tokens: Vec<(&str, String)> = users
        .iter()
        .map(|u| (*u, sign(Signer::RsaB, Some("rsa-b"), &claims(u, json!({})))))
        .collect();
    assert_eq!(concurrent_logins(&w.broker, &new_tokens), vec![true; 4]);
    assert_eq!(
        w.idp.calls("/jwks"),
        1,
        "four logins with a new kid: one refetch"
    );
    assert!(
        auth(&mut shim, "bob", "example.com", &rsa_a("bob", json!({}))),
        "rsa-a is still in the set"
    );
    assert_eq!(w.idp.calls("/jwks"), 1);

    // rsa-a is retired; a token with a kid nobody knows makes the broker look again. Tokens
    // are signed first, so the checks after that fetch run well within jwks_min_refresh.
    let unknown = sign(Signer::RsaA, Some("rsa-z"), &claims("alice", json!({})));
    let retired = rsa_a("carol", json!({}));
    let current = sign(Signer::RsaB, Some("rsa-b"), &claims("carol", json!({})));
    serve_jwks(&w.idp, &["rsa-b"]);
    pass_min_refresh();
    let cases = [
        ("alice", unknown.as_str(), false, Some("bad_token")), // unknown kid: one fetch
        ("carol", retired.as_str(), false, Some("bad_token")), // rsa-a left the set
        ("carol", current.as_str(), true, Some("accepted")),
    ];
    expect(&w.broker, &mut shim, "example.com", &cases);
    assert_eq!(
        w.idp.calls("/jwks"),
        2,
        "the unknown kid cost one fetch; the retired one another, made after it arrived, which \
         confirms its key is gone (a kid is never refused on an older fetch's word)"
    );
}

/// A broker serving `api.example` (bearer, `{user}` in the URL, an endpoint that checks the token
/// itself: `trust_status`) and `form.example` (token in a form, JSON pointer rule) with the custom
/// HTTP validator.
fn api_broker(idp: &Idp, dir: &TempDir) -> Broker {
    broker(
        dir,
        &format!(
            r#"
[domains."api.example".validator]
kind = "http"
url = "{api}"
trust_status = true

[domains."form.example".validator]
kind = "http"
method = "POST"
url = "{form}"
token_in = "form"
form_field = "access_token"
json_pointer = "/account/active"
json_equals = true
"#,
            api = idp.url("/api/users/{user}/{domain}"),
            form = idp.url("/check/{user}"),
        ),
    )
}

#[test]
fn the_site_api_decides_by_status_and_json_pointer() {
    let idp = Idp::start();
    let api_user = |user: &str, token: &str, status: u16| {
        Mock::given(method("GET"))
            .and(path(format!("/api/users/{user}/api%2Eexample").as_str()))
            .and(header("authorization", format!("Bearer {token}").as_str()))
            .respond_with(ResponseTemplate::new(status))
    };
    idp.mount(api_user("alice", "api-good", 200));
    idp.mount(api_user("alice", "api-revoked", 401));
    idp.mount(api_user("alice", "api-broken", 500));
    let form_user = |user: &str, token: &str, active: bool| {
        Mock::given(method("POST"))
            .and(path(format!("/check/{user}").as_str()))
            .and(body_string(format!("access_token={token}")))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(json!({"account": {"active": active}})),
            )
    };
    idp.mount(form_user("carol", "form-good", true));
    idp.mount(form_user("carol", "form-disabled", false));
    let dir = tempfile::tempdir().unwrap();
    let broker = api_broker(&idp, &dir);
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);

    let api_cases = [
        ("alice", "api-good", true, Some("accepted")), // 200
        ("alice", "api-good", true, None),             // cached
        ("bob", "api-good", false, Some("inactive")),  // 404
        ("alice", "api-revoked", false, Some("inactive")), // 401
        ("alice", "api-broken", false, None),          // 500: unavailable
        ("alice", "api-broken", false, None),          // not cached: asked again
    ];
    expect(&broker, &mut shim, "api.example", &api_cases);
    assert!(
        !auth(&mut shim, "alice", "other.example", "api-good"),
        "a domain with no table"
    );
    assert_eq!(idp.calls("/api/users/alice/api%2Eexample"), 4);
    assert_eq!(idp.calls("/api/users/bob/api%2Eexample"), 1);

    let form_cases = [
        ("carol", "form-good", true, Some("accepted")), // pointer holds true
        ("carol", "form-disabled", false, Some("inactive")), // pointer holds false
        ("dave", "form-good", false, Some("inactive")), // 404
    ];
    expect(&broker, &mut shim, "form.example", &form_cases);
    assert_eq!(idp.calls("/check/carol") + idp.calls("/check/dave"), 3);
    assert_no_token_logged(&broker, &["api-good", "form-good", "api-broken"]);
}

#[test]
fn one_broker_serves_domains_with_different_validator_kinds() {
    let idp = Idp::start();
    serve_jwks(&idp, &["rsa-a"]);
    let (userinfo_token, api_token) = ("opaque-userinfo-token-9d2", "site-api-token-41c");
    let answer = |at: &str, token: &str, body: Value| {
        Mock::given(path(at))
            .and(header("authorization", format!("Bearer {token}").as_str()))
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
    };
    idp.mount(answer("/userinfo", userinfo_token, json!({"sub": "carol"})));
    idp.mount(answer("/api/users/dave", api_token, json!({"ok": true})));
    let dir = tempfile::tempdir().unwrap();
    let broker = broker(
        &dir,
        &format!(
            "[domains.\"jwt.example\".validator]\nkind = \"jwt\"\njwks_url = \"{}\"\nrequire = {{ issuer = \"{ISSUER}\", audience = \"{AUDIENCE}\" }}\n\
             [domains.\"oidc.example\".validator]\nkind = \"userinfo\"\nurl = \"{}\"\n\
             [domains.\"site.example\".validator]\nkind = \"http\"\nurl = \"{}\"\njson_pointer = \"/ok\"\njson_equals = true\n",
            idp.url("/jwks"),
            idp.url("/userinfo"),
            idp.url("/api/users/{user}"),
        ),
    );
    let mut shim = Shim::spawn(&broker.addr(), 5.0, &[]);
    let jwt = rsa_a("bob", json!({}));
    assert!(
        auth(&mut shim, "bob", "jwt.example", &jwt),
        "a JWT at the JWT domain"
    );
    assert!(
        auth(&mut shim, "carol", "oidc.example", userinfo_token),
        "userinfo"
    );
    assert!(
        auth(&mut shim, "dave", "site.example", api_token),
        "the site's API"
    );
    assert!(
        !auth(&mut shim, "bob", "oidc.example", &jwt),
        "a JWT at the userinfo domain"
    );
    assert!(
        !auth(&mut shim, "carol", "jwt.example", userinfo_token),
        "an opaque token at the JWT domain"
    );
    assert!(!auth(&mut shim, "dave", "jwt.example", api_token));
    assert!(
        !auth(&mut shim, "bob", "other.example", &jwt),
        "unknown domain"
    );
    assert_eq!(
        (
            idp.calls("/userinfo"),
            idp.calls("/api/users/dave"),
            idp.calls("/jwks")
        ),
        (2, 1, 1)
    );
}

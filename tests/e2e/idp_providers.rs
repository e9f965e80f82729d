//! The real identity providers of `tests/kit/src/idp.rs` show the facts the broker relies on
//! (docs/providers.md, docs/configuration.md): what introspection, userinfo
//! and JWT access tokens carry, and how each provider refuses. If a provider upgrade changes one
//! of them, this file says which before any broker test fails in a puzzling way.
//!
//! Skips loudly when a provider is not installed, unless `EXTAUTH_REQUIRE_IDP=1` (`tests/run`).

use extauth_testkit::idp::{self, jwt_parts, Dot, DotOptions, OAuthClient, Oidc, OidcOptions};
use extauth_testkit::services::now_s;
use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use serde_json::Value;

/// `field` is absent from the JSON object `v`.
fn lacks(v: &Value, field: &str) -> bool {
    v.get(field).is_none()
}

#[test]
fn django_oauth_toolkit_tokens_introspection_userinfo_and_site_api() {
    if !Dot::available() {
        return;
    }
    let dot = Dot::start(DotOptions::default());

    let discovery = dot.http().get(&dot.discovery_url(), None).json();
    assert_eq!(discovery["issuer"], dot.issuer());
    assert!(
        lacks(&discovery, "introspection_endpoint"),
        "DOT discovery now lists introspection: {discovery}"
    );
    let jwks = dot.http().get(&dot.jwks_url(), None).json();
    assert_eq!(jwks["keys"][0]["alg"], "RS256", "{jwks}");

    // A user token introspects with the case-preserved Django username, no iss, no aud.
    let alice = dot.user_token("alice");
    let info = dot.introspect(&alice).json();
    assert_eq!(info["active"], true, "{info}");
    assert_eq!(info["username"], "alice");
    assert_eq!(info["client_id"], dot.minter_client().client_id.as_str());
    assert!(
        lacks(&info, "iss") && lacks(&info, "aud") && lacks(&info, "sub"),
        "{info}"
    );
    let exp = info["exp"].as_u64().expect("exp");
    assert!(exp > now_s() && exp <= now_s() + 3600 + 5, "exp {exp}");

    // Usernames are case-sensitive and kept exactly, look-alikes included.
    for key in [
        "Dave",
        "dave",
        "erin",
        "fullwidth_alice",
        "zwsp_alice",
        "kelvin_kate",
    ] {
        let name = idp::user(key);
        let info = dot.introspect(&dot.user_token(name)).json();
        assert_eq!(info["username"], name, "account {key}");
    }

    // Userinfo: sub is the database id; the site's validator adds the username claims.
    let me = dot.userinfo(&alice).json();
    assert!(
        me["sub"].as_str().is_some_and(|s| s.parse::<u64>().is_ok()),
        "{me}"
    );
    assert_eq!(me["preferred_username"], "alice");
    assert_eq!(me["username"], "alice");
    assert!(lacks(&me, "iss") && lacks(&me, "scope"), "{me}");

    // A client-credentials token of the application `bob` names no user.
    let machine = dot.client_credentials_token();
    let info = dot.introspect(&machine).json();
    assert_eq!(info["active"], true, "{info}");
    assert_eq!(info["client_id"], "bob");
    assert!(lacks(&info, "username") && lacks(&info, "sub"), "{info}");

    // Refusals: wrong or unknown client credentials are 403, not 401.
    let wrong = OAuthClient {
        client_id: dot.broker_client().client_id.clone(),
        client_secret: "wrong".into(),
    };
    assert_eq!(dot.introspect_as(&wrong, &alice).status, 403);
    let unknown = OAuthClient {
        client_id: "nobody".into(),
        client_secret: "wrong".into(),
    };
    assert_eq!(dot.introspect_as(&unknown, &alice).status, 403);
    let bad_password = dot.password_grant("alice", "not-her-password", "read");
    assert_eq!(bad_password.status, 400);
    assert_eq!(bad_password.json()["error"], "invalid_grant");
    assert_eq!(dot.introspect("no-such-token").json()["active"], false);

    // Endpoint URLs: without the trailing slash Django's CommonMiddleware redirects (the
    // broker follows no redirect); the discovery URL is no introspection endpoint.
    let form = [("token", alice.as_str())];
    let slashless = dot.introspection_url().trim_end_matches('/').to_owned();
    let answer = dot
        .http()
        .post_form(&slashless, Some(dot.broker_client()), &form);
    assert_eq!(answer.status, 301);
    assert_eq!(answer.location.as_deref(), Some("/o/introspect/"));
    let answer = dot
        .http()
        .post_form(&dot.discovery_url(), Some(dot.broker_client()), &form);
    assert_eq!(answer.status, 405);

    // The site's API: 200 for the token's own user only, 403 for anyone else, 401 otherwise.
    let ok = dot.check("alice", &alice);
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json(), serde_json::json!({"user": "alice", "ok": true}));
    assert_eq!(dot.check("Alice", &alice).status, 403);
    assert_eq!(dot.check(idp::user("fullwidth_alice"), &alice).status, 403);
    assert_eq!(dot.check("bob", &machine).status, 403);
    let fullwidth = dot.user_token(idp::user("fullwidth_alice"));
    assert_eq!(
        dot.check(idp::user("fullwidth_alice"), &fullwidth).status,
        200
    );
    assert_eq!(dot.check("alice", &fullwidth).status, 403);
    let garbage = dot.check("alice", "no-such-token");
    assert_eq!(garbage.status, 401);
    assert!(garbage
        .www_authenticate
        .is_some_and(|h| h.starts_with("Bearer")));

    // Revoked tokens are inactive everywhere.
    dot.revoke(&alice);
    assert_eq!(dot.introspect(&alice).json()["active"], false);
    assert_eq!(dot.check("alice", &alice).status, 401);
    dot.revoke(&machine);
    assert_eq!(dot.introspect(&machine).json()["active"], false);

    let log = dot.log();
    assert!(
        !log.contains(&alice) && !log.contains(&machine),
        "a token in the log"
    );
}

#[test]
fn django_oauth_toolkit_without_time_zone_support_reports_exp_off_by_the_zone_offset() {
    if !Dot::available() {
        return;
    }
    // Asia/Tokyo is UTC+9 all year: naive local time read as UTC is 9 hours ahead.
    let dot = Dot::start(DotOptions {
        access_token_seconds: 2,
        use_tz: false,
        time_zone: "Asia/Tokyo".into(),
        ..DotOptions::default()
    });
    let token = dot.user_token("bob");
    let info = dot.introspect(&token).json();
    assert_eq!(info["active"], true, "{info}");
    let exp = info["exp"].as_u64().expect("exp");
    let nine_hours = 9 * 3600;
    let now = now_s();
    assert!(
        exp > now + nine_hours - 60 && exp < now + nine_hours + 60,
        "exp {exp} is not about 9 h from now ({now})"
    );
    // The token itself still dies on time: DOT compares naive local times with each other.
    extauth_testkit::services::wait_until(
        std::time::Duration::from_secs(20),
        "the 2 s token to expire",
        || dot.introspect(&token).json()["active"] == false,
    );
}

/// Verifies `token` with the provider's JWKS as a resource server would (RS256, issuer,
/// audience); returns the verification error, if any.
fn verify(oidc: &Oidc, token: &str, audience: &str) -> Result<Value, String> {
    let jwks: JwkSet = serde_json::from_str(&oidc.http().get(&oidc.jwks_url(), None).body)
        .map_err(|e| e.to_string())?;
    let (header, _) = jwt_parts(token);
    let kid = header["kid"].as_str().ok_or("no kid")?;
    let jwk = jwks.find(kid).ok_or(format!("kid {kid} not in the JWKS"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_issuer(&[oidc.issuer()]);
    validation.set_audience(&[audience]);
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map(|data| data.claims)
        .map_err(|e| e.to_string())
}

#[test]
fn oidc_provider_opaque_and_jwt_access_tokens_client_credentials_and_revocation() {
    if !Oidc::available() {
        return;
    }
    let oidc = Oidc::start(OidcOptions::default());

    let discovery = oidc.http().get(&oidc.discovery_url(), None).json();
    assert_eq!(discovery["issuer"], oidc.issuer());
    assert_eq!(
        discovery["introspection_endpoint"],
        oidc.introspection_url()
    );
    assert_eq!(discovery["revocation_endpoint"], oidc.revocation_url());
    assert_eq!(discovery["userinfo_endpoint"], oidc.userinfo_url());
    assert_eq!(discovery["jwks_uri"], oidc.jwks_url());

    let alice = oidc.user_tokens("alice");

    // The JWT access token: at+jwt, aud = the resource, sub = the account, verifiable.
    let (header, claims) = jwt_parts(&alice.jwt);
    assert_eq!(header["typ"], "at+jwt", "{header}");
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["kid"], oidc.signing_kid().as_str());
    assert_eq!(claims["aud"], oidc.resource(), "{claims}");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["preferred_username"], "alice");
    assert_eq!(
        claims["xmpp_domain"], "example.com",
        "accounts.json gives alice a domain"
    );
    assert_eq!(claims["client_id"], oidc.app_client().client_id.as_str());
    verify(&oidc, &alice.jwt, oidc.resource()).expect("the JWT verifies with the JWKS");
    // This provider does not store JWT access tokens: introspection says inactive.
    assert_eq!(oidc.introspect(&alice.jwt).json()["active"], false);

    // The ID token is for the app, not an access token for the resource.
    let (header, claims) = jwt_parts(&alice.id_token);
    assert_eq!(header["typ"], "JWT", "{header}");
    assert_eq!(claims["aud"], oidc.app_client().client_id.as_str());
    assert!(verify(&oidc, &alice.id_token, oidc.resource()).is_err());

    // The opaque token: userinfo without iss; introspection with sub and iss.
    let me = oidc.userinfo(&alice.opaque).json();
    assert_eq!(me["sub"], "alice", "{me}");
    assert_eq!(me["preferred_username"], "alice");
    assert!(lacks(&me, "iss"), "{me}");
    let info = oidc.introspect(&alice.opaque).json();
    assert_eq!(info["active"], true, "{info}");
    assert_eq!(info["sub"], "alice");
    assert_eq!(info["iss"], oidc.issuer());
    assert_eq!(info["client_id"], oidc.app_client().client_id.as_str());
    assert!(lacks(&info, "aud") && lacks(&info, "username"), "{info}");

    // Look-alike accounts keep their exact names.
    let fullwidth = idp::user("fullwidth_alice");
    let (_, claims) = jwt_parts(&oidc.user_tokens(fullwidth).jwt);
    assert_eq!(claims["sub"], fullwidth);

    // Client credentials: the JWT's sub is the client id `bob`; the opaque one has no sub.
    let (header, claims) = jwt_parts(&oidc.client_credentials(Some(oidc.resource())));
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(claims["sub"], "bob", "{claims}");
    assert_eq!(claims["client_id"], "bob");
    assert_eq!(claims["aud"], oidc.resource());
    assert!(lacks(&claims, "preferred_username"), "{claims}");
    let machine = oidc.client_credentials(None);
    let info = oidc.introspect(&machine).json();
    assert_eq!(info["active"], true, "{info}");
    assert_eq!(info["client_id"], "bob");
    assert!(lacks(&info, "sub"), "{info}");

    // Wrong client credentials: 401 invalid_client (DOT says 403).
    let wrong = OAuthClient {
        client_id: oidc.broker_client().client_id.clone(),
        client_secret: "wrong".into(),
    };
    let refused = oidc.introspect_as(&wrong, &alice.opaque);
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["error"], "invalid_client");

    // Revocation.
    oidc.revoke(&alice.opaque);
    assert_eq!(oidc.introspect(&alice.opaque).json()["active"], false);
    assert_eq!(oidc.userinfo(&alice.opaque).status, 401);
    oidc.revoke(&machine);
    assert_eq!(oidc.introspect(&machine).json()["active"], false);

    let log = oidc.log();
    assert!(
        !log.contains(&alice.opaque) && !log.contains(&machine),
        "a token in the log"
    );
}

#[test]
fn oidc_provider_restarted_with_a_rotated_key_signs_with_a_new_kid() {
    if !Oidc::available() {
        return;
    }
    let mut oidc = Oidc::start(OidcOptions::default());
    let old_kid = oidc.signing_kid();
    let old = oidc.user_tokens("bob").jwt;
    assert!(verify(&oidc, &old, oidc.resource()).is_ok());

    // Graceful rotation: the old key stays published.
    oidc.restart_with_new_key(true);
    let new_kid = oidc.signing_kid();
    assert_ne!(new_kid, old_kid);
    let new = oidc.user_tokens("bob").jwt;
    assert_eq!(jwt_parts(&new).0["kid"], new_kid.as_str());
    assert!(verify(&oidc, &new, oidc.resource()).is_ok());
    assert!(verify(&oidc, &old, oidc.resource()).is_ok());

    // Hard rotation: tokens of the old keys no longer verify.
    oidc.restart_with_new_key(false);
    let jwks = oidc.http().get(&oidc.jwks_url(), None).json();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert_eq!(kids, [oidc.signing_kid().as_str()]);
    let err = verify(&oidc, &old, oidc.resource()).expect_err("old key gone");
    assert!(err.contains(&old_kid), "{err}");
}

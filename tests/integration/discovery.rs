//! `issuer = "..."` alone: validators take their endpoints from the provider's metadata, against
//! the real providers (oidc-provider lists every endpoint; django-oauth-toolkit lists no
//! introspection endpoint, which check-config must say plainly).
//!
//! Skips loudly when a provider is not installed, unless `EXTAUTH_REQUIRE_IDP=1` (`tests/run`).

use std::process::Command;

use extauth_testkit::idp::{Dot, DotOptions, Oidc, OidcOptions};
use extauth_testkit::services::{broker_bin, printed, Broker, BrokerSpec, Shim};

/// A broker configuration file `toml` in `dir`, plus the client secret file it names.
fn write_config(dir: &tempfile::TempDir, secret: &str, toml: &str) -> std::path::PathBuf {
    std::fs::write(dir.path().join("client.secret"), format!("{secret}\n")).unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn check_config(config: &std::path::Path) -> std::process::Output {
    Command::new(broker_bin())
        .args(["check-config", "--config"])
        .arg(config)
        .output()
        .unwrap()
}

#[test]
fn an_issuer_alone_gives_every_validator_of_oidc_provider_its_endpoint() {
    if !Oidc::available() {
        return;
    }
    let oidc = Oidc::start(OidcOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("client.secret");
    let config = write_config(
        &dir,
        &oidc.broker_client().client_secret,
        &format!(
            r#"
            [domains."intro.example"]
            subject_claim = "sub"
            validator = {{ kind = "introspection", issuer = "{issuer}", client_id = "{client}", client_secret_file = "{secret}" }}
            [domains."me.example"]
            validator = {{ kind = "userinfo", issuer = "{issuer}" }}
            [domains."jwt.example"]
            validator = {{ kind = "jwt", issuer = "{issuer}", require = {{ audience = "{resource}" }}, typ = "at+jwt" }}
            "#,
            issuer = oidc.issuer(),
            client = oidc.broker_client().client_id,
            secret = secret_file.display(),
            resource = oidc.resource(),
        ),
    );
    let checked = check_config(&config);
    let shown = printed(&checked);
    assert!(checked.status.success(), "{shown}");
    for endpoint in [
        oidc.introspection_url(),
        oidc.userinfo_url(),
        oidc.jwks_url(),
    ] {
        assert!(shown.contains(&endpoint), "{endpoint} discovered: {shown}");
    }

    let broker = Broker::start(&BrokerSpec::from_config(&config));
    let alice = oidc.user_tokens("alice");
    let mut shim = Shim::spawn(&broker.addr(), 10.0, &[]);
    let ask = |shim: &mut Shim, domain: &str, token: &str, user: &str| {
        shim.ask(&format!("auth:{user}:{domain}:{token}"))
    };
    assert!(ask(&mut shim, "intro.example", &alice.opaque, "alice"));
    assert!(ask(&mut shim, "me.example", &alice.opaque, "alice"));
    assert!(ask(&mut shim, "jwt.example", &alice.jwt, "alice"));
    assert!(
        !ask(&mut shim, "jwt.example", &alice.id_token, "alice"),
        "the discovered issuer does not make an ID token an access token"
    );
    assert!(!ask(&mut shim, "intro.example", &alice.opaque, "bob"));
    assert!(broker.log().contains("provider metadata discovered"));
}

#[test]
fn a_missing_endpoint_in_the_metadata_is_a_clear_check_config_error() {
    if !Dot::available() {
        return;
    }
    let dot = Dot::start(DotOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("client.secret");
    let introspection = write_config(
        &dir,
        &dot.broker_client().client_secret,
        &format!(
            "[defaults]\nvalidator = {{ kind = \"introspection\", issuer = \"{}\", client_id = \"{}\", client_secret_file = \"{}\" }}\n",
            dot.issuer(),
            dot.broker_client().client_id,
            secret_file.display()
        ),
    );
    let refused = check_config(&introspection);
    let said = printed(&refused);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("lists no introspection_endpoint: configure the URL explicitly"),
        "{said}"
    );
    assert!(!said.contains(&dot.broker_client().client_secret), "{said}");

    let explicit = write_config(
        &dir,
        &dot.broker_client().client_secret,
        &format!(
            "[defaults]\nvalidator = {{ kind = \"introspection\", url = \"{}\", issuer = \"{}\", client_id = \"{}\", client_secret_file = \"{}\" }}\n",
            dot.introspection_url(),
            dot.issuer(),
            dot.broker_client().client_id,
            secret_file.display()
        ),
    );
    let checked = check_config(&explicit);
    assert!(
        checked.status.success(),
        "an explicit URL wins over discovery: {}",
        printed(&checked)
    );
    let userinfo = write_config(
        &dir,
        "unused",
        &format!(
            "[defaults]\nvalidator = {{ kind = \"userinfo\", issuer = \"{}\" }}\n",
            dot.issuer()
        ),
    );
    let checked = check_config(&userinfo);
    let shown = printed(&checked);
    assert!(checked.status.success(), "{shown}");
    assert!(shown.contains(&dot.userinfo_url()), "{shown}");
}

//! OpenID Connect UserInfo (OIDC Core 1.0 section 5.3).
//!
//! `GET` the endpoint with the access token as `Authorization: Bearer` (RFC 6750 section 2.1).
//! `200` with a JSON object means the token is valid and the object holds the user's claims
//! (section 5.3.2); `401` or `403` means the provider refused the token (section 5.3.3, RFC 6750
//! section 3.1). Any other answer says nothing about the token and is never cached.
//!
//! UserInfo answers carry no `exp`, so a positive verdict lives the domain's `max_ttl`.

use serde::Deserialize;
use serde_json::Value;

use super::claims::ClaimRules;
use super::discovery::{client_and_url, Endpoint, EndpointUrl};
use super::http::{HttpTimeouts, ProviderClient, ProviderPolicy};
use super::SetupError;
use super::{BoxFuture, Grant, TokenCheck, Validation, Validator};
use crate::secrets::ConfigUrl;
use extauth_protocol::extauth::Secret;
use extauth_protocol::wire::Reason;

/// Settings of a userinfo validator (TOML: `validator = { kind = "userinfo", ... }`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserinfoConfig {
    /// The UserInfo endpoint (`https://`, or `http://` on loopback); without it, the
    /// `userinfo_endpoint` discovered from `issuer`.
    #[serde(default)]
    pub url: Option<ConfigUrl>,
    /// The provider's issuer identifier: its metadata gives `url` when that is not set
    /// ([`super::discovery`]).
    #[serde(default)]
    pub issuer: Option<ConfigUrl>,
    /// Scope, audience and issuer requirements on the returned claims (`require = { ... }`).
    /// UserInfo answers rarely carry `scope`, `aud` or `iss`; a rule on a missing claim refuses.
    #[serde(default)]
    pub require: ClaimRules,
    /// Connect and total timeouts.
    #[serde(default)]
    pub timeouts: HttpTimeouts,
}

/// An OIDC UserInfo client.
pub(crate) struct Userinfo {
    http: ProviderClient,
    url: EndpointUrl,
    config: UserinfoConfig,
}

impl Userinfo {
    /// A client for `config.url` under the broker-wide `policy`.
    ///
    /// # Errors
    /// A bad URL or timeout, or a TLS set-up failure.
    pub(crate) fn new(config: UserinfoConfig, policy: &ProviderPolicy) -> Result<Self, SetupError> {
        let (http, url) = client_and_url(
            "userinfo",
            "userinfo url",
            config.url.as_ref(),
            config.issuer.as_ref(),
            Endpoint::Userinfo,
            config.timeouts,
            policy,
        )?;
        Ok(Userinfo { http, url, config })
    }

    async fn ask(&self, token: &Secret) -> Validation {
        let url = match self.url.get().await {
            Ok(url) => url,
            Err(why) => return Validation::Unavailable(why),
        };
        let request = self
            .http
            .request(reqwest::Method::GET, &url)
            .bearer_auth(token.expose());
        let response = match self.http.send(request).await {
            Ok(r) => r,
            Err(why) => return Validation::Unavailable(why),
        };
        match response.status().as_u16() {
            200 => {}
            401 | 403 => return Validation::Invalid(Reason::Inactive),
            _ => return Validation::Unavailable(self.http.status(&response)),
        }
        match self.http.json(response).await {
            Ok(body) => self.interpret(body),
            // Signed or encrypted UserInfo (application/jwt, section 5.3.2) lands here too.
            Err(why) => Validation::Unavailable(why),
        }
    }

    /// Reads a `200` answer's body (OIDC Core section 5.3.2).
    fn interpret(&self, body: Value) -> Validation {
        let Value::Object(claims) = body else {
            return Validation::Unavailable(self.http.malformed("is not a JSON object"));
        };
        if let Err(reason) = self.config.require.check(&claims) {
            return Validation::Invalid(reason);
        }
        Validation::Valid(Grant {
            claims,
            exp: None,
            user_confirmed: false,
        })
    }
}

impl Validator for Userinfo {
    fn validate<'a>(&'a self, check: TokenCheck<'a>) -> BoxFuture<'a, Validation> {
        Box::pin(self.ask(check.token))
    }

    fn kind(&self) -> &'static str {
        "userinfo"
    }

    fn discovered(&self) -> Option<EndpointUrl> {
        self.url.is_discovered().then(|| self.url.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn client(require: ClaimRules) -> Userinfo {
        Userinfo::new(
            UserinfoConfig {
                url: Some("http://127.0.0.1:9/userinfo".into()),
                issuer: None,
                require,
                timeouts: HttpTimeouts::default(),
            },
            &ProviderPolicy::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_json_object_is_a_grant_without_expiry() {
        let c = client(ClaimRules::default());
        let body = json!({"sub": "248289761001", "preferred_username": "alice"});
        assert_eq!(
            c.interpret(body.clone()),
            Validation::Valid(Grant {
                claims: body.as_object().unwrap().clone(),
                exp: None,
                user_confirmed: false,
            })
        );
        for garbage in [json!([1]), json!("alice"), json!(null)] {
            assert!(
                matches!(c.interpret(garbage.clone()), Validation::Unavailable(_)),
                "{garbage}"
            );
        }
    }

    #[test]
    fn rules_on_the_claims_are_definitive_noes() {
        let c = client(ClaimRules {
            issuer: Some("https://idp".into()),
            ..ClaimRules::default()
        });
        assert_eq!(
            c.interpret(json!({"sub": "a", "iss": "https://other"})),
            Validation::Invalid(Reason::WrongIssuer)
        );
        assert!(matches!(
            c.interpret(json!({"sub": "a", "iss": "https://idp"})),
            Validation::Valid(_)
        ));
    }

    #[test]
    fn bad_settings_are_refused() {
        let config = |url: &str| UserinfoConfig {
            url: Some(url.into()),
            issuer: None,
            require: ClaimRules::default(),
            timeouts: HttpTimeouts::default(),
        };
        assert!(Userinfo::new(config("idp.example/userinfo"), &ProviderPolicy::default()).is_err());
        let mut slow = config("https://idp.example/userinfo");
        slow.timeouts.total = 0.0;
        assert!(Userinfo::new(slow, &ProviderPolicy::default()).is_err());
    }

    async fn ask(c: &Userinfo, token: &str) -> Validation {
        c.ask(&Secret::new(token.to_owned())).await
    }

    #[tokio::test]
    async fn status_codes_decide() {
        use wiremock::matchers::{header, method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        let answer = |status: u16| ResponseTemplate::new(status);
        Mock::given(method("GET"))
            .and(path("/userinfo"))
            .and(header("authorization", "Bearer good"))
            .respond_with(answer(200).set_body_json(json!({"sub": "alice"})))
            .mount(&server)
            .await;
        for (token, status) in [("revoked", 401), ("forbidden", 403), ("broken", 500)] {
            Mock::given(header("authorization", format!("Bearer {token}").as_str()))
                .respond_with(answer(status))
                .mount(&server)
                .await;
        }
        Mock::given(header("authorization", "Bearer garbage"))
            .respond_with(answer(200).set_body_string("<html>"))
            .mount(&server)
            .await;
        let c = Userinfo::new(
            UserinfoConfig {
                url: Some(format!("{}/userinfo", server.uri()).into()),
                issuer: None,
                require: ClaimRules::default(),
                timeouts: HttpTimeouts::default(),
            },
            &ProviderPolicy::default(),
        )
        .unwrap();
        assert!(matches!(ask(&c, "good").await, Validation::Valid(_)));
        assert_eq!(
            ask(&c, "revoked").await,
            Validation::Invalid(Reason::Inactive)
        );
        assert_eq!(
            ask(&c, "forbidden").await,
            Validation::Invalid(Reason::Inactive)
        );
        assert!(matches!(
            ask(&c, "broken").await,
            Validation::Unavailable(_)
        ));
        assert!(matches!(
            ask(&c, "garbage").await,
            Validation::Unavailable(_)
        ));
    }
}

//! RFC 7662 OAuth 2.0 token introspection.
//!
//! `POST` the endpoint with the form `token=...&token_type_hint=access_token`, with client
//! authentication by HTTP Basic (`client_secret_basic`, RFC 7662 section 2.1 and RFC 6749 section
//! 2.3.1) or in the form (`client_secret_post`). The JSON answer (section 2.2) must have a boolean
//! `active`; `exp` is seconds since the epoch.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tracing::warn;

use super::claims::ClaimRules;
use super::discovery::{client_and_url, Endpoint, EndpointUrl};
use super::http::{HttpTimeouts, ProviderClient, ProviderPolicy};
use super::{BoxFuture, Grant, TokenCheck, Validation, Validator};
use super::{ProviderError, SetupError};
use crate::secrets::ConfigUrl;
use crate::throttle::Throttle;
use extauth_protocol::extauth::Secret;
use extauth_protocol::wire::Reason;

/// How the broker authenticates to the introspection endpoint.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ClientAuth {
    /// HTTP Basic with client id and secret (the common case).
    #[default]
    ClientSecretBasic,
    /// `client_id` and `client_secret` form fields.
    ClientSecretPost,
}

/// Settings of an introspection validator (TOML: `validator = { kind = "introspection", ... }`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IntrospectionConfig {
    /// Endpoint URL (`https://`, or `http://` on loopback); without it, the
    /// `introspection_endpoint` discovered from `issuer`.
    #[serde(default)]
    pub url: Option<ConfigUrl>,
    /// The provider's issuer identifier: its metadata gives `url` when that is not set
    /// ([`super::discovery`]).
    #[serde(default)]
    pub issuer: Option<ConfigUrl>,
    /// The broker's OAuth client id.
    pub client_id: String,
    /// The client secret inline (prefer `client_secret_file`).
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// File whose first line is the client secret. Without either, env `EXTAUTH_CLIENT_SECRET`.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// `client_secret_basic` (default) or `client_secret_post`.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// Scope, audience and issuer requirements (`require = { ... }`).
    #[serde(default)]
    pub require: ClaimRules,
    /// Connect and total timeouts.
    #[serde(default)]
    pub timeouts: HttpTimeouts,
}

/// An RFC 7662 introspection client.
pub(crate) struct Introspection {
    http: ProviderClient,
    url: EndpointUrl,
    config: IntrospectionConfig,
    secret: Secret,
    /// Paces the "our client credentials were refused" warning: once a minute, not per login.
    refused_warning: Throttle,
}

impl Introspection {
    /// A client for `config.url` under the broker-wide `policy`, its secret resolved (inline,
    /// file, then env).
    ///
    /// # Errors
    /// A bad URL or timeout, a missing or unreadable secret, or a TLS set-up failure.
    pub(crate) fn new(
        config: IntrospectionConfig,
        policy: &ProviderPolicy,
    ) -> Result<Self, SetupError> {
        let (http, url) = client_and_url(
            "introspection",
            "introspection url",
            config.url.as_ref(),
            config.issuer.as_ref(),
            Endpoint::Introspection,
            config.timeouts,
            policy,
        )?;
        if config.client_id.is_empty() {
            return Err(SetupError::Rule(
                "introspection needs a client id (--client-id or client_id)".into(),
            ));
        }
        let secret = match (&config.client_secret, &config.client_secret_file) {
            (Some(s), _) => s.clone(),
            (None, Some(path)) => crate::secrets::read_secret(path, "client_secret_file").map_err(|e| SetupError::SecretFile(format!("{e:#}")))?,
            (None, None) => match std::env::var("EXTAUTH_CLIENT_SECRET") {
                Ok(s) if !s.is_empty() => Secret::new(s),
                _ => return Err(SetupError::Rule("the client secret is required: set EXTAUTH_CLIENT_SECRET, --client-secret-file or client_secret_file".into())),
            },
        };
        Ok(Introspection {
            http,
            url,
            config,
            secret,
            refused_warning: Throttle::new(Duration::from_secs(60)),
        })
    }

    async fn introspect(&self, token: &Secret) -> Validation {
        let mut form = vec![
            ("token", token.expose()),
            ("token_type_hint", "access_token"),
        ];
        let url = match self.url.get().await {
            Ok(url) => url,
            Err(why) => return Validation::Unavailable(why),
        };
        let mut request = self.http.request(reqwest::Method::POST, &url);
        match self.config.client_auth {
            ClientAuth::ClientSecretBasic => {
                request = request.basic_auth(&self.config.client_id, Some(self.secret.expose()))
            }
            ClientAuth::ClientSecretPost => {
                form.push(("client_id", &self.config.client_id));
                form.push(("client_secret", self.secret.expose()));
            }
        }
        let response = match self.http.send(request.form(&form)).await {
            Ok(r) => r,
            Err(why) => return Validation::Unavailable(why),
        };
        let status = response.status().as_u16();
        if matches!(status, 401 | 403) {
            return self.credentials_refused(status);
        }
        if !response.status().is_success() {
            return Validation::Unavailable(self.http.status(&response));
        }
        match self.http.json(response).await {
            Ok(body) => self.interpret(body),
            Err(why) => Validation::Unavailable(why),
        }
    }

    /// A 401 or 403 refuses the broker's own client credentials (RFC 7662 section 2.1), not the
    /// token: no cacheable "no", and a warning that says what to check, once a minute.
    fn credentials_refused(&self, status: u16) -> Validation {
        if self.refused_warning.allow() {
            warn!(
                url = %self.url,
                client_id = %self.config.client_id,
                client_auth = ?self.config.client_auth,
                "introspection endpoint refused the broker's own client credentials (HTTP \
                 {status}): check client_id, the client secret and client_auth against the \
                 provider's client registration; new tokens are refused meanwhile (logged at \
                 most once a minute)"
            );
        }
        Validation::Unavailable(ProviderError::CredentialsRefused {
            what: "introspection",
            status,
        })
    }

    /// Reads an RFC 7662 section 2.2 answer.
    fn interpret(&self, body: Value) -> Validation {
        let Value::Object(claims) = body else {
            return Validation::Unavailable(self.http.malformed("is not a JSON object"));
        };
        match claims.get("active") {
            Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => return Validation::Invalid(Reason::Inactive),
            _ => return Validation::Unavailable(self.http.malformed("has no boolean \"active\"")),
        }
        let exp = match seconds_claim(&claims, "exp") {
            Ok(exp) => exp,
            Err(why) => return Validation::Unavailable(self.http.malformed(why)),
        };
        if let Err(reason) = self.config.require.check(&claims) {
            return Validation::Invalid(reason);
        }
        Validation::Valid(Grant {
            claims,
            exp,
            user_confirmed: false,
        })
    }
}

/// Reads a NumericDate claim (RFC 7519 section 2: seconds since the epoch, possibly fractional).
///
/// # Errors
/// A message when the claim is present but not a non-negative number.
pub(crate) fn seconds_claim(
    claims: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<u64>, String> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or_else(|| format!("claim \"{name}\" is not a number")),
    }
}

impl Validator for Introspection {
    fn validate<'a>(&'a self, check: TokenCheck<'a>) -> BoxFuture<'a, Validation> {
        Box::pin(self.introspect(check.token))
    }

    fn kind(&self) -> &'static str {
        "introspection"
    }

    fn discovered(&self) -> Option<EndpointUrl> {
        self.url.is_discovered().then(|| self.url.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn client(require: ClaimRules) -> Introspection {
        Introspection::new(
            IntrospectionConfig {
                url: Some("http://127.0.0.1:9/introspect".into()),
                issuer: None,
                client_id: "c".into(),
                client_secret: Some(Secret::new("s".into())),
                client_secret_file: None,
                client_auth: ClientAuth::ClientSecretBasic,
                require,
                timeouts: HttpTimeouts::default(),
            },
            &ProviderPolicy::default(),
        )
        .unwrap()
    }

    fn valid(v: Value, exp: Option<u64>) -> Validation {
        Validation::Valid(Grant {
            claims: v.as_object().unwrap().clone(),
            exp,
            user_confirmed: false,
        })
    }

    #[test]
    fn answers_are_read_per_rfc_7662() {
        let c = client(ClaimRules::default());
        let body = json!({"active": true, "username": "Alice", "exp": 12});
        assert_eq!(c.interpret(body.clone()), valid(body, Some(12)));
        let body = json!({"active": true, "sub": "bob", "exp": 12.5});
        assert_eq!(c.interpret(body.clone()), valid(body, Some(12)));
        assert_eq!(
            c.interpret(json!({"active": false, "username": "a"})),
            Validation::Invalid(Reason::Inactive)
        );
        for garbage in [
            json!({"active": "true"}),
            json!({"username": "a"}),
            json!({"active": true, "exp": "soon"}),
            json!([1]),
        ] {
            assert!(
                matches!(c.interpret(garbage.clone()), Validation::Unavailable(_)),
                "{garbage}"
            );
        }
    }

    #[test]
    fn required_scopes_audience_and_issuer_are_definitive_noes() {
        let c = client(ClaimRules {
            scopes: vec!["xmpp".into()],
            audience: Some("ej".into()),
            issuer: None,
        });
        assert_eq!(
            c.interpret(json!({"active": true, "scope": "openid", "aud": "ej"})),
            Validation::Invalid(Reason::InsufficientScope)
        );
        assert_eq!(
            c.interpret(json!({"active": true, "scope": "xmpp", "aud": "x"})),
            Validation::Invalid(Reason::WrongAudience)
        );
        assert!(matches!(
            c.interpret(json!({"active": true, "scope": "xmpp", "aud": "ej"})),
            Validation::Valid(_)
        ));
    }
}

//! RFC 7662 OAuth 2.0 token introspection.
//!
//! `POST` the endpoint with the form `token=...&token_type_hint=access_token`, authenticated with
//! HTTP Basic (client id and secret, RFC 7662 section 2.1). The JSON answer (section 2.2) must
//! have `active`; `exp` is seconds since the epoch; the user is in the configured claim
//! (default `username`), falling back to `sub`.

use serde_json::Value;

use super::{BoxFuture, Validation, Validator};
use crate::config::IntrospectionConfig;
use crate::extauth::Secret;
use crate::wire::Reason;

/// An RFC 7662 introspection client.
pub struct Introspection {
    http: reqwest::Client,
    config: IntrospectionConfig,
}

impl Introspection {
    /// A client for `config.url`, with connect (2 s, capped by the call timeout) and total
    /// timeouts set, since reqwest has none by default.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS set-up).
    pub fn new(config: IntrospectionConfig) -> reqwest::Result<Self> {
        crate::daemon::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(config.timeout.min(std::time::Duration::from_secs(2)))
            .timeout(config.timeout)
            .pool_max_idle_per_host(64)
            .user_agent(concat!("extauth-broker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Introspection { http, config })
    }

    async fn introspect(&self, token: &Secret) -> Validation {
        let response = self
            .http
            .post(&self.config.url)
            .basic_auth(&self.config.client_id, Some(self.config.client_secret.expose()))
            .form(&[("token", token.expose()), ("token_type_hint", "access_token")])
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            // reqwest's message names the URL only, never the form body.
            Err(e) => return Validation::Unavailable(format!("introspection request failed: {}", e.without_url())),
        };
        let status = response.status();
        if !status.is_success() {
            // 401/403 here means the broker's own client credentials were refused: not the
            // token's fault, so not a cacheable "no".
            return Validation::Unavailable(format!("introspection endpoint answered HTTP {}", status.as_u16()));
        }
        match response.json::<Value>().await {
            Ok(body) => self.interpret(&body),
            Err(_) => Validation::Unavailable("introspection answer is not JSON".to_owned()),
        }
    }

    /// Reads an RFC 7662 section 2.2 answer.
    fn interpret(&self, body: &Value) -> Validation {
        match body.get("active") {
            Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => return Validation::Invalid(Reason::Inactive),
            _ => return Validation::Unavailable("introspection answer has no boolean \"active\"".to_owned()),
        }
        let exp = match body.get("exp") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64().or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)) {
                Some(exp) => Some(exp),
                None => return Validation::Unavailable("introspection \"exp\" is not a number".to_owned()),
            },
        };
        let claim = |name: &str| body.get(name).and_then(Value::as_str).map(str::to_owned);
        let subject = claim(&self.config.subject_claim).or_else(|| claim("sub"));
        Validation::Valid { subject, exp }
    }
}

impl Validator for Introspection {
    fn validate<'a>(&'a self, token: &'a Secret) -> BoxFuture<'a, Validation> {
        Box::pin(self.introspect(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn client(claim: &str) -> Introspection {
        Introspection::new(IntrospectionConfig {
            url: "http://127.0.0.1:9/introspect".into(),
            client_id: "c".into(),
            client_secret: Secret::new("s".into()),
            subject_claim: claim.into(),
            timeout: std::time::Duration::from_secs(1),
        })
        .unwrap()
    }

    #[test]
    fn answers_are_read_per_rfc_7662() {
        let c = client("username");
        assert_eq!(
            c.interpret(&json!({"active": true, "username": "Alice", "sub": "x", "exp": 12})),
            Validation::Valid { subject: Some("Alice".into()), exp: Some(12) }
        );
        assert_eq!(
            c.interpret(&json!({"active": true, "sub": "bob"})),
            Validation::Valid { subject: Some("bob".into()), exp: None }
        );
        assert_eq!(c.interpret(&json!({"active": false, "username": "a"})), Validation::Invalid(Reason::Inactive));
        assert!(matches!(c.interpret(&json!({"active": "true"})), Validation::Unavailable(_)));
        assert!(matches!(c.interpret(&json!({"username": "a"})), Validation::Unavailable(_)));
        assert!(matches!(c.interpret(&json!({"active": true, "exp": "soon"})), Validation::Unavailable(_)));
        assert_eq!(
            client("preferred_username").interpret(&json!({"active": true, "preferred_username": "c", "sub": "x"})),
            Validation::Valid { subject: Some("c".into()), exp: None }
        );
    }
}

//! A site's own HTTP API: "does this user exist, and is this token theirs?"
//!
//! The broker calls `method url` (the URL a template with `{user}` and `{domain}`, each
//! percent-encoded, RFC 3986 section 2.1) with the token as `Authorization: Bearer` (RFC 6750
//! section 2.1) or as a form field (RFC 6750 section 2.2 style). A `2xx` answer means yes when
//! the body satisfies the configured rule (a JSON pointer, RFC 6901, holding the expected value);
//! `401`, `403` and `404` mean no; anything else says nothing and is never cached.
//!
//! When the URL names `{user}`, the API was asked about this very user, so its yes binds the
//! token to the JID by itself; a status alone is not a yes (an error or maintenance page answers
//! 200 too) unless `trust_status` says the endpoint checks the token itself. Otherwise the answer
//! must be a JSON object, read as the token's claims, and the engine binds the subject claim as
//! for any other validator.

use serde::Deserialize;
use serde_json::{Map, Value};
use tracing::warn;

use super::http::{self, HttpTimeouts, ProviderClient, ProviderPolicy};
use super::{BoxFuture, Grant, SetupError, TokenCheck, Validation, Validator};
use crate::secrets::ConfigUrl;
use extauth_protocol::wire::Reason;

/// Where the token travels.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum TokenIn {
    /// `Authorization: Bearer <token>` (the default).
    #[default]
    Bearer,
    /// An `application/x-www-form-urlencoded` body field named by `form_field`.
    Form,
}

/// Settings of a custom API validator (TOML: `validator = { kind = "http", ... }`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpApiConfig {
    /// URL template (http:// or https://); `{user}` and `{domain}` are replaced, percent-encoded.
    /// With `{user}`, a yes binds the token to that user by itself; without, the JSON body's
    /// claims name the user (`subject_claim`, `jid_claim`).
    pub url: ConfigUrl,
    /// HTTP method [default: GET]; `token_in = "form"` needs one with a body (POST, PUT, PATCH).
    #[serde(default = "default_method")]
    pub method: String,
    /// `bearer` (default) or `form`.
    #[serde(default)]
    pub token_in: TokenIn,
    /// Form field carrying the token when `token_in = "form"` [default: token].
    #[serde(default = "default_form_field")]
    pub form_field: String,
    /// RFC 6901 pointer into a `2xx` JSON body, e.g. `/active`; set together with `json_equals`.
    #[serde(default)]
    pub json_pointer: Option<String>,
    /// The JSON value (any TOML value: `true`, `"ok"`, `1`) the pointer must hold; otherwise
    /// the token is refused as `inactive`.
    #[serde(default)]
    pub json_equals: Option<Value>,
    /// With `{user}` in the URL and no `json_pointer` rule: accept on a `2xx` status alone,
    /// because the endpoint itself checks that the token belongs to `{user}` (logged at WARN at
    /// start-up and on every reload) [default: false, such a URL needs a rule].
    #[serde(default)]
    pub trust_status: bool,
    /// Connect and total timeouts.
    #[serde(default)]
    pub timeouts: HttpTimeouts,
}

fn default_method() -> String {
    "GET".into()
}

fn default_form_field() -> String {
    "token".into()
}

/// What a `2xx` body must contain: the value at `pointer` equals `equals`.
#[derive(Debug, Clone)]
struct BodyRule {
    pointer: String,
    equals: Value,
}

/// A custom API client.
pub(crate) struct HttpApi {
    http: ProviderClient,
    method: reqwest::Method,
    config: HttpApiConfig,
    rule: Option<BodyRule>,
    /// The URL names `{user}`: a yes confirms this user.
    asks_about_user: bool,
}

impl HttpApi {
    /// A client for `config` under the broker-wide `policy`.
    ///
    /// # Errors
    /// A bad URL, method, form field, JSON pointer or timeout, a `{user}` URL without a rule or
    /// `trust_status`, or a TLS set-up failure.
    pub(crate) fn new(config: HttpApiConfig, policy: &ProviderPolicy) -> Result<Self, SetupError> {
        let http = ProviderClient::new(
            "http validator",
            "http validator url",
            config.url.expose(),
            config.timeouts,
            policy,
        )?;
        let method = http::method("http validator method", &config.method)?;
        if config.token_in == TokenIn::Form {
            if matches!(method.as_str(), "GET" | "HEAD") {
                return Err(SetupError::Rule(format!(
                    "token_in = \"form\" needs a method with a body (POST, PUT, PATCH), not {method}"
                )));
            }
            if config.form_field.is_empty() {
                return Err(SetupError::Rule("form_field must not be empty".into()));
            }
        }
        let rule = match (&config.json_pointer, &config.json_equals) {
            (None, None) => None,
            (Some(pointer), Some(equals)) if pointer.is_empty() || pointer.starts_with('/') => {
                Some(BodyRule {
                    pointer: pointer.clone(),
                    equals: equals.clone(),
                })
            }
            (Some(pointer), Some(_)) => {
                return Err(SetupError::Rule(format!(
                    "json_pointer must be empty or start with '/' (RFC 6901), got {pointer:?}"
                )))
            }
            _ => {
                return Err(SetupError::Rule(
                    "give json_pointer and json_equals together".into(),
                ))
            }
        };
        let asks_about_user = config.url.expose().contains("{user}");
        check_trust(&config, asks_about_user, rule.is_some())?;
        Ok(HttpApi {
            http,
            method,
            asks_about_user,
            config,
            rule,
        })
    }

    async fn ask(&self, check: TokenCheck<'_>) -> Validation {
        let url = http::expand_template(self.config.url.expose(), check.user, check.domain);
        let request = self.http.request(self.method.clone(), &url);
        let request = match self.config.token_in {
            TokenIn::Bearer => request.bearer_auth(check.token.expose()),
            TokenIn::Form => request.form(&[(&self.config.form_field, check.token.expose())]),
        };
        let response = match self.http.send(request).await {
            Ok(r) => r,
            Err(why) => return Validation::Unavailable(why),
        };
        let status = response.status();
        if matches!(status.as_u16(), 401 | 403 | 404) {
            return Validation::Invalid(Reason::Inactive);
        }
        if !status.is_success() {
            return Validation::Unavailable(self.http.status(&response));
        }
        match self.http.body(response).await {
            Ok(body) => self.interpret(&body),
            Err(why) => Validation::Unavailable(why),
        }
    }

    /// Reads a `2xx` body.
    fn interpret(&self, body: &[u8]) -> Validation {
        let json = serde_json::from_slice::<Value>(body).ok();
        if let Some(rule) = &self.rule {
            let Some(json) = &json else {
                return Validation::Unavailable(self.http.malformed("is not JSON"));
            };
            if json.pointer(&rule.pointer) != Some(&rule.equals) {
                return Validation::Invalid(Reason::Inactive);
            }
        }
        let claims = match json {
            Some(Value::Object(claims)) => claims,
            // Asked about this user, with a rule that held or `trust_status`: the status vouches.
            _ if self.asks_about_user => Map::new(),
            // The claims name the user: an HTML page or a bare `true` names nobody.
            _ => return Validation::Unavailable(self.http.malformed("is not a JSON object")),
        };
        Validation::Valid(Grant {
            claims,
            exp: None,
            user_confirmed: self.asks_about_user,
        })
    }
}

/// A URL with `{user}` needs a body rule, or `trust_status` to accept on a 2xx status alone
/// (said loudly, at every start-up and reload); `trust_status` is refused where it means nothing.
fn check_trust(
    config: &HttpApiConfig,
    asks_about_user: bool,
    ruled: bool,
) -> Result<(), SetupError> {
    match (asks_about_user, ruled, config.trust_status) {
        (true, false, false) => Err(SetupError::Rule(format!(
            "http validator url {}: with {{user}} in the URL a 2xx status alone would accept any \
             token for that user (an error or maintenance page too). Add json_pointer and \
             json_equals (the value the answer holds for a yes, e.g. json_pointer = \"/valid\" \
             and json_equals = true), or trust_status = true if the endpoint itself answers 2xx \
             only when the token belongs to {{user}}",
            config.url
        ))),
        (true, false, true) => {
            warn!(
                url = %config.url,
                "http validator: trust_status = true, any 2xx answer logs {{user}} in; the \
                 endpoint itself must check that the token belongs to that user"
            );
            Ok(())
        }
        (true, true, true) => Err(SetupError::Rule(
            "trust_status = true and a json_pointer rule: give one or the other".into(),
        )),
        (false, _, true) => Err(SetupError::Rule(
            "trust_status needs {user} in the url (without it, the answer's claims name the user)"
                .into(),
        )),
        _ => Ok(()),
    }
}

impl Validator for HttpApi {
    fn validate<'a>(&'a self, check: TokenCheck<'a>) -> BoxFuture<'a, Validation> {
        Box::pin(self.ask(check))
    }

    fn kind(&self) -> &'static str {
        "http"
    }

    fn asks_about_user(&self) -> bool {
        self.asks_about_user
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use extauth_protocol::extauth::Secret;
    use serde_json::json;

    fn config(url: &str) -> HttpApiConfig {
        toml::from_str(&format!("url = {url:?}")).unwrap()
    }

    /// A validator for `url` with `rule`; a `{user}` URL without a rule trusts the status.
    fn api(url: &str, rule: Option<(&str, Value)>) -> HttpApi {
        let mut c = config(url);
        c.trust_status = rule.is_none() && url.contains("{user}");
        if let Some((pointer, equals)) = rule {
            c.json_pointer = Some(pointer.into());
            c.json_equals = Some(equals);
        }
        HttpApi::new(c, &ProviderPolicy::default()).unwrap()
    }

    #[test]
    fn defaults_and_toml_values() {
        let c: HttpApiConfig = toml::from_str(
            "url = \"https://api/check\"\nmethod = \"post\"\ntoken_in = \"form\"\njson_pointer = \"/status/ok\"\njson_equals = true\n",
        )
        .unwrap();
        assert_eq!(
            (c.token_in, c.form_field.as_str(), c.json_equals),
            (TokenIn::Form, "token", Some(json!(true)))
        );
        let c = config("https://api/users/{user}");
        assert_eq!((c.method.as_str(), c.token_in), ("GET", TokenIn::Bearer));
        assert!(toml::from_str::<HttpApiConfig>("url = \"https://a\"\nheader = 1\n").is_err());
    }

    #[test]
    fn bad_settings_are_refused() {
        let with = |f: &dyn Fn(&mut HttpApiConfig)| {
            let mut c = config("https://api/users/{user}");
            c.trust_status = true;
            f(&mut c);
            HttpApi::new(c, &ProviderPolicy::default()).err()
        };
        assert!(
            with(&|c| c.token_in = TokenIn::Form).is_some(),
            "form with GET"
        );
        assert!(with(&|c| c.method = "bad method".into()).is_some());
        assert!(
            with(&|c| c.json_pointer = Some("/ok".into())).is_some(),
            "pointer alone"
        );
        assert!(with(&|c| {
            c.json_pointer = Some("ok".into());
            c.json_equals = Some(json!(true));
        })
        .is_some());
        assert!(with(&|c| c.url = "api/users".into()).is_some());
        assert!(with(&|c| {
            c.method = "POST".into();
            c.token_in = TokenIn::Form;
        })
        .is_none());
    }

    #[test]
    fn a_user_url_needs_a_rule_or_trust_status() {
        let build = |url: &str, rule: bool, trust_status: bool| {
            let mut c = config(url);
            c.trust_status = trust_status;
            if rule {
                c.json_pointer = Some("/valid".into());
                c.json_equals = Some(json!(true));
            }
            HttpApi::new(c, &ProviderPolicy::default()).map(|_| ())
        };
        let err = build("https://u:PASSWORD@api/users/{user}", false, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("json_pointer") && err.contains("trust_status = true"),
            "{err}"
        );
        assert!(!err.contains("PASSWORD"), "{err}");
        assert!(build("https://api/users/{user}", true, false).is_ok());
        assert!(build("https://api/users/{user}", false, true).is_ok());
        assert!(build("https://api/users/{user}", true, true).is_err());
        assert!(build("https://api/me", false, true).is_err());
        assert!(build("https://api/me", false, false).is_ok());
    }

    #[test]
    fn bodies_are_read_against_the_rule() {
        let plain = api("https://api/users/{user}", None);
        let yes = |claims: Value, confirmed: bool| {
            Validation::Valid(Grant {
                claims: claims.as_object().unwrap().clone(),
                exp: None,
                user_confirmed: confirmed,
            })
        };
        assert_eq!(
            plain.interpret(b""),
            yes(json!({}), true),
            "2xx alone is a yes"
        );
        assert_eq!(plain.interpret(b"OK"), yes(json!({}), true));
        let me = api("https://api/me", None);
        assert_eq!(
            me.interpret(br#"{"username": "alice"}"#),
            yes(json!({"username": "alice"}), false),
            "without {{user}} the body's claims name the user"
        );
        for not_claims in [&b"<html>maintenance</html>"[..], b"", b"true", b"[]"] {
            assert!(
                matches!(me.interpret(not_claims), Validation::Unavailable(_)),
                "without {{user}} only a JSON object is a yes"
            );
        }
        let ruled = api("https://api/u/{user}", Some(("/data/valid", json!(true))));
        assert_eq!(
            ruled.interpret(br#"{"data": {"valid": true}}"#),
            yes(json!({"data": {"valid": true}}), true)
        );
        for no in [
            &br#"{"data": {"valid": false}}"#[..],
            br#"{"data": {"valid": "true"}}"#,
            br#"{"data": {}}"#,
            b"[]",
        ] {
            assert_eq!(ruled.interpret(no), Validation::Invalid(Reason::Inactive));
        }
        assert!(matches!(
            ruled.interpret(b"<html>"),
            Validation::Unavailable(_)
        ));
    }

    async fn ask(api: &HttpApi, user: &str, token: &str) -> Validation {
        let token = Secret::new(token.to_owned());
        api.ask(TokenCheck {
            user,
            domain: "example.com",
            token: &token,
        })
        .await
    }

    #[tokio::test]
    async fn the_token_travels_as_configured_and_status_codes_decide() {
        use wiremock::matchers::{body_string, header, method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/users/a%26b/example%2Ecom"))
            .and(header("authorization", "Bearer good"))
            .respond_with(ResponseTemplate::new(204))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/check"))
            .and(body_string("access=good"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"sub": "x"})))
            .mount(&server)
            .await;
        Mock::given(path("/users/down/example%2Ecom"))
            .respond_with(ResponseTemplate::new(503))
            .mount(&server)
            .await;
        let bearer = api(&format!("{}/users/{{user}}/{{domain}}", server.uri()), None);
        let mut form = config(&format!("{}/check", server.uri()));
        form.method = "POST".into();
        form.token_in = TokenIn::Form;
        form.form_field = "access".into();
        let form = HttpApi::new(form, &ProviderPolicy::default()).unwrap();
        assert!(matches!(
            ask(&bearer, "a&b", "good").await,
            Validation::Valid(_)
        ));
        assert_eq!(
            ask(&bearer, "a&b", "wrong").await,
            Validation::Invalid(Reason::Inactive),
            "no mock matches: 404"
        );
        assert!(matches!(
            ask(&bearer, "down", "good").await,
            Validation::Unavailable(_)
        ));
        assert!(matches!(
            ask(&form, "x", "good").await,
            Validation::Valid(_)
        ));
        assert_eq!(
            ask(&form, "x", "bad").await,
            Validation::Invalid(Reason::Inactive)
        );
    }
}

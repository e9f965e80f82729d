//! Token validators: ask an OAuth provider (or check locally) whether a token is valid and whose
//! it is. One module per provider kind, all behind [`Validator`].
//!
//! A validator only reports what the provider said ([`Validation`]); binding the token to the JID
//! (claim vs. localpart) and caching are the engine's job, the same for every validator.

pub(crate) mod breaker;
pub(crate) mod claims;
pub(crate) mod discovery;
pub(crate) mod error;
pub(crate) mod gate;
pub(crate) mod http;
pub(crate) mod http_api;
pub(crate) mod introspection;
pub(crate) mod jwt;
pub(crate) mod userinfo;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::secrets::ConfigUrl;
pub(crate) use error::ProviderError;
pub use error::SetupError;
use extauth_protocol::extauth::Secret;
use extauth_protocol::wire::Reason;

/// What a validator is asked: may `token` log in `user@domain`?
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenCheck<'a> {
    /// The JID localpart as ejabberd sent it (already nodeprep'd).
    pub user: &'a str,
    /// The JID domain (the ejabberd vhost).
    pub domain: &'a str,
    /// The access token.
    pub token: &'a Secret,
}

/// An accepted token, as far as the provider is concerned.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Grant {
    /// The token's claims (introspection answer, userinfo document, JWT payload); the engine
    /// reads the subject from them. Empty when the provider vouched for the user itself.
    pub claims: Map<String, Value>,
    /// Expiry, seconds since the Unix epoch, when the provider gave one.
    pub exp: Option<u64>,
    /// True when the provider was asked about this very user (a custom API with `{user}` in the
    /// URL) and said yes, so no claim needs to match.
    pub user_confirmed: bool,
}

/// What a provider said about a token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Validation {
    /// The token is valid; whose it is, the engine decides from the grant.
    Valid(Grant),
    /// A definitive "no" (cacheable as a negative verdict), with its reason.
    Invalid(Reason),
    /// The provider could not answer (transport error, timeout, 5xx, unparseable body). Never
    /// cached. Its message is for logs and holds no secret.
    Unavailable(ProviderError),
}

impl Validation {
    /// Its label in metrics: `valid`, `invalid` or `unavailable`.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Validation::Valid(_) => "valid",
            Validation::Invalid(_) => "invalid",
            Validation::Unavailable(_) => "unavailable",
        }
    }
}

/// A boxed future, so validators can live behind `dyn Validator`.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A token validator (one per provider kind, one instance per configured domain).
pub(crate) trait Validator: Send + Sync {
    /// Decides on `check`. Must not log the token or put it in the `Unavailable` message.
    fn validate<'a>(&'a self, check: TokenCheck<'a>) -> BoxFuture<'a, Validation>;

    /// The kind's name (`introspection`, `userinfo`, `jwt`, `http`), for logs and metrics.
    fn kind(&self) -> &'static str;

    /// Whether the answer depends on the user asked about (a site API with `{user}` in its
    /// URL). Then each user's answer is cached apart; otherwise one answer on a token serves
    /// every user it is tried for, and the binding to a user is decided locally.
    fn asks_about_user(&self) -> bool {
        false
    }

    /// The endpoint this validator discovers from its provider's metadata, when its URL is not
    /// configured but taken from `issuer`.
    fn discovered(&self) -> Option<discovery::EndpointUrl> {
        None
    }
}

/// A validator's settings: the TOML table `validator = { kind = "...", ... }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum ValidatorConfig {
    /// RFC 7662 token introspection.
    Introspection(introspection::IntrospectionConfig),
    /// OpenID Connect UserInfo (OIDC Core 5.3).
    Userinfo(userinfo::UserinfoConfig),
    /// A JWT verified locally (RFC 7519) with a JWK Set (RFC 7517) or an HS256 secret.
    Jwt(jwt::JwtConfig),
    /// The site's own HTTP API (`kind = "http"`).
    Http(http_api::HttpApiConfig),
}

impl ValidatorConfig {
    /// Where the provider is (the redacted endpoint URL, or the JWKS source): two domains with
    /// the same endpoint share a provider.
    pub(crate) fn endpoint(&self) -> String {
        match self {
            ValidatorConfig::Introspection(c) => shown(&c.url, &c.issuer),
            ValidatorConfig::Userinfo(c) => shown(&c.url, &c.issuer),
            ValidatorConfig::Http(c) => c.url.to_string(),
            ValidatorConfig::Jwt(c) => match (&c.jwks_url, &c.jwks_file, &c.issuer) {
                (None, Some(file), _) => file.display().to_string(),
                (None, None, None) => "an HS256 secret".into(),
                (url, _, issuer) => shown(url, issuer),
            },
        }
    }

    /// One line for `check-config`: kind, endpoint and what is required of tokens; secrets are
    /// never shown, only whether and where they are set.
    pub(crate) fn describe(&self) -> String {
        let timeouts = |t: &http::HttpTimeouts| format!("timeouts {} s/{} s", t.connect, t.total);
        match self {
            ValidatorConfig::Introspection(c) => format!(
                "introspection {} as client {:?} ({}, secret {}){}, {}",
                self.endpoint(),
                c.client_id,
                match c.client_auth {
                    introspection::ClientAuth::ClientSecretBasic => "client_secret_basic",
                    introspection::ClientAuth::ClientSecretPost => "client_secret_post",
                },
                match (&c.client_secret, &c.client_secret_file) {
                    (Some(_), _) => "inline".to_owned(),
                    (None, Some(path)) => format!("from {}", path.display()),
                    (None, None) => "from EXTAUTH_CLIENT_SECRET".to_owned(),
                },
                c.require.describe(),
                timeouts(&c.timeouts)
            ),
            ValidatorConfig::Userinfo(c) => format!(
                "userinfo {}{}, {}",
                self.endpoint(),
                c.require.describe(),
                timeouts(&c.timeouts)
            ),
            ValidatorConfig::Jwt(c) => format!(
                "jwt, keys from {}{}{}, leeway {} s, unknown kids refetched at most every {} s",
                self.endpoint(),
                c.require.describe(),
                c.typ
                    .as_ref()
                    .map_or_else(String::new, |t| format!(", typ {t}")),
                c.leeway,
                c.jwks_min_refresh
            ),
            ValidatorConfig::Http(c) => format!(
                "http {} {} (token {}){}, {}",
                c.method.to_uppercase(),
                c.url,
                match c.token_in {
                    http_api::TokenIn::Bearer => "as Authorization: Bearer".to_owned(),
                    http_api::TokenIn::Form => format!("in form field {:?}", c.form_field),
                },
                match (&c.json_pointer, &c.json_equals) {
                    (Some(p), Some(v)) => format!(", body {p} must equal {v}"),
                    _ => String::new(),
                },
                timeouts(&c.timeouts)
            ),
        }
    }
}

/// A configured URL, or where it is discovered from.
fn shown(url: &Option<ConfigUrl>, issuer: &Option<ConfigUrl>) -> String {
    match (url, issuer) {
        (Some(url), _) => url.to_string(),
        (None, Some(issuer)) => format!("discovered from {issuer}"),
        (None, None) => "no URL".into(),
    }
}

/// Builds the validator `config` describes under the broker-wide provider `policy`, wrapped in
/// a circuit breaker and a cap of `concurrency` calls at once, served in turn by user
/// ([`gate::Gate`]); `jwt` is neither: it makes no call per login (its JWKS fetches are
/// limited by `jwks_min_refresh`).
///
/// # Errors
/// A message naming the bad setting (unreadable secret file, bad URL, ...).
pub(crate) fn build(
    config: &ValidatorConfig,
    breaker: breaker::BreakerConfig,
    concurrency: usize,
    policy: &http::ProviderPolicy,
) -> Result<Arc<dyn Validator>, SetupError> {
    let inner: Arc<dyn Validator> = match config {
        ValidatorConfig::Introspection(c) => {
            Arc::new(introspection::Introspection::new(c.clone(), policy)?)
        }
        ValidatorConfig::Userinfo(c) => Arc::new(userinfo::Userinfo::new(c.clone(), policy)?),
        ValidatorConfig::Http(c) => Arc::new(http_api::HttpApi::new(c.clone(), policy)?),
        // Verified locally: there is no per-login call for a breaker to spare, and an open one
        // would refuse tokens whose keys are at hand. JWKS fetches have their own limit.
        ValidatorConfig::Jwt(c) => return Ok(Arc::new(jwt::Jwt::new(c.clone(), policy)?)),
    };
    let gated: Arc<dyn Validator> = Arc::new(gate::Gate::new(inner, concurrency));
    Ok(Arc::new(breaker::Breaker::new(gated, breaker)))
}

//! Token validators: ask an OAuth provider (or check locally) whether a token is valid and whose
//! it is. One module per provider kind, all behind [`Validator`].
//!
//! A validator only reports what the provider said ([`Validation`]); binding the token to the JID
//! (claim vs. localpart) and caching are the engine's job, the same for every validator.

pub mod breaker;
pub mod claims;
pub mod http;
pub mod http_api;
pub mod introspection;
pub mod jwt;
pub mod userinfo;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::extauth::Secret;
use crate::wire::Reason;

/// What a validator is asked: may `token` log in `user@domain`?
#[derive(Debug, Clone, Copy)]
pub struct TokenCheck<'a> {
    /// The JID localpart as ejabberd sent it (already nodeprep'd).
    pub user: &'a str,
    /// The JID domain (the ejabberd vhost).
    pub domain: &'a str,
    /// The access token.
    pub token: &'a Secret,
}

/// An accepted token, as far as the provider is concerned.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Grant {
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
pub enum Validation {
    /// The token is valid; whose it is, the engine decides from the grant.
    Valid(Grant),
    /// A definitive "no" (cacheable as a negative verdict), with its reason.
    Invalid(Reason),
    /// The provider could not answer (transport error, timeout, 5xx, unparseable body). Never
    /// cached. The message is for logs and holds no secret.
    Unavailable(String),
}

/// A boxed future, so validators can live behind `dyn Validator`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A token validator (one per provider kind, one instance per configured domain).
pub trait Validator: Send + Sync {
    /// Decides on `check`. Must not log the token or put it in the `Unavailable` message.
    fn validate<'a>(&'a self, check: TokenCheck<'a>) -> BoxFuture<'a, Validation>;

    /// The kind's name (`introspection`, `userinfo`, `jwt`, `http`), for logs and metrics.
    fn kind(&self) -> &'static str;
}

/// A validator's settings: the TOML table `validator = { kind = "...", ... }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ValidatorConfig {
    /// RFC 7662 token introspection.
    Introspection(introspection::IntrospectionConfig),
    /// OpenID Connect UserInfo (OIDC Core 5.3).
    Userinfo(userinfo::UserinfoConfig),
    /// A JWT verified locally (RFC 7519) with a JWK Set (RFC 7517) or an HS256 secret.
    Jwt(jwt::JwtConfig),
    /// The site's own HTTP API (`kind = "http"`).
    Http(http_api::HttpApiConfig),
}

/// Builds the validator `config` describes, wrapped in a circuit breaker (except `jwt`, which
/// makes no call per login; its JWKS fetches are limited by `jwks_min_refresh`).
///
/// # Errors
/// A message naming the bad setting (unreadable secret file, bad URL, ...).
pub fn build(
    config: &ValidatorConfig,
    breaker: breaker::BreakerConfig,
) -> Result<Arc<dyn Validator>, String> {
    let inner: Arc<dyn Validator> = match config {
        ValidatorConfig::Introspection(c) => {
            Arc::new(introspection::Introspection::new(c.clone())?)
        }
        ValidatorConfig::Userinfo(c) => Arc::new(userinfo::Userinfo::new(c.clone())?),
        ValidatorConfig::Http(c) => Arc::new(http_api::HttpApi::new(c.clone())?),
        // Verified locally: there is no per-login call for a breaker to spare, and an open one
        // would refuse tokens whose keys are at hand. JWKS fetches have their own limit.
        ValidatorConfig::Jwt(c) => return Ok(Arc::new(jwt::Jwt::new(c.clone())?)),
    };
    Ok(Arc::new(breaker::Breaker::new(inner, breaker)))
}

//! Provider metadata discovery: `issuer = "https://..."` alone gives a validator its endpoints.
//!
//! The metadata document is fetched from `<issuer>/.well-known/openid-configuration` (OpenID
//! Connect Discovery 1.0 section 4), else from the RFC 8414 location
//! (`https://host/.well-known/oauth-authorization-server/<issuer path>`, section 3). Its `issuer`
//! must equal the configured one exactly (Discovery section 4.3, RFC 8414 section 3.3), and every
//! endpoint it names passes the same checks as a configured URL (`https://`, or `http://` on
//! loopback). It is fetched on first use (the daemon prefetches at start), kept, and refreshed
//! after [`REFRESH`]; a failed refresh keeps the endpoints already known. An explicitly
//! configured URL always wins over a discovered one.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tracing::{info, warn};

use super::http::{check_url, HttpTimeouts, ProviderClient, ProviderPolicy};
use super::{ProviderError, SetupError};
use crate::secrets::{redact_url, ConfigUrl};

/// How long a metadata document is used before it is fetched again.
pub(crate) const REFRESH: Duration = Duration::from_secs(3600);

/// After a failed fetch with nothing known, how long logins get the same error without a new
/// fetch (so a down provider costs one request per period, not one per login).
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// An endpoint a validator takes from the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `introspection_endpoint` (RFC 8414 section 2; RFC 7662).
    Introspection,
    /// `userinfo_endpoint` (OpenID Connect Discovery section 3).
    Userinfo,
    /// `jwks_uri` (both).
    Jwks,
}

impl Endpoint {
    /// The metadata field's name.
    pub(crate) fn field(self) -> &'static str {
        match self {
            Endpoint::Introspection => "introspection_endpoint",
            Endpoint::Userinfo => "userinfo_endpoint",
            Endpoint::Jwks => "jwks_uri",
        }
    }
}

/// The part of a provider's metadata the broker uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct Metadata {
    /// The issuer identifier; must equal the configured one.
    pub issuer: String,
    /// RFC 7662 introspection endpoint, when listed (django-oauth-toolkit does not list it).
    #[serde(default)]
    pub introspection_endpoint: Option<String>,
    /// OIDC UserInfo endpoint.
    #[serde(default)]
    pub userinfo_endpoint: Option<String>,
    /// The JWK Set.
    #[serde(default)]
    pub jwks_uri: Option<String>,
}

impl Metadata {
    fn get(&self, which: Endpoint) -> Option<&str> {
        match which {
            Endpoint::Introspection => self.introspection_endpoint.as_deref(),
            Endpoint::Userinfo => self.userinfo_endpoint.as_deref(),
            Endpoint::Jwks => self.jwks_uri.as_deref(),
        }
    }
}

/// What is known of the metadata.
#[derive(Default)]
struct Known {
    /// The last good document and when it was fetched.
    metadata: Option<(Metadata, Instant)>,
    /// The last failure and when it happened.
    failure: Option<(ProviderError, Instant)>,
}

/// One issuer's metadata, fetched and kept fresh.
pub(crate) struct Discovery {
    issuer: String,
    client: ProviderClient,
    policy: ProviderPolicy,
    known: RwLock<Known>,
    /// One fetch at a time: logins that find nothing known wait for it.
    fetching: tokio::sync::Mutex<()>,
}

impl Discovery {
    /// Discovery for `issuer` (an `https://` URL, or `http://` on loopback under `policy`).
    ///
    /// # Errors
    /// A bad issuer URL or timeout, or a TLS set-up failure.
    pub(crate) fn new(
        issuer: &ConfigUrl,
        timeouts: HttpTimeouts,
        policy: &ProviderPolicy,
    ) -> Result<Self, SetupError> {
        let client = ProviderClient::new(
            "provider metadata",
            "issuer",
            issuer.expose(),
            timeouts,
            policy,
        )?;
        Ok(Discovery {
            issuer: issuer.expose().to_owned(),
            client,
            policy: *policy,
            known: RwLock::default(),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// The configured issuer, redacted for messages.
    pub(crate) fn issuer(&self) -> String {
        redact_url(&self.issuer)
    }

    /// The URL of `which`, from the metadata (fetched or refreshed if needed).
    ///
    /// # Errors
    /// [`ProviderError::Discovery`]: no metadata could be fetched, or it does not list `which`.
    pub(crate) async fn endpoint(&self, which: Endpoint) -> Result<String, ProviderError> {
        let metadata = self.metadata().await?;
        metadata.get(which).map(str::to_owned).ok_or_else(|| {
            self.failed(format!(
                "the metadata lists no {}: configure the URL explicitly",
                which.field()
            ))
        })
    }

    /// [`ProviderError::Discovery`] for this issuer.
    fn failed(&self, detail: String) -> ProviderError {
        ProviderError::Discovery {
            issuer: self.issuer(),
            detail,
        }
    }

    /// The current metadata: the kept document while it is younger than [`REFRESH`], else a
    /// fresh fetch (a failed refresh keeps the old document).
    ///
    /// # Errors
    /// Nothing known and the fetch failed (the same error is returned without a new fetch for
    /// a few seconds).
    pub(crate) async fn metadata(&self) -> Result<Metadata, ProviderError> {
        if let Some(kept) = self.kept() {
            return kept;
        }
        let _one_at_a_time = self.fetching.lock().await;
        if let Some(kept) = self.kept() {
            return kept;
        }
        match self.fetch().await {
            Ok(metadata) => {
                info!(
                    issuer = %self.issuer(),
                    introspection = metadata.introspection_endpoint.as_deref().unwrap_or("-"),
                    userinfo = metadata.userinfo_endpoint.as_deref().unwrap_or("-"),
                    jwks = metadata.jwks_uri.as_deref().unwrap_or("-"),
                    "provider metadata discovered"
                );
                let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
                known.metadata = Some((metadata.clone(), Instant::now()));
                known.failure = None;
                Ok(metadata)
            }
            Err(why) => {
                warn!("{why}");
                let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
                known.failure = Some((why.clone(), Instant::now()));
                match &known.metadata {
                    Some((old, _)) => Ok(old.clone()),
                    None => Err(why),
                }
            }
        }
    }

    /// The answer without a fetch: a document younger than [`REFRESH`]; the old document, or
    /// the error, while the last fetch failed less than [`RETRY_AFTER`] ago; else `None`.
    fn kept(&self) -> Option<Result<Metadata, ProviderError>> {
        let known = self.known.read().unwrap_or_else(PoisonError::into_inner);
        let recent_failure = known
            .failure
            .as_ref()
            .filter(|(_, at)| at.elapsed() < RETRY_AFTER);
        match (&known.metadata, recent_failure) {
            (Some((metadata, at)), _) if at.elapsed() < REFRESH => Some(Ok(metadata.clone())),
            (Some((metadata, _)), Some(_)) => Some(Ok(metadata.clone())),
            (None, Some((why, _))) => Some(Err(why.clone())),
            _ => None,
        }
    }

    /// Fetches the OpenID document, then the RFC 8414 one, and checks it.
    async fn fetch(&self) -> Result<Metadata, ProviderError> {
        let mut errors = Vec::new();
        for url in metadata_urls(&self.issuer) {
            match self.fetch_one(&url).await {
                Ok(metadata) => return self.check(metadata).map_err(|why| self.failed(why)),
                Err(why) => errors.push(why),
            }
        }
        Err(self.failed(errors.join("; ")))
    }

    /// One metadata URL's document; the error is one attempt's part of the
    /// [`ProviderError::Discovery`] detail.
    async fn fetch_one(&self, url: &str) -> Result<Metadata, String> {
        let response = self
            .client
            .send(self.client.request(reqwest::Method::GET, url))
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!(
                "{} answered HTTP {}",
                redact_url(url),
                response.status().as_u16()
            ));
        }
        let body = self
            .client
            .json(response)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_value(body)
            .map_err(|_| format!("{} is not provider metadata", redact_url(url)))
    }

    /// The document must name this issuer, and every endpoint must be a URL we may call.
    fn check(&self, metadata: Metadata) -> Result<Metadata, String> {
        if metadata.issuer != self.issuer {
            return Err(format!(
                "the metadata of {} names issuer {:?}: it must be the configured issuer exactly \
                 (OpenID Connect Discovery section 4.3)",
                self.issuer(),
                redact_url(&metadata.issuer)
            ));
        }
        for which in [Endpoint::Introspection, Endpoint::Userinfo, Endpoint::Jwks] {
            if let Some(url) = metadata.get(which) {
                check_url(which.field(), url, &self.policy).map_err(|e| e.to_string())?;
            }
        }
        Ok(metadata)
    }
}

/// The metadata locations of `issuer`, in the order tried: OpenID Connect Discovery section 4.1
/// (appended to the issuer, path kept), then RFC 8414 section 3.1 (inserted between host and
/// path).
fn metadata_urls(issuer: &str) -> Vec<String> {
    let trimmed = issuer.trim_end_matches('/');
    let mut urls = vec![format!("{trimmed}/.well-known/openid-configuration")];
    if let Ok(parsed) = reqwest::Url::parse(issuer) {
        let path = parsed.path().trim_end_matches('/');
        let origin = parsed.origin().ascii_serialization();
        urls.push(format!(
            "{origin}/.well-known/oauth-authorization-server{path}"
        ));
    }
    urls
}

/// The HTTP client and the endpoint of a validator configured with `url`, `issuer` or both (the
/// explicit `url` wins; `issuer` alone discovers `which`).
///
/// # Errors
/// Neither given (`setting` names what to add), a bad URL or issuer, a bad timeout.
pub(crate) fn client_and_url(
    what: &'static str,
    setting: &str,
    url: Option<&ConfigUrl>,
    issuer: Option<&ConfigUrl>,
    which: Endpoint,
    timeouts: HttpTimeouts,
    policy: &ProviderPolicy,
) -> Result<(ProviderClient, EndpointUrl), SetupError> {
    let discovery = match (url, issuer) {
        (None, Some(issuer)) => Some(Arc::new(Discovery::new(issuer, timeouts, policy)?)),
        _ => None,
    };
    let endpoint = EndpointUrl::new(url, discovery.as_ref(), which, setting)?;
    let checked = url.or(issuer).map(ConfigUrl::expose).unwrap_or_default();
    let client = ProviderClient::new(what, setting, checked, timeouts, policy)?;
    Ok((client, endpoint))
}

/// Where a validator's endpoint URL comes from; `Display` shows it redacted.
#[derive(Clone)]
pub(crate) enum EndpointUrl {
    /// Configured explicitly (checked at start-up).
    Fixed(String),
    /// Taken from the issuer's metadata.
    Discovered(Arc<Discovery>, Endpoint),
}

impl std::fmt::Display for EndpointUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointUrl::Fixed(url) => f.write_str(&redact_url(url)),
            EndpointUrl::Discovered(d, which) => {
                write!(f, "the {} of {}", which.field(), d.issuer())
            }
        }
    }
}

impl EndpointUrl {
    /// The configured URL, or (without one) the `which` endpoint discovered from `issuer`.
    ///
    /// # Errors
    /// Neither is configured (`setting` names what to add), or a bad issuer.
    pub(crate) fn new(
        url: Option<&ConfigUrl>,
        discovery: Option<&Arc<Discovery>>,
        which: Endpoint,
        setting: &str,
    ) -> Result<Self, SetupError> {
        match (url, discovery) {
            (Some(url), _) => Ok(EndpointUrl::Fixed(url.expose().to_owned())),
            (None, Some(d)) => Ok(EndpointUrl::Discovered(Arc::clone(d), which)),
            (None, None) => Err(SetupError::Rule(format!(
                "{setting} needs url (or issuer, to discover it)"
            ))),
        }
    }

    /// The URL to call now.
    ///
    /// # Errors
    /// [`ProviderError::Discovery`]: discovery failed or the metadata lacks the endpoint.
    pub(crate) async fn get(&self) -> Result<String, ProviderError> {
        match self {
            EndpointUrl::Fixed(url) => Ok(url.clone()),
            EndpointUrl::Discovered(discovery, which) => discovery.endpoint(*which).await,
        }
    }

    /// Is this URL taken from the provider's metadata?
    pub(crate) fn is_discovered(&self) -> bool {
        matches!(self, EndpointUrl::Discovered(..))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    #[test]
    fn metadata_locations_follow_both_specifications() {
        assert_eq!(
            metadata_urls("https://idp.example"),
            vec![
                "https://idp.example/.well-known/openid-configuration",
                "https://idp.example/.well-known/oauth-authorization-server"
            ]
        );
        assert_eq!(
            metadata_urls("https://idp.example/o/"),
            vec![
                "https://idp.example/o/.well-known/openid-configuration",
                "https://idp.example/.well-known/oauth-authorization-server/o"
            ]
        );
    }

    async fn serve(server: &MockServer, at: &str, body: serde_json::Value) {
        Mock::given(method("GET"))
            .and(path(at))
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
            .mount(server)
            .await;
    }

    fn discovery(issuer: &str) -> Discovery {
        Discovery::new(
            &issuer.into(),
            HttpTimeouts::default(),
            &ProviderPolicy::default(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn endpoints_come_from_the_issuers_own_metadata() {
        let server = MockServer::start().await;
        let issuer = format!("{}/o", server.uri());
        serve(
            &server,
            "/o/.well-known/openid-configuration",
            json!({"issuer": issuer, "userinfo_endpoint": format!("{issuer}/userinfo/"),
                   "jwks_uri": format!("{issuer}/jwks/")}),
        )
        .await;
        let d = discovery(&issuer);
        assert_eq!(
            d.endpoint(Endpoint::Userinfo).await,
            Ok(format!("{issuer}/userinfo/"))
        );
        let missing = d
            .endpoint(Endpoint::Introspection)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("lists no introspection_endpoint"),
            "{missing}"
        );
        d.endpoint(Endpoint::Jwks).await.unwrap();
        assert_eq!(
            server.received_requests().await.unwrap().len(),
            1,
            "fetched once, then kept"
        );
    }

    #[tokio::test]
    async fn rfc_8414_metadata_is_the_fallback_and_a_foreign_issuer_is_refused() {
        let server = MockServer::start().await;
        let issuer = format!("{}/tenant", server.uri());
        serve(
            &server,
            "/.well-known/oauth-authorization-server/tenant",
            json!({"issuer": issuer, "introspection_endpoint": format!("{issuer}/introspect")}),
        )
        .await;
        assert_eq!(
            discovery(&issuer).endpoint(Endpoint::Introspection).await,
            Ok(format!("{issuer}/introspect"))
        );
        let liar = MockServer::start().await;
        serve(
            &liar,
            "/.well-known/openid-configuration",
            json!({"issuer": "https://other.example", "jwks_uri": "https://other.example/jwks"}),
        )
        .await;
        let refused = discovery(&liar.uri()).endpoint(Endpoint::Jwks).await;
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .contains("must be the configured issuer"),
            "a document naming another issuer is not believed"
        );
        let plain = MockServer::start().await;
        serve(
            &plain,
            "/.well-known/openid-configuration",
            json!({"issuer": plain.uri(), "jwks_uri": "http://192.0.2.1/jwks"}),
        )
        .await;
        let refused = discovery(&plain.uri()).endpoint(Endpoint::Jwks).await;
        assert!(
            refused.unwrap_err().to_string().contains("loopback"),
            "a discovered endpoint follows the rules of a configured one"
        );
    }
}

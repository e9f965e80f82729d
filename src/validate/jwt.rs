//! JWT access tokens verified locally (RFC 7519), with no provider call per login.
//!
//! The signature is checked (RFC 7515) with a key from the issuer's JWK Set (RFC 7517), fetched
//! from `jwks_url` or read from `jwks_file` and chosen by the header's `kid` (RFC 7515 section
//! 4.1.4), or with a configured HS256 secret. Then `exp` (required), `nbf`, `iss` and `aud` are
//! checked with a small leeway (RFC 7519 section 4.1), and any required scopes.
//!
//! Only access tokens meant for this service pass (RFC 9068 section 4; RFC 9700 section 2.3):
//! an audience is required (`require.audience`; the validator refuses to start without one), the
//! header's `typ` must be `at+jwt` when `typ` is configured, and a token meant for a client is
//! refused as `wrong_token_type`: one carrying ID-token claims (`nonce`, `at_hash`, `c_hash`,
//! `s_hash`; OIDC Core section 2) or whose audience is its own client (`azp` or `client_id`).
//!
//! Algorithm confusion (RFC 8725 section 2.1) is closed three ways: only the configured
//! `algorithms` are accepted (`alg: none` never is); every JWKS key verifies exactly one
//! algorithm, derived from its `kty` and `crv` (and equal to its `alg` when it names one); and
//! HS256 only ever uses the configured secret, never a JWKS key, so a token "signed" with an RSA
//! public key's bytes as an HMAC secret cannot verify.
//!
//! Rotation: a token whose `kid` is not in the set makes the set be fetched again, at most once
//! per `jwks_min_refresh` however many logins ask (a login that finds a fetch from before it
//! arrived waits for the next one, so a new key refuses nobody); the set is also fetched again
//! in the background once it is `jwks_refresh` old. A token keeps verifying until its key leaves
//! the set. While a fetch fails, the keys already known keep working.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::claims::ClaimRules;
use super::discovery::{client_and_url, Endpoint, EndpointUrl};
use super::http::{HttpTimeouts, ProviderClient, ProviderPolicy};
use super::introspection::seconds_claim;
use super::{BoxFuture, Grant, TokenCheck, Validation, Validator};
use super::{ProviderError, SetupError};
use crate::secrets::ConfigUrl;
use extauth_protocol::wire::Reason;

/// The algorithms this validator implements (RFC 7518 section 3.1, RFC 8037 section 3.1).
pub(crate) const SUPPORTED: [Algorithm; 4] = [
    Algorithm::RS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
    Algorithm::HS256,
];

/// The largest `leeway` accepted, seconds: more would keep expired tokens alive.
pub(crate) const MAX_LEEWAY: u64 = 60;

/// Settings of a JWT validator (TOML: `validator = { kind = "jwt", ... }`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JwtConfig {
    /// URL of the issuer's JWK Set (the `jwks_uri` of its discovery document).
    #[serde(default)]
    pub jwks_url: Option<ConfigUrl>,
    /// The provider's issuer identifier: its metadata gives `jwks_url` when that is not set
    /// ([`super::discovery`]), and tokens must carry it as `iss` unless `require.issuer` says
    /// otherwise.
    #[serde(default)]
    pub issuer: Option<ConfigUrl>,
    /// A local JWK Set file instead of `jwks_url` (read at start, and again on an unknown `kid`).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// File whose first line is the HS256 secret (at least 32 bytes, RFC 7518 section 3.2).
    #[serde(default)]
    pub hs256_secret_file: Option<PathBuf>,
    /// Accepted `alg` values, among `RS256`, `ES256`, `EdDSA`, `HS256` [default: the first three
    /// with a JWKS, plus `HS256` with `hs256_secret_file`].
    #[serde(default)]
    pub algorithms: Option<Vec<Algorithm>>,
    /// Least time between two fetches caused by unknown `kid`s, seconds [default: 1].
    #[serde(default = "default_min_refresh")]
    pub jwks_min_refresh: u64,
    /// Age after which the JWKS is fetched again in the background, seconds [default: 300].
    #[serde(default = "default_refresh")]
    pub jwks_refresh: u64,
    /// Clock skew allowed on `exp` and `nbf`, seconds, at most 60 [default: 30].
    #[serde(default = "default_leeway")]
    pub leeway: u64,
    /// Required scopes (`scope` claim), audience (`aud`, required: this service's identifier at
    /// the provider, RFC 9068 section 4) and issuer (`iss`).
    #[serde(default)]
    pub require: ClaimRules,
    /// Required JOSE header `typ` (RFC 9068 section 2.1: `at+jwt`; `application/at+jwt` is the
    /// same), compared without case. Unset: any `typ`.
    #[serde(default)]
    pub typ: Option<String>,
    /// Connect and total timeouts of JWKS fetches.
    #[serde(default)]
    pub timeouts: HttpTimeouts,
}

fn default_min_refresh() -> u64 {
    1
}

fn default_refresh() -> u64 {
    300
}

fn default_leeway() -> u64 {
    30
}

/// A local JWT verifier.
pub(crate) struct Jwt {
    /// One rule set per accepted algorithm, each accepting only that algorithm.
    rules: Vec<jsonwebtoken::Validation>,
    /// The `require.scopes` part of the claim rules (jsonwebtoken checks `iss` and `aud`).
    scopes: ClaimRules,
    /// The audience every token must name (this service).
    audience: String,
    /// The required `typ`, lower case without `application/`.
    typ: Option<String>,
    hs256: Option<Arc<Key>>,
    jwks: Option<Arc<KeyStore>>,
}

impl Jwt {
    /// A verifier for `config`. A `jwks_file` is read now; a `jwks_url` on the first login.
    ///
    /// # Errors
    /// Conflicting or missing key sources, an unsupported algorithm, a leeway over
    /// [`MAX_LEEWAY`], an unreadable or short secret, an unreadable JWKS file or one without a
    /// usable key, a bad URL (`policy` decides on `http://`) or timeout, no audience.
    pub(crate) fn new(config: JwtConfig, policy: &ProviderPolicy) -> Result<Self, SetupError> {
        let Some(audience) = config.require.audience.clone() else {
            return Err(SetupError::Rule(
                "the jwt validator needs require.audience: the identifier of this service that \
                 the provider puts in the aud claim of its access tokens (RFC 9068 section 4). \
                 Without it an ID token or a token for another service would log users in"
                    .into(),
            ));
        };
        if config.leeway > MAX_LEEWAY {
            return Err(SetupError::Rule(format!(
                "jwt leeway must be at most {MAX_LEEWAY} seconds, got {}",
                config.leeway
            )));
        }
        let algorithms = accepted_algorithms(&config)?;
        let hs256 = match &config.hs256_secret_file {
            Some(path) => Some(Arc::new(hs256_key(path)?)),
            None => None,
        };
        let jwks = KeyStore::new(&config, &algorithms, policy)?.map(Arc::new);
        Ok(Jwt {
            rules: algorithms.iter().map(|a| rules_for(*a, &config)).collect(),
            scopes: ClaimRules {
                scopes: config.require.scopes,
                ..ClaimRules::default()
            },
            audience,
            typ: config.typ.as_deref().map(normal_typ),
            hs256,
            jwks,
        })
    }

    async fn verify(&self, token: &str) -> Validation {
        let bad = Validation::Invalid(Reason::BadToken);
        // An `alg` jsonwebtoken does not know, such as `none`, fails here.
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return bad;
        };
        // RFC 7515 section 4.1.11: we understand no extension, so one marked critical refuses.
        if header.crit.is_some() {
            return bad;
        }
        if let Some(typ) = &self.typ {
            if header.typ.as_deref().map(normal_typ).as_ref() != Some(typ) {
                return Validation::Invalid(Reason::WrongTokenType);
            }
        }
        let Some(rules) = self.rules.iter().find(|r| r.algorithms == [header.alg]) else {
            return bad;
        };
        // HS256 takes the configured secret and nothing else; the others a JWKS key.
        let key = match (header.alg, &self.hs256, &self.jwks) {
            (Algorithm::HS256, Some(secret), _) => Arc::clone(secret),
            (Algorithm::HS256, None, _) | (_, _, None) => return bad,
            (alg, _, Some(jwks)) => match jwks.key(header.kid.as_deref(), alg).await {
                Ok(key) => key,
                Err(answer) => return answer,
            },
        };
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, rules) {
            Ok(data) => self.grant(data.claims),
            Err(e) => Validation::Invalid(reason(e.kind())),
        }
    }

    /// The grant of a token whose signature, times, issuer and audience are good.
    fn grant(&self, claims: Map<String, Value>) -> Validation {
        if self.meant_for_a_client(&claims) {
            return Validation::Invalid(Reason::WrongTokenType);
        }
        if let Err(reason) = self.scopes.check(&claims) {
            return Validation::Invalid(reason);
        }
        match seconds_claim(&claims, "exp") {
            Ok(exp) => Validation::Valid(Grant {
                claims,
                exp,
                user_confirmed: false,
            }),
            Err(_) => Validation::Invalid(Reason::BadToken),
        }
    }
}

impl Jwt {
    /// An ID token (OIDC Core section 2: `nonce`, `at_hash`, `c_hash`, `s_hash` belong to ID
    /// tokens only), or a token whose audience is the client it was issued to.
    fn meant_for_a_client(&self, claims: &Map<String, Value>) -> bool {
        const ID_TOKEN_CLAIMS: [&str; 4] = ["nonce", "at_hash", "c_hash", "s_hash"];
        ID_TOKEN_CLAIMS.iter().any(|c| claims.contains_key(*c))
            || ["azp", "client_id"]
                .iter()
                .any(|c| claims.get(*c).and_then(Value::as_str) == Some(self.audience.as_str()))
    }
}

/// A `typ` header value as compared: lower case, without `application/` (RFC 7515 section
/// 4.1.9 lets it be omitted).
fn normal_typ(typ: &str) -> String {
    let lower = typ.to_ascii_lowercase();
    lower
        .strip_prefix("application/")
        .map_or(lower.clone(), str::to_owned)
}

impl Validator for Jwt {
    fn discovered(&self) -> Option<EndpointUrl> {
        match &self.jwks.as_ref()?.source {
            Source::Url { url, .. } => url.is_discovered().then(|| url.clone()),
            Source::File(_) => None,
        }
    }

    fn validate<'a>(&'a self, check: TokenCheck<'a>) -> BoxFuture<'a, Validation> {
        Box::pin(self.verify(check.token.expose()))
    }

    fn kind(&self) -> &'static str {
        "jwt"
    }
}

/// The configured algorithms, or the default for the configured key sources.
fn accepted_algorithms(config: &JwtConfig) -> Result<Vec<Algorithm>, SetupError> {
    if config.jwks_url.is_some() && config.jwks_file.is_some() {
        return Err(SetupError::Rule(
            "give jwks_url or jwks_file, not both".into(),
        ));
    }
    let has_jwks =
        config.jwks_url.is_some() || config.jwks_file.is_some() || config.issuer.is_some();
    let has_secret = config.hs256_secret_file.is_some();
    // An algorithm is usable when its kind of key is configured.
    let usable = |a: &Algorithm| match a {
        Algorithm::HS256 => has_secret,
        _ => has_jwks,
    };
    let algorithms = match &config.algorithms {
        Some(list) => list.clone(),
        None => SUPPORTED.into_iter().filter(usable).collect(),
    };
    if algorithms.is_empty() {
        return Err(SetupError::Rule(
            "jwt needs jwks_url, jwks_file or hs256_secret_file, and algorithms".into(),
        ));
    }
    for alg in &algorithms {
        if !SUPPORTED.contains(alg) {
            return Err(SetupError::Rule(format!(
                "jwt algorithm {alg:?} is not supported (RS256, ES256, EdDSA, HS256)"
            )));
        }
        if !usable(alg) {
            return Err(SetupError::Rule(format!(
                "jwt algorithm {alg:?} needs {}",
                match alg {
                    Algorithm::HS256 => "hs256_secret_file",
                    _ => "jwks_url or jwks_file",
                }
            )));
        }
    }
    if has_secret && !algorithms.contains(&Algorithm::HS256) {
        return Err(SetupError::Rule(
            "hs256_secret_file is set but HS256 is not in algorithms".into(),
        ));
    }
    if has_jwks && algorithms == [Algorithm::HS256] {
        return Err(SetupError::Rule(
            "a JWKS is set but algorithms has only HS256".into(),
        ));
    }
    Ok(algorithms)
}

/// What a token signed with `alg` must satisfy: that algorithm only, `exp` present, `exp` and
/// `nbf` within `leeway`, and the configured issuer and audience (present and equal).
fn rules_for(alg: Algorithm, config: &JwtConfig) -> jsonwebtoken::Validation {
    let mut rules = jsonwebtoken::Validation::new(alg);
    rules.leeway = config.leeway;
    rules.validate_nbf = true;
    let mut required = vec!["exp"];
    let issuer = config
        .require
        .issuer
        .as_deref()
        .or(config.issuer.as_ref().map(ConfigUrl::expose));
    if let Some(issuer) = issuer {
        rules.set_issuer(&[issuer]);
        required.push("iss");
    }
    if let Some(audience) = &config.require.audience {
        rules.set_audience(&[audience]);
        required.push("aud");
    }
    rules.set_required_spec_claims(&required);
    rules
}

/// The verdict for a token jsonwebtoken refused.
fn reason(kind: &ErrorKind) -> Reason {
    match kind {
        ErrorKind::ExpiredSignature => Reason::Expired,
        ErrorKind::ImmatureSignature => Reason::NotYetValid,
        ErrorKind::InvalidIssuer => Reason::WrongIssuer,
        ErrorKind::InvalidAudience => Reason::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => Reason::WrongIssuer,
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => Reason::WrongAudience,
        _ => Reason::BadToken,
    }
}

/// Reads the HS256 secret.
fn hs256_key(path: &Path) -> Result<Key, SetupError> {
    let secret = crate::secrets::read_secret(path, "hs256_secret_file")
        .map_err(|e| SetupError::SecretFile(format!("{e:#}")))?;
    if secret.expose().len() < 32 {
        return Err(SetupError::Rule(format!(
            "hs256_secret_file: {} must hold at least 32 bytes (RFC 7518 section 3.2)",
            path.display()
        )));
    }
    Ok(Key {
        kid: None,
        alg: Algorithm::HS256,
        decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
    })
}

/// A verification key and the one algorithm it verifies.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    decoding: DecodingKey,
}

/// Where the JWK Set comes from.
enum Source {
    Url {
        http: ProviderClient,
        url: EndpointUrl,
    },
    File(PathBuf),
}

/// One fetch of the JWK Set: when it started and ended, and its error if it failed.
struct Attempt {
    started: Instant,
    at: Instant,
    error: Option<ProviderError>,
}

/// The JWK Set's usable keys, kept fresh.
struct KeyStore {
    source: Source,
    algorithms: Vec<Algorithm>,
    min_refresh: Duration,
    max_age: Duration,
    keys: RwLock<Arc<Vec<Arc<Key>>>>,
    /// Held for the whole of a fetch, and remembers the last one: logins that all miss one new
    /// `kid` queue here behind a single fetch, then find its keys.
    last_fetch: Mutex<Option<Attempt>>,
    /// When the next background refresh is due, ms after `epoch`.
    refresh_due_ms: AtomicU64,
    epoch: Instant,
}

/// The outcome of looking a token's key up in the set.
enum Find {
    Key(Arc<Key>),
    /// Not in the set: a fetch may bring it.
    Missing,
    /// The `kid` names a key of another algorithm, or no `kid` and several keys fit.
    Refused,
}

impl KeyStore {
    /// The store for `config`, `None` without a JWKS. A file is read now.
    fn new(
        config: &JwtConfig,
        algorithms: &[Algorithm],
        policy: &ProviderPolicy,
    ) -> Result<Option<Self>, SetupError> {
        if config.jwks_min_refresh == 0 || config.jwks_refresh < config.jwks_min_refresh {
            return Err(SetupError::Rule(
                "jwks_min_refresh must be at least 1 and jwks_refresh at least jwks_min_refresh"
                    .into(),
            ));
        }
        let (source, keys) = match (&config.jwks_url, &config.jwks_file, &config.issuer) {
            (None, Some(path), _) => {
                let keys = read_file(path)
                    .and_then(|body| parse_jwks(&body, algorithms))
                    .map_err(SetupError::Rule)?;
                (Source::File(path.clone()), keys)
            }
            (None, None, None) => return Ok(None),
            (url, _, issuer) => {
                let (http, url) = client_and_url(
                    "JWKS",
                    "jwks_url",
                    url.as_ref(),
                    issuer.as_ref(),
                    Endpoint::Jwks,
                    config.timeouts,
                    policy,
                )?;
                (Source::Url { http, url }, Vec::new())
            }
        };
        let store = KeyStore {
            source,
            algorithms: algorithms.to_vec(),
            min_refresh: Duration::from_secs(config.jwks_min_refresh),
            max_age: Duration::from_secs(config.jwks_refresh),
            keys: RwLock::new(Arc::new(keys)),
            last_fetch: Mutex::new(None),
            refresh_due_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        store.push_refresh(store.max_age);
        Ok(Some(store))
    }

    /// The key for a token's `kid` and `alg`, fetching the set again if it is not there.
    ///
    /// # Errors
    /// The answer for the token: `bad_token` for a key that is not (and cannot be) in the set,
    /// unavailable when the set cannot be fetched.
    async fn key(
        self: &Arc<Self>,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<Key>, Validation> {
        match find(&self.current(), kid, alg) {
            Find::Key(key) => {
                self.refresh_if_due();
                Ok(key)
            }
            Find::Refused => Err(Validation::Invalid(Reason::BadToken)),
            Find::Missing => self.refetch(kid, alg).await,
        }
    }

    /// Fetches the set for an unknown key. Fetches end at least `min_refresh` apart, which
    /// bounds what a stream of made-up `kid`s costs the issuer; a request that finds only a fetch
    /// started before it arrived waits for the next one. So a token signed with a rotated key is
    /// accepted as soon as the set holds the key, and a `kid` is refused as unknown (a cacheable
    /// `bad_token`) only by a fetch that started after the token arrived.
    async fn refetch(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<Key>, Validation> {
        let arrived = Instant::now();
        let error = loop {
            let mut last = self.last_fetch.lock().await;
            // A fetch made while this login waited for the lock may have brought the key.
            if let Find::Key(key) = find(&self.current(), kid, alg) {
                return Ok(key);
            }
            match last.as_ref() {
                Some(attempt) if attempt.started >= arrived => break attempt.error.clone(),
                Some(attempt) if attempt.at.elapsed() < self.min_refresh => {
                    let wait = self.min_refresh - attempt.at.elapsed();
                    drop(last);
                    tokio::time::sleep(wait).await;
                }
                _ => {
                    info!(source = %self.describe(), "unknown key: fetching the JWKS");
                    let attempt = self.fetch().await;
                    let error = attempt.error.clone();
                    *last = Some(attempt);
                    break error;
                }
            }
        };
        match (find(&self.current(), kid, alg), error) {
            (Find::Key(key), _) => Ok(key),
            (Find::Missing, Some(why)) => Err(Validation::Unavailable(why)),
            _ => Err(Validation::Invalid(Reason::BadToken)),
        }
    }

    /// Starts a background fetch when the set is `max_age` old (one at a time: the winner of
    /// the compare-exchange pushes the due time back).
    fn refresh_if_due(self: &Arc<Self>) {
        let now = self.now_ms();
        let due = self.refresh_due_ms.load(Ordering::Acquire);
        let retry = now + self.min_refresh.as_millis() as u64;
        if now < due
            || self
                .refresh_due_ms
                .compare_exchange(due, retry, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let store = Arc::clone(self);
        tokio::spawn(async move {
            let mut last = store.last_fetch.lock().await;
            if store.recent(&last).is_none() {
                *last = Some(store.fetch().await);
            }
        });
    }

    /// The last fetch, if it ended less than `min_refresh` ago.
    fn recent<'a>(&self, last: &'a Option<Attempt>) -> Option<&'a Attempt> {
        last.as_ref().filter(|a| a.at.elapsed() < self.min_refresh)
    }

    /// Fetches and parses the set; on success it replaces the keys, on failure the keys stay.
    async fn fetch(&self) -> Attempt {
        let started = Instant::now();
        let body = match &self.source {
            Source::Url { http, url } => match url.get().await {
                Ok(url) => fetch_url(http, &url).await,
                Err(why) => Err(why.to_string()),
            },
            // A local file of a few KiB: reading it blocks for microseconds.
            Source::File(path) => read_file(path),
        };
        let parsed = body.and_then(|body| parse_jwks(&body, &self.algorithms));
        let at = Instant::now();
        match parsed {
            Ok(keys) => {
                info!(source = %self.describe(), keys = keys.len(), "JWKS loaded");
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
                self.push_refresh(self.max_age);
                Attempt {
                    started,
                    at,
                    error: None,
                }
            }
            Err(detail) => {
                let why = ProviderError::KeySet {
                    from: self.describe(),
                    detail,
                };
                warn!("{why}; keeping the keys already known");
                self.push_refresh(self.min_refresh);
                Attempt {
                    started,
                    at,
                    error: Some(why),
                }
            }
        }
    }

    fn current(&self) -> Arc<Vec<Arc<Key>>> {
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn push_refresh(&self, after: Duration) {
        self.refresh_due_ms
            .store(self.now_ms() + after.as_millis() as u64, Ordering::Release);
    }

    fn describe(&self) -> String {
        match &self.source {
            Source::Url { url, .. } => url.to_string(),
            Source::File(path) => path.display().to_string(),
        }
    }
}

/// Picks the key for `kid` and `alg` (RFC 7515 section 4.1.4; without a `kid`, the one key of
/// that algorithm).
fn find(keys: &[Arc<Key>], kid: Option<&str>, alg: Algorithm) -> Find {
    match kid {
        Some(kid) => {
            let mut named = keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .peekable();
            if named.peek().is_none() {
                return Find::Missing;
            }
            named
                .find(|k| k.alg == alg)
                .map_or(Find::Refused, |k| Find::Key(Arc::clone(k)))
        }
        None => {
            let mut fitting = keys.iter().filter(|k| k.alg == alg);
            match (fitting.next(), fitting.next()) {
                (Some(key), None) => Find::Key(Arc::clone(key)),
                (None, _) => Find::Missing,
                _ => Find::Refused,
            }
        }
    }
}

/// The set at `url`; the error is the detail of a [`ProviderError::KeySet`].
async fn fetch_url(http: &ProviderClient, url: &str) -> Result<Vec<u8>, String> {
    let response = http
        .send(http.request(reqwest::Method::GET, url))
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("answered HTTP {}", response.status().as_u16()));
    }
    http.body(response).await.map_err(|e| e.to_string())
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("jwks_file {}: {e}", path.display()))
}

/// Reads a JWK Set (RFC 7517 section 5) and keeps the keys usable with `algorithms`. Issuers
/// publish encryption keys and other algorithms next to their signing keys, so a key that does
/// not fit is skipped, not an error; a set with no usable key at all is one.
fn parse_jwks(body: &[u8], algorithms: &[Algorithm]) -> Result<Vec<Arc<Key>>, String> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<Value>,
    }
    let set: Set = serde_json::from_slice(body).map_err(|e| format!("not a JWK set: {e}"))?;
    let keys: Vec<Arc<Key>> = set
        .keys
        .into_iter()
        .filter_map(|v| serde_json::from_value::<Jwk>(v).ok())
        .filter_map(|jwk| usable_key(&jwk, algorithms))
        .map(Arc::new)
        .collect();
    if keys.is_empty() {
        return Err(format!(
            "no usable signing key for {algorithms:?} in the JWK set"
        ));
    }
    Ok(keys)
}

/// The key `jwk` holds, if it is a signing key for one of `algorithms` and well-formed.
fn usable_key(jwk: &Jwk, algorithms: &[Algorithm]) -> Option<Key> {
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    // The key type decides the algorithm (RFC 7518 sections 3.3, 3.4; RFC 8037 section 3.1).
    // Symmetric (`oct`) keys are never taken from a JWKS: HS256 uses hs256_secret_file.
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    let declared = jwk
        .common
        .key_algorithm
        .map(|a| Algorithm::from_str(&a.to_string()));
    if declared.is_some_and(|d| d.ok() != Some(alg)) || !algorithms.contains(&alg) {
        return None;
    }
    let decoding = DecodingKey::from_jwk(jwk).ok()?;
    // Sizes checked here so a malformed key is skipped instead of failing every token.
    let sized = match decoding.kind() {
        // RFC 7518 section 3.3: RSA keys of 2048 bits or more; the verifier takes up to 4096.
        DecodingKeyKind::RsaModulusExponent { n, .. } => (256..=512).contains(&n.len()),
        // P-256: 04 || x || y (32 bytes each); Ed25519: 32 bytes.
        DecodingKeyKind::SecretOrDer(bytes) => {
            bytes.len() == if alg == Algorithm::EdDSA { 32 } else { 65 }
        }
    };
    sized.then(|| Key {
        kid: jwk.common.key_id.clone(),
        alg,
        decoding,
    })
}

#[cfg(test)]
#[path = "../../tests/kit/src/tokens.rs"]
#[allow(unreachable_pub)]
mod tokens;

#[cfg(test)]
mod tests {
    use super::tokens::{forge, jwks, public_jwk, sign, Signer, HS256_SECRET};
    use super::*;
    use serde_json::json;
    use tempfile::TempDir;

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    /// A directory with `jwks.json` (the fixture keys `kids`) and `hs256.key`.
    fn key_files(kids: &[&str]) -> TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("jwks.json"), jwks(kids).to_string()).unwrap();
        std::fs::write(dir.path().join("hs256.key"), HS256_SECRET).unwrap();
        dir
    }

    /// The settings in `toml_text`, after `jwks_file = <dir>/jwks.json` and, unless the text
    /// has its own `require`, `require = { audience = "xmpp" }`.
    fn config(dir: &TempDir, toml_text: &str) -> Result<Jwt, SetupError> {
        let file = dir.path().join("jwks.json");
        let require = match toml_text.contains("require") {
            true => "",
            false => "require = { audience = \"xmpp\" }\n",
        };
        let text = format!(
            "jwks_file = {:?}\n{require}{toml_text}",
            file.display().to_string()
        );
        Jwt::new(
            toml::from_str(&text).map_err(|e| SetupError::Rule(e.to_string()))?,
            &ProviderPolicy::default(),
        )
    }

    fn secret_line(dir: &TempDir) -> String {
        let file = dir.path().join("hs256.key");
        format!("hs256_secret_file = {:?}\n", file.display().to_string())
    }

    fn claims(extra: Value) -> Value {
        let mut c = json!({"sub": "alice", "aud": "xmpp", "exp": now() + 600});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    }

    #[tokio::test]
    async fn every_supported_algorithm_verifies_and_reports_exp() {
        let dir = key_files(&["rsa-a", "ec", "ed"]);
        let jwt = config(&dir, &secret_line(&dir)).unwrap();
        let exp = now() + 600;
        let body = json!({"sub": "alice", "aud": "xmpp", "exp": exp});
        for (signer, kid) in [
            (Signer::RsaA, Some("rsa-a")),
            (Signer::Ec, Some("ec")),
            (Signer::Ed, Some("ed")),
            (Signer::Hs256, None),
            (Signer::Ec, None),
        ] {
            assert_eq!(
                jwt.verify(&sign(signer, kid, &body)).await,
                Validation::Valid(Grant {
                    claims: body.as_object().unwrap().clone(),
                    exp: Some(exp),
                    user_confirmed: false,
                }),
                "{signer:?} kid {kid:?}"
            );
        }
    }

    #[tokio::test]
    async fn times_issuer_audience_and_scopes_decide() {
        let dir = key_files(&["rsa-a"]);
        let jwt = config(
            &dir,
            "require = { issuer = \"https://idp\", audience = \"xmpp\", scopes = [\"chat\"] }",
        )
        .unwrap();
        let good = json!({"iss": "https://idp", "aud": "xmpp", "scope": "openid chat"});
        let with = |change: Value| {
            let mut c = claims(good.clone());
            for (k, v) in change.as_object().unwrap() {
                match v {
                    Value::Null => c.as_object_mut().unwrap().remove(k),
                    v => c.as_object_mut().unwrap().insert(k.clone(), v.clone()),
                };
            }
            sign(Signer::RsaA, Some("rsa-a"), &c)
        };
        let cases = [
            (json!({}), None),
            (json!({"aud": ["other", "xmpp"]}), None),
            (json!({"exp": now() - 10}), None), // within the leeway: the engine decides
            (json!({"exp": now() - 120}), Some(Reason::Expired)),
            (json!({"nbf": now() + 600}), Some(Reason::NotYetValid)),
            (json!({"iss": "https://idp/"}), Some(Reason::WrongIssuer)),
            (json!({"iss": null}), Some(Reason::WrongIssuer)),
            (json!({"aud": "other"}), Some(Reason::WrongAudience)),
            (json!({"aud": null}), Some(Reason::WrongAudience)),
            (json!({"scope": "openid"}), Some(Reason::InsufficientScope)),
            (json!({"exp": null}), Some(Reason::BadToken)),
            (json!({"exp": "soon"}), Some(Reason::BadToken)),
        ];
        for (change, refused) in cases {
            let answer = jwt.verify(&with(change.clone())).await;
            match refused {
                None => assert!(
                    matches!(answer, Validation::Valid(_)),
                    "{change}: {answer:?}"
                ),
                Some(reason) => assert_eq!(answer, Validation::Invalid(reason), "{change}"),
            }
        }
    }

    #[tokio::test]
    async fn only_access_tokens_for_this_service_pass() {
        let dir = key_files(&["rsa-a"]);
        let no_audience = config(&dir, "require = { issuer = \"https://idp\" }");
        assert!(
            no_audience
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
                .contains("require.audience"),
            "an audience is required"
        );
        let jwt = config(&dir, "").unwrap();
        let token = |extra: Value| sign(Signer::RsaA, Some("rsa-a"), &claims(extra));
        let cases = [
            (json!({}), None),
            (json!({"client_id": "chat-app", "azp": "chat-app"}), None),
            (json!({"aud": "someone-else"}), Some(Reason::WrongAudience)),
            (json!({"aud": null}), Some(Reason::WrongAudience)),
            // An ID token issued to client "xmpp" names it as its audience.
            (json!({"azp": "xmpp"}), Some(Reason::WrongTokenType)),
            (json!({"client_id": "xmpp"}), Some(Reason::WrongTokenType)),
            (
                json!({"nonce": "n-0S6_WzA2Mj"}),
                Some(Reason::WrongTokenType),
            ),
            (
                json!({"at_hash": "77QmUPtjPfzWtF2AnpK9RQ"}),
                Some(Reason::WrongTokenType),
            ),
        ];
        for (extra, refused) in cases {
            let answer = jwt.verify(&token(extra.clone())).await;
            match refused {
                None => assert!(
                    matches!(answer, Validation::Valid(_)),
                    "{extra}: {answer:?}"
                ),
                Some(reason) => assert_eq!(answer, Validation::Invalid(reason), "{extra}"),
            }
        }
        let typed = config(&dir, "typ = \"at+jwt\"").unwrap();
        let with_typ = |typ: Option<&str>| {
            let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
            header.kid = Some("rsa-a".into());
            header.typ = typ.map(str::to_owned);
            let key = jsonwebtoken::EncodingKey::from_rsa_pem(include_bytes!(
                "../../tests/fixtures/jwt/rsa-a.pem"
            ))
            .unwrap();
            jsonwebtoken::encode(&header, &claims(json!({})), &key).unwrap()
        };
        for (typ, ok) in [
            (Some("at+jwt"), true),
            (Some("application/AT+JWT"), true),
            (Some("JWT"), false),
            (None, false),
        ] {
            let answer = typed.verify(&with_typ(typ)).await;
            match ok {
                true => assert!(matches!(answer, Validation::Valid(_)), "{typ:?}"),
                false => assert_eq!(
                    answer,
                    Validation::Invalid(Reason::WrongTokenType),
                    "{typ:?}"
                ),
            }
        }
    }

    #[tokio::test]
    async fn forgeries_and_confusion_are_bad_tokens() {
        let dir = key_files(&["rsa-a", "ec"]);
        let plain = config(&dir, "").unwrap();
        let with_secret = config(&dir, &secret_line(&dir)).unwrap();
        let body = claims(json!({}));
        let rsa_public = serde_json::to_vec(&public_jwk("rsa-a")).unwrap();
        let good = sign(Signer::RsaA, Some("rsa-a"), &body);
        let (head, _) = good.split_once('.').unwrap();
        let (_, signature) = good.rsplit_once('.').unwrap();
        let other = sign(Signer::RsaA, Some("rsa-a"), &claims(json!({"sub": "bob"})));
        let other_payload = other.split('.').nth(1).unwrap();
        let forgeries = [
            forge(&json!({"alg": "none", "typ": "JWT"}), &body, None),
            forge(
                &json!({"alg": "HS256", "kid": "rsa-a"}),
                &body,
                Some(&rsa_public),
            ),
            forge(&json!({"alg": "HS256"}), &body, Some(&rsa_public)),
            forge(
                &json!({"alg": "HS256", "crit": ["exp"]}),
                &body,
                Some(HS256_SECRET.as_bytes()),
            ),
            sign(Signer::RsaA, Some("ec"), &body),
            sign(Signer::RsaB, Some("rsa-a"), &body),
            format!("{head}.{other_payload}.{signature}"),
            "not a token".into(),
            "a.b.c".into(),
            String::new(),
        ];
        for (i, forged) in forgeries.iter().enumerate() {
            for jwt in [&plain, &with_secret] {
                assert_eq!(
                    jwt.verify(forged).await,
                    Validation::Invalid(Reason::BadToken),
                    "forgery {i}"
                );
            }
        }
        let rs_only = config(&dir, "algorithms = [\"RS256\"]").unwrap();
        assert_eq!(
            rs_only.verify(&sign(Signer::Ec, Some("ec"), &body)).await,
            Validation::Invalid(Reason::BadToken),
            "only configured algorithms"
        );
        assert!(matches!(rs_only.verify(&good).await, Validation::Valid(_)));
    }

    #[test]
    fn settings_are_checked() {
        let dir = key_files(&["rsa-a"]);
        let c: JwtConfig = toml::from_str("jwks_url = \"https://idp/jwks\"").unwrap();
        assert_eq!((c.leeway, c.jwks_min_refresh, c.jwks_refresh), (30, 1, 300));
        assert!(config(&dir, "leeway = 60").is_ok());
        let refused = |extra: &str| {
            config(&dir, extra)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(refused("leeway = 61").contains("at most 60"));
        assert!(refused("jwks_url = \"https://idp/jwks\"").contains("not both"));
        assert!(refused("algorithms = [\"PS256\"]").contains("not supported"));
        assert!(refused("algorithms = [\"HS256\"]").contains("hs256_secret_file"));
        assert!(
            refused(&format!("{}algorithms = [\"RS256\"]", secret_line(&dir)))
                .contains("HS256 is not in algorithms")
        );
        assert!(refused("jwks_min_refresh = 0").contains("jwks_min_refresh"));
        assert!(refused("jwks_refresh = 10\njwks_min_refresh = 20").contains("jwks_refresh"));
        assert!(refused("algorithm = [\"RS256\"]").contains("unknown field"));
        std::fs::write(dir.path().join("hs256.key"), "short").unwrap();
        assert!(refused(&secret_line(&dir)).contains("32 bytes"));
        assert!(
            Jwt::new(
                toml::from_str("leeway = 5").unwrap(),
                &ProviderPolicy::default()
            )
            .is_err(),
            "no key source"
        );
        std::fs::write(dir.path().join("jwks.json"), jwks(&["ec"]).to_string()).unwrap();
        assert!(refused("algorithms = [\"RS256\"]").contains("no usable signing key"));
    }

    #[test]
    fn keys_that_do_not_fit_are_skipped() {
        let with = |kid: &str, change: Value| {
            let mut key = public_jwk(kid);
            key.as_object_mut()
                .unwrap()
                .extend(change.as_object().unwrap().clone());
            key
        };
        let set = json!({"keys": [
            with("rsa-a", json!({"use": "enc"})),
            with("rsa-a", json!({"alg": "PS256"})),
            with("rsa-a", json!({"alg": "RSA-OAEP"})),
            with("rsa-a", json!({"n": "AQAB"})), // 24 bits
            with("ec", json!({"alg": "RS256"})),
            with("ec", json!({"crv": "P-384"})),
            with("ed", json!({"x": "AAAA"})),    // 3 bytes: would panic inside jsonwebtoken
            {"kty": "oct", "k": "c2VjcmV0"},
            {"kty": "RSA"},
            "not a key",
            public_jwk("rsa-b"),
        ]});
        let keys = parse_jwks(set.to_string().as_bytes(), &SUPPORTED).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(
            (keys[0].kid.as_deref(), keys[0].alg),
            (Some("rsa-b"), Algorithm::RS256)
        );
        for garbage in [&b"{}"[..], b"[]", b"<html>", br#"{"keys": []}"#] {
            assert!(parse_jwks(garbage, &SUPPORTED).is_err());
        }
    }

    /// A JWKS endpoint that answers `body` (after a delay, so concurrent logins overlap the
    /// fetch) and counts its calls.
    async fn serve(server: &wiremock::MockServer, status: u16, body: Value) {
        use wiremock::matchers::{method, path};
        use wiremock::{Mock, ResponseTemplate};
        server.reset().await;
        Mock::given(method("GET"))
            .and(path("/jwks"))
            .respond_with(
                ResponseTemplate::new(status)
                    .set_body_json(body)
                    .set_delay(Duration::from_millis(200)),
            )
            .mount(server)
            .await;
    }

    /// Verifies `tokens` concurrently.
    async fn logins(jwt: &Jwt, tokens: &[String]) -> Vec<Validation> {
        futures_util::future::join_all(tokens.iter().map(|t| jwt.verify(t))).await
    }

    async fn fetches(server: &wiremock::MockServer) -> usize {
        server.received_requests().await.unwrap().len()
    }

    #[tokio::test]
    async fn a_new_kid_costs_one_fetch_and_old_keys_work_until_they_leave() {
        let server = wiremock::MockServer::start().await;
        serve(&server, 200, jwks(&["rsa-a"])).await;
        let jwt = Jwt::new(
            toml::from_str(&format!(
                "jwks_url = \"{}/jwks\"\njwks_min_refresh = 1\nrequire = {{ audience = \"xmpp\" }}",
                server.uri()
            ))
            .unwrap(),
            &ProviderPolicy::default(),
        )
        .unwrap();
        // Four distinct tokens per kid, signed up front so that only verification runs inside
        // the jwks_min_refresh windows below.
        let batch = |signer: Signer, kid: &str| -> Vec<String> {
            (0..4)
                .map(|i| sign(signer, Some(kid), &claims(json!({"sub": format!("u{i}")}))))
                .collect()
        };
        let (old, new) = (batch(Signer::RsaA, "rsa-a"), batch(Signer::RsaB, "rsa-b"));
        let unknown = sign(Signer::Ec, Some("ec"), &claims(json!({})));
        let all_valid =
            |answers: Vec<Validation>| answers.iter().all(|a| matches!(a, Validation::Valid(_)));
        assert!(all_valid(logins(&jwt, &old).await));
        assert_eq!(
            fetches(&server).await,
            1,
            "first use: one fetch for 4 logins"
        );

        // The key rotates less than jwks_min_refresh after the last fetch: the logins with the
        // new kid wait for the next allowed fetch instead of being refused.
        serve(&server, 200, jwks(&["rsa-a", "rsa-b"])).await;
        assert!(
            all_valid(logins(&jwt, &new).await),
            "a rotation refuses nobody"
        );
        assert!(
            all_valid(logins(&jwt, &old).await),
            "old key still in the set"
        );
        assert_eq!(
            fetches(&server).await,
            1,
            "rotation: one fetch for 8 logins"
        );

        serve(&server, 503, json!({})).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(matches!(
            jwt.verify(&unknown).await,
            Validation::Unavailable(_)
        ));
        assert!(
            all_valid(logins(&jwt, &old).await),
            "known keys survive a failed fetch"
        );
        assert_eq!(fetches(&server).await, 1);
        assert!(
            matches!(jwt.verify(&unknown).await, Validation::Unavailable(_)),
            "unavailable, not a refusal"
        );
        assert_eq!(
            fetches(&server).await,
            2,
            "the second login waited jwks_min_refresh, then fetched again"
        );

        serve(&server, 200, jwks(&["rsa-b"])).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            jwt.verify(&unknown).await,
            Validation::Invalid(Reason::BadToken),
            "not in a set fetched after the token arrived: unknown for sure"
        );
        assert_eq!(fetches(&server).await, 1);
        let gone = logins(&jwt, &old).await;
        assert!(
            gone.iter()
                .all(|a| *a == Validation::Invalid(Reason::BadToken)),
            "rsa-a left the set: {gone:?}"
        );
        assert_eq!(
            fetches(&server).await,
            2,
            "one confirming fetch for 4 logins"
        );
        assert!(all_valid(logins(&jwt, &new).await));
        assert_eq!(fetches(&server).await, 2);
    }

    #[tokio::test]
    async fn an_old_set_is_refreshed_in_the_background_while_it_keeps_answering() {
        let server = wiremock::MockServer::start().await;
        serve(&server, 200, jwks(&["rsa-a"])).await;
        let jwt = Jwt::new(
            toml::from_str(&format!(
                "jwks_url = \"{}/jwks\"\njwks_min_refresh = 1\njwks_refresh = 1\nrequire = {{ audience = \"xmpp\" }}",
                server.uri()
            ))
            .unwrap(),
            &ProviderPolicy::default(),
        )
        .unwrap();
        let token = sign(Signer::RsaA, Some("rsa-a"), &claims(json!({})));
        assert!(matches!(jwt.verify(&token).await, Validation::Valid(_)));
        serve(&server, 200, jwks(&["rsa-b"])).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(
            matches!(jwt.verify(&token).await, Validation::Valid(_)),
            "answered from the old set; the refresh runs behind it"
        );
        // Wait (bounded) for the background fetch's keys to land.
        let store = jwt.jwks.as_ref().unwrap();
        for _ in 0..500 {
            if matches!(
                find(&store.current(), Some("rsa-b"), Algorithm::RS256),
                Find::Key(_)
            ) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            jwt.verify(&token).await,
            Validation::Invalid(Reason::BadToken),
            "rsa-a left the set"
        );
        assert_eq!(
            fetches(&server).await,
            2,
            "one background fetch, and one after the token arrived that confirms its key is gone"
        );
    }
}

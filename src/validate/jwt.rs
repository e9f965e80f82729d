//! JWT access tokens verified locally (RFC 7519), with no provider call per login.
//!
//! The signature is checked (RFC 7515) with a key from the issuer's JWK Set (RFC 7517), fetched
//! from `jwks_url` or read from `jwks_file` and chosen by the header's `kid` (RFC 7515 section
//! 4.1.4), or with a configured HS256 secret. Then `exp` (required), `nbf`, `iss` and `aud` are
//! checked with a small leeway (RFC 7519 section 4.1), and any required scopes.
//!
//! Algorithm confusion (RFC 8725 section 2.1) is closed three ways: only the configured
//! `algorithms` are accepted (`alg: none` never is); every JWKS key verifies exactly one
//! algorithm, derived from its `kty` and `crv` (and equal to its `alg` when it names one); and
//! HS256 only ever uses the configured secret, never a JWKS key, so a token "signed" with an RSA
//! public key's bytes as an HMAC secret cannot verify.
//!
//! Rotation: a token whose `kid` is not in the set makes the set be fetched again, at most once
//! per `jwks_min_refresh` however many logins ask; the set is also fetched again in the
//! background once it is `jwks_refresh` old. A token keeps verifying until its key leaves the
//! set. While a fetch fails, the keys already known keep working.

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
use super::http::{self, HttpTimeouts};
use super::introspection::seconds_claim;
use super::{BoxFuture, Grant, TokenCheck, Validation, Validator};
use crate::config::{redact_url, ConfigUrl};
use crate::wire::Reason;

/// The algorithms this validator implements (RFC 7518 section 3.1, RFC 8037 section 3.1).
pub const SUPPORTED: [Algorithm; 4] = [
    Algorithm::RS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
    Algorithm::HS256,
];

/// The largest `leeway` accepted, seconds: more would keep expired tokens alive.
pub const MAX_LEEWAY: u64 = 60;

/// Settings of a JWT validator (TOML: `validator = { kind = "jwt", ... }`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// URL of the issuer's JWK Set (the `jwks_uri` of its discovery document).
    #[serde(default)]
    pub jwks_url: Option<ConfigUrl>,
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
    /// Least time between two fetches caused by unknown `kid`s, seconds [default: 30].
    #[serde(default = "default_min_refresh")]
    pub jwks_min_refresh: u64,
    /// Age after which the JWKS is fetched again in the background, seconds [default: 300].
    #[serde(default = "default_refresh")]
    pub jwks_refresh: u64,
    /// Clock skew allowed on `exp` and `nbf`, seconds, at most 60 [default: 30].
    #[serde(default = "default_leeway")]
    pub leeway: u64,
    /// Required scopes (`scope` claim), audience (`aud`) and issuer (`iss`). Without an
    /// audience, a token that names one is refused (RFC 7519 section 4.1.3).
    #[serde(default)]
    pub require: ClaimRules,
    /// Connect and total timeouts of JWKS fetches.
    #[serde(default)]
    pub timeouts: HttpTimeouts,
}

fn default_min_refresh() -> u64 {
    30
}

fn default_refresh() -> u64 {
    300
}

fn default_leeway() -> u64 {
    30
}

/// A local JWT verifier.
pub struct Jwt {
    /// One rule set per accepted algorithm, each accepting only that algorithm.
    rules: Vec<jsonwebtoken::Validation>,
    /// The `require.scopes` part of the claim rules (jsonwebtoken checks `iss` and `aud`).
    scopes: ClaimRules,
    hs256: Option<Arc<Key>>,
    jwks: Option<Arc<KeyStore>>,
}

impl Jwt {
    /// A verifier for `config`. A `jwks_file` is read now; a `jwks_url` on the first login.
    ///
    /// # Errors
    /// Conflicting or missing key sources, an unsupported algorithm, a leeway over
    /// [`MAX_LEEWAY`], an unreadable or short secret, an unreadable JWKS file or one without a
    /// usable key, a bad URL or timeout.
    pub fn new(config: JwtConfig) -> Result<Self, String> {
        if config.leeway > MAX_LEEWAY {
            return Err(format!(
                "jwt leeway must be at most {MAX_LEEWAY} seconds, got {}",
                config.leeway
            ));
        }
        let algorithms = accepted_algorithms(&config)?;
        let hs256 = match &config.hs256_secret_file {
            Some(path) => Some(Arc::new(hs256_key(path)?)),
            None => None,
        };
        let jwks = KeyStore::new(&config, &algorithms)?.map(Arc::new);
        Ok(Jwt {
            rules: algorithms.iter().map(|a| rules_for(*a, &config)).collect(),
            scopes: ClaimRules {
                scopes: config.require.scopes,
                ..ClaimRules::default()
            },
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

impl Validator for Jwt {
    fn validate<'a>(&'a self, check: TokenCheck<'a>) -> BoxFuture<'a, Validation> {
        Box::pin(self.verify(check.token.expose()))
    }

    fn kind(&self) -> &'static str {
        "jwt"
    }
}

/// The configured algorithms, or the default for the configured key sources.
fn accepted_algorithms(config: &JwtConfig) -> Result<Vec<Algorithm>, String> {
    if config.jwks_url.is_some() && config.jwks_file.is_some() {
        return Err("give jwks_url or jwks_file, not both".into());
    }
    let has_jwks = config.jwks_url.is_some() || config.jwks_file.is_some();
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
        return Err("jwt needs jwks_url, jwks_file or hs256_secret_file, and algorithms".into());
    }
    for alg in &algorithms {
        if !SUPPORTED.contains(alg) {
            return Err(format!(
                "jwt algorithm {alg:?} is not supported (RS256, ES256, EdDSA, HS256)"
            ));
        }
        if !usable(alg) {
            return Err(format!(
                "jwt algorithm {alg:?} needs {}",
                match alg {
                    Algorithm::HS256 => "hs256_secret_file",
                    _ => "jwks_url or jwks_file",
                }
            ));
        }
    }
    if has_secret && !algorithms.contains(&Algorithm::HS256) {
        return Err("hs256_secret_file is set but HS256 is not in algorithms".into());
    }
    if has_jwks && algorithms == [Algorithm::HS256] {
        return Err("a JWKS is set but algorithms has only HS256".into());
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
    if let Some(issuer) = &config.require.issuer {
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
fn hs256_key(path: &Path) -> Result<Key, String> {
    let secret =
        crate::config::read_secret(path, "hs256_secret_file").map_err(|e| format!("{e:#}"))?;
    if secret.expose().len() < 32 {
        return Err(format!(
            "hs256_secret_file: {} must hold at least 32 bytes (RFC 7518 section 3.2)",
            path.display()
        ));
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
    Url { http: reqwest::Client, url: String },
    File(PathBuf),
}

/// One fetch of the JWK Set: when, and its error if it failed.
struct Attempt {
    at: Instant,
    error: Option<String>,
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
    fn new(config: &JwtConfig, algorithms: &[Algorithm]) -> Result<Option<Self>, String> {
        if config.jwks_min_refresh == 0 || config.jwks_refresh < config.jwks_min_refresh {
            return Err(
                "jwks_min_refresh must be at least 1 and jwks_refresh at least jwks_min_refresh"
                    .into(),
            );
        }
        let (source, keys) = match (&config.jwks_url, &config.jwks_file) {
            (Some(url), _) => {
                http::check_url("jwks_url", url.expose())?;
                config.timeouts.check()?;
                let http = http::client(config.timeouts)
                    .map_err(|e| format!("building the HTTP client: {e}"))?;
                let url = url.expose().to_owned();
                (Source::Url { http, url }, Vec::new())
            }
            (None, Some(path)) => {
                let keys = parse_jwks(&read_file(path)?, algorithms)?;
                (Source::File(path.clone()), keys)
            }
            (None, None) => return Ok(None),
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

    /// Fetches the set for an unknown key, unless a fetch ended less than `min_refresh` ago
    /// (which bounds what a stream of made-up `kid`s costs the issuer).
    async fn refetch(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<Key>, Validation> {
        let mut last = self.last_fetch.lock().await;
        let error = match self.recent(&last) {
            Some(attempt) => attempt.error.clone(),
            None => {
                info!(source = %self.describe(), "unknown key: fetching the JWKS");
                let attempt = self.fetch().await;
                let error = attempt.error.clone();
                *last = Some(attempt);
                error
            }
        };
        drop(last);
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
        let body = match &self.source {
            Source::Url { http, url } => fetch_url(http, url).await,
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
                Attempt { at, error: None }
            }
            Err(why) => {
                let why = format!("JWKS from {}: {why}", self.describe());
                warn!("{why}; keeping the keys already known");
                self.push_refresh(self.min_refresh);
                Attempt {
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
            Source::Url { url, .. } => redact_url(url),
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

async fn fetch_url(http: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let response = http::send(http.get(url), "JWKS").await?;
    if !response.status().is_success() {
        return Err(format!("answered HTTP {}", response.status().as_u16()));
    }
    let body = response
        .bytes()
        .await
        .map_err(|_| "body cut off".to_owned())?;
    Ok(body.to_vec())
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
#[path = "../../tests/common/tokens.rs"]
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

    /// The settings in `toml_text`, after `jwks_file = <dir>/jwks.json`.
    fn config(dir: &TempDir, toml_text: &str) -> Result<Jwt, String> {
        let file = dir.path().join("jwks.json");
        let text = format!("jwks_file = {:?}\n{toml_text}", file.display().to_string());
        Jwt::new(toml::from_str(&text).map_err(|e| e.to_string())?)
    }

    fn secret_line(dir: &TempDir) -> String {
        let file = dir.path().join("hs256.key");
        format!("hs256_secret_file = {:?}\n", file.display().to_string())
    }

    fn claims(extra: Value) -> Value {
        let mut c = json!({"sub": "alice", "exp": now() + 600});
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
        let body = json!({"sub": "alice", "exp": exp});
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
        let open = config(&dir, "").unwrap();
        let token = |aud: Value| sign(Signer::RsaA, Some("rsa-a"), &claims(aud));
        assert!(matches!(
            open.verify(&token(json!({}))).await,
            Validation::Valid(_)
        ));
        assert_eq!(
            open.verify(&token(json!({"aud": "someone-else"}))).await,
            Validation::Invalid(Reason::WrongAudience),
            "a token for another audience is refused even when none is configured"
        );
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
        assert_eq!(
            (c.leeway, c.jwks_min_refresh, c.jwks_refresh),
            (30, 30, 300)
        );
        assert!(config(&dir, "leeway = 60").is_ok());
        let refused = |extra: &str| config(&dir, extra).err().unwrap_or_default();
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
            Jwt::new(toml::from_str("leeway = 5").unwrap()).is_err(),
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
                "jwks_url = \"{}/jwks\"\njwks_min_refresh = 1",
                server.uri()
            ))
            .unwrap(),
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

        serve(&server, 200, jwks(&["rsa-a", "rsa-b"])).await;
        let answers = logins(&jwt, &new).await;
        assert!(
            answers
                .iter()
                .all(|a| *a == Validation::Invalid(Reason::BadToken)),
            "a fetch ended less than jwks_min_refresh ago: {answers:?}"
        );
        assert_eq!(fetches(&server).await, 0);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(all_valid(logins(&jwt, &new).await));
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
            matches!(jwt.verify(&unknown).await, Validation::Unavailable(_)),
            "the failure is remembered, not retried at once"
        );
        assert!(
            all_valid(logins(&jwt, &old).await),
            "known keys survive a failed fetch"
        );
        assert_eq!(fetches(&server).await, 1);

        serve(&server, 200, jwks(&["rsa-b"])).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            jwt.verify(&unknown).await,
            Validation::Invalid(Reason::BadToken),
            "not in the new set either"
        );
        assert_eq!(fetches(&server).await, 1);
        let gone = logins(&jwt, &old).await;
        assert!(
            gone.iter()
                .all(|a| *a == Validation::Invalid(Reason::BadToken)),
            "rsa-a left the set: {gone:?}"
        );
        assert!(all_valid(logins(&jwt, &new).await));
        assert_eq!(fetches(&server).await, 1);
    }

    #[tokio::test]
    async fn an_old_set_is_refreshed_in_the_background_while_it_keeps_answering() {
        let server = wiremock::MockServer::start().await;
        serve(&server, 200, jwks(&["rsa-a"])).await;
        let jwt = Jwt::new(
            toml::from_str(&format!(
                "jwks_url = \"{}/jwks\"\njwks_min_refresh = 1\njwks_refresh = 1",
                server.uri()
            ))
            .unwrap(),
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
        assert_eq!(fetches(&server).await, 1, "one background fetch");
    }
}

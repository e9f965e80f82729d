//! The decision on one extauth request: check input -> L1 -> (singleflight) Redis -> validator
//! -> cache write. See `docs/architecture.md` for the rules and their sources.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::cache::{now_ms, Key, KeyDeriver, Redis, Verdict, L1};
use crate::config::CacheConfig;
use crate::extauth::{Command, Secret};
use crate::validate::{Validation, Validator};
use crate::wire::{Reason, Source};

/// Longest user or domain accepted (bytes); RFC 7622 caps each JID part at 1023 bytes.
const MAX_JID_PART: usize = 1023;

/// The answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// What ejabberd gets.
    pub ok: bool,
    /// Why.
    pub reason: Reason,
    /// Where the answer came from.
    pub source: Source,
}

impl Outcome {
    fn local(reason: Reason) -> Self {
        Outcome { ok: false, reason, source: Source::Local }
    }

    fn from_verdict(v: Verdict, source: Source) -> Self {
        Outcome { ok: v.ok, reason: v.reason, source }
    }
}

/// Everything the engine needs, built once at start-up.
pub struct EngineParts {
    /// Key derivation (cache secret).
    pub keys: KeyDeriver,
    /// The shared cache, if configured.
    pub redis: Option<Redis>,
    /// The token validator.
    pub validator: Arc<dyn Validator>,
    /// Lifetimes and sizes.
    pub cache: CacheConfig,
    /// Longest accepted token (bytes).
    pub max_token_len: usize,
}

/// Decides extauth requests. Cheap to share behind an `Arc`.
pub struct Engine {
    keys: KeyDeriver,
    l1: L1,
    redis: Option<Redis>,
    validator: Arc<dyn Validator>,
    cache: CacheConfig,
    max_token_len: usize,
    /// False while Redis is failing, so an outage is logged once, not once per request.
    redis_healthy: AtomicBool,
}

impl Engine {
    /// An engine with an empty L1.
    pub fn new(parts: EngineParts) -> Self {
        Engine {
            l1: L1::new(parts.cache.l1_capacity, parts.cache.seen_ttl),
            keys: parts.keys,
            redis: parts.redis,
            validator: parts.validator,
            cache: parts.cache,
            max_token_len: parts.max_token_len,
            redis_healthy: AtomicBool::new(true),
        }
    }

    /// Answers one extauth command. `auth` and `isuser` are decided; every command that would
    /// change an account is refused at once and logged, and nothing is changed.
    pub async fn handle(&self, command: &Command) -> Outcome {
        match command {
            Command::Auth { user, server, password } => self.auth(user, server, password).await,
            Command::IsUser { user, server } => self.isuser(user, server).await,
            other => {
                let (user, server) = other.jid_parts();
                info!(command = other.name(), user, server, "refused: accounts are managed by the OAuth provider");
                Outcome::local(Reason::Unsupported)
            }
        }
    }

    async fn auth(&self, user: &str, domain: &str, token: &Secret) -> Outcome {
        if !jid_parts_ok(user, domain) || token.expose().is_empty() || token.expose().len() > self.max_token_len {
            debug!(user, domain, token_len = token.expose().len(), "refused malformed auth request");
            return Outcome::local(Reason::Malformed);
        }
        let key = self.keys.verdict(domain, user, token.expose());
        if let Some(v) = self.l1.get(&key).await {
            return Outcome::from_verdict(v, Source::L1);
        }
        // Whoever runs the flight records where its verdict came from; waiters on another
        // request's flight report `Provider`.
        let mut source = Source::Provider;
        let flight = self.load(key, user, domain, token, &mut source);
        match self.l1.get_or_load(key, flight).await {
            Ok(v) => Outcome::from_verdict(v, source),
            Err(why) => {
                warn!(user, domain, "provider unavailable, refusing: {why}");
                Outcome { ok: false, reason: Reason::UpstreamUnavailable, source: Source::Provider }
            }
        }
    }

    /// The body of a flight: re-check Redis (another broker may just have decided), else ask
    /// the validator and share the verdict.
    async fn load(&self, key: Key, user: &str, domain: &str, token: &Secret, source: &mut Source) -> Result<Verdict, String> {
        if let Some(redis) = &self.redis {
            match redis.get(&key).await {
                Ok(Some(v)) => {
                    self.redis_ok();
                    *source = Source::Redis;
                    if v.ok {
                        self.l1.mark_seen(self.keys.seen(domain, user)).await;
                    }
                    return Ok(v);
                }
                Ok(None) => self.redis_ok(),
                Err(e) => self.redis_failed("read", &e),
            }
        }
        *source = Source::Provider;
        let verdict = self.decide(user, self.validator.validate(token).await)?;
        info!(user, domain, verdict = verdict.reason.as_str(), ttl_ms = verdict.remaining().as_millis() as u64, "provider verdict");
        if let Some(redis) = &self.redis {
            match redis.put(&key, verdict).await {
                Ok(()) => self.redis_ok(),
                Err(e) => self.redis_failed("write", &e),
            }
        }
        if verdict.ok {
            self.mark_seen(domain, user).await;
        }
        Ok(verdict)
    }

    /// Turns a provider answer into a cacheable verdict bound to `user`, or an error for an
    /// answer that must not be cached.
    fn decide(&self, user: &str, validation: Validation) -> Result<Verdict, String> {
        let now = now_ms();
        let negative = |reason| Verdict { ok: false, reason, expires_at_ms: now + ms(self.cache.negative_ttl) };
        match validation {
            Validation::Unavailable(why) => Err(why),
            Validation::Invalid(reason) => Ok(negative(reason)),
            Validation::Valid { subject, exp } => {
                let exp_ms = exp.map(|s| s.saturating_mul(1000));
                if exp_ms.is_some_and(|e| e <= now) {
                    return Ok(negative(Reason::Expired));
                }
                let owner = subject.as_deref().and_then(normalise_localpart);
                if owner.as_deref() != Some(user) {
                    return Ok(negative(Reason::WrongUser));
                }
                let cap = now + ms(self.cache.max_ttl);
                let expires_at_ms = exp_ms.map_or(cap, |e| e.min(cap));
                Ok(Verdict { ok: true, reason: Reason::Accepted, expires_at_ms })
            }
        }
    }

    async fn isuser(&self, user: &str, domain: &str) -> Outcome {
        if !jid_parts_ok(user, domain) {
            return Outcome::local(Reason::Malformed);
        }
        let key = self.keys.seen(domain, user);
        let known = |source| Outcome { ok: true, reason: Reason::UserKnown, source };
        let unknown = |source| Outcome { ok: false, reason: Reason::UserUnknown, source };
        if self.l1.seen(&key).await {
            return known(Source::L1);
        }
        let Some(redis) = &self.redis else { return unknown(Source::L1) };
        match redis.seen(&key).await {
            Ok(true) => {
                self.redis_ok();
                self.l1.mark_seen(key).await;
                known(Source::Redis)
            }
            Ok(false) => {
                self.redis_ok();
                unknown(Source::Redis)
            }
            Err(e) => {
                self.redis_failed("isuser read", &e);
                unknown(Source::L1)
            }
        }
    }

    async fn mark_seen(&self, domain: &str, user: &str) {
        let key = self.keys.seen(domain, user);
        self.l1.mark_seen(key).await;
        if let Some(redis) = &self.redis {
            if let Err(e) = redis.mark_seen(&key, self.cache.seen_ttl).await {
                self.redis_failed("seen write", &e);
            }
        }
    }

    fn redis_ok(&self) {
        if !self.redis_healthy.swap(true, Ordering::Relaxed) {
            info!("Redis is reachable again; sharing verdicts");
        }
    }

    fn redis_failed(&self, what: &str, e: &redis::RedisError) {
        if self.redis_healthy.swap(false, Ordering::Relaxed) {
            warn!(kind = ?e.kind(), "Redis {what} failed, serving from the in-process cache and the provider until it is back: {e}");
        } else {
            debug!(kind = ?e.kind(), "Redis {what} failed again");
        }
    }
}

/// ejabberd normalises the localpart with nodeprep (RFC 3920 appendix A, stringprep) before it
/// calls extauth; the token's claim may not be, so apply the same profile to it. `None` when the
/// claim cannot be a localpart at all (prohibited characters).
pub fn normalise_localpart(claim: &str) -> Option<Cow<'_, str>> {
    stringprep::nodeprep(claim).ok()
}

fn jid_parts_ok(user: &str, domain: &str) -> bool {
    let ok = |s: &str| !s.is_empty() && s.len() <= MAX_JID_PART && !s.chars().any(char::is_control);
    ok(user) && ok(domain)
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_normalised_like_ejabberd_nodeprep() {
        assert_eq!(normalise_localpart("Alice").as_deref(), Some("alice"));
        assert_eq!(normalise_localpart("alice").as_deref(), Some("alice"));
        assert_eq!(normalise_localpart("ÉLODIE").as_deref(), Some("élodie"));
        assert_eq!(normalise_localpart("STRASSE").as_deref(), Some("strasse"));
        assert_eq!(normalise_localpart("a@b"), None);
        assert_eq!(normalise_localpart("a b"), None);
    }

    #[test]
    fn jid_parts_are_checked() {
        assert!(jid_parts_ok("alice", "example.com"));
        assert!(!jid_parts_ok("", "example.com"));
        assert!(!jid_parts_ok("alice", ""));
        assert!(!jid_parts_ok("al\nice", "example.com"));
        assert!(!jid_parts_ok(&"a".repeat(1024), "example.com"));
    }
}

//! The decision on one extauth request: check input -> domain -> L1 -> (singleflight) Redis ->
//! cluster lock -> validator -> cache write. See `docs/architecture.md` for the rules and their
//! sources.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tracing::{debug, info, warn};

use crate::cache::{Key, KeyDeriver, Verdict, L1};
use crate::config::IsUserPolicy;
use crate::domain::{Domain, Domains};
use crate::extauth::{Command, Secret};
use crate::metrics;
use crate::revoke::{self, Generations, RevokeError, Target};
use crate::store::Redis;
use crate::validate::{TokenCheck, Validation};
use crate::wire::{Reason, Source};

/// Longest user or domain accepted (bytes); RFC 7622 caps each JID part at 1023 bytes.
const MAX_JID_PART: usize = 1023;
/// How long a broker holds the cluster-wide flight lock of a token at most; other brokers wait
/// for its verdict at most this long (and at most half their request's time left) before
/// validating themselves.
const LOCK_TTL: Duration = Duration::from_secs(6);
/// Least time left before a request's deadline for a provider call to be started.
const MIN_PROVIDER_BUDGET: Duration = Duration::from_millis(50);
/// How often a broker waiting on another broker's flight looks for its verdict.
const LOCK_POLL: Duration = Duration::from_millis(10);

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
        Outcome {
            ok: false,
            reason,
            source: Source::Local,
        }
    }

    fn from_verdict(v: Verdict, source: Source) -> Self {
        Outcome {
            ok: v.ok,
            reason: v.reason,
            source,
        }
    }
}

/// Everything the engine needs, built once at start-up.
pub struct EngineParts {
    /// Key derivation (cache secret).
    pub keys: KeyDeriver,
    /// The shared cache, if configured.
    pub redis: Option<Redis>,
    /// Served domains and their validators.
    pub domains: Domains,
    /// Most entries in the in-process cache.
    pub l1_capacity: u64,
    /// Longest accepted token (bytes).
    pub max_token_len: usize,
}

/// One auth request on its way through the engine.
struct AuthRequest<'a> {
    user: &'a str,
    domain_name: &'a str,
    token: &'a Secret,
    domain: &'a Domain,
    user_key: Key,
    key: Key,
    /// When the requester stops waiting.
    deadline: Instant,
}

/// Why a flight produced no verdict; shared with its waiters, never cached.
#[derive(Debug)]
enum FlightError {
    /// The provider could not answer (a log-safe message).
    Unavailable(String),
    /// The deadline of the request running the flight left no time for the provider call.
    Deadline,
}

/// What the cluster-wide flight lock said.
enum Coordination {
    /// This broker validates (and must unlock).
    Hold,
    /// Another broker's verdict arrived in Redis.
    Shared(Verdict),
    /// No Redis, a Redis error, or the wait bound passed: validate without the lock.
    Alone,
}

/// Decides extauth requests. Cheap to share behind an `Arc`.
pub struct Engine {
    keys: KeyDeriver,
    l1: L1,
    redis: Option<Redis>,
    generations: Arc<Generations>,
    /// Replaced whole on reload (SIGHUP); requests in flight keep the domain they started with.
    domains: ArcSwap<Domains>,
    max_token_len: usize,
    /// Names this broker as the holder of a flight lock.
    owner: String,
    /// Logs each Redis outage once, not once per request.
    redis_health: RedisHealth,
}

impl Engine {
    /// An engine with an empty L1.
    pub fn new(parts: EngineParts) -> Self {
        Engine {
            l1: L1::new(parts.l1_capacity),
            generations: Arc::new(Generations::new(parts.redis.clone())),
            keys: parts.keys,
            redis: parts.redis,
            domains: ArcSwap::from_pointee(parts.domains),
            max_token_len: parts.max_token_len,
            owner: format!(
                "{}:{}",
                std::process::id(),
                hex::encode(rand::random::<[u8; 6]>())
            ),
            redis_health: RedisHealth::default(),
        }
    }

    /// The settings serving `name` now.
    fn domain(&self, name: &str) -> Option<Arc<Domain>> {
        self.domains.load().get(name).cloned()
    }

    /// Replaces every domain's settings and validator (a configuration reload). Cached verdicts
    /// stay: they were decided under rules that were valid when they were made, and expire by
    /// their TTL.
    pub fn reload(&self, domains: Domains) {
        self.domains.store(Arc::new(domains));
    }

    /// Proves the serving path is alive (the runtime schedules and the cache answers), for the
    /// systemd watchdog.
    pub async fn ping(&self) {
        let _ = self.l1.get(&[0u8; 32]).await;
    }

    /// Starts the background task that applies other brokers' revocations (Redis only).
    pub fn spawn_revocation_listener(&self) {
        if let Some(redis) = &self.redis {
            tokio::spawn(crate::revoke::listen(
                redis.clone(),
                self.generations.clone(),
                self.l1.clone(),
            ));
        }
    }

    /// Answers one extauth command. `auth` and `isuser` are decided; every command that would
    /// change an account is refused at once and logged, and nothing is changed.
    ///
    /// `deadline` is when the requester stops waiting: no provider call is started with less
    /// than 50 ms left, and a call in progress is cut at the deadline.
    pub async fn handle(&self, command: &Command, deadline: Instant) -> Outcome {
        match command {
            Command::Auth {
                user,
                server,
                password,
            } => self.auth(user, server, password, deadline).await,
            Command::IsUser { user, server } => self.isuser(user, server).await,
            other => {
                let (user, server) = other.jid_parts();
                info!(
                    command = other.name(),
                    user, server, "refused: accounts are managed by the OAuth provider"
                );
                Outcome::local(Reason::Unsupported)
            }
        }
    }

    async fn auth(
        &self,
        user: &str,
        domain_name: &str,
        token: &Secret,
        deadline: Instant,
    ) -> Outcome {
        if !jid_parts_ok(user, domain_name)
            || token.expose().is_empty()
            || token.expose().len() > self.max_token_len
        {
            debug!(
                user,
                domain = domain_name,
                token_len = token.expose().len(),
                "refused malformed auth request"
            );
            return Outcome::local(Reason::Malformed);
        }
        let Some(domain) = self.domain(domain_name) else {
            debug!(user, domain = domain_name, "refused: domain not served");
            return Outcome::local(Reason::UnknownDomain);
        };
        let user_key = self.keys.user(domain_name, user);
        let generation = self.generations.get(&user_key).await;
        let key = self
            .keys
            .verdict(domain_name, user, generation, token.expose());
        if let Some(v) = self.l1.get(&key).await {
            metrics::cache_hit("l1");
            return Outcome::from_verdict(v, Source::L1);
        }
        let request = AuthRequest {
            user,
            domain_name,
            token,
            domain: &domain,
            user_key,
            key,
            deadline,
        };
        // Whoever runs the flight records where its verdict came from; a request that finds
        // `None` afterwards waited on another request's flight.
        let mut source = None;
        let mut result = self
            .l1
            .get_or_load(key, self.load(&request, &mut source))
            .await;
        // A flight is cut at the deadline of the request that started it; a waiter with time
        // left starts a new one rather than share that refusal.
        let cut = matches!(
            result.as_ref().map_err(|e| &**e),
            Err(FlightError::Deadline)
        );
        if cut
            && source.is_none()
            && deadline.saturating_duration_since(Instant::now()) >= MIN_PROVIDER_BUDGET
        {
            result = self
                .l1
                .get_or_load(key, self.load(&request, &mut source))
                .await;
        }
        let source = source.unwrap_or_else(|| {
            metrics::coalesced_waiter();
            Source::Provider
        });
        match result.as_ref().map_err(|e| &**e) {
            Ok(v) => Outcome::from_verdict(*v, source),
            Err(FlightError::Deadline) => {
                debug!(
                    user,
                    domain = domain_name,
                    "refused: no time left for a provider call"
                );
                Outcome::local(Reason::DeadlineExceeded)
            }
            Err(FlightError::Unavailable(why)) => {
                warn!(
                    user,
                    domain = domain_name,
                    "provider unavailable, refusing: {why}"
                );
                Outcome {
                    ok: false,
                    reason: Reason::UpstreamUnavailable,
                    source: Source::Provider,
                }
            }
        }
    }

    /// The body of a flight: re-check Redis (another broker may just have decided), coordinate
    /// with other brokers, else ask the validator and share the verdict.
    async fn load(
        &self,
        request: &AuthRequest<'_>,
        source: &mut Option<Source>,
    ) -> Result<Verdict, FlightError> {
        let mut stale = self.l1.get_stale(&request.key).await;
        if let Some(v) = self.redis_verdict(&request.key).await {
            if v.is_fresh() {
                return Ok(self.shared_verdict(request, v, source).await);
            }
            stale = stale.or(Some(v));
        }
        let coordination = self.coordinate(&request.key, request.deadline).await;
        if let Coordination::Shared(v) = coordination {
            return Ok(self.shared_verdict(request, v, source).await);
        }
        *source = Some(Source::Provider);
        let decided = match self.ask_provider(request).await {
            Ok(validation) => request
                .domain
                .decide(request.user, request.domain_name, validation)
                .map_err(FlightError::Unavailable),
            Err(cut) => Err(cut),
        };
        if let Ok(verdict) = &decided {
            info!(
                user = request.user,
                domain = request.domain_name,
                verdict = verdict.reason.as_str(),
                ttl_ms = verdict.remaining().as_millis() as u64,
                "provider verdict"
            );
            self.remember(request, *verdict, true).await;
        }
        if let (Coordination::Hold, Some(redis)) = (&coordination, &self.redis) {
            self.redis_result("unlock", redis.unlock(&request.key).await);
        }
        decided.or_else(|e| match (e, stale) {
            (FlightError::Unavailable(why), Some(v)) => {
                warn!(
                    user = request.user,
                    domain = request.domain_name,
                    "provider unavailable ({why}); serving a stale verdict (stale_if_error)"
                );
                Ok(v)
            }
            (e, _) => Err(e),
        })
    }

    /// Takes a verdict another broker put in Redis.
    async fn shared_verdict(
        &self,
        request: &AuthRequest<'_>,
        verdict: Verdict,
        source: &mut Option<Source>,
    ) -> Verdict {
        metrics::cache_hit("redis");
        *source = Some(Source::Redis);
        self.remember(request, verdict, false).await;
        verdict
    }

    /// Calls the domain's validator, timed and counted.
    async fn ask_provider(&self, request: &AuthRequest<'_>) -> Result<Validation, FlightError> {
        let check = TokenCheck {
            user: request.user,
            domain: request.domain_name,
            token: request.token,
        };
        let started = Instant::now();
        let left = request.deadline.saturating_duration_since(started);
        if left < MIN_PROVIDER_BUDGET {
            return Err(FlightError::Deadline);
        }
        let validation = tokio::time::timeout(left, request.domain.validator.validate(check))
            .await
            .map_err(|_| FlightError::Deadline)?;
        metrics::provider_call(
            request.domain.validator.kind(),
            &validation,
            started.elapsed(),
        );
        Ok(validation)
    }

    /// A verdict from Redis, fresh or stale-but-usable; `None` on a miss or a Redis error.
    async fn redis_verdict(&self, key: &Key) -> Option<Verdict> {
        let redis = self.redis.as_ref()?;
        self.redis_result("read", redis.get(key).await).flatten()
    }

    /// Takes the cluster-wide flight lock of `key`, or waits for the broker holding it to publish
    /// its verdict. Never a wrong verdict: at worst an extra provider call.
    ///
    /// The wait lasts at most [`LOCK_TTL`] and at most half the time left before `deadline`: a
    /// broker killed mid-flight leaves its lock behind until the TTL ends, and the requester must
    /// still have time for its own provider call after giving up on it.
    async fn coordinate(&self, key: &Key, deadline: Instant) -> Coordination {
        let Some(redis) = &self.redis else {
            return Coordination::Alone;
        };
        let now = Instant::now();
        let give_up = now + LOCK_TTL.min(deadline.saturating_duration_since(now) / 2);
        loop {
            match self.redis_result("lock", redis.lock(key, &self.owner, LOCK_TTL).await) {
                Some(true) => return Coordination::Hold,
                Some(false) => {}
                None => return Coordination::Alone,
            }
            // Another broker validates this token now: wait for its verdict or its unlock.
            while Instant::now() < give_up {
                tokio::time::sleep(LOCK_POLL).await;
                match self.redis_result("read", redis.get(key).await) {
                    Some(Some(v)) if v.is_fresh() => return Coordination::Shared(v),
                    Some(_) => {}
                    None => return Coordination::Alone,
                }
                match self.redis_result("lock check", redis.locked(key).await) {
                    Some(true) => {}
                    // Released without a verdict (its provider call failed): try ourselves.
                    Some(false) => break,
                    None => return Coordination::Alone,
                }
            }
            if Instant::now() >= give_up {
                return Coordination::Alone;
            }
        }
    }

    /// Stores a verdict where it belongs: Redis (when `share`), the stale store, the seen set.
    async fn remember(&self, request: &AuthRequest<'_>, verdict: Verdict, share: bool) {
        if share {
            if let Some(redis) = &self.redis {
                self.redis_result("write", redis.put(&request.key, verdict).await);
            }
        }
        self.l1.keep_stale(request.key, verdict).await;
        if verdict.ok {
            self.mark_seen(request.domain, request.user_key, share)
                .await;
        }
    }

    async fn isuser(&self, user: &str, domain_name: &str) -> Outcome {
        if !jid_parts_ok(user, domain_name) {
            return Outcome::local(Reason::Malformed);
        }
        let Some(domain) = self.domain(domain_name) else {
            return Outcome::local(Reason::UnknownDomain);
        };
        let known = |known: bool, source| Outcome {
            ok: known,
            reason: if known {
                Reason::UserKnown
            } else {
                Reason::UserUnknown
            },
            source,
        };
        let user_key = self.keys.user(domain_name, user);
        match domain.config.isuser {
            IsUserPolicy::Always => return known(true, Source::Local),
            IsUserPolicy::Never => return known(false, Source::Local),
            IsUserPolicy::Directory | IsUserPolicy::Seen => {}
        }
        if let Some(directory) = &domain.directory {
            if let Some(exists) = directory.exists(user, domain_name, user_key).await {
                return known(exists, Source::Provider);
            }
        }
        if self.l1.seen(&user_key).await {
            return known(true, Source::L1);
        }
        let Some(redis) = &self.redis else {
            return known(false, Source::L1);
        };
        match self.redis_result("isuser read", redis.seen(&user_key).await) {
            Some(true) => {
                self.l1.mark_seen(user_key, domain.config.seen_ttl).await;
                known(true, Source::Redis)
            }
            Some(false) => known(false, Source::Redis),
            None => known(false, Source::L1),
        }
    }

    async fn mark_seen(&self, domain: &Domain, user_key: Key, share: bool) {
        self.l1.mark_seen(user_key, domain.config.seen_ttl).await;
        if let (true, Some(redis)) = (share, &self.redis) {
            self.redis_result(
                "seen write",
                redis.mark_seen(&user_key, domain.config.seen_ttl).await,
            );
        }
    }

    /// Revokes `target` here and, through Redis, on every broker. Returns the user's
    /// generation afterwards.
    ///
    /// # Errors
    /// A Redis error (nothing was revoked cluster-wide then), or a user/domain that cannot be
    /// a JID part.
    pub async fn revoke(&self, target: &Target<'_>) -> Result<u64, RevokeError> {
        revoke::revoke(
            target,
            &self.keys,
            &self.generations,
            self.redis.as_ref(),
            Some(&self.l1),
        )
        .await
    }

    /// Logs a Redis failure once per outage (and the recovery once); `None` on error.
    fn redis_result<T>(&self, what: &'static str, result: redis::RedisResult<T>) -> Option<T> {
        match result {
            Ok(v) => {
                self.redis_health.recovered(what);
                Some(v)
            }
            Err(e) => {
                metrics::redis_error(what);
                self.redis_health.failed(what, &e);
                None
            }
        }
    }
}

/// What is known to fail in Redis, so each outage is logged (and shown in
/// `extauth_redis_up`) once. A lost connection affects everything; a server that refuses writes
/// (full, read-only) still answers reads, so reads and writes are tracked apart.
struct RedisHealth {
    connection: AtomicBool,
    reads: AtomicBool,
    writes: AtomicBool,
}

impl Default for RedisHealth {
    fn default() -> Self {
        RedisHealth {
            connection: AtomicBool::new(true),
            reads: AtomicBool::new(true),
            writes: AtomicBool::new(true),
        }
    }
}

impl RedisHealth {
    /// The flag an operation's server-side failures belong to; `None` for one whose success
    /// proves nothing about its class (a `DEL` works on a full Redis).
    fn class(&self, what: &str) -> Option<(&'static str, &AtomicBool)> {
        match what {
            "unlock" => None,
            "write" | "seen write" | "lock" => Some(("write", &self.writes)),
            _ => Some(("read", &self.reads)),
        }
    }

    fn failed(&self, what: &'static str, e: &redis::RedisError) {
        let connection_lost = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal();
        let (class, flag) = match (connection_lost, self.class(what)) {
            (false, Some(class)) => class,
            _ => ("connection", &self.connection),
        };
        if flag.swap(false, Ordering::Relaxed) {
            metrics::redis_up(class, false);
            warn!(kind = ?e.kind(), "Redis {what} failed, serving from the in-process cache and the provider until it is back: {e}");
        } else {
            debug!(kind = ?e.kind(), "Redis {what} failed again");
        }
    }

    fn recovered(&self, what: &str) {
        if !self.connection.swap(true, Ordering::Relaxed) {
            metrics::redis_up("connection", true);
            info!("Redis is reachable again; sharing verdicts");
        }
        if let Some((class, flag)) = self.class(what) {
            if !flag.swap(true, Ordering::Relaxed) {
                metrics::redis_up(class, true);
                info!("Redis {class}s work again");
            }
        }
    }
}

fn jid_parts_ok(user: &str, domain: &str) -> bool {
    let ok = |s: &str| !s.is_empty() && s.len() <= MAX_JID_PART && !s.chars().any(char::is_control);
    ok(user) && ok(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jid_parts_are_checked() {
        assert!(jid_parts_ok("alice", "example.com"));
        assert!(!jid_parts_ok("", "example.com"));
        assert!(!jid_parts_ok("alice", ""));
        assert!(!jid_parts_ok("al\nice", "example.com"));
        assert!(!jid_parts_ok(&"a".repeat(1024), "example.com"));
    }
}

//! The decision on one extauth request, top-down: check the input, look up the domain, derive
//! the keys, then L1 ([`crate::cache`]: verdicts not revoked, by token key) or else the
//! token's flight ([`crate::flight`]: Redis, the cluster lock, the validator, the decision on
//! its answer), and finally the decision for this user. See `docs/architecture.md` for the
//! rules and their sources.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tracing::{debug, info, warn};

use crate::cache::L1;
use crate::config::IsUserPolicy;
use crate::domain::{Domain, Domains};
use crate::flight::{Ask, FlightError, FlightParts, Flights};
use crate::keys::{Key, KeyDeriver};
use crate::metrics;
use crate::revoke::{self, RevokeError, Revoked, Target};
use crate::store::{Op, Redis};
use crate::validate::TokenCheck;
use crate::verdict::now_ms;
use extauth_protocol::extauth::{Command, Secret};
use extauth_protocol::wire::{Reason, Source};

/// Longest user or domain accepted (bytes); RFC 7622 caps each JID part at 1023 bytes.
const MAX_JID_PART: usize = 1023;

/// What an auth request the cache could not answer needs for its flight.
struct Pending {
    domain: Arc<Domain>,
    token_key: Key,
    user_key: Key,
}

/// What [`Engine::answer_now`] learnt of a request it could not answer at once (for an auth
/// request: its domain and keys), for [`Engine::answer_later`], so a miss derives its keys once.
pub(crate) struct Later(Option<Pending>);

/// The answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// What ejabberd gets.
    pub ok: bool,
    /// Why.
    pub(crate) reason: Reason,
    /// Where the answer came from.
    pub(crate) source: Source,
}

impl Outcome {
    fn local(reason: Reason) -> Self {
        Outcome {
            ok: false,
            reason,
            source: Source::Local,
        }
    }
}

/// Where a request came in: the `front` label of the request metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Front {
    /// A shim (ejabberd's or Prosody's external auth program) over the wire protocol.
    Shim,
    /// The HTTP check front (`--http-listen`).
    Http,
}

impl Front {
    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Front::Shim => "shim",
            Front::Http => "http",
        }
    }
}

/// Everything the engine needs, built once at start-up.
pub(crate) struct EngineParts {
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

/// Decides extauth requests. Cheap to share behind an `Arc`.
pub struct Engine {
    keys: KeyDeriver,
    l1: L1,
    redis: Option<Redis>,
    flights: Flights,
    /// Replaced whole on reload (SIGHUP); requests in flight keep the domain they started with.
    domains: ArcSwap<Domains>,
    max_token_len: usize,
}

impl Engine {
    /// An engine with an empty L1.
    pub(crate) fn new(parts: EngineParts) -> Self {
        let l1 = L1::new(parts.l1_capacity);
        let flights = Flights::new(FlightParts {
            keys: parts.keys.clone(),
            redis: parts.redis.clone(),
            l1: l1.clone(),
        });
        Engine {
            keys: parts.keys,
            l1,
            redis: parts.redis,
            flights,
            domains: ArcSwap::from_pointee(parts.domains),
            max_token_len: parts.max_token_len,
        }
    }

    /// The settings serving `name` now.
    fn domain(&self, name: &str) -> Option<Arc<Domain>> {
        self.domains.load().get(name).cloned()
    }

    /// Replaces every domain's settings and validator (a configuration reload). Cached verdicts
    /// stay: they were decided under rules that were valid when they were made, expire by their
    /// TTL, and are clamped to the new lifetimes when read back from Redis.
    pub(crate) fn reload(&self, domains: Domains) {
        self.domains.store(Arc::new(domains));
    }

    /// Proves the serving path is alive (the runtime schedules and the cache answers), for the
    /// systemd watchdog.
    pub(crate) async fn ping(&self) {
        tokio::task::yield_now().await;
        let _ = self.l1.get(&[0u8; 32]);
    }

    /// Starts the background task that applies other brokers' revocation hints (Redis only).
    pub(crate) fn spawn_revocation_listener(&self) {
        if let Some(redis) = &self.redis {
            tokio::spawn(revoke::listen(redis.clone(), self.l1.clone()));
        }
    }

    /// Answers `command` within `deadline` (a request over it is refused as
    /// `deadline_exceeded`) and counts it under `front`: the one entry point of every front, so
    /// all share the cache, the flights, the revocations and the metrics.
    pub(crate) async fn answer(
        &self,
        command: &Command,
        deadline: Duration,
        front: Front,
    ) -> Outcome {
        self.answer_later(command, Later(None), deadline, front)
            .await
    }

    /// [`Engine::answer`] for a request [`Engine::answer_now`] could not answer, with what it
    /// learnt.
    pub(crate) async fn answer_later(
        &self,
        command: &Command,
        later: Later,
        deadline: Duration,
        front: Front,
    ) -> Outcome {
        let started = Instant::now();
        let decided = self.decide(command, later.0, started + deadline);
        let outcome = tokio::time::timeout(deadline, decided)
            .await
            .unwrap_or(Outcome::local(Reason::DeadlineExceeded));
        metrics::request(
            command.name(),
            front.as_str(),
            (outcome.ok, outcome.reason, outcome.source),
            started.elapsed(),
        );
        outcome
    }

    /// Answers one extauth command. `auth` and `isuser` are decided; every command that would
    /// change an account is refused at once and logged, and nothing is changed.
    ///
    /// `deadline` is when the requester stops waiting: no provider call is started with less
    /// than 50 ms left, and a call in progress is cut at the deadline.
    pub async fn handle(&self, command: &Command, deadline: Instant) -> Outcome {
        self.decide(command, None, deadline).await
    }

    /// [`Engine::handle`], starting an auth request from `pending` when the cache was already
    /// asked.
    async fn decide(
        &self,
        command: &Command,
        pending: Option<Pending>,
        deadline: Instant,
    ) -> Outcome {
        match command {
            Command::Auth {
                user,
                server,
                password,
            } => self.auth(user, server, password, pending, deadline).await,
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

    /// The answer to `command` when it needs no waiting: a refusal decided from the request
    /// alone, or a verdict in this process's cache (L1). [`Later`] when answering needs Redis,
    /// the provider or the directory: [`Engine::answer_later`] decides it then. Synchronous, so
    /// a cached hit is answered where the request is read, without a task. Counted under
    /// `front` like [`Engine::answer`].
    pub(crate) fn answer_now(&self, command: &Command, front: Front) -> Result<Outcome, Later> {
        let started = Instant::now();
        let outcome = match command {
            Command::Auth {
                user,
                server,
                password,
            } => self
                .auth_now(user, server, password)
                .map_err(|pending| Later(Some(pending)))?,
            _ => return Err(Later(None)),
        };
        metrics::request(
            command.name(),
            front.as_str(),
            (outcome.ok, outcome.reason, outcome.source),
            started.elapsed(),
        );
        Ok(outcome)
    }

    /// Decides an auth request from the request alone or from L1; otherwise hands back what a
    /// flight needs.
    fn auth_now(&self, user: &str, domain_name: &str, token: &Secret) -> Result<Outcome, Pending> {
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
            return Ok(Outcome::local(Reason::Malformed));
        }
        let Some(domain) = self.domain(domain_name) else {
            debug!(user, domain = domain_name, "refused: domain not served");
            return Ok(Outcome::local(Reason::UnknownDomain));
        };
        let per_user = domain.validator.asks_about_user().then_some(user);
        let token_key = self.keys.token(domain_name, token.expose(), per_user);
        if let Some(v) = self.l1.get(&token_key) {
            metrics::cache_hit(Source::L1);
            // One keyed digest per hit: the user is matched by its name tag, and by its user
            // key only the first time the verdict is decided for the user it names.
            let name = self.l1.name_tag(domain_name, user);
            let decision = v.decide_by_name(name).unwrap_or_else(|| {
                let user_key = self.keys.user(domain_name, user);
                let decision = v.decide(&user_key);
                if decision.0 {
                    self.l1.bind(&token_key, &user_key, name);
                }
                decision
            });
            return Ok(decided(decision, Source::L1));
        }
        let user_key = self.keys.user(domain_name, user);
        Err(Pending {
            domain,
            token_key,
            user_key,
        })
    }

    async fn auth(
        &self,
        user: &str,
        domain_name: &str,
        token: &Secret,
        pending: Option<Pending>,
        deadline: Instant,
    ) -> Outcome {
        // From answer_now when it was asked first: the flight looks in L1 again itself.
        let pending = match pending.map_or_else(|| self.auth_now(user, domain_name, token), Err) {
            Ok(outcome) => return outcome,
            Err(pending) => pending,
        };
        let Pending {
            domain,
            token_key,
            user_key,
        } = pending;
        let ask = Ask {
            token_key,
            user_key,
            check: TokenCheck {
                user,
                domain: domain_name,
                token,
            },
            validator: &*domain.validator,
            decider: &domain.decider,
            seen_ttl: domain.config.seen_ttl,
            deadline,
        };
        match self.flights.fetch(&ask).await {
            Ok(fetched) => decided(fetched.verdict.decide(&user_key), fetched.source),
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
        if self.l1.seen(&user_key) {
            return known(true, Source::L1);
        }
        let Some(redis) = &self.redis else {
            return known(false, Source::L1);
        };
        let health = self.flights.health();
        match health.check(Op::SeenRead, redis.seen(&user_key).await) {
            Some(true) => {
                self.l1.mark_seen(&user_key, seen_until(&domain));
                known(true, Source::Redis)
            }
            Some(false) => known(false, Source::Redis),
            None => known(false, Source::L1),
        }
    }

    /// Revokes `target` here and, through Redis, on every broker.
    ///
    /// # Errors
    /// A Redis error (the revocation may be incomplete cluster-wide), or a user/domain that
    /// cannot be a JID part.
    pub(crate) async fn revoke(&self, target: &Target<'_>) -> Result<Revoked, RevokeError> {
        revoke::revoke(target, &self.keys, self.redis.as_ref(), Some(&self.l1)).await
    }
}

fn decided((ok, reason): (bool, Reason), source: Source) -> Outcome {
    Outcome { ok, reason, source }
}

fn seen_until(domain: &Domain) -> u64 {
    now_ms() + domain.config.seen_ttl.as_millis() as u64
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

//! Flights: how a verdict on a token that is not in the in-process cache is obtained, once for
//! every request that waits on it here (singleflight) and, through a short Redis lock, once for
//! every broker (Go's singleflight and groupcache; docs/architecture.md).
//!
//! A flight re-checks Redis (another broker may just have decided), takes the token's cluster
//! lock or waits for its holder's verdict, else asks the domain's validator, has the answer
//! decided ([`Decider::verdict`]: which user it names, for how long) and stores the verdict in
//! Redis and L1, and the user it names as seen. Every verdict read back from Redis is
//! authenticated, clamped to this broker's lifetimes and checked against the revocation marks,
//! here (L1 keeps them) and in Redis. It returns what it got ([`Fetched`]); the per-user
//! decision is the caller's.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::cache::{Cached, L1};
use crate::decision::Decider;
use crate::keys::{Key, KeyDeriver};
use crate::metrics;
use crate::store::{Health, Op, Redis};
use crate::validate::{ProviderError, TokenCheck, Validation, Validator};
use crate::verdict::{covers, now_ms, Answer, Verdict};
use extauth_protocol::wire::{Reason, Source};

/// How long a broker holds the cluster-wide flight lock of a token at most; other brokers wait
/// for its verdict at most this long (and at most half their request's time left) before
/// validating themselves.
const LOCK_TTL: Duration = Duration::from_secs(6);
/// Least time left before a request's deadline for a provider call to be started.
pub(crate) const MIN_PROVIDER_BUDGET: Duration = Duration::from_millis(50);
/// How often a broker waiting on another broker's flight looks for its verdict.
const LOCK_POLL: Duration = Duration::from_millis(10);

/// A verdict and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fetched {
    /// The verdict on the token, in the form L1 keeps (every waiter decides for its own user).
    pub verdict: Cached,
    /// Where it came from.
    pub source: Source,
}

/// Why a flight produced no verdict; shared with its waiters, never cached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FlightError {
    /// The provider could not answer.
    #[error(transparent)]
    Unavailable(ProviderError),
    /// The deadline of the request running the flight left no time for the provider call.
    #[error("no time left for a provider call")]
    Deadline,
}

/// What a flight's waiters get.
pub(crate) type Landed = Result<Fetched, FlightError>;

/// One request's question: the verdict on this token, for this domain, by this deadline.
pub(crate) struct Ask<'a> {
    /// The token's key (with the user for validators whose answer depends on it).
    pub token_key: Key,
    /// The requesting user's key: a verdict naming this user is kept in L1 bound to the user's
    /// name, so its next hits need no user key.
    pub user_key: Key,
    /// What the validator is asked.
    pub check: TokenCheck<'a>,
    /// The domain's validator.
    pub validator: &'a dyn Validator,
    /// How the domain decides on its validator's answers, and its lifetimes.
    pub decider: &'a Decider,
    /// How long a user whose login a flight proved is known for `isuser` (the domain's
    /// `seen_ttl`).
    pub seen_ttl: Duration,
    /// When the requester stops waiting.
    pub deadline: Instant,
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

/// What [`Flights`] needs, built once at start-up.
pub(crate) struct FlightParts {
    /// Key derivation (the named user's key).
    pub keys: KeyDeriver,
    /// The shared store, if configured.
    pub redis: Option<Redis>,
    /// The in-process cache and its revocation marks, shared with the engine and the hint
    /// listener.
    pub l1: L1,
}

/// Runs flights. Cheap to share behind an `Arc`.
pub(crate) struct Flights {
    parts: FlightParts,
    /// Flights in progress in this process, by token key.
    running: Mutex<HashMap<Key, Arc<OnceCell<Landed>>>>,
    /// Names this broker as the holder of a cluster lock.
    owner: String,
    health: Health,
}

impl Flights {
    /// Flights over `parts`.
    pub(crate) fn new(parts: FlightParts) -> Self {
        Flights {
            parts,
            running: Mutex::new(HashMap::new()),
            owner: format!(
                "{}:{}",
                std::process::id(),
                hex::encode(rand::random::<[u8; 6]>())
            ),
            health: Health::default(),
        }
    }

    /// Redis outage bookkeeping, shared with the engine's own Redis calls.
    pub(crate) fn health(&self) -> &Health {
        &self.health
    }

    /// The verdict on `ask`'s token: from the flight already running for it in this process,
    /// or from a new one this request leads. A flight cut at its leader's deadline is run again
    /// for a waiter that still has time. A verdict naming the asking user that did not come
    /// from L1 marks the user as seen (in Redis too when this broker asked the provider).
    pub(crate) async fn fetch(&self, ask: &Ask<'_>) -> Landed {
        let mut landed = self.join(ask).await;
        let time_left = ask.deadline.saturating_duration_since(Instant::now());
        if landed == Err(FlightError::Deadline) && time_left >= MIN_PROVIDER_BUDGET {
            landed = self.join(ask).await;
        }
        if let Ok(fetched) = &landed {
            if fetched.source != Source::L1 && fetched.verdict.decide(&ask.user_key).0 {
                self.mark_seen(ask, fetched.source == Source::Provider)
                    .await;
            }
        }
        landed
    }

    /// Remembers that the asking user logged in: here, and in Redis when `share` (the request
    /// that asked the provider; verdicts read from Redis were shared by the broker that did).
    async fn mark_seen(&self, ask: &Ask<'_>, share: bool) {
        let until = now_ms() + ask.seen_ttl.as_millis() as u64;
        self.parts.l1.mark_seen(&ask.user_key, until);
        if let (true, Some(redis)) = (share, &self.parts.redis) {
            let marked = redis.mark_seen(&ask.user_key, until).await;
            self.health.check(Op::SeenWrite, marked);
        }
    }

    /// Joins or leads the flight for `ask`'s token. If the leader's request is dropped (its
    /// shim went away), the next waiter takes over the work.
    async fn join(&self, ask: &Ask<'_>) -> Landed {
        let cell = self
            .running
            .lock()
            .expect("flights")
            .entry(ask.token_key)
            .or_default()
            .clone();
        let mut led = false;
        let landed = cell
            .get_or_init(|| {
                led = true;
                // Boxed: the flight's state machine is large, and only a miss pays for it. As a
                // trait object, so the compiler proves it `Send` here once instead of through
                // every future that awaits it (which overflowed its recursion limit).
                let flight: Pin<Box<dyn Future<Output = Landed> + Send + '_>> =
                    Box::pin(self.lead(ask));
                flight
            })
            .await
            .clone();
        let mut running = self.running.lock().expect("flights");
        if running
            .get(&ask.token_key)
            .is_some_and(|c| Arc::ptr_eq(c, &cell))
        {
            running.remove(&ask.token_key);
        }
        if !led {
            metrics::coalesced_waiter();
        }
        landed
    }

    /// The body of a flight.
    async fn lead(&self, ask: &Ask<'_>) -> Landed {
        let started_ms = now_ms();
        let l1 = &self.parts.l1;
        // A flight that landed between the caller's cache miss and this one.
        if let Some(v) = l1.get(&ask.token_key) {
            return Ok(Fetched {
                verdict: v,
                source: Source::L1,
            });
        }
        let mut stale = l1.get_usable(&ask.token_key);
        if let Some(v) = self.stored_verdict(ask).await {
            if v.is_fresh_at(now_ms()) {
                return Ok(self.shared(ask, v));
            }
            stale = stale.or(Some(Cached::from(&v)));
        }
        let mut coordination = self.coordinate(ask).await;
        if let (Coordination::Hold, Some(redis)) = (&coordination, &self.parts.redis) {
            // The broker that held the lock before may have stored its verdict and unlocked
            // between this broker's last look in Redis and its lock (a Redis round trip or more
            // on a loaded machine): look once more. Without this, a herd on one new token
            // across brokers now and then cost a second provider call.
            if let Some(v) = self
                .stored_verdict(ask)
                .await
                .filter(|v| v.is_fresh_at(now_ms()))
            {
                self.health
                    .check(Op::Unlock, redis.unlock(&ask.token_key).await);
                coordination = Coordination::Shared(v);
            }
        }
        if let Coordination::Shared(v) = coordination {
            return Ok(self.shared(ask, v));
        }
        let decided = self.ask_provider(ask, started_ms).await;
        let landed = match decided {
            Ok(verdict) => Ok(self.remember(ask, verdict).await),
            Err(e) => Err(e),
        };
        if let (Coordination::Hold, Some(redis)) = (&coordination, &self.parts.redis) {
            self.health
                .check(Op::Unlock, redis.unlock(&ask.token_key).await);
        }
        match (landed, stale) {
            (Err(FlightError::Unavailable(why)), Some(v)) => {
                warn!(
                    user = ask.check.user,
                    domain = ask.check.domain,
                    "provider unavailable ({why}); serving a stale verdict (stale_if_error)"
                );
                Ok(Fetched {
                    verdict: v,
                    source: Source::L1,
                })
            }
            (landed, _) => landed,
        }
    }

    /// Keeps `verdict` in L1, bound to the asking user's name when it names that user (the
    /// only user whose name this flight knows).
    fn keep(&self, ask: &Ask<'_>, verdict: &Verdict) {
        let l1 = &self.parts.l1;
        let name = (verdict.named_user() == Some(&ask.user_key))
            .then(|| l1.name_tag(ask.check.domain, ask.check.user));
        l1.insert(&ask.token_key, verdict, name);
    }

    /// A verdict another broker stored, now kept here too.
    fn shared(&self, ask: &Ask<'_>, verdict: Verdict) -> Fetched {
        metrics::cache_hit(Source::Redis);
        self.keep(ask, &verdict);
        Fetched {
            verdict: Cached::from(&verdict),
            source: Source::Redis,
        }
    }

    /// The usable verdict Redis holds on the token, authenticated, clamped to this domain's
    /// lifetimes and not revoked; `None` on a miss or a Redis error.
    async fn stored_verdict(&self, ask: &Ask<'_>) -> Option<Verdict> {
        let redis = self.parts.redis.as_ref()?;
        let stored = self
            .health
            .check(Op::Read, redis.verdict(&ask.token_key).await)?;
        let now = now_ms();
        let verdict = stored
            .verdict?
            .clamped(ask.decider.lifetimes(), now)
            .filter(|v| v.is_usable_at(now))?;
        let l1 = &self.parts.l1;
        if let Some(mark) = stored.token_mark {
            l1.note_token_mark(&ask.token_key, mark);
        }
        if let Some(user) = verdict.named_user() {
            let mark = self
                .health
                .check(Op::MarkRead, redis.user_mark(user).await)?;
            if let Some(mark) = mark {
                l1.note_user_mark(user, mark);
            }
        }
        let revoked = l1.mark_covering(&ask.token_key, &Cached::from(&verdict));
        revoked.is_none().then_some(verdict)
    }

    /// Takes the cluster-wide flight lock of the token, or waits for the broker holding it to
    /// store its verdict. Never a wrong verdict: at worst an extra provider call.
    ///
    /// The wait lasts at most [`LOCK_TTL`] and at most half the time left before the deadline:
    /// a broker killed mid-flight leaves its lock behind until the TTL ends, and the requester
    /// must still have time for its own provider call after giving up on it.
    async fn coordinate(&self, ask: &Ask<'_>) -> Coordination {
        let Some(redis) = &self.parts.redis else {
            return Coordination::Alone;
        };
        let now = Instant::now();
        let give_up = now + LOCK_TTL.min(ask.deadline.saturating_duration_since(now) / 2);
        loop {
            let taken = redis.lock(&ask.token_key, &self.owner, LOCK_TTL).await;
            match self.health.check(Op::Lock, taken) {
                Some(true) => return Coordination::Hold,
                Some(false) => {}
                None => return Coordination::Alone,
            }
            // Another broker validates this token now: wait for its verdict or its unlock.
            while Instant::now() < give_up {
                tokio::time::sleep(LOCK_POLL).await;
                if let Some(v) = self.stored_verdict(ask).await {
                    if v.is_fresh_at(now_ms()) {
                        return Coordination::Shared(v);
                    }
                }
                match self
                    .health
                    .check(Op::LockCheck, redis.locked(&ask.token_key).await)
                {
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

    /// Calls the domain's validator within the deadline, and turns its answer into a verdict.
    async fn ask_provider(&self, ask: &Ask<'_>, started_ms: u64) -> Result<Verdict, FlightError> {
        let started = Instant::now();
        let left = ask.deadline.saturating_duration_since(started);
        if left < MIN_PROVIDER_BUDGET {
            return Err(FlightError::Deadline);
        }
        let validator = ask.validator;
        let validation = tokio::time::timeout(left, validator.validate(ask.check))
            .await
            .map_err(|_| FlightError::Deadline)?;
        metrics::provider_call(validator.kind(), validation.outcome(), started.elapsed());
        if let Validation::Unavailable(why) = validation {
            return Err(FlightError::Unavailable(why));
        }
        let verdict = ask
            .decider
            .verdict(validation, &ask.check, &self.parts.keys, started_ms);
        info!(
            user = ask.check.user,
            domain = ask.check.domain,
            verdict = verdict.decide(&ask.user_key).1.as_str(),
            ttl_ms = verdict.remaining().as_millis() as u64,
            "provider verdict"
        );
        Ok(verdict)
    }

    /// Stores a provider's verdict in Redis and L1, unless a revocation raced this flight: then
    /// nothing is kept (what was written is deleted again), and a revocation that came after
    /// the flight started turns the answer into a refusal.
    async fn remember(&self, ask: &Ask<'_>, verdict: Verdict) -> Fetched {
        let token = &ask.token_key;
        let mut race = self
            .parts
            .l1
            .mark_covering(token, &Cached::from(&verdict))
            .map(Race::Mark);
        if let (None, Some(redis)) = (race, &self.parts.redis) {
            let written = self
                .health
                .check(Op::Write, redis.put_verdict(token, &verdict).await)
                .is_some();
            // The marks are read after writing: a revocation whose mark lands after this read
            // finds the verdict in the user's index and deletes it itself.
            race = self.stored_mark(redis, token, &verdict).await;
            if race.is_some() && written {
                let _ = redis.delete_verdict(token).await;
            }
        }
        let answer = match race {
            None => {
                self.keep(ask, &verdict);
                verdict
            }
            Some(race) => {
                info!(
                    user = ask.check.user,
                    domain = ask.check.domain,
                    "a revocation may have raced this provider call: its verdict is not cached"
                );
                match race {
                    Race::Mark(at) if at >= verdict.issued_ms => Verdict {
                        answer: Answer::Refused(Reason::Revoked),
                        fresh_until_ms: 0,
                        usable_until_ms: 0,
                        ..verdict
                    },
                    _ => verdict,
                }
            }
        };
        Fetched {
            verdict: Cached::from(&answer),
            source: Source::Provider,
        }
    }

    /// A mark stored in Redis that covers `verdict`; [`Race::Unknown`] when the marks cannot
    /// be read (the verdict is then not kept either).
    async fn stored_mark(&self, redis: &Redis, token: &Key, verdict: &Verdict) -> Option<Race> {
        let Some(token_mark) = self
            .health
            .check(Op::MarkRead, redis.token_mark(token).await)
        else {
            return Some(Race::Unknown);
        };
        let user_mark = match verdict.named_user() {
            Some(user) => match self.health.check(Op::MarkRead, redis.user_mark(user).await) {
                Some(mark) => mark,
                None => return Some(Race::Unknown),
            },
            None => None,
        };
        [token_mark, user_mark]
            .into_iter()
            .flatten()
            .filter(|mark| covers(*mark, verdict.issued_ms))
            .max()
            .map(Race::Mark)
    }
}

/// A revocation that may have raced a flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Race {
    /// A mark set at this instant (ms since the epoch) covers the flight's verdict.
    Mark(u64),
    /// The marks could not be read.
    Unknown,
}

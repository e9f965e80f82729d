//! Revocation: marks that outlive every verdict they revoke, the procedure that sets them and
//! deletes the verdicts, and the listener that tells every broker.
//!
//! Revoking a user (or one token) records a mark, "every verdict on it issued up to instant T is
//! revoked", in Redis (sealed, for [`HORIZON`]) and in this process, deletes the user's verdicts
//! from Redis (found through the user's index), and publishes the mark as a sealed hint, which
//! every broker keeps in process (a writer who deletes the mark from Redis the moment it is
//! written cannot keep it from running brokers; replaying a hint repeats a real revocation).
//! A verdict is then served only if it was issued after every mark that covers it:
//! - on a broker that saw the revocation, whatever Redis later holds (its marks are in process);
//! - on every broker, including ones started later, as long as Redis holds the mark (verdicts
//!   read from Redis are checked against the marks stored there).
//!
//! The residue a MAC cannot stop: a Redis writer who saved a genuine verdict before the
//! revocation, deletes the mark and restores the verdict makes it usable again on brokers that
//! never saw the revocation, until that verdict's own end (at most `max_ttl` after it was
//! issued). docs/security.md states this bound.
//!
//! A revocation that races a provider call in flight cannot put the revoked verdict back: the
//! flight compares the marks with its own start after writing, and deletes what it wrote
//! (the flight module does it).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tracing::{debug, info, warn};

use crate::cache::{Cached, L1};
use crate::keys::{self, Key, KeyDeriver};
use crate::metrics;
use crate::store::{Hint, Redis, HINT_CHANNEL};
use crate::verdict::{now_ms, HORIZON};
use extauth_protocol::extauth::Secret;

/// Clocks of brokers and Redis may disagree by this much (ms; NTP keeps them far closer): a
/// verdict issued up to this long after a mark is still taken as revoked by it, which costs a
/// provider call, never a wrong yes.
pub const SKEW_MS: u64 = 500;

/// Most marks kept in process; past it the oldest are folded into a floor (every verdict issued
/// before it is treated as revoked), so memory stays bounded whatever is revoked.
pub const MAX_MARKS: usize = 100_000;

/// Does a mark set at `mark_ms` revoke a verdict issued at `issued_ms`?
pub fn covers(mark_ms: u64, issued_ms: u64) -> bool {
    issued_ms <= mark_ms.saturating_add(SKEW_MS)
}

/// The revocation marks this process knows, bounded in number and age.
#[derive(Default)]
pub struct Revocations {
    marks: Mutex<Marks>,
    /// False while no mark and no floor exist: the hot path then takes no lock.
    any: AtomicBool,
}

/// Which kind of key a mark is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    User,
    Token,
}

/// Marks by [`keys::short`] of the user or token key, as L1 keeps a verdict's named user: two
/// keys sharing it by chance (2^-64) only revoke more.
#[derive(Default)]
struct Marks {
    users: HashMap<u64, Mark>,
    tokens: HashMap<u64, Mark>,
    /// When each mark was noted, oldest first, for expiry and for folding the oldest into the
    /// floor. A key noted again (a later mark) has several entries: only its latest counts.
    order: VecDeque<(u64, Kind, u64)>,
    /// Every verdict issued up to this instant is revoked (0: none).
    floor_ms: u64,
}

/// A revocation mark, and when this process noted it (both ms since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    at_ms: u64,
    noted_ms: u64,
}

impl Marks {
    fn map(&mut self, kind: Kind) -> &mut HashMap<u64, Mark> {
        match kind {
            Kind::User => &mut self.users,
            Kind::Token => &mut self.tokens,
        }
    }

    /// Keeps the mark `at_ms` on `key`, noted at `now_ms`, unless a later one is known.
    fn note(&mut self, kind: Kind, key: u64, at_ms: u64, now_ms: u64) {
        self.forget_older_than(now_ms.saturating_sub(HORIZON.as_millis() as u64));
        let map = self.map(kind);
        if map.get(&key).is_some_and(|m| m.at_ms >= at_ms) {
            return;
        }
        map.insert(
            key,
            Mark {
                at_ms,
                noted_ms: now_ms,
            },
        );
        self.order.push_back((now_ms, kind, key));
        while self.users.len() + self.tokens.len() > MAX_MARKS {
            let Some((noted, kind, key)) = self.order.pop_front() else {
                break;
            };
            if let Some(at) = self.take(kind, key, noted) {
                self.floor_ms = self.floor_ms.max(at);
            }
        }
    }

    fn forget_older_than(&mut self, cutoff_ms: u64) {
        while let Some(&(noted, kind, key)) = self.order.front() {
            if noted >= cutoff_ms {
                break;
            }
            self.order.pop_front();
            self.take(kind, key, noted);
        }
    }

    /// Removes the mark on `key` if it is the one noted at `noted_ms` (an older entry of a key
    /// noted again since must not remove its later mark early), returning its instant.
    fn take(&mut self, kind: Kind, key: u64, noted_ms: u64) -> Option<u64> {
        let map = self.map(kind);
        if map.get(&key)?.noted_ms != noted_ms {
            return None;
        }
        map.remove(&key).map(|m| m.at_ms)
    }
}

impl Revocations {
    /// Records that verdicts naming `user` issued up to `at_ms` are revoked.
    pub fn note_user(&self, user: Key, at_ms: u64) {
        self.note(Kind::User, user, at_ms);
    }

    /// Records that verdicts on `token` issued up to `at_ms` are revoked.
    pub fn note_token(&self, token: Key, at_ms: u64) {
        self.note(Kind::Token, token, at_ms);
    }

    fn note(&self, kind: Kind, key: Key, at_ms: u64) {
        self.marks
            .lock()
            .expect("revocation marks")
            .note(kind, keys::short(&key), at_ms, now_ms());
        self.any.store(true, Ordering::Release);
    }

    /// Is `verdict` (on `token`) revoked by a mark this process knows?
    pub fn revokes(&self, token: &Key, verdict: &Cached) -> bool {
        self.covering(token, verdict).is_some()
    }

    /// The latest mark this process knows that revokes `verdict` (on `token`), ms since the
    /// epoch.
    pub fn covering(&self, token: &Key, verdict: &Cached) -> Option<u64> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let marks = self.marks.lock().expect("revocation marks");
        let user = verdict.named_user().and_then(|u| marks.users.get(&u));
        let token = marks.tokens.get(&keys::short(token));
        [
            Some(marks.floor_ms),
            token.map(|m| m.at_ms),
            user.map(|m| m.at_ms),
        ]
        .into_iter()
        .flatten()
        .filter(|at| *at != 0 && covers(*at, verdict.issued_ms()))
        .max()
    }

    /// How many marks are held (for tests and metrics).
    pub fn len(&self) -> usize {
        let marks = self.marks.lock().expect("revocation marks");
        marks.users.len() + marks.tokens.len()
    }

    /// Whether no mark is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What to revoke: one token's verdict for `user@domain`, or (without a token) every verdict
/// naming that user.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The XMPP domain (vhost).
    pub domain: &'a str,
    /// The localpart; normalised with nodeprep as ejabberd does, so `Alice` revokes `alice`.
    pub user: &'a str,
    /// The token, or `None` for every verdict of the user.
    pub token: Option<&'a Secret>,
}

/// What a revocation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// The instant of the marks, ms since the epoch (the Redis server's clock when shared).
    pub at_ms: u64,
    /// Verdicts deleted from Redis.
    pub dropped: usize,
}

/// Why a revocation failed.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// The user or domain cannot be a JID part.
    #[error("the user or domain is not a valid JID part")]
    BadJid,
    /// Redis failed; the revocation may be incomplete cluster-wide (run it again).
    #[error("Redis failed, the revocation may be incomplete cluster-wide (run it again): {0}")]
    Redis(#[from] redis::RedisError),
}

/// This broker's own state, changed at once by a revocation it runs.
pub struct Local<'a> {
    /// Its marks.
    pub revocations: &'a Revocations,
    /// Its in-process cache.
    pub l1: &'a L1,
}

/// Revokes `target`: marks it in Redis and here, hints every broker, and deletes its verdicts
/// from Redis. The marks revoke; they are set and told first, so nothing a Redis writer put in
/// the user's index can keep brokers from learning of the revocation (deleting the verdicts only
/// matters if a writer deletes the mark later).
///
/// # Errors
/// [`RevokeError`]: a bad JID, or a Redis failure (the hint is best effort; everything else
/// must succeed for the revocation to be complete).
pub async fn revoke(
    target: &Target<'_>,
    keys: &KeyDeriver,
    redis: Option<&Redis>,
    local: Option<Local<'_>>,
) -> Result<Revoked, RevokeError> {
    let (user, domain) = normalise(target)?;
    let at_ms = match redis {
        Some(redis) => redis.time_ms().await?,
        None => now_ms(),
    };
    let user_key = keys.user(&domain, &user);
    let Some(token) = target.token else {
        if let Some(local) = &local {
            local.revocations.note_user(user_key, at_ms);
        }
        let mut dropped = 0;
        if let Some(redis) = redis {
            redis.mark_user_revoked(&user_key, at_ms).await?;
            let _ = redis.publish(Hint::User(user_key, at_ms)).await;
            dropped = redis.drop_user_verdicts(&user_key).await?;
        }
        info!(user = %user, domain = %domain, dropped, "revoked every verdict naming the user");
        return Ok(Revoked { at_ms, dropped });
    };
    // The verdict on a token is keyed without the user, or with it for validators that ask
    // about one user (a site API with `{user}`): revoke both.
    let token_keys = [
        keys.token(&domain, token.expose(), None),
        keys.token(&domain, token.expose(), Some(&user)),
    ];
    let mut dropped = 0;
    for token_key in token_keys {
        if let Some(redis) = redis {
            redis.mark_token_revoked(&token_key, at_ms).await?;
            dropped += redis.delete_verdict(&token_key).await?;
            let _ = redis.publish(Hint::Token(token_key, at_ms)).await;
        }
        if let Some(local) = &local {
            local.revocations.note_token(token_key, at_ms);
            local.l1.invalidate(&token_key);
        }
    }
    info!(user = %user, domain = %domain, "revoked one token's verdict");
    Ok(Revoked { at_ms, dropped })
}

/// The localpart and domain as ejabberd would send them (nodeprep, nameprep).
///
/// # Errors
/// [`RevokeError::BadJid`] when either cannot be a JID part.
pub fn normalise(target: &Target<'_>) -> Result<(String, String), RevokeError> {
    let user = stringprep::nodeprep(target.user).map_err(|_| RevokeError::BadJid)?;
    let domain = stringprep::nameprep(target.domain).map_err(|_| RevokeError::BadJid)?;
    if user.is_empty() || domain.is_empty() {
        return Err(RevokeError::BadJid);
    }
    Ok((user.into_owned(), domain.into_owned()))
}

/// Listens to revocation hints from other brokers until the process ends, re-subscribing after
/// errors. Each re-subscription drops every in-process verdict (hints may have been missed);
/// verdicts read from Redis are checked against the marks there, so nothing else is needed.
pub async fn listen(redis: Redis, revocations: Arc<Revocations>, l1: L1) {
    let mut first = true;
    // Logged once per outage: the first failure warns, the retries (every second) do not.
    let mut down = false;
    loop {
        let subscribed = match pubsub(&redis).await {
            Ok(mut pubsub) => pubsub.subscribe(HINT_CHANNEL).await.map(|()| pubsub),
            Err(e) => Err(e),
        };
        match subscribed {
            Ok(mut pubsub) => {
                if !first {
                    info!("revocation channel back; dropping in-process verdicts that may have missed a revocation");
                    l1.invalidate_all();
                }
                (first, down) = (false, false);
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    if let Some(hint) = redis.open_hint(msg.get_payload_bytes()) {
                        apply(hint, &revocations, &l1);
                    }
                }
                debug!("revocation channel closed; re-subscribing");
            }
            Err(e) if !down && !first => {
                warn!("revocation channel unavailable, retrying every second: {e}");
                down = true;
            }
            Err(e) => debug!("revocation channel still unavailable: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn pubsub(redis: &Redis) -> redis::RedisResult<redis::aio::PubSub> {
    redis.pubsub_client().await?.get_async_pubsub().await
}

/// Keeps the mark a hint carries. A token's in-process verdict is dropped at once; a user's
/// are found by the mark when they are next served (L1 is keyed by token).
fn apply(hint: Hint, revocations: &Revocations, l1: &L1) {
    match hint {
        Hint::User(user, at_ms) => revocations.note_user(user, at_ms),
        Hint::Token(token, at_ms) => {
            revocations.note_token(token, at_ms);
            l1.invalidate(&token);
        }
    }
    metrics::hint_applied();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::{Answer, Verdict};

    fn verdict(user: Key, issued_ms: u64) -> Cached {
        Cached::from(&Verdict {
            answer: Answer::Names(user),
            issued_ms,
            fresh_until_ms: issued_ms + 1,
            usable_until_ms: issued_ms + 1,
            exp_ms: None,
        })
    }

    #[test]
    fn marks_revoke_what_was_issued_before_them_and_a_skew_after() {
        let r = Revocations::default();
        let (alice, bob, token) = ([1; 32], [2; 32], [9; 32]);
        let now = now_ms();
        assert!(!r.revokes(&token, &verdict(alice, now)));
        r.note_user(alice, now);
        assert!(r.revokes(&token, &verdict(alice, now - 60_000)));
        assert!(
            r.revokes(&token, &verdict(alice, now + SKEW_MS)),
            "within the skew"
        );
        assert!(!r.revokes(&token, &verdict(alice, now + SKEW_MS + 1)));
        assert!(
            !r.revokes(&token, &verdict(bob, now - 60_000)),
            "another user"
        );
        r.note_user(alice, now - 120_000);
        assert!(
            r.revokes(&token, &verdict(alice, now)),
            "an older mark never lowers one"
        );
        r.note_token(token, now);
        assert!(r.revokes(&token, &verdict(bob, now - 1)));
        assert!(!r.revokes(&[8; 32], &verdict(bob, now - 1)));
    }

    #[test]
    fn a_mark_noted_again_lives_a_full_horizon_from_its_latest_note() {
        let mut marks = Marks::default();
        let (key, t0, later) = (5, 10_000_000_000, 10_000_060_000);
        let horizon = HORIZON.as_millis() as u64;
        marks.note(Kind::User, key, t0, t0);
        marks.note(Kind::User, key, later, later);
        marks.forget_older_than(t0 + 1);
        assert_eq!(
            marks.users.get(&key).map(|m| m.at_ms),
            Some(later),
            "forgetting the first note must not forget the later mark"
        );
        marks.note(Kind::Token, 6, later, later + horizon + 1);
        assert!(
            !marks.users.contains_key(&key),
            "forgotten a horizon after its latest note"
        );
        assert_eq!(marks.order.len(), 1);
    }

    #[test]
    fn marks_are_bounded_and_the_oldest_fold_into_a_floor() {
        let r = Revocations::default();
        let now = now_ms();
        for i in 0..(MAX_MARKS + 10) as u64 {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&i.to_be_bytes());
            r.note_user(key, now - 1_000_000 + i);
        }
        assert_eq!(r.len(), MAX_MARKS);
        let stranger = verdict([0xff; 32], now - 1_000_000);
        assert!(
            r.revokes(&[0; 32], &stranger),
            "an evicted mark still revokes through the floor"
        );
        assert!(!r.revokes(&[0; 32], &verdict([0xff; 32], now)));
    }
}

//! The in-process cache (L1): verdicts by token key, and "seen" markers by user key.
//!
//! Entries expire at the absolute instants they carry (a verdict at its usable end, so a
//! `stale_if_error` copy is at hand while the provider is down; a "seen" marker at its end):
//! reads never extend a lifetime, and [`L1::get`] serves a verdict only within its TTL. Only
//! verdicts this broker decided or read back authenticated from Redis ever get here.

use std::time::{Duration, Instant};

use moka::sync::Cache;
use moka::Expiry;

use crate::keys::Key;
use crate::verdict::{now_ms, Verdict};

/// Values that know when they expire (ms since the Unix epoch).
trait ExpiresAt {
    fn expires_at_ms(&self) -> u64;
}

impl ExpiresAt for Verdict {
    fn expires_at_ms(&self) -> u64 {
        self.usable_until_ms
    }
}

/// The end of a "seen" marker, ms since the epoch.
#[derive(Clone, Copy)]
struct Until(u64);

impl ExpiresAt for Until {
    fn expires_at_ms(&self) -> u64 {
        self.0
    }
}

/// Makes each entry expire at the instant its value carries.
struct AtInstant;

impl<V: ExpiresAt> Expiry<Key, V> for AtInstant {
    fn expire_after_create(&self, _key: &Key, value: &V, _now: Instant) -> Option<Duration> {
        Some(Duration::from_millis(
            value.expires_at_ms().saturating_sub(now_ms()),
        ))
    }

    fn expire_after_update(
        &self,
        _key: &Key,
        value: &V,
        _now: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(Duration::from_millis(
            value.expires_at_ms().saturating_sub(now_ms()),
        ))
    }
}

fn cache_at_instant<V: ExpiresAt + Clone + Send + Sync + 'static>(capacity: u64) -> Cache<Key, V> {
    Cache::builder()
        .max_capacity(capacity)
        .expire_after(AtInstant)
        .build()
}

/// The in-process cache. Cheap to clone (the clones share the entries).
#[derive(Clone)]
pub struct L1 {
    verdicts: Cache<Key, Verdict>,
    seen: Cache<Key, Until>,
}

impl L1 {
    /// An empty cache of at most `capacity` verdicts (and as many "seen" markers).
    pub fn new(capacity: u64) -> Self {
        L1 {
            verdicts: cache_at_instant(capacity),
            seen: cache_at_instant(capacity),
        }
    }

    /// The verdict on `token`, if any and within its TTL.
    pub fn get(&self, token: &Key) -> Option<Verdict> {
        let now = now_ms();
        self.verdicts.get(token).filter(|v| v.is_fresh_at(now))
    }

    /// The verdict on `token` if it is still usable for `stale_if_error` (fresh or not).
    pub fn get_usable(&self, token: &Key) -> Option<Verdict> {
        let now = now_ms();
        self.verdicts.get(token).filter(|v| v.is_usable_at(now))
    }

    /// Keeps `verdict` until its usable end.
    pub fn insert(&self, token: Key, verdict: Verdict) {
        if verdict.is_usable_at(now_ms()) {
            self.verdicts.insert(token, verdict);
        }
    }

    /// Drops the verdict on one token (revocation).
    pub fn invalidate(&self, token: &Key) {
        self.verdicts.invalidate(token);
    }

    /// Drops every verdict (after revocations may have been missed).
    pub fn invalidate_all(&self) {
        self.verdicts.invalidate_all();
    }

    /// Marks a user (by [`crate::keys::KeyDeriver::user`] key) as seen until `until_ms`.
    pub fn mark_seen(&self, user: Key, until_ms: u64) {
        self.seen.insert(user, Until(until_ms));
    }

    /// Was the user seen within its "seen" TTL (in this process)?
    pub fn seen(&self, user: &Key) -> bool {
        self.seen.get(user).is_some_and(|u| u.0 > now_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::Answer;

    fn valid(fresh_ms: u64, usable_ms: u64) -> Verdict {
        let now = now_ms();
        Verdict {
            answer: Answer::Names([1; 32]),
            issued_ms: now,
            fresh_until_ms: now + fresh_ms,
            usable_until_ms: now + usable_ms,
            exp_ms: None,
        }
    }

    #[test]
    fn verdicts_are_served_within_their_ttl_and_kept_until_their_usable_end() {
        let l1 = L1::new(100);
        let (fresh, stale, gone) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let v = valid(10_000, 20_000);
        l1.insert(fresh, v);
        assert_eq!((l1.get(&fresh), l1.get_usable(&fresh)), (Some(v), Some(v)));
        let mut past = v;
        past.fresh_until_ms = now_ms() - 1;
        l1.insert(stale, past);
        assert_eq!((l1.get(&stale), l1.get_usable(&stale)), (None, Some(past)));
        past.usable_until_ms = past.fresh_until_ms;
        l1.insert(gone, past);
        assert_eq!(
            l1.get_usable(&gone),
            None,
            "an unusable verdict is not kept"
        );
        l1.invalidate(&fresh);
        assert_eq!(l1.get(&fresh), None);
    }

    #[test]
    fn seen_markers_end_at_their_instant() {
        let l1 = L1::new(100);
        let user = [3u8; 32];
        assert!(!l1.seen(&user));
        l1.mark_seen(user, now_ms() + 60_000);
        assert!(l1.seen(&user));
        l1.mark_seen(user, now_ms() - 1);
        assert!(!l1.seen(&user), "a marker past its end is not seen");
    }
}

//! Verdict cache: keyed digests, the in-process L1 (moka) and the shared L2 (Redis).
//!
//! Rules (RFC 7662 section 4; see `docs/architecture.md`):
//! - Verdict key = HMAC-SHA256(cache secret, version | domain | localpart | generation | token),
//!   each part length-prefixed. Tokens never leave memory; a Redis dump cannot be checked against
//!   guessed tokens without the secret. The user's generation number makes "revoke every verdict
//!   of this user" one `INCR`.
//! - Every entry carries absolute instants (ms since the Unix epoch): `fresh_until` (its TTL) and
//!   `usable_until` (the `stale_if_error` grace, never past the token's `exp`). Entries expire at
//!   those instants everywhere (`SET ... PXAT`), so a read never extends a lifetime and a copy
//!   taken from Redis lives no longer than the original.
//! - The shared copy lives in Redis ([`crate::store`]); its errors degrade to L1 + provider and
//!   never become verdicts.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use moka::future::Cache;
use moka::Expiry;
use sha2::Sha256;

use crate::extauth::Secret;
use crate::wire::Reason;

/// A 32-byte HMAC-SHA256 digest used as a cache key.
pub type Key = [u8; 32];

/// Derives cache keys with the cache secret.
#[derive(Clone)]
pub struct KeyDeriver {
    mac: Hmac<Sha256>,
}

impl KeyDeriver {
    /// A deriver keyed with `secret`.
    pub fn new(secret: &Secret) -> Self {
        let mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
            .expect("HMAC takes any key length");
        KeyDeriver { mac }
    }

    /// The key of the verdict on `token` for `user@domain` at the user's `generation`.
    pub fn verdict(&self, domain: &str, user: &str, generation: u64, token: &str) -> Key {
        self.digest(&[
            b"extauth-broker/verdict/v1",
            domain.as_bytes(),
            user.as_bytes(),
            &generation.to_be_bytes(),
            token.as_bytes(),
        ])
    }

    /// The key of everything stored about `user@domain` itself ("seen" marker, generation).
    pub fn user(&self, domain: &str, user: &str) -> Key {
        self.digest(&[
            b"extauth-broker/user/v1",
            domain.as_bytes(),
            user.as_bytes(),
        ])
    }

    fn digest(&self, parts: &[&[u8]]) -> Key {
        let mut mac = self.mac.clone();
        for part in parts {
            // Length prefixes make ("ab","c") and ("a","bc") different keys.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

/// A cached decision on one (domain, user, generation, token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Accept the login?
    pub ok: bool,
    /// Why.
    pub reason: Reason,
    /// End of the entry's TTL, ms since the Unix epoch.
    pub fresh_until_ms: u64,
    /// Until when the entry may still be served while the provider is unavailable
    /// (`stale_if_error`); equal to `fresh_until_ms` when that is off. Never past `exp`.
    pub usable_until_ms: u64,
}

impl Verdict {
    /// Within its TTL?
    pub fn is_fresh(&self) -> bool {
        self.fresh_until_ms > now_ms()
    }

    /// Time left before the TTL ends (zero when already stale).
    pub fn remaining(&self) -> Duration {
        Duration::from_millis(self.fresh_until_ms.saturating_sub(now_ms()))
    }

    /// Redis value: `ok|reason|fresh_until_ms|usable_until_ms`, e.g. `1|accepted|1767225600000|1767225600000`.
    /// Holds no token and no subject.
    pub(crate) fn to_redis(self) -> String {
        format!(
            "{}|{}|{}|{}",
            self.ok as u8,
            self.reason.as_str(),
            self.fresh_until_ms,
            self.usable_until_ms
        )
    }

    /// Parses [`Verdict::to_redis`] output; `None` for anything else (treated as a miss).
    pub(crate) fn from_redis(value: &str) -> Option<Verdict> {
        let mut parts = value.split('|');
        let ok = match parts.next()? {
            "1" => true,
            "0" => false,
            _ => return None,
        };
        let reason = Reason::from_name(parts.next()?)?;
        let fresh_until_ms = parts.next()?.parse().ok()?;
        let usable_until_ms = parts.next()?.parse().ok()?;
        let consistent = ok == (reason == Reason::Accepted) && usable_until_ms >= fresh_until_ms;
        (consistent && parts.next().is_none()).then_some(Verdict {
            ok,
            reason,
            fresh_until_ms,
            usable_until_ms,
        })
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Makes each L1 entry expire at an absolute instant carried by its value; reads do not extend it.
struct AtInstant;

/// Values that know when they expire (ms since the Unix epoch).
trait ExpiresAt {
    fn expires_at_ms(&self) -> u64;
}

impl ExpiresAt for Verdict {
    fn expires_at_ms(&self) -> u64 {
        self.fresh_until_ms
    }
}

/// A "stale" copy lives until its usable end.
#[derive(Clone, Copy)]
struct Stale(Verdict);

impl ExpiresAt for Stale {
    fn expires_at_ms(&self) -> u64 {
        self.0.usable_until_ms
    }
}

/// The end of a "seen" marker or directory answer.
#[derive(Clone, Copy)]
struct Until(u64);

impl ExpiresAt for Until {
    fn expires_at_ms(&self) -> u64 {
        self.0
    }
}

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

/// The in-process cache. `get_or_load` is also the singleflight: concurrent loads of one key
/// run once and every caller gets the same result (moka `try_get_with`).
#[derive(Clone)]
pub struct L1 {
    verdicts: Cache<Key, Verdict>,
    /// Positive verdicts kept past their TTL for `stale_if_error` (only filled when it is on).
    stale: Cache<Key, Stale>,
    seen: Cache<Key, Until>,
}

impl L1 {
    /// An empty cache of at most `capacity` verdicts (and as many "seen" markers).
    pub fn new(capacity: u64) -> Self {
        L1 {
            verdicts: cache_at_instant(capacity),
            stale: cache_at_instant(capacity),
            seen: cache_at_instant(capacity),
        }
    }

    /// The cached verdict, if any and within its TTL.
    pub async fn get(&self, key: &Key) -> Option<Verdict> {
        self.verdicts.get(key).await.filter(Verdict::is_fresh)
    }

    /// Returns the cached verdict or runs `load` once for all concurrent callers of `key`.
    /// `Ok` results are cached until their TTL ends; errors are shared with the waiters of this
    /// flight but not cached.
    pub async fn get_or_load<F, E>(&self, key: Key, load: F) -> Result<Verdict, Arc<E>>
    where
        F: std::future::Future<Output = Result<Verdict, E>>,
        E: Send + Sync + 'static,
    {
        self.verdicts.try_get_with(key, load).await
    }

    /// Keeps a copy of a positive verdict for serving while the provider is unavailable.
    pub async fn keep_stale(&self, key: Key, verdict: Verdict) {
        if verdict.ok && verdict.usable_until_ms > verdict.fresh_until_ms {
            self.stale.insert(key, Stale(verdict)).await;
        }
    }

    /// A stale-but-usable copy, if any.
    pub async fn get_stale(&self, key: &Key) -> Option<Verdict> {
        self.stale
            .get(key)
            .await
            .map(|s| s.0)
            .filter(|v| v.usable_until_ms > now_ms())
    }

    /// Drops one verdict (revocation).
    pub async fn invalidate(&self, key: &Key) {
        self.verdicts.invalidate(key).await;
        self.stale.invalidate(key).await;
    }

    /// Drops every verdict (after missed revocations, e.g. a pub/sub outage).
    pub fn invalidate_all(&self) {
        self.verdicts.invalidate_all();
        self.stale.invalidate_all();
    }

    /// Marks a user (by [`KeyDeriver::user`] key) as seen for `ttl`.
    pub async fn mark_seen(&self, user: Key, ttl: Duration) {
        self.seen
            .insert(user, Until(now_ms() + ttl.as_millis() as u64))
            .await;
    }

    /// Was the user seen within its "seen" TTL (in this process)?
    pub async fn seen(&self, user: &Key) -> bool {
        self.seen.get(user).await.is_some_and(|u| u.0 > now_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_bind_domain_user_generation_and_token() {
        let d = KeyDeriver::new(&Secret::new("k".repeat(32)));
        let base = d.verdict("example.com", "alice", 0, "tok");
        assert_eq!(base, d.verdict("example.com", "alice", 0, "tok"));
        assert_ne!(base, d.verdict("example.com", "bob", 0, "tok"));
        assert_ne!(base, d.verdict("example.org", "alice", 0, "tok"));
        assert_ne!(base, d.verdict("example.com", "alice", 1, "tok"));
        assert_ne!(base, d.verdict("example.com", "alice", 0, "tok2"));
        assert_ne!(d.verdict("a", "bc", 0, "t"), d.verdict("ab", "c", 0, "t"));
        assert_ne!(d.user("example.com", "alice"), d.user("example.com", "bob"));
        let other = KeyDeriver::new(&Secret::new("j".repeat(32)));
        assert_ne!(base, other.verdict("example.com", "alice", 0, "tok"));
    }

    #[test]
    fn redis_values_round_trip_and_reject_garbage() {
        let v = Verdict {
            ok: true,
            reason: Reason::Accepted,
            fresh_until_ms: 1_700_000_000_123,
            usable_until_ms: 1_700_000_060_000,
        };
        assert_eq!(Verdict::from_redis(&v.to_redis()), Some(v));
        let n = Verdict {
            ok: false,
            reason: Reason::WrongUser,
            fresh_until_ms: 5,
            usable_until_ms: 5,
        };
        assert_eq!(Verdict::from_redis(&n.to_redis()), Some(n));
        for bad in [
            "",
            "1",
            "1|inactive|5|5",
            "0|accepted|5|5",
            "2|accepted|5|5",
            "1|accepted|x|5",
            "1|accepted|5|6|7",
            "0|nonsense|5|5",
            "1|accepted|9|5",
            "1|accepted|5",
        ] {
            assert_eq!(Verdict::from_redis(bad), None, "{bad}");
        }
    }

    fn accepted(fresh_ms: u64, usable_ms: u64) -> Verdict {
        let now = now_ms();
        Verdict {
            ok: true,
            reason: Reason::Accepted,
            fresh_until_ms: now + fresh_ms,
            usable_until_ms: now + usable_ms,
        }
    }

    #[tokio::test]
    async fn l1_entries_expire_at_their_ttl_and_stale_copies_at_their_usable_end() {
        let l1 = L1::new(100);
        let key = [1u8; 32];
        let v = accepted(150, 400);
        assert_eq!(
            l1.get_or_load(key, async { Ok::<_, ()>(v) }).await.unwrap(),
            v
        );
        l1.keep_stale(key, v).await;
        assert_eq!(l1.get(&key).await, Some(v));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(l1.get(&key).await, None);
        assert_eq!(l1.get_stale(&key).await, Some(v));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(l1.get_stale(&key).await, None);
    }

    #[tokio::test]
    async fn l1_does_not_cache_errors_and_forgets_on_invalidate() {
        let l1 = L1::new(100);
        let key = [2u8; 32];
        assert!(l1
            .get_or_load(key, async { Err::<Verdict, _>("down") })
            .await
            .is_err());
        assert_eq!(l1.get(&key).await, None);
        let v = accepted(10_000, 10_000);
        l1.get_or_load(key, async { Ok::<_, ()>(v) }).await.unwrap();
        l1.invalidate(&key).await;
        assert_eq!(l1.get(&key).await, None);
    }

    #[tokio::test]
    async fn seen_markers_expire() {
        let l1 = L1::new(100);
        let user = [3u8; 32];
        assert!(!l1.seen(&user).await);
        l1.mark_seen(user, Duration::from_millis(100)).await;
        assert!(l1.seen(&user).await);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!l1.seen(&user).await);
    }
}

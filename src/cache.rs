//! Verdict cache: keyed digests, the in-process L1 (moka) and the shared L2 (Redis).
//!
//! Rules (RFC 7662 section 4; see `docs/architecture.md`):
//! - Key = HMAC-SHA256(cache secret, version | domain | localpart | token), each part
//!   length-prefixed. Tokens never leave memory; a Redis dump cannot be checked against guessed
//!   tokens without the secret.
//! - Every entry carries an absolute expiry (ms since the Unix epoch); L1 and Redis entries expire
//!   at that instant (`SET ... PXAT`), so a read never extends a lifetime and a copy taken from
//!   Redis lives no longer than the original.
//! - Redis errors are returned to the engine, which degrades to L1 + provider; they never become
//!   verdicts.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use moka::future::Cache;
use moka::Expiry;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use sha2::Sha256;

use crate::extauth::Secret;
use crate::wire::Reason;

/// A 32-byte HMAC-SHA256 cache key.
pub type Key = [u8; 32];

/// Version mixed into every key: bump it to orphan all cached verdicts at once.
const KEY_VERSION: &[u8] = b"extauth-broker/verdict/v1";
/// Redis key prefix for verdicts; the rest is the hex digest.
const VERDICT_PREFIX: &str = "extauth:v1:verdict:";
/// Redis key prefix for "seen" markers (`isuser`); the rest is a digest of domain and user.
const SEEN_PREFIX: &str = "extauth:v1:seen:";

/// Derives cache keys with the cache secret.
#[derive(Clone)]
pub struct KeyDeriver {
    mac: Hmac<Sha256>,
}

impl KeyDeriver {
    /// A deriver keyed with `secret`.
    pub fn new(secret: &Secret) -> Self {
        let mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes any key length");
        KeyDeriver { mac }
    }

    /// The key of the verdict on `token` for `user@domain`.
    pub fn verdict(&self, domain: &str, user: &str, token: &str) -> Key {
        self.digest(&[KEY_VERSION, domain.as_bytes(), user.as_bytes(), token.as_bytes()])
    }

    /// The key of the "seen" marker of `user@domain`.
    pub fn seen(&self, domain: &str, user: &str) -> Key {
        self.digest(&[b"extauth-broker/seen/v1", domain.as_bytes(), user.as_bytes()])
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

/// A cached decision on one (domain, user, token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Accept the login?
    pub ok: bool,
    /// Why.
    pub reason: Reason,
    /// When the entry stops being valid, ms since the Unix epoch.
    pub expires_at_ms: u64,
}

impl Verdict {
    /// Time left before the entry expires (zero when already expired).
    pub fn remaining(&self) -> Duration {
        Duration::from_millis(self.expires_at_ms.saturating_sub(now_ms()))
    }

    /// Redis value: `ok|reason|expires_at_ms`, e.g. `1|accepted|1767225600000`. Holds no secret.
    fn to_redis(self) -> String {
        format!("{}|{}|{}", self.ok as u8, self.reason.as_str(), self.expires_at_ms)
    }

    /// Parses [`Verdict::to_redis`] output; `None` for anything else (treated as a miss).
    fn from_redis(value: &str) -> Option<Verdict> {
        let mut parts = value.split('|');
        let ok = match parts.next()? {
            "1" => true,
            "0" => false,
            _ => return None,
        };
        let reason = match parts.next()? {
            "accepted" if ok => Reason::Accepted,
            "inactive" => Reason::Inactive,
            "expired" => Reason::Expired,
            "wrong_user" => Reason::WrongUser,
            _ => return None,
        };
        if ok != (reason == Reason::Accepted) {
            return None;
        }
        let expires_at_ms = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some(Verdict { ok, reason, expires_at_ms })
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Makes each L1 entry expire at its verdict's own expiry; reads do not extend it.
struct VerdictExpiry;

impl Expiry<Key, Verdict> for VerdictExpiry {
    fn expire_after_create(&self, _key: &Key, verdict: &Verdict, _now: Instant) -> Option<Duration> {
        Some(verdict.remaining())
    }

    fn expire_after_update(&self, _key: &Key, verdict: &Verdict, _now: Instant, _left: Option<Duration>) -> Option<Duration> {
        Some(verdict.remaining())
    }
}

/// The in-process verdict cache. `get_or_load` is also the singleflight: concurrent loads of
/// one key run once and every caller gets the same result (moka `try_get_with`).
#[derive(Clone)]
pub struct L1 {
    verdicts: Cache<Key, Verdict>,
    seen: Cache<Key, ()>,
}

impl L1 {
    /// An empty cache of at most `capacity` verdicts; "seen" markers live `seen_ttl`.
    pub fn new(capacity: u64, seen_ttl: Duration) -> Self {
        L1 {
            verdicts: Cache::builder().max_capacity(capacity).expire_after(VerdictExpiry).build(),
            seen: Cache::builder().max_capacity(capacity).time_to_live(seen_ttl).build(),
        }
    }

    /// The cached verdict, if any and not expired.
    pub async fn get(&self, key: &Key) -> Option<Verdict> {
        self.verdicts.get(key).await.filter(|v| v.expires_at_ms > now_ms())
    }

    /// Returns the cached verdict or runs `load` once for all concurrent callers of `key`.
    /// `Ok` results are cached until their expiry; errors are shared with the waiters of this
    /// flight but not cached.
    pub async fn get_or_load<F, E>(&self, key: Key, load: F) -> Result<Verdict, Arc<E>>
    where
        F: std::future::Future<Output = Result<Verdict, E>>,
        E: Send + Sync + 'static,
    {
        self.verdicts.try_get_with(key, load).await
    }

    /// Marks `key`'s user as seen now.
    pub async fn mark_seen(&self, key: Key) {
        self.seen.insert(key, ()).await;
    }

    /// Was `key`'s user seen within the seen TTL (in this process)?
    pub async fn seen(&self, key: &Key) -> bool {
        self.seen.contains_key(key)
    }
}

/// The shared Redis cache (L2).
#[derive(Clone)]
pub struct Redis {
    conn: ConnectionManager,
}

impl Redis {
    /// Prepares a connection to `url` without waiting for Redis to be up: the manager connects in
    /// the background and reconnects by itself after errors. Each command is bounded by 1 s, so a
    /// hung Redis costs a login at most that.
    ///
    /// # Errors
    /// A malformed URL.
    pub fn new(url: &str) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Redis { conn })
    }

    /// Reads a verdict; a missing, expired or unparseable entry is `None`.
    ///
    /// # Errors
    /// Redis errors (connection refused, timeout, ...).
    pub async fn get(&self, key: &Key) -> redis::RedisResult<Option<Verdict>> {
        let value: Option<String> = self.conn.clone().get(verdict_key(key)).await?;
        Ok(value.as_deref().and_then(Verdict::from_redis).filter(|v| v.expires_at_ms > now_ms()))
    }

    /// Stores a verdict until its expiry (`SET key value PXAT expires_at_ms`).
    ///
    /// # Errors
    /// Redis errors, including a full (`noeviction`) or read-only Redis.
    pub async fn put(&self, key: &Key, verdict: Verdict) -> redis::RedisResult<()> {
        if verdict.expires_at_ms <= now_ms() {
            return Ok(());
        }
        redis::cmd("SET")
            .arg(verdict_key(key))
            .arg(verdict.to_redis())
            .arg("PXAT")
            .arg(verdict.expires_at_ms)
            .query_async(&mut self.conn.clone())
            .await
    }

    /// Marks a user as seen for `ttl`.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn mark_seen(&self, key: &Key, ttl: Duration) -> redis::RedisResult<()> {
        let key = format!("{SEEN_PREFIX}{}", hex::encode(key));
        self.conn.clone().set_ex(key, 1u8, ttl.as_secs().max(1)).await
    }

    /// Was the user seen within the seen TTL (by any broker)?
    ///
    /// # Errors
    /// Redis errors.
    pub async fn seen(&self, key: &Key) -> redis::RedisResult<bool> {
        self.conn.clone().exists(format!("{SEEN_PREFIX}{}", hex::encode(key))).await
    }
}

fn verdict_key(key: &Key) -> String {
    format!("{VERDICT_PREFIX}{}", hex::encode(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_bind_domain_user_and_token() {
        let d = KeyDeriver::new(&Secret::new("k".repeat(32)));
        let base = d.verdict("example.com", "alice", "tok");
        assert_eq!(base, d.verdict("example.com", "alice", "tok"));
        assert_ne!(base, d.verdict("example.com", "bob", "tok"));
        assert_ne!(base, d.verdict("example.org", "alice", "tok"));
        assert_ne!(base, d.verdict("example.com", "alice", "tok2"));
        assert_ne!(d.verdict("a", "bc", "t"), d.verdict("ab", "c", "t"));
        let other = KeyDeriver::new(&Secret::new("j".repeat(32)));
        assert_ne!(base, other.verdict("example.com", "alice", "tok"));
    }

    #[test]
    fn redis_values_round_trip_and_reject_garbage() {
        let v = Verdict { ok: true, reason: Reason::Accepted, expires_at_ms: 1_700_000_000_123 };
        assert_eq!(Verdict::from_redis(&v.to_redis()), Some(v));
        let n = Verdict { ok: false, reason: Reason::WrongUser, expires_at_ms: 5 };
        assert_eq!(Verdict::from_redis(&n.to_redis()), Some(n));
        for bad in ["", "1", "1|inactive|5", "0|accepted|5", "2|accepted|5", "1|accepted|x", "1|accepted|5|6"] {
            assert_eq!(Verdict::from_redis(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn l1_entries_expire_at_their_verdicts_expiry() {
        let l1 = L1::new(100, Duration::from_secs(60));
        let key = [1u8; 32];
        let v = Verdict { ok: true, reason: Reason::Accepted, expires_at_ms: now_ms() + 150 };
        let got = l1.get_or_load(key, async { Ok::<_, ()>(v) }).await.unwrap();
        assert_eq!(got, v);
        assert_eq!(l1.get(&key).await, Some(v));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(l1.get(&key).await, None);
    }

    #[tokio::test]
    async fn l1_does_not_cache_errors() {
        let l1 = L1::new(100, Duration::from_secs(60));
        let key = [2u8; 32];
        assert!(l1.get_or_load(key, async { Err::<Verdict, _>("down") }).await.is_err());
        assert_eq!(l1.get(&key).await, None);
    }
}

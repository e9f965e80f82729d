//! Revocation: per-user generation numbers, single-token deletion, and the Redis pub/sub
//! listener that makes every broker drop its in-process copies.
//!
//! "Every verdict of a user" is revoked in O(1): the user's generation number is part of every
//! verdict key, so one `INCR` orphans all of them (they expire by themselves). Brokers learn of a
//! revocation through pub/sub within milliseconds; if the subscription breaks they forget every
//! cached generation and in-process verdict when it comes back, so a missed message cannot keep a
//! revoked verdict alive.
//!
//! Messages on [`crate::cache::REVOKE_CHANNEL`]: `user <hex user key> <generation>` and
//! `token <hex verdict key>` (digests only, never a token).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use moka::future::Cache;
use tracing::{debug, info, warn};

use crate::cache::{Key, KeyDeriver, L1};
use crate::domain::normalise_localpart;
use crate::extauth::Secret;
use crate::store::{Redis, REVOKE_CHANNEL};

/// How long a generation read from Redis is trusted without a pub/sub message (a safety net for
/// messages lost while the subscription was being re-established).
const GENERATION_TTL: Duration = Duration::from_secs(30);

/// Per-user generation numbers: Redis is the source of truth when configured; this process
/// remembers the highest generation it has seen of each revoked user, so a Redis outage cannot
/// bring back a revoked user's old verdicts.
pub struct Generations {
    redis: Option<Redis>,
    cached: Cache<Key, u64>,
    highest: Mutex<HashMap<Key, u64>>,
}

impl Generations {
    /// Generations backed by `redis` (or by this process alone).
    pub fn new(redis: Option<Redis>) -> Self {
        Generations {
            redis,
            cached: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(GENERATION_TTL)
                .build(),
            highest: Mutex::new(HashMap::new()),
        }
    }

    /// The current generation of `user` (a [`crate::cache::KeyDeriver::user`] key).
    pub async fn get(&self, user: &Key) -> u64 {
        let known = self.highest(user);
        let Some(redis) = &self.redis else {
            return known;
        };
        if let Some(g) = self.cached.get(user).await {
            return g.max(known);
        }
        match redis.generation(user).await {
            Ok(g) => {
                self.cached.insert(*user, g).await;
                self.raise(user, g);
                g.max(known)
            }
            // Degraded: the highest generation this process has seen.
            Err(_) => known,
        }
    }

    /// Starts a new generation of `user`: in Redis (shared, announced) or in this process.
    ///
    /// # Errors
    /// Redis errors; nothing is changed then.
    pub async fn bump(&self, user: &Key) -> redis::RedisResult<u64> {
        let g = match &self.redis {
            Some(redis) => {
                let g = redis.bump_generation(user).await?;
                // Best effort: brokers that miss it re-read the generation within GENERATION_TTL.
                let _ = redis
                    .publish(&format!("user {} {g}", hex::encode(user)))
                    .await;
                g
            }
            None => self.highest(user) + 1,
        };
        self.learn(user, g).await;
        Ok(g)
    }

    /// Records a generation announced by another broker.
    pub async fn learn(&self, user: &Key, generation: u64) {
        self.raise(user, generation);
        self.cached.insert(*user, generation).await;
    }

    /// Forgets every cached generation (they are re-read from Redis).
    pub fn forget_cached(&self) {
        self.cached.invalidate_all();
    }

    fn highest(&self, user: &Key) -> u64 {
        self.highest
            .lock()
            .expect("generations")
            .get(user)
            .copied()
            .unwrap_or(0)
    }

    fn raise(&self, user: &Key, generation: u64) {
        if generation > 0 {
            let mut map = self.highest.lock().expect("generations");
            let entry = map.entry(*user).or_insert(0);
            *entry = (*entry).max(generation);
        }
    }
}

/// What to revoke: one token's verdict for `user@domain`, or (without a token) every verdict of
/// that user.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The XMPP domain (vhost).
    pub domain: &'a str,
    /// The localpart; normalised with nodeprep as ejabberd does, so `Alice` revokes `alice`.
    pub user: &'a str,
    /// The token, or `None` for every verdict of the user.
    pub token: Option<&'a Secret>,
}

/// Why a revocation failed.
#[derive(Debug)]
pub enum RevokeError {
    /// The user or domain cannot be a JID part.
    BadJid,
    /// Redis failed; nothing was revoked cluster-wide.
    Redis(redis::RedisError),
}

impl std::fmt::Display for RevokeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RevokeError::BadJid => f.write_str("the user or domain is not a valid JID part"),
            RevokeError::Redis(e) => {
                write!(f, "Redis failed, nothing was revoked cluster-wide: {e}")
            }
        }
    }
}

impl std::error::Error for RevokeError {}

/// Revokes `target`: bumps the user's generation (every verdict of the user, one `INCR`) or
/// deletes one verdict, announces it on pub/sub, and drops it from `l1` when given. Returns the
/// user's generation afterwards.
///
/// # Errors
/// [`RevokeError`].
pub async fn revoke(
    target: &Target<'_>,
    keys: &KeyDeriver,
    generations: &Generations,
    redis: Option<&Redis>,
    l1: Option<&L1>,
) -> Result<u64, RevokeError> {
    let user = normalise_localpart(target.user).ok_or(RevokeError::BadJid)?;
    let domain = stringprep::nameprep(target.domain).map_err(|_| RevokeError::BadJid)?;
    if domain.is_empty() {
        return Err(RevokeError::BadJid);
    }
    let user_key = keys.user(&domain, &user);
    let Some(token) = target.token else {
        let generation = generations
            .bump(&user_key)
            .await
            .map_err(RevokeError::Redis)?;
        info!(user = %user, domain = %domain, generation, "revoked every verdict of the user");
        return Ok(generation);
    };
    // The key depends on the current generation: with Redis, read it there (and fail loudly
    // rather than delete a key that was never used).
    let generation = match redis {
        Some(redis) => redis
            .generation(&user_key)
            .await
            .map_err(RevokeError::Redis)?,
        None => generations.get(&user_key).await,
    };
    let key = keys.verdict(&domain, &user, generation, token.expose());
    if let Some(redis) = redis {
        redis.delete(&key).await.map_err(RevokeError::Redis)?;
        let _ = redis.publish(&format!("token {}", hex::encode(key))).await;
    }
    if let Some(l1) = l1 {
        l1.invalidate(&key).await;
    }
    info!(user = %user, domain = %domain, "revoked one token's verdict");
    Ok(generation)
}

/// `extauth-broker revoke`: revokes through the shared Redis, so every broker drops the
/// verdicts within a second. Prints what was revoked.
///
/// # Errors
/// No Redis configured, a missing cache secret, an unreadable token file, a Redis failure.
pub async fn run_cli(args: crate::config::RevokeArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let file = crate::config::RunArgs {
        config: args.config,
        redis: args.redis,
        redis_mode: args.redis_mode,
        redis_master: args.redis_master,
        cache_secret_file: args.cache_secret_file,
        ..Default::default()
    }
    .with_file()?;
    let store = file.redis_config().context(
        "revoke works through the Redis the brokers share: give --redis (or --config). A broker without Redis \
         revokes through its admin endpoint: POST /revoke",
    )?;
    let secret_file = file
        .cache_secret_file
        .context("--cache-secret-file is required (the brokers' cache key secret)")?;
    let keys = KeyDeriver::new(&crate::config::read_secret(
        &secret_file,
        "--cache-secret-file",
    )?);
    let token = args
        .token_file
        .map(|p| crate::config::read_secret(&p, "--token-file"))
        .transpose()?;
    let redis = Redis::new(&store).await.context("--redis")?;
    let generations = Generations::new(Some(redis.clone()));
    let target = Target {
        domain: &args.domain,
        user: &args.user,
        token: token.as_ref(),
    };
    let generation = revoke(&target, &keys, &generations, Some(&redis), None).await?;
    match token {
        Some(_) => println!(
            "revoked one token of {}@{} (generation {generation})",
            args.user, args.domain
        ),
        None => println!(
            "revoked every verdict of {}@{} (now generation {generation})",
            args.user, args.domain
        ),
    }
    Ok(())
}

/// Listens to revocations from other brokers until the process ends, re-subscribing after
/// errors. Each (re)subscription after the first drops every in-process verdict and cached
/// generation, since messages may have been missed.
pub async fn listen(redis: Redis, generations: std::sync::Arc<Generations>, l1: L1) {
    let mut first = true;
    // Logged once per outage: the first failure warns, the retries (every second) do not.
    let mut down = false;
    loop {
        let subscribed = match pubsub(&redis).await {
            Ok(mut pubsub) => pubsub.subscribe(REVOKE_CHANNEL).await.map(|()| pubsub),
            Err(e) => Err(e),
        };
        match subscribed {
            Ok(mut pubsub) => {
                if !first {
                    info!("revocation channel back; dropping in-process verdicts that may have missed a revocation");
                    l1.invalidate_all();
                    generations.forget_cached();
                }
                (first, down) = (false, false);
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    if let Ok(text) = msg.get_payload::<String>() {
                        apply(&text, &generations, &l1).await;
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

/// Applies one revocation message.
async fn apply(message: &str, generations: &Generations, l1: &L1) {
    let mut parts = message.split(' ');
    match (parts.next(), parts.next().and_then(parse_key), parts.next()) {
        (Some("user"), Some(user), Some(g)) => {
            if let Ok(g) = g.parse() {
                generations.learn(&user, g).await;
            }
        }
        (Some("token"), Some(key), None) => l1.invalidate(&key).await,
        _ => warn!("ignoring a malformed revocation message"),
    }
}

fn parse_key(hex_key: &str) -> Option<Key> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut key).ok()?;
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_generations_only_grow() {
        let g = Generations::new(None);
        let user = [7u8; 32];
        assert_eq!(g.get(&user).await, 0);
        assert_eq!(g.bump(&user).await.unwrap(), 1);
        assert_eq!(g.bump(&user).await.unwrap(), 2);
        g.learn(&user, 1).await;
        assert_eq!(
            g.get(&user).await,
            2,
            "an old announcement never lowers a generation"
        );
        assert_eq!(g.get(&[8u8; 32]).await, 0);
    }

    #[tokio::test]
    async fn messages_are_applied_and_garbage_ignored() {
        let (g, l1) = (Generations::new(None), L1::new(10));
        let user = [9u8; 32];
        apply(&format!("user {} 5", hex::encode(user)), &g, &l1).await;
        assert_eq!(g.get(&user).await, 5);
        for bad in ["", "user", "user zz 1", "token 00", "revoke everything"] {
            apply(bad, &g, &l1).await;
        }
        assert_eq!(g.get(&user).await, 5);
    }
}

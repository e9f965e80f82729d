//! Revocation: marks that outlive every verdict they revoke, the procedure that sets them and
//! deletes the verdicts, and the listener that tells every broker.
//!
//! Revoking a user (or one token) records a mark, "every verdict on it issued up to instant T is
//! revoked", in Redis (sealed, for [`HORIZON`](crate::verdict::HORIZON)) and in this process (L1 keeps the marks next to
//! the verdicts they revoke: [`crate::cache::L1::note_user_mark`]), deletes the user's verdicts
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

use std::time::Duration;

use futures_util::StreamExt;
use tracing::{debug, info, warn};

use crate::cache::L1;
use crate::keys::KeyDeriver;
use crate::metrics;
use crate::store::{Hint, Redis, HINT_CHANNEL};
use crate::verdict::now_ms;
use extauth_protocol::extauth::Secret;

/// What to revoke: one token's verdict for `user@domain`, or (without a token) every verdict
/// naming that user.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    /// The XMPP domain (vhost).
    pub domain: &'a str,
    /// The localpart; normalised with nodeprep as ejabberd does, so `Alice` revokes `alice`.
    pub user: &'a str,
    /// The token, or `None` for every verdict of the user.
    pub token: Option<&'a Secret>,
}

/// What a revocation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Revoked {
    /// The instant of the marks, ms since the epoch (the Redis server's clock when shared).
    pub at_ms: u64,
    /// Verdicts deleted from Redis.
    pub dropped: usize,
}

/// Why a revocation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RevokeError {
    /// The user or domain cannot be a JID part.
    #[error("the user or domain is not a valid JID part")]
    BadJid,
    /// Redis failed; the revocation may be incomplete cluster-wide (run it again).
    #[error("Redis failed, the revocation may be incomplete cluster-wide (run it again): {0}")]
    Redis(#[from] redis::RedisError),
}

/// Revokes `target`: marks it in Redis and here, hints every broker, and deletes its verdicts
/// from Redis. The marks revoke; they are set and told first, so nothing a Redis writer put in
/// the user's index can keep brokers from learning of the revocation (deleting the verdicts only
/// matters if a writer deletes the mark later).
///
/// # Errors
/// [`RevokeError`]: a bad JID, or a Redis failure (the hint is best effort; everything else
/// must succeed for the revocation to be complete).
pub(crate) async fn revoke(
    target: &Target<'_>,
    keys: &KeyDeriver,
    redis: Option<&Redis>,
    l1: Option<&L1>,
) -> Result<Revoked, RevokeError> {
    let (user, domain) = normalise(target)?;
    let at_ms = match redis {
        Some(redis) => redis.time_ms().await?,
        None => now_ms(),
    };
    let user_key = keys.user(&domain, &user);
    let Some(token) = target.token else {
        if let Some(l1) = l1 {
            l1.note_user_mark(&user_key, at_ms);
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
        if let Some(l1) = l1 {
            l1.note_token_mark(&token_key, at_ms);
            l1.invalidate(&token_key);
        }
    }
    info!(user = %user, domain = %domain, "revoked one token's verdict");
    Ok(Revoked { at_ms, dropped })
}

/// The localpart and domain as ejabberd would send them (nodeprep, nameprep).
///
/// # Errors
/// [`RevokeError::BadJid`] when either cannot be a JID part.
pub(crate) fn normalise(target: &Target<'_>) -> Result<(String, String), RevokeError> {
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
pub(crate) async fn listen(redis: Redis, l1: L1) {
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
                        apply(hint, &l1);
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
fn apply(hint: Hint, l1: &L1) {
    match hint {
        Hint::User(user, at_ms) => l1.note_user_mark(&user, at_ms),
        Hint::Token(token, at_ms) => {
            l1.note_token_mark(&token, at_ms);
            l1.invalidate(&token);
        }
    }
    metrics::hint_applied();
}

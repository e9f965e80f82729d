//! The shared store in Redis (L2): verdicts, revocation marks, the per-user index of verdicts,
//! "seen" markers, flight locks and revocation hints, on a standalone server, behind Sentinel,
//! or on a Redis Cluster.
//!
//! Redis is untrusted storage. Every value the broker reads back is sealed ([`crate::seal`]):
//! authenticated with a key derived from the cache secret and bound to its key name and its
//! purpose; a value that fails is a miss, counted in `extauth_redis_rejected_total` and logged
//! at a bounded rate, never a verdict. Flight locks are the one unsealed value: they only make
//! brokers wait for one another, so a forged one costs time, never an answer.
//!
//! Every command is bounded (1 s to connect, 1 s per response) so a hung Redis costs a login at
//! most that; the engine turns every error into "degraded: L1 + provider".
//!
//! Keys (`<hex>` is a [`crate::keys`] digest, never a token or a name; `{...}` is the Redis
//! Cluster hash tag, so what a command reads together shares a slot):
//! - `extauth:v2:{t:<token>}:v` the verdict on a token, `...:r` its revocation mark,
//!   `...:l` its flight lock;
//! - `extauth:v2:{u:<user>}:r` a user's revocation mark, `...:i` the set of its tokens'
//!   keys (for revoking the user), `...:s` its "seen" marker;
//! - channel `extauth:v2:hints`: sealed revocation hints (`u <user> <ms>`, `t <token> <ms>`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, Cmd, FromRedisValue, RedisResult};
use serde::Deserialize;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::keys::{self, Key};
use crate::metrics;
use crate::seal::{Purpose, SealError, Sealer};
use crate::secrets::ConfigUrl;
use crate::throttle::Throttle;
use crate::verdict::{now_ms, parse_ms, Verdict, HORIZON};

/// Pub/sub channel on which brokers hint at revocations.
pub(crate) const HINT_CHANNEL: &str = "extauth:v2:hints";

/// Most index members one user revocation examines: a Redis writer could stuff the index, and
/// the user's mark revokes whatever is not deleted.
pub(crate) const MAX_REVOKED_PER_USER: usize = 100_000;

/// Key names.
mod names {
    use crate::keys::Key;

    fn token(token: &Key, suffix: &str) -> String {
        format!("extauth:v2:{{t:{}}}:{suffix}", hex::encode(token))
    }

    fn user(user: &Key, suffix: &str) -> String {
        format!("extauth:v2:{{u:{}}}:{suffix}", hex::encode(user))
    }

    pub(super) fn verdict(t: &Key) -> String {
        token(t, "v")
    }

    pub(super) fn token_mark(t: &Key) -> String {
        token(t, "r")
    }

    pub(super) fn lock(t: &Key) -> String {
        token(t, "l")
    }

    pub(super) fn user_mark(u: &Key) -> String {
        user(u, "r")
    }

    pub(super) fn user_index(u: &Key) -> String {
        user(u, "i")
    }

    pub(super) fn seen(u: &Key) -> String {
        user(u, "s")
    }
}

/// What Redis holds about a token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stored {
    /// The verdict, if present and authentic.
    pub verdict: Option<Verdict>,
    /// The token's revocation mark (ms since the epoch), if present and authentic.
    pub token_mark: Option<u64>,
}

/// A revocation hint: a revocation mark, sent to every broker. It carries the mark's instant, so
/// a broker keeps the mark from the hint alone: a writer who deletes the mark in Redis the moment
/// it is written cannot keep it from running brokers. Sealed like the mark, it can only be
/// replayed, which repeats a revocation that happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// Verdicts naming this user issued up to this instant (ms since the epoch) are revoked.
    User(Key, u64),
    /// Verdicts on this token issued up to this instant (ms since the epoch) are revoked.
    Token(Key, u64),
}

impl Hint {
    /// The payload (before sealing): `u <user key hex> <ms>` or `t <token key hex> <ms>`.
    pub fn to_payload(self) -> String {
        match self {
            Hint::User(k, at_ms) => format!("u {} {at_ms}", hex::encode(k)),
            Hint::Token(k, at_ms) => format!("t {} {at_ms}", hex::encode(k)),
        }
    }

    /// Parses [`Hint::to_payload`] output; `None` for anything else.
    pub fn from_payload(payload: &str) -> Option<Hint> {
        let mut parts = payload.split(' ');
        let (kind, key, at_ms) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let (key, at_ms) = (keys::parse_hex(key)?, parse_ms(at_ms)?);
        match kind {
            "u" => Some(Hint::User(key, at_ms)),
            "t" => Some(Hint::Token(key, at_ms)),
            _ => None,
        }
    }
}

/// A value the broker did not believe, for `extauth_redis_rejected_total{kind}` and the log.
#[derive(Debug, Clone, Copy)]
enum Rejected {
    /// A sealed value (verdict, mark, "seen" marker, hint) that is not UTF-8, not a string, or
    /// whose seal or payload fails.
    Sealed(Purpose),
    /// A user's index of tokens that is not a set (its members are not sealed: they only say
    /// which verdicts a revocation deletes).
    Index,
}

impl Rejected {
    fn as_str(self) -> &'static str {
        match self {
            Rejected::Sealed(purpose) => purpose.as_str(),
            Rejected::Index => "index",
        }
    }

    /// Its log gate in [`Rejections`].
    fn gate(self) -> usize {
        match self {
            Rejected::Sealed(purpose) => purpose as usize,
            Rejected::Index => 5,
        }
    }
}

/// Is `e` Redis's answer for a key that holds another type than the command needs
/// (`WRONGTYPE`)? Only someone else writes such values under the broker's keys: it is a planted
/// value, to reject like a forged one, not a Redis failure.
fn planted(e: &redis::RedisError) -> bool {
    e.code() == Some("WRONGTYPE")
}

/// Counts rejected values, and logs them at most once per 10 s per kind, so a flood of forged
/// values cannot flood the log.
struct Rejections {
    /// One gate per [`Rejected::gate`].
    gates: [Throttle; 6],
}

impl Default for Rejections {
    fn default() -> Self {
        Rejections {
            gates: std::array::from_fn(|_| Throttle::new(Duration::from_secs(10))),
        }
    }
}

impl Rejections {
    fn note(&self, rejected: Rejected, why: &str) {
        metrics::redis_rejected(rejected.as_str());
        if self.gates[rejected.gate()].allow() {
            warn!(
                kind = rejected.as_str(),
                "ignored a Redis value: {why}; someone without the cache secret may be writing to \
                 Redis, or brokers use different cache secrets (see extauth_redis_rejected_total)"
            );
        }
    }
}

/// Bound on connecting and on each response.
const TIMEOUT: Duration = Duration::from_secs(1);

/// How Redis is deployed (`--redis-mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One server (`--redis redis://HOST:PORT/DB`).
    #[default]
    Standalone,
    /// Sentinels that name the master (`--redis` lists the sentinels, `--redis-master` the service).
    Sentinel,
    /// A Redis Cluster (`--redis` lists seed nodes).
    Cluster,
}

/// Where the shared store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedisConfig {
    /// Deployment kind.
    pub mode: RedisMode,
    /// `redis://` or `rediss://` URLs: the server, the sentinels, or cluster seed nodes.
    pub urls: Vec<ConfigUrl>,
    /// Sentinel service (master group) name.
    pub master: String,
}

/// The URLs as configured, credentials included, for the redis crate.
fn exposed(urls: &[ConfigUrl]) -> Vec<String> {
    urls.iter().map(|u| u.expose().to_owned()).collect()
}

/// A connection to the shared store; cheap to clone.
#[derive(Clone)]
pub(crate) struct Redis {
    backend: Backend,
    gate: Arc<Gate>,
    sealer: Sealer,
    rejections: Arc<Rejections>,
}

/// After a connection-level failure, Redis is skipped for [`RETRY_AFTER`] (one probe call is let
/// through per period), so a hung or dead Redis costs a login at most one timeout per period
/// instead of one per command.
#[derive(Default)]
struct Gate {
    /// Before this instant (ms since the epoch) calls are skipped; 0 = Redis is up.
    closed_until_ms: AtomicU64,
}

/// How long Redis is skipped after a connection-level failure.
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl Gate {
    /// May a call go to Redis now? While closed, the first caller after each period probes.
    fn admit(&self) -> bool {
        let until = self.closed_until_ms.load(Ordering::Acquire);
        let now = now_ms();
        if until == 0 {
            return true;
        }
        until <= now
            && self
                .closed_until_ms
                .compare_exchange(
                    until,
                    now + RETRY_AFTER.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    fn record<T>(&self, result: &RedisResult<T>) {
        match result {
            Err(e) if is_connection_error(e) => self
                .closed_until_ms
                .store(now_ms() + RETRY_AFTER.as_millis() as u64, Ordering::Release),
            // A server answer (even an error such as OOM or READONLY) proves the connection.
            _ => self.closed_until_ms.store(0, Ordering::Release),
        }
    }
}

fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal()
}

#[derive(Clone)]
enum Backend {
    /// Reconnects by itself after errors (the failing call still returns its error).
    Standalone {
        conn: ConnectionManager,
        client: Client,
    },
    /// Follows slot moves and node failures by itself.
    Cluster {
        conn: ClusterConnection,
        seeds: Vec<ConfigUrl>,
    },
    /// The redis crate does not follow a failover: the master is re-resolved through the
    /// sentinels after every connection-level error.
    Sentinel {
        sentinel: Arc<Mutex<SentinelClient>>,
        master: Arc<Mutex<Option<(Client, MultiplexedConnection)>>>,
    },
}

impl Redis {
    /// Prepares the connection without waiting for Redis to be up (a broker starts while Redis
    /// is down, and connects when it comes back). `sealer` seals what is written and opens what
    /// is read back.
    ///
    /// # Errors
    /// Malformed URLs; for a cluster, no reachable seed node.
    pub(crate) async fn new(config: &RedisConfig, sealer: Sealer) -> RedisResult<Self> {
        let backend = match config.mode {
            RedisMode::Standalone => {
                let client = Client::open(
                    config
                        .urls
                        .first()
                        .map(ConfigUrl::expose)
                        .unwrap_or_default(),
                )?;
                let settings = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(TIMEOUT))
                    .set_response_timeout(Some(TIMEOUT))
                    .set_number_of_retries(1);
                let conn = ConnectionManager::new_lazy_with_config(client.clone(), settings)?;
                Backend::Standalone { conn, client }
            }
            RedisMode::Cluster => {
                let client = ClusterClientBuilder::new(exposed(&config.urls))
                    .connection_timeout(TIMEOUT)
                    .response_timeout(TIMEOUT)
                    .build()?;
                Backend::Cluster {
                    conn: client.get_async_connection().await?,
                    seeds: config.urls.clone(),
                }
            }
            RedisMode::Sentinel => {
                let sentinel = SentinelClient::build(
                    exposed(&config.urls),
                    config.master.clone(),
                    None,
                    SentinelServerType::Master,
                )?;
                Backend::Sentinel {
                    sentinel: Arc::new(Mutex::new(sentinel)),
                    master: Arc::new(Mutex::new(None)),
                }
            }
        };
        Ok(Redis {
            backend,
            gate: Arc::default(),
            sealer,
            rejections: Arc::default(),
        })
    }

    /// Runs one command.
    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        if !self.gate.admit() {
            return Err((
                redis::ErrorKind::Io,
                "Redis skipped: it failed within the last second",
            )
                .into());
        }
        let result = self.send(cmd).await;
        self.gate.record(&result);
        result
    }

    async fn send<T: FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        match &self.backend {
            Backend::Standalone { conn, .. } => match cmd.query_async(&mut conn.clone()).await {
                // A connection that died with a restarted Redis fails its first command, and the
                // manager reconnects behind it: one more try tells a dead socket from a dead
                // Redis. Repeating a command the store sends is harmless: reads and idempotent
                // writes, a hint published twice, and a flight lock the first try took reads as
                // held by another broker, which the flight already handles (it waits, then asks).
                Err(e) if e.is_connection_dropped() => cmd.query_async(&mut conn.clone()).await,
                result => result,
            },
            Backend::Cluster { conn, .. } => cmd.query_async(&mut conn.clone()).await,
            Backend::Sentinel { sentinel, master } => {
                let mut conn = sentinel_master(sentinel, master).await?.1;
                let result = cmd.query_async(&mut conn).await;
                if let Err(e) = &result {
                    if is_connection_error(e) || e.code() == Some("READONLY") {
                        // The master may have moved: ask the sentinels again next time.
                        master.lock().await.take();
                    }
                }
                result
            }
        }
    }

    /// A client for a dedicated pub/sub connection: the server, the current master, or a
    /// cluster node (Redis Cluster forwards every PUBLISH to all nodes).
    ///
    /// # Errors
    /// No reachable node or master.
    pub(crate) async fn pubsub_client(&self) -> RedisResult<Client> {
        match &self.backend {
            Backend::Standalone { client, .. } => Ok(client.clone()),
            Backend::Cluster { seeds, .. } => {
                let mut last = None;
                for seed in seeds {
                    match Client::open(seed.expose()) {
                        Ok(c) => match c.get_multiplexed_async_connection().await {
                            Ok(_) => return Ok(c),
                            Err(e) => last = Some(e),
                        },
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    (
                        redis::ErrorKind::InvalidClientConfig,
                        "no cluster seed node",
                    )
                        .into()
                }))
            }
            Backend::Sentinel { sentinel, master } => {
                Ok(sentinel_master(sentinel, master).await?.0)
            }
        }
    }

    /// The verdict on `token` and the token's revocation mark, in one round trip (`MGET`; both
    /// keys share a hash slot). A value whose seal fails is a miss, counted and logged.
    ///
    /// # Errors
    /// Redis errors (connection refused, timeout, ...).
    pub(crate) async fn verdict(&self, token: &Key) -> RedisResult<Stored> {
        let (verdict_name, mark_name) = (names::verdict(token), names::token_mark(token));
        // Bytes: a value that is not UTF-8 is rejected like any other, not a failed read. (MGET
        // answers nil for a key of another type.)
        let (verdict, mark): (Option<Vec<u8>>, Option<Vec<u8>>) = self
            .query(redis::cmd("MGET").arg(&verdict_name).arg(&mark_name))
            .await?;
        Ok(Stored {
            verdict: verdict
                .and_then(|v| self.open(Purpose::Entry, &verdict_name, &v, Verdict::from_payload)),
            token_mark: mark.and_then(|v| self.open(Purpose::TokenMark, &mark_name, &v, parse_ms)),
        })
    }

    /// Stores a verdict until its usable end (`SET ... PXAT`), and indexes a valid token under
    /// the user it names, so that revoking the user can find it.
    ///
    /// # Errors
    /// Redis errors, including a full (`noeviction`) or read-only Redis.
    pub(crate) async fn put_verdict(&self, token: &Key, verdict: &Verdict) -> RedisResult<()> {
        if !verdict.is_usable_at(now_ms()) {
            return Ok(());
        }
        let name = names::verdict(token);
        let value = self
            .sealer
            .seal(Purpose::Entry, &name, &verdict.to_payload());
        self.query::<()>(
            redis::cmd("SET")
                .arg(&name)
                .arg(value)
                .arg("PXAT")
                .arg(verdict.usable_until_ms),
        )
        .await?;
        if let Some(user) = verdict.named_user() {
            let index = names::user_index(user);
            let added = self
                .query::<()>(redis::cmd("SADD").arg(&index).arg(hex::encode(token)))
                .await;
            if let Err(e) = added {
                if !planted(&e) {
                    return Err(e);
                }
                // Unindexed, the verdict is still revoked by the user's mark.
                self.rejections
                    .note(Rejected::Index, "a user's index is not a set");
                return Ok(());
            }
            self.query::<()>(
                redis::cmd("PEXPIRE")
                    .arg(&index)
                    .arg(HORIZON.as_millis() as u64),
            )
            .await?;
        }
        Ok(())
    }

    /// Deletes the verdict on `token`; returns 1 if there was one, else 0.
    ///
    /// # Errors
    /// Redis errors.
    pub(crate) async fn delete_verdict(&self, token: &Key) -> RedisResult<usize> {
        self.query(redis::cmd("DEL").arg(names::verdict(token)))
            .await
    }

    /// The user's revocation mark (ms since the epoch), if any.
    ///
    /// # Errors
    /// Redis errors.
    pub(crate) async fn user_mark(&self, user: &Key) -> RedisResult<Option<u64>> {
        self.get_sealed(Purpose::UserMark, &names::user_mark(user), parse_ms)
            .await
    }

    /// The token's revocation mark (ms since the epoch), if any.
    ///
    /// # Errors
    /// Redis errors.
    pub(crate) async fn token_mark(&self, token: &Key) -> RedisResult<Option<u64>> {
        self.get_sealed(Purpose::TokenMark, &names::token_mark(token), parse_ms)
            .await
    }

    /// Records that every verdict on the user issued up to `at_ms` is revoked; the mark lives
    /// [`HORIZON`], longer than any verdict it revokes.
    ///
    /// # Errors
    /// Redis errors.
    pub(crate) async fn mark_user_revoked(&self, user: &Key, at_ms: u64) -> RedisResult<()> {
        self.set_mark(Purpose::UserMark, &names::user_mark(user), at_ms)
            .await
    }

    /// Records that the verdict on the token issued up to `at_ms` is revoked.
    ///
    /// # Errors
    /// Redis errors.
    pub(crate) async fn mark_token_revoked(&self, token: &Key, at_ms: u64) -> RedisResult<()> {
        self.set_mark(Purpose::TokenMark, &names::token_mark(token), at_ms)
            .await
    }

    async fn set_mark(&self, purpose: Purpose, name: &str, at_ms: u64) -> RedisResult<()> {
        let value = self.sealer.seal(purpose, name, &at_ms.to_string());
        self.query(
            redis::cmd("SET")
                .arg(name)
                .arg(value)
                .arg("PX")
                .arg(HORIZON.as_millis() as u64),
        )
        .await
    }

    /// Deletes every verdict indexed under the user (examining at most
    /// [`MAX_REVOKED_PER_USER`] members), then the index. Members that are not token keys, and an
    /// index that is not a set (a Redis writer's work), are skipped. Returns how many verdicts
    /// were deleted.
    ///
    /// # Errors
    /// Redis errors; some verdicts may have been deleted already.
    pub(crate) async fn drop_user_verdicts(&self, user: &Key) -> RedisResult<usize> {
        let index = names::user_index(user);
        let (mut cursor, mut examined, mut dropped) = (0u64, 0, 0);
        loop {
            let page = self
                .query::<(u64, Vec<Vec<u8>>)>(
                    redis::cmd("SSCAN")
                        .arg(&index)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(500),
                )
                .await;
            let (next, members) = match page {
                Ok(page) => page,
                Err(e) if planted(&e) => {
                    self.rejections
                        .note(Rejected::Index, "a user's index is not a set");
                    break;
                }
                Err(e) => return Err(e),
            };
            examined += members.len();
            let tokens = members
                .iter()
                .filter_map(|m| keys::parse_hex(std::str::from_utf8(m).ok()?));
            for token in tokens {
                dropped += self.delete_verdict(&token).await?;
            }
            cursor = next;
            if cursor == 0 || examined >= MAX_REVOKED_PER_USER {
                break;
            }
        }
        self.query::<()>(redis::cmd("DEL").arg(&index)).await?;
        Ok(dropped)
    }

    /// Marks a user as seen until `until_ms`.
    ///
    /// # Errors
    /// Redis errors.
    pub(crate) async fn mark_seen(&self, user: &Key, until_ms: u64) -> RedisResult<()> {
        let name = names::seen(user);
        let value = self
            .sealer
            .seal(Purpose::Seen, &name, &until_ms.to_string());
        self.query(
            redis::cmd("SET")
                .arg(&name)
                .arg(value)
                .arg("PXAT")
                .arg(until_ms),
        )
        .await
    }

    /// Was the user seen (by any broker) within a "seen" marker that has not ended?
    ///
    /// # Errors
    /// Redis errors.
    pub(crate) async fn seen(&self, user: &Key) -> RedisResult<bool> {
        let until = self
            .get_sealed(Purpose::Seen, &names::seen(user), parse_ms)
            .await?;
        Ok(until.is_some_and(|until| until > now_ms()))
    }

    /// Tries to take the flight lock of `token` for `ttl` (`SET NX PX`); true when taken.
    ///
    /// The lock only coordinates: a Redis writer who sets or deletes locks costs waiting time or
    /// an extra provider call, never a verdict.
    ///
    /// # Errors
    /// Redis errors.
    pub(crate) async fn lock(&self, token: &Key, owner: &str, ttl: Duration) -> RedisResult<bool> {
        let set: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(names::lock(token))
                    .arg(owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64),
            )
            .await?;
        Ok(set.is_some())
    }

    /// Is the flight lock of `token` still held (by anyone)?
    ///
    /// # Errors
    /// Redis errors.
    pub(crate) async fn locked(&self, token: &Key) -> RedisResult<bool> {
        self.query(redis::cmd("EXISTS").arg(names::lock(token)))
            .await
    }

    /// Releases the flight lock of `token`. If it expired and another broker took it, that
    /// broker loses it early: at worst one extra provider call, never a wrong verdict.
    ///
    /// # Errors
    /// Redis errors.
    pub(crate) async fn unlock(&self, token: &Key) -> RedisResult<()> {
        self.query(redis::cmd("DEL").arg(names::lock(token))).await
    }

    /// Publishes a sealed revocation hint on [`HINT_CHANNEL`].
    ///
    /// # Errors
    /// Redis errors.
    pub(crate) async fn publish(&self, hint: Hint) -> RedisResult<()> {
        let message = self
            .sealer
            .seal(Purpose::Hint, HINT_CHANNEL, &hint.to_payload());
        self.query(redis::cmd("PUBLISH").arg(HINT_CHANNEL).arg(message))
            .await
    }

    /// Opens a message received on [`HINT_CHANNEL`]; `None` (counted and logged) for anything
    /// not sealed by a broker holding the cache secret.
    pub(crate) fn open_hint(&self, message: &[u8]) -> Option<Hint> {
        self.open(Purpose::Hint, HINT_CHANNEL, message, Hint::from_payload)
    }

    /// The Redis server's clock, ms since the epoch (`TIME`): revocation marks are stamped with
    /// it, so an operator host with a wrong clock cannot misplace them.
    ///
    /// # Errors
    /// Redis errors.
    pub(crate) async fn time_ms(&self) -> RedisResult<u64> {
        let (secs, micros): (u64, u64) = self.query(&redis::cmd("TIME")).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Reads the sealed value under `name` (`GET`) and parses it; a value of another type is
    /// rejected like a forged one (counted, logged at a bounded rate): a miss, not an error.
    async fn get_sealed<T>(
        &self,
        purpose: Purpose,
        name: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> RedisResult<Option<T>> {
        match self
            .query::<Option<Vec<u8>>>(redis::cmd("GET").arg(name))
            .await
        {
            Ok(value) => Ok(value.and_then(|v| self.open(purpose, name, &v, parse))),
            Err(e) if planted(&e) => {
                self.rejections
                    .note(Rejected::Sealed(purpose), "it is not a string");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens a sealed value and parses its payload; a failure is counted and logged (at a
    /// bounded rate), and is a miss.
    fn open<T>(
        &self,
        purpose: Purpose,
        name: &str,
        value: &[u8],
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Option<T> {
        let parsed = match std::str::from_utf8(value).map(|v| self.sealer.open(purpose, name, v)) {
            Err(_) => Err("it is not UTF-8"),
            Ok(Ok(payload)) => parse(payload).ok_or("its payload does not parse"),
            Ok(Err(SealError::Malformed)) => Err("it carries no well-formed tag"),
            Ok(Err(SealError::BadTag)) => Err("its tag does not match (forged, altered or moved)"),
        };
        parsed
            .map_err(|why| self.rejections.note(Rejected::Sealed(purpose), why))
            .ok()
    }
}

/// A Redis operation, for metrics (`extauth_redis_errors_total{op}`) and outage logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// Reading a verdict (and its token's mark).
    Read,
    /// Writing a verdict.
    Write,
    /// Reading a revocation mark.
    MarkRead,
    /// Taking a flight lock.
    Lock,
    /// Checking a flight lock.
    LockCheck,
    /// Releasing a flight lock.
    Unlock,
    /// Reading a "seen" marker.
    SeenRead,
    /// Writing a "seen" marker.
    SeenWrite,
}

impl Op {
    /// The metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::MarkRead => "mark_read",
            Op::Lock => "lock",
            Op::LockCheck => "lock_check",
            Op::Unlock => "unlock",
            Op::SeenRead => "seen_read",
            Op::SeenWrite => "seen_write",
        }
    }

    /// Whether the operation writes (a full or read-only Redis fails writes only); `None` for
    /// one whose success proves nothing about its class (a `DEL` works on a full Redis).
    fn writes(self) -> Option<bool> {
        match self {
            Op::Unlock => None,
            Op::Write | Op::SeenWrite | Op::Lock => Some(true),
            Op::Read | Op::MarkRead | Op::LockCheck | Op::SeenRead => Some(false),
        }
    }
}

/// What is known to fail in Redis, so each outage is logged (and shown in `extauth_redis_up`)
/// once, not once per request. A lost connection affects everything; a server that refuses
/// writes (full, read-only) still answers reads, so reads and writes are tracked apart.
pub(crate) struct Health {
    connection: AtomicBool,
    reads: AtomicBool,
    writes: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            connection: AtomicBool::new(true),
            reads: AtomicBool::new(true),
            writes: AtomicBool::new(true),
        }
    }
}

impl Health {
    /// The value of a successful operation; `None` (counted, logged once per outage) on error.
    /// Every caller treats `None` as "degraded: L1 + provider", never as a verdict.
    pub(crate) fn check<T>(&self, op: Op, result: RedisResult<T>) -> Option<T> {
        match result {
            Ok(v) => {
                self.recovered(op);
                Some(v)
            }
            Err(e) => {
                metrics::redis_error(op.as_str());
                self.failed(op, &e);
                None
            }
        }
    }

    fn class(&self, op: Op) -> Option<(&'static str, &AtomicBool)> {
        match op.writes()? {
            true => Some(("write", &self.writes)),
            false => Some(("read", &self.reads)),
        }
    }

    fn failed(&self, op: Op, e: &redis::RedisError) {
        let (class, flag) = match (is_connection_error(e), self.class(op)) {
            (false, Some(class)) => class,
            _ => ("connection", &self.connection),
        };
        if flag.swap(false, Ordering::Relaxed) {
            metrics::redis_up(class, false);
            warn!(kind = ?e.kind(), "Redis {} failed, serving from the in-process cache and the provider until it is back: {e}", op.as_str());
        } else {
            tracing::debug!(kind = ?e.kind(), "Redis {} failed again", op.as_str());
        }
    }

    fn recovered(&self, op: Op) {
        if !self.connection.swap(true, Ordering::Relaxed) {
            metrics::redis_up("connection", true);
            info!("Redis is reachable again; sharing verdicts");
        }
        if let Some((class, flag)) = self.class(op) {
            if !flag.swap(true, Ordering::Relaxed) {
                metrics::redis_up(class, true);
                info!("Redis {class}s work again");
            }
        }
    }
}

/// The current master's client and connection, asking the sentinels when there is none.
async fn sentinel_master(
    sentinel: &Mutex<SentinelClient>,
    master: &Mutex<Option<(Client, MultiplexedConnection)>>,
) -> RedisResult<(Client, MultiplexedConnection)> {
    let mut current = master.lock().await;
    if let Some(found) = current.as_ref() {
        return Ok(found.clone());
    }
    let client = tokio::time::timeout(TIMEOUT * 2, sentinel.lock().await.async_get_client())
        .await
        .map_err(|_| {
            redis::RedisError::from((redis::ErrorKind::Io, "sentinels did not answer in time"))
        })??;
    let settings = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    let conn = client
        .get_multiplexed_async_connection_with_config(&settings)
        .await?;
    info!(master = ?client.get_connection_info().addr(), "Redis master resolved through the sentinels");
    *current = Some((client.clone(), conn.clone()));
    Ok((client, conn))
}

//! The shared store in Redis (L2): verdicts, "seen" markers, generations, flight locks and
//! revocation messages, on a standalone server, behind Sentinel, or on a Redis Cluster.
//!
//! Every command is bounded (1 s to connect, 1 s per response) so a hung Redis costs a login at
//! most that; the engine turns every error into "degraded: L1 + provider". Each command touches
//! one key, so Redis Cluster needs no hash tags (nothing is pipelined across keys).
//!
//! Keys (`<hex>` is an HMAC digest, never a token): `extauth:v1:verdict:<hex>`,
//! `extauth:v1:seen:<hex>`, `extauth:v1:gen:<hex>`, `extauth:v1:lock:<hex>`; channel
//! `extauth:v1:revoke`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, Cmd, FromRedisValue, RedisResult};
use serde::Deserialize;
use tokio::sync::Mutex;
use tracing::info;

use crate::cache::{now_ms, Key, Verdict};
use crate::config::ConfigUrl;

const VERDICT_PREFIX: &str = "extauth:v1:verdict:";
const SEEN_PREFIX: &str = "extauth:v1:seen:";
const GENERATION_PREFIX: &str = "extauth:v1:gen:";
const LOCK_PREFIX: &str = "extauth:v1:lock:";
/// Pub/sub channel on which revocations are announced to every broker.
pub const REVOKE_CHANNEL: &str = "extauth:v1:revoke";

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
pub struct RedisConfig {
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
pub struct Redis {
    backend: Backend,
    gate: Arc<Gate>,
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
    /// is down, and connects when it comes back).
    ///
    /// # Errors
    /// Malformed URLs; for a cluster, no reachable seed node.
    pub async fn new(config: &RedisConfig) -> RedisResult<Self> {
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
            Backend::Standalone { conn, .. } => cmd.query_async(&mut conn.clone()).await,
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
    pub async fn pubsub_client(&self) -> RedisResult<Client> {
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

    /// Reads a verdict; a missing, unusable or unparseable entry is `None` (a stale but usable
    /// one is returned: the caller checks [`Verdict::is_fresh`]).
    ///
    /// # Errors
    /// Redis errors (connection refused, timeout, ...).
    pub async fn get(&self, key: &Key) -> RedisResult<Option<Verdict>> {
        let value: Option<String> = self
            .query(redis::cmd("GET").arg(prefixed(VERDICT_PREFIX, key)))
            .await?;
        Ok(value
            .as_deref()
            .and_then(Verdict::from_redis)
            .filter(|v| v.usable_until_ms > now_ms()))
    }

    /// Stores a verdict until its usable end (`SET key value PXAT usable_until_ms`).
    ///
    /// # Errors
    /// Redis errors, including a full (`noeviction`) or read-only Redis.
    pub async fn put(&self, key: &Key, verdict: Verdict) -> RedisResult<()> {
        if verdict.usable_until_ms <= now_ms() {
            return Ok(());
        }
        let cmd = redis::cmd("SET")
            .arg(prefixed(VERDICT_PREFIX, key))
            .arg(verdict.to_redis())
            .arg("PXAT")
            .arg(verdict.usable_until_ms)
            .clone();
        self.query(&cmd).await
    }

    /// Deletes a verdict (revocation of one token).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn delete(&self, key: &Key) -> RedisResult<()> {
        self.query(redis::cmd("DEL").arg(prefixed(VERDICT_PREFIX, key)))
            .await
    }

    /// Marks a user as seen for `ttl`.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn mark_seen(&self, user: &Key, ttl: Duration) -> RedisResult<()> {
        self.query(
            redis::cmd("SET")
                .arg(prefixed(SEEN_PREFIX, user))
                .arg(1)
                .arg("EX")
                .arg(ttl.as_secs().max(1)),
        )
        .await
    }

    /// Was the user seen within the seen TTL (by any broker)?
    ///
    /// # Errors
    /// Redis errors.
    pub async fn seen(&self, user: &Key) -> RedisResult<bool> {
        self.query(redis::cmd("EXISTS").arg(prefixed(SEEN_PREFIX, user)))
            .await
    }

    /// The user's generation (0 when never revoked).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn generation(&self, user: &Key) -> RedisResult<u64> {
        let g: Option<u64> = self
            .query(redis::cmd("GET").arg(prefixed(GENERATION_PREFIX, user)))
            .await?;
        Ok(g.unwrap_or(0))
    }

    /// Bumps the user's generation (`INCR`), orphaning every verdict of that user at once.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn bump_generation(&self, user: &Key) -> RedisResult<u64> {
        self.query(redis::cmd("INCR").arg(prefixed(GENERATION_PREFIX, user)))
            .await
    }

    /// Tries to take the flight lock of `key` for `ttl` (`SET NX PX`); true when taken.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn lock(&self, key: &Key, owner: &str, ttl: Duration) -> RedisResult<bool> {
        let cmd = redis::cmd("SET")
            .arg(prefixed(LOCK_PREFIX, key))
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .clone();
        let set: Option<String> = self.query(&cmd).await?;
        Ok(set.is_some())
    }

    /// Is the flight lock of `key` still held (by anyone)?
    ///
    /// # Errors
    /// Redis errors.
    pub async fn locked(&self, key: &Key) -> RedisResult<bool> {
        self.query(redis::cmd("EXISTS").arg(prefixed(LOCK_PREFIX, key)))
            .await
    }

    /// Releases the flight lock of `key`. If it expired and another broker took it, that broker
    /// loses it early: at worst one extra provider call, never a wrong verdict.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn unlock(&self, key: &Key) -> RedisResult<()> {
        self.query(redis::cmd("DEL").arg(prefixed(LOCK_PREFIX, key)))
            .await
    }

    /// Publishes a revocation message on [`REVOKE_CHANNEL`].
    ///
    /// # Errors
    /// Redis errors.
    pub async fn publish(&self, message: &str) -> RedisResult<()> {
        self.query(redis::cmd("PUBLISH").arg(REVOKE_CHANNEL).arg(message))
            .await
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

fn prefixed(prefix: &str, key: &Key) -> String {
    format!("{prefix}{}", hex::encode(key))
}

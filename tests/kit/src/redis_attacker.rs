//! The attacker of `tests/integration/redis_attacks.rs`: full access to the brokers' Redis (any command), but
//! not the cache secret.
//!
//! It finds what the brokers store the way a real attacker would, by looking: a verdict is any
//! string value with at least four `|`-separated fields (`v|ok|reason|user|issued|fresh|usable|exp|tag`
//! today, `ok|reason|fresh|usable` in the v1 format), whatever its key is called; everything else
//! a broker writes (revocation marks, "seen" markers, indexes, locks) is revocation or
//! bookkeeping state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use redis::{Connection, ToRedisArgs, Value};

use super::services::Redis;

/// A connection to Redis with no secret.
pub struct Attacker {
    con: Connection,
    url: String,
}

/// Key -> value of every verdict-shaped string in Redis.
pub type Verdicts = BTreeMap<String, String>;

impl Attacker {
    /// Connects to `redis`.
    pub fn connect(redis: &Redis) -> Attacker {
        let url = redis.url();
        let con = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .expect("attacker connects to Redis");
        Attacker { con, url }
    }

    /// Runs any command (`redis::cmd("RPUSH").arg(..)`); panics on an error reply (an attack
    /// the test meant to make must happen).
    pub fn cmd(&mut self, cmd: &redis::Cmd) -> Value {
        cmd.query(&mut self.con)
            .unwrap_or_else(|e| panic!("attacker's command failed: {e}"))
    }

    /// Runs a pipeline of commands, ignoring their replies.
    pub fn pipe(&mut self, pipe: &redis::Pipeline) {
        let _: () = pipe
            .query(&mut self.con)
            .unwrap_or_else(|e| panic!("attacker's pipeline failed: {e}"));
    }

    /// Every key (the test Redis is small).
    pub fn keys(&mut self) -> Vec<String> {
        redis::cmd("KEYS").arg("*").query(&mut self.con).unwrap()
    }

    /// The string value of `key`, if it holds one.
    pub fn get(&mut self, key: &str) -> Option<String> {
        let v: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(key).query(&mut self.con).unwrap();
        v.into_iter()
            .next()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
    }

    /// Writes `value` under `key` with no expiry, whatever the key held before.
    pub fn set(&mut self, key: &str, value: impl ToRedisArgs) {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query(&mut self.con)
            .unwrap();
    }

    /// Deletes `keys` (a no-op for none).
    pub fn del(&mut self, keys: &[String]) {
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(keys).query(&mut self.con).unwrap();
        }
    }

    /// Publishes `message` on `channel`.
    pub fn publish(&mut self, channel: &str, message: impl ToRedisArgs) {
        let _: () = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(message)
            .query(&mut self.con)
            .unwrap();
    }

    /// Every verdict-shaped string value in Redis, by key.
    pub fn verdicts(&mut self) -> Verdicts {
        let keys = self.keys();
        if keys.is_empty() {
            return Verdicts::new();
        }
        let values: Vec<Option<Vec<u8>>> =
            redis::cmd("MGET").arg(&keys).query(&mut self.con).unwrap();
        keys.into_iter()
            .zip(values)
            .filter_map(|(k, v)| Some((k, String::from_utf8(v?).ok()?)))
            .filter(|(_, v)| is_verdict(v))
            .collect()
    }

    /// The verdicts that appeared or changed since `before`.
    pub fn new_verdicts(&mut self, before: &Verdicts) -> Verdicts {
        self.verdicts()
            .into_iter()
            .filter(|(k, v)| before.get(k) != Some(v))
            .collect()
    }

    /// The one verdict `action` creates; panics unless exactly one appears.
    pub fn verdict_of(&mut self, action: impl FnOnce()) -> (String, String) {
        let before = self.verdicts();
        action();
        let new = self.new_verdicts(&before);
        assert_eq!(new.len(), 1, "expected one new verdict, got {new:?}");
        new.into_iter().next().unwrap()
    }

    /// The keys `action` creates whose values are strings but not verdicts ("seen" markers,
    /// revocation marks), with their values.
    pub fn markers_of(&mut self, action: impl FnOnce()) -> Vec<(String, String)> {
        let before = self.keys();
        action();
        let new: Vec<String> = self
            .keys()
            .into_iter()
            .filter(|k| !before.contains(k))
            .collect();
        new.into_iter()
            .filter_map(|k| {
                let v = self.get(&k)?;
                (!is_verdict(&v)).then_some((k, v))
            })
            .collect()
    }

    /// Deletes every key that is not a verdict (revocation marks, indexes, "seen" markers,
    /// generations, locks) except those whose name contains one of `spare`.
    pub fn delete_revocation_state(&mut self, spare: &[&str]) -> Vec<String> {
        let verdicts = self.verdicts();
        let doomed: Vec<String> = self
            .keys()
            .into_iter()
            .filter(|k| !verdicts.contains_key(k) && !spare.iter().any(|s| k.contains(s)))
            .collect();
        self.del(&doomed);
        doomed
    }

    /// Starts recording every message published on any channel, so genuine revocation hints
    /// can be replayed later.
    pub fn record_messages(&self) -> Recorder {
        let (tx, rx) = mpsc::channel();
        Recorder {
            rx,
            _thread: Background::spawn(&self.url, "*", move |channel, message| {
                let _ = tx.send((channel, message));
            }),
        }
    }
}

/// Deletes every key whose name ends with `suffix` the moment Redis writes it (`SET`), through
/// keyspace notifications, until the returned guard is dropped.
pub fn erase_as_written(redis: &Redis, suffix: &str) -> Background {
    let mut att = Attacker::connect(redis);
    att.cmd(
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg("E$"),
    );
    let suffix = suffix.to_owned();
    Background::spawn(&redis.url(), "__keyevent@0__:set", move |_, key| {
        let key = String::from_utf8_lossy(&key).into_owned();
        if key.ends_with(&suffix) {
            att.del(&[key]);
        }
    })
}

/// A thread that handles every message of a pattern subscription until dropped.
pub struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Subscribes to `pattern` on the Redis at `url`, and returns once subscribed; `handle` gets
    /// each message's channel and payload.
    fn spawn(
        url: &str,
        pattern: &str,
        mut handle: impl FnMut(String, Vec<u8>) + Send + 'static,
    ) -> Self {
        let (ready_tx, ready_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (url, pattern, stopped) = (url.to_owned(), pattern.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut con = redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .expect("subscriber connects to Redis");
            let mut pubsub = con.as_pubsub();
            pubsub.psubscribe(&pattern).unwrap();
            pubsub
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            ready_tx.send(()).unwrap();
            while !stopped.load(Ordering::Relaxed) {
                match pubsub.get_message() {
                    Ok(msg) => handle(
                        msg.get_channel_name().to_owned(),
                        msg.get_payload_bytes().to_vec(),
                    ),
                    Err(e) if e.is_timeout() => {}
                    // Redis closed the subscription (e.g. its output buffer limit for pub/sub
                    // clients during a flood): nothing more to handle.
                    Err(_) => return,
                }
            }
        });
        ready_rx.recv().unwrap();
        Background {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Messages recorded by [`Attacker::record_messages`]; recording stops when dropped.
pub struct Recorder {
    rx: mpsc::Receiver<(String, Vec<u8>)>,
    _thread: Background,
}

impl Recorder {
    /// Every (channel, message) recorded since the last call.
    pub fn take(&self) -> Vec<(String, Vec<u8>)> {
        self.rx.try_iter().collect()
    }
}

/// Does `value` look like a verdict (at least four `|`-separated fields)?
pub fn is_verdict(value: &str) -> bool {
    value.split('|').count() >= 4
}

/// Field `n` (from 0) of a `|`-separated value; panics when missing.
pub fn field(value: &str, n: usize) -> &str {
    value
        .split('|')
        .nth(n)
        .unwrap_or_else(|| panic!("no field {n} in {value}"))
}

/// `value` with field `n` replaced by `new`, everything else (the tag included) kept; unchanged
/// when it has no field `n` (a value of another format).
pub fn with_field(value: &str, n: usize, new: &str) -> String {
    let mut parts: Vec<&str> = value.split('|').collect();
    if let Some(part) = parts.get_mut(n) {
        *part = new;
    }
    parts.join("|")
}

/// (payload, tag) of a sealed value: the tag is what follows the last `|`.
pub fn unseal(value: &str) -> (&str, &str) {
    value.rsplit_once('|').unwrap_or((value, ""))
}

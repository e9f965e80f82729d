//! The in-process cache (L1): verdicts by token key, and "seen" markers by user key, in two
//! compact tables of fixed-size slots.
//!
//! A general-purpose cache (moka) spent about 420 bytes of heap per verdict (its entries, timer
//! wheel, admission sketch and hash buckets): 470 MiB of RSS at 1M verdicts. A verdict needs
//! far less: its token key is an HMAC output, so its bits are already uniformly random and
//! serve as the hash itself, and its answer and lifetimes pack into a few words. Here a verdict
//! takes a 44-byte slot (40 bytes plus a 4-byte fingerprint) and a "seen" marker a 12-byte one,
//! and no entry is allocated on its own.
//!
//! Layout: each table is split into shards, a mutex each. A shard holds buckets of 8 slots, and
//! a key may sit in either of two buckets picked by two independent words of the key (two
//! choices fill the buckets evenly: about 98 % of the slots hold a live entry when the table is
//! full). Each bucket keeps one more word of each slot's key apart, the fingerprint, so a
//! lookup reads one cache line of fingerprints per bucket and a slot only when it matches. A
//! shard starts with one bucket and doubles when a key finds both its buckets full of live
//! entries, up to its share of the capacity; from then on such a key replaces the slot among
//! its 16 that expires first. Expired slots are free slots: nothing sweeps them.
//!
//! Entries expire at the absolute instants they carry (a verdict at its usable end, so a
//! `stale_if_error` copy is at hand while the provider is down; a "seen" marker at its end):
//! reads never extend a lifetime, and [`L1::get`] serves a verdict only within its TTL. Every
//! rounding of a stored instant is towards a shorter life, and of an issue instant towards an
//! earlier one (more revocation marks cover it). Only verdicts this broker decided or read back
//! authenticated from Redis ever get here.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::keys::{self, Key};
use crate::verdict::{covers, now_ms, Answer, Verdict, HORIZON};
use extauth_protocol::wire::Reason;

/// Slots per bucket: 8 fingerprints are half a cache line.
const WAYS: usize = 8;
/// Most shards per table: enough that 2 cores rarely wait on one another's lock.
const MAX_SHARDS: usize = 64;
/// Fewest buckets a shard may grow to before the table uses fewer shards (a small capacity
/// spread over 64 shards would leave most keys only a few slots to choose from).
const MIN_SHARD_BUCKETS: usize = 64;
/// A shard whose clock has counted this many units since its epoch moves its epoch forward
/// (and its slots' ends back), so the 32-bit ends never wrap.
const REBASE_AT: u64 = 1 << 31;
/// Largest `fresh_until - issued` a verdict slot holds, ms (27 bits; `max_ttl` is at most a
/// day, 86.4M ms).
const MAX_ISSUED_GAP: u64 = (1 << 27) - 1;

/// A name tag: a keyed 64-bit hash of `user@domain` (see [`L1::name_tag`]), never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NameTag(NonZeroU64);

/// A verdict as L1 keeps it: what the token proved (the named user by the first 8 bytes of its
/// key, [`keys::short`], and once known by its [`NameTag`]) and its instants, ms since the Unix
/// epoch. Built from a [`Verdict`] for every decision, so verdicts from L1, Redis and the
/// provider are decided alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cached {
    held: Held,
    issued_ms: u64,
    fresh_until_ms: u64,
    usable_until_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Valid; names the user whose key starts with `user` (and whose tag is `name`, if known).
    Names {
        user: u64,
        name: Option<NameTag>,
    },
    Refused(Reason),
}

impl From<&Verdict> for Cached {
    fn from(v: &Verdict) -> Self {
        Cached {
            held: match &v.answer {
                Answer::Names(user) => Held::Names {
                    user: keys::short(user),
                    name: None,
                },
                Answer::Refused(reason) => Held::Refused(*reason),
            },
            issued_ms: v.issued_ms,
            fresh_until_ms: v.fresh_until_ms,
            usable_until_ms: v.usable_until_ms,
        }
    }
}

impl Cached {
    /// The decision for a login of the user whose key is `user`: accepted only when the token
    /// names that user (the first 8 bytes of the keys agree: a 2^-64 chance for another user,
    /// whose key nobody can compute without the cache secret).
    pub(crate) fn decide(&self, user: &Key) -> (bool, Reason) {
        match self.held {
            Held::Names { user: named, .. } if named == keys::short(user) => {
                (true, Reason::Accepted)
            }
            Held::Names { .. } => (false, Reason::WrongUser),
            Held::Refused(reason) => (false, reason),
        }
    }

    /// The decision for a login of the user tagged `name`, without its user key; `None` when
    /// the named user's tag is not known yet (decide with [`Cached::decide`] then).
    pub(crate) fn decide_by_name(&self, name: NameTag) -> Option<(bool, Reason)> {
        match self.held {
            Held::Names {
                name: Some(named), ..
            } if named == name => Some((true, Reason::Accepted)),
            Held::Names { name: Some(_), .. } => Some((false, Reason::WrongUser)),
            Held::Names { name: None, .. } => None,
            Held::Refused(reason) => Some((false, reason)),
        }
    }

    /// The first 8 bytes of the named user's key ([`keys::short`]), if the token is valid.
    pub(crate) fn named_user(&self) -> Option<u64> {
        match self.held {
            Held::Names { user, .. } => Some(user),
            Held::Refused(_) => None,
        }
    }

    /// When the flight that produced it started, ms since the epoch (compared with revocation
    /// marks).
    pub(crate) fn issued_ms(&self) -> u64 {
        self.issued_ms
    }
}

/// The in-process cache. Cheap to clone (the clones share the entries).
#[derive(Clone)]
pub(crate) struct L1 {
    inner: Arc<Tables>,
}

/// Where L1 reads the time (ms since the Unix epoch).
#[derive(Debug, Clone)]
pub(crate) enum Clock {
    /// The system clock ([`crate::verdict::now_ms`]).
    System,
    /// A clock the holder of the `Arc` sets by hand: unit tests move it past a verdict's end
    /// instead of sleeping.
    #[cfg(test)]
    Manual(Arc<std::sync::atomic::AtomicU64>),
}

impl Clock {
    /// The time now, ms since the Unix epoch.
    pub(crate) fn now_ms(&self) -> u64 {
        match self {
            Clock::System => now_ms(),
            #[cfg(test)]
            Clock::Manual(ms) => ms.load(Ordering::Relaxed),
        }
    }
}

struct Tables {
    /// The time every expiry is read against.
    clock: Clock,
    verdicts: Table<VerdictSlot>,
    seen: Table<SeenSlot>,
    /// The key of the name tags, random per process.
    names: RandomState,
    /// What revocations this process knows of.
    revocations: Revocations,
}

impl L1 {
    /// An empty cache of at most `capacity` verdicts and as many "seen" markers. Memory grows
    /// with use (each shard doubles), to 44 bytes per verdict slot and 12 per marker slot; a
    /// full table holds a verdict in about 98 % of its slots, 45 bytes per verdict (1M: 42
    /// MiB). Each shard is rounded down to whole buckets of 8 slots; below 512 slots the
    /// capacity is rounded down to a multiple of 8 (0 to 7: nothing is kept).
    pub(crate) fn new(capacity: u64) -> Self {
        L1::with_clock(capacity, Clock::System)
    }

    /// [`L1::new`] reading the time from `clock`: a test moves a manual clock past a
    /// verdict's end instead of sleeping.
    pub(crate) fn with_clock(capacity: u64, clock: Clock) -> Self {
        let now = clock.now_ms();
        L1 {
            inner: Arc::new(Tables {
                verdicts: Table::new(capacity, now),
                seen: Table::new(capacity, now),
                names: RandomState::new(),
                revocations: Revocations::default(),
                clock,
            }),
        }
    }

    /// The name tag of `user@domain`: SipHash under a key drawn at start, 64 bits. Cheaper by
    /// far than the user key (an HMAC-SHA256), so a cached hit for a user the verdict was
    /// already bound to computes one HMAC, the token key. Tags never leave the process, so a
    /// client learns nothing of them but accept or refuse, and passing for the named user
    /// takes a 2^-64 guess per login.
    pub(crate) fn name_tag(&self, domain: &str, user: &str) -> NameTag {
        // The tuple hashes each string with a terminator, so ("ab", "c") and ("a", "bc") differ.
        let hash = self.inner.names.hash_one((domain, user));
        NameTag(NonZeroU64::new(hash).unwrap_or(NonZeroU64::MIN))
    }

    /// The verdict on `token`, if any, within its TTL and not revoked by a mark this process
    /// knows ([`L1::note_user_mark`], [`L1::note_token_mark`]).
    pub(crate) fn get(&self, token: &Key) -> Option<Cached> {
        let now = self.inner.clock.now_ms();
        self.find(token)
            .filter(|v| v.fresh_until_ms > now && !self.revoked(token, v))
    }

    /// The verdict on `token` if it is still usable for `stale_if_error` (fresh or not) and
    /// not revoked.
    pub(crate) fn get_usable(&self, token: &Key) -> Option<Cached> {
        let now = self.inner.clock.now_ms();
        self.find(token)
            .filter(|v| v.usable_until_ms > now && !self.revoked(token, v))
    }

    fn revoked(&self, token: &Key, verdict: &Cached) -> bool {
        self.inner.revocations.covering(token, verdict).is_some()
    }

    /// Records that every verdict naming the user whose key is `user`, issued up to `at_ms`
    /// (ms since the epoch), is revoked. Kept for [`HORIZON`], at most [`MAX_MARKS`] marks.
    pub(crate) fn note_user_mark(&self, user: &Key, at_ms: u64) {
        let now = self.inner.clock.now_ms();
        self.inner.revocations.note(Kind::User, user, at_ms, now);
    }

    /// Records that every verdict on `token` issued up to `at_ms` is revoked.
    pub(crate) fn note_token_mark(&self, token: &Key, at_ms: u64) {
        let now = self.inner.clock.now_ms();
        self.inner.revocations.note(Kind::Token, token, at_ms, now);
    }

    /// The latest mark this process knows that covers `verdict` on `token` (ms since the
    /// epoch): a flight compares it with its own start, since a revocation may have come
    /// while it asked the provider.
    pub(crate) fn mark_covering(&self, token: &Key, verdict: &Cached) -> Option<u64> {
        self.inner.revocations.covering(token, verdict)
    }

    fn find(&self, token: &Key) -> Option<Cached> {
        let key = VerdictSlot::key(token);
        let shard = self.inner.verdicts.shard(&key);
        shard
            .find(&key)
            .map(|(b, w)| shard.buckets[b].slots[w].open(shard.epoch_ms))
    }

    /// Keeps `verdict` until its usable end. `name`: the tag of the user it names, when the
    /// caller knows it (it asked for that very user); otherwise the first hit for the named
    /// user binds it ([`L1::bind`]).
    pub(crate) fn insert(&self, token: &Key, verdict: &Verdict, name: Option<NameTag>) {
        let mut cached = Cached::from(verdict);
        if let Held::Names { name: n, .. } = &mut cached.held {
            *n = name;
        }
        let key = VerdictSlot::key(token);
        let now = self.inner.clock.now_ms();
        let mut shard = self.inner.verdicts.shard(&key);
        let clock = shard.clock(now);
        if let Some(slot) = VerdictSlot::seal(&key, &cached, shard.epoch_ms) {
            if slot.usable > clock {
                shard.put(&key, slot, clock, self.inner.verdicts.max_buckets);
            }
        }
    }

    /// Remembers that the user whose key is `user` is tagged `name`, if the verdict on `token`
    /// names that user (the caller decided with the key that it does): later hits for the user
    /// need no user key.
    pub(crate) fn bind(&self, token: &Key, user: &Key, name: NameTag) {
        let key = VerdictSlot::key(token);
        let mut shard = self.inner.verdicts.shard(&key);
        if let Some((b, w)) = shard.find(&key) {
            let slot = &mut shard.buckets[b].slots[w];
            if slot.answer() == 0 && slot.user == keys::short(user) {
                slot.name = name.0.get();
            }
        }
    }

    /// Drops the verdict on one token (revocation).
    pub(crate) fn invalidate(&self, token: &Key) {
        let key = VerdictSlot::key(token);
        self.inner.verdicts.shard(&key).remove(&key);
    }

    /// Drops every verdict (after revocations may have been missed).
    pub(crate) fn invalidate_all(&self) {
        self.inner.verdicts.clear();
    }

    /// Marks a user (by [`crate::keys::KeyDeriver::user`] key) as seen until `until_ms`
    /// (rounded down to the second).
    pub(crate) fn mark_seen(&self, user: &Key, until_ms: u64) {
        let key = SeenSlot::key(user);
        let mut shard = self.inner.seen.shard(&key);
        let clock = shard.clock(self.inner.clock.now_ms());
        let until = shard.units(until_ms);
        match until {
            Some(until) if until > clock => {
                let slot = SeenSlot { key: key[0], until };
                shard.put(&key, slot, clock, self.inner.seen.max_buckets);
            }
            _ => shard.remove(&key),
        }
    }

    /// Was the user seen within its "seen" TTL (in this process)?
    pub(crate) fn seen(&self, user: &Key) -> bool {
        let key = SeenSlot::key(user);
        let mut shard = self.inner.seen.shard(&key);
        let clock = shard.clock(self.inner.clock.now_ms());
        shard
            .find(&key)
            .is_some_and(|(b, w)| shard.buckets[b].slots[w].until > clock)
    }
}

// --- Revocation marks ---

/// Most marks kept in process; past it the oldest are folded into a floor (every verdict issued
/// before it is treated as revoked), so memory stays bounded whatever is revoked.
pub(crate) const MAX_MARKS: usize = 100_000;

/// The revocation marks this process knows, bounded in number and age. They live with the
/// verdicts they revoke: [`L1::get`] never hands out a verdict a mark covers.
#[derive(Default)]
struct Revocations {
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
    /// Records that verdicts on the `kind` key `key` issued up to `at_ms` are revoked (noted at
    /// `now_ms`; both ms since the epoch).
    fn note(&self, kind: Kind, key: &Key, at_ms: u64, now_ms: u64) {
        self.marks
            .lock()
            .expect("revocation marks")
            .note(kind, keys::short(key), at_ms, now_ms);
        self.any.store(true, Ordering::Release);
    }

    /// The latest mark this process knows that revokes `verdict` (on `token`), ms since the
    /// epoch.
    fn covering(&self, token: &Key, verdict: &Cached) -> Option<u64> {
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

    #[cfg(test)]
    fn len(&self) -> usize {
        let marks = self.marks.lock().expect("revocation marks");
        marks.users.len() + marks.tokens.len()
    }
}

// --- The tables ---

/// What a table's slots have in common.
trait Slot: Copy + Default {
    /// The key as the table reads it: 32-bit words of a key's first bytes.
    type Key: Copy;
    /// Length of the unit the slot's end counts in, ms.
    const UNIT_MS: u64;
    /// The words that place `key`: its shard and first bucket, its second bucket, and its
    /// fingerprint.
    fn place(key: &Self::Key) -> [u32; 3];
    /// The same words for the key this slot holds, whose fingerprint is `fp`.
    fn placed(&self, fp: u32) -> [u32; 3];
    /// Does it hold `key` (its fingerprint already matched)?
    fn holds(&self, key: &Self::Key) -> bool;
    /// Its end, in units since its shard's epoch; 0 for an empty slot.
    fn end(&self) -> u32;
    /// Moves its end `units` back (its shard's epoch moved that far forward).
    fn shift(&mut self, units: u64);
}

/// A table of slots, sharded; see the module documentation.
struct Table<S> {
    shards: Box<[Mutex<Shard<S>>]>,
    /// Most buckets a shard grows to: its share of the capacity.
    max_buckets: usize,
}

struct Shard<S> {
    buckets: Vec<Bucket<S>>,
    /// The instant the slots' ends count from, ms since the Unix epoch.
    epoch_ms: u64,
}

#[derive(Clone, Copy, Default)]
struct Bucket<S> {
    /// One word of each slot's key, read before the slot itself.
    fps: [u32; WAYS],
    slots: [S; WAYS],
}

impl<S: Slot> Table<S> {
    /// Empty shards for `capacity` entries, their epoch at `now_ms`.
    fn new(capacity: u64, now_ms: u64) -> Self {
        let slots = usize::try_from(capacity).unwrap_or(usize::MAX);
        let mut shards = MAX_SHARDS;
        while shards > 1 && slots / (shards * WAYS) < MIN_SHARD_BUCKETS {
            shards /= 2;
        }
        let max_buckets = slots / (shards * WAYS);
        let epoch_ms = now_ms;
        Table {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        buckets: vec![Bucket::default(); max_buckets.min(1)],
                        epoch_ms,
                    })
                })
                .collect(),
            max_buckets,
        }
    }

    /// The shard of `key`, locked. The shard count is a power of two; the low bits of the
    /// first word pick it, its high bits the bucket within.
    fn shard(&self, key: &S::Key) -> MutexGuard<'_, Shard<S>> {
        let word = S::place(key)[0] as usize;
        self.shards[word & (self.shards.len() - 1)]
            .lock()
            .expect("L1 shard")
    }

    fn clear(&self) {
        for shard in &*self.shards {
            let mut shard = shard.lock().expect("L1 shard");
            shard.buckets.fill(Bucket::default());
        }
    }
}

/// The bucket a word picks among `n`: the high half of `word * n` (no division, and any `n`).
fn bucket_of(word: u32, n: usize) -> usize {
    ((u64::from(word) * n as u64) >> 32) as usize
}

impl<S: Slot> Shard<S> {
    /// `now_ms` in this shard's units. Moves the epoch forward first when the clock nears the
    /// range of a 32-bit end: every slot then ends as many units earlier, and a slot that had
    /// ended becomes empty.
    fn clock(&mut self, now_ms: u64) -> u32 {
        let units = now_ms.saturating_sub(self.epoch_ms) / S::UNIT_MS;
        if units < REBASE_AT {
            return units as u32;
        }
        for bucket in &mut self.buckets {
            for slot in &mut bucket.slots {
                slot.shift(units);
            }
        }
        self.epoch_ms += units * S::UNIT_MS;
        0
    }

    /// `at_ms` in this shard's units, rounded down (so never later); `None` at or before the
    /// epoch, capped at the largest end a slot holds.
    fn units(&self, at_ms: u64) -> Option<u32> {
        let units = at_ms.checked_sub(self.epoch_ms)? / S::UNIT_MS;
        (units > 0).then(|| units.min(u64::from(u32::MAX)) as u32)
    }

    /// The bucket and way holding `key`.
    fn find(&self, key: &S::Key) -> Option<(usize, usize)> {
        let [a, b, fp] = S::place(key);
        let n = self.buckets.len();
        if n == 0 {
            return None;
        }
        [bucket_of(a, n), bucket_of(b, n)]
            .into_iter()
            .find_map(|i| {
                let bucket = &self.buckets[i];
                (0..WAYS)
                    .find(|&w| {
                        bucket.fps[w] == fp
                            && bucket.slots[w].end() != 0
                            && bucket.slots[w].holds(key)
                    })
                    .map(|w| (i, w))
            })
    }

    fn remove(&mut self, key: &S::Key) {
        if let Some((b, w)) = self.find(key) {
            self.buckets[b].fps[w] = 0;
            self.buckets[b].slots[w] = S::default();
        }
    }

    /// Stores `slot` under `key` (whose slot is replaced if present), growing the shard up to
    /// `max_buckets` when both buckets of the key are full of live slots, else replacing the
    /// one of them that ends first. `clock`: now, in the shard's units.
    fn put(&mut self, key: &S::Key, slot: S, clock: u32, max_buckets: usize) {
        if let Some((b, w)) = self.find(key) {
            self.buckets[b].slots[w] = slot;
            return;
        }
        let place = S::place(key);
        while !self.settle(place, slot, clock) {
            let n = self.buckets.len();
            if n == 0 {
                return;
            }
            if n >= max_buckets {
                let victim = [bucket_of(place[0], n), bucket_of(place[1], n)]
                    .into_iter()
                    .flat_map(|b| (0..WAYS).map(move |w| (b, w)))
                    .min_by_key(|&(b, w)| self.buckets[b].slots[w].end());
                if let Some((b, w)) = victim {
                    self.buckets[b].fps[w] = place[2];
                    self.buckets[b].slots[w] = slot;
                }
                return;
            }
            self.grow((n * 2).min(max_buckets), clock);
        }
    }

    /// Puts `slot` in a free (empty or ended) way of the emptier of its two buckets; false if
    /// both are full.
    fn settle(&mut self, [a, b, fp]: [u32; 3], slot: S, clock: u32) -> bool {
        let n = self.buckets.len();
        if n == 0 {
            return false;
        }
        let free = |bucket: &Bucket<S>| {
            (0..WAYS)
                .filter(|&w| bucket.slots[w].end() <= clock)
                .count()
        };
        let (first, second) = (bucket_of(a, n), bucket_of(b, n));
        let i = if free(&self.buckets[second]) > free(&self.buckets[first]) {
            second
        } else {
            first
        };
        let bucket = &mut self.buckets[i];
        match (0..WAYS).find(|&w| bucket.slots[w].end() <= clock) {
            Some(w) => {
                bucket.fps[w] = fp;
                bucket.slots[w] = slot;
                true
            }
            None => false,
        }
    }

    /// Rebuilds the shard with `n` buckets, keeping every live slot that finds room (a slot
    /// whose two new buckets are full is dropped, as an eviction).
    fn grow(&mut self, n: usize, clock: u32) {
        let old = std::mem::replace(&mut self.buckets, vec![Bucket::default(); n]);
        for bucket in &old {
            for w in 0..WAYS {
                let slot = bucket.slots[w];
                if slot.end() > clock {
                    self.settle(slot.placed(bucket.fps[w]), slot, clock);
                }
            }
        }
    }
}

/// A verdict in 40 bytes: the token key's first 16 bytes (12 here, 4 as the fingerprint), the
/// named user's first 8 bytes and tag, and the answer and instants packed into three words.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct VerdictSlot {
    /// [`keys::short`] of the named user's key; 0 for a refusal.
    user: u64,
    /// The named user's [`NameTag`]; 0 while unknown.
    name: u64,
    /// Words 0 to 2 of the token key (word 3 is the fingerprint).
    key: [u32; 3],
    /// The usable end, ms since the shard's epoch; 0 for an empty slot.
    usable: u32,
    /// Usable end minus fresh end (the `stale_if_error` grace), ms.
    stale: u32,
    /// The answer in the top 5 bits (0: valid, `1 + i` for `Reason::ALL[i]`), and fresh end
    /// minus issue instant in the low 27 bits, ms.
    meta: u32,
}

impl VerdictSlot {
    /// The first 16 bytes of a token key as the table reads them.
    fn key(token: &Key) -> [u32; 4] {
        std::array::from_fn(|i| u32::from_le_bytes(token[4 * i..4 * i + 4].try_into().unwrap()))
    }

    fn answer(&self) -> u32 {
        self.meta >> 27
    }

    /// `v` on the token `key` as a slot of a shard whose epoch is `epoch_ms`; `None` if it ends
    /// by then. Instants
    /// that do not fit move the safe way: ends earlier, the issue instant earlier.
    fn seal(key: &[u32; 4], v: &Cached, epoch_ms: u64) -> Option<VerdictSlot> {
        let max = u64::from(u32::MAX);
        let mut usable = v.usable_until_ms.min(epoch_ms.saturating_add(max));
        let mut fresh = v.fresh_until_ms.min(usable);
        let issued = v.issued_ms.min(fresh);
        fresh = fresh.min(issued.saturating_add(MAX_ISSUED_GAP));
        usable = usable.min(fresh.saturating_add(max));
        if usable <= epoch_ms {
            return None;
        }
        let (answer, user, name) = match v.held {
            Held::Names { user, name } => (0, user, name.map_or(0, |n| n.0.get())),
            Held::Refused(reason) => {
                let i = Reason::ALL.iter().position(|r| *r == reason)?;
                (1 + i as u32, 0, 0)
            }
        };
        Some(VerdictSlot {
            user,
            name,
            key: [key[0], key[1], key[2]],
            usable: (usable - epoch_ms) as u32,
            stale: (usable - fresh) as u32,
            meta: answer << 27 | (fresh - issued) as u32,
        })
    }

    /// The verdict this slot holds, in a shard whose epoch is `epoch_ms`.
    fn open(&self, epoch_ms: u64) -> Cached {
        let usable_until_ms = epoch_ms + u64::from(self.usable);
        let fresh_until_ms = usable_until_ms - u64::from(self.stale);
        let held = match self.answer() {
            0 => Held::Names {
                user: self.user,
                name: NonZeroU64::new(self.name).map(NameTag),
            },
            // Only `seal` writes the answer, from `Reason::ALL`.
            i => Held::Refused(Reason::ALL[i as usize - 1]),
        };
        Cached {
            held,
            issued_ms: fresh_until_ms - u64::from(self.meta & MAX_ISSUED_GAP as u32),
            fresh_until_ms,
            usable_until_ms,
        }
    }
}

impl Slot for VerdictSlot {
    type Key = [u32; 4];
    const UNIT_MS: u64 = 1;

    fn place(key: &[u32; 4]) -> [u32; 3] {
        [key[0], key[1], key[3]]
    }

    fn placed(&self, fp: u32) -> [u32; 3] {
        [self.key[0], self.key[1], fp]
    }

    fn holds(&self, key: &[u32; 4]) -> bool {
        self.key == [key[0], key[1], key[2]]
    }

    fn end(&self) -> u32 {
        self.usable
    }

    fn shift(&mut self, units: u64) {
        // The fresh end and issue instant are kept relative to the usable end: they move along.
        match u64::from(self.usable).checked_sub(units) {
            Some(usable) if usable > 0 => self.usable = usable as u32,
            _ => *self = VerdictSlot::default(),
        }
    }
}

/// A "seen" marker in 8 bytes: word 0 of the user key (word 1 is the fingerprint) and its end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SeenSlot {
    key: u32,
    /// The end, seconds since the shard's epoch (`seen_ttl` is whole seconds; 32 bits of
    /// seconds never need a rebase in practice); 0 for an empty slot.
    until: u32,
}

impl SeenSlot {
    /// The first 8 bytes of a user key ([`keys::short`]) as the table reads them.
    fn key(user: &Key) -> [u32; 2] {
        let short = keys::short(user);
        [short as u32, (short >> 32) as u32]
    }
}

impl Slot for SeenSlot {
    type Key = [u32; 2];
    const UNIT_MS: u64 = 1000;

    fn place(key: &[u32; 2]) -> [u32; 3] {
        [key[0], key[1], key[1]]
    }

    fn placed(&self, fp: u32) -> [u32; 3] {
        [self.key, fp, fp]
    }

    fn holds(&self, key: &[u32; 2]) -> bool {
        self.key == key[0]
    }

    fn end(&self) -> u32 {
        self.until
    }

    fn shift(&mut self, units: u64) {
        match u64::from(self.until).checked_sub(units) {
            Some(until) if until > 0 => self.until = until as u32,
            _ => *self = SeenSlot::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;
    use std::sync::atomic::AtomicU64;

    const ALICE: Key = [1; 32];
    const BOB: Key = [2; 32];

    fn valid(user: Key, fresh_ms: u64, usable_ms: u64) -> Verdict {
        let now = now_ms();
        Verdict {
            answer: Answer::Names(user),
            issued_ms: now,
            fresh_until_ms: now + fresh_ms,
            usable_until_ms: now + usable_ms,
            exp_ms: None,
        }
    }

    /// A token key whose first bucket is 0 and second the last of any shard's buckets (word 1
    /// is all ones), told apart by word 2; with `fp` as word 3.
    fn token(n: u32, fp: u32) -> Key {
        let mut key = [0u8; 32];
        key[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        key[8..12].copy_from_slice(&n.to_le_bytes());
        key[12..16].copy_from_slice(&fp.to_le_bytes());
        key
    }

    #[test]
    fn slots_are_44_bytes_a_verdict_and_12_a_marker() {
        assert_eq!(size_of::<VerdictSlot>(), 40);
        assert_eq!(size_of::<Bucket<VerdictSlot>>(), 8 * 44);
        assert_eq!(size_of::<Bucket<SeenSlot>>(), 8 * 12);
    }

    #[test]
    fn capacity_is_split_into_shards_of_whole_buckets() {
        let sizes = |capacity| {
            let t = Table::<VerdictSlot>::new(capacity, now_ms());
            (t.shards.len(), t.max_buckets)
        };
        assert_eq!(sizes(1_000_000), (64, 1953), "999,936 slots");
        assert_eq!(sizes(100_000), (64, 195), "99,840 slots");
        assert_eq!(sizes(100), (1, 12));
        assert_eq!(sizes(7), (1, 0), "fewer than 8: nothing kept");
    }

    #[test]
    fn verdicts_are_served_within_their_ttl_and_kept_until_their_usable_end() {
        let l1 = L1::new(100);
        let (fresh, stale, gone) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let v = valid(ALICE, 10_000, 20_000);
        l1.insert(&fresh, &v, None);
        let c = Cached::from(&v);
        assert_eq!((l1.get(&fresh), l1.get_usable(&fresh)), (Some(c), Some(c)));
        let mut past = v;
        past.issued_ms -= 60_000;
        past.fresh_until_ms = now_ms() - 1;
        l1.insert(&stale, &past, None);
        let c = Cached::from(&past);
        assert_eq!((l1.get(&stale), l1.get_usable(&stale)), (None, Some(c)));
        past.usable_until_ms = past.fresh_until_ms;
        l1.insert(&gone, &past, None);
        assert_eq!(
            l1.get_usable(&gone),
            None,
            "an unusable verdict is not kept"
        );
        l1.invalidate(&fresh);
        assert_eq!(l1.get(&fresh), None);
        l1.invalidate_all();
        assert_eq!(l1.get_usable(&stale), None);
    }

    #[test]
    fn expiry_is_checked_on_read() {
        let now = Arc::new(AtomicU64::new(now_ms()));
        let l1 = L1::with_clock(100, Clock::Manual(now.clone()));
        let v = valid(ALICE, 200, 400);
        l1.insert(&[1; 32], &v, None);
        now.store(v.fresh_until_ms - 1, Ordering::Relaxed);
        assert!(l1.get(&[1; 32]).is_some(), "1 ms before its TTL ends");
        now.store(v.fresh_until_ms, Ordering::Relaxed);
        assert_eq!(l1.get(&[1; 32]), None, "past its TTL");
        assert!(l1.get_usable(&[1; 32]).is_some(), "within stale_if_error");
        now.store(v.usable_until_ms - 1, Ordering::Relaxed);
        assert!(
            l1.get_usable(&[1; 32]).is_some(),
            "1 ms before its usable end"
        );
        now.store(v.usable_until_ms, Ordering::Relaxed);
        assert_eq!(l1.get_usable(&[1; 32]), None, "past its usable end");
    }

    #[test]
    fn refusals_keep_their_reason_and_instants_round_trip_to_the_ms() {
        let l1 = L1::new(100);
        for (i, reason) in Reason::ALL.into_iter().enumerate() {
            let v = Verdict {
                answer: Answer::Refused(reason),
                issued_ms: now_ms() - 1_234,
                fresh_until_ms: now_ms() + 10_007,
                usable_until_ms: now_ms() + 10_007,
                exp_ms: Some(1),
            };
            let token = [i as u8 + 1; 32];
            l1.insert(&token, &v, None);
            let got = l1.get(&token).unwrap();
            assert_eq!(got, Cached::from(&v), "{reason:?}");
            assert_eq!(got.decide(&ALICE), (false, reason));
            assert_eq!(
                got.decide_by_name(l1.name_tag("d", "a")),
                Some((false, reason))
            );
        }
    }

    #[test]
    fn instants_that_do_not_fit_move_the_safe_way() {
        let epoch = 1_000_000;
        let day = 86_400_000;
        let v = |issued, fresh, usable| Cached {
            held: Held::Names {
                user: 7,
                name: None,
            },
            issued_ms: issued,
            fresh_until_ms: fresh,
            usable_until_ms: usable,
        };
        let round = |c: Cached| VerdictSlot::seal(&[0; 4], &c, epoch).map(|s| s.open(epoch));
        let fits = v(epoch + 5, epoch + day, epoch + 2 * day);
        assert_eq!(round(fits), Some(fits));
        // Issued 2 days before its fresh end: the fresh end comes earlier, not the issue later.
        let long = round(v(epoch, epoch + 2 * day, epoch + 2 * day)).unwrap();
        assert_eq!(
            (long.issued_ms, long.fresh_until_ms, long.usable_until_ms),
            (epoch, epoch + MAX_ISSUED_GAP, epoch + 2 * day)
        );
        // Issued after its fresh end (a refusal from a skewed clock): issued at the fresh end.
        let late = round(v(epoch + 10, epoch + 5, epoch + 5)).unwrap();
        assert_eq!(late.issued_ms, epoch + 5);
        // An end beyond the slot's 32-bit clock is cut to it.
        let far = round(v(epoch, epoch + 1, u64::MAX)).unwrap();
        assert_eq!(far.usable_until_ms, epoch + u64::from(u32::MAX));
        assert_eq!(round(v(0, epoch, epoch)), None, "ended at the epoch");
    }

    #[test]
    fn a_verdict_is_served_to_the_named_user_only() {
        let l1 = L1::new(100);
        let (alice, bob) = (
            l1.name_tag("example.com", "alice"),
            l1.name_tag("example.com", "bob"),
        );
        assert_ne!(alice, bob);
        assert_ne!(alice, l1.name_tag("example.org", "alice"));
        assert_ne!(l1.name_tag("a", "bc"), l1.name_tag("ab", "c"));
        let token = [9; 32];
        // Decided for bob: alice's name is not known yet.
        l1.insert(&token, &valid(ALICE, 10_000, 10_000), None);
        let v = l1.get(&token).unwrap();
        assert_eq!(v.decide_by_name(bob), None);
        assert_eq!(v.decide(&BOB), (false, Reason::WrongUser));
        assert_eq!(v.decide(&ALICE), (true, Reason::Accepted));
        l1.bind(&token, &BOB, bob);
        assert_eq!(
            l1.get(&token).unwrap().decide_by_name(bob),
            None,
            "bob is not named"
        );
        l1.bind(&token, &ALICE, alice);
        let v = l1.get(&token).unwrap();
        assert_eq!(v.decide_by_name(alice), Some((true, Reason::Accepted)));
        assert_eq!(v.decide_by_name(bob), Some((false, Reason::WrongUser)));
        // A new verdict on the token names bob: alice's tag goes with the old one.
        l1.insert(&token, &valid(BOB, 10_000, 10_000), Some(bob));
        let v = l1.get(&token).unwrap();
        assert_eq!(v.decide_by_name(alice), Some((false, Reason::WrongUser)));
        assert_eq!(v.decide_by_name(bob), Some((true, Reason::Accepted)));
        assert_eq!(v.decide(&ALICE), (false, Reason::WrongUser));
    }

    #[test]
    fn a_full_table_evicts_the_verdict_that_ends_first() {
        // 16 slots: 1 shard, 2 buckets; every key below may use both.
        let l1 = L1::new(16);
        let end = |i: u32| 60_000 + u64::from(i) * 1_000;
        for i in 0..16 {
            l1.insert(&token(i, i), &valid(ALICE, end(i), end(i)), None);
        }
        let kept = |l1: &L1| (0..20).filter(|&i| l1.get(&token(i, i)).is_some()).count();
        assert_eq!(kept(&l1), 16, "room for 16");
        // The first 8 went in while the shard had one bucket; the 9th doubled it.
        assert_eq!(l1.inner.verdicts.shards[0].lock().unwrap().buckets.len(), 2);
        // One more: the one that ends first (token 0) makes room; so does token 1 next.
        l1.insert(&token(16, 16), &valid(ALICE, end(16), end(16)), None);
        assert_eq!((kept(&l1), l1.get(&token(0, 0))), (16, None));
        l1.insert(&token(17, 17), &valid(ALICE, end(17), end(17)), None);
        assert_eq!((kept(&l1), l1.get(&token(1, 1))), (16, None));
        assert!(l1.get(&token(2, 2)).is_some() && l1.get(&token(17, 17)).is_some());
        // A key whose fingerprint matches another's is still told apart by its other words.
        assert_eq!(l1.get(&token(18, 2)), None);
    }

    #[test]
    fn ended_slots_are_free_slots() {
        let mut shard = Shard::<SeenSlot> {
            buckets: vec![Bucket::default(); 1],
            epoch_ms: 0,
        };
        // 8 markers ending at 10..17 fill the one bucket (both choices of every key).
        for i in 0..8 {
            shard.put(
                &[i, 0],
                SeenSlot {
                    key: i,
                    until: 10 + i,
                },
                5,
                1,
            );
        }
        let live = |s: &Shard<SeenSlot>, clock| {
            s.buckets[0]
                .slots
                .iter()
                .filter(|x| x.until > clock)
                .count()
        };
        assert_eq!(live(&shard, 5), 8);
        // At 12, markers 0 to 2 have ended: a new one takes the first of their slots, no
        // eviction.
        shard.put(&[8, 0], SeenSlot { key: 8, until: 30 }, 12, 1);
        assert_eq!(shard.buckets[0].slots[0], SeenSlot { key: 8, until: 30 });
        assert_eq!(live(&shard, 12), 6);
        assert!(shard.find(&[7, 0]).is_some());
    }

    #[test]
    fn a_shard_moves_its_epoch_before_its_clock_wraps() {
        let day = 86_400_000;
        let epoch = 1_000_000;
        let mut shard = Shard::<VerdictSlot> {
            buckets: vec![Bucket::default(); 1],
            epoch_ms: epoch,
        };
        let now = epoch + (1 << 31) - 1;
        let key = [1, 2, 3, 4];
        let v = Cached {
            held: Held::Refused(Reason::Inactive),
            issued_ms: now - 10,
            fresh_until_ms: now + day,
            usable_until_ms: now + day,
        };
        let clock = shard.clock(now);
        assert_eq!(clock, (1 << 31) - 1);
        let slot = VerdictSlot::seal(&key, &v, shard.epoch_ms).unwrap();
        shard.put(&key, slot, clock, 1);
        let ended = VerdictSlot::seal(
            &[5, 6, 7, 8],
            &Cached {
                usable_until_ms: now + 1,
                ..v
            },
            epoch,
        );
        shard.put(&[5, 6, 7, 8], ended.unwrap(), clock, 1);
        assert_eq!(shard.clock(now + 2), 0, "rebased");
        assert_eq!(shard.epoch_ms, now + 2);
        let (b, w) = shard.find(&key).unwrap();
        assert_eq!(
            shard.buckets[b].slots[w].open(shard.epoch_ms),
            v,
            "same instants"
        );
        assert_eq!(shard.find(&[5, 6, 7, 8]), None, "an ended slot is emptied");
    }

    #[test]
    fn seen_markers_end_at_their_second() {
        let l1 = L1::new(100);
        let user = [3u8; 32];
        assert!(!l1.seen(&user));
        l1.mark_seen(&user, now_ms() + 60_000);
        assert!(l1.seen(&user));
        assert!(!l1.seen(&[4; 32]));
        l1.mark_seen(&user, now_ms() - 1);
        assert!(!l1.seen(&user), "a marker past its end is not seen");
        // 20 markers in a table of 16 (2 buckets; each key may use both): the 4 that end first
        // make room.
        let l1 = L1::new(16);
        let user = |n: u32| {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&n.to_le_bytes());
            key[4..8].copy_from_slice(&(u32::MAX - n).to_le_bytes());
            key
        };
        let now = now_ms();
        for n in 0..20 {
            l1.mark_seen(&user(n), now + 100_000 + u64::from(n) * 1000);
        }
        let seen: Vec<u32> = (0..20).filter(|&n| l1.seen(&user(n))).collect();
        assert_eq!(seen, (4..20).collect::<Vec<_>>());
    }

    fn marked(user: Key, issued_ms: u64) -> Cached {
        Cached::from(&Verdict {
            answer: Answer::Names(user),
            issued_ms,
            fresh_until_ms: issued_ms + 1,
            usable_until_ms: issued_ms + 1,
            exp_ms: None,
        })
    }

    use crate::verdict::SKEW_MS;

    fn revokes(r: &Revocations, token: &Key, v: &Cached) -> bool {
        r.covering(token, v).is_some()
    }

    #[test]
    fn marks_revoke_what_was_issued_before_them_and_a_skew_after() {
        let r = Revocations::default();
        let (alice, bob, token) = ([1; 32], [2; 32], [9; 32]);
        let now = now_ms();
        assert!(!revokes(&r, &token, &marked(alice, now)));
        r.note(Kind::User, &alice, now, now);
        assert!(revokes(&r, &token, &marked(alice, now - 60_000)));
        assert!(
            revokes(&r, &token, &marked(alice, now + SKEW_MS)),
            "within the skew"
        );
        assert!(!revokes(&r, &token, &marked(alice, now + SKEW_MS + 1)));
        assert!(
            !revokes(&r, &token, &marked(bob, now - 60_000)),
            "another user"
        );
        r.note(Kind::User, &alice, now - 120_000, now);
        assert!(
            revokes(&r, &token, &marked(alice, now)),
            "an older mark never lowers one"
        );
        r.note(Kind::Token, &token, now, now);
        assert!(revokes(&r, &token, &marked(bob, now - 1)));
        assert!(!revokes(&r, &[8; 32], &marked(bob, now - 1)));
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
            r.note(Kind::User, &key, now - 1_000_000 + i, now);
        }
        assert_eq!(r.len(), MAX_MARKS);
        let stranger = marked([0xff; 32], now - 1_000_000);
        assert!(
            revokes(&r, &[0; 32], &stranger),
            "an evicted mark still revokes through the floor"
        );
        assert!(!revokes(&r, &[0; 32], &marked([0xff; 32], now)));
    }
}

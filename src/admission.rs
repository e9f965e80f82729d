//! What a peer may hold, before and after it proves to be a shim.
//!
//! A new connection first gets a place in the [`Handshakes`] budget: a bound on handshakes in
//! progress across listeners (`--max-handshakes`) and per source address
//! (`--max-handshakes-per-ip`). Only a connection that passed the peer check, TLS and the
//! `Hello` asks for one of the [`Slots`] (`--max-connections`), with its first request. So a
//! peer that never authenticates holds a handshake place for at most `--handshake-timeout`, and
//! never a slot.
//!
//! Neither stage queues. A full handshake budget makes room by dropping its oldest handshake
//! (of the source that holds the most), never by refusing the newcomer: a silent peer has to
//! outpace every real handshake (milliseconds) to keep a shim out, where refusing newcomers
//! would let anyone who opens `--max-handshakes` silent connections per `--handshake-timeout`
//! lock every shim out. Full slots make room by evicting the idlest connection without a
//! request in flight: a shim reconnects by itself, so an idle connection costs nothing to close.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::{debug, warn};

use crate::metrics::{self, HandshakeFailure};
use crate::throttle::Throttle;

/// Where a connection comes from: the unit of the per-source handshake cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Origin {
    /// A Unix socket peer, by its user id (SO_PEERCRED). Unix peers pass or fail the peer check
    /// at once, and those that pass are users the operator allowed, so no cap applies; the uid
    /// keeps a refused user's flood from counting with the shims' connections.
    Unix(u32),
    /// A TCP peer: its IPv4 address, or the /64 prefix of its IPv6 address (one host commonly
    /// holds a whole /64, so a per-address cap would be no cap).
    Ip(IpAddr),
}

impl Origin {
    /// The origin of a TCP peer at `ip` (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub(crate) fn tcp(ip: IpAddr) -> Origin {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Origin::Ip(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !(u128::MAX >> 64);
                    Origin::Ip(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
            v4 => Origin::Ip(v4),
        }
    }
}

/// Handshakes in progress (peer check, TLS, `Hello`), bounded in total and per source.
pub(crate) struct Handshakes {
    max: usize,
    max_per_ip: usize,
    table: Mutex<HandshakeTable>,
}

#[derive(Default)]
struct HandshakeTable {
    /// Ids grow with every handshake, so the map iterates oldest first.
    next_id: u64,
    entries: BTreeMap<u64, (Origin, CancellationToken)>,
    per_origin: HashMap<Origin, usize>,
}

/// One handshake's place in the budget, given back on drop.
pub(crate) struct Handshake {
    id: u64,
    dropped: CancellationToken,
    budget: Arc<Handshakes>,
}

impl Handshakes {
    /// A budget of `max` handshakes in total and `max_per_ip` per TCP source (each at least 1).
    pub(crate) fn new(max: usize, max_per_ip: usize) -> Arc<Handshakes> {
        Arc::new(Handshakes {
            max: max.max(1),
            max_per_ip: max_per_ip.max(1),
            table: Mutex::default(),
        })
    }

    /// Gives a new connection from `origin` its place, first dropping the oldest handshake of
    /// `origin` when that source is at its cap, or else the oldest of the busiest source when
    /// the budget is full. Never waits and never refuses.
    pub(crate) fn begin(self: &Arc<Self>, origin: Origin) -> Handshake {
        let mut table = lock(&self.table);
        let at_cap = matches!(origin, Origin::Ip(_))
            && table.per_origin.get(&origin).copied().unwrap_or(0) >= self.max_per_ip;
        if at_cap {
            table.drop_oldest(origin, HandshakeFailure::SourceBudget);
        } else if table.entries.len() >= self.max {
            let busiest = table.busiest();
            table.drop_oldest(busiest, HandshakeFailure::Budget);
        }
        let id = table.next_id;
        table.next_id += 1;
        let dropped = CancellationToken::new();
        table.entries.insert(id, (origin, dropped.clone()));
        *table.per_origin.entry(origin).or_default() += 1;
        metrics::handshakes_in_progress(table.entries.len());
        Handshake {
            id,
            dropped,
            budget: self.clone(),
        }
    }
}

impl HandshakeTable {
    /// The source holding the most handshakes in progress; of several, the one with the
    /// oldest handshake (a peer spreading over many addresses still loses its oldest first).
    fn busiest(&self) -> Origin {
        let most = self.per_origin.values().max().copied().unwrap_or(0);
        self.entries
            .values()
            .map(|(o, _)| *o)
            .find(|o| self.per_origin.get(o) == Some(&most))
            .unwrap_or(Origin::Unix(0))
    }

    /// Ends the oldest handshake from `origin`; its connection closes at once.
    fn drop_oldest(&mut self, origin: Origin, why: HandshakeFailure) {
        let Some(id) = self
            .entries
            .iter()
            .find(|(_, (o, _))| *o == origin)
            .map(|(id, _)| *id)
        else {
            return;
        };
        if let Some((_, token)) = self.remove(id) {
            token.cancel();
            metrics::handshake_failed(why);
            debug!(
                ?origin,
                "handshake budget full: dropped the oldest handshake"
            );
            if let Some(suppressed) = BUDGET_WARNING.ready() {
                warn!(
                    ?origin,
                    reason = why.as_str(),
                    suppressed,
                    "handshake budget full: dropping the oldest handshakes (see --max-handshakes, \
                     --max-handshakes-per-ip)"
                );
            }
        }
    }

    fn remove(&mut self, id: u64) -> Option<(Origin, CancellationToken)> {
        let entry = self.entries.remove(&id)?;
        if let Some(n) = self.per_origin.get_mut(&entry.0) {
            *n -= 1;
            if *n == 0 {
                self.per_origin.remove(&entry.0);
            }
        }
        Some(entry)
    }
}

impl Handshake {
    /// Completes when the budget dropped this handshake to make room for a newer one (already
    /// counted and logged by the budget): the connection must close.
    pub(crate) fn dropped(&self) -> WaitForCancellationFuture<'_> {
        self.dropped.cancelled()
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut table = lock(&self.budget.table);
        table.remove(self.id);
        metrics::handshakes_in_progress(table.entries.len());
    }
}

/// The `--max-connections` slots of connections that completed their handshake.
pub(crate) struct Slots {
    capacity: usize,
    table: Mutex<SlotTable>,
}

#[derive(Default)]
struct SlotTable {
    next_id: u64,
    occupants: HashMap<u64, Occupant>,
}

struct Occupant {
    /// When its last request started or ended: the idlest connection goes first.
    last_request: Instant,
    in_flight: usize,
    evict: CancellationToken,
}

/// A connection's slot, given back on drop.
pub(crate) struct Slot {
    id: u64,
    evicted: CancellationToken,
    slots: Arc<Slots>,
}

/// Marks a request in flight on its connection (which is then never evicted) until dropped.
pub(crate) struct InFlight {
    id: u64,
    slots: Arc<Slots>,
}

impl Slots {
    /// `capacity` slots (at least 1).
    pub(crate) fn new(capacity: usize) -> Arc<Slots> {
        Arc::new(Slots {
            capacity: capacity.max(1),
            table: Mutex::default(),
        })
    }

    /// A slot for a connection that completed its handshake and sent its first request, with
    /// that request marked in flight in the same step (so the new slot cannot be evicted before
    /// the request is): a free slot, or the one of the idlest connection with no request in
    /// flight, which is told to close. `None` when every slot has a request in flight.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<(Slot, InFlight)> {
        let mut table = lock(&self.table);
        if table.occupants.len() >= self.capacity {
            table.evict_idlest()?;
        }
        let id = table.next_id;
        table.next_id += 1;
        let evicted = CancellationToken::new();
        table.occupants.insert(
            id,
            Occupant {
                last_request: Instant::now(),
                in_flight: 1,
                evict: evicted.clone(),
            },
        );
        metrics::connections_open(table.occupants.len());
        let slot = Slot {
            id,
            evicted,
            slots: self.clone(),
        };
        let in_flight = InFlight {
            id,
            slots: self.clone(),
        };
        Some((slot, in_flight))
    }
}

impl SlotTable {
    /// Frees the slot of the idlest connection without a request in flight, if there is one.
    fn evict_idlest(&mut self) -> Option<()> {
        let (&id, _) = self
            .occupants
            .iter()
            .filter(|(_, o)| o.in_flight == 0)
            .min_by_key(|(_, o)| o.last_request)?;
        let victim = self.occupants.remove(&id)?;
        victim.evict.cancel();
        metrics::connection_evicted();
        let idle_ms = victim.last_request.elapsed().as_millis();
        debug!(
            idle_ms,
            "connection slots full: evicting the idlest connection"
        );
        if let Some(suppressed) = EVICTION_WARNING.ready() {
            warn!(
                idle_ms,
                suppressed,
                "connection slots full: evicting the idlest connections to admit new ones (see \
                 --max-connections)"
            );
        }
        Some(())
    }
}

impl Slot {
    /// Completes when this connection was evicted: it must read no further request, answer
    /// those it has, and close.
    pub(crate) fn evicted(&self) -> WaitForCancellationFuture<'_> {
        self.evicted.cancelled()
    }

    /// Marks a request in flight. After an eviction (a request read just as it happened) the
    /// mark changes nothing: the request is still answered.
    pub(crate) fn request(&self) -> InFlight {
        touch(&self.slots, self.id, |o| o.in_flight += 1);
        InFlight {
            id: self.id,
            slots: self.slots.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = lock(&self.slots.table);
        table.occupants.remove(&self.id);
        metrics::connections_open(table.occupants.len());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        touch(&self.slots, self.id, |o| o.in_flight -= 1);
    }
}

/// Applies `change` to connection `id`'s entry (if it still holds its slot) and records the
/// request activity.
fn touch(slots: &Slots, id: u64, change: impl FnOnce(&mut Occupant)) {
    if let Some(o) = lock(&slots.table).occupants.get_mut(&id) {
        change(o);
        o.last_request = Instant::now();
    }
}

/// Locks a table; a panic elsewhere while it was held cannot leave it inconsistent (every
/// change is a single insert or remove), so a poisoned lock is used as is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How often one kind of warning may be logged; the events in between are logged at debug
/// level, counted in the metrics, and their number given with the next warning.
pub(crate) const WARNING_WINDOW: Duration = Duration::from_secs(10);

static BUDGET_WARNING: Throttle = Throttle::new(WARNING_WINDOW);
static EVICTION_WARNING: Throttle = Throttle::new(WARNING_WINDOW);

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(last: u8) -> Origin {
        Origin::Ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
    }

    #[test]
    fn a_source_at_its_cap_drops_its_own_oldest_handshake() {
        let budget = Handshakes::new(10, 2);
        let other = budget.begin(ip(1));
        let first = budget.begin(ip(2));
        let second = budget.begin(ip(2));
        let third = budget.begin(ip(2));
        assert!(first.dropped.is_cancelled());
        assert!(!second.dropped.is_cancelled() && !third.dropped.is_cancelled());
        assert!(!other.dropped.is_cancelled(), "other sources are untouched");
    }

    #[test]
    fn a_full_budget_drops_the_oldest_handshake_of_the_busiest_source() {
        let budget = Handshakes::new(4, 10);
        let shim = budget.begin(ip(1));
        let hostile: Vec<_> = (0..3).map(|_| budget.begin(ip(9))).collect();
        let _newcomer = budget.begin(Origin::Unix(0));
        assert!(
            !shim.dropped.is_cancelled(),
            "the oldest, but not the busiest source"
        );
        assert!(hostile[0].dropped.is_cancelled());
        assert!(!hostile[1].dropped.is_cancelled());
    }

    #[test]
    fn among_equally_busy_sources_the_oldest_handshake_goes() {
        let budget = Handshakes::new(3, 10);
        let spread: Vec<_> = (2..4).map(|n| budget.begin(ip(n))).collect();
        let shim = budget.begin(ip(1));
        let _newcomer = budget.begin(ip(9));
        assert!(spread[0].dropped.is_cancelled());
        assert!(!spread[1].dropped.is_cancelled() && !shim.dropped.is_cancelled());
    }

    #[test]
    fn a_finished_handshake_gives_its_place_back() {
        let budget = Handshakes::new(1, 1);
        drop(budget.begin(ip(1)));
        let next = budget.begin(ip(1));
        assert!(!next.dropped.is_cancelled());
        assert!(lock(&budget.table).per_origin.values().all(|n| *n == 1));
    }

    #[test]
    fn ipv6_sources_are_their_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Origin::tcp(a), Origin::tcp(b));
        assert_ne!(Origin::tcp(a), Origin::tcp(c));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(Origin::tcp(mapped), ip(1));
    }

    #[test]
    fn full_slots_evict_the_idlest_connection_without_a_request_in_flight() {
        let slots = Slots::new(3);
        let (busy, _in_flight) = slots.admit().unwrap();
        let (idlest, first) = slots.admit().unwrap();
        drop(first);
        let (recent, first) = slots.admit().unwrap();
        drop(first);
        drop(recent.request());
        let _newcomer = slots.admit().unwrap();
        assert!(idlest.evicted.is_cancelled());
        assert!(!recent.evicted.is_cancelled());
        assert!(
            !busy.evicted.is_cancelled(),
            "a request in flight keeps its slot"
        );
    }

    #[test]
    fn a_new_slot_is_not_evictable_before_its_first_request_is_answered() {
        let slots = Slots::new(1);
        let (only, first) = slots.admit().unwrap();
        assert!(
            slots.admit().is_none(),
            "every slot has a request in flight"
        );
        drop(first);
        assert!(slots.admit().is_some(), "idle now: evictable");
        assert!(only.evicted.is_cancelled());
    }
}

//! A lock-free "at most once per period" gate, for log lines an attacker or a failing peer could
//! otherwise repeat at request rate: hostile peers choose how often an event happens, and must
//! not choose how fast the journal grows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Ms since the first use of any throttle in this process, plus one (so 0 means "never").
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Lets one caller through per period and counts the callers held back in between. `const`, so
/// it can be a `static` for a warning logged from many places.
#[derive(Debug)]
pub(crate) struct Throttle {
    period_ms: u64,
    /// When the last caller was let through ([`now_ms`]; 0: never).
    last_ms: AtomicU64,
    /// Callers held back since then.
    held: AtomicU64,
}

impl Throttle {
    /// A gate that opens at most once per `period`.
    pub(crate) const fn new(period: Duration) -> Self {
        Throttle {
            period_ms: period.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(n)` for the first caller of each period (and the very first caller), `n` being how
    /// many were held back since the last one let through; `None` for the others.
    pub(crate) fn ready(&self) -> Option<u64> {
        let now = now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        let open = (last == 0 || now.saturating_sub(last) >= self.period_ms)
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if open {
            Some(self.held.swap(0, Ordering::Relaxed))
        } else {
            self.held.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// True for the first caller of each period ([`Throttle::ready`] without the count).
    pub(crate) fn allow(&self) -> bool {
        self.ready().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_caller_per_period_with_the_count_of_those_held_back() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.ready(), Some(0));
        assert_eq!(t.ready(), None);
        assert!(!t.allow());
        let open = Throttle::new(Duration::ZERO);
        assert!(open.allow() && open.allow());
        static SHARED: Throttle = Throttle::new(Duration::ZERO);
        assert_eq!(SHARED.ready(), Some(0));
    }
}

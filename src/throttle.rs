//! A lock-free "at most once per period" gate, for log lines an attacker or a failing peer could
//! otherwise repeat at request rate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets one caller through per period.
#[derive(Debug)]
pub struct Throttle {
    period_ms: u64,
    epoch: Instant,
    /// When the last caller was let through, ms after `epoch` plus one (0: never).
    last_ms: AtomicU64,
}

impl Throttle {
    /// A gate that opens at most once per `period`.
    pub fn new(period: Duration) -> Self {
        Throttle {
            period_ms: period.as_millis() as u64,
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// True for the first caller of each period (and the very first caller).
    pub fn allow(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= self.period_ms)
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_caller_per_period() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert!(t.allow());
        assert!(!t.allow());
        let open = Throttle::new(Duration::ZERO);
        assert!(open.allow() && open.allow());
    }
}

//! The process's file descriptor budget.
//!
//! Shim connections, the HTTP endpoints' connections, Redis and provider connections all come
//! out of one `RLIMIT_NOFILE`; once it is spent, accept(2) on the shim listener fails with
//! `EMFILE` and every login waits. The HTTP endpoints therefore hold at most their connection
//! caps (see [`crate::endpoint`]), and the broker checks at start that those caps leave at least
//! [`SHIM_RESERVE`] descriptors for everything else.

use std::fmt;
use std::io;

use nix::sys::resource::{getrlimit, Resource};

/// Fewest descriptors that must stay for shim connections, Redis and providers while the HTTP
/// endpoints hold their caps: a two-node cluster with ejabberd's default pool and a few
/// provider connections, with room to spare.
pub(crate) const SHIM_RESERVE: u64 = 64;

/// The descriptor limit and how many are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// The soft `RLIMIT_NOFILE` (the one that applies).
    pub limit: u64,
    /// Descriptors open now.
    pub open: u64,
}

impl Budget {
    /// Reads `RLIMIT_NOFILE` (getrlimit(2)) and counts the entries of `/proc/self/fd`.
    ///
    /// # Errors
    /// getrlimit(2) refused, or `/proc` unreadable.
    pub(crate) fn measure() -> io::Result<Budget> {
        let (limit, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
        // The directory handle read_dir holds is one of the entries it lists.
        let open = std::fs::read_dir("/proc/self/fd")?
            .count()
            .saturating_sub(1);
        Ok(Budget {
            limit,
            open: open as u64,
        })
    }

    /// The descriptors left for shims, Redis and providers once the endpoints hold `endpoints`
    /// descriptors; at least [`SHIM_RESERVE`].
    ///
    /// # Errors
    /// [`TooFewLeft`] when fewer would be left.
    pub(crate) fn reserve(&self, endpoints: u64) -> Result<u64, TooFewLeft> {
        let left = self
            .limit
            .saturating_sub(self.open.saturating_add(endpoints));
        if left < SHIM_RESERVE {
            return Err(TooFewLeft {
                budget: *self,
                endpoints,
                left,
            });
        }
        Ok(left)
    }
}

/// The HTTP endpoints' caps would leave fewer than [`SHIM_RESERVE`] descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooFewLeft {
    /// The budget measured.
    pub budget: Budget,
    /// Descriptors the endpoints may hold.
    pub endpoints: u64,
    /// What that leaves.
    pub left: u64,
}

impl fmt::Display for TooFewLeft {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RLIMIT_NOFILE {} with {} descriptors open leaves {} for shims, Redis and providers \
             once the HTTP endpoints hold up to {}; at least {SHIM_RESERVE} must stay",
            self.budget.limit, self.budget.open, self.left, self.endpoints
        )
    }
}

impl std::error::Error for TooFewLeft {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_what_the_endpoints_leave() {
        let budget = Budget {
            limit: 256,
            open: 20,
        };
        assert_eq!(budget.reserve(82), Ok(154));
        let err = budget.reserve(200).unwrap_err();
        assert_eq!(err.left, 36);
        assert!(err.to_string().contains("RLIMIT_NOFILE 256"), "{err}");
        assert_eq!(budget.reserve(u64::MAX).unwrap_err().left, 0);
        let unlimited = Budget {
            limit: u64::MAX,
            open: 20,
        };
        assert!(unlimited.reserve(82).is_ok());
    }

    #[test]
    fn this_process_can_be_measured() {
        let budget = Budget::measure().unwrap();
        assert!(budget.open >= 3 && budget.open < budget.limit, "{budget:?}");
    }
}

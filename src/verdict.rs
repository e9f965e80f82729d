//! What the broker remembers about a token: [`Verdict`], the per-user decision it gives, its
//! lifetimes, and its stored form.
//!
//! A verdict describes a token on a domain, not a login: "valid, and it names user X" or
//! "refused, because ...". The decision for a login of `user@domain` is made from it locally
//! ([`Verdict::decide`]), so one provider call serves every user a token is tried for.
//!
//! Lifetimes (RFC 7662 section 4; docs/architecture.md): every verdict carries absolute instants,
//! ms since the Unix epoch: `issued` (when the flight that asked the provider started),
//! `fresh_until` (its TTL) and `usable_until` (the `stale_if_error` grace). Whatever a stored
//! value claims, a reader never serves it past `issued + max_ttl` (`negative_ttl` for a
//! refusal), past `usable_until` capped the same way, or past the token's `exp`
//! ([`Verdict::clamped`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::keys::{self, Key};
use extauth_protocol::wire::Reason;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Parses an instant (ms since the epoch) as `u64::to_string` writes it: ASCII digits, no sign,
/// no leading zero. `None` for anything else, so a stored value has one spelling only.
pub fn parse_ms(text: &str) -> Option<u64> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    canonical.then(|| text.parse().ok()).flatten()
}

/// The longest `max_ttl`, `negative_ttl` and `stale_if_error` accepted (one day each), so that a
/// revocation mark kept for [`HORIZON`] outlives every verdict it revokes.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How long a revocation mark is kept: longer than any verdict it revokes can live
/// (`max_ttl` + `stale_if_error`, each at most [`MAX_LIFETIME`]), with a minute to spare.
pub(crate) const HORIZON: Duration = Duration::from_secs(2 * MAX_LIFETIME.as_secs() + 60);

/// Clocks of brokers and Redis may disagree by this much (ms; NTP keeps them far closer): a
/// verdict issued up to this long after a revocation mark is still taken as revoked by it,
/// which costs a provider call, never a wrong yes.
pub(crate) const SKEW_MS: u64 = 500;

/// Does a revocation mark set at `mark_ms` revoke a verdict issued at `issued_ms` (both ms
/// since the epoch)? Yes up to [`SKEW_MS`] after the mark.
pub(crate) fn covers(mark_ms: u64, issued_ms: u64) -> bool {
    issued_ms <= mark_ms.saturating_add(SKEW_MS)
}

/// A verdict issued more than this far in the future (ms) by another broker's clock is not
/// believed: it would live longer than its rules allow.
const FUTURE_SKEW_MS: u64 = 5_000;

/// What a token proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Valid, and it names the user with this key (`KeyDeriver::user` of `user@domain`).
    Names(Key),
    /// Refused for every user, for this reason.
    Refused(Reason),
}

/// A cached decision on one token (on one domain).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// What the token proved.
    pub answer: Answer,
    /// When the flight that produced it started, ms since the epoch; revocation marks are
    /// compared with it.
    pub issued_ms: u64,
    /// End of its TTL, ms since the epoch.
    pub fresh_until_ms: u64,
    /// Until when it may still be served while the provider is unavailable (`stale_if_error`);
    /// never before `fresh_until_ms`, never past `exp`.
    pub usable_until_ms: u64,
    /// The token's `exp`, ms since the epoch, when the provider gave one.
    pub exp_ms: Option<u64>,
}

/// The longest a domain lets a verdict live, for [`Verdict::clamped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Cap on a valid token's verdict.
    pub max_ttl: Duration,
    /// Lifetime of a refusal.
    pub negative_ttl: Duration,
    /// Grace for serving a valid token's verdict while the provider is down.
    pub stale_if_error: Duration,
}

impl Verdict {
    /// The decision for a login of the user whose key is `user`: accepted only when the token
    /// names that very user.
    pub fn decide(&self, user: &Key) -> (bool, Reason) {
        match self.answer {
            Answer::Names(named) if named == *user => (true, Reason::Accepted),
            Answer::Names(_) => (false, Reason::WrongUser),
            Answer::Refused(reason) => (false, reason),
        }
    }

    /// The user the token names, if it is valid.
    pub fn named_user(&self) -> Option<&Key> {
        match &self.answer {
            Answer::Names(key) => Some(key),
            Answer::Refused(_) => None,
        }
    }

    /// Within its TTL at `now_ms`?
    pub fn is_fresh_at(&self, now_ms: u64) -> bool {
        self.fresh_until_ms > now_ms
    }

    /// Still usable for `stale_if_error` at `now_ms`?
    pub fn is_usable_at(&self, now_ms: u64) -> bool {
        self.usable_until_ms > now_ms
    }

    /// Time left before the TTL ends (zero when already stale).
    pub fn remaining(&self) -> Duration {
        Duration::from_millis(self.fresh_until_ms.saturating_sub(now_ms()))
    }

    /// This verdict within `rules`, whatever it claims: `None` when it cannot be believed at all
    /// (issued in the future beyond clock skew). A verdict written by this broker comes back
    /// unchanged; one written under longer rules (another broker, an older configuration, a
    /// replayed value) comes back shortened.
    pub fn clamped(mut self, rules: &Lifetimes, now_ms: u64) -> Option<Verdict> {
        if self.issued_ms > now_ms + FUTURE_SKEW_MS {
            return None;
        }
        let ms = |d: Duration| d.as_millis() as u64;
        let (fresh_cap, usable_cap) = match self.answer {
            Answer::Names(_) => {
                let fresh = self.issued_ms.saturating_add(ms(rules.max_ttl));
                (fresh, fresh.saturating_add(ms(rules.stale_if_error)))
            }
            Answer::Refused(_) => {
                let fresh = self.issued_ms.saturating_add(ms(rules.negative_ttl));
                (fresh, fresh)
            }
        };
        let exp_cap = self.exp_ms.unwrap_or(u64::MAX);
        self.fresh_until_ms = self.fresh_until_ms.min(fresh_cap).min(exp_cap);
        self.usable_until_ms = self
            .usable_until_ms
            .min(usable_cap)
            .min(exp_cap)
            .max(self.fresh_until_ms);
        Some(self)
    }

    /// The stored form (before sealing): `v|ok|reason|named user or -|issued|fresh|usable|exp`,
    /// instants in ms since the epoch, `exp` 0 when unknown. Holds no token and no user name.
    pub fn to_payload(&self) -> String {
        let (ok, reason, named) = match &self.answer {
            Answer::Names(key) => ("1", Reason::Accepted, hex::encode(key)),
            Answer::Refused(reason) => ("0", *reason, "-".to_owned()),
        };
        format!(
            "v|{ok}|{}|{named}|{}|{}|{}|{}",
            reason.as_str(),
            self.issued_ms,
            self.fresh_until_ms,
            self.usable_until_ms,
            self.exp_ms.unwrap_or(0)
        )
    }

    /// Parses [`Verdict::to_payload`] output; `None` for anything else or an inconsistent value
    /// (a refusal that names a user, a usable end before the fresh end, ...).
    pub fn from_payload(payload: &str) -> Option<Verdict> {
        let mut parts = payload.split('|');
        if parts.next()? != "v" {
            return None;
        }
        let ok = parts.next()?;
        let reason = Reason::from_name(parts.next()?)?;
        let named = parts.next()?;
        let mut number = || parse_ms(parts.next()?);
        let (issued_ms, fresh_until_ms, usable_until_ms, exp) =
            (number()?, number()?, number()?, number()?);
        if parts.next().is_some() || usable_until_ms < fresh_until_ms {
            return None;
        }
        let answer = match (ok, reason, named) {
            ("1", Reason::Accepted, named) => Answer::Names(keys::parse_hex(named)?),
            ("0", reason, "-") if reason != Reason::Accepted => Answer::Refused(reason),
            _ => return None,
        };
        Some(Verdict {
            answer,
            issued_ms,
            fresh_until_ms,
            usable_until_ms,
            exp_ms: (exp != 0).then_some(exp),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Lifetimes {
        Lifetimes {
            max_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(10),
            stale_if_error: Duration::from_secs(60),
        }
    }

    fn valid(issued: u64, fresh: u64, usable: u64, exp: Option<u64>) -> Verdict {
        Verdict {
            answer: Answer::Names([7; 32]),
            issued_ms: issued,
            fresh_until_ms: fresh,
            usable_until_ms: usable,
            exp_ms: exp,
        }
    }

    #[test]
    fn decisions_bind_the_named_user_only() {
        let v = valid(0, 1, 1, None);
        assert_eq!(v.decide(&[7; 32]), (true, Reason::Accepted));
        assert_eq!(v.decide(&[8; 32]), (false, Reason::WrongUser));
        let refused = Verdict {
            answer: Answer::Refused(Reason::NoUser),
            ..v
        };
        assert_eq!(refused.decide(&[7; 32]), (false, Reason::NoUser));
    }

    #[test]
    fn payloads_round_trip_and_garbage_is_refused() {
        let v = valid(1_000, 2_000, 3_000, Some(4_000));
        assert_eq!(Verdict::from_payload(&v.to_payload()), Some(v));
        let n = Verdict {
            answer: Answer::Refused(Reason::Inactive),
            exp_ms: None,
            ..v
        };
        assert_eq!(Verdict::from_payload(&n.to_payload()), Some(n));
        let named = hex::encode([7u8; 32]);
        for bad in [
            String::new(),
            "v|1|accepted".into(),
            format!("v|1|inactive|{named}|1|2|3|0"),
            "v|0|accepted|-|1|2|3|0".into(),
            format!("v|0|inactive|{named}|1|2|3|0"),
            "v|1|accepted|-|1|2|3|0".into(),
            format!("v|1|accepted|{named}|1|3|2|0"),
            format!("v|1|accepted|{named}|1|2|3|0|9"),
            format!("w|1|accepted|{named}|1|2|3|0"),
            format!("v|1|accepted|{named}|x|2|3|0"),
            // Found by the redis_payloads fuzz target: numbers and keys with another spelling
            // parsed, so one verdict had several payloads.
            format!("v|1|accepted|{named}|1|2|3|07"),
            format!("v|1|accepted|{named}|+1|2|3|0"),
            format!("v|1|accepted|{}|1|2|3|0", "AB".repeat(32)),
        ] {
            assert_eq!(Verdict::from_payload(&bad), None, "{bad}");
        }
    }

    #[test]
    fn instants_have_one_spelling() {
        assert_eq!(parse_ms("0"), Some(0));
        assert_eq!(parse_ms("1767225600000"), Some(1_767_225_600_000));
        assert_eq!(parse_ms(&u64::MAX.to_string()), Some(u64::MAX));
        for bad in [
            "",
            "00",
            "01",
            "+1",
            "-1",
            " 1",
            "1 ",
            "1e3",
            "18446744073709551616",
        ] {
            assert_eq!(parse_ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn clamping_enforces_the_readers_rules_and_exp() {
        let now = 1_000_000;
        let long = valid(now, u64::MAX / 2, u64::MAX / 2, None);
        let c = long.clamped(&rules(), now).unwrap();
        assert_eq!(
            (c.fresh_until_ms, c.usable_until_ms),
            (now + 300_000, now + 360_000)
        );
        let expiring = valid(now, now + 300_000, now + 360_000, Some(now + 100_000));
        let c = expiring.clamped(&rules(), now).unwrap();
        assert_eq!(
            (c.fresh_until_ms, c.usable_until_ms),
            (now + 100_000, now + 100_000)
        );
        let refusal = Verdict {
            answer: Answer::Refused(Reason::Inactive),
            ..long
        };
        let c = refusal.clamped(&rules(), now).unwrap();
        assert_eq!(
            (c.fresh_until_ms, c.usable_until_ms),
            (now + 10_000, now + 10_000)
        );
        let from_the_future = valid(now + 60_000, now + 70_000, now + 70_000, None);
        assert_eq!(from_the_future.clamped(&rules(), now), None);
        let own = valid(now, now + 200_000, now + 200_000, None);
        assert_eq!(
            own.clamped(&rules(), now),
            Some(own),
            "within the rules: unchanged"
        );
    }
}

//! The payloads inside sealed Redis values and pub/sub messages on arbitrary text: verdicts
//! (src/verdict.rs), revocation marks and "seen" markers, revocation hints (src/store.rs).
//!
//! A payload is only parsed after its seal opened, so only a broker could have written it; the
//! parsers must still never panic, and must accept exactly what the broker writes. Invariants:
//! - `Verdict::from_payload`, `verdict::parse_ms` (marks, "seen" markers) and
//!   `Hint::from_payload` never panic, and what they parse re-encodes to the very same payload
//!   (one spelling per value, so no two payloads mean the same thing);
//! - a parsed verdict is consistent (an accept names a user, a refusal does not; its usable end
//!   is not before its fresh end), and clamping it to any rules at a realistic clock never
//!   extends it, keeps it within the rules and `exp`, is idempotent, and re-encodes;
//! - a verdict built from the input bytes round-trips through its payload.
#![no_main]

use std::time::Duration;

use extauth_broker::untrusted::{parse_ms, Answer, Hint, Lifetimes, Verdict};
use extauth_protocol::wire::Reason;
use libfuzzer_sys::fuzz_target;

/// 2026-01-01T00:00:00Z, ms: clocks the broker can meet, so `now + skew` cannot overflow.
const SOME_NOW_MS: u64 = 1_767_225_600_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(verdict) = Verdict::from_payload(text) {
            assert_eq!(verdict.to_payload(), text, "a verdict parsed from a non-canonical payload");
            consistent(&verdict);
            for rules in rule_sets(data) {
                clamping_only_shortens(&verdict, &rules, clock(data));
            }
        }
        if let Some(ms) = parse_ms(text) {
            assert_eq!(ms.to_string(), text, "an instant parsed from a non-canonical payload");
        }
        if let Some(hint) = Hint::from_payload(text) {
            assert_eq!(hint.to_payload(), text, "a hint parsed from a non-canonical payload");
        }
    }
    if let Some(verdict) = built(data) {
        assert_eq!(Verdict::from_payload(&verdict.to_payload()), Some(verdict));
    }
});

fn consistent(v: &Verdict) {
    assert!(v.usable_until_ms >= v.fresh_until_ms);
    match v.answer {
        Answer::Names(_) => assert_eq!(v.decide(v.named_user().unwrap()).1, Reason::Accepted),
        Answer::Refused(reason) => assert_ne!(reason, Reason::Accepted),
    }
}

/// A clock within a day of [`SOME_NOW_MS`], from the input.
fn clock(data: &[u8]) -> u64 {
    let n = data.iter().fold(0u64, |n, &b| n.wrapping_mul(31).wrapping_add(b.into()));
    SOME_NOW_MS - 86_400_000 + n % (2 * 86_400_000)
}

/// Rules a broker can be configured with (1 s to 1 day each; `stale_if_error` may be 0).
fn rule_sets(data: &[u8]) -> [Lifetimes; 3] {
    let s = |i: usize, min: u64| {
        Duration::from_secs(min.max(u64::from(*data.get(i).unwrap_or(&1)) * 337 % 86_400))
    };
    [
        Lifetimes {
            max_ttl: Duration::from_secs(1),
            negative_ttl: Duration::from_secs(1),
            stale_if_error: Duration::ZERO,
        },
        Lifetimes {
            max_ttl: Duration::from_secs(86_400),
            negative_ttl: Duration::from_secs(86_400),
            stale_if_error: Duration::from_secs(86_400),
        },
        Lifetimes {
            max_ttl: s(0, 1),
            negative_ttl: s(1, 1),
            stale_if_error: s(2, 0),
        },
    ]
}

fn clamping_only_shortens(v: &Verdict, rules: &Lifetimes, now: u64) {
    let Some(c) = v.clamped(rules, now) else {
        assert!(v.issued_ms > now + 5_000, "a verdict not from the future was refused");
        return;
    };
    let ms = |d: Duration| d.as_millis() as u64;
    let ttl = match v.answer {
        Answer::Names(_) => ms(rules.max_ttl),
        Answer::Refused(_) => ms(rules.negative_ttl),
    };
    let exp = v.exp_ms.unwrap_or(u64::MAX);
    assert_eq!((c.answer, c.issued_ms, c.exp_ms), (v.answer, v.issued_ms, v.exp_ms));
    assert!(c.fresh_until_ms <= v.fresh_until_ms && c.usable_until_ms <= v.usable_until_ms);
    assert!(c.fresh_until_ms <= v.issued_ms.saturating_add(ttl) && c.fresh_until_ms <= exp);
    let grace = match v.answer {
        Answer::Names(_) => ms(rules.stale_if_error),
        Answer::Refused(_) => 0,
    };
    assert!(c.usable_until_ms <= v.issued_ms.saturating_add(ttl).saturating_add(grace));
    assert!(c.usable_until_ms <= exp.max(c.fresh_until_ms));
    assert!(c.usable_until_ms >= c.fresh_until_ms);
    assert_eq!(c.clamped(rules, now), Some(c), "clamping twice changed it");
    assert_eq!(Verdict::from_payload(&c.to_payload()), Some(c));
}

/// A consistent verdict made of the input's bytes: reason, user key, four instants.
fn built(data: &[u8]) -> Option<Verdict> {
    let (&selector, rest) = data.split_first()?;
    let key: [u8; 32] = rest.get(..32)?.try_into().ok()?;
    let mut numbers = rest[32..].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap()));
    let (issued, fresh, extra, exp) = (numbers.next()?, numbers.next()?, numbers.next()?, numbers.next()?);
    let reason = Reason::ALL[selector as usize % Reason::ALL.len()];
    let answer = match reason {
        Reason::Accepted => Answer::Names(key),
        other => Answer::Refused(other),
    };
    Some(Verdict {
        answer,
        issued_ms: issued,
        fresh_until_ms: fresh,
        usable_until_ms: fresh.saturating_add(extra),
        // 0 stands for "no exp" in the payload.
        exp_ms: (exp != 0).then_some(exp),
    })
}

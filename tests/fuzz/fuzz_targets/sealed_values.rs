//! Sealed Redis values on arbitrary bytes (src/seal.rs): what a Redis writer without the cache
//! secret can put under any key.
//!
//! The input is `purpose byte | key name | 0x00 | value` (the key name and value taken as UTF-8,
//! lossily: the store refuses bytes that are not UTF-8 before opening). Invariants:
//! - `Sealer::open` never panics, and opens nothing but the one canonical sealing of its payload
//!   under that purpose and key name: a made-up tag, or another spelling of a genuine tag, never
//!   opens;
//! - the value sealed as a payload opens under its own purpose and key name, to itself, and
//!   never under another purpose, another key name, another cache secret, with one tag digit
//!   changed, with one byte respelled (a tag digit in capitals, ...), or with the payload/key
//!   boundary moved (the length prefixes).
#![no_main]

use extauth_protocol::extauth::Secret;
use extauth_broker::untrusted::{Purpose, SealError, Sealer};
use libfuzzer_sys::fuzz_target;

const PURPOSES: [Purpose; 5] = [
    Purpose::Entry,
    Purpose::UserMark,
    Purpose::TokenMark,
    Purpose::Seen,
    Purpose::Hint,
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let purpose = PURPOSES[selector as usize % PURPOSES.len()];
    let (key, value) = match rest.iter().position(|&b| b == 0) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (&rest[..0], rest),
    };
    let (key, value) = (String::from_utf8_lossy(key), String::from_utf8_lossy(value));
    let sealer = Sealer::new(&Secret::new("fuzz-cache-secret-0123456789abcdef".into()));

    only_canonical_sealings_open(&sealer, purpose, &key, &value);
    sealings_are_bound(&sealer, purpose, &key, &value, selector);
});

fn only_canonical_sealings_open(sealer: &Sealer, purpose: Purpose, key: &str, value: &str) {
    if let Ok(payload) = sealer.open(purpose, key, value) {
        assert_eq!(
            sealer.seal(purpose, key, payload),
            value,
            "a value that is not the canonical sealing of its payload opened"
        );
    }
}

fn sealings_are_bound(sealer: &Sealer, purpose: Purpose, key: &str, payload: &str, selector: u8) {
    let sealed = sealer.seal(purpose, key, payload);
    assert_eq!(sealer.open(purpose, key, &sealed), Ok(payload));
    for other in PURPOSES.into_iter().filter(|p| *p != purpose) {
        assert_eq!(sealer.open(other, key, &sealed), Err(SealError::BadTag));
    }
    for other_key in [format!("{key}x"), format!("x{key}"), String::new()] {
        if other_key != key {
            assert_eq!(
                sealer.open(purpose, &other_key, &sealed),
                Err(SealError::BadTag)
            );
        }
    }
    let stranger = Sealer::new(&Secret::new("another-cache-secret-0123456789abcd".into()));
    assert_eq!(
        stranger.open(purpose, key, &sealed),
        Err(SealError::BadTag)
    );

    // One tag digit changed (to another lowercase hex digit).
    let (body, tag) = sealed.rsplit_once('|').expect("a sealed value has a tag");
    let at = selector as usize % tag.len();
    let digit = tag.as_bytes()[at];
    let changed = if digit == b'0' { b'1' } else { b'0' };
    let mut altered = tag.as_bytes().to_vec();
    altered[at] = changed;
    let altered = format!("{body}|{}", String::from_utf8(altered).unwrap());
    assert_eq!(
        sealer.open(purpose, key, &altered),
        Err(SealError::BadTag)
    );

    // One byte of the sealed value respelled (a tag digit in capitals, a space, another digit):
    // only the canonical sealing opens.
    let mut respelled = sealed.clone().into_bytes();
    let at = usize::from(selector) * 7 % respelled.len();
    respelled[at] = match respelled[at] {
        c @ b'a'..=b'f' => c.to_ascii_uppercase(),
        b'0'..=b'9' => b' ',
        c => c ^ 1,
    };
    if let Ok(respelled) = String::from_utf8(respelled) {
        assert!(
            sealer.open(purpose, key, &respelled).is_err(),
            "a respelled sealing opened: {respelled:?}"
        );
    }

    // The boundary between key name and payload moved by one character: the tag of
    // (key, payload) does not seal (key + c, payload without c).
    if let Some(c) = payload.chars().next() {
        let moved = format!("{}|{tag}", &payload[c.len_utf8()..]);
        assert!(sealer.open(purpose, &format!("{key}{c}"), &moved).is_err());
    }
}

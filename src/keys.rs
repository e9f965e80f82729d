//! Keyed digests that name what the broker stores: tokens and users, never in clear.
//!
//! Every key is HMAC-SHA256(cache secret, label | parts...), each part length-prefixed, so a
//! Redis dump cannot be checked against guessed tokens or user names without the secret, and
//! ("ab", "c") and ("a", "bc") never collide. The labels carry the key-format version: a change
//! of format changes every key, and entries written by an older broker are simply not found.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use extauth_protocol::extauth::Secret;

/// A 32-byte HMAC-SHA256 digest naming a token or a user.
pub(crate) type Key = [u8; 32];

/// Derives keys with the cache secret. Cheap to clone.
#[derive(Clone)]
pub(crate) struct KeyDeriver {
    mac: Hmac<Sha256>,
}

impl KeyDeriver {
    /// A deriver keyed with `secret`.
    pub(crate) fn new(secret: &Secret) -> Self {
        let mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
            .expect("HMAC takes any key length");
        KeyDeriver { mac }
    }

    /// The key of what a provider said about `token` on `domain`. Validators whose answer
    /// depends on the user asked about (a site API with `{user}` in its URL) pass that `user`,
    /// so each user's answer is kept apart; for the others one answer serves every user the
    /// token is tried for (one provider call per token, not per user).
    pub(crate) fn token(&self, domain: &str, token: &str, user: Option<&str>) -> Key {
        match user {
            None => self.digest(&[
                b"extauth-broker/token/v2",
                domain.as_bytes(),
                token.as_bytes(),
            ]),
            Some(user) => self.digest(&[
                b"extauth-broker/token-for-user/v2",
                domain.as_bytes(),
                user.as_bytes(),
                token.as_bytes(),
            ]),
        }
    }

    /// The key of `user@domain` itself: what a verdict binds to, and where the user's
    /// revocation mark and "seen" marker live.
    pub(crate) fn user(&self, domain: &str, user: &str) -> Key {
        self.digest(&[
            b"extauth-broker/user/v2",
            domain.as_bytes(),
            user.as_bytes(),
        ])
    }

    fn digest(&self, parts: &[&[u8]]) -> Key {
        let mut mac = self.mac.clone();
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

/// The first 8 bytes of a key, as the in-process tables keep it (the L1 verdict's named user,
/// the "seen" markers, the revocation marks). A 64-bit slice of an HMAC output: two keys share
/// it by a 2^-64 chance, and nobody can aim at a given one without the cache secret.
pub(crate) fn short(key: &Key) -> u64 {
    u64::from_le_bytes(key[..8].try_into().expect("8 bytes"))
}

/// Reads a key as `hex::encode` writes it: 64 lowercase hex digits; `None` for anything else
/// (capitals included), so a stored value has one spelling only.
pub(crate) fn parse_hex(text: &str) -> Option<Key> {
    if !lowercase_hex(text) {
        return None;
    }
    let mut key = [0u8; 32];
    hex::decode_to_slice(text, &mut key).ok()?;
    Some(key)
}

/// Only the digits `hex::encode` writes (`0-9`, `a-f`)?
pub(crate) fn lowercase_hex(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_domains_users_tokens_and_kinds_apart() {
        let d = KeyDeriver::new(&Secret::new("k".repeat(32)));
        let base = d.token("example.com", "tok", None);
        assert_eq!(base, d.token("example.com", "tok", None));
        assert_ne!(base, d.token("example.org", "tok", None));
        assert_ne!(base, d.token("example.com", "tok2", None));
        assert_ne!(base, d.token("example.com", "tok", Some("alice")));
        assert_ne!(
            d.token("example.com", "tok", Some("alice")),
            d.token("example.com", "tok", Some("bob"))
        );
        assert_ne!(d.token("a", "bc", None), d.token("ab", "c", None));
        assert_ne!(d.user("example.com", "alice"), d.user("example.com", "bob"));
        assert_ne!(
            d.user("example.com", "alice"),
            d.user("example.org", "alice")
        );
        let other = KeyDeriver::new(&Secret::new("j".repeat(32)));
        assert_ne!(base, other.token("example.com", "tok", None));
        assert_eq!(parse_hex(&hex::encode(base)), Some(base));
        assert_eq!(parse_hex("zz"), None);
        // Found by the redis_payloads fuzz target: a user key in capitals parsed, so a verdict
        // payload had two spellings.
        assert_eq!(parse_hex(&hex::encode_upper(base)), None);
    }
}

//! Authenticated values for untrusted storage (Redis keys, values and pub/sub messages).
//!
//! Redis is untrusted storage (docs/security.md): whoever can write to it must not be able to
//! plant, alter or move a value the broker believes. Every value the broker writes is sealed
//! with a tag, `payload|tag`, where the tag is the first 16 bytes (32 hex digits) of
//! HMAC-SHA256(seal key, purpose | key name | payload), each part length-prefixed. The seal key is
//! derived from the cache secret (HMAC-SHA256(cache secret, `extauth-broker/seal/v2`)), so a
//! writer without the secret cannot forge a tag; binding the tag to the key name and the purpose
//! means a genuine value cannot be copied under another key (another user's, another token's) or
//! read as another kind of value. What a MAC cannot stop, replaying an older genuine value under
//! its own key, is bounded by the instants the value carries (see `docs/security.md`).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::keys;
use extauth_protocol::extauth::Secret;

/// Bytes of the HMAC kept as the tag (128 bits, as RFC 2104 section 5 allows).
const TAG_BYTES: usize = 16;

/// What a sealed value is for; part of the tag, so one kind of value cannot pass for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A cached token verdict.
    Entry,
    /// A user's revocation mark.
    UserMark,
    /// A token's revocation mark.
    TokenMark,
    /// A "seen" marker (for `isuser`).
    Seen,
    /// A revocation hint published on the pub/sub channel.
    Hint,
}

impl Purpose {
    /// The label mixed into the tag, and used as a metric label for values that fail.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Entry => "entry",
            Purpose::UserMark => "user_mark",
            Purpose::TokenMark => "token_mark",
            Purpose::Seen => "seen",
            Purpose::Hint => "hint",
        }
    }
}

/// Why a stored value was not believed. The caller treats it as a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// No `|tag` at the end, or a tag that is not 32 lowercase hex digits.
    #[error("the value carries no well-formed tag")]
    Malformed,
    /// The tag does not match: written without the cache secret, altered, or moved from
    /// another key.
    #[error("the value's tag does not match (forged, altered or moved)")]
    BadTag,
}

/// Seals and opens values with a key derived from the cache secret. Cheap to clone.
#[derive(Clone)]
pub struct Sealer {
    mac: Hmac<Sha256>,
}

impl Sealer {
    /// A sealer keyed from `cache_secret`.
    pub fn new(cache_secret: &Secret) -> Self {
        let mut derive = Hmac::<Sha256>::new_from_slice(cache_secret.expose().as_bytes())
            .expect("HMAC takes any key length");
        derive.update(b"extauth-broker/seal/v2");
        let key = derive.finalize().into_bytes();
        Sealer {
            mac: Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length"),
        }
    }

    /// `payload|tag` for storing `payload` under `key_name` as a value for `purpose`.
    pub fn seal(&self, purpose: Purpose, key_name: &str, payload: &str) -> String {
        let tag = self.tag(purpose, key_name, payload);
        let mut sealed = String::with_capacity(payload.len() + 1 + 2 * TAG_BYTES);
        sealed.push_str(payload);
        sealed.push('|');
        sealed.push_str(&hex::encode(tag));
        sealed
    }

    /// The payload of a value sealed by [`Sealer::seal`] with the same purpose and key name.
    ///
    /// # Errors
    /// [`SealError`] for anything else; the comparison takes constant time.
    pub fn open<'a>(
        &self,
        purpose: Purpose,
        key_name: &str,
        value: &'a str,
    ) -> Result<&'a str, SealError> {
        let (payload, tag_hex) = value.rsplit_once('|').ok_or(SealError::Malformed)?;
        if !keys::lowercase_hex(tag_hex) {
            // One spelling per sealed value: a tag in capitals is not the tag `seal` wrote.
            return Err(SealError::Malformed);
        }
        let mut tag = [0u8; TAG_BYTES];
        hex::decode_to_slice(tag_hex, &mut tag).map_err(|_| SealError::Malformed)?;
        let expected = self.tag(purpose, key_name, payload);
        if bool::from(expected.ct_eq(&tag)) {
            Ok(payload)
        } else {
            Err(SealError::BadTag)
        }
    }

    fn tag(&self, purpose: Purpose, key_name: &str, payload: &str) -> [u8; TAG_BYTES] {
        let mut mac = self.mac.clone();
        for part in [purpose.as_str(), key_name, payload] {
            // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(&full[..TAG_BYTES]);
        tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(secret: &str) -> Sealer {
        Sealer::new(&Secret::new(secret.repeat(32)))
    }

    #[test]
    fn sealed_values_open_only_under_their_key_purpose_and_secret() {
        let s = sealer("a");
        let v = s.seal(Purpose::Entry, "k1", "1|accepted|5");
        assert_eq!(s.open(Purpose::Entry, "k1", &v), Ok("1|accepted|5"));
        assert_eq!(s.open(Purpose::Entry, "k2", &v), Err(SealError::BadTag));
        assert_eq!(s.open(Purpose::Seen, "k1", &v), Err(SealError::BadTag));
        assert_eq!(
            sealer("b").open(Purpose::Entry, "k1", &v),
            Err(SealError::BadTag)
        );
        let altered = v.replacen("accepted", "acceptee", 1);
        assert_eq!(
            s.open(Purpose::Entry, "k1", &altered),
            Err(SealError::BadTag)
        );
        for garbage in ["", "1|accepted|5", "x|zz", "x|00", &format!("{v}0")] {
            assert!(s.open(Purpose::Entry, "k1", garbage).is_err(), "{garbage}");
        }
        // Found by the sealed_values fuzz target: the genuine tag in capitals opened.
        let (payload, tag) = v.rsplit_once('|').unwrap();
        let capitals = format!("{payload}|{}", tag.to_uppercase());
        assert_eq!(
            s.open(Purpose::Entry, "k1", &capitals),
            Err(SealError::Malformed)
        );
    }
}

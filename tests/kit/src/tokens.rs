//! Test-only JWTs signed with the committed fixture keys (`tests/fixtures/jwt/`, never used
//! anywhere else). Shared by `tests/integration/validators.rs` and the unit tests of `src/validate/jwt.rs`.

use base64::prelude::{Engine as _, BASE64_URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::Sha256;

/// The public halves of every fixture key, as one JWK Set with kids `rsa-a`, `rsa-b`, `ec`, `ed`.
const PUBLIC_JWKS: &str = include_str!("../../fixtures/jwt/public-jwks.json");

/// An HS256 secret for tests (32 bytes, RFC 7518 section 3.2).
pub const HS256_SECRET: &str = "test-only-hs256-secret-0123456789";

/// A fixture key that signs test tokens.
#[derive(Debug, Clone, Copy)]
pub enum Signer {
    /// RSA 2048, kid `rsa-a` in the JWKS, RS256.
    RsaA,
    /// RSA 2048, kid `rsa-b`, RS256.
    RsaB,
    /// P-256, kid `ec`, ES256.
    Ec,
    /// Ed25519, kid `ed`, EdDSA.
    Ed,
    /// [`HS256_SECRET`], HS256.
    Hs256,
}

impl Signer {
    /// The algorithm this key signs with.
    pub fn alg(self) -> Algorithm {
        match self {
            Signer::RsaA | Signer::RsaB => Algorithm::RS256,
            Signer::Ec => Algorithm::ES256,
            Signer::Ed => Algorithm::EdDSA,
            Signer::Hs256 => Algorithm::HS256,
        }
    }

    fn key(self) -> EncodingKey {
        let pem = |text: &str| text.as_bytes().to_vec();
        match self {
            Signer::RsaA => {
                EncodingKey::from_rsa_pem(&pem(include_str!("../../fixtures/jwt/rsa-a.pem")))
            }
            Signer::RsaB => {
                EncodingKey::from_rsa_pem(&pem(include_str!("../../fixtures/jwt/rsa-b.pem")))
            }
            Signer::Ec => {
                EncodingKey::from_ec_pem(&pem(include_str!("../../fixtures/jwt/ec-p256.pem")))
            }
            Signer::Ed => {
                EncodingKey::from_ed_pem(&pem(include_str!("../../fixtures/jwt/ed25519.pem")))
            }
            Signer::Hs256 => Ok(EncodingKey::from_secret(HS256_SECRET.as_bytes())),
        }
        .expect("fixture key")
    }
}

/// A token signed by `signer`, its header naming `kid`.
pub fn sign(signer: Signer, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(signer.alg());
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &signer.key()).expect("signing")
}

/// A token with any header, "signed" with HMAC-SHA256 under `hmac_key`: how forgeries are made
/// (`alg: none` with an empty signature, or HS256 keyed with a public key's bytes).
pub fn forge(header: &Value, claims: &Value, hmac_key: Option<&[u8]>) -> String {
    let part = |v: &Value| BASE64_URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    let message = format!("{}.{}", part(header), part(claims));
    let signature = match hmac_key {
        Some(key) => {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
            mac.update(message.as_bytes());
            BASE64_URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        }
        None => String::new(),
    };
    format!("{message}.{signature}")
}

/// The public JWK of fixture key `kid`.
pub fn public_jwk(kid: &str) -> Value {
    let set: Value = serde_json::from_str(PUBLIC_JWKS).unwrap();
    set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap_or_else(|| panic!("no fixture key {kid}"))
        .clone()
}

/// A JWK Set holding the fixture keys `kids`.
pub fn jwks(kids: &[&str]) -> Value {
    json!({ "keys": kids.iter().map(|k| public_jwk(k)).collect::<Vec<_>>() })
}

//! Where a run's tokens come from: minted by the harness for its mock provider (opaque
//! self-describing tokens answered by introspection, or JWTs verified against the mock's JWKS),
//! or listed in a file of real users' tokens for a real provider (`--token-file`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::prelude::{Engine as _, BASE64_URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::SigningKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use extauth_broker::is_canonical;

/// `kid` of the mock provider's signing key.
const KID: &str = "extauth-load";

/// The audience of the mock's JWT access tokens: what brokers under test require.
pub const AUDIENCE: &str = "xmpp";

/// The harness's token maker (see [`super::scenario`] for the opaque format).
pub enum Tokens {
    /// Opaque `RUN.N.EXP.NONCE` tokens, answered by the mock's introspection resolver.
    Opaque,
    /// JWTs signed by the mock provider's key; the broker verifies them against its JWKS.
    Jwt(Box<Signer>),
    /// Real users' tokens from `--token-file`, for a real provider.
    Listed(Logins),
}

impl Tokens {
    /// A valid token of user `user` (`userN` for minted tokens) expiring at `exp_s` (seconds
    /// since the epoch; minted tokens only), made unique by `nonce`.
    pub fn valid(&self, run: &str, user: u64, exp_s: u64, nonce: u64) -> (String, String) {
        let name = format!("user{user}");
        match self {
            Tokens::Opaque => (name, format!("{run}.{user}.{exp_s}.{nonce}")),
            Tokens::Jwt(signer) => {
                let token = signer.sign(&signer.key, &name, exp_s, &format!("{run}.{nonce}"));
                (name, token)
            }
            Tokens::Listed(logins) => {
                let login = &logins.entries[(user % logins.len()) as usize];
                (login.user.clone(), login.token.clone())
            }
        }
    }

    /// A token the provider does not accept: unknown to introspection, or a JWT whose signature
    /// is not the provider's (same `kid`, another key).
    pub fn unknown(&self, run: &str, user: u64, exp_s: u64, nonce: u64) -> String {
        match self {
            Tokens::Jwt(signer) => signer.sign(
                &signer.stranger,
                &format!("user{user}"),
                exp_s,
                &format!("{run}.x.{nonce}"),
            ),
            Tokens::Opaque | Tokens::Listed(_) => format!("{run}.x.{nonce}"),
        }
    }

    /// A user other than the owner of token `user` (who presents it as theirs).
    pub fn thief(&self, user: u64, tokens: u64) -> String {
        match self {
            Tokens::Listed(logins) => logins.thief(user),
            _ => format!("user{}", (user + 1) % tokens.max(2)),
        }
    }
}

/// An Ed25519 key pair of the mock provider (generated per run) and a stranger's key.
pub struct Signer {
    key: EncodingKey,
    stranger: EncodingKey,
    header: Header,
    /// The provider's JWK Set (RFC 7517 section 5; RFC 8037 for `OKP`/`Ed25519`).
    pub jwks: Value,
}

impl Signer {
    /// Generates the keys.
    ///
    /// # Errors
    /// When a key cannot be encoded (PKCS#8).
    pub fn generate() -> Result<Signer> {
        let key = SigningKey::from_bytes(&rand::random());
        let public = BASE64_URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes());
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(KID.into());
        header.typ = Some("at+jwt".into());
        Ok(Signer {
            key: encoding_key(&key)?,
            stranger: encoding_key(&SigningKey::from_bytes(&rand::random()))?,
            header,
            jwks: json!({"keys": [{
                "kty": "OKP", "crv": "Ed25519", "x": public,
                "kid": KID, "alg": "EdDSA", "use": "sig",
            }]}),
        })
    }

    fn sign(&self, key: &EncodingKey, user: &str, exp_s: u64, jti: &str) -> String {
        // An RFC 9068 access token: the user in `sub`, this service in `aud`, the client apart.
        let claims = json!({
            "sub": user, "aud": AUDIENCE, "client_id": "extauth-load",
            "exp": exp_s, "jti": jti,
        });
        // Signing a JSON object with a valid Ed25519 key cannot fail.
        jsonwebtoken::encode(&self.header, &claims, key).expect("EdDSA signing")
    }
}

fn encoding_key(key: &SigningKey) -> Result<EncodingKey> {
    let der = key
        .to_pkcs8_der()
        .context("encoding the mock signing key")?;
    Ok(EncodingKey::from_ed_der(der.as_bytes()))
}

/// One line of a token file.
struct Login {
    user: String,
    token: String,
}

/// Real users' valid tokens (`--token-file`), sorted by user so the next user's first entry is
/// the thief of a foreign-token request.
pub struct Logins {
    entries: Vec<Login>,
    /// For each entry, the index of the first entry of the next user (cyclic).
    next_user: Vec<usize>,
}

impl Logins {
    /// Reads `path`: one `USER TOKEN` pair per line (USER is the localpart ejabberd sends),
    /// blank lines and `#` comments skipped.
    ///
    /// # Errors
    /// An unreadable file, a malformed line (named by its number only: tokens are secrets), no
    /// entry, or (with `need_two_users`) fewer than two distinct users.
    pub fn read(path: &Path, need_two_users: bool) -> Result<Logins> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --token-file {}", path.display()))?;
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_whitespace().collect::<Vec<_>>()[..] {
                [user, token] => {
                    check_localpart(user)
                        .with_context(|| format!("{}:{}", path.display(), n + 1))?;
                    entries.push(Login {
                        user: user.into(),
                        token: token.into(),
                    })
                }
                _ => bail!("{}:{}: want `USER TOKEN`", path.display(), n + 1),
            }
        }
        entries.sort_by(|a, b| a.user.cmp(&b.user));
        let next_user = next_user(&entries);
        if entries.is_empty() {
            bail!("{}: no `USER TOKEN` line", path.display());
        }
        if need_two_users && next_user[0] == 0 {
            bail!(
                "{}: foreign-token requests need tokens of at least two users",
                path.display()
            );
        }
        Ok(Logins { entries, next_user })
    }

    /// Entries in the file.
    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Whether the file had no entry (never true after [`Logins::read`]).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn thief(&self, i: u64) -> String {
        let i = (i % self.len()) as usize;
        self.entries[self.next_user[i]].user.clone()
    }
}

/// ejabberd sends the localpart after nodeprep (lower case, NFKC, no `@`, `:` or spaces): a name
/// in another form would be compared with the broker's answer wrongly, so it is refused here.
fn check_localpart(user: &str) -> Result<()> {
    if is_canonical(user) {
        return Ok(());
    }
    match stringprep::nodeprep(user) {
        Ok(form) if !form.is_empty() => {
            bail!("user {user:?} is not in ejabberd's normalised form: write {form:?}")
        }
        _ => bail!("{user:?} cannot be an XMPP localpart"),
    }
}

/// For each entry of a list sorted by user, the first entry of the next user, wrapping around.
fn next_user(entries: &[Login]) -> Vec<usize> {
    let mut next = vec![0; entries.len()];
    let mut start_of_next = 0; // wraps to the first user
    for i in (0..entries.len()).rev() {
        next[i] = start_of_next;
        if i == 0 || entries[i - 1].user != entries[i].user {
            start_of_next = i;
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thieves_are_other_users() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# users\nbob t1\nalice t2\n\nbob t3\ncarol t4\n").unwrap();
        let logins = Logins::read(&path, true).unwrap();
        let owners: Vec<_> = logins.entries.iter().map(|l| l.user.as_str()).collect();
        assert_eq!(owners, ["alice", "bob", "bob", "carol"]);
        let thieves: Vec<_> = (0..4).map(|i| logins.thief(i)).collect();
        assert_eq!(thieves, ["bob", "carol", "carol", "alice"]);
    }

    #[test]
    fn bad_token_files_are_refused_without_echoing_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "alice secret-token extra\n").unwrap();
        let err = Logins::read(&path, false).err().unwrap().to_string();
        assert!(err.ends_with("tokens:1: want `USER TOKEN`"), "{err}");
        std::fs::write(&path, "alice t1\nalice t2\n").unwrap();
        assert!(Logins::read(&path, true).is_err(), "one user cannot steal");
        assert_eq!(Logins::read(&path, false).unwrap().len(), 2);
        std::fs::write(&path, "USER3 t1\n").unwrap();
        let err = format!("{:#}", Logins::read(&path, false).err().unwrap());
        assert!(err.contains("write \"user3\""), "{err}");
        std::fs::write(&path, "a@b t1\n").unwrap();
        assert!(Logins::read(&path, false).is_err());
        std::fs::write(&path, "a:b t1\n").unwrap();
        assert!(Logins::read(&path, false).is_err());
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(Logins::read(&path, false).is_err());
    }

    #[test]
    fn jwts_carry_the_claims_and_verify_against_the_jwks() {
        let signer = Signer::generate().unwrap();
        let tokens = Tokens::Jwt(Box::new(signer));
        let (user, token) = tokens.valid("run", 7, 4_102_444_800, 1);
        assert_eq!(user, "user7");
        let Tokens::Jwt(signer) = &tokens else {
            unreachable!()
        };
        let jwk: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(signer.jwks["keys"][0].clone()).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
        let mut rules = jsonwebtoken::Validation::new(Algorithm::EdDSA);
        rules.set_audience(&[AUDIENCE]);
        let claims = jsonwebtoken::decode::<Value>(&token, &key, &rules).unwrap();
        assert_eq!(claims.claims["sub"], "user7");
        assert_eq!(claims.header.kid.as_deref(), Some(KID));
        let forged = tokens.unknown("run", 7, 4_102_444_800, 1);
        assert!(jsonwebtoken::decode::<Value>(&forged, &key, &rules).is_err());
    }
}

//! Per-domain (vhost) runtime: the domain's validator, and the rules that bind a token to the
//! JID it logs in and turn a provider answer into a cacheable verdict.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::cache::{now_ms, Verdict};
use crate::config::{ClaimMapping, Config, DomainConfig};
use crate::directory::Directory;
use crate::validate::{self, Grant, Validation, Validator};
use crate::wire::Reason;

/// One served domain.
pub struct Domain {
    /// Its settings.
    pub config: DomainConfig,
    /// Its validator (behind a circuit breaker).
    pub validator: Arc<dyn Validator>,
    /// Its user directory, when `isuser = "directory"`.
    pub directory: Option<Directory>,
}

/// Every served domain, looked up by the (lowercase) domain ejabberd sends.
pub struct Domains {
    named: HashMap<String, Arc<Domain>>,
    /// Serves any domain when none is configured.
    any: Option<Arc<Domain>>,
}

impl Domains {
    /// Builds every domain's validator.
    ///
    /// # Errors
    /// A validator that cannot be built, naming its domain.
    pub fn build(config: &Config) -> Result<Domains> {
        let build = |c: &DomainConfig| -> Result<Arc<Domain>> {
            let validator = validate::build(&c.validator, c.breaker).map_err(anyhow::Error::msg)?;
            let directory = c
                .directory
                .clone()
                .map(Directory::new)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            Ok(Arc::new(Domain {
                config: c.clone(),
                validator,
                directory,
            }))
        };
        let mut named = HashMap::new();
        for (name, c) in &config.domains {
            named.insert(
                name.clone(),
                build(c).with_context(|| format!("domain {name}"))?,
            );
        }
        let any = config.any_domain.as_ref().map(build).transpose()?;
        Ok(Domains { named, any })
    }

    /// The domain serving `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Arc<Domain>> {
        self.named.get(name).or(self.any.as_ref())
    }
}

impl Domain {
    /// Turns a provider answer on a token used for `user@domain` into a cacheable verdict, or
    /// an error message for an answer that must not be cached.
    ///
    /// Lifetimes: positive = min(`exp` - now, `max_ttl`) (RFC 7662 section 4), usable for
    /// `stale_if_error` more but never past `exp`; negative = `negative_ttl`.
    pub fn decide(
        &self,
        user: &str,
        domain: &str,
        validation: Validation,
    ) -> Result<Verdict, String> {
        let now = now_ms();
        let negative = |reason| {
            let until = now + self.config.negative_ttl.as_millis() as u64;
            Verdict {
                ok: false,
                reason,
                fresh_until_ms: until,
                usable_until_ms: until,
            }
        };
        let grant = match validation {
            Validation::Unavailable(why) => return Err(why),
            Validation::Invalid(reason) => return Ok(negative(reason)),
            Validation::Valid(grant) => grant,
        };
        let exp_ms = grant.exp.map(|s| s.saturating_mul(1000));
        if exp_ms.is_some_and(|e| e <= now) {
            return Ok(negative(Reason::Expired));
        }
        if !self.binds(&grant, user, domain) {
            return Ok(negative(Reason::WrongUser));
        }
        let cap = |t: u64| exp_ms.map_or(t, |e| e.min(t));
        let fresh_until_ms = cap(now + self.config.max_ttl.as_millis() as u64);
        let usable_until_ms = cap(fresh_until_ms + self.config.stale_if_error.as_millis() as u64);
        Ok(Verdict {
            ok: true,
            reason: Reason::Accepted,
            fresh_until_ms,
            usable_until_ms,
        })
    }

    /// Does the grant name `user@domain`?
    fn binds(&self, grant: &Grant, user: &str, domain: &str) -> bool {
        if grant.user_confirmed {
            return true;
        }
        let claim = |name: &str| grant.claims.get(name).and_then(Value::as_str);
        match &self.config.claim {
            ClaimMapping::Localpart(name) => {
                let subject = claim(name).or_else(|| claim("sub"));
                subject.and_then(normalise_localpart).as_deref() == Some(user)
            }
            ClaimMapping::Jid(name) => claim(name)
                .and_then(split_jid)
                .is_some_and(|(u, d)| u == user && d == domain),
        }
    }
}

/// ejabberd normalises the localpart with nodeprep (RFC 3920 appendix A, stringprep: case
/// folding, NFKC, prohibited characters) before it calls extauth; the token's claim may not be,
/// so apply the same profile to it. `None` when the claim cannot be a localpart at all.
pub fn normalise_localpart(claim: &str) -> Option<Cow<'_, str>> {
    stringprep::nodeprep(claim).ok().filter(|s| !s.is_empty())
}

/// Splits a JID claim `user@domain[/resource]` into its nodeprep'd localpart and its
/// nameprep'd domain (RFC 3920 section 3).
fn split_jid(jid: &str) -> Option<(String, String)> {
    let bare = jid.split_once('/').map_or(jid, |(bare, _)| bare);
    let (user, domain) = bare.split_once('@')?;
    let user = normalise_localpart(user)?.into_owned();
    let domain = stringprep::nameprep(domain).ok()?.into_owned();
    Some((user, domain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::introspection::IntrospectionConfig;
    use crate::validate::ValidatorConfig;
    use serde_json::json;
    use std::time::Duration;

    fn domain(claim: ClaimMapping, stale_if_error: u64) -> Domain {
        let config = DomainConfig {
            validator: ValidatorConfig::Introspection(IntrospectionConfig {
                url: "http://127.0.0.1:9/".into(),
                client_id: "c".into(),
                client_secret: Some(crate::extauth::Secret::new("s".into())),
                client_secret_file: None,
                client_auth: Default::default(),
                require: Default::default(),
                timeouts: Default::default(),
            }),
            claim,
            max_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(10),
            seen_ttl: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(stale_if_error),
            breaker: Default::default(),
            isuser: Default::default(),
            directory: None,
        };
        let validator = validate::build(&config.validator, config.breaker).unwrap();
        Domain {
            config,
            validator,
            directory: None,
        }
    }

    fn valid(claims: Value, exp: Option<u64>) -> Validation {
        Validation::Valid(Grant {
            claims: claims.as_object().unwrap().clone(),
            exp,
            user_confirmed: false,
        })
    }

    #[test]
    fn claims_are_normalised_like_ejabberd_nodeprep() {
        assert_eq!(normalise_localpart("Alice").as_deref(), Some("alice"));
        assert_eq!(normalise_localpart("ÉLODIE").as_deref(), Some("élodie"));
        assert_eq!(
            normalise_localpart("ｊｏｅ").as_deref(),
            Some("joe"),
            "NFKC folds full-width letters"
        );
        assert_eq!(normalise_localpart("a@b"), None);
        assert_eq!(normalise_localpart("a b"), None);
        assert_eq!(normalise_localpart(""), None);
    }

    #[test]
    fn localpart_claims_bind_the_user() {
        let d = domain(ClaimMapping::Localpart("username".into()), 0);
        let ok = |v: Validation, user: &str| d.decide(user, "example.com", v).unwrap().ok;
        assert!(ok(valid(json!({"username": "Alice"}), None), "alice"));
        assert!(!ok(valid(json!({"username": "alice"}), None), "bob"));
        assert!(
            ok(valid(json!({"sub": "bob"}), None), "bob"),
            "sub fallback"
        );
        assert!(
            !ok(
                valid(json!({"username": "alice", "sub": "bob"}), None),
                "bob"
            ),
            "configured claim first"
        );
        assert!(!ok(valid(json!({}), None), "alice"), "no subject");
        assert!(!ok(valid(json!({"username": 7}), None), "alice"));
        let confirmed = Validation::Valid(Grant {
            user_confirmed: true,
            ..Grant::default()
        });
        assert!(ok(confirmed, "anyone"));
    }

    #[test]
    fn jid_claims_bind_user_and_domain() {
        let d = domain(ClaimMapping::Jid("jid".into()), 0);
        let ok = |jid: &str, user: &str, dom: &str| {
            d.decide(user, dom, valid(json!({"jid": jid}), None))
                .unwrap()
                .ok
        };
        assert!(ok("Alice@Example.COM/phone", "alice", "example.com"));
        assert!(!ok("alice@example.org", "alice", "example.com"));
        assert!(!ok("alice@example.com", "bob", "example.com"));
        assert!(!ok("example.com", "alice", "example.com"));
    }

    #[test]
    fn lifetimes_follow_exp_max_ttl_and_stale_if_error() {
        let now_s = now_ms() / 1000;
        let d = domain(ClaimMapping::Localpart("username".into()), 120);
        let v = d
            .decide(
                "alice",
                "x",
                valid(json!({"username": "alice"}), Some(now_s + 60)),
            )
            .unwrap();
        assert!(
            v.fresh_until_ms <= (now_s + 60) * 1000 && v.usable_until_ms == v.fresh_until_ms,
            "capped by exp: {v:?}"
        );
        let v = d
            .decide("alice", "x", valid(json!({"username": "alice"}), None))
            .unwrap();
        assert!(
            (v.usable_until_ms - v.fresh_until_ms) == 120_000,
            "stale grace without exp: {v:?}"
        );
        let v = d
            .decide(
                "alice",
                "x",
                valid(json!({"username": "alice"}), Some(now_s.saturating_sub(1))),
            )
            .unwrap();
        assert_eq!((v.ok, v.reason), (false, Reason::Expired));
        assert!(d
            .decide("alice", "x", Validation::Unavailable("down".into()))
            .is_err());
        let v = d
            .decide("alice", "x", Validation::Invalid(Reason::Inactive))
            .unwrap();
        assert_eq!((v.ok, v.reason), (false, Reason::Inactive));
    }
}

//! Per-domain (vhost) runtime: the domain's validator and directory, and the rules that turn a
//! provider's answer into a verdict bound to one user ([`crate::binding`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::binding::Unbound;
use crate::config::{Config, DomainConfig};
use crate::directory::Directory;
use crate::keys::KeyDeriver;
use crate::metrics;
use crate::throttle::Throttle;
use crate::validate::http::ProviderPolicy;
use crate::validate::ProviderError;
use crate::validate::{self, TokenCheck, Validation, Validator};
use crate::verdict::{now_ms, Answer, Verdict};
use extauth_protocol::wire::Reason;

/// A provider whose `exp` is this far in the past while it says the token is active has a
/// clock or time-zone problem worth a warning (s).
const CLOCK_SKEW_WARN_S: u64 = 300;

/// How often each kind of per-token diagnostic may be logged per domain.
const DIAGNOSTIC_EVERY: Duration = Duration::from_secs(60);

/// One served domain.
pub struct Domain {
    /// Its settings.
    pub config: DomainConfig,
    /// Its validator (behind a circuit breaker).
    pub validator: Arc<dyn Validator>,
    /// Its user directory, when `isuser = "directory"`.
    pub directory: Option<Directory>,
    skew_log: Throttle,
    unbound_log: Throttle,
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
        let mut named = HashMap::new();
        for (name, c) in &config.domains {
            named.insert(
                name.clone(),
                Arc::new(
                    Domain::build(c, &config.provider).with_context(|| format!("domain {name}"))?,
                ),
            );
        }
        let any = config
            .any_domain
            .as_ref()
            .map(|c| Domain::build(c, &config.provider))
            .transpose()?
            .map(Arc::new);
        Ok(Domains { named, any })
    }

    /// The domain serving `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Arc<Domain>> {
        self.named.get(name).or(self.any.as_ref())
    }

    /// Every domain with its name (`*` for the one serving any domain).
    fn all(&self) -> impl Iterator<Item = (&str, &Arc<Domain>)> {
        let named = self.named.iter().map(|(n, d)| (n.as_str(), d));
        named.chain(self.any.iter().map(|d| ("*", d)))
    }

    /// Discovers now the endpoint of every validator configured with `issuer` alone:
    /// `(domain, what is discovered, the URL or why not)`, for `check-config`.
    pub async fn discover(&self) -> Vec<(String, String, Result<String, ProviderError>)> {
        let mut found = Vec::new();
        for (name, domain) in self.all() {
            if let Some(url) = domain.validator.discovered() {
                let got = url.get().await;
                found.push((name.to_owned(), url.to_string(), got));
            }
        }
        found
    }

    /// Starts discovering endpoints in the background, so the first login does not wait for
    /// it (and a provider that cannot be discovered is logged at start-up).
    pub fn prefetch(&self) {
        for (_, domain) in self.all() {
            if let Some(url) = domain.validator.discovered() {
                tokio::spawn(async move {
                    let _ = url.get().await;
                });
            }
        }
    }
}

impl Domain {
    /// Builds the domain's validator and directory.
    ///
    /// # Errors
    /// A validator or directory that cannot be built (the message names the setting).
    pub fn build(config: &DomainConfig, policy: &ProviderPolicy) -> Result<Domain> {
        let validator = validate::build(
            &config.validator,
            config.breaker,
            config.provider_concurrency,
            policy,
        )
        .map_err(anyhow::Error::msg)?;
        let directory = config
            .directory
            .clone()
            .map(|d| Directory::new(d, policy))
            .transpose()
            .map_err(anyhow::Error::msg)?;
        Ok(Domain {
            config: config.clone(),
            validator,
            directory,
            skew_log: Throttle::new(DIAGNOSTIC_EVERY),
            unbound_log: Throttle::new(DIAGNOSTIC_EVERY),
        })
    }

    /// Turns a provider's answer on `check.token` into a verdict issued at `issued_ms` (when the
    /// flight started). An `Unavailable` answer is never cached; callers do not pass one (it
    /// would be refused as `upstream_unavailable`).
    ///
    /// Lifetimes: a valid token's verdict lives min(`exp`, issued + `max_ttl`) (RFC 7662
    /// section 4), usable for `stale_if_error` longer but never past `exp`; a refusal lives
    /// `negative_ttl`.
    pub fn verdict(
        &self,
        validation: Validation,
        check: &TokenCheck<'_>,
        keys: &KeyDeriver,
        issued_ms: u64,
    ) -> Verdict {
        let refused = |reason| self.refusal(reason, issued_ms);
        let grant = match validation {
            Validation::Valid(grant) => grant,
            Validation::Invalid(reason) => return refused(reason),
            Validation::Unavailable(_) => return refused(Reason::UpstreamUnavailable),
        };
        let exp_ms = grant.exp.map(|s| s.saturating_mul(1000));
        if let Some(exp) = exp_ms.filter(|e| *e <= now_ms()) {
            self.note_expired_but_active(exp);
            return refused(Reason::Expired);
        }
        let user = if grant.user_confirmed {
            check.user.to_owned()
        } else {
            match self.config.binding.localpart(&grant.claims, check.domain) {
                Ok(user) => user,
                Err(unbound) => {
                    self.note_unbound(&unbound);
                    return refused(unbound.reason);
                }
            }
        };
        let ms = |d: Duration| d.as_millis() as u64;
        let cap = |t: u64| exp_ms.map_or(t, |e| e.min(t));
        let fresh_until_ms = cap(issued_ms + ms(self.config.max_ttl));
        Verdict {
            answer: Answer::Names(keys.user(check.domain, &user)),
            issued_ms,
            fresh_until_ms,
            usable_until_ms: cap(fresh_until_ms + ms(self.config.stale_if_error)),
            exp_ms,
        }
    }

    fn refusal(&self, reason: Reason, issued_ms: u64) -> Verdict {
        let until = issued_ms + self.config.negative_ttl.as_millis() as u64;
        Verdict {
            answer: Answer::Refused(reason),
            issued_ms,
            fresh_until_ms: until,
            usable_until_ms: until,
            exp_ms: None,
        }
    }

    /// A token the provider calls valid whose `exp` passed long ago: a clock or time-zone
    /// problem at the provider (Django with `USE_TZ = False`), which refuses every login.
    fn note_expired_but_active(&self, exp_ms: u64) {
        let skew_s = now_ms().saturating_sub(exp_ms) / 1000;
        if skew_s < CLOCK_SKEW_WARN_S {
            return;
        }
        metrics::provider_clock_skew(self.validator.kind(), skew_s);
        if self.skew_log.allow() {
            warn!(
                validator = self.validator.kind(),
                skew_s,
                "the provider says a token is valid whose exp is {skew_s} s in the past: its clock \
                 or time zone is probably wrong (Django: USE_TZ = True); such logins are refused as expired"
            );
        }
    }

    /// A valid token that names no user of this domain: logged (at a bounded rate) with the
    /// claim and setting involved, so an operator can tell a misconfiguration from an attack.
    fn note_unbound(&self, unbound: &Unbound) {
        metrics::unbound(unbound.reason);
        if self.unbound_log.allow() {
            info!(
                validator = self.validator.kind(),
                reason = unbound.reason.as_str(),
                "token refused: {} (see subject_claim, claim_folding, jid_claim, domain_claim in \
                 docs/configuration.md)",
                unbound.why
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::{BindingRules, Folding, Subject};
    use crate::validate::introspection::IntrospectionConfig;
    use crate::validate::{Grant, ValidatorConfig};
    use extauth_protocol::extauth::Secret;
    use serde_json::{json, Value};

    fn domain(stale_if_error: u64) -> Domain {
        Domain::build(
            &DomainConfig {
                validator: ValidatorConfig::Introspection(IntrospectionConfig {
                    url: Some("http://127.0.0.1:9/".into()),
                    issuer: None,
                    client_id: "c".into(),
                    client_secret: Some(Secret::new("s".into())),
                    client_secret_file: None,
                    client_auth: Default::default(),
                    require: Default::default(),
                    timeouts: Default::default(),
                }),
                binding: BindingRules {
                    subject: Subject::Localpart(vec!["username".into()]),
                    folding: Folding::Exact,
                    domain_claim: None,
                },
                max_ttl: Duration::from_secs(300),
                negative_ttl: Duration::from_secs(10),
                seen_ttl: Duration::from_secs(60),
                stale_if_error: Duration::from_secs(stale_if_error),
                breaker: Default::default(),
                provider_concurrency: 4,
                isuser: Default::default(),
                directory: None,
            },
            &ProviderPolicy::default(),
        )
        .unwrap()
    }

    fn valid(claims: Value, exp: Option<u64>) -> Validation {
        Validation::Valid(Grant {
            claims: claims.as_object().unwrap().clone(),
            exp,
            user_confirmed: false,
        })
    }

    struct Asked {
        keys: KeyDeriver,
        token: Secret,
    }

    impl Asked {
        fn new() -> Self {
            Asked {
                keys: KeyDeriver::new(&Secret::new("k".repeat(32))),
                token: Secret::new("tok".into()),
            }
        }

        /// The decision for `user` on a verdict issued now.
        fn decide(&self, d: &Domain, user: &str, v: Validation) -> (bool, Reason, Verdict) {
            let check = TokenCheck {
                user,
                domain: "example.com",
                token: &self.token,
            };
            let verdict = d.verdict(v, &check, &self.keys, now_ms());
            let (ok, reason) = verdict.decide(&self.keys.user("example.com", user));
            (ok, reason, verdict)
        }
    }

    #[test]
    fn verdicts_name_the_claimed_user_and_refuse_the_rest() {
        let (d, a) = (domain(0), Asked::new());
        let ok = |v, user| a.decide(&d, user, v).1;
        assert_eq!(
            ok(valid(json!({"username": "alice"}), None), "alice"),
            Reason::Accepted
        );
        assert_eq!(
            ok(valid(json!({"username": "alice"}), None), "bob"),
            Reason::WrongUser
        );
        assert_eq!(
            ok(valid(json!({"username": "Alice"}), None), "alice"),
            Reason::NonCanonicalClaim,
            "exact binding by default"
        );
        assert_eq!(
            ok(valid(json!({"sub": "bob"}), None), "bob"),
            Reason::NoUser,
            "no silent fallback to sub"
        );
        let confirmed = Validation::Valid(Grant {
            user_confirmed: true,
            ..Grant::default()
        });
        assert_eq!(ok(confirmed, "anyone"), Reason::Accepted);
        assert_eq!(
            ok(Validation::Invalid(Reason::Inactive), "alice"),
            Reason::Inactive
        );
    }

    #[test]
    fn lifetimes_follow_exp_max_ttl_and_stale_if_error() {
        let (d, a) = (domain(120), Asked::new());
        let now_s = now_ms() / 1000;
        let (_, _, v) = a.decide(
            &d,
            "alice",
            valid(json!({"username": "alice"}), Some(now_s + 60)),
        );
        assert!(
            v.fresh_until_ms <= (now_s + 60) * 1000 && v.usable_until_ms == v.fresh_until_ms,
            "capped by exp: {v:?}"
        );
        let (_, _, v) = a.decide(&d, "alice", valid(json!({"username": "alice"}), None));
        assert_eq!(
            v.usable_until_ms - v.fresh_until_ms,
            120_000,
            "stale grace without exp"
        );
        assert_eq!(
            v.fresh_until_ms - v.issued_ms,
            300_000,
            "max_ttl without exp"
        );
        let (ok, reason, _) = a.decide(
            &d,
            "alice",
            valid(json!({"username": "alice"}), Some(now_s.saturating_sub(1))),
        );
        assert_eq!((ok, reason), (false, Reason::Expired));
        let (_, _, v) = a.decide(&d, "alice", Validation::Invalid(Reason::Inactive));
        assert_eq!(v.fresh_until_ms - v.issued_ms, 10_000, "negative_ttl");
    }
}

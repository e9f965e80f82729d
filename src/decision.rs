//! The decision on a provider's answer: which XMPP user a valid token names, and how long that
//! verdict holds ([`Decider::verdict`]). The per-login decision then compares the named user
//! with the one logging in ([`crate::verdict::Verdict::decide`]).
//!
//! Binding: the rules that bind a valid token's claims to one localpart (and optionally one
//! domain), refusing anything ambiguous.
//!
//! ejabberd sends the localpart after nodeprep (RFC 3920 appendix A; ejabberd's `jid:nodeprep`,
//! Unicode 3.2 tables). A provider's username claim may not be in that form, and folding it the
//! same way is not safe by default: case-sensitive providers (django-oauth-toolkit) have `Dave`
//! and `dave` as two people, and nodeprep's compatibility mappings fold look-alikes (`ａｌｉｃｅ`,
//! `ali\u{ad}ce`, `\u{212a}ate`) onto plain names. So by default ([`Folding::Exact`]) a token
//! logs in `user` only when its subject claim is a string equal to `user`; folding is an explicit
//! per-domain choice, and even then only case may change (see [`Folding`]).
//!
//! A token that names no user logs in nobody: no subject claim, a subject that is not a string
//! (no fallback to another claim), or a machine token whose subject is the client itself
//! (RFC 9068 section 2.2: `sub` is the client id for client-credentials grants).
//!
//! Lifetimes: a valid token's verdict lives min(`exp`, issued + `max_ttl`) (RFC 7662 section
//! 4), usable for `stale_if_error` longer but never past `exp`; a refusal lives `negative_ttl`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use tracing::{info, warn};

use crate::keys::KeyDeriver;
use crate::metrics;
use crate::throttle::Throttle;
use crate::validate::{TokenCheck, Validation};
use crate::verdict::{now_ms, Answer, Lifetimes, Verdict};
use extauth_protocol::wire::Reason;

/// A provider whose `exp` is this far in the past while it says the token is active has a
/// clock or time-zone problem worth a warning (s).
const CLOCK_SKEW_WARN_S: u64 = 300;

/// How often each kind of per-token diagnostic may be logged per domain.
const DIAGNOSTIC_EVERY: Duration = Duration::from_secs(60);

/// How one domain turns its validator's answers into verdicts: its binding rules and
/// lifetimes, and the diagnostics it logs at a bounded rate.
pub(crate) struct Decider {
    binding: BindingRules,
    lifetimes: Lifetimes,
    /// The validator's kind (`introspection`, `jwt`...), for diagnostics and metrics.
    kind: &'static str,
    skew_log: Throttle,
    unbound_log: Throttle,
}

impl Decider {
    /// Decides with `binding` and `lifetimes` on the answers of a validator of `kind`.
    pub(crate) fn new(binding: BindingRules, lifetimes: Lifetimes, kind: &'static str) -> Self {
        Decider {
            binding,
            lifetimes,
            kind,
            skew_log: Throttle::new(DIAGNOSTIC_EVERY),
            unbound_log: Throttle::new(DIAGNOSTIC_EVERY),
        }
    }

    /// The longest this domain lets a verdict live (also for verdicts read back from Redis).
    pub(crate) fn lifetimes(&self) -> &Lifetimes {
        &self.lifetimes
    }

    /// Turns a provider's answer on `check.token` into a verdict issued at `issued_ms` (when
    /// the flight started, ms since the epoch). An `Unavailable` answer is never cached; callers
    /// do not pass one (it would be refused as `upstream_unavailable`).
    pub(crate) fn verdict(
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
            match self.binding.localpart(&grant.claims, check.domain) {
                Ok(user) => user,
                Err(unbound) => {
                    self.note_unbound(&unbound);
                    return refused(unbound.reason);
                }
            }
        };
        let ms = |d: Duration| d.as_millis() as u64;
        let cap = |t: u64| exp_ms.map_or(t, |e| e.min(t));
        let fresh_until_ms = cap(issued_ms + ms(self.lifetimes.max_ttl));
        Verdict {
            answer: Answer::Names(keys.user(check.domain, &user)),
            issued_ms,
            fresh_until_ms,
            usable_until_ms: cap(fresh_until_ms + ms(self.lifetimes.stale_if_error)),
            exp_ms,
        }
    }

    fn refusal(&self, reason: Reason, issued_ms: u64) -> Verdict {
        let until = issued_ms + self.lifetimes.negative_ttl.as_millis() as u64;
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
        metrics::provider_clock_skew(self.kind, skew_s);
        if self.skew_log.allow() {
            warn!(
                validator = self.kind,
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
                validator = self.kind,
                reason = unbound.reason.as_str(),
                "token refused: {} (see subject_claim, claim_folding, jid_claim, domain_claim in \
                 docs/configuration.md)",
                unbound.why
            );
        }
    }
}

/// How a subject claim may differ from the localpart ejabberd sends (TOML `claim_folding`,
/// flag `--claim-folding`, env `EXTAUTH_CLAIM_FOLDING`: the same names everywhere).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Folding {
    /// The claim must equal the localpart exactly (the default; right for providers whose
    /// usernames are case-sensitive, such as django-oauth-toolkit). A claim that is not already
    /// a canonical localpart (`Dave`, `ａｌｉｃｅ`) is refused as `non_canonical_claim`.
    #[default]
    Exact,
    /// ASCII letters are lower-cased first (for providers whose usernames are unique without
    /// case: Keycloak, Entra ID, Google, Okta, Nextcloud). Any other difference is refused.
    AsciiCase,
    /// Case is folded as nodeprep folds it, non-ASCII letters included (`ÉLODIE` logs in
    /// `élodie`), for operators who accept that two names differing only by case are one
    /// person. Still refused: any character removed or remapped by anything but its own
    /// one-to-one case mapping (compatibility forms, fullwidth, math and circled letters,
    /// soft hyphens, zero-width characters), a non-ASCII character folded into ASCII (the
    /// Kelvin sign, long s), code points unassigned in Unicode 3.2 (RFC 3454 table A.1, which
    /// ejabberd refuses), and a mapping that is not stable (applying it twice differs).
    Nodeprep,
}

impl Folding {
    /// The TOML name, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Folding::Exact => "exact",
            Folding::AsciiCase => "ascii_case",
            Folding::Nodeprep => "nodeprep",
        }
    }
}

/// Where the user's name is in the claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Subject {
    /// The first of these claims that is present holds the localpart; a later one is read only
    /// when an earlier one is absent (a present claim that is not a string refuses).
    Localpart(Vec<String>),
    /// This claim holds `user@domain[/resource]`; both parts must match.
    Jid(String),
}

/// A domain's binding rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BindingRules {
    /// Where the user's name is.
    pub subject: Subject,
    /// How it may differ from the localpart.
    pub folding: Folding,
    /// A claim (a string, or an array of strings) that must name the XMPP domain, for
    /// providers shared by several domains.
    pub domain_claim: Option<String>,
}

/// Why a valid token names no user of this domain: the verdict's reason and a log-safe
/// explanation naming the claim and the setting involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unbound {
    /// The refusal reason.
    pub reason: Reason,
    /// For the operator's log (claim names and user names, never a token).
    pub why: String,
}

impl BindingRules {
    /// The canonical localpart `claims` name on `domain`.
    ///
    /// # Errors
    /// [`Unbound`]: `no_user` (no subject, not a string, a machine token), `non_canonical_claim`,
    /// `wrong_domain`.
    pub(crate) fn localpart(
        &self,
        claims: &Map<String, Value>,
        domain: &str,
    ) -> Result<String, Unbound> {
        self.check_domain_claim(claims, domain)?;
        match &self.subject {
            Subject::Localpart(names) => {
                let (name, value) = subject_value(claims, names)?;
                refuse_machine_token(claims, name, value)?;
                canonical(value, self.folding)
                    .map_err(|why| non_canonical(name, value, why, self.folding))
            }
            Subject::Jid(name) => {
                let value = match claims.get(name) {
                    Some(Value::String(v)) => v.as_str(),
                    _ => {
                        return Err(no_user(format!(
                            "claim \"{name}\" is absent or not a string"
                        )))
                    }
                };
                refuse_machine_token(claims, name, value)?;
                let (user, jid_domain) = split_jid(value)
                    .ok_or_else(|| non_canonical(name, value, "not user@domain", self.folding))?;
                if !same_domain(jid_domain, domain) {
                    return Err(Unbound {
                        reason: Reason::WrongDomain,
                        why: format!(
                            "claim \"{name}\" names domain {jid_domain:?}, not {domain:?}"
                        ),
                    });
                }
                canonical(user, self.folding)
                    .map_err(|why| non_canonical(name, value, why, self.folding))
            }
        }
    }

    fn check_domain_claim(&self, claims: &Map<String, Value>, domain: &str) -> Result<(), Unbound> {
        let Some(name) = &self.domain_claim else {
            return Ok(());
        };
        let names = |v: &Value| v.as_str().is_some_and(|d| same_domain(d, domain));
        let ok = match claims.get(name) {
            Some(Value::Array(list)) => list.iter().any(names),
            Some(v) => names(v),
            None => false,
        };
        if ok {
            Ok(())
        } else {
            Err(Unbound {
                reason: Reason::WrongDomain,
                why: format!("claim \"{name}\" (domain_claim) does not name {domain:?}"),
            })
        }
    }
}

/// The first configured subject claim that is present, as a string.
fn subject_value<'c>(
    claims: &'c Map<String, Value>,
    names: &'c [String],
) -> Result<(&'c str, &'c str), Unbound> {
    for name in names {
        match claims.get(name) {
            None => continue,
            Some(Value::String(value)) => return Ok((name, value)),
            Some(_) => {
                return Err(no_user(format!(
                    "claim \"{name}\" is present but not a string (no fallback to another claim)"
                )))
            }
        }
    }
    Err(no_user(format!(
        "no subject claim ({}) in the token: a machine token, or set subject_claim",
        names.join(", ")
    )))
}

/// A token whose subject is the client it was issued to names no person (RFC 9068 section
/// 2.2: client-credentials tokens carry `sub` = `client_id`; `azp` is OIDC's authorized party).
fn refuse_machine_token(
    claims: &Map<String, Value>,
    name: &str,
    value: &str,
) -> Result<(), Unbound> {
    for client in ["client_id", "azp"] {
        if claims.get(client).and_then(Value::as_str) == Some(value) {
            return Err(no_user(format!(
                "claim \"{name}\" equals the token's \"{client}\": a machine (client) token names no user"
            )));
        }
    }
    Ok(())
}

fn no_user(why: String) -> Unbound {
    Unbound {
        reason: Reason::NoUser,
        why,
    }
}

fn non_canonical(name: &str, value: &str, why: &str, folding: Folding) -> Unbound {
    Unbound {
        reason: Reason::NonCanonicalClaim,
        why: format!(
            "claim \"{name}\" = {value:?} is not a canonical localpart ({why}) under claim_folding = \"{}\"",
            folding.as_str()
        ),
    }
}

/// `value` folded as `folding` allows, if the result is a canonical localpart.
///
/// # Errors
/// A short explanation of what is wrong with it.
pub(crate) fn canonical(value: &str, folding: Folding) -> Result<String, &'static str> {
    let folded = match folding {
        Folding::Exact => value.to_owned(),
        Folding::AsciiCase => value.to_ascii_lowercase(),
        Folding::Nodeprep => case_fold_only(value)?,
    };
    if is_canonical(&folded) {
        Ok(folded)
    } else if stringprep::nodeprep(&folded).is_err() {
        Err("not a valid localpart: a space, `@`, `/`, `:` or a prohibited character")
    } else {
        Err("nodeprep would change it: upper case, a look-alike, or a removed character")
    }
}

/// Is `localpart` exactly what ejabberd would send for it: non-empty, at most 1023 bytes
/// (RFC 7622 section 3.3), only code points assigned in Unicode 3.2, and unchanged by nodeprep
/// (applied twice, since the `stringprep` crate's mapping is not always idempotent)?
pub fn is_canonical(localpart: &str) -> bool {
    if localpart.is_empty() || localpart.len() > 1023 || has_unassigned(localpart) {
        return false;
    }
    match stringprep::nodeprep(localpart) {
        Ok(once) if once == localpart => {
            matches!(stringprep::nodeprep(&once), Ok(twice) if twice == localpart)
        }
        _ => false,
    }
}

/// Code points unassigned in Unicode 3.2 (RFC 3454 table A.1). The `stringprep` crate checks
/// them only after mapping with current Unicode, which lets `ᵃlice` (U+1D43, Unicode 4.0) map to
/// `alice`; ejabberd refuses it.
fn has_unassigned(s: &str) -> bool {
    s.chars().any(stringprep::tables::unassigned_code_point)
}

/// Case folding and nothing else: each character lower-cased one-to-one, never a non-ASCII one
/// into ASCII; the result must be what nodeprep gives, so nodeprep removed or remapped nothing.
fn case_fold_only(value: &str) -> Result<String, &'static str> {
    if has_unassigned(value) {
        return Err("holds a code point unassigned in Unicode 3.2");
    }
    let mut folded = String::with_capacity(value.len());
    for c in value.chars() {
        let mut lower = c.to_lowercase();
        let l = match (lower.next(), lower.next()) {
            (Some(l), None) => l,
            _ => return Err("a character lower-cases to several"),
        };
        if !c.is_ascii() && l.is_ascii() {
            return Err("a non-ASCII character folds into ASCII");
        }
        folded.push(l);
    }
    match stringprep::nodeprep(value) {
        Ok(prepped) if prepped == folded => Ok(folded),
        Ok(_) => Err("nodeprep removes or remaps a character beyond its case"),
        Err(_) => Err("not a valid localpart: a space, `@`, `/`, `:` or a prohibited character"),
    }
}

/// Splits `user@domain[/resource]`; `None` without exactly one `@` before the resource.
fn split_jid(jid: &str) -> Option<(&str, &str)> {
    let bare = jid.split_once('/').map_or(jid, |(bare, _)| bare);
    let (user, domain) = bare.split_once('@')?;
    (!domain.contains('@') && !domain.is_empty()).then_some((user, domain))
}

/// Domains compare as ejabberd's nameprep does for the common case: ASCII case-insensitively;
/// anything else must be equal after nameprep.
fn same_domain(claimed: &str, domain: &str) -> bool {
    claimed.eq_ignore_ascii_case(domain) || stringprep::nameprep(claimed).is_ok_and(|c| c == domain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::Grant;
    use extauth_protocol::extauth::Secret;
    use serde_json::json;

    fn rules(subject: &[&str], folding: Folding) -> BindingRules {
        BindingRules {
            subject: Subject::Localpart(subject.iter().map(|s| s.to_string()).collect()),
            folding,
            domain_claim: None,
        }
    }

    fn bind(r: &BindingRules, claims: Value) -> Result<String, Reason> {
        r.localpart(claims.as_object().unwrap(), "example.com")
            .map_err(|u| u.reason)
    }

    const LOOK_ALIKES: [&str; 14] = [
        "ａｌｉｃｅ",
        "ali\u{ad}ce",
        "alice\u{200b}",
        "al\u{200d}ice",
        "alice\u{2060}",
        "\u{1d41a}lice", // mathematical bold a
        "\u{24d0}lice",  // circled a
        "alic\u{1d49}",  // modifier e (Unicode 4.0)
        "\u{1d43}lice",  // modifier a (Unicode 4.0)
        "\u{212a}ate",   // Kelvin sign
        "\u{17f}am",     // long s
        "ᴮᴵᴳᴮᴵᴿᴰ",
        "alice\u{fe0f}",
        "ＡＬＩＣＥ",
    ];

    #[test]
    fn the_flag_and_the_file_take_the_same_names() {
        use clap::ValueEnum;
        for folding in Folding::value_variants() {
            let name = folding.as_str();
            assert_eq!(
                Folding::from_str(name, false),
                Ok(*folding),
                "--claim-folding {name}"
            );
            let toml: Folding = serde_json::from_value(json!(name)).unwrap();
            assert_eq!(toml, *folding, "claim_folding = {name:?}");
        }
    }

    #[test]
    fn exact_is_the_default_and_compares_the_claim_as_is() {
        let r = rules(&["username"], Folding::default());
        assert_eq!(bind(&r, json!({"username": "alice"})), Ok("alice".into()));
        assert_eq!(bind(&r, json!({"username": "élodie"})), Ok("élodie".into()));
        for claim in ["Dave", "ÉLODIE", "erin@example.com", "a b", ""] {
            assert_eq!(
                bind(&r, json!({ "username": claim })),
                Err(Reason::NonCanonicalClaim),
                "{claim}"
            );
        }
        for claim in LOOK_ALIKES {
            assert_eq!(
                bind(&r, json!({ "username": claim })),
                Err(Reason::NonCanonicalClaim),
                "{claim:?}"
            );
        }
    }

    #[test]
    fn ascii_case_folds_ascii_only() {
        let r = rules(&["username"], Folding::AsciiCase);
        assert_eq!(bind(&r, json!({"username": "Dave"})), Ok("dave".into()));
        assert_eq!(
            bind(&r, json!({"username": "ÉLODIE"})),
            Err(Reason::NonCanonicalClaim)
        );
        for claim in LOOK_ALIKES {
            assert_eq!(
                bind(&r, json!({ "username": claim })),
                Err(Reason::NonCanonicalClaim),
                "{claim:?}"
            );
        }
    }

    #[test]
    fn nodeprep_folds_case_but_refuses_every_other_mapping() {
        let r = rules(&["username"], Folding::Nodeprep);
        assert_eq!(bind(&r, json!({"username": "Dave"})), Ok("dave".into()));
        assert_eq!(bind(&r, json!({"username": "ÉLODIE"})), Ok("élodie".into()));
        assert_eq!(bind(&r, json!({"username": "ΣΟΦΙΑ"})), Ok("σοφια".into()));
        for claim in LOOK_ALIKES.iter().chain(&["straße", "İpek", "a@b"]) {
            assert!(
                bind(&r, json!({ "username": claim })).is_err(),
                "{claim:?} must be refused"
            );
        }
    }

    #[test]
    fn the_subject_must_be_present_and_a_string_without_silent_fallback() {
        let only_username = rules(&["username"], Folding::Exact);
        assert_eq!(
            bind(&only_username, json!({"sub": "bob"})),
            Err(Reason::NoUser)
        );
        for not_a_string in [json!(null), json!(42), json!(["mallory"]), json!({"a": 1})] {
            assert_eq!(
                bind(
                    &only_username,
                    json!({"username": not_a_string, "sub": "bob"})
                ),
                Err(Reason::NoUser)
            );
        }
        let with_fallback = rules(&["username", "sub"], Folding::Exact);
        assert_eq!(
            bind(&with_fallback, json!({"sub": "bob"})),
            Ok("bob".into())
        );
        assert_eq!(
            bind(&with_fallback, json!({"username": null, "sub": "bob"})),
            Err(Reason::NoUser),
            "present but not a string: no fallback"
        );
        assert_eq!(
            bind(&with_fallback, json!({"username": "alice", "sub": "bob"})),
            Ok("alice".into())
        );
    }

    #[test]
    fn machine_tokens_name_nobody() {
        let r = rules(&["sub"], Folding::Exact);
        assert_eq!(
            bind(&r, json!({"sub": "bob", "client_id": "bob"})),
            Err(Reason::NoUser)
        );
        assert_eq!(
            bind(&r, json!({"sub": "bob", "azp": "bob"})),
            Err(Reason::NoUser)
        );
        assert_eq!(
            bind(
                &r,
                json!({"sub": "bob", "client_id": "chat-app", "azp": "chat-app"})
            ),
            Ok("bob".into())
        );
    }

    #[test]
    fn jid_and_domain_claims_bind_the_domain() {
        let jid = BindingRules {
            subject: Subject::Jid("jid".into()),
            folding: Folding::Exact,
            domain_claim: None,
        };
        assert_eq!(
            bind(&jid, json!({"jid": "alice@example.com/phone"})),
            Ok("alice".into())
        );
        assert_eq!(
            bind(&jid, json!({"jid": "alice@Example.COM"})),
            Ok("alice".into())
        );
        assert_eq!(
            bind(&jid, json!({"jid": "alice@other.example"})),
            Err(Reason::WrongDomain)
        );
        assert_eq!(
            bind(&jid, json!({"jid": "Alice@example.com"})),
            Err(Reason::NonCanonicalClaim)
        );
        assert_eq!(
            bind(&jid, json!({"jid": "example.com"})),
            Err(Reason::NonCanonicalClaim)
        );
        assert_eq!(bind(&jid, json!({"jid": 7})), Err(Reason::NoUser));
        let email_as_jid = BindingRules {
            subject: Subject::Jid("username".into()),
            ..jid
        };
        assert_eq!(
            bind(&email_as_jid, json!({"username": "erin@example.com"})),
            Ok("erin".into())
        );
        let tenant = BindingRules {
            domain_claim: Some("tenant".into()),
            ..rules(&["sub"], Folding::Exact)
        };
        assert_eq!(
            bind(&tenant, json!({"sub": "alice", "tenant": "example.com"})),
            Ok("alice".into())
        );
        assert_eq!(
            bind(
                &tenant,
                json!({"sub": "alice", "tenant": ["x", "example.com"]})
            ),
            Ok("alice".into())
        );
        for other in [
            json!({"sub": "alice", "tenant": "other.example"}),
            json!({"sub": "alice"}),
        ] {
            assert_eq!(bind(&tenant, other), Err(Reason::WrongDomain));
        }
    }

    #[test]
    fn canonical_localparts_are_what_ejabberd_sends() {
        for ok in ["alice", "élodie", "a.b-c_d+e", "σοφια"] {
            assert!(is_canonical(ok), "{ok}");
        }
        for bad in [
            "Alice",
            "",
            "a b",
            "a@b",
            "a:b",
            "ａｌｉｃｅ",
            "\u{1d43}lice",
            &"a".repeat(1024),
        ] {
            assert!(!is_canonical(bad), "{bad:?}");
        }
    }

    fn decider(stale_if_error: u64) -> Decider {
        Decider::new(
            rules(&["username"], Folding::Exact),
            Lifetimes {
                max_ttl: Duration::from_secs(300),
                negative_ttl: Duration::from_secs(10),
                stale_if_error: Duration::from_secs(stale_if_error),
            },
            "introspection",
        )
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
        fn decide(&self, d: &Decider, user: &str, v: Validation) -> (bool, Reason, Verdict) {
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
        let (d, a) = (decider(0), Asked::new());
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
        let (d, a) = (decider(120), Asked::new());
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

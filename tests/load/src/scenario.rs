//! Workloads: which (user, token) each request carries and what the right verdict is.
//!
//! Tokens describe themselves to the built-in mock provider (its resolver parses them), so a run
//! of millions of fresh tokens needs no token table: a valid token is
//! `RUN.USER.EXP.NONCE` (user `userUSER`, `exp` = EXP seconds since the epoch), an unknown one
//! `RUN.x.NONCE`. The broker treats both as opaque strings. RUN is random per run, so a broker
//! kept between runs never answers a "cold" token from its cache. With `--validator jwt` the
//! same claims travel in JWTs the mock provider signs, and with `--token-file` the tokens are
//! real users' ([`super::tokens`]).
//!
//! Every job also carries a *key* naming its token, or for `expiry` its token and the side of
//! `exp` it was sent on. Each distinct key costs exactly one provider call (the broker caches
//! one verdict per token, whatever users it is tried for, and coalesces concurrent flights), so
//! the expected call count is the number of distinct keys: a number the harness can check
//! without knowing the scenario.

use std::sync::Arc;

use anyhow::{Context, Result};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde_json::{json, Value};

use super::cli::{LoadArgs, MockValidator, ScenarioKind};
use super::tokens::{Logins, Signer, Tokens};
use extauth_broker::devprovider::Resolver;
use extauth_broker::now_ms;

/// Lifetime of the tokens of every scenario but `expiry` (seconds): longer than any run.
const TOKEN_LIFETIME_S: u64 = 24 * 3600;
/// `mixed`: how long ago the `exp` of its expired tokens passed (seconds).
const EXPIRED_AGO_S: u64 = 3600;
/// `expiry`: answers this close to `exp` (ms) may go either way (clock reads differ by a few
/// microseconds between the harness and the broker, and a verdict is cached until exactly `exp`).
const EXPIRY_SLACK_MS: u64 = 20;

/// The right answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Must be accepted.
    Accept,
    /// Must be refused.
    Reject,
    /// Must be accepted when answered before this instant (ms since the epoch) and refused when
    /// sent after it; either answer is right in between.
    AcceptUntil(u64),
}

/// How an answer compares with the expectation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// The answer is the right one.
    Right,
    /// The answer is wrong.
    Wrong,
    /// The request straddled a token's expiry: either answer is right.
    Either,
}

impl Expect {
    /// Judges answer `ok` to a request sent at `sent_ms` and answered at `done_ms` (ms since the
    /// epoch).
    pub fn judge(self, ok: bool, sent_ms: u64, done_ms: u64) -> Judgement {
        let right = match self {
            Expect::Accept => ok,
            Expect::Reject => !ok,
            Expect::AcceptUntil(exp) if done_ms + EXPIRY_SLACK_MS < exp => ok,
            Expect::AcceptUntil(exp) if sent_ms >= exp + EXPIRY_SLACK_MS => !ok,
            Expect::AcceptUntil(_) => return Judgement::Either,
        };
        if right {
            Judgement::Right
        } else {
            Judgement::Wrong
        }
    }

    /// Whether a refusal may be a provider failure rather than a verdict.
    pub fn wants_accept(self) -> bool {
        !matches!(self, Expect::Reject)
    }
}

/// One request of a run.
#[derive(Debug, Clone)]
pub struct Job {
    /// The localpart ejabberd would send.
    pub user: String,
    /// The token (the SASL PLAIN password).
    pub token: String,
    /// The right answer.
    pub expect: Expect,
    /// Names the token: one provider call per distinct key.
    pub key: u64,
}

/// A scenario with its parameters, producing the job of any sequence number.
pub struct Workload {
    kind: ScenarioKind,
    run: String,
    maker: Tokens,
    tokens: u64,
    lanes: u64,
    seed: u64,
    zipf: Zipf<f64>,
    invalid_pct: f64,
    foreign_pct: f64,
    expired_pct: f64,
    /// `exp` of every token (seconds since the epoch).
    exp_s: u64,
    /// `exp` of `mixed`'s expired tokens (seconds since the epoch, in the past).
    expired_exp_s: u64,
    /// `flood`: one request in this many is a valid login.
    valid_every: u64,
}

impl Workload {
    /// The workload of `args` for `lanes` lanes (the herd size).
    ///
    /// # Errors
    /// A Zipf exponent the distribution refuses, an unreadable `--token-file`.
    pub fn new(args: &LoadArgs, lanes: usize) -> Result<Self> {
        let maker = match (&args.token_file, args.validator) {
            (Some(path), _) => {
                let steals = args.scenario == ScenarioKind::Mixed && args.foreign_pct > 0.0;
                Tokens::Listed(Logins::read(path, steals)?)
            }
            (None, MockValidator::Jwt) => Tokens::Jwt(Box::new(Signer::generate()?)),
            (None, MockValidator::Introspection) => Tokens::Opaque,
        };
        let tokens = match &maker {
            Tokens::Listed(logins) => logins.len(),
            _ => args.tokens,
        };
        let now_s = now_ms() / 1000;
        let exp_s = match args.scenario {
            // Whole seconds (JWT `exp`), at least --expire-after from now.
            ScenarioKind::Expiry => now_s + 1 + args.expire_after,
            _ => now_s + TOKEN_LIFETIME_S,
        };
        Ok(Workload {
            kind: args.scenario,
            run: hex::encode(rand::random::<[u8; 4]>()),
            maker,
            tokens,
            lanes: lanes as u64,
            seed: args.seed.unwrap_or_else(rand::random),
            zipf: Zipf::new(tokens as f64, args.zipf).context("--zipf")?,
            invalid_pct: args.invalid_pct,
            foreign_pct: args.foreign_pct,
            expired_pct: args.expired_pct,
            exp_s,
            expired_exp_s: now_s.saturating_sub(EXPIRED_AGO_S),
            valid_every: args.valid_every,
        })
    }

    /// The scenario.
    pub fn kind(&self) -> ScenarioKind {
        self.kind
    }

    /// The JWK Set the mock provider serves, when tokens are JWTs.
    pub fn jwks(&self) -> Option<Value> {
        match &self.maker {
            Tokens::Jwt(signer) => Some(signer.jwks.clone()),
            _ => None,
        }
    }

    /// Jobs to run before measuring: `hot` and `storm` validate each of their tokens once.
    pub fn warmup(&self) -> Vec<Job> {
        match self.kind {
            ScenarioKind::Hot | ScenarioKind::Storm => {
                (0..self.tokens).map(|i| self.valid(i, i, i)).collect()
            }
            _ => Vec::new(),
        }
    }

    /// The job with sequence number `seq` (call it right before sending: `expiry` notes the
    /// side of `exp` it is sent on).
    pub fn job(&self, seq: u64) -> Job {
        match self.kind {
            ScenarioKind::Hot | ScenarioKind::Storm => {
                let i = seq % self.tokens;
                self.valid(i, i, i)
            }
            ScenarioKind::Cold => self.valid(seq % self.tokens, self.tokens + seq, seq),
            ScenarioKind::Herd => {
                let round = seq / self.lanes;
                self.valid(round % self.tokens, self.tokens + round, round)
            }
            ScenarioKind::Mixed => self.mixed(seq),
            ScenarioKind::FloodUsers => self.garbage(seq % self.tokens, 0, 0),
            ScenarioKind::FloodTokens => self.garbage(0, seq, seq),
            // Keys: even for the valid logins, odd for the garbage.
            ScenarioKind::Flood if seq % self.valid_every == 0 => {
                self.valid(seq % self.tokens, self.tokens + seq, 2 * seq)
            }
            ScenarioKind::Flood => self.garbage(seq % self.tokens, seq, 2 * seq + 1),
            ScenarioKind::Expiry => {
                let i = seq % self.tokens;
                let after = now_ms() >= self.exp_s * 1000;
                Job {
                    expect: Expect::AcceptUntil(self.exp_s * 1000),
                    key: 2 * i + u64::from(after),
                    ..self.valid(i, i, i)
                }
            }
        }
    }

    /// A valid token of `user` with nonce `nonce`, requested by its owner.
    fn valid(&self, user: u64, nonce: u64, key: u64) -> Job {
        let (user, token) = self.maker.valid(&self.run, user, self.exp_s, nonce);
        Job {
            user,
            token,
            expect: Expect::Accept,
            key,
        }
    }

    /// A token the provider does not know (nonce `nonce`), presented by user `user`.
    fn garbage(&self, user: u64, nonce: u64, key: u64) -> Job {
        Job {
            token: self.maker.unknown(&self.run, user, self.exp_s, nonce),
            expect: Expect::Reject,
            key,
            ..self.valid(user, user, key)
        }
    }

    /// Zipf-popular token; some unknown to the provider, some presented by the next user, some
    /// past their `exp`. Keys: `4 * rank` plus 0 (valid, also when presented by another user:
    /// the same token), 1 (unknown), 3 (expired).
    fn mixed(&self, seq: u64) -> Job {
        // Seeded per request, so a run is reproducible whatever lane sends what.
        let mut rng = SmallRng::seed_from_u64(self.seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let rank = (self.zipf.sample(&mut rng) as u64).clamp(1, self.tokens) - 1;
        let dice = rng.random_range(0.0..100.0);
        // Cumulative thresholds of the dice (0..100) for each kind of wrong token.
        let invalid_below = self.invalid_pct;
        let foreign_below = invalid_below + self.foreign_pct;
        let expired_below = foreign_below + self.expired_pct;
        if dice < invalid_below {
            Job {
                token: self.maker.unknown(&self.run, rank, self.exp_s, rank),
                expect: Expect::Reject,
                key: 4 * rank + 1,
                ..self.valid(rank, rank, 0)
            }
        } else if dice < foreign_below {
            Job {
                user: self.maker.thief(rank, self.tokens),
                expect: Expect::Reject,
                key: 4 * rank,
                ..self.valid(rank, rank, 0)
            }
        } else if dice < expired_below {
            let (user, token) = self.maker.valid(&self.run, rank, self.expired_exp_s, rank);
            Job {
                user,
                token,
                expect: Expect::Reject,
                key: 4 * rank + 3,
            }
        } else {
            self.valid(rank, rank, 4 * rank)
        }
    }
}

/// Answers the mock provider gives: claims for valid tokens in the format of [`Workload`]
/// (`RUN.USER.EXP.NONCE`), unknown otherwise.
pub fn resolver() -> Resolver {
    Arc::new(claims_of)
}

/// Whether `token` is a valid token of `user` at `now_s` (seconds since the epoch) in the format
/// of [`Workload`]: the verdict the broker reaches through the mock provider (the `username`
/// claim names this user, and `exp` is still in the future), without asking anyone. Used by
/// `extauth-load echo --check-tokens`.
pub fn token_is_valid_for(token: &str, user: &str, now_s: u64) -> bool {
    claims_of(token).is_some_and(|claims| {
        claims["username"].as_str() == Some(user)
            && claims["exp"].as_u64().is_some_and(|exp| exp > now_s)
    })
}

/// The claims of a token made by [`Workload`]: `{"username": "userN", "exp": EXP}`, or `None`
/// for an unknown one.
fn claims_of(token: &str) -> Option<Value> {
    let mut parts = token.split('.');
    let (_run, user, exp) = (parts.next()?, parts.next()?, parts.next()?);
    let user: u64 = user.parse().ok()?;
    let exp: u64 = exp.parse().ok()?;
    Some(json!({"username": format!("user{user}"), "exp": exp}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_describe_their_claims() {
        assert_eq!(
            claims_of("ab12.7.1700000000.99"),
            Some(json!({"username": "user7", "exp": 1700000000u64}))
        );
        assert_eq!(claims_of("ab12.x.3"), None);
        assert_eq!(claims_of("garbage"), None);
    }

    #[test]
    fn local_check_gives_the_brokers_verdicts() {
        let token = "ab12.7.1700000000.99";
        assert!(token_is_valid_for(token, "user7", 1_699_999_999));
        assert!(
            !token_is_valid_for(token, "user7", 1_700_000_000),
            "expired"
        );
        assert!(
            !token_is_valid_for(token, "user8", 1_000),
            "another user's token"
        );
        assert!(
            !token_is_valid_for("ab12.x.7", "user7", 1_000),
            "unknown token"
        );
        assert!(!token_is_valid_for("", "user7", 1_000));
    }

    #[test]
    fn expiry_answers_near_exp_may_go_either_way() {
        let e = Expect::AcceptUntil(10_000);
        assert_eq!(e.judge(true, 1_000, 2_000), Judgement::Right);
        assert_eq!(e.judge(false, 1_000, 2_000), Judgement::Wrong);
        assert_eq!(e.judge(false, 9_990, 10_001), Judgement::Either);
        assert_eq!(e.judge(true, 10_100, 10_101), Judgement::Wrong);
        assert_eq!(Expect::Reject.judge(true, 0, 0), Judgement::Wrong);
    }
}

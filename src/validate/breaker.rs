//! Circuit breaker around a validator: after `threshold` consecutive unavailable answers, fail
//! fast for `cooldown` (cached verdicts are still served, since the engine asks the validator only
//! on a cache miss), then let one probe call through; its answer closes or re-opens the circuit.
//!
//! A probe whose caller stops waiting (the request's deadline cut it, its shim went away) never
//! answers: a drop guard counts it as a failure, which re-opens the circuit for another cooldown
//! and frees the probe slot, so the breaker can never stay open for good.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use tracing::{info, warn};

use super::{BoxFuture, ProviderError, TokenCheck, Validation, Validator};

/// Breaker settings (TOML: `breaker = { threshold = 5, cooldown = 10 }`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct BreakerConfig {
    /// Consecutive unavailable answers that open the circuit [default: 5].
    #[serde(default = "default_threshold")]
    pub threshold: u32,
    /// Seconds the circuit stays open before one probe is let through [default: 10].
    #[serde(default = "default_cooldown")]
    pub cooldown: u64,
}

fn default_threshold() -> u32 {
    5
}

fn default_cooldown() -> u64 {
    10
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            threshold: default_threshold(),
            cooldown: default_cooldown(),
        }
    }
}

/// A validator behind a circuit breaker.
pub(crate) struct Breaker {
    inner: Arc<dyn Validator>,
    config: BreakerConfig,
    /// Consecutive unavailable answers.
    failures: AtomicU32,
    /// When the circuit opened, ms after `epoch`; 0 = closed.
    opened_at_ms: AtomicU64,
    /// A probe is in flight while the circuit is half-open.
    probing: AtomicBool,
    epoch: Instant,
}

impl Breaker {
    /// Wraps `inner`.
    pub(crate) fn new(inner: Arc<dyn Validator>, config: BreakerConfig) -> Self {
        Breaker {
            inner,
            config,
            failures: AtomicU32::new(0),
            opened_at_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            epoch: Instant::now(),
        }
    }

    /// True when the circuit is open (calls fail fast).
    pub(crate) fn is_open(&self) -> bool {
        self.opened_at_ms.load(Ordering::Acquire) != 0
    }

    fn now_ms(&self) -> u64 {
        // +1 so that "opened at the epoch" is not mistaken for "closed".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// May this call go to the provider? Closed: yes. Open: only one probe after the cooldown.
    fn admit(&self) -> bool {
        let opened = self.opened_at_ms.load(Ordering::Acquire);
        if opened == 0 {
            return true;
        }
        let cooled = self.now_ms().saturating_sub(opened) >= self.config.cooldown * 1000;
        cooled && !self.probing.swap(true, Ordering::AcqRel)
    }

    fn record(&self, validation: &Validation) {
        self.record_outcome(matches!(validation, Validation::Unavailable(_)));
    }

    /// Counts one answer (`failed`: unavailable or abandoned) and frees the probe slot.
    fn record_outcome(&self, failed: bool) {
        self.probing.store(false, Ordering::Release);
        if failed {
            let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
            if failures >= self.config.threshold {
                let was = self.opened_at_ms.swap(self.now_ms(), Ordering::AcqRel);
                if was == 0 {
                    crate::metrics::circuit(self.inner.kind(), true);
                    warn!(
                        validator = self.inner.kind(),
                        failures,
                        cooldown_s = self.config.cooldown,
                        "circuit opened: failing fast"
                    );
                }
            }
        } else {
            self.failures.store(0, Ordering::Release);
            if self.opened_at_ms.swap(0, Ordering::AcqRel) != 0 {
                crate::metrics::circuit(self.inner.kind(), false);
                info!(
                    validator = self.inner.kind(),
                    "circuit closed: provider answers again"
                );
            }
        }
    }

    async fn call(&self, check: TokenCheck<'_>) -> Validation {
        if !self.admit() {
            return Validation::Unavailable(ProviderError::CircuitOpen {
                kind: self.inner.kind(),
            });
        }
        let mut pending = Pending {
            breaker: self,
            probe: self.is_open(),
        };
        let validation = self.inner.validate(check).await;
        pending.probe = false;
        self.record(&validation);
        validation
    }
}

/// A call in progress. Dropped before it answers (its future cancelled), a probe counts as a
/// failure: otherwise the probe slot would stay taken and the circuit open for good.
struct Pending<'a> {
    breaker: &'a Breaker,
    /// Still an unanswered half-open probe.
    probe: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.probe {
            warn!(
                validator = self.breaker.inner.kind(),
                "circuit probe abandoned before the provider answered: counted as a failure"
            );
            self.breaker.record_outcome(true);
        }
    }
}

impl Validator for Breaker {
    fn validate<'a>(&'a self, check: TokenCheck<'a>) -> BoxFuture<'a, Validation> {
        Box::pin(self.call(check))
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn asks_about_user(&self) -> bool {
        self.inner.asks_about_user()
    }

    fn discovered(&self) -> Option<super::discovery::EndpointUrl> {
        self.inner.discovered()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::Grant;
    use extauth_protocol::extauth::Secret;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// Answers from a script and counts calls.
    struct Scripted {
        up: AtomicBool,
        calls: AtomicUsize,
    }

    impl Validator for Scripted {
        fn validate<'a>(&'a self, _check: TokenCheck<'a>) -> BoxFuture<'a, Validation> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let up = self.up.load(Ordering::SeqCst);
            Box::pin(async move {
                if up {
                    Validation::Valid(Grant::default())
                } else {
                    Validation::Unavailable(ProviderError::Status {
                        what: "scripted",
                        status: 503,
                    })
                }
            })
        }

        fn kind(&self) -> &'static str {
            "scripted"
        }
    }

    #[tokio::test]
    async fn opens_after_threshold_then_probes_once_after_cooldown() {
        let inner = Arc::new(Scripted {
            up: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        });
        let breaker = Breaker::new(
            inner.clone(),
            BreakerConfig {
                threshold: 3,
                cooldown: 1,
            },
        );
        let token = Secret::new("t".into());
        let check = TokenCheck {
            user: "u",
            domain: "d",
            token: &token,
        };
        for _ in 0..3 {
            assert!(matches!(
                breaker.validate(check).await,
                Validation::Unavailable(_)
            ));
        }
        assert!(breaker.is_open());
        for _ in 0..5 {
            assert!(matches!(
                breaker.validate(check).await,
                Validation::Unavailable(_)
            ));
        }
        assert_eq!(
            inner.calls.load(Ordering::SeqCst),
            3,
            "open: no provider calls"
        );
        tokio::time::sleep(Duration::from_millis(1050)).await;
        assert!(
            matches!(breaker.validate(check).await, Validation::Unavailable(_)),
            "probe fails"
        );
        assert_eq!(inner.calls.load(Ordering::SeqCst), 4, "one probe");
        assert!(matches!(
            breaker.validate(check).await,
            Validation::Unavailable(_)
        ));
        assert_eq!(inner.calls.load(Ordering::SeqCst), 4, "re-opened");
        inner.up.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1050)).await;
        assert!(
            matches!(breaker.validate(check).await, Validation::Valid(_)),
            "probe succeeds"
        );
        assert!(!breaker.is_open());
        assert!(matches!(
            breaker.validate(check).await,
            Validation::Valid(_)
        ));
        assert_eq!(inner.calls.load(Ordering::SeqCst), 6);
    }
}

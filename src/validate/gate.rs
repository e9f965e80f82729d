//! A cap on a domain's concurrent provider calls, with the waiting calls served in turn by user.
//!
//! Anyone who can reach ejabberd can make it try made-up passwords, and each new token costs a
//! provider call. Without a cap a flood of them makes as many concurrent calls as there are
//! requests in flight, which slows or trips the provider for everyone. With a cap alone, the
//! waiting calls form one queue and a flood for one account (or a few) delays every other
//! user's new login behind it. So the calls waiting for a slot queue per user (the localpart
//! ejabberd asks about), and a freed slot goes to the next user in turn (round robin), like
//! fair queueing in a network switch: a user with a thousand waiting calls gets one call per
//! turn, as does a user with one.
//!
//! A waiting call gives up when its request's deadline passes (the flight drops its future);
//! its place is skipped when its turn comes. What it cannot do: tell a real user from an
//! attacker who spreads a flood over many made-up users; then the queue is as long as the
//! flood, and every waiting call, real or not, waits its turn until its deadline.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{BoxFuture, ProviderError, TokenCheck, Validation, Validator};
use crate::metrics;

/// Default cap on a domain's concurrent provider calls (TOML `provider_concurrency`).
pub(crate) const DEFAULT_CONCURRENCY: usize = 32;

/// A validator whose calls wait for one of `cap` slots, served in turn by user.
pub(crate) struct Gate {
    inner: Arc<dyn Validator>,
    slots: Arc<Slots>,
}

impl Gate {
    /// Wraps `inner`; at most `cap` (at least 1) of its calls run at once.
    pub(crate) fn new(inner: Arc<dyn Validator>, cap: usize) -> Gate {
        let slots = Slots {
            cap: cap.max(1),
            kind: inner.kind(),
            queue: Mutex::new(Queue::default()),
        };
        Gate {
            inner,
            slots: Arc::new(slots),
        }
    }
}

impl Validator for Gate {
    fn validate<'a>(&'a self, check: TokenCheck<'a>) -> BoxFuture<'a, Validation> {
        Box::pin(async move {
            let Some(_slot) = Slots::acquire(&self.slots, check.user).await else {
                return Validation::Unavailable(ProviderError::Reloading);
            };
            self.inner.validate(check).await
        })
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

struct Slots {
    cap: usize,
    kind: &'static str,
    queue: Mutex<Queue>,
}

/// Calls running, and the calls waiting, per user, with the order in which users get a turn.
#[derive(Default)]
struct Queue {
    running: usize,
    waiting: HashMap<String, VecDeque<oneshot::Sender<Slot>>>,
    turns: VecDeque<String>,
    queued: usize,
}

/// One running call's slot; dropping it hands the slot to the next waiting call.
struct Slot {
    slots: Arc<Slots>,
    armed: bool,
}

impl Slots {
    /// Waits for a slot for a call about `user`; `None` if the gate went away meanwhile (the
    /// domain was reloaded).
    async fn acquire(this: &Arc<Slots>, user: &str) -> Option<Slot> {
        let receiver = {
            let mut queue = this.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.running < this.cap && queue.queued == 0 {
                queue.running += 1;
                return Some(Slot {
                    slots: this.clone(),
                    armed: true,
                });
            }
            let (sender, receiver) = oneshot::channel();
            queue.push(user, sender);
            metrics::provider_calls_queued(this.kind, queue.queued);
            receiver
        };
        receiver.await.ok()
    }

    /// Gives a freed slot to the next waiting call still there, or frees it.
    fn release(this: &Arc<Slots>) {
        let mut queue = this.queue.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(sender) = queue.next() {
            let slot = Slot {
                slots: this.clone(),
                armed: true,
            };
            match sender.send(slot) {
                Ok(()) => {
                    metrics::provider_calls_queued(this.kind, queue.queued);
                    return;
                }
                // That call gave up (its deadline passed): the slot goes on.
                Err(mut slot) => slot.armed = false,
            }
        }
        queue.running -= 1;
        metrics::provider_calls_queued(this.kind, 0);
    }
}

impl Queue {
    fn push(&mut self, user: &str, sender: oneshot::Sender<Slot>) {
        let waiting = self.waiting.entry(user.to_owned()).or_default();
        if waiting.is_empty() {
            self.turns.push_back(user.to_owned());
        }
        waiting.push_back(sender);
        self.queued += 1;
    }

    /// The first waiting call of the user whose turn it is; that user goes to the back of the
    /// line if it has more.
    fn next(&mut self) -> Option<oneshot::Sender<Slot>> {
        let user = self.turns.pop_front()?;
        let waiting = self.waiting.get_mut(&user)?;
        let sender = waiting.pop_front()?;
        if waiting.is_empty() {
            self.waiting.remove(&user);
        } else {
            self.turns.push_back(user);
        }
        self.queued -= 1;
        Some(sender)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            Slots::release(&self.slots);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use extauth_protocol::extauth::Secret;

    /// Answers after `delay`, recording how many calls ran at once and in which order users
    /// were served.
    struct Slow {
        delay: Duration,
        running: AtomicUsize,
        most: AtomicUsize,
        served: Mutex<Vec<String>>,
    }

    impl Validator for Slow {
        fn validate<'a>(&'a self, check: TokenCheck<'a>) -> BoxFuture<'a, Validation> {
            Box::pin(async move {
                let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.most.fetch_max(now, Ordering::SeqCst);
                self.served.lock().unwrap().push(check.user.to_owned());
                tokio::time::sleep(self.delay).await;
                self.running.fetch_sub(1, Ordering::SeqCst);
                Validation::Invalid(extauth_protocol::wire::Reason::Inactive)
            })
        }

        fn kind(&self) -> &'static str {
            "introspection"
        }
    }

    fn slow() -> Arc<Slow> {
        Arc::new(Slow {
            delay: Duration::from_millis(20),
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            served: Mutex::new(Vec::new()),
        })
    }

    async fn ask(gate: &Gate, user: &str) {
        let token = Secret::new("tok".into());
        gate.validate(TokenCheck {
            user,
            domain: "example.com",
            token: &token,
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_for_one_user_waits_its_turns_and_never_exceeds_the_cap() {
        let inner = slow();
        let gate = Arc::new(Gate::new(inner.clone(), 2));
        let mut calls = Vec::new();
        for _ in 0..20 {
            let gate = gate.clone();
            calls.push(tokio::spawn(async move { ask(&gate, "mallory").await }));
        }
        tokio::task::yield_now().await;
        let gate2 = gate.clone();
        let alice = tokio::spawn(async move { ask(&gate2, "alice").await });
        for call in calls {
            call.await.unwrap();
        }
        alice.await.unwrap();
        assert_eq!(inner.most.load(Ordering::SeqCst), 2, "the cap holds");
        let served = inner.served.lock().unwrap();
        let alice_at = served.iter().position(|u| u == "alice").unwrap();
        // Two running when alice arrived, then her turn comes right after one of mallory's.
        assert!(
            alice_at <= 3,
            "alice served {alice_at}th of {}",
            served.len()
        );
        assert_eq!(served.len(), 21);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_gives_up_while_waiting_loses_no_slot() {
        let inner = slow();
        let gate = Arc::new(Gate::new(inner.clone(), 1));
        let g = gate.clone();
        let running = tokio::spawn(async move { ask(&g, "bob").await });
        tokio::task::yield_now().await;
        // Waits behind bob, and gives up before its turn.
        let g = gate.clone();
        let gave_up =
            tokio::time::timeout(
                Duration::from_millis(5),
                async move { ask(&g, "eve").await },
            )
            .await;
        assert!(gave_up.is_err());
        running.await.unwrap();
        // The slot came back: the next call runs at once.
        ask(&gate, "carol").await;
        let served = inner.served.lock().unwrap().clone();
        assert_eq!(served, ["bob", "carol"]);
        let queue = gate.slots.queue.lock().unwrap();
        assert_eq!((queue.running, queue.queued), (0, 0));
    }
}

//! When each lane sends what: closed loop, open loop at a fixed rate, or herd rounds.
//!
//! Requests are dealt round-robin over the lanes (request `seq` goes to lane `seq % lanes`), as
//! ejabberd deals calls over its extauth pool regardless of how busy each program is: a slow
//! answer delays the requests queued behind it on that lane, and the open-loop latency, measured
//! from each request's intended send time, shows it (no coordinated omission, as in wrk2).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Barrier, Notify};

/// After the sending period ends, lanes still drain queued open-loop requests this long.
const DRAIN: Duration = Duration::from_secs(10);

/// What to send, when, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Lanes (requests in flight at most).
    pub lanes: usize,
    /// Stop after this many requests.
    pub requests: Option<u64>,
    /// Stop sending after this long.
    pub duration: Option<Duration>,
    /// Pacing.
    pub pace: Pace,
}

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Each lane sends its next request as soon as the last is answered.
    Closed,
    /// Requests per second, sent at their intended times whatever the answers' pace.
    Open(f64),
    /// Herd: every lane sends one request of round `r` at once; the next round starts when
    /// every lane has its answer.
    Rounds,
}

/// One request to send.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// Sequence number (selects the job).
    pub seq: u64,
    /// When it should have been sent (open loop); latency is measured from here.
    pub intended: Option<Instant>,
}

/// A lane's view of the schedule.
pub struct LaneSchedule {
    lane: u64,
    lanes: u64,
    sent: u64,
    plan: Plan,
    end: Option<Instant>,
    feed: Feed,
}

enum Feed {
    Closed,
    Open(mpsc::UnboundedReceiver<Slot>),
    Rounds(Arc<RoundGate>),
}

/// Every lane waits here between herd rounds; the last to arrive decides whether there is
/// another round, so that all lanes agree. A lane that breaks can never arrive, so it marks the
/// gate broken and wakes the others, which then stop instead of waiting for it forever.
struct RoundGate {
    barrier: Barrier,
    go: AtomicBool,
    broken: AtomicBool,
    wake: Notify,
}

impl RoundGate {
    /// Waits at the barrier; `None` (and no more rounds) once a lane has broken.
    async fn wait(&self) -> Option<bool> {
        let woken = self.wake.notified();
        tokio::pin!(woken);
        // Registered before the flag is read, so a break between the two still wakes us.
        woken.as_mut().enable();
        if self.broken.load(Ordering::SeqCst) {
            return None;
        }
        tokio::select! {
            result = self.barrier.wait() => Some(result.is_leader()),
            () = woken => None,
        }
    }
}

/// The running schedule: the open-loop pacer thread, if any.
pub struct Schedule {
    pacer: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    scheduled: Arc<AtomicU64>,
}

impl Schedule {
    /// Starts the clock now and returns the schedule and one view per lane.
    pub fn start(plan: Plan) -> (Schedule, Vec<LaneSchedule>) {
        let start = Instant::now();
        let end = plan.duration.map(|d| start + d);
        let stop = Arc::new(AtomicBool::new(false));
        let scheduled = Arc::new(AtomicU64::new(0));
        let lane = |i: usize, feed| LaneSchedule {
            lane: i as u64,
            lanes: plan.lanes as u64,
            sent: 0,
            plan,
            end,
            feed,
        };
        let (pacer, lanes) = match plan.pace {
            Pace::Closed => (
                None,
                (0..plan.lanes).map(|i| lane(i, Feed::Closed)).collect(),
            ),
            Pace::Rounds => {
                let gate = Arc::new(RoundGate {
                    barrier: Barrier::new(plan.lanes),
                    go: AtomicBool::new(false),
                    broken: AtomicBool::new(false),
                    wake: Notify::new(),
                });
                (
                    None,
                    (0..plan.lanes)
                        .map(|i| lane(i, Feed::Rounds(gate.clone())))
                        .collect(),
                )
            }
            Pace::Open(rate) => {
                let (senders, receivers): (Vec<_>, Vec<_>) =
                    (0..plan.lanes).map(|_| mpsc::unbounded_channel()).unzip();
                let (stop, scheduled) = (stop.clone(), scheduled.clone());
                let pacer =
                    std::thread::spawn(move || pace(start, rate, plan, senders, &stop, &scheduled));
                (
                    Some(pacer),
                    receivers
                        .into_iter()
                        .enumerate()
                        .map(|(i, r)| lane(i, Feed::Open(r)))
                        .collect(),
                )
            }
        };
        (
            Schedule {
                pacer,
                stop,
                scheduled,
            },
            lanes,
        )
    }

    /// Stops the pacer (if still running) and returns how many open-loop requests it scheduled.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(pacer) = self.pacer {
            let _ = pacer.join();
        }
        self.scheduled.load(Ordering::Relaxed)
    }
}

/// The open-loop pacer: a plain thread, because it needs sleeps finer than tokio's 1 ms timer.
/// It deals every slot due by now, so a late wake-up only delays sends, never the intended times.
fn pace(
    start: Instant,
    rate: f64,
    plan: Plan,
    lanes: Vec<mpsc::UnboundedSender<Slot>>,
    stop: &AtomicBool,
    scheduled: &AtomicU64,
) {
    let end = plan.duration.map(|d| start + d);
    let interval = Duration::from_secs_f64(1.0 / rate);
    for seq in 0.. {
        if plan.requests.is_some_and(|n| seq >= n) || stop.load(Ordering::Relaxed) {
            break;
        }
        let intended = start + interval.mul_f64(seq as f64);
        if end.is_some_and(|e| intended >= e) {
            break;
        }
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        let slot = Slot {
            seq,
            intended: Some(intended),
        };
        // A broken lane's slots are dropped (not scheduled); the others go on.
        if lanes[(seq % lanes.len() as u64) as usize]
            .send(slot)
            .is_ok()
        {
            scheduled.fetch_add(1, Ordering::Relaxed);
        } else if lanes.iter().all(mpsc::UnboundedSender::is_closed) {
            break;
        }
    }
}

impl LaneSchedule {
    /// The next request for this lane, or `None` when the lane is done.
    pub async fn next(&mut self) -> Option<Slot> {
        let slot = match &mut self.feed {
            Feed::Closed => {
                let seq = self.lane + self.sent * self.lanes;
                let over = self.plan.requests.is_some_and(|n| seq >= n)
                    || self.end.is_some_and(|e| Instant::now() >= e);
                (!over).then_some(Slot {
                    seq,
                    intended: None,
                })
            }
            Feed::Open(feed) => {
                let hard_stop = self.end.map(|e| e + DRAIN);
                match hard_stop {
                    // A backlog still queued at the hard stop is left unanswered (reported).
                    Some(at) if Instant::now() >= at => None,
                    Some(at) => tokio::time::timeout_at(at.into(), feed.recv())
                        .await
                        .ok()
                        .flatten(),
                    None => feed.recv().await,
                }
            }
            Feed::Rounds(gate) => {
                let round = self.sent;
                if gate.wait().await? {
                    let more = self
                        .plan
                        .requests
                        .is_none_or(|n| round * self.lanes < n.max(1))
                        && self.end.is_none_or(|e| Instant::now() < e);
                    gate.go.store(more, Ordering::SeqCst);
                }
                gate.wait().await?;
                gate.go.load(Ordering::SeqCst).then_some(Slot {
                    seq: round * self.lanes + self.lane,
                    intended: None,
                })
            }
        };
        self.sent += u64::from(slot.is_some());
        slot
    }

    /// This lane broke (its program died, its connection closed): herd rounds stop for every
    /// lane, since the round barrier can no longer fill; open-loop slots for it are dropped.
    pub fn abandon(self) {
        if let Feed::Rounds(gate) = &self.feed {
            gate.broken.store(true, Ordering::SeqCst);
            gate.wake.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A herd lane that breaks can never reach the round barrier again: the other lanes, waiting
    /// there or arriving later, stop instead of waiting for it forever.
    #[tokio::test]
    async fn herd_rounds_end_when_a_lane_breaks() {
        let plan = Plan {
            lanes: 3,
            requests: None,
            duration: None,
            pace: Pace::Rounds,
        };
        let (_schedule, mut lanes) = Schedule::start(plan);
        let (mut late, mut waiting, broken) = (
            lanes.pop().unwrap(),
            lanes.pop().unwrap(),
            lanes.pop().unwrap(),
        );
        let waiter = tokio::spawn(async move { waiting.next().await });
        tokio::task::yield_now().await;
        broken.abandon();
        let limit = Duration::from_secs(5);
        let waited = tokio::time::timeout(limit, waiter).await;
        assert!(matches!(waited, Ok(Ok(None))), "the waiting lane stops");
        let arrived = tokio::time::timeout(limit, late.next()).await;
        assert!(
            matches!(arrived, Ok(None)),
            "a lane arriving later stops too"
        );
    }

    /// Open loop: the pacer keeps feeding the other lanes when one lane's channel is closed.
    #[tokio::test]
    async fn open_loop_goes_on_without_a_broken_lane() {
        let plan = Plan {
            lanes: 2,
            requests: Some(6),
            duration: None,
            pace: Pace::Open(50.0),
        };
        let (schedule, mut lanes) = Schedule::start(plan);
        let mut alive = lanes.remove(0);
        lanes.pop().unwrap().abandon();
        let mut seqs = Vec::new();
        while let Some(slot) = alive.next().await {
            seqs.push(slot.seq);
        }
        assert_eq!(seqs, [0, 2, 4]);
        // Slot 1 may have been dealt before the lane closed; later ones are not scheduled.
        assert!((3..=4).contains(&schedule.finish()));
    }
}

//! Counting a run: latencies (hdrhistogram), verdict counts, distinct keys, and completions
//! over time. Lanes batch their records and merge them into one shared tally now and then, so
//! thousands of lanes share one histogram and rarely contend for its lock.

use std::collections::HashSet;
use std::ops::AddAssign;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Records a lane keeps before merging them into the shared tally.
const BATCH: usize = 256;
/// Width of a throughput-over-time bucket.
pub const BUCKET: Duration = Duration::from_millis(100);

/// Verdict and error counts.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Counts {
    /// Answers "yes".
    pub accepts: u64,
    /// Answers "no".
    pub rejects: u64,
    /// "Yes" where "no" was right.
    pub wrong_accepts: u64,
    /// "No" where "yes" was right (and no provider failure can explain it).
    pub wrong_rejects: u64,
    /// Answers near a token's expiry, where either is right.
    pub either: u64,
    /// "No" where "yes" was right, explained by an injected provider failure (fail closed).
    pub upstream_refusals: u64,
    /// "No" where "yes" was right, for a request in flight when a chaos run killed a broker
    /// (tolerated, up to one per lane and kill).
    pub kill_refusals: u64,
    /// Replies later than the shim's deadline plus slack, measured from the send (must be 0).
    pub late: u64,
    /// Lanes that broke (program died, connection closed, garbage answer).
    pub errors: u64,
}

impl AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.accepts += o.accepts;
        self.rejects += o.rejects;
        self.wrong_accepts += o.wrong_accepts;
        self.wrong_rejects += o.wrong_rejects;
        self.either += o.either;
        self.upstream_refusals += o.upstream_refusals;
        self.kill_refusals += o.kill_refusals;
        self.late += o.late;
        self.errors += o.errors;
    }
}

impl Counts {
    /// Wrong verdicts: must be 0.
    pub fn wrong(&self) -> u64 {
        self.wrong_accepts + self.wrong_rejects
    }

    /// Answered requests.
    pub fn answered(&self) -> u64 {
        self.accepts + self.rejects
    }
}

/// Everything measured in a run.
pub struct Tally {
    /// Latency of every answered measured request, nanoseconds.
    pub latency: Histogram<u64>,
    /// Latency of the answered measured requests whose right answer was "yes" (in `flood`, the
    /// real users' logins among the garbage), nanoseconds.
    pub valid_latency: Histogram<u64>,
    /// Verdict counts of measured requests.
    pub counts: Counts,
    /// Distinct keys sent (warm-up included): the provider calls a correct broker makes.
    pub keys: HashSet<u64>,
    /// Answers per [`BUCKET`] since the start of the measurement.
    pub timeline: Vec<u64>,
    /// The slowest reply, from the moment its request was sent (open loop: not from its
    /// intended time).
    pub slowest: Duration,
}

impl Tally {
    fn new() -> Self {
        Tally {
            // 1 ns to 1 hour at 3 significant digits (about 0.1 % error).
            latency: Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
                .expect("valid histogram bounds"),
            valid_latency: Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
                .expect("valid histogram bounds"),
            counts: Counts::default(),
            keys: HashSet::new(),
            timeline: Vec::new(),
            slowest: Duration::ZERO,
        }
    }
}

/// The shared tally and the live answer counter (for the progress bar).
#[derive(Clone)]
pub struct Shared {
    tally: Arc<Mutex<Tally>>,
    answered: Arc<AtomicU64>,
    start: Arc<Mutex<Instant>>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            tally: Arc::new(Mutex::new(Tally::new())),
            answered: Arc::default(),
            start: Arc::new(Mutex::new(Instant::now())),
        }
    }
}

impl Shared {
    /// Marks the start of the measurement (timeline bucket 0).
    pub fn start_now(&self) {
        *self.start.lock().expect("start") = Instant::now();
    }

    /// Answers recorded so far (live).
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// A recorder for one lane.
    pub fn lane(&self) -> LaneTally {
        LaneTally {
            shared: self.clone(),
            start: *self.start.lock().expect("start"),
            latencies: Vec::with_capacity(BATCH),
            keys: Vec::with_capacity(BATCH),
            counts: Counts::default(),
            slowest: Duration::ZERO,
        }
    }

    /// The final tally (call after every lane has finished).
    pub fn into_tally(self) -> Tally {
        let mut tally = self.tally.lock().expect("tally");
        std::mem::replace(&mut *tally, Tally::new())
    }
}

/// A lane's batch of records; merged into the shared tally every `BATCH` records and on drop.
pub struct LaneTally {
    shared: Shared,
    start: Instant,
    /// (latency ns, timeline bucket, whether "yes" was the right answer).
    latencies: Vec<(u64, usize, bool)>,
    keys: Vec<u64>,
    counts: Counts,
    slowest: Duration,
}

/// One answered request, as a lane records it.
pub struct Reply {
    /// Latency: from the intended send time in open loop, else from the send.
    pub latency: Duration,
    /// From the send to the answer.
    pub took: Duration,
    /// When the answer came.
    pub done: Instant,
}

impl LaneTally {
    /// Records a key sent (also for unmeasured warm-up requests).
    pub fn key(&mut self, key: u64) {
        self.keys.push(key);
        self.flush_if_full();
    }

    /// Records one answered request and how it was judged; `wanted_accept`: "yes" was the right
    /// answer (a valid login).
    pub fn answer(&mut self, reply: Reply, counts: Counts, wanted_accept: bool) {
        let bucket = (reply.done.saturating_duration_since(self.start).as_nanos()
            / BUCKET.as_nanos()) as usize;
        self.latencies
            .push((reply.latency.as_nanos() as u64, bucket, wanted_accept));
        self.slowest = self.slowest.max(reply.took);
        self.count(counts);
        self.shared.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds counts without a latency (errors).
    pub fn count(&mut self, counts: Counts) {
        self.counts += counts;
        self.flush_if_full();
    }

    fn flush_if_full(&mut self) {
        if self.latencies.len() >= BATCH || self.keys.len() >= BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let mut tally = self.shared.tally.lock().expect("tally");
        for &(ns, bucket, wanted_accept) in &self.latencies {
            tally.latency.saturating_record(ns.max(1));
            if wanted_accept {
                tally.valid_latency.saturating_record(ns.max(1));
            }
            if tally.timeline.len() <= bucket {
                tally.timeline.resize(bucket + 1, 0);
            }
            tally.timeline[bucket] += 1;
        }
        tally.keys.extend(self.keys.drain(..));
        tally.counts += std::mem::take(&mut self.counts);
        tally.slowest = tally.slowest.max(self.slowest);
        self.latencies.clear();
    }
}

impl Drop for LaneTally {
    fn drop(&mut self) {
        self.flush();
    }
}

//! The result of a run: a table for people, JSON for machines.

use std::fmt::{self, Display};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::chaos::ChaosReport;
use super::cli::ScenarioKind;
use super::redis_server::RedisWork;
use super::services::Rss;
use super::stats::{Counts, Tally, BUCKET};

/// Latency summary, microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    /// The percentiles of `h` (nanoseconds) in microseconds.
    fn of(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// Everything a run measured. Latencies are microseconds, rates per second, memory KiB.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The workload.
    pub scenario: ScenarioKind,
    /// How requests travelled, e.g. `shim 2x8` or `wire 2x64`.
    pub via: String,
    /// Requests in flight at most.
    pub lanes: usize,
    /// `closed`, `open` or `rounds`.
    pub pace: String,
    /// Open loop: requests per second asked for.
    pub rate: Option<f64>,
    /// Brokers the lanes were spread over (`floor` runs count their floors).
    pub brokers: usize,
    /// Whether the brokers were floors (no work at all).
    pub floor: bool,
    /// Measured time from the first send to the last answer, seconds.
    pub duration_s: f64,
    /// Measured requests answered.
    pub answered: u64,
    /// Open loop: requests scheduled but never answered (the run ended first).
    pub unanswered: u64,
    /// Answers per second.
    pub throughput: f64,
    /// Latency of answered requests (open loop: from the intended send time).
    pub latency_us: Latency,
    /// Latency of the requests whose right answer was "yes", when the run also had others
    /// (`flood`: the real users' new logins among the garbage; `mixed`).
    pub valid_logins_us: Option<Latency>,
    /// Verdicts and errors.
    pub counts: Counts,
    /// Whether verdicts were checked.
    pub verified: bool,
    /// Wrong verdicts (must be 0); `None` when verdicts were not checked.
    pub wrong_verdicts: Option<u64>,
    /// auth requests sent before measuring (hot's warm-up).
    pub warmup_requests: u64,
    /// The provider: `mock introspection`, `mock jwt` or `real`.
    pub provider: String,
    /// Calls the mock provider answered (warm-up included): introspections, or JWKS fetches
    /// with `--validator jwt`; `None` with a real provider (`--provider-url`).
    pub provider_calls: Option<u64>,
    /// Of which answered HTTP 503 by `--provider-error-rate`.
    pub provider_errors: u64,
    /// Calls a correct broker makes: one per distinct token sent; `None` when provider
    /// errors (never cached) or an unchecked floor make it unknowable.
    pub expected_provider_calls: Option<u64>,
    /// auth requests (warm-up included) per provider call.
    pub dedup_ratio: Option<f64>,
    /// Resident memory of each started broker at the end of the run, and its peak.
    pub broker_rss: Vec<Rss>,
    /// CPU time the started brokers used while measuring, seconds (10 ms resolution).
    pub broker_cpu_s: Option<f64>,
    /// Broker CPU time per answered request, microseconds: what an auth costs the broker
    /// whoever else shares the cores (2 cores / this = the broker's capacity on 2 free cores).
    pub broker_cpu_us_per_auth: Option<f64>,
    /// What Redis did while measuring (`--redis` started brokers, plain `redis://HOST:PORT`),
    /// whoever asked: commands, and socket reads (round trips, a pipeline counting once).
    pub redis: Option<RedisWork>,
    /// Redis commands per answered request.
    pub redis_commands_per_auth: Option<f64>,
    /// Redis socket reads (round trips) per answered request.
    pub redis_round_trips_per_auth: Option<f64>,
    /// Largest peak resident memory among the extauth programs.
    pub program_peak_rss_kib: Option<u64>,
    /// The slowest reply, ms from the moment its request was sent (not from its intended time).
    pub slowest_reply_ms: f64,
    /// Shim lanes: the shims' deadline (`--timeout`), ms; a reply slower than it plus
    /// `late_slack_ms` is counted in `counts.late` and fails the run.
    pub reply_deadline_ms: Option<u64>,
    /// Slack on top of `reply_deadline_ms`, ms.
    pub late_slack_ms: u64,
    /// Chaos runs: what the schedule did (`counts.kill_refusals` are the valid tokens refused
    /// while in flight at a broker kill).
    pub chaos: Option<ChaosReport>,
    /// `(percentile, latency in µs)` points of the latency distribution.
    pub percentiles: Vec<(f64, f64)>,
    /// Answers per second in each whole 100 ms bucket of the run.
    pub timeline: Vec<f64>,
}

/// What the run knew besides its tally.
pub struct RunFacts {
    /// See [`Report::scenario`].
    pub scenario: ScenarioKind,
    /// See [`Report::via`].
    pub via: String,
    /// See [`Report::lanes`].
    pub lanes: usize,
    /// See [`Report::rate`]; `rounds` marks a herd.
    pub rate: Option<f64>,
    /// Herd rounds?
    pub rounds: bool,
    /// See [`Report::brokers`].
    pub brokers: usize,
    /// See [`Report::floor`].
    pub floor: bool,
    /// See [`Report::verified`].
    pub verified: bool,
    /// Measured time.
    pub elapsed: Duration,
    /// Open loop: requests scheduled.
    pub scheduled: Option<u64>,
    /// See [`Report::warmup_requests`].
    pub warmup_requests: u64,
    /// See [`Report::provider`].
    pub provider: String,
    /// See [`Report::provider_calls`].
    pub provider_calls: Option<u64>,
    /// See [`Report::provider_errors`].
    pub provider_errors: u64,
    /// Whether provider errors were injected.
    pub errors_injected: bool,
    /// Whether each distinct login costs one provider call (introspection; not JWT).
    pub calls_per_login: bool,
    /// See [`Report::broker_rss`].
    pub broker_rss: Vec<Rss>,
    /// CPU time of the started brokers while measuring (`None` when targeting running ones).
    pub broker_cpu: Option<Duration>,
    /// See [`Report::redis`].
    pub redis_work: Option<RedisWork>,
    /// See [`Report::program_peak_rss_kib`].
    pub program_peak_rss_kib: Option<u64>,
    /// Shim lanes: the shims' `--timeout`.
    pub reply_deadline: Option<Duration>,
    /// See [`Report::chaos`].
    pub chaos: Option<ChaosReport>,
}

impl Report {
    /// Summarises `tally`.
    pub fn new(tally: &Tally, facts: RunFacts) -> Report {
        let h = &tally.latency;
        let us = |ns: u64| ns as f64 / 1000.0;
        let answered = tally.counts.answered();
        let secs = facts.elapsed.as_secs_f64().max(1e-9);
        let auths = answered + facts.warmup_requests;
        // Injected provider errors are retried, chaos loses caches, JWT runs fetch keys and a
        // real provider is not counted: no exact call count then.
        let exact = facts.verified
            && !facts.errors_injected
            && facts.chaos.is_none()
            && facts.calls_per_login
            && facts.provider_calls.is_some();
        Report {
            scenario: facts.scenario,
            via: facts.via,
            lanes: facts.lanes,
            pace: match (facts.rounds, facts.rate) {
                (true, _) => "rounds",
                (false, Some(_)) => "open",
                (false, None) => "closed",
            }
            .into(),
            rate: facts.rate,
            brokers: facts.brokers,
            floor: facts.floor,
            duration_s: secs,
            answered,
            unanswered: facts
                .scheduled
                .map_or(0, |s| s.saturating_sub(answered + tally.counts.errors)),
            throughput: answered as f64 / secs,
            latency_us: Latency::of(h),
            valid_logins_us: (!tally.valid_latency.is_empty()
                && tally.valid_latency.len() < h.len())
            .then(|| Latency::of(&tally.valid_latency)),
            counts: tally.counts,
            verified: facts.verified,
            wrong_verdicts: facts.verified.then(|| tally.counts.wrong()),
            warmup_requests: facts.warmup_requests,
            provider: facts.provider,
            provider_calls: facts.provider_calls,
            provider_errors: facts.provider_errors,
            expected_provider_calls: exact.then_some(tally.keys.len() as u64),
            dedup_ratio: facts
                .provider_calls
                .filter(|&calls| calls > 0 && !facts.floor && facts.calls_per_login)
                .map(|calls| auths as f64 / calls as f64),
            broker_rss: facts.broker_rss,
            broker_cpu_s: facts.broker_cpu.map(|c| c.as_secs_f64()),
            broker_cpu_us_per_auth: facts
                .broker_cpu
                .filter(|_| answered > 0)
                .map(|c| c.as_secs_f64() * 1e6 / answered as f64),
            redis: facts.redis_work,
            redis_commands_per_auth: facts
                .redis_work
                .filter(|_| answered > 0)
                .map(|w| w.commands as f64 / answered as f64),
            redis_round_trips_per_auth: facts
                .redis_work
                .filter(|_| answered > 0)
                .map(|w| w.reads as f64 / answered as f64),
            program_peak_rss_kib: facts.program_peak_rss_kib,
            slowest_reply_ms: tally.slowest.as_secs_f64() * 1000.0,
            reply_deadline_ms: facts.reply_deadline.map(|d| d.as_millis() as u64),
            late_slack_ms: super::LATE_SLACK.as_millis() as u64,
            chaos: facts.chaos,
            percentiles: h
                .iter_quantiles(4)
                .map(|v| (v.quantile_iterated_to() * 100.0, us(v.value_iterated_to())))
                .collect(),
            // Whole buckets only: a last, partial one would show a false drop.
            timeline: tally
                .timeline
                .iter()
                .take((facts.elapsed.as_nanos() / BUCKET.as_nanos()).max(1) as usize)
                .map(|&n| n as f64 / BUCKET.as_secs_f64())
                .collect(),
        }
    }

    /// Whether the run found no fault (see [`Report::failures`]).
    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    /// The faults the run found, one line each: wrong verdicts, broken lanes, late replies, and
    /// in a chaos run more refusals at broker kills than lanes x kills, or a schedule that
    /// stopped early.
    pub fn failures(&self) -> Vec<String> {
        let c = &self.counts;
        let mut failures = Vec::new();
        if let Some(wrong @ 1..) = self.wrong_verdicts {
            failures.push(format!(
                "{wrong} wrong verdicts ({} wrong accepts, {} wrong refusals)",
                c.wrong_accepts, c.wrong_rejects
            ));
        }
        if c.errors > 0 {
            failures.push(format!("{} broken lanes", c.errors));
        }
        if c.late > 0 {
            failures.push(format!("{} replies later than the deadline", c.late));
        }
        if let Some(chaos) = &self.chaos {
            if c.kill_refusals > chaos.kill_refusal_bound {
                failures.push(format!(
                    "{} valid tokens refused at broker kills, more than lanes x kills = {}",
                    c.kill_refusals, chaos.kill_refusal_bound
                ));
            }
            if let Some(error) = &chaos.error {
                failures.push(format!("the chaos schedule stopped: {error}"));
            }
        }
        failures
    }

    /// Writes the report as pretty JSON.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }
}

impl Report {
    /// The slowest reply against the deadline, and the late ones.
    fn fmt_replies(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let deadline = self.reply_deadline_ms.map_or_else(
            || "no deadline".to_owned(),
            |d| format!("deadline {d} ms + {} ms slack", self.late_slack_ms),
        );
        writeln!(
            f,
            "  {:<18} slowest {:.1} ms from send ({deadline}), late {}",
            "replies", self.slowest_reply_ms, self.counts.late
        )
    }
}

impl Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = if self.floor { "floor" } else { "broker" };
        let pace = match (self.rate, self.pace.as_str()) {
            (Some(rate), _) => format!("open loop at {rate} req/s"),
            (None, "rounds") => "herd rounds".to_owned(),
            (None, _) => "closed loop".to_owned(),
        };
        writeln!(
            f,
            "scenario {:?} via {} ({} lanes), {pace}, {} {target}(s)",
            self.scenario, self.via, self.lanes, self.brokers
        )?;
        writeln!(
            f,
            "  {:<18} {} in {:.2} s = {:.0} auth/s",
            "answered", self.answered, self.duration_s, self.throughput
        )?;
        if self.unanswered > 0 {
            writeln!(
                f,
                "  {:<18} {} scheduled requests were never answered",
                "unanswered", self.unanswered
            )?;
        }
        for (name, l) in [
            ("latency (us)", Some(self.latency_us)),
            ("valid logins (us)", self.valid_logins_us),
        ] {
            let Some(l) = l else { continue };
            writeln!(
                f,
                "  {:<18} p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
                name, l.p50, l.p90, l.p99, l.p999, l.max, l.mean
            )?;
        }
        let c = self.counts;
        let wrong = self
            .wrong_verdicts
            .map_or_else(|| "not checked".to_owned(), |w| w.to_string());
        writeln!(
            f,
            "  {:<18} accepts {}  rejects {}  wrong {wrong}",
            "verdicts", c.accepts, c.rejects
        )?;
        if c.either + c.upstream_refusals + c.errors > 0 {
            writeln!(
                f,
                "  {:<18} at expiry {}  refused for provider errors {}  broken lanes {}",
                "", c.either, c.upstream_refusals, c.errors
            )?;
        }
        self.fmt_replies(f)?;
        if let Some(chaos) = &self.chaos {
            writeln!(
                f,
                "  {:<18} {} events in {:.0} s cycles: broker kills {}, Redis kills {}; valid refused in flight at a broker kill {} (bound {}){}",
                "chaos",
                chaos.events.len(),
                chaos.period_s,
                chaos.broker_kills,
                chaos.redis_kills,
                c.kill_refusals,
                chaos.kill_refusal_bound,
                chaos.error.as_ref().map_or_else(String::new, |e| format!("; STOPPED: {e}")),
            )?;
        }
        let expected = self.expected_provider_calls.map_or_else(String::new, |e| {
            let mark = if Some(e) == self.provider_calls {
                ""
            } else {
                ", NOT what was made"
            };
            format!(" (one per distinct login: {e}{mark})")
        });
        let dedup = self
            .dedup_ratio
            .map_or_else(String::new, |d| format!(", {d:.1} auth requests per call"));
        match self.provider_calls {
            Some(calls) => writeln!(
                f,
                "  {:<18} {}: calls {calls}{expected}, of which failed {}{dedup}",
                "provider", self.provider, self.provider_errors
            )?,
            None => writeln!(f, "  {:<18} real (calls not counted)", "provider")?,
        }
        let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
        let brokers: Vec<String> = self
            .broker_rss
            .iter()
            .map(|r| format!("{} (peak {})", mib(r.now_kib), mib(r.peak_kib)))
            .collect();
        let brokers = if brokers.is_empty() {
            "-".to_owned()
        } else {
            brokers.join(", ")
        };
        let programs = self
            .program_peak_rss_kib
            .map_or_else(|| "-".to_owned(), mib);
        if let (Some(work), Some(commands), Some(trips)) = (
            self.redis,
            self.redis_commands_per_auth,
            self.redis_round_trips_per_auth,
        ) {
            writeln!(
                f,
                "  {:<18} {} commands in {} round trips while measuring = {commands:.2} commands, \
                 {trips:.2} round trips per answer",
                "redis", work.commands, work.reads
            )?;
        }
        if let (Some(cpu), Some(per_auth)) = (self.broker_cpu_s, self.broker_cpu_us_per_auth) {
            writeln!(
                f,
                "  {:<18} {target} {cpu:.2} s = {per_auth:.2} us per answer",
                "CPU"
            )?;
        }
        write!(
            f,
            "  {:<18} {target} {brokers}; largest extauth program peak {programs}",
            "RSS"
        )
    }
}

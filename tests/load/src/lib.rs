//! `extauth-load`: drives the broker the way a clustered ejabberd does, and measures it.
//!
//! A run: start the mock provider and the broker(s) ([`services`]), open the lanes ([`lane`]:
//! extauth programs, or slots on wire connections), warm them up, then send the scenario's
//! requests ([`scenario`]) on the schedule ([`schedule`]), judge every answer, and summarise
//! ([`stats`], [`report`], [`plot`]). A chaos run ([`chaos`]) also starts a redis-server
//! ([`redis_server`]) and kills and restarts it and a broker while measuring. See
//! docs/benchmarks.md for the method.

pub mod chaos;
pub mod cli;
pub mod floor;
pub mod lane;
pub mod plot;
pub mod redis_server;
pub mod report;
pub mod scenario;
pub mod schedule;
pub mod services;
pub mod stats;
pub mod tokens;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::future::try_join_all;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use self::chaos::{Chaos, ChaosReport, KillLog};
use self::cli::{LoadArgs, MockValidator, ScenarioKind, Via};
use self::lane::{Answer, HttpLane, Lane, ProgramLane, ProgramSpec, WireConn};
use self::report::{Report, RunFacts};
use self::scenario::{Job, Judgement, Workload};
use self::schedule::{LaneSchedule, Pace, Plan, Schedule};
use self::services::{sibling_binary, Services};
use self::stats::{Counts, LaneTally, Reply, Shared};
use extauth_broker::devprovider::DevProvider;
use extauth_broker::now_ms;
use extauth_protocol::wire::Reason;

/// Slack on top of the shim's deadline before a reply counts as late: the harness and the shim
/// share 2 loaded cores, and a scheduling delay is not a broker fault.
pub const LATE_SLACK: Duration = Duration::from_secs(1);
/// Brokers a chaos run starts at least: one to kill, one to fail over to.
const CHAOS_BROKERS: usize = 2;

/// Runs a load test and returns its report.
///
/// # Errors
/// Bad options, services or lanes that do not start (for `--chaos`: redis-server too), a
/// warm-up that fails.
pub async fn run(args: &LoadArgs) -> Result<Report> {
    let via = args.via()?;
    args.check(&via)?;
    let lane_count = args.lanes(&via);
    let workload = Arc::new(Workload::new(args, lane_count)?);
    let dir = tempfile::Builder::new().prefix("extauth-load").tempdir()?;
    let (mut chaos, args) = prepare_chaos(args, dir.path()).await?;
    let args = &storm_defaults(&args);
    let mut services = Services::start(args, scenario::resolver(), workload.jwks(), dir).await?;
    let shared = Shared::default();
    let strict = args.verify() && args.provider_error_rate == 0.0;
    let (lanes, warmup_requests) = if workload.kind() == ScenarioKind::Storm {
        // Warm the first broker, whose verdicts land in Redis; measure the others.
        let mut warm = open_lanes(args, &via, &services, &services.brokers[..1]).await?;
        let sent = warm_up(&mut warm, &workload.warmup(), &args.domain, &shared, strict).await?;
        let mut lanes = open_lanes(args, &via, &services, &services.brokers[1..]).await?;
        warm_up(&mut lanes, &[], &args.domain, &shared, strict).await?;
        (lanes, sent)
    } else {
        let mut lanes = open_lanes(args, &via, &services, &services.brokers).await?;
        let sent = warm_up(
            &mut lanes,
            &workload.warmup(),
            &args.domain,
            &shared,
            strict,
        )
        .await?;
        (lanes, sent)
    };

    let pace = match (workload.kind(), args.rate) {
        (ScenarioKind::Herd, _) => Pace::Rounds,
        (_, Some(rate)) => Pace::Open(rate),
        (_, None) => Pace::Closed,
    };
    // CPU time is read from /proc per process: a broker killed mid-run takes its share along.
    let cpu_before = services.broker_cpu().filter(|_| chaos.is_none());
    let redis_url = args.redis.as_deref().filter(|_| chaos.is_none());
    let redis_before = match redis_url {
        Some(url) => redis_server::work_done(url).await,
        None => None,
    };
    let judge = Arc::new(Judge::new(args, &via, chaos.as_ref().map(Chaos::kills)));
    let lanes = Lanes {
        lanes,
        workload: workload.clone(),
        shared: &shared,
        judge,
    };
    let measured = measure(
        args,
        lanes,
        pace,
        chaos.as_mut().map(|c| (c, &mut services)),
    )
    .await?;
    let broker_cpu = services
        .broker_cpu()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let redis_work = match (redis_url, redis_before) {
        (Some(url), Some(before)) => redis_server::work_done(url)
            .await
            .map(|after| after.since(before)),
        _ => None,
    };
    let facts = RunFacts {
        scenario: workload.kind(),
        via: describe(args, &via),
        lanes: lane_count,
        rate: args.rate,
        rounds: pace == Pace::Rounds,
        brokers: services.brokers.len(),
        floor: args.floor,
        verified: args.verify(),
        elapsed: measured.elapsed,
        scheduled: matches!(pace, Pace::Open(_)).then_some(measured.scheduled),
        warmup_requests,
        provider: match (&args.provider_url, args.validator) {
            (Some(_), _) => "real".into(),
            (None, MockValidator::Introspection) => "mock introspection".into(),
            (None, MockValidator::Jwt) => "mock jwt".into(),
        },
        provider_calls: services.provider.as_ref().map(DevProvider::calls),
        provider_errors: services
            .provider
            .as_ref()
            .map_or(0, DevProvider::injected_errors),
        // Brokers the harness did not start may use another provider, or hold cached verdicts.
        calls_per_login: args.validator == MockValidator::Introspection && args.broker.is_empty(),
        errors_injected: args.provider_error_rate > 0.0,
        broker_rss: services.broker_rss_kib(),
        broker_cpu,
        redis_work,
        program_peak_rss_kib: measured.lanes.iter().filter_map(Lane::peak_rss_kib).max(),
        reply_deadline: (via == Via::Shim).then_some(args.shim_timeout),
        chaos: measured.chaos,
    };
    close(measured.lanes).await;
    Ok(Report::new(&shared.into_tally(), facts))
}

/// A storm sends each of its tokens once unless told otherwise: `--requests` defaults to
/// `--tokens` (`check_storm` refuses a `--duration`).
fn storm_defaults(args: &LoadArgs) -> LoadArgs {
    let mut args = args.clone();
    if args.scenario == ScenarioKind::Storm && args.requests.is_none() {
        args.requests = Some(args.tokens);
    }
    args
}

/// For `--chaos`: starts the run's redis-server in `dir`, and returns it with the options the
/// brokers are then started with (sharing that Redis, at least two of them, as `--redis` and
/// `--brokers` would). Otherwise: no chaos, the options as they are.
async fn prepare_chaos(args: &LoadArgs, dir: &Path) -> Result<(Option<Chaos>, LoadArgs)> {
    if !args.chaos {
        return Ok((None, args.clone()));
    }
    let chaos = Chaos::start(args, dir).await?;
    let args = LoadArgs {
        redis: Some(chaos.redis_url()),
        brokers: args.brokers.max(CHAOS_BROKERS),
        ..args.clone()
    };
    Ok((Some(chaos), args))
}

/// What the measured phase leaves: the lanes (still open), its length, how many requests the
/// open-loop pacer scheduled, and what a chaos schedule did meanwhile.
struct Measured {
    lanes: Vec<Lane>,
    elapsed: Duration,
    scheduled: u64,
    chaos: Option<ChaosReport>,
}

/// The lanes to drive, and what they share: the jobs, the tally and the judge.
struct Lanes<'a> {
    lanes: Vec<Lane>,
    workload: Arc<Workload>,
    shared: &'a Shared,
    judge: Arc<Judge>,
}

/// Runs every lane on the schedule until the plan is done, with the progress bar; in a chaos
/// run, the chaos schedule runs meanwhile against the run's Redis and brokers, until the last
/// lane is done.
async fn measure(
    args: &LoadArgs,
    lanes: Lanes<'_>,
    pace: Pace,
    chaos: Option<(&mut Chaos, &mut Services)>,
) -> Result<Measured> {
    let plan = Plan {
        lanes: lanes.lanes.len(),
        requests: args.requests,
        duration: args.duration_or_default(),
        pace,
    };
    let bar = progress_bar(args);
    let stop = CancellationToken::new();
    let shared = lanes.shared;
    shared.start_now();
    let started = Instant::now();
    let (schedule, views) = Schedule::start(plan);
    let progress = progress(args, bar.clone(), shared, started);
    let driving = async {
        let driven = drive_all(lanes, views).await;
        stop.cancel();
        driven
    };
    let chaos_run = async {
        match chaos {
            Some((chaos, services)) => {
                Some(chaos.run(services, started, &stop, &bar, plan.lanes).await)
            }
            None => None,
        }
    };
    let (lanes, chaos) = tokio::join!(driving, chaos_run);
    let elapsed = started.elapsed();
    progress.abort();
    Ok(Measured {
        lanes: lanes?,
        elapsed,
        scheduled: schedule.finish(),
        chaos,
    })
}

/// Drives each lane on its own task with its view of the schedule; returns the lanes when
/// every one is done.
async fn drive_all(lanes: Lanes<'_>, views: Vec<LaneSchedule>) -> Result<Vec<Lane>> {
    let tasks: Vec<_> = lanes
        .lanes
        .into_iter()
        .zip(views)
        .map(|(lane, view)| {
            tokio::spawn(drive(
                lane,
                view,
                lanes.workload.clone(),
                lanes.shared.lane(),
                lanes.judge.clone(),
            ))
        })
        .collect();
    let mut done = Vec::with_capacity(tasks.len());
    for task in tasks {
        done.push(task.await.context("a lane panicked")?);
    }
    Ok(done)
}

fn describe(args: &LoadArgs, via: &Via) -> String {
    match via {
        Via::Shim => format!("shim {}x{}", args.nodes, args.pool_size),
        Via::Wire => format!("wire {}x{}", args.connections, args.depth),
        Via::Program(cmd) => format!("program {}x{} `{cmd}`", args.nodes, args.pool_size),
        Via::Http => format!("http {}x{}", args.nodes, args.pool_size),
    }
}

/// Starts the extauth programs (lane `i` plays a program of node `i % nodes`, so consecutive
/// requests go round-robin over nodes and programs) or opens the wire connections, connection
/// `c` to `brokers[c % brokers.len()]`. In a chaos run every shim gets every broker as its
/// failover list, lane `i` starting with broker `i % brokers` (`A,B` for even lanes, `B,A` for
/// odd ones with two brokers).
async fn open_lanes(
    args: &LoadArgs,
    via: &Via,
    services: &Services,
    brokers: &[String],
) -> Result<Vec<Lane>> {
    let count = args.lanes(via);
    let spec = |i: usize| -> Result<ProgramSpec> {
        let node = i % args.nodes;
        Ok(match via {
            Via::Program(cmd) => ProgramSpec::shell(cmd, services.program_env(args, node)),
            _ => {
                let mut shim_args = vec![
                    "--timeout".into(),
                    args.shim_timeout.as_secs_f64().to_string(),
                ];
                if args.chaos {
                    shim_args.extend(["--broker".into(), services.failover_list(i)]);
                }
                ProgramSpec {
                    program: sibling_binary(args.shim.as_deref(), "extauth-shim")?
                        .display()
                        .to_string(),
                    args: shim_args,
                    env: services.program_env(args, node),
                }
            }
        })
    };
    match via {
        Via::Wire => {
            let conns = try_join_all(
                (0..args.connections)
                    .map(|c| WireConn::connect(&brokers[c % brokers.len()], "extauth-load")),
            )
            .await?;
            Ok((0..count)
                .map(|i| Lane::Wire(conns[i % conns.len()].clone()))
                .collect())
        }
        Via::Http => {
            let fronts = &services.http_fronts;
            let secret = services.http_secret();
            let lanes = try_join_all((0..count).map(|i| {
                let front = &fronts[i % fronts.len()];
                async move { HttpLane::connect(front, secret).await }
            }))
            .await?;
            Ok(lanes.into_iter().map(|l| Lane::Http(Box::new(l))).collect())
        }
        Via::Shim | Via::Program(_) => (0..count)
            .map(|i| Ok(Lane::Program(Box::new(ProgramLane::spawn(&spec(i)?)?))))
            .collect(),
    }
}

/// Opens every lane with an `isuser` (program start-up and broker connection stay out of the
/// figures), then sends the warm-up `jobs`, spread over the lanes. Returns how many auth
/// requests the warm-up sent.
/// With `strict` (verdicts checked, no provider errors injected), a refused warm-up token stops
/// the run at once: the brokers cannot validate anything, and the cause is in their set-up.
async fn warm_up(
    lanes: &mut [Lane],
    jobs: &[Job],
    domain: &str,
    shared: &Shared,
    strict: bool,
) -> Result<u64> {
    let count = lanes.len();
    try_join_all(lanes.iter_mut().enumerate().map(|(i, lane)| {
        let mut tally = shared.lane();
        async move {
            lane.isuser("warm-up", domain)
                .await
                .context("warming up a lane")?;
            for job in jobs.iter().skip(i).step_by(count) {
                tally.key(job.key);
                let answer = lane
                    .auth(&job.user, domain, &job.token)
                    .await
                    .context("warm-up request")?;
                if strict && !answer.ok {
                    let reason = answer
                        .reason
                        .map(|r| format!(" (reason {})", r.as_str()))
                        .unwrap_or_default();
                    bail!("warm-up: a valid token of {} was refused{reason}: check the provider the brokers use (--provider-url, --client-id, EXTAUTH_CLIENT_SECRET) and their flags", job.user);
                }
            }
            anyhow::Ok(())
        }
    }))
    .await?;
    Ok(jobs.len() as u64)
}

/// One lane's loop: next slot, its job, send, judge, record. A lane that breaks stops.
async fn drive(
    mut lane: Lane,
    mut schedule: LaneSchedule,
    workload: Arc<Workload>,
    mut tally: LaneTally,
    judge: Arc<Judge>,
) -> Lane {
    while let Some(slot) = schedule.next().await {
        let job = workload.job(slot.seq);
        tally.key(job.key);
        let (sent, sent_ms) = (Instant::now(), now_ms());
        match lane.auth(&job.user, &judge.domain, &job.token).await {
            Ok(answer) => {
                let flight = Flight {
                    sent,
                    sent_ms,
                    done: Instant::now(),
                    done_ms: now_ms(),
                };
                let counts = judge.counts(&job, answer, &flight);
                let reply = Reply {
                    latency: flight.done - slot.intended.unwrap_or(sent),
                    took: flight.done - sent,
                    done: flight.done,
                };
                tally.answer(reply, counts, job.expect.wants_accept());
            }
            Err(e) => {
                eprintln!("extauth-load: a lane broke: {e:#}");
                tally.count(Counts {
                    errors: 1,
                    ..Counts::default()
                });
                schedule.abandon();
                return lane;
            }
        }
    }
    lane
}

/// When a request was sent and answered, on both clocks: wall-clock ms since the epoch (token
/// expiry) and monotonic instants (broker kills, the deadline).
struct Flight {
    sent: Instant,
    sent_ms: u64,
    done: Instant,
    done_ms: u64,
}

/// Turns an answer into counts.
struct Judge {
    domain: String,
    verify: bool,
    errors_injected: bool,
    /// Chaos runs: the broker kills, which excuse refusals of requests in flight at one.
    kills: Option<KillLog>,
    /// Shim lanes: a reply slower than this (from the send) is late.
    late_after: Option<Duration>,
}

impl Judge {
    /// The judge of `args`' run over `via`; `kills` in a chaos run.
    fn new(args: &LoadArgs, via: &Via, kills: Option<KillLog>) -> Judge {
        Judge {
            domain: args.domain.clone(),
            verify: args.verify(),
            errors_injected: args.provider_error_rate > 0.0,
            kills,
            late_after: (*via == Via::Shim).then_some(args.shim_timeout + LATE_SLACK),
        }
    }

    fn counts(&self, job: &scenario::Job, answer: Answer, flight: &Flight) -> Counts {
        let mut c = Counts {
            accepts: answer.ok.into(),
            rejects: (!answer.ok).into(),
            late: self
                .late_after
                .is_some_and(|limit| flight.done - flight.sent > limit)
                .into(),
            ..Counts::default()
        };
        if !self.verify {
            return c;
        }
        match job.expect.judge(answer.ok, flight.sent_ms, flight.done_ms) {
            Judgement::Right => {}
            Judgement::Either => c.either = 1,
            Judgement::Wrong if answer.ok => c.wrong_accepts = 1,
            // A refusal where "yes" was right is failing closed when the provider failed: the
            // wire lanes know it from the reason, program lanes only that failures were injected.
            Judgement::Wrong
                if job.expect.wants_accept() && self.provider_failed(answer.reason) =>
            {
                c.upstream_refusals = 1
            }
            // The shim may have sent it to the broker that died; it fails closed.
            Judgement::Wrong if job.expect.wants_accept() && self.killed_in_flight(flight) => {
                c.kill_refusals = 1
            }
            Judgement::Wrong => c.wrong_rejects = 1,
        }
        c
    }

    fn provider_failed(&self, reason: Option<Reason>) -> bool {
        match reason {
            Some(reason) => reason == Reason::UpstreamUnavailable,
            None => self.errors_injected,
        }
    }

    fn killed_in_flight(&self, flight: &Flight) -> bool {
        self.kills
            .as_ref()
            .is_some_and(|k| k.in_flight(flight.sent, flight.done))
    }
}

/// The progress bar (hidden with --quiet or when stderr is not a terminal); chaos events are
/// printed above it.
fn progress_bar(args: &LoadArgs) -> ProgressBar {
    let bar = match (args.requests, args.duration_or_default()) {
        _ if args.quiet => ProgressBar::hidden(),
        (Some(n), _) => ProgressBar::new(n),
        (None, duration) => ProgressBar::new(duration.map_or(0, |d| d.as_millis() as u64)),
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {msg}")
            .expect("valid template"),
    );
    bar
}

/// Moves `bar` along with the live rate, 4 times a second.
fn progress(
    args: &LoadArgs,
    bar: ProgressBar,
    shared: &Shared,
    started: Instant,
) -> tokio::task::JoinHandle<()> {
    let by_requests = args.requests.is_some();
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let (now, answered) = (Instant::now(), shared.answered());
            let rate = (answered - last.1) as f64 / (now - last.0).as_secs_f64();
            last = (now, answered);
            bar.set_position(if by_requests {
                answered
            } else {
                started.elapsed().as_millis() as u64
            });
            bar.set_message(format!("{answered} answered, {rate:.0} auth/s"));
        }
    })
}

/// Ends every program lane (end of input, then a kill after a grace period).
async fn close(lanes: Vec<Lane>) {
    let programs = lanes.into_iter().filter_map(|l| match l {
        Lane::Program(p) => Some(p.close()),
        Lane::Wire(_) | Lane::Http(_) => None,
    });
    futures_util::future::join_all(programs).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{Expect, Job};

    fn judge(kills: Option<KillLog>) -> Judge {
        Judge {
            domain: "localhost".into(),
            verify: true,
            errors_injected: false,
            kills,
            late_after: Some(Duration::from_secs(11)),
        }
    }

    fn valid() -> Job {
        Job {
            user: "user1".into(),
            token: "run.1.99999999999.1".into(),
            expect: Expect::Accept,
            key: 4,
        }
    }

    fn flight(sent: Instant, took: Duration) -> Flight {
        Flight {
            sent,
            sent_ms: 1_000,
            done: sent + took,
            done_ms: 1_000 + took.as_millis() as u64,
        }
    }

    const REFUSED: Answer = Answer {
        ok: false,
        reason: None,
    };

    #[test]
    fn a_valid_token_refused_across_a_broker_kill_is_tolerated_and_no_other() {
        let kills = KillLog::default();
        let sent = Instant::now();
        let window = kills.open();
        kills.close(window);
        let judge = judge(Some(kills));
        let across = judge.counts(&valid(), REFUSED, &flight(sent, Duration::from_millis(5)));
        assert_eq!((across.kill_refusals, across.wrong_rejects), (1, 0));
        let later = Instant::now() + Duration::from_millis(1);
        let after = judge.counts(&valid(), REFUSED, &flight(later, Duration::from_millis(5)));
        assert_eq!((after.kill_refusals, after.wrong_rejects), (0, 1));
    }

    #[test]
    fn a_reply_after_the_deadline_is_late_however_it_is_judged() {
        let judge = judge(None);
        let answer = Answer {
            ok: true,
            reason: None,
        };
        let slow = flight(Instant::now(), Duration::from_millis(11_001));
        let counts = judge.counts(&valid(), answer, &slow);
        assert_eq!((counts.late, counts.wrong()), (1, 0));
        let in_time = flight(Instant::now(), Duration::from_secs(11));
        assert_eq!(judge.counts(&valid(), answer, &in_time).late, 0);
    }
}

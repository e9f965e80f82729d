//! `extauth-load`: drives the broker the way a clustered ejabberd does, and measures it.
//!
//! A run: start the mock provider and the broker(s) ([`services`]), open the lanes ([`lane`]:
//! extauth programs, or slots on wire connections), warm them up, then send the scenario's
//! requests ([`scenario`]) on the schedule ([`schedule`]), judge every answer, and summarise
//! ([`stats`], [`report`], [`plot`]). See docs/benchmarks.md for the method.

pub mod cli;
pub mod floor;
pub mod lane;
pub mod plot;
pub mod report;
pub mod scenario;
pub mod schedule;
pub mod services;
pub mod stats;
pub mod tokens;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::future::try_join_all;
use indicatif::{ProgressBar, ProgressStyle};

use self::cli::{LoadArgs, MockValidator, ScenarioKind, Via};
use self::lane::{Answer, Lane, ProgramLane, ProgramSpec, WireConn};
use self::report::{Report, RunFacts};
use self::scenario::{Judgement, Workload};
use self::schedule::{LaneSchedule, Pace, Plan, Schedule};
use self::services::{sibling_binary, Services};
use self::stats::{Counts, LaneTally, Shared};
use crate::cache::now_ms;
use crate::devprovider::DevProvider;
use crate::wire::Reason;

/// The shim's `--timeout` in shim lanes (its default).
const SHIM_TIMEOUT_S: &str = "10";

/// Runs a load test and returns its report.
///
/// # Errors
/// Bad options, services or lanes that do not start, a warm-up that fails.
pub async fn run(args: &LoadArgs) -> Result<Report> {
    let via = args.via()?;
    args.check(&via)?;
    let lane_count = args.lanes(&via);
    let workload = Arc::new(Workload::new(args, lane_count)?);
    let services = Services::start(args, scenario::resolver(), workload.jwks()).await?;
    let mut lanes = open_lanes(args, &via, &services).await?;
    let shared = Shared::default();
    let warmup_requests = warm_up(&mut lanes, &workload, &args.domain, &shared).await?;

    let pace = match (workload.kind(), args.rate) {
        (ScenarioKind::Herd, _) => Pace::Rounds,
        (_, Some(rate)) => Pace::Open(rate),
        (_, None) => Pace::Closed,
    };
    let cpu_before = services.broker_cpu();
    let measured = measure(args, lanes, pace, workload.clone(), &shared).await?;
    let broker_cpu = services
        .broker_cpu()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
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
        calls_per_login: args.validator == MockValidator::Introspection,
        errors_injected: args.provider_error_rate > 0.0,
        broker_rss: services.broker_rss_kib(),
        broker_cpu,
        program_peak_rss_kib: measured.lanes.iter().filter_map(Lane::peak_rss_kib).max(),
    };
    close(measured.lanes).await;
    Ok(Report::new(&shared.into_tally(), facts))
}

/// What the measured phase leaves: the lanes (still open), its length, and how many requests
/// the open-loop pacer scheduled.
struct Measured {
    lanes: Vec<Lane>,
    elapsed: Duration,
    scheduled: u64,
}

/// Runs every lane on the schedule until the plan is done, with the progress bar.
async fn measure(
    args: &LoadArgs,
    lanes: Vec<Lane>,
    pace: Pace,
    workload: Arc<Workload>,
    shared: &Shared,
) -> Result<Measured> {
    let plan = Plan {
        lanes: lanes.len(),
        requests: args.requests,
        duration: args.duration_or_default(),
        pace,
    };
    let judge = Arc::new(Judge {
        domain: args.domain.clone(),
        verify: args.verify(),
        errors_injected: args.provider_error_rate > 0.0,
    });
    shared.start_now();
    let started = Instant::now();
    let (schedule, views) = Schedule::start(plan);
    let progress = progress(args, shared, started);
    let tasks: Vec<_> = lanes
        .into_iter()
        .zip(views)
        .map(|(lane, view)| {
            tokio::spawn(drive(
                lane,
                view,
                workload.clone(),
                shared.lane(),
                judge.clone(),
            ))
        })
        .collect();
    let mut lanes = Vec::with_capacity(tasks.len());
    for task in tasks {
        lanes.push(task.await.context("a lane panicked")?);
    }
    let elapsed = started.elapsed();
    progress.abort();
    Ok(Measured {
        lanes,
        elapsed,
        scheduled: schedule.finish(),
    })
}

fn describe(args: &LoadArgs, via: &Via) -> String {
    match via {
        Via::Shim => format!("shim {}x{}", args.nodes, args.pool_size),
        Via::Wire => format!("wire {}x{}", args.connections, args.depth),
        Via::Program(cmd) => format!("program {}x{} `{cmd}`", args.nodes, args.pool_size),
    }
}

/// Starts the extauth programs (lane `i` plays a program of node `i % nodes`, so consecutive
/// requests go round-robin over nodes and programs) or opens the wire connections.
async fn open_lanes(args: &LoadArgs, via: &Via, services: &Services) -> Result<Vec<Lane>> {
    let count = args.lanes(via);
    let spec = |node: usize| -> Result<ProgramSpec> {
        Ok(match via {
            Via::Program(cmd) => ProgramSpec::shell(cmd, services.program_env(args, node)),
            _ => ProgramSpec {
                program: sibling_binary(args.shim.as_deref(), "extauth-shim")?
                    .display()
                    .to_string(),
                args: vec!["--timeout".into(), SHIM_TIMEOUT_S.into()],
                env: services.program_env(args, node),
            },
        })
    };
    match via {
        Via::Wire => {
            let conns = try_join_all((0..args.connections).map(|c| {
                WireConn::connect(
                    &services.brokers[c % services.brokers.len()],
                    "extauth-load",
                )
            }))
            .await?;
            Ok((0..count)
                .map(|i| Lane::Wire(conns[i % conns.len()].clone()))
                .collect())
        }
        Via::Shim | Via::Program(_) => (0..count)
            .map(|i| {
                Ok(Lane::Program(Box::new(ProgramLane::spawn(&spec(
                    i % args.nodes,
                )?)?)))
            })
            .collect(),
    }
}

/// Opens every lane with an `isuser` (program start-up and broker connection stay out of the
/// figures), then sends the scenario's warm-up jobs, spread over the lanes. Returns how many
/// auth requests the warm-up sent.
async fn warm_up(
    lanes: &mut [Lane],
    workload: &Workload,
    domain: &str,
    shared: &Shared,
) -> Result<u64> {
    let jobs = workload.warmup();
    let count = lanes.len();
    try_join_all(lanes.iter_mut().enumerate().map(|(i, lane)| {
        let (jobs, mut tally) = (&jobs, shared.lane());
        async move {
            lane.isuser("warm-up", domain)
                .await
                .context("warming up a lane")?;
            for job in jobs.iter().skip(i).step_by(count) {
                tally.key(job.key);
                lane.auth(&job.user, domain, &job.token)
                    .await
                    .context("warm-up request")?;
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
                let done = Instant::now();
                let counts = judge.counts(&job, answer, sent_ms, now_ms());
                tally.answer(done - slot.intended.unwrap_or(sent), done, counts);
            }
            Err(_) => {
                tally.count(Counts {
                    errors: 1,
                    ..Counts::default()
                });
                break;
            }
        }
    }
    lane
}

/// Turns an answer into counts.
struct Judge {
    domain: String,
    verify: bool,
    errors_injected: bool,
}

impl Judge {
    fn counts(&self, job: &scenario::Job, answer: Answer, sent_ms: u64, done_ms: u64) -> Counts {
        let mut c = Counts {
            accepts: answer.ok.into(),
            rejects: (!answer.ok).into(),
            ..Counts::default()
        };
        if !self.verify {
            return c;
        }
        match job.expect.judge(answer.ok, sent_ms, done_ms) {
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
}

/// A progress bar with the live rate, redrawn 4 times a second (hidden with --quiet or when
/// stderr is not a terminal).
fn progress(args: &LoadArgs, shared: &Shared, started: Instant) -> tokio::task::JoinHandle<()> {
    let (bar, by_requests) = match (args.requests, args.duration_or_default()) {
        (_, _) if args.quiet => (ProgressBar::hidden(), true),
        (Some(n), _) => (ProgressBar::new(n), true),
        (None, duration) => (
            ProgressBar::new(duration.map_or(0, |d| d.as_millis() as u64)),
            false,
        ),
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {msg}")
            .expect("valid template"),
    );
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
        Lane::Wire(_) => None,
    });
    futures_util::future::join_all(programs).await;
}

//! Chaos runs (`--chaos`): while the load runs, Redis and the brokers are killed and restarted
//! on a repeating schedule, and every event is printed and recorded for the report.
//!
//! What a chaos run must show (issue 7): no invalid, expired or foreign token is ever accepted;
//! every valid token is accepted, except a request in flight at a broker kill (the shim may
//! have sent it to the broker that died); no reply comes later than the shim's deadline. Redis
//! kills are not excused: brokers must serve through them from their own cache and the
//! provider.

use std::fmt::{self, Display};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::ProgressBar;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::cli::LoadArgs;
use super::redis_server::RedisServer;
use super::services::Services;

/// Length of the reference cycle below, ms; `--chaos-period` scales it.
const REFERENCE_PERIOD_MS: u64 = 15_000;
/// The reference cycle (ms into a 15 s period): Redis down alone; broker A down alone; then
/// Redis down, broker B killed and started again while Redis is still down (a broker must start
/// without Redis and connect when it is back), and Redis back.
///
/// The second kill is B's, not A's, because a shim stays on the broker it failed over to: after
/// A's kill every shim talks to B, so killing A again would hit an idle broker. Killing B sends
/// every shim back to A, so that each kill of each cycle hits requests in flight.
const CYCLE: [(u64, Action); 8] = [
    (2_000, Action::KillRedis),
    (4_000, Action::RestartRedis),
    (6_000, Action::KillBroker(0)),
    (7_500, Action::RestartBroker(0)),
    (9_000, Action::KillRedis),
    (10_000, Action::KillBroker(1)),
    (11_500, Action::RestartBroker(1)),
    (12_500, Action::RestartRedis),
];

/// One thing the schedule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL redis-server.
    KillRedis,
    /// Start redis-server again on its port (empty: no persistence).
    RestartRedis,
    /// SIGKILL started broker N (0 is A, 1 is B).
    KillBroker(usize),
    /// Start broker N again on its socket, with its flags.
    RestartBroker(usize),
}

impl Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |i: &usize| char::from(b'A' + (*i % 26) as u8);
        match self {
            Action::KillRedis => write!(f, "kill redis"),
            Action::RestartRedis => write!(f, "restart redis"),
            Action::KillBroker(i) => write!(f, "kill broker {}", name(i)),
            Action::RestartBroker(i) => write!(f, "restart broker {}", name(i)),
        }
    }
}

/// An event of the schedule, as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// When it started, seconds since measuring started.
    pub at_s: f64,
    /// What was done: `kill redis`, `restart redis`, `kill broker A`, `restart broker B`...
    pub what: String,
    /// How long it took, ms (a restart: until the process answers again).
    pub took_ms: f64,
}

/// What the schedule did, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// Length of one cycle, seconds.
    pub period_s: f64,
    /// Every event, in order.
    pub events: Vec<Event>,
    /// Times a broker was killed.
    pub broker_kills: u64,
    /// Times Redis was killed.
    pub redis_kills: u64,
    /// Most valid tokens that may be refused for being in flight at a broker kill: one per lane
    /// and kill (each lane has one request in flight).
    pub kill_refusal_bound: u64,
    /// Why the schedule stopped early (a process that did not come back); fails the run.
    pub error: Option<String>,
}

/// The instants around each broker kill, shared with the judge. A window opens before the
/// signal and closes once the process is reaped, so a refusal caused by the kill is always
/// answered after its window opened, even if the judge runs before the window closes.
#[derive(Clone, Default)]
pub struct KillLog(Arc<Mutex<Vec<KillWindow>>>);

/// From right before a kill signal to when the process was reaped (`None`: not yet).
type KillWindow = (Instant, Option<Instant>);

impl KillLog {
    /// Opens a window (call right before the signal); returns its index for [`KillLog::close`].
    pub(super) fn open(&self) -> usize {
        let mut windows = self.0.lock().expect("kill log");
        windows.push((Instant::now(), None));
        windows.len() - 1
    }

    /// Closes window `window` (call once the killed process is reaped).
    pub(super) fn close(&self, window: usize) {
        self.0.lock().expect("kill log")[window].1 = Some(Instant::now());
    }

    /// Whether a request sent at `sent` and answered at `done` was in flight during a kill.
    pub fn in_flight(&self, sent: Instant, done: Instant) -> bool {
        let windows = self.0.lock().expect("kill log");
        windows
            .iter()
            .any(|&(from, to)| from <= done && to.is_none_or(|to| to >= sent))
    }
}

/// The chaos controller: owns the run's redis-server, kills and restarts it and the brokers.
pub struct Chaos {
    period: Duration,
    redis: RedisServer,
    kills: KillLog,
}

impl Chaos {
    /// Starts the run's redis-server (`--redis-server`, or `redis-server` on PATH) in `dir`.
    ///
    /// # Errors
    /// When redis-server cannot be started (see [`RedisServer::start`]).
    pub async fn start(args: &LoadArgs, dir: &Path) -> Result<Chaos> {
        let program = args
            .redis_server
            .clone()
            .unwrap_or_else(|| "redis-server".into());
        Ok(Chaos {
            period: args.chaos_period,
            redis: RedisServer::start(&program, dir).await?,
            kills: KillLog::default(),
        })
    }

    /// The URL of the run's Redis, for the brokers.
    pub fn redis_url(&self) -> String {
        self.redis.url()
    }

    /// The broker kills so far (live: the judge reads it while the schedule runs).
    pub fn kills(&self) -> KillLog {
        self.kills.clone()
    }

    /// Repeats the cycle from `origin` until `stop` is cancelled, printing each event (above
    /// `bar`, or to stderr when it is hidden). Stops early at the first event that fails, and
    /// says why in the report. `lanes`: requests in flight at most, for the refusal bound.
    pub async fn run(
        &mut self,
        services: &mut Services,
        origin: Instant,
        stop: &CancellationToken,
        bar: &ProgressBar,
        lanes: usize,
    ) -> ChaosReport {
        let mut report = ChaosReport {
            period_s: self.period.as_secs_f64(),
            events: Vec::new(),
            broker_kills: 0,
            redis_kills: 0,
            kill_refusal_bound: 0,
            error: None,
        };
        let scale = self.period.as_secs_f64() / (REFERENCE_PERIOD_MS as f64 / 1000.0);
        'cycles: for cycle in 0u32.. {
            let cycle_start = origin + self.period * cycle;
            for (offset_ms, action) in CYCLE {
                let due = cycle_start + Duration::from_millis(offset_ms).mul_f64(scale);
                tokio::select! {
                    _ = stop.cancelled() => break 'cycles,
                    _ = tokio::time::sleep_until(due.into()) => {}
                }
                let started = Instant::now();
                if let Err(e) = self.act(action, services).await {
                    note(bar, &format!("extauth-load: chaos: {action} failed: {e:#}"));
                    report.error = Some(format!("{action}: {e:#}"));
                    break 'cycles;
                }
                let event = Event {
                    at_s: (started - origin).as_secs_f64(),
                    what: action.to_string(),
                    took_ms: started.elapsed().as_secs_f64() * 1000.0,
                };
                note(
                    bar,
                    &format!(
                        "extauth-load: chaos {:>8.2} s  {action} ({:.0} ms)",
                        event.at_s, event.took_ms
                    ),
                );
                report.broker_kills += u64::from(matches!(action, Action::KillBroker(_)));
                report.redis_kills += u64::from(action == Action::KillRedis);
                report.events.push(event);
            }
        }
        report.kill_refusal_bound = lanes as u64 * report.broker_kills;
        report
    }

    async fn act(&mut self, action: Action, services: &mut Services) -> Result<()> {
        match action {
            Action::KillRedis => self.redis.kill(),
            Action::RestartRedis => self.redis.restart().await?,
            Action::KillBroker(i) => {
                let window = self.kills.open();
                let killed = services.kill_broker(i);
                self.kills.close(window);
                killed?;
            }
            Action::RestartBroker(i) => services.restart_broker(i).await?,
        }
        Ok(())
    }
}

/// Prints a line above the progress bar, or to stderr when there is no bar (--quiet, or
/// stderr is not a terminal).
fn note(bar: &ProgressBar, line: &str) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cycle_alternates_and_ends_with_everything_up() {
        let (mut redis_up, mut broker_up) = (true, [true, true]);
        let mut last = 0;
        for (at, action) in CYCLE {
            assert!(at > last && at < REFERENCE_PERIOD_MS, "{at}");
            last = at;
            match action {
                Action::KillRedis => assert!(std::mem::replace(&mut redis_up, false)),
                Action::RestartRedis => assert!(!std::mem::replace(&mut redis_up, true)),
                Action::KillBroker(i) => assert!(std::mem::replace(&mut broker_up[i], false)),
                Action::RestartBroker(i) => assert!(!std::mem::replace(&mut broker_up[i], true)),
            }
            assert!(broker_up.contains(&true), "one broker is always up");
        }
        assert!(
            redis_up && broker_up == [true, true],
            "the next cycle starts from a whole system"
        );
    }

    #[test]
    fn a_request_spanning_a_kill_window_was_in_flight() {
        let log = KillLog::default();
        let before = Instant::now();
        let window = log.open();
        let during = Instant::now();
        assert!(log.in_flight(before, during), "window still open");
        log.close(window);
        let after = Instant::now() + Duration::from_millis(1);
        assert!(log.in_flight(before, after));
        assert!(!log.in_flight(after, after + Duration::from_millis(5)));
        assert!(!KillLog::default().in_flight(before, after));
    }
}

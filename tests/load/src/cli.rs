//! Command-line options of `extauth-load` (see `extauth-load --help` and docs/benchmarks.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;

/// The workload: which tokens are sent, and what the right answer to each is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScenarioKind {
    /// `--tokens` valid tokens, each validated once in a warm-up, then requested round-robin:
    /// the cached path.
    Hot,
    /// Every request carries a token never seen before: one provider call each.
    Cold,
    /// Rounds of one new token sent by every lane at once (herd size = lanes).
    Herd,
    /// Zipf-distributed picks among `--tokens` tokens, `--invalid-pct` of them unknown to the
    /// provider, `--foreign-pct` presented by another user and `--expired-pct` past their `exp`.
    Mixed,
    /// `--tokens` tokens whose `exp` passes `--expire-after` seconds into the run.
    Expiry,
    /// Garbage, as anyone on the internet can make ejabberd send: one token the provider does
    /// not know, tried for another of `--tokens` users on every request. One provider call in
    /// all (the verdict describes the token, whoever presents it).
    #[serde(rename = "flood-users")]
    FloodUsers,
    /// Garbage: a new token the provider does not know on every request, all for one user. One
    /// provider call each, at most the domain's `provider_concurrency` at once.
    #[serde(rename = "flood-tokens")]
    FloodTokens,
    /// New unknown tokens for random users while real users log in with new valid tokens (one
    /// request in `--valid-every`): the valid logins' latency is reported on its own line.
    Flood,
    /// A reconnect storm, as after an ejabberd restart: `--tokens` valid tokens are validated in
    /// a warm-up through the first broker (so their verdicts are in Redis), then each is sent
    /// once to the other brokers, whose in-process caches have never seen them. Needs
    /// `--via wire`, two brokers or more sharing Redis, and `--requests` at most `--tokens`
    /// (the default). The report adds Redis commands per answer.
    Storm,
}

/// What the started brokers validate tokens with, against the mock provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MockValidator {
    /// RFC 7662 introspection: one provider call per distinct login.
    Introspection,
    /// JWTs (EdDSA) verified locally against the mock's JWKS: provider calls are key fetches.
    Jwt,
}

/// How requests reach the system under test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// `--nodes` x `--pool-size` real extauth-shim processes, as ejabberd runs them.
    Shim,
    /// Straight to the broker over the wire protocol: `--connections` x `--depth` requests in
    /// flight.
    Wire,
    /// Any extauth program over stdio (run with `sh -c`), `--nodes` x `--pool-size` copies.
    Program(String),
    /// The started brokers' HTTP check front (`--http-listen`): `--nodes` x `--pool-size`
    /// kept-alive connections posting `check_password` forms, as an XMPP server's pool does.
    Http,
}

/// Options of a load run.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Workload.
    #[arg(long, value_enum, default_value = "hot")]
    pub scenario: ScenarioKind,

    /// `shim`, `wire`, `http` (the started brokers' HTTP check front), or `program 'CMD ...'`
    /// (any extauth program, started with `sh -c`; it gets EXTAUTH_INTROSPECTION_URL,
    /// EXTAUTH_CLIENT_ID, EXTAUTH_CLIENT_SECRET and EXTAUTH_BROKER).
    #[arg(long, num_args = 1..=2, value_names = ["KIND", "CMD"], default_values = ["shim"])]
    pub via: Vec<String>,

    /// ejabberd nodes to play (shim and program modes).
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,

    /// extauth programs per node (`extauth_pool_size`), each with one request in flight.
    #[arg(long, default_value_t = 8)]
    pub pool_size: usize,

    /// Wire mode: connections to the broker(s).
    #[arg(long, default_value_t = 2)]
    pub connections: usize,

    /// Wire mode: requests in flight per connection (pipelining depth).
    #[arg(long, default_value_t = 64)]
    pub depth: usize,

    /// The extauth-shim binary [default: next to this executable].
    #[arg(long)]
    pub shim: Option<PathBuf>,

    /// Shim lanes: the shims' --timeout, seconds. A reply later than this (from the moment the
    /// request was written to the shim) plus 1 s of slack counts as late and fails the run.
    #[arg(long, value_parser = seconds, default_value = "10")]
    pub shim_timeout: Duration,

    /// Stop sending after this many seconds [default: 10 unless --requests is given].
    #[arg(long, value_parser = seconds)]
    pub duration: Option<Duration>,

    /// Stop after this many measured requests (whichever of --duration and --requests comes first).
    #[arg(long)]
    pub requests: Option<u64>,

    /// Open loop: send this many requests per second whatever the answers' pace, and measure
    /// latency from each request's intended send time (no coordinated omission).
    /// Without it: closed loop, each lane sends its next request when the last is answered.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Distinct tokens (hot, mixed, expiry); also distinct users for cold and herd.
    #[arg(long, default_value_t = 1000)]
    pub tokens: u64,

    /// Flood: one request in this many is a real user's new valid token, the rest garbage.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub valid_every: u64,

    /// Mixed: Zipf exponent of token popularity.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,

    /// Mixed: percentage of requests with a token the provider does not know.
    #[arg(long, default_value_t = 5.0)]
    pub invalid_pct: f64,

    /// Mixed: percentage of requests presenting another user's valid token.
    #[arg(long, default_value_t = 5.0)]
    pub foreign_pct: f64,

    /// Mixed: percentage of requests with the user's own token whose `exp` passed an hour ago.
    #[arg(long, default_value_t = 0.0)]
    pub expired_pct: f64,

    /// Expiry: seconds from the start until every token's `exp` passes.
    #[arg(long, default_value_t = 2)]
    pub expire_after: u64,

    /// Mock provider: delay before every answer, milliseconds.
    #[arg(long, default_value_t = 0)]
    pub provider_latency: u64,

    /// Mock provider: fraction (0..1) of calls answered HTTP 503.
    #[arg(long, default_value_t = 0.0)]
    pub provider_error_rate: f64,

    /// Mock provider: listen here (e.g. 127.0.0.1:8089) instead of a free port, so a broker you
    /// start yourself can use it (--client-id extauth-load, same EXTAUTH_CLIENT_SECRET).
    #[arg(long)]
    pub provider_listen: Option<String>,

    /// Mock provider: how started brokers validate, `introspection` (RFC 7662) or `jwt`
    /// (EdDSA JWTs checked against the mock's JWKS at /jwks; provider calls are key fetches).
    #[arg(long, value_enum, default_value = "introspection")]
    pub validator: MockValidator,

    /// A real RFC 7662 introspection endpoint instead of the mock: started brokers use it with
    /// --client-id and EXTAUTH_CLIENT_SECRET, and the tokens come from --token-file (scenarios
    /// hot and mixed; provider calls are not counted).
    #[arg(long, requires = "token_file")]
    pub provider_url: Option<String>,

    /// OAuth client id for --provider-url.
    #[arg(long, default_value = "extauth-load", requires = "provider_url")]
    pub client_id: String,

    /// Valid tokens for --provider-url: one `USER TOKEN` pair per line (USER = localpart;
    /// `#` comments). Mixed runs add unknown tokens and present tokens as another user's.
    #[arg(long, requires = "provider_url")]
    pub token_file: Option<PathBuf>,

    /// Target running broker(s) (`unix:/path`, `tcp:HOST:PORT`) instead of starting them.
    #[arg(long, value_delimiter = ',')]
    pub broker: Vec<String>,

    /// Brokers to start (shims and connections are spread over them); give --redis to share.
    #[arg(long, default_value_t = 1)]
    pub brokers: usize,

    /// Started brokers use this Redis (L1 only without it).
    #[arg(long)]
    pub redis: Option<String>,

    /// The extauth-broker binary [default: next to this executable].
    #[arg(long)]
    pub broker_bin: Option<PathBuf>,

    /// Extra argument for started brokers (repeatable), e.g. --broker-arg=--max-ttl=60.
    #[arg(long = "broker-arg", allow_hyphen_values = true)]
    pub broker_args: Vec<String>,

    /// Start the floor instead of the broker: a relay endpoint that accepts every request
    /// without any work (the cost of shim + socket + wire protocol). Implies --no-verify.
    #[arg(long)]
    pub floor: bool,

    /// Chaos run: start a redis-server and 2 brokers sharing it (--brokers N for more; only the
    /// first two are killed), give
    /// every shim all brokers as its failover list (`A,B` for half the shims, `B,A` for the
    /// others), and repeat a schedule of kills until the last request is answered: Redis killed
    /// and restarted empty, a broker killed (SIGKILL) and restarted on its socket with its
    /// flags, then both down at once (see --chaos-period). A valid token refused while in flight
    /// at a broker kill is tolerated (at most lanes x kills); any other refusal of one is wrong.
    /// Shim lanes only.
    #[arg(long)]
    pub chaos: bool,

    /// Chaos: length of one cycle of the schedule, seconds (at least 5). At 15 s: Redis killed at
    /// 2 s and restarted at 4 s; broker A killed at 6 s and restarted at 7.5 s; Redis killed at
    /// 9 s, broker B at 10 s, B restarted (Redis still down) at 11.5 s, Redis at 12.5 s. Other
    /// periods stretch or shrink these times. (B, not A again: shims stay on the broker they
    /// failed over to, so each kill hits the broker every shim is using.)
    #[arg(long, value_parser = seconds, default_value = "15")]
    pub chaos_period: Duration,

    /// Chaos: the redis-server binary [default: redis-server on PATH].
    #[arg(long)]
    pub redis_server: Option<PathBuf>,

    /// Do not check verdicts (for floors and echo programs, which accept everything).
    #[arg(long)]
    pub no_verify: bool,

    /// XMPP domain of every request.
    #[arg(long, default_value = "localhost")]
    pub domain: String,

    /// Seed of the mixed scenario's random picks [default: random].
    #[arg(long)]
    pub seed: Option<u64>,

    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Draw latency percentiles and throughput over time into this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,

    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl LoadArgs {
    /// The parsed `--via`.
    ///
    /// # Errors
    /// An unknown kind, or `program` without its command.
    pub fn via(&self) -> Result<Via> {
        match self.via.as_slice() {
            [kind] if kind == "shim" => Ok(Via::Shim),
            [kind] if kind == "wire" => Ok(Via::Wire),
            [kind] if kind == "http" => Ok(Via::Http),
            [kind, cmd] if kind == "program" && !cmd.trim().is_empty() => {
                Ok(Via::Program(cmd.clone()))
            }
            [kind] if kind == "program" => {
                bail!("--via program needs the command: --via program 'CMD ARGS'")
            }
            other => bail!("--via {other:?}: want shim, wire, http, or program 'CMD ...'"),
        }
    }

    /// Requests in flight at once: one per extauth program, or connections x depth.
    pub fn lanes(&self, via: &Via) -> usize {
        match via {
            Via::Wire => self.connections.saturating_mul(self.depth),
            Via::Shim | Via::Program(_) | Via::Http => self.nodes.saturating_mul(self.pool_size),
        }
    }

    /// Whether verdicts are checked against what the harness knows about each token.
    pub fn verify(&self) -> bool {
        !(self.floor || self.no_verify)
    }

    /// A storm warms one broker and measures the others: they must share Redis, and each token
    /// is sent once (a second time would be an in-process hit).
    fn check_storm(&self, via: &Via) -> Result<()> {
        if *via != Via::Wire {
            bail!("--scenario storm runs over --via wire (one connection set per broker)");
        }
        let started = self.broker.is_empty();
        if started && (self.brokers < 2 || self.redis.is_none() || self.floor) {
            bail!("--scenario storm needs --brokers 2 or more and --redis (brokers sharing Redis)");
        }
        if !started && self.broker.len() < 2 {
            bail!("--scenario storm needs two --broker addresses or more, sharing Redis");
        }
        if self.requests.is_some_and(|r| r > self.tokens) || self.duration.is_some() {
            bail!("--scenario storm sends each token once: --requests at most --tokens, no --duration");
        }
        Ok(())
    }

    /// The run length when neither limit is given: 10 s.
    pub fn duration_or_default(&self) -> Option<Duration> {
        match (self.duration, self.requests) {
            (None, None) => Some(Duration::from_secs(10)),
            (d, _) => d,
        }
    }

    /// Checks combinations clap cannot.
    ///
    /// # Errors
    /// A message naming the bad option.
    pub fn check(&self, via: &Via) -> Result<()> {
        if self.lanes(via) == 0 {
            bail!("no lanes: --nodes, --pool-size, --connections and --depth must be at least 1");
        }
        if self.lanes(via) > MAX_LANES {
            bail!("{} lanes: at most {MAX_LANES} requests in flight (--nodes x --pool-size, --connections x --depth)", self.lanes(via));
        }
        if !(1..=MAX_TOKENS).contains(&self.tokens) {
            bail!("--tokens must be between 1 and {MAX_TOKENS}");
        }
        if self.requests == Some(0) {
            bail!("--requests must be at least 1");
        }
        if self
            .rate
            .is_some_and(|r| !(MIN_RATE..=MAX_RATE).contains(&r))
        {
            bail!("--rate must be between {MIN_RATE} and {MAX_RATE} requests per second");
        }
        if !(self.zipf.is_finite() && self.zipf >= 0.0) {
            bail!("--zipf must be a finite exponent >= 0");
        }
        if self.expire_after > MAX_SECONDS as u64 {
            bail!("--expire-after must be at most {MAX_SECONDS} s");
        }
        if self.scenario == ScenarioKind::Storm {
            self.check_storm(via)?;
        }
        if self.scenario == ScenarioKind::Herd && self.rate.is_some() {
            bail!("herd sends rounds (every lane at once); --rate does not apply");
        }
        if !(0.0..=1.0).contains(&self.provider_error_rate) {
            bail!("--provider-error-rate is a fraction between 0 and 1");
        }
        let pcts = [self.invalid_pct, self.foreign_pct, self.expired_pct];
        if pcts.iter().any(|p| p.is_nan() || *p < 0.0) || pcts.iter().sum::<f64>() > 100.0 {
            bail!("--invalid-pct, --foreign-pct and --expired-pct must be >= 0 and add up to at most 100");
        }
        if self.shim_timeout > Duration::from_secs(3600) {
            bail!("--shim-timeout: the shim accepts at most 3600 s");
        }
        if self.provider_url.is_some() {
            self.check_real_provider()?;
        }
        if self.validator == MockValidator::Jwt && matches!(via, Via::Program(_)) {
            bail!("--validator jwt configures started brokers; extauth programs get opaque tokens");
        }
        if self.validator == MockValidator::Jwt && !self.broker.is_empty() {
            bail!("--validator jwt configures started brokers; running ones (--broker) validate as they were started");
        }
        if self.validator == MockValidator::Jwt && self.provider_error_rate > 0.0 {
            bail!("--provider-error-rate with --validator jwt would only fail key fetches");
        }
        if *via == Via::Http && (self.floor || !self.broker.is_empty()) {
            bail!("--via http drives the HTTP front of brokers it starts: not with --floor or --broker");
        }
        if !self.broker.is_empty() && (self.floor || self.redis.is_some()) {
            bail!(
                "--broker targets running brokers: --floor and --redis apply to started ones only"
            );
        }
        self.check_chaos(via)
    }

    /// `--chaos` needs brokers and Redis it can kill, and lanes with a failover list.
    fn check_chaos(&self, via: &Via) -> Result<()> {
        if !self.chaos {
            if self.redis_server.is_some() || self.chaos_period != Duration::from_secs(15) {
                bail!("--redis-server and --chaos-period apply to --chaos runs only");
            }
            return Ok(());
        }
        // The first broker kill comes 40 % into the cycle: a shorter run would kill nothing.
        if self
            .duration_or_default()
            .is_none_or(|d| d < self.chaos_period / 2)
        {
            bail!(
                "--chaos needs --duration of at least half a --chaos-period ({} s) to reach its first broker kill",
                self.chaos_period.as_secs_f64() / 2.0
            );
        }
        if !self.broker.is_empty() {
            bail!("--chaos kills and restarts the brokers it starts; it cannot do that to running ones given with --broker");
        }
        if self.floor {
            bail!("--chaos needs real brokers: the floor has no cache or Redis to lose");
        }
        if self.redis.is_some() {
            bail!("--chaos starts (and kills) its own redis-server: drop --redis (--redis-server PATH names the binary)");
        }
        if *via != Via::Shim {
            bail!("--chaos needs shim lanes (--via shim): only the shim fails over between brokers, so a wire connection or another program would break at the first broker kill");
        }
        if self.chaos_period < Duration::from_secs(5) {
            bail!("--chaos-period must be at least 5 s: a restart must fit between two events");
        }
        Ok(())
    }
}

/// Options of `extauth-load provider`: the mock provider alone. It knows the harness's
/// self-describing tokens: `RUN.N.EXP.NONCE` is a valid token of user `userN` until EXP (seconds
/// since the epoch; RUN and NONCE are any text without dots), anything else is unknown.
#[derive(Debug, Clone, Args)]
pub struct ProviderArgs {
    /// Listen on this `HOST:PORT`.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: String,
    /// Delay before every answer, milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency: u64,
    /// Fraction (0..1) of calls answered HTTP 503.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
}

impl LoadArgs {
    /// A real provider knows only the tokens it issued: fresh ones cannot be minted.
    fn check_real_provider(&self) -> Result<()> {
        if !matches!(self.scenario, ScenarioKind::Hot | ScenarioKind::Mixed) {
            bail!(
                "--provider-url works with --scenario hot or mixed (the others mint fresh tokens)"
            );
        }
        if self.validator != MockValidator::Introspection
            || self.provider_latency > 0
            || self.provider_error_rate > 0.0
            || self.provider_listen.is_some()
        {
            bail!(
                "--validator and --provider-* settings shape the mock provider, not --provider-url"
            );
        }
        if !self.broker.is_empty() {
            bail!(
                "--provider-url configures started brokers; running ones (--broker) have their own"
            );
        }
        if self.expired_pct > 0.0 {
            bail!("--expired-pct mints expired tokens, which a real provider never issued");
        }
        if std::env::var_os("EXTAUTH_CLIENT_SECRET").is_none() {
            bail!("--provider-url needs the client secret in EXTAUTH_CLIENT_SECRET");
        }
        Ok(())
    }
}

/// Most requests in flight at once (each shim lane is a process).
const MAX_LANES: usize = 100_000;
/// Most distinct tokens (a `hot` warm-up holds them all in memory).
const MAX_TOKENS: u64 = 10_000_000;
/// Open-loop rates, requests per second: slower than one per 1000 s is no load, and faster
/// than a million per second only queues slots in memory.
const MIN_RATE: f64 = 0.001;
const MAX_RATE: f64 = 1_000_000.0;
/// Longest duration accepted anywhere (one year, seconds).
const MAX_SECONDS: f64 = 366.0 * 86_400.0;

/// Seconds, fractions allowed (`2.5`, `10s`), more than 0 and at most a year.
fn seconds(text: &str) -> Result<Duration, String> {
    text.trim_end_matches('s')
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= MAX_SECONDS)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            format!("want a number of seconds (fractions allowed) above 0 and at most {MAX_SECONDS}, got {text:?}")
        })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        load: LoadArgs,
    }

    /// The error `check` gives for these arguments, or `None` when they are accepted.
    fn refusal(args: &[&str]) -> Option<String> {
        let args = Cli::try_parse_from([&["extauth-load"], args].concat())
            .expect("parses")
            .load;
        let via = args.via().expect("a known --via");
        args.check(&via).err().map(|e| e.to_string())
    }

    #[test]
    fn chaos_refuses_what_it_cannot_kill_or_fail_over() {
        assert_eq!(refusal(&["--chaos", "--scenario", "mixed"]), None);
        for (args, says) in [
            (&["--chaos", "--broker", "unix:/run/b.sock"][..], "--broker"),
            (&["--chaos", "--via", "program", "cat"], "shim lanes"),
            (&["--chaos", "--via", "wire"], "shim lanes"),
            (&["--chaos", "--floor"], "floor"),
            (&["--chaos", "--redis", "redis://127.0.0.1:6379"], "--redis"),
            (&["--chaos", "--chaos-period", "2"], "at least 5"),
            (&["--chaos", "--duration", "1"], "half a --chaos-period"),
            (&["--chaos-period", "20"], "--chaos runs only"),
            (&["--rate", "1e9"], "--rate must be between"),
            (&["--zipf", "inf"], "--zipf"),
            (&["--requests", "0"], "--requests"),
            (&["--nodes", "18446744073709551615"], "lanes"),
            (
                &["--redis-server", "/usr/bin/redis-server"],
                "--chaos runs only",
            ),
        ] {
            let refused = refusal(args).unwrap_or_else(|| panic!("{args:?} accepted"));
            assert!(refused.contains(says), "{args:?}: {refused}");
        }
    }

    #[test]
    fn wrong_token_percentages_add_up_to_at_most_100() {
        assert_eq!(
            refusal(&["--invalid-pct", "40", "--expired-pct", "55"]),
            None
        );
        assert!(refusal(&[
            "--invalid-pct",
            "40",
            "--foreign-pct",
            "40",
            "--expired-pct",
            "30"
        ])
        .is_some());
        assert!(refusal(&["--expired-pct", "NaN"]).is_some());
    }
}

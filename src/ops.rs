//! Operator commands: `check-config` (every setting resolved and every provider discovered),
//! `probe` (one request through the wire protocol, as a shim sends it), `stats` (a summary of a
//! running broker's Prometheus metrics) and `revoke` (through the Redis the brokers share).

use std::collections::BTreeMap;
use std::io;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config::{ListenAddr, RedisArgs, RunArgs};
use crate::domain::Domains;
use crate::keys::KeyDeriver;
use crate::kick::Kicker;
use crate::revoke::{self, Target};
use crate::secrets::{read_secret, redact_url};
use crate::summary::summary;
use extauth_protocol::extauth::Command;
use extauth_protocol::wire::{self, ClientMsg, Hello, Request, ServerMsg};

/// `check-config`: resolves everything (reading secret files), builds every validator and the
/// kick hook, discovers every provider configured by issuer, and prints the effective settings,
/// secrets redacted.
///
/// # Errors
/// The first configuration error, or providers that could not be discovered (their logins
/// would all be refused).
pub fn check_config(args: RunArgs) -> Result<()> {
    let config = args.resolve()?;
    if let Some(kick) = &config.kick {
        // Reads the hook's secret files and checks its URL, as the broker does at start-up.
        Kicker::new(kick, &config.provider)?;
    }
    let discovered = tokio::runtime::Runtime::new()?.block_on(async {
        let domains = Domains::build(&config)?;
        anyhow::Ok(domains.discover().await)
    })?;
    print!("{}", summary(&config));
    let mut failed = 0;
    for (domain, what, url) in discovered {
        match url {
            Ok(url) => println!("discovered for {domain}: {what} is {}", redact_url(&url)),
            Err(why) => {
                failed += 1;
                println!("discovery failed for {domain}: {why}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} provider(s) could not be discovered: their logins would all be refused");
    }
    println!("configuration OK");
    Ok(())
}

/// The account an operator command is about, as ejabberd names it (shared by `probe` and
/// `revoke`).
#[derive(Debug, Clone, clap::Args)]
pub struct Account {
    /// The XMPP domain (vhost).
    #[arg(long)]
    pub domain: String,
    /// The user (localpart), as ejabberd would send it.
    #[arg(long)]
    pub user: String,
}

/// Flags of `extauth-broker probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// The broker: `unix:/path` or `tcp:HOST:PORT`.
    #[arg(long, env = "EXTAUTH_BROKER")]
    pub broker: String,
    /// Who logs in.
    #[command(flatten)]
    pub account: Account,
    /// File holding the token (first line); without it, an `isuser` request is sent.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

/// Sends one `auth` (or `isuser`) request and prints the verdict, reason, source and latency.
///
/// # Errors
/// An unreachable or refusing broker, a timeout, an unreadable token file.
pub fn probe(args: &ProbeArgs) -> Result<()> {
    let (user, server) = (args.account.user.clone(), args.account.domain.clone());
    let command = match &args.token_file {
        Some(path) => Command::Auth {
            user,
            server,
            password: read_secret(path, "--token-file")?,
        },
        None => Command::IsUser { user, server },
    };
    let timeout = Duration::from_secs(args.timeout.max(1));
    let started = Instant::now();
    let response = match args.broker.parse::<ListenAddr>()? {
        ListenAddr::Unix(path) => ask(
            UnixStream::connect(&path)
                .with_context(|| format!("connecting to {}", path.display()))?,
            command,
            timeout,
        ),
        ListenAddr::Tcp(addr) => ask(
            TcpStream::connect(&addr).with_context(|| format!("connecting to {addr}"))?,
            command,
            timeout,
        ),
    }?;
    let verdict = if response.ok {
        "accepted (1)"
    } else {
        "refused (0)"
    };
    println!(
        "verdict: {verdict}\nreason:  {}\nsource:  {}\nlatency: {:.3} ms",
        response.reason.as_str(),
        response.source.as_str(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

/// A stream the probe can time out on.
trait Timed: io::Read + io::Write {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()>;
}

impl Timed for UnixStream {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

impl Timed for TcpStream {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

fn ask(mut stream: impl Timed, command: Command, timeout: Duration) -> Result<wire::Response> {
    stream.set_timeouts(timeout)?;
    let hello = Hello {
        version: wire::VERSION,
        node: "extauth-broker-probe".into(),
        pid: std::process::id(),
    };
    wire::write_msg(&mut stream, &ClientMsg::Hello(hello))?;
    match wire::read_msg(&mut stream, wire::MAX_FRAME)? {
        ServerMsg::Welcome(_) => {}
        ServerMsg::Refused(r) => bail!("the broker refused the handshake: {}", r.reason),
        ServerMsg::Response(_) => bail!("the broker answered before the handshake"),
    }
    let deadline_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    wire::write_msg(
        &mut stream,
        &ClientMsg::Request(Request {
            id: 1,
            deadline_ms,
            command,
        }),
    )?;
    match wire::read_msg(&mut stream, wire::MAX_FRAME)? {
        ServerMsg::Response(r) if r.id == 1 => Ok(r),
        other => bail!("unexpected answer: {other:?}"),
    }
}

/// Flags of `extauth-broker stats`.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// The broker's metrics endpoint (`--metrics-listen`).
    #[arg(long, default_value = "http://127.0.0.1:9100/metrics")]
    pub metrics_url: String,
}

/// Fetches `/metrics` and prints totals by family and label.
///
/// # Errors
/// An unreachable endpoint or a non-200 answer.
pub async fn stats(args: StatsArgs) -> Result<()> {
    extauth_protocol::tls::install_crypto_provider();
    // reqwest errors name the URL, which may embed credentials: name it redacted instead.
    let shown = redact_url(&args.metrics_url);
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?
        .get(&args.metrics_url)
        .send()
        .await
        .map_err(reqwest::Error::without_url)
        .with_context(|| format!("fetching {shown}"))?;
    if !response.status().is_success() {
        bail!("{shown} answered HTTP {}", response.status());
    }
    let text = response
        .text()
        .await
        .map_err(reqwest::Error::without_url)
        .with_context(|| format!("reading {shown}"))?;
    print!("{}", summarise(&text));
    Ok(())
}

/// Sums `extauth_*` samples (not histogram buckets) by metric and label set, one line each.
fn summarise(text: &str) -> String {
    let mut totals: BTreeMap<String, f64> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("extauth_") && !l.contains("_bucket"))
    {
        if let Some((series, value)) = line.rsplit_once(' ') {
            *totals.entry(series.to_owned()).or_default() += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    totals
        .iter()
        .map(|(series, v)| format!("{v:>14}  {series}\n"))
        .collect()
}

/// Flags of `extauth-broker revoke`.
#[derive(Debug, Clone, clap::Args)]
pub struct RevokeArgs {
    /// The configuration file and the Redis every broker shares (as for `run`).
    #[command(flatten)]
    pub store: RedisArgs,
    /// Whose verdicts.
    #[command(flatten)]
    pub account: Account,
    /// Revoke only the token in this file (first line); without it, every verdict of the user.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Do not run the file's `[on_revoke] kick` hook: revoke only, leave open sessions open.
    #[arg(long)]
    pub no_kick: bool,
}

/// `extauth-broker revoke`: revokes through the shared Redis, so every broker drops the
/// verdicts within a second. Prints what was revoked, then runs the file's `[on_revoke] kick`
/// hook (unless `--no-kick`) for a user revocation and prints what it did.
///
/// # Errors
/// No Redis configured, a missing cache secret, an unreadable token file or kick secret, a
/// Redis failure, or a kick that failed (the revocation stands; the message says so).
pub async fn revoke(args: RevokeArgs) -> Result<()> {
    let file = RunArgs {
        store: args.store,
        ..Default::default()
    }
    .with_file()?;
    let store = file.redis_config().context(
        "revoke works through the Redis the brokers share: give --redis (or --config). A broker without Redis \
         revokes through its admin endpoint: POST /revoke",
    )?;
    let secret_file = file
        .store
        .cache_secret_file
        .clone()
        .context("--cache-secret-file is required (the brokers' cache key secret)")?;
    let secret = read_secret(&secret_file, "--cache-secret-file")?;
    let token = args
        .token_file
        .map(|p| read_secret(&p, "--token-file"))
        .transpose()?;
    // Built (secret files read) before revoking, so a broken hook is reported before anything
    // changes.
    let kicker = match (&file.on_revoke.kick, args.no_kick) {
        (Some(kick), false) => Some(Kicker::new(kick, &file.provider_policy()?)?),
        _ => None,
    };
    let redis = crate::store::Redis::new(&store, crate::seal::Sealer::new(&secret))
        .await
        .context("--redis")?;
    let target = Target {
        domain: &args.account.domain,
        user: &args.account.user,
        token: token.as_ref(),
    };
    let revoked = revoke::revoke(&target, &KeyDeriver::new(&secret), Some(&redis), None).await?;
    match token {
        Some(_) => println!(
            "revoked one token of {}@{}",
            args.account.user, args.account.domain
        ),
        None => println!(
            "revoked every verdict of {}@{} ({} deleted from Redis)",
            args.account.user, args.account.domain, revoked.dropped
        ),
    }
    let (user, domain) = revoke::normalise(&target)?;
    let report = crate::kick::after_revoke(kicker.as_ref(), &user, &domain, token.is_some()).await;
    let said = report.describe(&user, &domain);
    match report {
        crate::kick::KickReport::Failed(_) => bail!(said),
        crate::kick::KickReport::Off => {}
        _ => println!("{said}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn stats_keep_extauth_series_and_drop_buckets() {
        let text = "# HELP x\nextauth_requests_total{command=\"auth\"} 3\nextauth_request_duration_seconds_bucket{le=\"1\"} 3\nother 1\n";
        assert_eq!(
            super::summarise(text),
            "             3  extauth_requests_total{command=\"auth\"}\n"
        );
    }
}

//! What a run talks to: the built-in mock provider, and the brokers (started as child processes
//! of the real `extauth-broker` binary, or the floor, or brokers already running).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use tempfile::TempDir;

use super::cli::{LoadArgs, MockValidator, ProviderArgs};
use crate::devprovider::{DevProvider, Resolver};

/// OAuth client id the brokers use against the mock provider.
pub const CLIENT_ID: &str = "extauth-load";
/// How long a started broker may take to listen.
const START_LIMIT: Duration = Duration::from_secs(10);

/// The provider and the brokers of a run; started brokers are killed on drop.
pub struct Services {
    /// The mock provider (counts its calls); `None` with `--provider-url`.
    pub provider: Option<DevProvider>,
    /// The client secret the brokers authenticate to the provider with.
    pub client_secret: String,
    /// Broker addresses (`unix:/path` or `tcp:HOST:PORT`).
    pub brokers: Vec<String>,
    started: Vec<Child>,
    dir: TempDir,
}

impl Services {
    /// Starts the mock provider (answering with `resolver`, and serving `jwks` when given)
    /// unless `--provider-url` names a real one, then the brokers (or takes the `--broker`
    /// addresses).
    ///
    /// # Errors
    /// A port that cannot be bound, a broker binary that is missing or does not start.
    pub async fn start(
        args: &LoadArgs,
        resolver: Resolver,
        jwks: Option<Value>,
    ) -> Result<Services> {
        let client_secret = std::env::var("EXTAUTH_CLIENT_SECRET")
            .unwrap_or_else(|_| hex::encode(rand::random::<[u8; 16]>()));
        let mock = MockSpec {
            listen: args.provider_listen.as_deref().unwrap_or("127.0.0.1:0"),
            latency_ms: args.provider_latency,
            error_rate: args.provider_error_rate,
        };
        let provider = match args.provider_url {
            Some(_) => None,
            None => Some(mock.start(&client_secret, resolver).await?),
        };
        if let (Some(provider), Some(set)) = (&provider, jwks) {
            provider.set_jwks(set);
        }
        let dir = tempfile::Builder::new().prefix("extauth-load").tempdir()?;
        let mut services = Services {
            provider,
            client_secret,
            brokers: args.broker.clone(),
            started: Vec::new(),
            dir,
        };
        if services.brokers.is_empty() {
            for i in 0..args.brokers.max(1) {
                services.start_broker(args, i).await?;
            }
        }
        Ok(services)
    }

    /// Resident memory of each started broker, now and at its peak (KiB).
    pub fn broker_rss_kib(&self) -> Vec<Rss> {
        self.started
            .iter()
            .filter_map(|c| Rss::of(c.id()))
            .collect()
    }

    /// CPU time (user + system) the started brokers have used so far, together; `None` when
    /// the run targets brokers it did not start.
    pub fn broker_cpu(&self) -> Option<Duration> {
        let started = self.started.iter().filter_map(|c| cpu_time(c.id()));
        (!self.started.is_empty()).then(|| started.sum())
    }

    async fn start_broker(&mut self, args: &LoadArgs, i: usize) -> Result<()> {
        let socket = self.dir.path().join(format!("broker-{i}.sock"));
        let listen = format!("unix:{}", socket.display());
        let log_path = self.dir.path().join(format!("broker-{i}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = if args.floor {
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.arg("floor-broker").arg(&socket);
            cmd
        } else {
            self.broker_command(args, &listen)?
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the broker")?;
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if child.try_wait()?.is_some() || started.elapsed() > START_LIMIT {
                let _ = child.kill();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("the broker did not start listening on {listen}; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.started.push(child);
        self.brokers.push(listen);
        Ok(())
    }

    /// The real broker: the mock provider's URL, L1 only unless --redis, a cache secret shared
    /// by every broker of the run (so they derive the same Redis keys), logs at `warn`.
    fn broker_command(&self, args: &LoadArgs, listen: &str) -> Result<Command> {
        let secret_file = self.dir.path().join("cache.key");
        if !secret_file.exists() {
            std::fs::write(&secret_file, hex::encode(rand::random::<[u8; 32]>()))?;
        }
        let mut cmd = Command::new(sibling_binary(
            args.broker_bin.as_deref(),
            "extauth-broker",
        )?);
        cmd.args(["--listen", listen]);
        self.validator_args(args, &mut cmd)?;
        cmd.arg("--cache-secret-file")
            .arg(&secret_file)
            .args(&args.broker_args)
            .env("EXTAUTH_CLIENT_SECRET", &self.client_secret)
            .env("EXTAUTH_LOG_LEVEL", "warn");
        if let Some(redis) = &args.redis {
            cmd.args(["--redis", redis]);
        }
        Ok(cmd)
    }

    /// How the broker validates: the mock's introspection endpoint, a JWT validator on the
    /// mock's JWKS (in a config file: the flags only describe introspection; no leeway, so the
    /// `expiry` scenario's verdicts flip at `exp`), or the real provider.
    fn validator_args(&self, args: &LoadArgs, cmd: &mut Command) -> Result<()> {
        match (&self.provider, args.validator) {
            (Some(mock), MockValidator::Jwt) => {
                let config = self.dir.path().join("jwt.toml");
                let table = format!(
                    "[defaults.validator]\nkind = \"jwt\"\njwks_url = \"{}\"\nalgorithms = [\"EdDSA\"]\nleeway = 0\n",
                    mock.jwks_url()
                );
                std::fs::write(&config, table)?;
                cmd.arg("--config").arg(config);
            }
            _ => {
                let url = self.introspection_url(args);
                cmd.args(["--introspection-url", &url, "--client-id", &args.client_id]);
            }
        }
        Ok(())
    }

    /// The introspection endpoint the run's tokens are valid at.
    fn introspection_url(&self, args: &LoadArgs) -> String {
        match &self.provider {
            Some(mock) => mock.url(),
            None => args.provider_url.clone().unwrap_or_default(),
        }
    }

    /// Environment every extauth program of the run gets (the shim reads EXTAUTH_BROKER; a
    /// baseline reads the provider's settings).
    pub fn program_env(&self, args: &LoadArgs, node: usize) -> Vec<(String, String)> {
        vec![
            (
                "EXTAUTH_BROKER".into(),
                self.brokers[node % self.brokers.len()].clone(),
            ),
            ("EXTAUTH_NODE".into(), format!("load-node{node}")),
            (
                "EXTAUTH_INTROSPECTION_URL".into(),
                self.introspection_url(args),
            ),
            ("EXTAUTH_CLIENT_ID".into(), args.client_id.clone()),
            ("EXTAUTH_CLIENT_SECRET".into(), self.client_secret.clone()),
        ]
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for child in &mut self.started {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How to run the mock provider.
pub struct MockSpec<'a> {
    /// `HOST:PORT` (port 0: a free one).
    pub listen: &'a str,
    /// Delay before every answer, ms.
    pub latency_ms: u64,
    /// Fraction (0..=1) of calls answered HTTP 503.
    pub error_rate: f64,
}

impl MockSpec<'_> {
    /// Starts the mock provider for client [`CLIENT_ID`] with `client_secret`, answering with
    /// `resolver`.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(&self, client_secret: &str, resolver: Resolver) -> Result<DevProvider> {
        let provider = DevProvider::start_at(self.listen, CLIENT_ID, client_secret)
            .await
            .with_context(|| format!("mock provider on {}", self.listen))?;
        provider.set_resolver(resolver);
        provider.set_latency(Duration::from_millis(self.latency_ms));
        provider.set_error_rate(self.error_rate);
        Ok(provider)
    }
}

/// `extauth-load provider`: the mock provider alone, until SIGINT or SIGTERM, for brokers and
/// ejabberd clusters started by hand or by `deploy/tsung/run.sh`. The client secret comes from
/// EXTAUTH_CLIENT_SECRET (the brokers must be given the same one). Prints the URL, then the
/// number of calls answered when stopped.
///
/// # Errors
/// No EXTAUTH_CLIENT_SECRET, an address that cannot be bound, a signal handler that cannot be
/// installed.
pub async fn serve_provider(args: &ProviderArgs) -> Result<()> {
    let secret = std::env::var("EXTAUTH_CLIENT_SECRET")
        .context("set EXTAUTH_CLIENT_SECRET to the secret the brokers will send")?;
    let mock = MockSpec {
        listen: &args.listen,
        latency_ms: args.latency,
        error_rate: args.error_rate,
    };
    let provider = mock.start(&secret, super::scenario::resolver()).await?;
    println!("mock provider: {} (client id {CLIENT_ID})", provider.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!(
        "mock provider: {} calls answered ({} failed on purpose)",
        provider.calls(),
        provider.injected_errors()
    );
    Ok(())
}

/// `given`, or the binary `name` next to the running executable (where cargo builds it).
///
/// # Errors
/// When the file does not exist.
pub fn sibling_binary(given: Option<&Path>, name: &str) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()?.with_file_name(name),
    };
    if !path.exists() {
        bail!("{} not found: build the workspace (cargo build --release --workspace) or give its path", path.display());
    }
    Ok(path)
}

/// CPU time (user + system) of process `pid`, from /proc/PID/stat (fields 14 and 15, in clock
/// ticks of 1/100 s: USER_HZ is 100 on every Linux architecture the broker runs on).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it start past its ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let (utime, stime): (u64, u64) = (fields.next()?.parse().ok()?, fields.next()?.parse().ok()?);
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Resident memory of a process (KiB), from /proc/PID/status.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Rss {
    /// Resident now (`VmRSS`).
    pub now_kib: u64,
    /// Largest so far (`VmHWM`).
    pub peak_kib: u64,
}

impl Rss {
    /// The memory of process `pid`, if it is still there.
    pub fn of(pid: u32) -> Option<Rss> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            line.split_whitespace().nth(1)?.parse().ok()
        };
        Some(Rss {
            now_kib: field("VmRSS:")?,
            peak_kib: field("VmHWM:")?,
        })
    }
}

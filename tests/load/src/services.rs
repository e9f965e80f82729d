//! What a run talks to: the built-in mock provider, and the brokers (started as child processes
//! of the real `extauth-broker` binary, or the floor, or brokers already running).

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use tempfile::TempDir;

use super::cli::{LoadArgs, MockValidator, ProviderArgs, Via};
use extauth_broker::devprovider::{DevProvider, Resolver};

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
    /// The started brokers' HTTP check fronts (`HOST:PORT`), with `--via http`.
    pub http_fronts: Vec<String>,
    /// The caller secret of the HTTP fronts.
    http_secret: String,
    started: Vec<StartedBroker>,
    dir: TempDir,
}

/// A broker the harness started: its process while it runs, and how to start it again.
struct StartedBroker {
    launch: Launch,
    child: Option<Child>,
}

/// How to start one broker, again and again: the same command line, environment, socket and log
/// (appended to, so a restarted broker's log follows its predecessor's).
struct Launch {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(&'static str, String)>,
    socket: PathBuf,
    log: PathBuf,
}

impl Services {
    /// Starts the mock provider (answering with `resolver`, and serving `jwks` when given)
    /// unless `--provider-url` names a real one, then the brokers (or takes the `--broker`
    /// addresses), keeping sockets, logs and the cache secret in `dir` (removed on drop).
    ///
    /// # Errors
    /// A port that cannot be bound, a broker binary that is missing or does not start.
    pub async fn start(
        args: &LoadArgs,
        resolver: Resolver,
        jwks: Option<Value>,
        dir: TempDir,
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
        let mut services = Services {
            provider,
            client_secret,
            brokers: args.broker.clone(),
            http_fronts: Vec::new(),
            http_secret: hex::encode(rand::random::<[u8; 16]>()),
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

    /// Resident memory of each started broker that runs, now and at its peak (KiB).
    pub fn broker_rss_kib(&self) -> Vec<Rss> {
        self.running().filter_map(|c| Rss::of(c.id())).collect()
    }

    /// CPU time (user + system) the running started brokers have used so far, together; `None`
    /// when the run targets brokers it did not start.
    pub fn broker_cpu(&self) -> Option<Duration> {
        let used = self.running().filter_map(|c| cpu_time(c.id()));
        (!self.started.is_empty()).then(|| used.sum())
    }

    /// Every broker address, starting with broker `first` (modulo their number), joined with
    /// commas: a shim's `--broker` failover list.
    pub fn failover_list(&self, first: usize) -> String {
        let n = self.brokers.len().max(1);
        (0..self.brokers.len())
            .map(|k| self.brokers[(first + k) % n].as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills started broker `i` with SIGKILL and reaps it (its socket file stays behind, as
    /// after a crash).
    ///
    /// # Errors
    /// When broker `i` was not started by the harness or is not running.
    pub fn kill_broker(&mut self, i: usize) -> Result<()> {
        let mut child = self
            .started
            .get_mut(i)
            .and_then(|b| b.child.take())
            .with_context(|| format!("broker {i} is not running"))?;
        child.kill().context("killing the broker")?;
        child.wait().context("reaping the killed broker")?;
        Ok(())
    }

    /// Starts started broker `i` again, on its socket with its flags, and waits until it
    /// listens (kills it first if it still runs).
    ///
    /// # Errors
    /// When broker `i` was not started by the harness, or does not listen again within 10 s.
    pub async fn restart_broker(&mut self, i: usize) -> Result<()> {
        let broker = self
            .started
            .get_mut(i)
            .with_context(|| format!("broker {i} was not started by extauth-load"))?;
        if let Some(mut old) = broker.child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        broker.child = Some(broker.launch.spawn().await?);
        Ok(())
    }

    fn running(&self) -> impl Iterator<Item = &Child> {
        self.started.iter().filter_map(|b| b.child.as_ref())
    }

    async fn start_broker(&mut self, args: &LoadArgs, i: usize) -> Result<()> {
        let socket = self.dir.path().join(format!("broker-{i}.sock"));
        let log = self.dir.path().join(format!("broker-{i}.log"));
        let listen = format!("unix:{}", socket.display());
        let launch = if args.floor {
            Launch {
                program: std::env::current_exe()?,
                args: vec!["floor-broker".into(), socket.clone().into()],
                env: Vec::new(),
                socket,
                log,
            }
        } else {
            self.broker_launch(args, socket, log)?
        };
        let child = launch.spawn().await?;
        self.started.push(StartedBroker {
            launch,
            child: Some(child),
        });
        self.brokers.push(listen);
        Ok(())
    }

    /// The real broker on `socket`: the mock provider's URL, L1 only unless --redis, a cache
    /// secret shared by every broker of the run (so they derive the same Redis keys), logs at
    /// `warn` to `log`.
    fn broker_launch(&mut self, args: &LoadArgs, socket: PathBuf, log: PathBuf) -> Result<Launch> {
        let secret_file = self.dir.path().join("cache.key");
        if !secret_file.exists() {
            std::fs::write(&secret_file, hex::encode(rand::random::<[u8; 32]>()))?;
        }
        let listen = format!("unix:{}", socket.display());
        let mut flags: Vec<OsString> = vec!["--listen".into(), listen.into()];
        flags.extend(self.validator_flags(args)?);
        flags.push("--cache-secret-file".into());
        flags.push(secret_file.into());
        flags.extend(args.broker_args.iter().map(OsString::from));
        if args.via()? == Via::Http {
            flags.extend(self.http_front_flags()?);
        }
        if let Some(redis) = &args.redis {
            flags.extend(["--redis".into(), redis.into()]);
        }
        Ok(Launch {
            program: sibling_binary(args.broker_bin.as_deref(), "extauth-broker")?,
            args: flags,
            env: vec![
                ("EXTAUTH_CLIENT_SECRET", self.client_secret.clone()),
                ("EXTAUTH_LOG_LEVEL", "warn".into()),
            ],
            socket,
            log,
        })
    }

    /// `--http-listen` on a free loopback port (recorded in `http_fronts`) and its secret file.
    fn http_front_flags(&mut self) -> Result<Vec<OsString>> {
        let secret = self.dir.path().join("http.secret");
        std::fs::write(&secret, &self.http_secret)?;
        // The port is free now; the broker binds it a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        self.http_fronts.push(addr.clone());
        Ok(vec![
            "--http-listen".into(),
            addr.into(),
            "--http-secret-file".into(),
            secret.into(),
        ])
    }

    /// The caller secret of the HTTP fronts; the lanes present it as a bearer.
    pub fn http_secret(&self) -> &str {
        &self.http_secret
    }

    /// How the broker validates: the mock's introspection endpoint, a JWT validator on the
    /// mock's JWKS (in a config file: the flags only describe introspection; no leeway, so the
    /// `expiry` scenario's verdicts flip at `exp`), or the real provider.
    fn validator_flags(&self, args: &LoadArgs) -> Result<Vec<OsString>> {
        Ok(match (&self.provider, args.validator) {
            (Some(mock), MockValidator::Jwt) => {
                let config = self.dir.path().join("jwt.toml");
                let table = format!(
                    "[defaults.validator]\nkind = \"jwt\"\njwks_url = \"{}\"\nalgorithms = [\"EdDSA\"]\nleeway = 0\ntyp = \"at+jwt\"\nrequire = {{ audience = \"{}\" }}\n",
                    mock.jwks_url(),
                    super::tokens::AUDIENCE
                );
                std::fs::write(&config, table)?;
                vec!["--config".into(), config.into()]
            }
            _ => [
                "--introspection-url",
                &self.introspection_url(args),
                "--client-id",
                &args.client_id,
            ]
            .map(OsString::from)
            .into(),
        })
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

impl Launch {
    /// Starts the process and waits until its socket accepts connections.
    ///
    /// # Errors
    /// A binary that cannot be run, or a process that exits or does not listen within 10 s
    /// (the message quotes its log).
    async fn spawn(&self) -> Result<Child> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if child.try_wait()?.is_some() || started.elapsed() > START_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                bail!(
                    "the broker did not start listening on unix:{}; its log:\n{log}",
                    self.socket.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(child)
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for child in self.started.iter_mut().filter_map(|b| b.child.as_mut()) {
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
        .ok()
        .filter(|s| !s.is_empty())
        .context("set EXTAUTH_CLIENT_SECRET to the secret the brokers will send")?;
    if !(0.0..=1.0).contains(&args.error_rate) {
        bail!("--error-rate is a fraction between 0 and 1");
    }
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

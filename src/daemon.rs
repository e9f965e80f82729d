//! Wires a [`Config`] into a running broker: listeners (bound or inherited from systemd),
//! engine, metrics and admin endpoints, privilege drop, sd_notify, watchdog, SIGHUP reload.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::domain::Domains;
use crate::engine::{Engine, EngineParts};
use crate::fds;
use crate::keys::KeyDeriver;
use crate::listener::Listener;
use crate::metrics;
use crate::scrape::{self, Readiness};
use crate::seal::Sealer;
use crate::server;
use crate::store::Redis;
use crate::systemd::{self, Inherited, Role};

/// How long shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(5);

/// Re-reads the configuration from its sources (flags, environment, file) on SIGHUP.
pub type Reloader = Box<dyn Fn() -> Result<Config> + Send + Sync>;
/// Applies a new log filter.
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<()> + Send + Sync>;

/// What [`run`] needs besides the configuration.
#[derive(Default)]
pub struct RunContext {
    /// Sockets passed by systemd (socket activation), by role.
    pub inherited: Vec<(Role, Inherited)>,
    /// Re-reads the configuration; without it SIGHUP only logs that reload is unsupported.
    pub reload: Option<Reloader>,
    /// Changes the log filter on reload.
    pub set_log_level: Option<LogLevelSetter>,
}

/// Builds the engine for `config`.
///
/// # Errors
/// A bad Redis URL (or no reachable cluster node), or a validator that cannot be built.
pub async fn build_engine(config: &Config) -> Result<Engine> {
    let redis = match &config.redis {
        Some(store) => Some(
            Redis::new(store, Sealer::new(&config.cache_secret))
                .await
                .context("--redis")?,
        ),
        None => None,
    };
    Ok(Engine::new(EngineParts {
        keys: KeyDeriver::new(&config.cache_secret),
        redis,
        domains: {
            let domains = Domains::build(config)?;
            domains.prefetch();
            domains
        },
        l1_capacity: config.l1_capacity,
        max_token_len: config.max_token_len,
    }))
}

/// The sockets the broker serves on, bound or inherited.
struct Sockets {
    shims: Vec<Listener>,
    metrics: Option<TcpListener>,
    admin: Option<TcpListener>,
    http: Option<TcpListener>,
}

/// Binds (or takes from systemd) every socket, drops privileges, then serves until `shutdown`
/// is cancelled and in-flight requests have drained (at most 5 s).
///
/// # Errors
/// Start-up failures (bind, engine, privileges); nothing fails once serving.
pub async fn run(config: Config, context: RunContext, shutdown: CancellationToken) -> Result<()> {
    let handle = metrics::install().map_err(anyhow::Error::msg)?;
    tokio::spawn(metrics::upkeep(handle.clone(), shutdown.clone()));
    // Before any socket is bound: a SIGHUP that arrives once shims can connect must reach the
    // handler, not the default action (which ends the process).
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let engine = Arc::new(build_engine(&config).await?);
    let sockets = sockets(&config, context.inherited).await?;
    reserve_fds(&config, &sockets)?;
    if let Some((user, group)) = &config.run_as {
        let paths: Vec<_> = sockets
            .shims
            .iter()
            .filter_map(Listener::bound_path)
            .collect();
        crate::privileges::drop_to(user, group.as_deref(), &paths)?;
    }
    engine.spawn_revocation_listener();
    let ready = Readiness::default();
    if let Some(listener) = sockets.metrics {
        tokio::spawn(scrape::serve(
            listener,
            handle,
            ready.clone(),
            config.metrics_limits,
            shutdown.clone(),
        ));
    }
    if let Some(listener) = sockets.admin {
        let secret = config
            .admin_secret
            .clone()
            .context("an admin socket needs --admin-secret-file")?;
        let kicker = config
            .kick
            .as_ref()
            .map(|kick| crate::kick::Kicker::new(kick, &config.provider))
            .transpose()
            .context("[on_revoke] kick")?
            .map(Arc::new);
        tokio::spawn(crate::admin::serve(
            listener,
            engine.clone(),
            secret,
            kicker,
            config.admin_limits,
            config.max_token_len,
            shutdown.clone(),
        ));
    }
    if let (Some(listener), Some(front)) = (sockets.http, &config.http) {
        tokio::spawn(crate::http_front::serve(
            listener,
            engine.clone(),
            front.clone(),
            config.max_token_len,
            shutdown.clone(),
        ));
    }
    for warning in crate::summary::warnings(&config) {
        warn!("{warning}");
    }
    tokio::spawn(watchdog(engine.clone(), shutdown.clone()));
    tokio::spawn(reload_on_hangup(
        hangups,
        engine.clone(),
        context.reload,
        context.set_log_level,
        config.clone(),
    ));
    tokio::spawn(announce_stop(ready.clone(), shutdown.clone()));
    ready.set(true);
    let status = status(&config);
    info!(
        "extauth-broker {} ready: {status}",
        env!("CARGO_PKG_VERSION")
    );
    systemd::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    server::serve(
        sockets.shims,
        engine,
        config.limits,
        config.peers.clone(),
        shutdown,
        DRAIN,
    )
    .await;
    info!("stopped");
    Ok(())
}

/// Takes the inherited sockets by role and binds the configured ones.
async fn sockets(config: &Config, inherited: Vec<(Role, Inherited)>) -> Result<Sockets> {
    let mut sockets = Sockets {
        shims: Vec::new(),
        metrics: None,
        admin: None,
        http: None,
    };
    for (role, socket) in inherited {
        match role {
            Role::Shim => sockets
                .shims
                .push(Listener::inherited(socket, &config.tcp)?),
            Role::Metrics => sockets.metrics = Some(tcp(socket, "metrics")?),
            Role::Admin => sockets.admin = Some(tcp(socket, "admin")?),
        }
    }
    if let (None, Some(addr)) = (&sockets.metrics, &config.metrics_listen) {
        sockets.metrics = Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --metrics-listen {addr}"))?,
        );
    }
    if let Some(front) = &config.http {
        let listener = TcpListener::bind(&front.listen)
            .await
            .with_context(|| format!("binding --http-listen {}", front.listen))?;
        let access = crate::endpoint::Access {
            tls: front.tls.clone().map(tokio_rustls::TlsAcceptor::from),
            allow: front.allow.clone(),
        };
        access.check_exposure(listener.local_addr()?, config.tcp.insecure, "--http-listen")?;
        sockets.http = Some(listener);
    }
    if let (None, Some(addr)) = (&sockets.admin, &config.admin_listen) {
        sockets.admin = Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --admin-listen {addr}"))?,
        );
    }
    // The shims' sockets last: once a shim (or a test, or a readiness check) sees one, every
    // endpoint is bound.
    for addr in &config.listen {
        sockets
            .shims
            .push(Listener::bind(addr, config.socket_mode, &config.tcp).await?);
    }
    if sockets.shims.is_empty() {
        bail!("no listener: give --listen unix:/path or --listen tcp:HOST:PORT, or start under systemd socket activation");
    }
    Ok(sockets)
}

/// Checks that the HTTP endpoints' connection caps leave file descriptors for shims, Redis and
/// providers (see [`fds`]), and logs what is left.
///
/// # Errors
/// Caps that leave fewer than [`fds::SHIM_RESERVE`] descriptors under `RLIMIT_NOFILE`.
fn reserve_fds(config: &Config, sockets: &Sockets) -> Result<()> {
    let endpoints: u64 = [
        (sockets.metrics.is_some(), config.metrics_limits),
        (sockets.admin.is_some(), config.admin_limits),
        (
            sockets.http.is_some(),
            config
                .http
                .as_ref()
                .map_or(config.admin_limits, |h| h.limits),
        ),
    ]
    .iter()
    .filter(|(served, _)| *served)
    .map(|(_, limits)| limits.max_fds())
    .sum();
    if endpoints == 0 {
        return Ok(());
    }
    let budget = match fds::Budget::measure() {
        Ok(budget) => budget,
        Err(e) => {
            warn!("cannot count file descriptors ({e}); the endpoints' connection caps are not checked against RLIMIT_NOFILE");
            return Ok(());
        }
    };
    let left = budget.reserve(endpoints).map_err(|e| {
        anyhow!("{e}: lower --metrics-max-connections, --admin-max-connections or --http-max-connections, or raise the limit (LimitNOFILE= under systemd)")
    })?;
    let shims = config.limits.max_connections as u64;
    if left < shims {
        warn!(
            "file descriptors: RLIMIT_NOFILE {} leaves {left} for shims, Redis and providers, fewer than --max-connections {shims}: shims beyond that wait in the listen queue; raise LimitNOFILE=",
            budget.limit
        );
    } else {
        info!(
            limit = budget.limit,
            open = budget.open,
            endpoints,
            left,
            "file descriptors reserved for shims, Redis and providers"
        );
    }
    Ok(())
}

fn tcp(socket: Inherited, role: &str) -> Result<TcpListener> {
    match socket {
        Inherited::Tcp(l) => {
            l.set_nonblocking(true)?;
            Ok(TcpListener::from_std(l)?)
        }
        Inherited::Unix(_) => {
            bail!("the {role} socket must be a TCP socket (ListenStream=HOST:PORT)")
        }
    }
}

/// A short summary for logs and systemd's STATUS=.
fn status(config: &Config) -> String {
    let domains = if config.domains.is_empty() {
        "any domain".to_owned()
    } else {
        format!("{} domain(s)", config.domains.len())
    };
    let redis = if config.redis.is_some() {
        "shared cache in Redis"
    } else {
        "in-process cache only"
    };
    format!("serving {domains}, {redis}")
}

/// Sends WATCHDOG=1 at half the `WatchdogSec=` interval, but only after the engine answered a
/// ping, so a wedged broker stops petting the watchdog and systemd restarts it.
async fn watchdog(engine: Arc<Engine>, shutdown: CancellationToken) {
    let Some(interval) = systemd::watchdog_interval() else {
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if tokio::time::timeout(interval, engine.ping()).await.is_ok() {
            systemd::notify(&[NotifyState::Watchdog]);
        }
    }
}

/// Marks the broker unready and tells systemd it is stopping as soon as shutdown begins.
async fn announce_stop(ready: Readiness, shutdown: CancellationToken) {
    shutdown.cancelled().await;
    ready.set(false);
    systemd::notify(&[
        NotifyState::Stopping,
        NotifyState::Status("draining requests in flight"),
    ]);
}

/// Reloads domains (validators, claims, TTLs, isuser) and the log level on every SIGHUP. A
/// configuration that does not load is refused with a log line; the running one stays.
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    engine: Arc<Engine>,
    reload: Option<Reloader>,
    set_log_level: Option<LogLevelSetter>,
    mut running: Config,
) {
    while hangups.recv().await.is_some() {
        let Some(reload) = &reload else {
            warn!("SIGHUP: this broker was not started from a configuration it can re-read");
            continue;
        };
        systemd::notify(&[NotifyState::Reloading]);
        match reload().and_then(|new| {
            Domains::build(&new)
                .map(|domains| (new, domains))
                .map_err(Into::into)
        }) {
            Ok((new, domains)) => {
                warn_unreloadable(&running, &new);
                domains.prefetch();
                engine.reload(domains);
                if let Some(set) = &set_log_level {
                    if let Err(e) = set(&new.log_level) {
                        error!("SIGHUP: log level {:?} refused: {e:#}", new.log_level);
                    }
                }
                info!("configuration reloaded: {}", status(&new));
                running = new;
            }
            Err(e) => error!("SIGHUP: configuration refused, the running one stays: {e:#}"),
        }
        systemd::notify(&[NotifyState::Ready, NotifyState::Status(&status(&running))]);
    }
}

/// Settings that only a restart applies.
fn warn_unreloadable(running: &Config, new: &Config) {
    let changed = [
        ("listen", running.listen != new.listen),
        ("redis", running.redis != new.redis),
        // Without a file the secret is random per load, so only a configured one can change.
        (
            "cache_secret_file",
            running.redis.is_some() && running.cache_secret != new.cache_secret,
        ),
        ("l1_capacity", running.l1_capacity != new.l1_capacity),
        (
            "metrics_listen",
            running.metrics_listen != new.metrics_listen,
        ),
        ("admin_listen", running.admin_listen != new.admin_listen),
        (
            "http front",
            format!("{:?}", running.http) != format!("{:?}", new.http),
        ),
        (
            "endpoint limits",
            running.metrics_limits != new.metrics_limits
                || running.admin_limits != new.admin_limits,
        ),
        ("limits", running.limits != new.limits),
        (
            "on_revoke",
            running.kick.as_ref().map(|k| k.describe()) != new.kick.as_ref().map(|k| k.describe()),
        ),
    ];
    for (name, _) in changed.iter().filter(|(_, c)| *c) {
        warn!("SIGHUP: {name} changed; it takes effect at the next restart");
    }
}

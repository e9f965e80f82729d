//! `extauth-broker`: the central daemon and its operator commands (see README.md and
//! `extauth-broker --help`).

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use extauth_broker::{self as broker, demo, ops, RunArgs, RunContext};

/// Validates ejabberd extauth logins whose password is an OAuth access token, once for the
/// whole cluster. Without a subcommand, `run` is assumed.
#[derive(Parser)]
#[command(
    name = "extauth-broker",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve shims (the default).
    Run(Box<RunArgs>),
    /// Check a configuration and print the effective settings, secrets redacted.
    CheckConfig(Box<RunArgs>),
    /// Run the whole request path on this machine with no external service: a development
    /// introspection provider, the broker with its in-process cache, and a real shim fed good,
    /// wrong and foreign tokens.
    Demo(demo::DemoArgs),
    /// Ask a running broker about one login through the wire protocol, as a shim would.
    Probe(ops::ProbeArgs),
    /// Summarise a running broker's metrics.
    Stats(ops::StatsArgs),
    /// Revoke one token's cached verdict, or every verdict of a user, on every broker sharing
    /// Redis (they drop their in-process copies within a second).
    Revoke(ops::RevokeArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(cli.run),
        Some(Command::Run(args)) => serve(*args),
        Some(Command::CheckConfig(args)) => ops::check_config(*args),
        Some(Command::Demo(args)) => with_runtime("warn", demo::run(args)),
        Some(Command::Probe(args)) => ops::probe(&args),
        Some(Command::Stats(args)) => with_runtime("warn", ops::stats(args)),
        Some(Command::Revoke(args)) => with_runtime("info", ops::revoke(args)),
        Some(Command::Completions { shell }) => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "extauth-broker",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Some(Command::Man) => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("extauth-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `run`: the daemon. Takes systemd's sockets before any thread exists, sets up logging from the
/// merged configuration, and re-reads the same sources on SIGHUP.
fn serve(args: RunArgs) -> Result<()> {
    // SAFETY: no other thread exists yet (the runtime is started below).
    let inherited = unsafe { broker::take_listeners()? };
    let merged = args.clone().with_file()?;
    let json = merged.log_format.as_deref() == Some("json");
    let set_log_level = init_logging(merged.log_level.as_deref().unwrap_or("info"), json)?;
    let config = merged.into_config()?;
    let context = RunContext {
        inherited,
        reload: Some(Box::new(move || Ok(args.clone().resolve()?))),
        set_log_level: Some(set_log_level),
    };
    let shutdown = CancellationToken::new();
    runtime()?.block_on(async {
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        broker::run(config, context, shutdown).await
    })
}

fn with_runtime(level: &str, job: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let level = std::env::var("EXTAUTH_LOG_LEVEL").unwrap_or_else(|_| level.to_owned());
    let _fixed_level = init_logging(&level, false)?;
    runtime()?.block_on(job)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Runtime::new()?)
}

/// Logs to stderr, as text or JSON lines, with a filter that can be changed later.
fn init_logging(level: &str, json: bool) -> Result<broker::LogLevelSetter> {
    let filter =
        EnvFilter::try_new(level).map_err(|e| anyhow::anyhow!("bad --log-level {level:?}: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = Registry::default().with(filter);
    if json {
        registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .init();
    } else {
        // Colours only for people: a log file or journald gets plain text.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        registry
            .with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
            .init();
    }
    Ok(Box::new(move |level: &str| {
        let filter = EnvFilter::try_new(level)?;
        handle.reload(filter)?;
        Ok(())
    }))
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("signal received; draining");
    shutdown.cancel();
}

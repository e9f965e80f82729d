//! `extauth-broker`: the central daemon (see README.md and `extauth-broker --help`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use extauth_broker::config::{RevokeArgs, RunArgs};
use extauth_broker::{daemon, demo, revoke};

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
    /// Log filter (tracing EnvFilter syntax: `info`, `debug`, `extauth_broker=debug`)
    /// [default: info; warn for `demo`].
    #[arg(long, env = "EXTAUTH_LOG_LEVEL", global = true)]
    log_level: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve shims (the default).
    Run(Box<RunArgs>),
    /// Run the whole request path on this machine with no external service: a development
    /// introspection provider, the broker with its in-process cache, and a real shim fed good,
    /// wrong and foreign tokens.
    Demo(demo::DemoArgs),
    /// Revoke one token's cached verdict, or every verdict of a user, on every broker sharing
    /// Redis (they drop their in-process copies within a second).
    Revoke(RevokeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Some(Command::Demo(_))) {
        "warn"
    } else {
        "info"
    };
    let level = cli.log_level.as_deref().unwrap_or(default_level);
    let filter = match EnvFilter::try_new(level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("extauth-broker: bad --log-level {level:?}: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("extauth-broker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Demo(args)) => demo::run(args).await,
            Some(Command::Run(args)) => serve(*args).await,
            Some(Command::Revoke(args)) => revoke::run_cli(args).await,
            None => serve(cli.run).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("extauth-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    daemon::run(config, shutdown).await
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

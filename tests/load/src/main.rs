//! `extauth-load`: load-test harness for extauth-broker (see docs/benchmarks.md and
//! `extauth-load --help`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use extauth_load::{
    self as load,
    cli::{LoadArgs, ProviderArgs},
};

/// Drives extauth-broker the way a clustered ejabberd does (real extauth-shim processes, or
/// straight over the wire protocol, or any extauth program), with a built-in mock OAuth provider,
/// and reports throughput, latency percentiles, verdicts and provider calls. With --chaos, kills
/// and restarts Redis and the brokers on a schedule while it runs, and checks that no login got a
/// wrong or late answer.
///
/// Exits non-zero on a wrong verdict, a broken lane, a late reply or a failed chaos schedule.
#[derive(Parser)]
#[command(name = "extauth-load", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: LoadArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run a load test (the default).
    Run(Box<LoadArgs>),
    /// A trivial extauth program that accepts everything: the floor for `--via program`.
    Echo {
        /// Give the broker's verdicts for this harness's self-describing tokens instead, decided
        /// locally: `auth` only for a valid, unexpired token of that user (`RUN.N.EXP.NONCE` for
        /// `userN`), `isuser` yes, everything else no. No broker, cache or network.
        #[arg(long)]
        check_tokens: bool,
    },
    /// A broker that accepts every request without any work, on a Unix socket (what --floor
    /// starts).
    FloorBroker {
        /// Socket path.
        socket: PathBuf,
    },
    /// The mock introspection provider alone, until SIGINT/SIGTERM, for brokers started by hand
    /// (client id `extauth-load`, secret from EXTAUTH_CLIENT_SECRET). Token `RUN.N.EXP.NONCE` is
    /// valid for user `userN` until EXP (seconds since the epoch); any other token is unknown.
    Provider(ProviderArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Echo { check_tokens }) => {
            return exit(load::floor::echo(check_tokens).map_err(Into::into))
        }
        Some(Command::FloorBroker { socket }) => {
            return exit(runtime().and_then(|rt| rt.block_on(load::floor::serve_floor(&socket))))
        }
        Some(Command::Provider(args)) => {
            return exit(
                runtime().and_then(|rt| rt.block_on(load::services::serve_provider(&args))),
            )
        }
        Some(Command::Run(args)) => *args,
        None => cli.run,
    };
    let report = match runtime().and_then(|rt| rt.block_on(until_signal(load::run(&args)))) {
        Ok(Some(report)) => report,
        Ok(None) => return ExitCode::from(130),
        Err(e) => return exit(Err(e)),
    };
    println!("{report}");
    let written = args
        .json
        .as_deref()
        .map(|p| report.write_json(p))
        .transpose()
        .and_then(|_| {
            args.plot
                .as_deref()
                .map(|p| load::plot::draw(&report, p))
                .transpose()
        });
    if let Err(e) = written {
        return exit(Err(e));
    }
    if !report.passed() {
        eprintln!("extauth-load: FAILED: {}", report.failures().join("; "));
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Runs `run` until it ends, or until SIGINT or SIGTERM (`None`). On a signal the run is
/// dropped, which kills what it started (brokers, shims, redis-server) and removes its temporary
/// directory: a harness stopped alone (not its whole process group) leaves nothing behind.
async fn until_signal<T>(
    run: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<Option<T>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut int, mut term) = (
        signal(SignalKind::interrupt())?,
        signal(SignalKind::terminate())?,
    );
    let name = tokio::select! {
        result = run => return result.map(Some),
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    };
    eprintln!("extauth-load: stopped by {name}; the brokers and programs it started are stopped");
    Ok(None)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Runtime::new()?)
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("extauth-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

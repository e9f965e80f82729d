//! `extauth-lab`: the test kit's real components for scripts. One subcommand so far:
//!
//! ```text
//! extauth-lab ejabberd-cluster --program 'CMD' [--nodes 2] [--pool-size 2]
//!     [--c2s-port P1,P2] [--epmd-port P] [--dir DIR]
//! ```
//!
//! starts an ejabberd cluster with the very code the end-to-end tests use
//! ([`extauth_testkit::ejabberd::ClusterSpec`]), so `deploy/tsung/run.sh` needs no launcher of
//! its own. Once the cluster is up it prints one `KEY=VALUE` line per fact on stdout, ending
//! with `READY=1` (see [`describe`]), then waits in the foreground. It stops the cluster (a
//! graceful `ejabberdctl stop`, then SIGKILL for whatever is left, epmd last) and exits 0 on
//! SIGTERM, SIGINT, SIGHUP, a `stop` line on stdin or the end of stdin; on a `keep` line it
//! leaves the cluster running, prints on stderr how to reach and stop it, and exits 0.
//!
//! Exit status 2: bad arguments or a missing prerequisite (root, ejabberdctl, epmd, openssl,
//! the user `ejabberd`); 1: the cluster did not start (the reason and the node logs on stderr,
//! everything started is stopped again unless `KEEP_ON_FAIL=1`). If this process is killed
//! (SIGKILL), the cluster's watchdog kills the nodes and epmd within a second or two.

use std::io::{BufRead, Write};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use extauth_testkit::ejabberd::{missing_for_cluster, Cluster, ClusterSpec, EXTAUTH_POOL_SIZE};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// Real components of the extauth-broker tests, for scripts.
#[derive(Parser)]
#[command(name = "extauth-lab", version)]
struct Cli {
    #[command(subcommand)]
    command: Lab,
}

#[derive(Subcommand)]
enum Lab {
    /// Start an ejabberd cluster on loopback (the tests' launcher), print KEY=VALUE lines
    /// ending with READY=1, and stop it on SIGTERM, SIGINT, SIGHUP, a `stop` line or the end
    /// of stdin (a `keep` line leaves it running). Needs root.
    EjabberdCluster(ClusterArgs),
}

#[derive(Args)]
struct ClusterArgs {
    /// The extauth_program command line each node runs as user ejabberd through /bin/sh -c:
    /// everything it names must be readable and executable by that user.
    #[arg(long, value_name = "CMD")]
    program: String,
    /// Number of nodes; nodes 2 and up join node 1.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=32))]
    nodes: u16,
    /// extauth_pool_size of each node: the extauth programs each keeps running.
    #[arg(long, default_value_t = EXTAUTH_POOL_SIZE as u16, value_parser = clap::value_parser!(u16).range(1..))]
    pool_size: u16,
    /// The c2s port of each node on 127.0.0.1, node 1 first (repeat or separate with commas;
    /// one per node). Default: free ports.
    #[arg(long = "c2s-port", value_name = "PORT", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..))]
    c2s_ports: Vec<u16>,
    /// The cluster's own epmd on 127.0.0.1. Default: a free port.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    epmd_port: Option<u16>,
    /// Keep the cluster's files (node dirs with their logs) here, after the stop too; its
    /// nodeN/ dirs must not exist yet. Default: a temp dir, removed on stop.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Lab::EjabberdCluster(args) => ejabberd_cluster(args),
    }
}

/// Why the foreground wait ended.
enum Verdict {
    /// Stop the cluster; the reason, for stderr.
    Stop(String),
    /// Leave it running (a `keep` line).
    Keep,
}

fn ejabberd_cluster(args: ClusterArgs) -> ExitCode {
    if !args.c2s_ports.is_empty() && args.c2s_ports.len() != usize::from(args.nodes) {
        eprintln!(
            "extauth-lab: {} c2s ports for {} nodes: give one per node, or none",
            args.c2s_ports.len(),
            args.nodes
        );
        return ExitCode::from(2);
    }
    let missing = missing_for_cluster();
    if !missing.is_empty() {
        eprintln!(
            "extauth-lab: cannot start an ejabberd cluster here; missing: {}",
            missing.join("; ")
        );
        return ExitCode::from(2);
    }
    // Before the start, so that a signal during the 10 s it takes only cuts the wait short.
    if let Err(e) = install_signal_handlers() {
        eprintln!("extauth-lab: installing signal handlers: {e}");
        return ExitCode::from(1);
    }
    let stdin = stdin_lines();
    // The harness reports failures by panicking: print the message alone, not a backtrace hint.
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("panic");
        eprintln!("extauth-lab: {msg}");
    }));

    let spec = ClusterSpec {
        nodes: args.nodes.into(),
        pool_size: args.pool_size.into(),
        c2s_ports: args.c2s_ports,
        epmd_port: args.epmd_port,
        dir: args.dir,
    };
    let program = args.program;
    // The panic has been printed, and unwinding stopped what was started (or kept it running
    // with KEEP_ON_FAIL=1).
    let Ok(cluster) = std::panic::catch_unwind(AssertUnwindSafe(|| spec.start_with(|_| program)))
    else {
        return ExitCode::from(1);
    };

    let verdict = match received_signal() {
        Some(sig) => Verdict::Stop(format!("{sig} during the start")),
        None => {
            let mut out = std::io::stdout().lock();
            for (key, value) in describe(&cluster) {
                let _ = writeln!(out, "{key}={value}");
            }
            let _ = writeln!(out, "READY=1");
            let _ = out.flush();
            drop(out);
            wait(&stdin)
        }
    };
    match verdict {
        Verdict::Keep => {
            let how = cluster.keep_running();
            eprintln!("extauth-lab: {how}");
        }
        Verdict::Stop(why) => {
            eprintln!("extauth-lab: {why}: stopping the cluster");
            drop(cluster);
        }
    }
    ExitCode::SUCCESS
}

/// What a script needs of a running cluster, as (KEY, VALUE) pairs in print order (nodes
/// numbered from 1, PIDs and ports decimal, a VALUE runs to the end of its line unquoted):
///
/// - `CLUSTER_DIR`: the cluster's directory; `NODES`: the node count; `POOL_SIZE`: the
///   extauth programs per node;
/// - `EPMD_PORT`, `EPMD_PID`: the cluster's own epmd on 127.0.0.1 (also for other Erlang
///   programs, e.g. tsung with `-start_epmd false`);
/// - per node N: `NODEN_NAME` (Erlang node name), `NODEN_C2S_PORT`, `NODEN_API_PORT`
///   (`mod_http_api` at `/api`), `NODEN_BEAM_PID` (its Erlang VM), `NODEN_EXTAUTH_PIDS` (its
///   live extauth programs, space-separated), `NODEN_DIR` (conf/, logs/, extauth.stderr) and
///   `NODEN_CTL` (`ejabberdctl` against it as one line of shell words: `eval "$NODE1_CTL
///   status"`).
fn describe(cluster: &Cluster) -> Vec<(String, String)> {
    let mut facts = vec![
        ("CLUSTER_DIR".into(), cluster.dir().display().to_string()),
        ("NODES".into(), cluster.node_count().to_string()),
        ("POOL_SIZE".into(), cluster.pool_size().to_string()),
        ("EPMD_PORT".into(), cluster.epmd_port().to_string()),
        (
            "EPMD_PID".into(),
            cluster
                .epmd_pid()
                .map(|p| p.to_string())
                .unwrap_or_default(),
        ),
    ];
    for n in 1..=cluster.node_count() {
        let programs: Vec<String> = cluster.extauth_pids(n).iter().map(u32::to_string).collect();
        let node = |key: &str| format!("NODE{n}_{key}");
        facts.extend([
            (node("NAME"), cluster.node_name(n).to_string()),
            (node("C2S_PORT"), cluster.c2s_port(n).to_string()),
            (node("API_PORT"), cluster.api_port(n).to_string()),
            (
                node("BEAM_PID"),
                cluster
                    .beam_pid(n)
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
            ),
            (node("EXTAUTH_PIDS"), programs.join(" ")),
            (node("DIR"), cluster.node_dir(n).display().to_string()),
            (node("CTL"), cluster.ctl_shell(n)),
        ]);
    }
    facts
}

/// The last of SIGTERM, SIGINT, SIGHUP received (its number), 0 for none.
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: nix::libc::c_int) {
    // Async-signal-safe: an atomic store and nothing else.
    SIGNALLED.store(sig, Ordering::SeqCst);
}

fn install_signal_handlers() -> nix::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

fn received_signal() -> Option<Signal> {
    match SIGNALLED.load(Ordering::SeqCst) {
        0 => None,
        n => Signal::try_from(n).ok(),
    }
}

/// stdin's lines, trimmed, from a thread of their own; `None` once stdin ends (EOF or error).
fn stdin_lines() -> mpsc::Receiver<Option<String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(line) => {
                    if tx.send(Some(line.trim().to_string())).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    rx
}

/// Waits for a signal, a `stop` or `keep` line, or the end of stdin.
fn wait(stdin: &mpsc::Receiver<Option<String>>) -> Verdict {
    loop {
        if let Some(sig) = received_signal() {
            return Verdict::Stop(sig.to_string());
        }
        match stdin.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(line)) => match line.as_str() {
                "stop" => return Verdict::Stop("`stop` on stdin".into()),
                "keep" => return Verdict::Keep,
                "" => {}
                other => eprintln!("extauth-lab: ignoring {other:?} on stdin (stop, keep)"),
            },
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Verdict::Stop("end of stdin".into())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

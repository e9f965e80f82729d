//! `extauth-broker demo`: the whole request path on one machine with no external service.
//!
//! Starts the development introspection provider, the broker (in-process cache only) on a Unix
//! socket in a temporary directory, and a real `extauth-shim` child process, then feeds the shim
//! extauth frames exactly as ejabberd would and prints every verdict and the provider call count.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command as Process, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RunArgs};
use crate::devprovider::DevProvider;
use crate::verdict::now_ms;
use extauth_protocol::extauth::reply;

/// Options of `extauth-broker demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The shim binary [default: `extauth-shim` next to this executable].
    #[arg(long, env = "EXTAUTH_SHIM")]
    pub shim: Option<PathBuf>,
}

/// One scripted request: what a reader sees, the frame ejabberd would send, the expected answer.
struct Step {
    what: &'static str,
    request: String,
    expect: bool,
}

/// Runs the demo; fails when any verdict differs from the expected one.
///
/// # Errors
/// A missing shim binary, a start-up failure, or a wrong verdict.
pub async fn run(args: DemoArgs) -> Result<()> {
    let shim = shim_path(args.shim)?;
    let client_secret = hex::encode(rand::random::<[u8; 16]>());
    let provider = DevProvider::start("demo-broker", &client_secret).await?;
    let now_s = now_ms() / 1000;
    let token = |who: &str| format!("demo-{who}-{}", hex::encode(rand::random::<[u8; 8]>()));
    let (alice, bob, shouting, revoked, expired) = (
        token("alice"),
        token("bob"),
        token("shouting"),
        token("revoked"),
        token("expired"),
    );
    provider.insert(&alice, json!({"username": "alice", "exp": now_s + 3600}));
    provider.insert(&bob, json!({"username": "bob", "exp": now_s + 3600}));
    provider.insert(&shouting, json!({"username": "Alice", "exp": now_s + 3600}));
    provider.insert(&revoked, json!({"active": false}));
    provider.insert(&expired, json!({"username": "alice", "exp": now_s - 60}));

    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("broker.sock");
    let shutdown = CancellationToken::new();
    let broker = tokio::spawn(crate::daemon::run(
        config(&provider, &client_secret, socket.clone())?,
        crate::daemon::RunContext::default(),
        shutdown.clone(),
    ));
    wait_for_socket(&socket).await?;

    let steps = vec![
        Step {
            what: "alice logs in with her token",
            request: format!("auth:alice:localhost:{alice}"),
            expect: true,
        },
        Step {
            what: "alice logs in again (answered from the cache)",
            request: format!("auth:alice:localhost:{alice}"),
            expect: true,
        },
        Step {
            what: "alice with a token the provider never issued",
            request: "auth:alice:localhost:not-a-token".into(),
            expect: false,
        },
        Step {
            what: "bob tries alice's token (the cached verdict names alice)",
            request: format!("auth:bob:localhost:{alice}"),
            expect: false,
        },
        Step {
            what: "bob logs in with his own token",
            request: format!("auth:bob:localhost:{bob}"),
            expect: true,
        },
        Step {
            what: "a token whose claim says \"Alice\": not the localpart alice",
            request: format!("auth:alice:localhost:{shouting}"),
            expect: false,
        },
        Step {
            what: "alice with a revoked token (active: false)",
            request: format!("auth:alice:localhost:{revoked}"),
            expect: false,
        },
        Step {
            what: "alice with an expired token (exp in the past)",
            request: format!("auth:alice:localhost:{expired}"),
            expect: false,
        },
        Step {
            what: "isuser alice (logged in recently)",
            request: "isuser:alice:localhost".into(),
            expect: true,
        },
        Step {
            what: "isuser carol (never seen)",
            request: "isuser:carol:localhost".into(),
            expect: false,
        },
        Step {
            what: "setpass alice (accounts live at the provider)",
            request: "setpass:alice:localhost:x".into(),
            expect: false,
        },
        Step {
            what: "malformed request (missing fields)",
            request: "auth:alice".into(),
            expect: false,
        },
    ];
    let socket_arg = format!("unix:{}", socket.display());
    let calls = {
        let provider = &provider;
        move || provider.calls()
    };
    let result = tokio::task::block_in_place(|| drive_shim(&shim, &socket_arg, &steps, calls));
    shutdown.cancel();
    let _ = broker.await;
    let wrong = result?;
    println!(
        "\nprovider calls in total: {} for {} requests",
        provider.calls(),
        steps.len()
    );
    if wrong > 0 {
        bail!("{wrong} verdict(s) differ from the expected ones");
    }
    println!("every verdict as expected");
    Ok(())
}

fn config(provider: &DevProvider, client_secret: &str, socket: PathBuf) -> Result<Config> {
    let file = format!(
        r#"
        listen = ["unix:{socket}"]
        socket_mode = "0600"
        l1_capacity = 10000
        [defaults]
        validator = {{ kind = "introspection", url = "{url}", client_id = "demo-broker", client_secret = "{client_secret}" }}
        "#,
        socket = socket.display(),
        url = provider.url(),
    );
    let args: RunArgs = toml::from_str(&file).context("demo configuration")?;
    Ok(args.resolve()?)
}

fn shim_path(given: Option<PathBuf>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("extauth-shim"),
    };
    if !path.exists() {
        bail!(
            "{} not found: build the workspace first (cargo build --workspace) or pass --shim PATH",
            path.display()
        );
    }
    Ok(path)
}

async fn wait_for_socket(socket: &std::path::Path) -> Result<()> {
    for _ in 0..200 {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the broker did not start listening on {}", socket.display())
}

/// Feeds every step to a real shim process and prints the verdicts; returns how many were wrong.
fn drive_shim(
    shim: &std::path::Path,
    broker: &str,
    steps: &[Step],
    calls: impl Fn() -> u64,
) -> Result<usize> {
    let mut child = Process::new(shim)
        .args(["--broker", broker, "--timeout", "5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", shim.display()))?;
    let (mut stdin, mut stdout) = (
        child.stdin.take().context("shim stdin")?,
        child.stdout.take().context("shim stdout")?,
    );
    println!(
        "{:<56} {:>6} {:>8} {:>15}",
        "request (as ejabberd sends it to extauth-shim)", "reply", "expected", "provider calls"
    );
    let mut wrong = 0;
    for step in steps {
        let got = ask(&mut stdin, &mut stdout, &step.request)?;
        let mark = if got == step.expect {
            ""
        } else {
            "  <-- WRONG"
        };
        wrong += usize::from(got != step.expect);
        println!(
            "{:<56} {:>6} {:>8} {:>15}{mark}",
            step.what,
            u8::from(got),
            u8::from(step.expect),
            calls()
        );
    }
    drop(stdin);
    finish(child)?;
    Ok(wrong)
}

fn ask(stdin: &mut ChildStdin, stdout: &mut ChildStdout, request: &str) -> Result<bool> {
    let mut frame = (request.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(request.as_bytes());
    stdin.write_all(&frame)?;
    stdin.flush()?;
    let mut answer = [0u8; 4];
    stdout
        .read_exact(&mut answer)
        .context("reading the shim's reply")?;
    match answer {
        a if a == reply(true) => Ok(true),
        a if a == reply(false) => Ok(false),
        other => bail!("the shim wrote {other:?}, not an extauth reply"),
    }
}

/// Waits for the shim to exit after end of input, as it must.
fn finish(mut child: Child) -> Result<()> {
    for _ in 0..100 {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("the shim exited with {status} after end of input");
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    bail!("the shim did not exit after end of input")
}

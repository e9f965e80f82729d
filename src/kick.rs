//! The revoke hook: ends a revoked user's XMPP sessions through ejabberd's `kick_user`.
//!
//! A revocation only stops the next login: a session that is already open stays open, and with
//! ejabberd 25.03+'s `mod_auth_fast` (XEP-0484) a client reconnects for up to 30 days with its
//! FAST token, without asking extauth at all. ejabberd's `kick_user USER HOST` ends every session
//! of the user and clears its FAST tokens (shared/docs/extauth-facts.md, "ejabberd 23.10 to
//! 26.07"). This module calls it, when configured (TOML `[on_revoke] kick = {...}`), either
//! - through `mod_http_api`: `POST <url>` with the JSON body `{"user": U, "host": H}` (ejabberd's
//!   HTTP API, `/api/kick_user`), optionally with HTTP Basic (`basic_user` +
//!   `basic_password_file`, or credentials in the URL) or a bearer (`bearer_file`); or
//! - by running a command given as an argv list (never through a shell), with `{user}` and
//!   `{host}` replaced, e.g. `["/usr/sbin/ejabberdctl", "kick_user", "{user}", "{host}"]`.
//!
//! Only the process that performs a revocation kicks (the `revoke` command, or the broker whose
//! admin endpoint was called); brokers that learn of it through Redis do not, so a user is
//! kicked once, not once per broker. The kick runs after the revocation is complete and is
//! bounded by its `timeout`: a slow or failing ejabberd never undoes or delays a revocation, it
//! is reported (and counted in `extauth_kicks_total{outcome}`). Secrets (bearer, passwords, URL
//! credentials) never appear in messages: URLs are shown through [`redact_url`].

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tracing::{info, warn};

use crate::metrics;
use crate::secrets::{read_secret, redact_url, ConfigUrl, SecretError};
use crate::validate::http::{HttpTimeouts, ProviderClient, ProviderPolicy};
use crate::validate::SetupError;
use extauth_protocol::extauth::Secret;

/// Default of a kick's `timeout`, seconds: well under the admin endpoint's request timeout
/// (10 s by default), so the admin answer can still report the kick's fate.
const DEFAULT_TIMEOUT: f64 = 5.0;

/// Longest `timeout` accepted, seconds.
const MAX_TIMEOUT: f64 = 30.0;

/// Most characters of ejabberd's own answer quoted in a failure message.
const QUOTED: usize = 200;

/// The `[on_revoke]` table of the configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OnRevoke {
    /// End the revoked user's sessions through ejabberd: `{ kind = "http_api" | "command", ... }`.
    pub kick: Option<KickConfig>,
}

/// How to call ejabberd's `kick_user`: TOML `kick = { kind = "...", ... }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum KickConfig {
    /// `mod_http_api`: `POST url` with `{"user", "host"}`.
    HttpApi(HttpApiKick),
    /// A command run without a shell (`ejabberdctl kick_user {user} {host}`).
    Command(CommandKick),
}

/// `kind = "http_api"`: ejabberd's HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpApiKick {
    /// The `kick_user` command's URL, e.g. `http://127.0.0.1:5281/api/kick_user`; `http://` only
    /// to a loopback host unless `insecure_provider_http`. Credentials in it (`http://u:p@...`)
    /// are sent as HTTP Basic and redacted wherever the URL is shown.
    pub url: ConfigUrl,
    /// File holding a bearer token (first line), sent as `Authorization: Bearer` (an ejabberd
    /// OAuth token with the `ejabberd:admin` scope, or whatever a proxy in front expects).
    pub bearer_file: Option<PathBuf>,
    /// HTTP Basic user (an admin JID such as `admin@example.com`), with `basic_password_file`.
    pub basic_user: Option<String>,
    /// File holding the HTTP Basic password (first line).
    pub basic_password_file: Option<PathBuf>,
    /// Seconds the call may take, connection included [default: 5, at most 30].
    #[serde(default = "default_timeout")]
    pub timeout: f64,
}

/// `kind = "command"`: a program run directly (argv, no shell).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CommandKick {
    /// The program (an absolute path) and its arguments; `{user}` and `{host}` are replaced in
    /// every argument and must each appear at least once.
    pub argv: Vec<String>,
    /// Seconds the command may run before it is killed [default: 5, at most 30].
    #[serde(default = "default_timeout")]
    pub timeout: f64,
}

fn default_timeout() -> f64 {
    DEFAULT_TIMEOUT
}

/// A bad `[on_revoke] kick` setting, or a hook that cannot be built (the message names the
/// setting, a URL only in redacted form, never a secret).
#[derive(Debug, thiserror::Error)]
pub enum KickConfigError {
    /// `timeout` is not in (0, 30] seconds.
    #[error("on_revoke.kick.timeout must be in (0, {MAX_TIMEOUT}] seconds, got {timeout}")]
    Timeout {
        /// The value given.
        timeout: f64,
    },
    /// Both `bearer_file` and `basic_user` are given.
    #[error("on_revoke.kick: bearer_file and basic_user exclude each other")]
    BearerAndBasic,
    /// `basic_user` without `basic_password_file`, or the reverse.
    #[error("on_revoke.kick: basic_user and basic_password_file go together")]
    BasicHalf,
    /// `argv` is empty.
    #[error("on_revoke.kick.argv is empty")]
    EmptyArgv,
    /// `argv`'s program is not an absolute path.
    #[error("on_revoke.kick.argv: the program must be an absolute path, got {program:?}")]
    RelativeProgram {
        /// The program given.
        program: String,
    },
    /// `argv` lacks `{user}` or `{host}`.
    #[error("on_revoke.kick.argv must contain {placeholder} (the revoked user's JID part)")]
    MissingPlaceholder {
        /// `{user}` or `{host}`.
        placeholder: &'static str,
    },
    /// The HTTP client for `url` cannot be built (a bad or plain-http URL, ...).
    #[error(transparent)]
    Client(#[from] SetupError),
    /// `bearer_file` or `basic_password_file` cannot be read.
    #[error(transparent)]
    Secret(#[from] SecretError),
}

impl KickConfig {
    /// The kick's time bound.
    pub(crate) fn timeout(&self) -> Duration {
        let seconds = match self {
            KickConfig::HttpApi(c) => c.timeout,
            KickConfig::Command(c) => c.timeout,
        };
        Duration::from_secs_f64(seconds.clamp(0.001, MAX_TIMEOUT))
    }

    /// What `check-config` shows: the kind, the redacted URL or the argv, the credentials'
    /// kind (never their value), the timeout.
    pub(crate) fn describe(&self) -> String {
        match self {
            KickConfig::HttpApi(c) => {
                let in_url = reqwest::Url::parse(c.url.expose())
                    .is_ok_and(|u| !u.username().is_empty() || u.password().is_some());
                let auth = match (&c.bearer_file, &c.basic_user) {
                    (Some(_), _) => "bearer from file".to_owned(),
                    (None, Some(user)) => format!("basic as {user}"),
                    (None, None) if in_url => "basic from the URL".to_owned(),
                    (None, None) => "no credentials".to_owned(),
                };
                format!(
                    "POST {} (mod_http_api, {auth}), timeout {} s",
                    c.url, c.timeout
                )
            }
            KickConfig::Command(c) => {
                format!("run {:?} (no shell), timeout {} s", c.argv, c.timeout)
            }
        }
    }

    /// Checks the settings without reading secret files.
    ///
    /// # Errors
    /// A message naming the bad setting (a URL only in redacted form).
    pub(crate) fn check(&self) -> Result<(), KickConfigError> {
        let timeout = match self {
            KickConfig::HttpApi(c) => c.timeout,
            KickConfig::Command(c) => c.timeout,
        };
        if !(timeout.is_finite() && timeout > 0.0 && timeout <= MAX_TIMEOUT) {
            return Err(KickConfigError::Timeout { timeout });
        }
        match self {
            KickConfig::HttpApi(c) => {
                if c.bearer_file.is_some() && c.basic_user.is_some() {
                    return Err(KickConfigError::BearerAndBasic);
                }
                if c.basic_user.is_some() != c.basic_password_file.is_some() {
                    return Err(KickConfigError::BasicHalf);
                }
                Ok(())
            }
            KickConfig::Command(c) => check_argv(&c.argv),
        }
    }
}

fn check_argv(argv: &[String]) -> Result<(), KickConfigError> {
    let Some(program) = argv.first() else {
        return Err(KickConfigError::EmptyArgv);
    };
    if !program.starts_with('/') {
        return Err(KickConfigError::RelativeProgram {
            program: program.clone(),
        });
    }
    for placeholder in ["{user}", "{host}"] {
        if !argv.iter().any(|a| a.contains(placeholder)) {
            return Err(KickConfigError::MissingPlaceholder { placeholder });
        }
    }
    Ok(())
}

/// Why a kick failed (the message never holds a secret).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct KickError(String);

/// What happened to the revoked user's sessions; reported by the `revoke` command and the admin
/// endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KickReport {
    /// No kick hook is configured (or the caller turned it off).
    Off,
    /// One token was revoked: its sessions cannot be told from the user's other devices', so
    /// none was ended.
    NotForToken,
    /// ejabberd ended the user's sessions; how many, when it said so.
    Kicked {
        /// Sessions ended, as ejabberd reported (`kick_user` answers a number).
        sessions: Option<u64>,
    },
    /// The call failed, timed out or was refused; the revocation stands.
    Failed(String),
}

impl KickReport {
    /// `off`, `not_for_token`, `kicked` or `failed`.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            KickReport::Off => "off",
            KickReport::NotForToken => "not_for_token",
            KickReport::Kicked { .. } => "kicked",
            KickReport::Failed(_) => "failed",
        }
    }

    /// One sentence for an operator about `user@host`.
    pub(crate) fn describe(&self, user: &str, host: &str) -> String {
        match self {
            KickReport::Off => "no kick hook configured: open sessions stay open".into(),
            KickReport::NotForToken => format!(
                "cannot end sessions for one token: ejabberd cannot tell its sessions from \
                 {user}@{host}'s other devices; revoke the user (without a token) to end them all"
            ),
            KickReport::Kicked { sessions: Some(n) } => {
                format!("ended {n} session(s) of {user}@{host} through ejabberd")
            }
            KickReport::Kicked { sessions: None } => {
                format!("ended the sessions of {user}@{host} through ejabberd")
            }
            KickReport::Failed(why) => format!(
                "the revocation stands, but ending {user}@{host}'s sessions through ejabberd \
                 failed: {why}"
            ),
        }
    }
}

/// What follows a successful revocation of `user@host` (normalised): nothing without a hook,
/// nothing for a single token (its sessions cannot be told from the user's other devices'),
/// otherwise the kick. Shared by the `revoke` command and the admin endpoint.
pub(crate) async fn after_revoke(
    kicker: Option<&Kicker>,
    user: &str,
    host: &str,
    one_token: bool,
) -> KickReport {
    match kicker {
        None => KickReport::Off,
        Some(_) if one_token => KickReport::NotForToken,
        Some(kicker) => kicker.kick(user, host).await,
    }
}

/// A configured kick hook, ready to call.
pub(crate) struct Kicker {
    how: How,
    timeout: Duration,
}

enum How {
    Http {
        client: ProviderClient,
        url: ConfigUrl,
        auth: Auth,
    },
    Command {
        argv: Vec<String>,
    },
}

enum Auth {
    None,
    Bearer(Secret),
    Basic(String, Secret),
}

impl Kicker {
    /// Checks `config`, reads its secret files and builds the HTTP client (`policy` decides
    /// whether plain `http://` may leave loopback).
    ///
    /// # Errors
    /// A bad setting or an unreadable secret file (the message names the setting, never a
    /// secret).
    pub(crate) fn new(
        config: &KickConfig,
        policy: &ProviderPolicy,
    ) -> Result<Kicker, KickConfigError> {
        config.check()?;
        let timeout = config.timeout();
        let how = match config {
            KickConfig::HttpApi(c) => {
                let timeouts = HttpTimeouts {
                    connect: c.timeout.min(2.0),
                    total: c.timeout,
                };
                let client = ProviderClient::new(
                    "ejabberd kick_user",
                    "on_revoke.kick.url",
                    c.url.expose(),
                    timeouts,
                    policy,
                )?;
                let auth = match (&c.bearer_file, &c.basic_user, &c.basic_password_file) {
                    (Some(file), _, _) => {
                        Auth::Bearer(read_secret(file, "on_revoke.kick.bearer_file")?)
                    }
                    (None, Some(user), Some(file)) => Auth::Basic(
                        user.clone(),
                        read_secret(file, "on_revoke.kick.basic_password_file")?,
                    ),
                    _ => Auth::None,
                };
                How::Http {
                    client,
                    url: c.url.clone(),
                    auth,
                }
            }
            KickConfig::Command(c) => How::Command {
                argv: c.argv.clone(),
            },
        };
        Ok(Kicker { how, timeout })
    }

    /// Ends every session of `user@host` (already normalised as ejabberd does), within the
    /// timeout; logs and counts the outcome.
    pub(crate) async fn kick(&self, user: &str, host: &str) -> KickReport {
        // A command kills its own process group at the timeout; this outer bound (a little
        // later, so that kill happens first) covers everything else.
        let bound = self.timeout + Duration::from_millis(500);
        let bounded = tokio::time::timeout(bound, self.call(user, host)).await;
        let report = match bounded {
            Ok(Ok(sessions)) => KickReport::Kicked { sessions },
            Ok(Err(e)) => KickReport::Failed(e.0),
            Err(_) => KickReport::Failed(format!(
                "no answer within {:.1} s (on_revoke.kick.timeout)",
                self.timeout.as_secs_f64()
            )),
        };
        match &report {
            KickReport::Failed(why) => warn!(user, host, "kick_user failed: {why}"),
            _ => info!(user, host, "{}", report.describe(user, host)),
        }
        metrics::kick(report.outcome());
        report
    }

    async fn call(&self, user: &str, host: &str) -> Result<Option<u64>, KickError> {
        match &self.how {
            How::Http { client, url, auth } => http_kick(client, url, auth, user, host).await,
            How::Command { argv } => command_kick(argv, self.timeout, user, host).await,
        }
    }
}

/// `POST url {"user", "host"}`; 2xx is success (ejabberd answers the number of sessions).
async fn http_kick(
    client: &ProviderClient,
    url: &ConfigUrl,
    auth: &Auth,
    user: &str,
    host: &str,
) -> Result<Option<u64>, KickError> {
    let mut request = client
        .request(reqwest::Method::POST, url.expose())
        .json(&serde_json::json!({"user": user, "host": host}));
    request = match auth {
        Auth::None => request,
        Auth::Bearer(token) => request.bearer_auth(token.expose()),
        Auth::Basic(name, password) => request.basic_auth(name, Some(password.expose())),
    };
    let shown = redact_url(url.expose());
    let response = client
        .send(request)
        .await
        .map_err(|e| KickError(format!("{shown}: {e}")))?;
    let status = response.status();
    let body = client.body(response).await.unwrap_or_default();
    let text = quoted(&body);
    if !status.is_success() {
        return Err(KickError(format!(
            "{shown} answered HTTP {}: {text:?}",
            status.as_u16()
        )));
    }
    Ok(sessions(&text))
}

/// The number of sessions ejabberd reports: `1` (ejabberdctl, recent `mod_http_api`) or an
/// object with one number such as `{"num_resources": 1}` (older `mod_http_api`).
fn sessions(text: &str) -> Option<u64> {
    match serde_json::from_str::<serde_json::Value>(text.trim()).ok()? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::Object(o) if o.len() == 1 => o.values().next()?.as_u64(),
        _ => None,
    }
}

/// Runs `argv` with `{user}`/`{host}` filled in, killed (with its process group) at `timeout`;
/// exit status 0 is success (`ejabberdctl kick_user` prints the number of sessions).
async fn command_kick(
    argv: &[String],
    timeout: Duration,
    user: &str,
    host: &str,
) -> Result<Option<u64>, KickError> {
    let args: Vec<String> = argv
        .iter()
        .map(|a| a.replace("{user}", user).replace("{host}", host))
        .collect();
    let mut command = tokio::process::Command::new(&args[0]);
    command
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so a timeout also ends what it started (ejabberdctl runs an Erlang VM).
        .process_group(0)
        .kill_on_drop(true);
    let child = command
        .spawn()
        .map_err(|e| KickError(format!("cannot run {:?}: {e}", args[0])))?;
    let group = child.id();
    let output = tokio::time::timeout(timeout, child.wait_with_output()).await;
    let Ok(output) = output else {
        if let Some(pid) = group {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        return Err(KickError(format!(
            "{:?} did not finish within {:.1} s (killed)",
            args[0],
            timeout.as_secs_f64()
        )));
    };
    let output = output.map_err(|e| KickError(format!("waiting for {:?}: {e}", args[0])))?;
    let stdout = quoted(&output.stdout);
    if !output.status.success() {
        let said = match quoted(&output.stderr) {
            e if e.trim().is_empty() => stdout,
            e => e,
        };
        return Err(KickError(format!(
            "{:?} exited with {}: {:?}",
            args[0],
            output.status,
            said.trim()
        )));
    }
    Ok(sessions(&stdout))
}

/// At most [`QUOTED`] characters of what ejabberd said, control characters replaced, for a
/// message.
fn quoted(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .take(QUOTED)
        .map(|c| if c.is_control() && c != '\n' { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<KickConfig, String> {
        #[derive(Deserialize)]
        struct File {
            on_revoke: OnRevoke,
        }
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let kick = file.on_revoke.kick.ok_or("no kick")?;
        kick.check().map_err(|e| e.to_string())?;
        Ok(kick)
    }

    #[test]
    fn settings_are_checked() {
        let ok = parse(
            "[on_revoke]\nkick = { kind = \"command\", argv = [\"/usr/sbin/ejabberdctl\", \"kick_user\", \"{user}\", \"{host}\"] }",
        )
        .unwrap();
        assert_eq!(ok.timeout(), Duration::from_secs(5));
        for (bad, why) in [
            ("kick = { kind = \"command\", argv = [] }", "empty"),
            (
                "kick = { kind = \"command\", argv = [\"ejabberdctl\", \"{user}\", \"{host}\"] }",
                "absolute",
            ),
            (
                "kick = { kind = \"command\", argv = [\"/x\", \"kick_user\", \"{user}\"] }",
                "{host}",
            ),
            (
                "kick = { kind = \"http_api\", url = \"http://127.0.0.1/api/kick_user\", timeout = 0 }",
                "timeout",
            ),
            (
                "kick = { kind = \"http_api\", url = \"http://127.0.0.1/api/kick_user\", basic_user = \"a@b\" }",
                "go together",
            ),
            ("kick = { kind = \"shell\", line = \"x\" }", "unknown variant"),
            (
                "kick = { kind = \"http_api\", url = \"http://h/\", password = \"x\" }",
                "unknown field",
            ),
        ] {
            let err = parse(&format!("[on_revoke]\n{bad}")).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn url_credentials_never_show() {
        let kick = parse(
            "[on_revoke]\nkick = { kind = \"http_api\", url = \"http://admin%40localhost:s3cret@127.0.0.1:5281/api/kick_user\" }",
        )
        .unwrap();
        let shown = kick.describe();
        assert!(
            !shown.contains("s3cret") && shown.contains(":***@"),
            "{shown}"
        );
        assert!(!format!("{kick:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn a_command_is_run_without_a_shell_and_bounded() {
        let kicker = |argv: &[&str], timeout: f64| {
            Kicker::new(
                &KickConfig::Command(CommandKick {
                    argv: argv.iter().map(|s| s.to_string()).collect(),
                    timeout,
                }),
                &ProviderPolicy::default(),
            )
            .unwrap()
        };
        let echo = kicker(&["/bin/echo", "{user}@{host}"], 5.0);
        // A user that would be a command substitution in a shell is one argument here.
        assert!(matches!(
            echo.kick("$(touch x)", "h").await,
            KickReport::Kicked { sessions: None }
        ));
        let count = kicker(&["/bin/sh", "-c", "echo 2", "{user}", "{host}"], 5.0);
        assert_eq!(
            count.kick("a", "h").await,
            KickReport::Kicked { sessions: Some(2) }
        );
        let fails = kicker(
            &[
                "/bin/sh",
                "-c",
                "echo no such user >&2; exit 3",
                "{user}",
                "{host}",
            ],
            5.0,
        );
        match fails.kick("a", "h").await {
            KickReport::Failed(why) => assert!(why.contains("no such user"), "{why}"),
            other => panic!("{other:?}"),
        }
        let slow = kicker(&["/bin/sh", "-c", "sleep 10", "{user}", "{host}"], 0.2);
        let t0 = std::time::Instant::now();
        assert!(matches!(slow.kick("a", "h").await, KickReport::Failed(_)));
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}

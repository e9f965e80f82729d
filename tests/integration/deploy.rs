//! Checks of everything under `deploy/` and of the Debian package, with the real tools and the
//! real binaries: `systemd-analyze verify` and `security` on the units, `extauth-broker
//! check-config` on the example configuration, ejabberd 23.01's own option validators on the
//! ejabberd snippets, `redis-server` on the Redis examples (with `extauth-broker revoke` through
//! them), `promtool` on the dashboard queries and alert rules, `dpkg-deb` on the package.
//!
//! A check whose tool is not installed is skipped with a loud message (ejabberd's validators
//! are required when `EXTAUTH_REQUIRE_EJABBERD=1`, as in CI). The package is built only with
//! `EXTAUTH_TEST_DEB=1`; `EXTAUTH_TEST_DEB=/path/to.deb` inspects a package built before
//! (`.ci/run` does that with `deploy/debian/build-deb.sh`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use extauth_testkit::services::{broker_bin, free_port, shim_bin, wait_until};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn skip(what: &str, why: &str) {
    eprintln!("\n**********\n*** SKIPPED: {what}: {why}\n**********\n");
}

/// An executable on PATH (or in the sbin directories, which root's PATH may lack).
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file());
    found
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `cmd`, panics with its output unless it succeeds, returns stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The broker with no `EXTAUTH_*` variable from the caller's environment.
fn broker() -> Command {
    let mut cmd = Command::new(broker_bin());
    for (key, _) in std::env::vars() {
        if key.starts_with("EXTAUTH_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Lines that are not comments (`#` or `;`) or blank.
fn live_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
}

/// Values of `key=` in a systemd unit (any section), in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    live_lines(unit)
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
        .collect()
}

fn unit_value(unit: &str, key: &str) -> String {
    let values = unit_values(unit, key);
    assert_eq!(values.len(), 1, "{key}= should be set exactly once");
    values[0].clone()
}

fn systemd_units() -> BTreeMap<String, String> {
    let dir = root().join("deploy/systemd");
    let mut units = BTreeMap::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".service") || name.ends_with(".socket") {
            units.insert(name, fs::read_to_string(&path).unwrap());
        }
    }
    units
}

/// Child processes killed when the test ends, however it ends.
#[derive(Default)]
struct Children(Vec<Child>);

impl Children {
    fn spawn(&mut self, cmd: &mut Command) {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        self.0.push(child);
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------------

/// The names src/systemd.rs maps to roles (`FileDescriptorName=`).
const FD_NAMES: &[&str] = &["shim", "metrics", "admin"];

#[test]
fn systemd_units_are_consistent_with_the_broker_and_the_package() {
    let units = systemd_units();
    for name in [
        "extauth-broker.service",
        "extauth-broker.socket",
        "extauth-broker-metrics.socket",
        "extauth-broker-admin.socket",
    ] {
        assert!(units.contains_key(name), "deploy/systemd/{name} missing");
    }
    let service = &units["extauth-broker.service"];
    for (key, want) in [
        ("Type", "notify"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("User", "extauth-broker"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("Requires", "extauth-broker.socket"),
    ] {
        assert_eq!(unit_value(service, key), want, "{key}= in the service");
    }
    assert!(!unit_value(service, "WatchdogSec").is_empty());
    assert!(unit_values(service, "SystemCallFilter").contains(&"@system-service".to_owned()));
    // RuntimeDirectory= would delete /run/extauth-broker, and with it the socket systemd holds,
    // whenever the service stops.
    assert!(unit_values(service, "RuntimeDirectory").is_empty());
    let exec = unit_value(service, "ExecStart");
    assert_eq!(
        exec,
        "/usr/bin/extauth-broker run --config /etc/extauth-broker/broker.toml"
    );

    for (name, unit) in units.iter().filter(|(n, _)| n.ends_with(".socket")) {
        let fd_name = unit_value(unit, "FileDescriptorName");
        assert!(
            FD_NAMES.contains(&fd_name.as_str()),
            "{name}: FileDescriptorName={fd_name} is not one the broker knows ({FD_NAMES:?})"
        );
        if name != "extauth-broker.socket" {
            assert_eq!(
                unit_value(unit, "Service"),
                "extauth-broker.service",
                "{name}"
            );
        }
    }
    let socket = &units["extauth-broker.socket"];
    assert_eq!(
        unit_value(socket, "ListenStream"),
        "/run/extauth-broker/broker.sock"
    );
    assert_eq!(unit_value(socket, "SocketMode"), "0660");

    // The user and groups the units name are the ones postinst creates.
    let postinst = read("deploy/debian/postinst");
    let group = unit_value(socket, "SocketGroup");
    assert!(
        postinst.contains(&format!("addgroup --system --quiet {group}\n")),
        "postinst does not create the socket group {group}"
    );
    assert!(postinst.contains(&format!("adduser --quiet ejabberd {group}")));
    let user = unit_value(service, "User");
    assert!(postinst.contains(&format!("--gecos \"extauth-broker daemon\" {user}")));
    assert_eq!(unit_value(service, "Group"), user);

    // The metrics socket, the example configuration and `stats` agree on the address.
    let metrics = unit_value(&units["extauth-broker-metrics.socket"], "ListenStream");
    let config = read("deploy/broker.toml");
    assert!(
        live_lines(&config).any(|l| l == format!("metrics_listen = \"{metrics}\"")),
        "broker.toml's metrics_listen should be {metrics}"
    );
    let stats_help = run_ok(broker().args(["stats", "--help"]));
    assert!(
        stats_help.contains(&format!("http://{metrics}/metrics")),
        "{stats_help}"
    );
}

#[test]
fn systemd_units_pass_systemd_analyze() {
    let Some(analyze) = tool("systemd-analyze") else {
        skip("systemd-analyze verify", "systemd-analyze is not installed");
        return;
    };
    // `verify` wants ExecStart's binary to exist: check copies that run the one cargo built.
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, unit) in systemd_units() {
        let unit = unit.replace("/usr/bin/extauth-broker", &broker_bin().to_string_lossy());
        let path = dir.path().join(&name);
        fs::write(&path, unit).unwrap();
        paths.push(path);
    }
    let out = run(Command::new(&analyze)
        .args(["verify", "--man=no"])
        .args(&paths)
        .current_dir(dir.path()));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    // verify exits 0 on unknown keys and unparseable values, and only says so: any output fails.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        out.status
    );
    eprintln!("systemd-analyze verify: {} units OK", paths.len());

    let service = dir.path().join("extauth-broker.service");
    let out = run(Command::new(&analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&service)
        .current_dir(dir.path()));
    let said = text(&out.stdout);
    let level = said
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for extauth-broker.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok());
    match level {
        Some(level) => {
            eprintln!("systemd-analyze security: exposure level {level}");
            assert!(level <= 2.0, "exposure level {level} > 2.0:\n{said}");
        }
        // systemd older than 250 has no --offline.
        None => skip(
            "systemd-analyze security --offline",
            &format!("no exposure level in its output: {}", text(&out.stderr)),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Example configuration
// ---------------------------------------------------------------------------------------------

/// deploy/broker.toml with /etc/extauth-broker/ moved to `dir`, where every file it names is
/// created (secrets of 44 bytes). Returns the copy's path and the secrets written.
fn example_config_in(dir: &Path) -> (PathBuf, Vec<String>) {
    let here = format!("{}/", dir.display());
    let config = read("deploy/broker.toml").replace("/etc/extauth-broker/", &here);
    let mut secrets = Vec::new();
    for line in live_lines(&config) {
        let mut rest = line;
        while let Some(start) = rest.find(&format!("\"{here}")) {
            let tail = &rest[start + 1..];
            let end = tail.find('"').unwrap();
            let path = &tail[..end];
            let secret = format!("example-secret-{:030}", secrets.len());
            fs::write(path, format!("{secret}\n")).unwrap();
            secrets.push(secret);
            rest = &tail[end..];
        }
    }
    assert!(!secrets.is_empty(), "broker.toml names no secret file?");
    let path = dir.join("broker.toml");
    fs::write(&path, config).unwrap();
    (path, secrets)
}

#[test]
fn example_config_passes_check_config_as_the_service_runs_it() {
    let config = read("deploy/broker.toml");
    // Under socket activation the broker must not bind the socket path itself.
    assert!(
        !live_lines(&config).any(|l| l.starts_with("listen ") || l.starts_with("listen=")),
        "deploy/broker.toml must leave `listen` commented out (the socket unit provides it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let (copy, secrets) = example_config_in(dir.path());

    // The service's own command line, with `run` turned into `check-config`.
    let exec = unit_value(&systemd_units()["extauth-broker.service"], "ExecStart");
    let mut args: Vec<String> = exec.split_whitespace().skip(1).map(String::from).collect();
    assert_eq!(args[0], "run");
    args[0] = "check-config".into();
    for arg in &mut args {
        if arg == "/etc/extauth-broker/broker.toml" {
            *arg = copy.to_string_lossy().into_owned();
        }
    }
    let out = run_ok(broker().args(&args));
    assert!(out.contains("configuration OK"), "{out}");
    for secret in &secrets {
        assert!(
            !out.contains(secret.as_str()),
            "check-config printed a secret:\n{out}"
        );
    }
    eprintln!(
        "check-config accepted deploy/broker.toml ({} secret files)",
        secrets.len()
    );

    // A missing secret file is reported by name.
    let missing = dir.path().join("client.secret");
    fs::remove_file(&missing).unwrap();
    let out = run(broker().args(&args));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("client.secret"),
        "{}",
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// ejabberd
// ---------------------------------------------------------------------------------------------

fn ejabberd_snippets() -> Vec<(String, String)> {
    let mut files: Vec<_> = fs::read_dir(root().join("deploy/ejabberd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(files.iter().any(|(n, _)| n == "single-node.yml"));
    assert!(files.iter().any(|(n, _)| n == "cluster.yml"));
    files
}

/// Frames one extauth request as ejabberd does (`{packet, 2}`).
fn frame(request: &str) -> Vec<u8> {
    let mut out = (request.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(request.as_bytes());
    out
}

#[test]
fn ejabberd_snippets_set_the_required_options_and_their_program_runs() {
    for (name, yml) in ejabberd_snippets() {
        let live: Vec<&str> = yml
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        assert!(
            live.contains(&"auth_method: [external]"),
            "{name}: auth_method"
        );
        assert!(
            live.contains(&"auth_use_cache: false"),
            "{name}: auth_use_cache: false"
        );
        let program = live
            .iter()
            .find_map(|l| l.strip_prefix("extauth_program: "))
            .unwrap_or_else(|| panic!("{name}: no extauth_program"))
            .trim_matches('"');

        // The very command line, pointed at brokers that are not there: it must parse, answer
        // 0 at once (fail closed) and exit 0 at end of input.
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = program.split_whitespace().map(String::from).collect();
        assert_eq!(args[0], "/usr/bin/extauth-shim", "{name}");
        let i = args.iter().position(|a| a == "--broker").unwrap() + 1;
        args[i] = args[i]
            .split(',')
            .map(|addr| match addr.split_once(':').unwrap().0 {
                "unix" => format!("unix:{}", dir.path().join("none.sock").display()),
                _ => format!("tcp:127.0.0.1:{}", free_port()),
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut shim = Command::new(shim_bin())
            .args(&args[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let mut stdin = shim.stdin.take().unwrap();
        stdin.write_all(&frame("isuser:alice:example.com")).unwrap();
        stdin.flush().unwrap();
        let mut reply = [0u8; 4];
        shim.stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut reply)
            .unwrap();
        assert_eq!(reply, [0, 2, 0, 0], "{name}: no broker means 0");
        drop(stdin);
        let status = shim.wait().unwrap();
        let mut log = String::new();
        shim.stderr
            .take()
            .unwrap()
            .read_to_string(&mut log)
            .unwrap();
        assert!(status.success(), "{name}: shim exit {status}\n{log}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{name}: took {:?}",
            started.elapsed()
        );
        eprintln!("{name}: extauth_program runs ({:?})", started.elapsed());
    }
}

/// Validates an ejabberd.yml with the installed ejabberd's option validators
/// (ejabberd_options, Mod:mod_opt_type): unknown options, unknown module options, global
/// options inside host_config and bad values fail.
const EJABBERD_CHECK: &str = r#"#!/usr/bin/env escript
-mode(compile).
main([File]) ->
    {ok, _} = application:ensure_all_started(fast_yaml),
    _ = (catch application:ensure_all_started(xmpp)),
    {ok, [Doc]} = fast_yaml:decode_from_file(File, [plain_as_atom]),
    Globals = ejabberd_options:globals(),
    Known = [K || {K, _} <- ejabberd_options:options()] ++ Globals,
    Errors = lists:flatmap(fun({K, V}) -> top(K, V, Known, Globals, global) end, Doc),
    [io:format("ERROR ~p~n", [E]) || E <- Errors],
    halt(case Errors of [] -> 0; _ -> 1 end).

top(modules, Mods, _, _, _) -> lists:flatmap(fun module/1, Mods);
top(host_config, Hosts, Known, Globals, global) ->
    lists:flatmap(fun({_Host, Opts}) ->
        lists:flatmap(fun({K, V}) -> top(K, V, Known, Globals, host) end, Opts)
    end, Hosts);
top(K, V, Known, Globals, Scope) ->
    case {lists:member(K, Known), Scope == host andalso lists:member(K, Globals)} of
        {false, _} -> [{unknown_option, K}];
        {true, true} -> [{global_option_in_host_config, K}];
        {true, false} -> value(K, fun() -> ejabberd_options:opt_type(K) end, V)
    end.

module({Mod, Opts}) ->
    case code:ensure_loaded(Mod) of
        {module, Mod} ->
            Names = [case D of {N, _} -> N; N -> N end || D <- Mod:mod_options(<<"example.com">>)],
            lists:flatmap(fun({K, V}) ->
                case lists:member(K, Names) of
                    false -> [{unknown_module_option, Mod, K}];
                    true -> value({Mod, K}, fun() -> Mod:mod_opt_type(K) end, V)
                end
            end, Opts);
        _ -> [{unknown_module, Mod}]
    end.

value(What, Type, V) ->
    case catch yconf:validate(Type(), V) of
        {ok, _} -> io:format("checked ~p~n", [What]), [];
        {error, Why, _} -> [{bad_value, What, Why}];
        _ -> io:format("known, value not checkable offline: ~p~n", [What]), []
    end.
"#;

/// The directory holding ejabberd's application (`ejabberd-VERSION/ebin`), for ERL_LIBS.
fn ejabberd_lib_dir() -> Option<PathBuf> {
    let candidates = [
        "/usr/lib",
        "/usr/lib64",
        "/usr/local/lib",
        "/opt/ejabberd/lib",
    ];
    let mut dirs: Vec<PathBuf> = Vec::new();
    for base in candidates {
        dirs.push(PathBuf::from(base));
        if let Ok(entries) = fs::read_dir(base) {
            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    dirs.into_iter().find(|dir| {
        fs::read_dir(dir).is_ok_and(|mut entries| {
            entries.any(|e| {
                e.is_ok_and(|e| {
                    e.file_name().to_string_lossy().starts_with("ejabberd-")
                        && e.path().join("ebin/ejabberd_options.beam").is_file()
                })
            })
        })
    })
}

#[test]
fn ejabberd_snippets_pass_ejabberds_own_validators() {
    let required = std::env::var("EXTAUTH_REQUIRE_EJABBERD").is_ok_and(|v| v == "1");
    let (Some(escript), Some(libs)) = (tool("escript"), ejabberd_lib_dir()) else {
        assert!(
            !required,
            "EXTAUTH_REQUIRE_EJABBERD=1 but ejabberd/escript is not installed"
        );
        skip(
            "ejabberd option validation",
            "ejabberd (and escript) not installed",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("check.escript");
    fs::write(&script, EJABBERD_CHECK).unwrap();

    // The checker itself refuses what it should.
    let bad = dir.path().join("bad.yml");
    fs::write(
        &bad,
        "auth_methd: [external]\nauth_use_cache: maybe\nhost_config:\n  a.example:\n    auth_cache_life_time: 5\nmodules:\n  mod_fail2ban:\n    c2s_max_auth_failure: 3\n",
    )
    .unwrap();
    let out = run(Command::new(&escript)
        .arg(&script)
        .arg(&bad)
        .env("ERL_LIBS", &libs)
        .env("ERL_CRASH_DUMP_BYTES", "0")
        .current_dir(dir.path()));
    let said = text(&out.stdout);
    assert!(!out.status.success(), "{said}");
    for error in [
        "{unknown_option,auth_methd}",
        "{bad_value,auth_use_cache,{bad_bool,maybe}}",
        "{global_option_in_host_config,auth_cache_life_time}",
        "{unknown_module_option,mod_fail2ban,c2s_max_auth_failure}",
    ] {
        assert!(
            said.contains(error),
            "checker missed {error}:\n{said}{}",
            text(&out.stderr)
        );
    }

    for (name, _) in ejabberd_snippets() {
        let out = run(Command::new(&escript)
            .arg(&script)
            .arg(root().join("deploy/ejabberd").join(&name))
            .env("ERL_LIBS", &libs)
            .env("ERL_CRASH_DUMP_BYTES", "0")
            .current_dir(dir.path()));
        let said = text(&out.stdout);
        assert!(
            out.status.success(),
            "deploy/ejabberd/{name} refused by ejabberd's validators:\n{said}{}",
            text(&out.stderr)
        );
        for option in ["auth_method", "extauth_program", "auth_use_cache"] {
            assert!(
                said.contains(&format!("checked {option}\n")),
                "{name}: {said}"
            );
        }
        eprintln!(
            "deploy/ejabberd/{name}: {} options checked by ejabberd's validators",
            said.lines().filter(|l| l.starts_with("checked")).count()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics: Grafana dashboard and Prometheus rules
// ---------------------------------------------------------------------------------------------

/// One metric of the table at the top of src/metrics.rs.
#[derive(Debug)]
struct Metric {
    kind: String,
    labels: BTreeSet<String>,
}

/// The metrics documented in src/metrics.rs, each also emitted by a `counter!`, `gauge!` or
/// `histogram!` call of that file.
fn documented_metrics() -> BTreeMap<String, Metric> {
    let source = read("src/metrics.rs");
    let mut metrics = BTreeMap::new();
    for line in source.lines() {
        let Some(row) = line.strip_prefix("//! | `") else {
            continue;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let name = cells[0].trim_end_matches('`').to_owned();
        let kind = cells[1].to_owned();
        // Label names are the backticked words outside parentheses (which list values).
        let mut labels = BTreeSet::new();
        let mut depth = 0;
        let mut in_tick = false;
        let mut word = String::new();
        for c in cells[2].chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                '`' if depth == 0 => {
                    if in_tick {
                        labels.insert(std::mem::take(&mut word));
                    }
                    in_tick = !in_tick;
                }
                c if in_tick && depth == 0 => word.push(c),
                _ => {}
            }
        }
        let emitted = format!("!(\"{name}\"");
        assert!(
            source.contains(&emitted),
            "src/metrics.rs documents {name} but never emits it"
        );
        assert!(
            ["counter", "gauge", "histogram"].contains(&kind.as_str()),
            "{kind}"
        );
        metrics.insert(name, Metric { kind, labels });
    }
    assert!(metrics.len() >= 9, "metrics table not found: {metrics:?}");
    metrics
}

/// Known values of the labels with a fixed vocabulary.
fn label_vocabulary() -> BTreeMap<&'static str, BTreeSet<String>> {
    fn literals(source: &str, prefix: &str) -> BTreeSet<String> {
        source
            .lines()
            .filter_map(|l| l.trim().strip_prefix(prefix))
            .filter_map(|l| l.split_once("=> \""))
            .map(|(_, v)| v.trim_end_matches(['"', ',']).to_owned())
            .collect()
    }
    let wire = read("src/protocol/wire.rs");
    let extauth = read("src/protocol/extauth.rs");
    let mut vocab = BTreeMap::new();
    vocab.insert("reason", literals(&wire, "Reason::"));
    vocab.insert("source", literals(&wire, "Source::"));
    vocab.insert("command", literals(&extauth, "Command::"));
    vocab.insert("result", ["accepted", "refused"].map(String::from).into());
    vocab.insert("layer", ["l1", "redis"].map(String::from).into());
    vocab.insert(
        "outcome",
        ["valid", "invalid", "unavailable"].map(String::from).into(),
    );
    for (label, values) in &vocab {
        assert!(values.len() >= 2, "{label}: {values:?}");
    }
    vocab
}

/// Checks one PromQL expression: every `extauth_*` name is a documented metric (histograms
/// with `_bucket`/`_sum`/`_count`), every label matcher and grouping label exists on the
/// metrics involved, and matched values of fixed vocabularies exist. Returns the metrics used.
fn check_promql(
    expr: &str,
    metrics: &BTreeMap<String, Metric>,
    vocab: &BTreeMap<&str, BTreeSet<String>>,
) -> Result<BTreeSet<String>, String> {
    let generic: BTreeSet<&str> = ["instance", "job", "le"].into();
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut used = BTreeSet::new();
    let mut all_labels: BTreeSet<String> = generic.iter().map(|s| s.to_string()).collect();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        if !is_ident(bytes[i]) || (i > 0 && is_ident(bytes[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        let word: String = bytes[start..i].iter().collect();
        if !word.starts_with("extauth_") {
            continue;
        }
        let (base, metric) = ["", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = word.strip_suffix(suffix)?;
                let metric = metrics.get(base)?;
                (suffix.is_empty() || metric.kind == "histogram").then(|| (base.to_owned(), metric))
            })
            .ok_or_else(|| format!("{word} is not a metric of src/metrics.rs"))?;
        if metric.kind == "histogram"
            && !word.ends_with("_bucket")
            && !word.ends_with("_sum")
            && !word.ends_with("_count")
        {
            return Err(format!(
                "{word} is a histogram: use _bucket, _sum or _count"
            ));
        }
        all_labels.extend(metric.labels.iter().cloned());
        used.insert(base.clone());
        if bytes.get(i) == Some(&'{') {
            let end = i + bytes[i..]
                .iter()
                .position(|&c| c == '}')
                .ok_or("unclosed {")?;
            let matchers: String = bytes[i + 1..end].iter().collect();
            for matcher in matchers.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                let op_at = matcher
                    .find(['=', '!'])
                    .ok_or(format!("bad matcher {matcher}"))?;
                let label = matcher[..op_at].trim();
                let rest = &matcher[op_at..];
                let (op, value) = ["=~", "!~", "!=", "="]
                    .iter()
                    .find_map(|op| rest.strip_prefix(op).map(|v| (*op, v)))
                    .ok_or(format!("bad matcher {matcher}"))?;
                let value = value.trim().trim_matches('"');
                if !metric.labels.contains(label) && !generic.contains(label) {
                    return Err(format!("{base} has no label {label} (matcher {matcher})"));
                }
                if let Some(known) = vocab.get(label) {
                    let values: Vec<&str> = if op.ends_with('~') {
                        value.split('|').collect()
                    } else {
                        vec![value]
                    };
                    for v in values {
                        if !known.contains(v) {
                            return Err(format!(
                                "{label}={v:?} is never emitted (known: {known:?})"
                            ));
                        }
                    }
                }
            }
            i = end + 1;
        }
    }
    // Grouping labels: by (...), without (...), ignoring (...), on (...).
    for keyword in ["by", "without", "ignoring", "on"] {
        let mut rest = expr;
        while let Some(at) = rest
            .find(&format!("{keyword} ("))
            .or_else(|| rest.find(&format!("{keyword}(")))
        {
            let preceded_by_ident = rest[..at].chars().last().is_some_and(is_ident);
            let open = at + rest[at..].find('(').unwrap();
            let close = open + rest[open..].find(')').ok_or("unclosed (")?;
            if !preceded_by_ident {
                for label in rest[open + 1..close]
                    .split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                {
                    if !all_labels.contains(label) {
                        return Err(format!("grouping label {label} exists on none of {used:?}"));
                    }
                }
            }
            rest = &rest[close..];
        }
    }
    Ok(used)
}

#[test]
fn grafana_dashboard_is_valid_and_uses_only_real_metrics() {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/extauth-broker.json"))
        .expect("deploy/grafana/extauth-broker.json is not valid JSON");
    let metrics = documented_metrics();
    let vocab = label_vocabulary();
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 30);
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(variables.contains(&"datasource") && variables.contains(&"instance"));

    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    let mut used = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{title}: wider than the grid");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            match check_promql(expr, &metrics, &vocab) {
                Ok(names) => used.extend(names),
                Err(why) => panic!("panel {title:?}: {why}\n  {expr}"),
            }
            assert!(
                expr.contains("$instance"),
                "{title}: not filtered by $instance: {expr}"
            );
            exprs.push(expr.to_owned());
        }
    }
    let unused: Vec<_> = metrics.keys().filter(|m| !used.contains(*m)).collect();
    if !unused.is_empty() {
        // Not a failure (a new metric should not break others' builds), but say it loudly.
        eprintln!("\n*** deploy/grafana/extauth-broker.json shows no panel for {unused:?} ***\n");
    }
    eprintln!(
        "dashboard: {} panels, {} queries, all {} metrics shown",
        panels.len(),
        exprs.len(),
        metrics.len()
    );

    // The queries' syntax, by promtool, as recording rules (with Grafana's variables filled).
    let Some(promtool) = tool("promtool") else {
        skip(
            "promtool check of the dashboard queries",
            "promtool is not installed",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let file = dir.path().join("dashboard-rules.yml");
    fs::write(&file, rules).unwrap();
    run_ok(Command::new(promtool).args(["check", "rules"]).arg(&file));
}

#[test]
fn prometheus_rules_use_only_real_metrics() {
    let rules = read("deploy/prometheus/extauth-broker.rules.yml");
    let metrics = documented_metrics();
    let vocab = label_vocabulary();
    // Each `expr:` (one line, or a `|` block of indented lines).
    let lines: Vec<&str> = rules.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(value) = line.trim_start().strip_prefix("expr: ") else {
            continue;
        };
        if value.trim() == "|" {
            let indent = line.len() - line.trim_start().len();
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            exprs.push(block.join(" "));
        } else {
            exprs.push(value.to_owned());
        }
    }
    assert!(exprs.len() >= 6, "{exprs:?}");
    for expr in &exprs {
        if let Err(why) = check_promql(expr, &metrics, &vocab) {
            panic!("deploy/prometheus/extauth-broker.rules.yml: {why}\n  {expr}");
        }
    }
    match tool("promtool") {
        Some(promtool) => {
            let out = run_ok(
                Command::new(promtool)
                    .args(["check", "rules"])
                    .arg(root().join("deploy/prometheus/extauth-broker.rules.yml")),
            );
            eprintln!("{}", out.trim());
        }
        None => skip("promtool check rules", "promtool is not installed"),
    }
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// The ```toml block of deploy/redis/README.md that contains `marker`.
fn readme_toml(marker: &str) -> String {
    let readme = read("deploy/redis/README.md");
    readme
        .split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains(marker))
        .unwrap_or_else(|| panic!("no toml block with {marker} in deploy/redis/README.md"))
        .to_owned()
}

fn redis_cli(cli: &Path, port: u16, args: &[&str]) -> String {
    let out = run(Command::new(cli)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args));
    text(&out.stdout)
}

fn redis_server(conf: &Path, port: u16, dir: &Path, extra: &[String]) -> Command {
    fs::create_dir_all(dir).unwrap();
    let mut cmd = Command::new("redis-server");
    cmd.arg(conf)
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("log"))
        .arg("--pidfile")
        .arg(dir.join("pid"))
        .args(["--daemonize", "no"])
        .args(extra);
    cmd
}

/// Writes the README's broker settings for `marker` with the example addresses mapped to the
/// loopback ports, checks them with check-config, and revokes a user through them.
fn revoke_through(marker: &str, addresses: &[(&str, u16)], dir: &Path) -> String {
    let mut toml = readme_toml(marker);
    for (example, port) in addresses {
        assert!(
            toml.contains(example),
            "{example} not in the README's {marker} block"
        );
        toml = toml.replace(example, &format!("127.0.0.1:{port}"));
    }
    let key = dir.join("cache.key");
    fs::write(&key, "0123456789abcdef0123456789abcdef0123\n").unwrap();
    let toml = toml.replace("/etc/extauth-broker/cache.key", &key.to_string_lossy());
    let config = dir.join(format!("broker-{}.toml", marker.split('"').nth(1).unwrap()));
    fs::write(&config, toml).unwrap();
    let out = run_ok(
        broker()
            .env("EXTAUTH_CLIENT_SECRET", "test-secret")
            .arg("check-config")
            .arg("--config")
            .arg(&config)
            .args([
                "--introspection-url",
                "http://127.0.0.1:9/introspect",
                "--client-id",
                "test",
            ]),
    );
    assert!(out.contains("configuration OK"), "{out}");
    run_ok(broker().arg("revoke").arg("--config").arg(&config).args([
        "--domain",
        "example.com",
        "--user",
        "alice",
    ]))
}

#[test]
fn redis_examples_work_with_the_broker() {
    let (Some(_), Some(cli)) = (tool("redis-server"), tool("redis-cli")) else {
        skip("Redis examples", "redis-server/redis-cli not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let examples = root().join("deploy/redis");
    let mut children = Children::default();

    // Sentinel: master + replica + 3 sentinels, from the example files.
    let (master, replica) = (free_port(), free_port());
    children.spawn(&mut redis_server(
        &examples.join("sentinel/redis-master.conf"),
        master,
        &d.join("master"),
        &["--repl-diskless-sync-delay".into(), "0".into()],
    ));
    children.spawn(&mut redis_server(
        &examples.join("sentinel/redis-replica.conf"),
        replica,
        &d.join("replica"),
        &["--replicaof".into(), "127.0.0.1".into(), master.to_string()],
    ));
    let sentinel_conf = fs::read_to_string(examples.join("sentinel/sentinel.conf")).unwrap();
    let monitor = "sentinel monitor extauth 10.0.0.21 6379 2";
    assert!(sentinel_conf.contains(monitor));
    let sentinels = [free_port(), free_port(), free_port()];
    for (n, port) in sentinels.iter().enumerate() {
        // Sentinel rewrites its file: each gets its own copy.
        let conf = d.join(format!("sentinel{n}.conf"));
        fs::write(
            &conf,
            sentinel_conf.replace(
                monitor,
                &format!("sentinel monitor extauth 127.0.0.1 {master} 2"),
            ),
        )
        .unwrap();
        children.spawn(&mut redis_server(
            &conf,
            *port,
            &d.join(format!("sentinel{n}")),
            &["--sentinel".into()],
        ));
    }
    wait_until(Duration::from_secs(20), "the replica syncs", || {
        redis_cli(&cli, replica, &["INFO", "replication"]).contains("master_link_status:up")
    });
    wait_until(
        Duration::from_secs(20),
        "the sentinels name the master",
        || {
            sentinels.iter().all(|s| {
                redis_cli(
                    &cli,
                    *s,
                    &["SENTINEL", "get-master-addr-by-name", "extauth"],
                ) == format!("127.0.0.1\n{master}\n")
            })
        },
    );
    let said = revoke_through(
        "redis_mode = \"sentinel\"",
        &[
            ("10.0.0.11:26379", sentinels[0]),
            ("10.0.0.12:26379", sentinels[1]),
            ("10.0.0.13:26379", sentinels[2]),
        ],
        d,
    );
    assert!(said.contains("revoked every verdict of alice"), "{said}");
    for port in [master, replica] {
        wait_until(
            Duration::from_secs(5),
            "the revocation mark reaches master and replica",
            || {
                redis_cli(&cli, port, &["--scan", "--pattern", "extauth:v2:{u:*}:r"])
                    .lines()
                    .count()
                    == 1
            },
        );
    }
    eprintln!("Sentinel example: master, replica and 3 sentinels up; revoke went through them");

    // Cluster: three masters from the example file.
    let nodes = [free_port(), free_port(), free_port()];
    for (n, port) in nodes.iter().enumerate() {
        children.spawn(&mut redis_server(
            &examples.join("cluster/redis-cluster.conf"),
            *port,
            &d.join(format!("node{n}")),
            &[],
        ));
    }
    wait_until(Duration::from_secs(10), "cluster nodes answer", || {
        nodes
            .iter()
            .all(|p| redis_cli(&cli, *p, &["PING"]) == "PONG\n")
    });
    let addrs: Vec<String> = nodes.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    run_ok(
        Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&addrs)
            .arg("--cluster-yes"),
    );
    wait_until(
        Duration::from_secs(20),
        "cluster_state:ok on every node",
        || {
            nodes
                .iter()
                .all(|p| redis_cli(&cli, *p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        },
    );
    let said = revoke_through(
        "redis_mode = \"cluster\"",
        &[
            ("10.0.0.31:6379", nodes[0]),
            ("10.0.0.32:6379", nodes[1]),
            ("10.0.0.33:6379", nodes[2]),
        ],
        d,
    );
    assert!(said.contains("revoked every verdict of alice"), "{said}");
    let holding: usize = nodes
        .iter()
        .map(|p| {
            redis_cli(&cli, *p, &["--scan", "--pattern", "extauth:v2:{u:*}:r"])
                .lines()
                .count()
        })
        .sum();
    assert_eq!(holding, 1, "one node holds the revocation mark");
    eprintln!("Cluster example: 3 masters, cluster_state:ok; revoke went through them");
}

// ---------------------------------------------------------------------------------------------
// Debian package
// ---------------------------------------------------------------------------------------------

fn deb_metadata() -> toml::Table {
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    manifest["package"]["metadata"]["deb"]
        .as_table()
        .expect("[package.metadata.deb] in Cargo.toml")
        .clone()
}

/// (source, destination) of every asset.
fn deb_assets() -> Vec<(String, String)> {
    deb_metadata()["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().unwrap();
            (
                a[0].as_str().unwrap().to_owned(),
                a[1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn debian_packaging_files_are_complete() {
    let meta = deb_metadata();
    // Every source that is not built exists (globs: at least one match).
    for (source, _) in deb_assets() {
        if source.starts_with("target/") {
            continue;
        }
        match source.split_once('*') {
            Some((dir, suffix)) => {
                let matches = fs::read_dir(root().join(dir))
                    .unwrap_or_else(|e| panic!("{dir}: {e}"))
                    .filter(|e| {
                        e.as_ref()
                            .unwrap()
                            .file_name()
                            .to_string_lossy()
                            .ends_with(suffix)
                    })
                    .count();
                assert!(matches > 0, "asset {source} matches nothing");
            }
            None => assert!(root().join(&source).is_file(), "asset {source} missing"),
        }
    }
    // Every unit ships: the two main ones through systemd-units, the others as assets.
    let units_dir = meta["systemd-units"]["unit-scripts"].as_str().unwrap();
    assert_eq!(units_dir.trim_end_matches('/'), "deploy/systemd");
    for name in systemd_units().keys() {
        let main = name == "extauth-broker.service" || name == "extauth-broker.socket";
        let asset = deb_assets()
            .iter()
            .any(|(s, _)| s == &format!("deploy/systemd/{name}"));
        assert!(main != asset, "{name}: ship it exactly once");
    }
    // The maintainer scripts: valid shell, with the debhelper token for the systemd snippets.
    for script in ["postinst", "postrm"] {
        let path = root().join("deploy/debian").join(script);
        assert!(read(&format!("deploy/debian/{script}")).contains("\n#DEBHELPER#\n"));
        run_ok(Command::new("sh").arg("-n").arg(&path));
    }
    run_ok(
        Command::new("bash")
            .arg("-n")
            .arg(root().join("deploy/debian/build-deb.sh")),
    );

    // The shim's man page documents exactly the shim's flags.
    let help = run(Command::new(shim_bin()).arg("--help"));
    let help = text(&help.stderr) + &text(&help.stdout);
    let flags = |s: &str| -> BTreeSet<String> {
        s.replace("\\-", "-")
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(String::from)
            .collect()
    };
    let in_help = flags(&help);
    let in_man = flags(&read("deploy/debian/extauth-shim.1"));
    assert!(in_help.len() >= 4, "{help}");
    let mut in_help_only: Vec<_> = in_help.difference(&in_man).collect();
    in_help_only.retain(|f| *f != "--help" && *f != "--version");
    assert!(
        in_help_only.is_empty(),
        "extauth-shim flags missing from deploy/debian/extauth-shim.1: {in_help_only:?}"
    );
    let in_man_only: Vec<_> = in_man
        .difference(&in_help)
        .filter(|f| *f != "--help" && *f != "--version")
        .collect();
    assert!(
        in_man_only.is_empty(),
        "deploy/debian/extauth-shim.1 documents flags the shim lacks: {in_man_only:?}"
    );
}

#[test]
fn debian_package_contents() {
    let deb = match std::env::var("EXTAUTH_TEST_DEB").ok().as_deref() {
        None | Some("") | Some("0") => {
            skip(
                "building and inspecting the .deb",
                "set EXTAUTH_TEST_DEB=1 to build it (release build, minutes) or EXTAUTH_TEST_DEB=/path/to.deb",
            );
            return;
        }
        Some("1") => {
            let out = run_ok(Command::new("bash").arg(root().join("deploy/debian/build-deb.sh")));
            let path = out
                .lines()
                .rev()
                .find(|l| l.trim_end().ends_with(".deb"))
                .unwrap();
            root().join(path.trim())
        }
        Some(path) => PathBuf::from(path),
    };
    let Some(dpkg_deb) = tool("dpkg-deb") else {
        skip("inspecting the .deb", "dpkg-deb is not installed");
        return;
    };
    assert!(deb.is_file(), "{} missing", deb.display());
    let info = run_ok(Command::new(&dpkg_deb).arg("-I").arg(&deb));
    for field in [
        "Package: extauth-broker",
        "Section: net",
        "Priority: optional",
    ] {
        assert!(info.contains(field), "{field}:\n{info}");
    }
    let depends = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .unwrap_or_else(|| panic!("no Depends:\n{info}"));
    assert!(
        depends.contains("adduser") && depends.contains("libc6"),
        "{depends}"
    );
    for script in ["postinst", "prerm", "postrm", "conffiles"] {
        assert!(
            info.contains(script),
            "control member {script} missing:\n{info}"
        );
    }

    let listing = run_ok(Command::new(&dpkg_deb).arg("-c").arg(&deb));
    let files: BTreeMap<String, String> = listing
        .lines()
        .map(|l| {
            let mode = l.split_whitespace().next().unwrap().to_owned();
            let path = l
                .split_whitespace()
                .nth(5)
                .unwrap()
                .trim_start_matches('.')
                .to_owned();
            (path, mode)
        })
        .collect();
    for (path, mode) in [
        ("/usr/bin/extauth-broker", "-rwxr-xr-x"),
        ("/usr/bin/extauth-shim", "-rwxr-xr-x"),
        ("/etc/extauth-broker/broker.toml", "-rw-r--r--"),
        (
            "/usr/lib/systemd/system/extauth-broker.service",
            "-rw-r--r--",
        ),
        (
            "/usr/lib/systemd/system/extauth-broker.socket",
            "-rw-r--r--",
        ),
        (
            "/usr/lib/systemd/system/extauth-broker-metrics.socket",
            "-rw-r--r--",
        ),
        (
            "/usr/lib/systemd/system/extauth-broker-admin.socket",
            "-rw-r--r--",
        ),
        ("/usr/share/man/man1/extauth-broker.1.gz", "-rw-r--r--"),
        ("/usr/share/man/man1/extauth-shim.1.gz", "-rw-r--r--"),
        (
            "/usr/share/bash-completion/completions/extauth-broker",
            "-rw-r--r--",
        ),
        (
            "/usr/share/zsh/vendor-completions/_extauth-broker",
            "-rw-r--r--",
        ),
        (
            "/usr/share/fish/vendor_completions.d/extauth-broker.fish",
            "-rw-r--r--",
        ),
        ("/usr/share/doc/extauth-broker/operations.md", "-rw-r--r--"),
        ("/usr/share/doc/extauth-broker/copyright", "-rw-r--r--"),
        (
            "/usr/share/doc/extauth-broker/examples/ejabberd/cluster.yml",
            "-rw-r--r--",
        ),
        (
            "/usr/share/doc/extauth-broker/examples/redis/sentinel/sentinel.conf",
            "-rw-r--r--",
        ),
        (
            "/usr/share/doc/extauth-broker/examples/grafana/extauth-broker.json",
            "-rw-r--r--",
        ),
    ] {
        assert_eq!(
            files.get(path).map(String::as_str),
            Some(mode),
            "{path} in\n{listing}"
        );
    }

    // Control scripts: users and groups, cache key, systemd snippets, no start at install.
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control");
    run_ok(Command::new(&dpkg_deb).arg("-e").arg(&deb).arg(&control));
    let postinst = fs::read_to_string(control.join("postinst")).unwrap();
    assert!(
        postinst.contains("adduser --system")
            && postinst.contains("addgroup --system --quiet extauth")
    );
    assert!(
        postinst.contains("deb-systemd-helper update-state extauth-broker.socket"),
        "{postinst}"
    );
    assert!(
        !postinst.contains("deb-systemd-invoke start"),
        "nothing starts at install:\n{postinst}"
    );
    assert!(!postinst.contains("#DEBHELPER#"));
    let conffiles = fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(
        conffiles.contains("/etc/extauth-broker/broker.toml"),
        "{conffiles}"
    );

    // The packaged binaries run, and the packaged units verify against them.
    let tree = dir.path().join("tree");
    run_ok(Command::new(&dpkg_deb).arg("-x").arg(&deb).arg(&tree));
    let broker = tree.join("usr/bin/extauth-broker");
    let version = run_ok(Command::new(&broker).arg("--version"));
    assert!(version.starts_with("extauth-broker "), "{version}");
    let shim = run(Command::new(tree.join("usr/bin/extauth-shim")).arg("--help"));
    assert!(text(&shim.stderr).contains("--broker"));
    let man = fs::read(tree.join("usr/share/man/man1/extauth-broker.1.gz")).unwrap();
    assert_eq!(&man[..2], &[0x1f, 0x8b], "gzip");
    if let Some(analyze) = tool("systemd-analyze") {
        let units_dir = tree.join("usr/lib/systemd/system");
        let mut paths = Vec::new();
        for entry in fs::read_dir(&units_dir).unwrap() {
            let path = entry.unwrap().path();
            let unit = fs::read_to_string(&path).unwrap();
            fs::write(
                &path,
                unit.replace("/usr/bin/extauth-broker", &broker.to_string_lossy()),
            )
            .unwrap();
            paths.push(path);
        }
        let out = run(Command::new(analyze)
            .args(["verify", "--man=no"])
            .args(&paths)
            .current_dir(&units_dir));
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success() && said.trim().is_empty(), "{said}");
    }
    let size = fs::metadata(&deb).unwrap().len();
    let shim_size = fs::metadata(tree.join("usr/bin/extauth-shim"))
        .unwrap()
        .len();
    let broker_size = fs::metadata(&broker).unwrap().len();
    eprintln!(
        "{}: {} KiB, {} files; extauth-broker {} KiB, extauth-shim {} KiB",
        deb.display(),
        size / 1024,
        files.len(),
        broker_size / 1024,
        shim_size / 1024
    );
}
